//! Pod resolution: from a pod's UID to its cgroup, its processes and its
//! network namespace, read from kubelet's cgroup layout and `/proc` — what
//! the Kubernetes mode needs to enroll a pod that it only knows from the API.
//!
//! kubelet puts every pod in a cgroup named after its UID, under a QoS
//! parent, in one of two shapes depending on its cgroup driver:
//!
//! | driver   | guaranteed                                  | burstable / besteffort |
//! |----------|---------------------------------------------|------------------------|
//! | systemd  | `kubepods.slice/kubepods-pod<uid_>.slice`   | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` |
//! | cgroupfs | `kubepods/pod<uid>`                         | `kubepods/burstable/pod<uid>` |
//!
//! (`<uid_>` is the UID with `-` written as `_`, since `-` separates the
//! levels of a systemd slice name.) The container runtime adds one cgroup
//! per container below it: `cri-containerd-<id>.scope`, `crio-<id>.scope`,
//! `docker-<id>.scope` with systemd, a bare `<id>` with cgroupfs. A kubelet
//! started with its own `--cgroup-root` (kind, some distributions) nests
//! these one or two levels deeper, so when the usual places are empty the
//! resolver searches a few levels of the hierarchy for the pod's directory.
//!
//! Only the cgroup v2 hierarchy is used: the root itself when it is a
//! cgroup2 mount (`cgroup.controllers` exists), or its `unified`
//! subdirectory in the hybrid layout (v1 controllers with v2 beside them).
//! All containers of a pod share the pod's network namespace, so any live
//! process of the pod names it: `<proc_root>/<pid>/ns/net`.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PodResolveError {
    #[error("{uid:?} is not a pod UID (expected letters, digits and dashes, like 2b5c…-…)")]
    InvalidUid { uid: String },
    #[error(
        "no cgroup v2 hierarchy at {root}: neither it nor {root}/unified has cgroup.controllers (is cgroup2 mounted there?)"
    )]
    NoCgroupV2 { root: PathBuf },
    #[error("pod {uid}: no cgroup found (looked at {searched})")]
    NotFound { uid: String, searched: String },
    #[error("pod {uid}: its cgroup {cgroup} has no running process (all containers exited?)")]
    NoRunningProcess { uid: String, cgroup: PathBuf },
    #[error(
        "pod {uid}: none of its processes ({pids:?}) has a network namespace under {proc_root}"
    )]
    NoNetns {
        uid: String,
        pids: Vec<u32>,
        proc_root: PathBuf,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where a pod lives on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedPod {
    /// The pod's cgroup v2 directory (the parent of its containers' cgroups).
    pub cgroup: PathBuf,
    /// The pod's live processes, in ascending order.
    pub pids: Vec<u32>,
    /// The pod's network namespace, `<proc_root>/<pid>/ns/net` of its
    /// lowest live pid (usually the sandbox's pause process).
    pub netns: PathBuf,
}

pub struct PodResolver {
    cgroup_root: PathBuf,
    proc_root: PathBuf,
}

/// QoS parents below `kubepods`, as kubelet names them.
const QOS_CLASSES: [Option<&str>; 3] = [None, Some("burstable"), Some("besteffort")];
/// How deep below the v2 root the search for a pod's directory goes when it
/// is not in one of the usual places.
const SEARCH_DEPTH: usize = 5;

impl PodResolver {
    /// `cgroup_root`: where the host's cgroup hierarchy is mounted (e.g.
    /// `/sys/fs/cgroup`, or a host mount such as `/host/sys/fs/cgroup`);
    /// `proc_root`: the host's `/proc` (e.g. `/host/proc` in a DaemonSet).
    pub fn new(cgroup_root: impl Into<PathBuf>, proc_root: impl Into<PathBuf>) -> PodResolver {
        PodResolver {
            cgroup_root: cgroup_root.into(),
            proc_root: proc_root.into(),
        }
    }

    /// The pod's cgroup, live processes and network namespace.
    pub fn resolve(&self, pod_uid: &str) -> Result<ResolvedPod, PodResolveError> {
        if pod_uid.is_empty()
            || !pod_uid
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(PodResolveError::InvalidUid {
                uid: pod_uid.to_owned(),
            });
        }
        let v2 = self.v2_root()?;
        let cgroup = self.find_pod_cgroup(&v2, pod_uid)?;
        let mut pids = Vec::new();
        collect_pids(&cgroup, &mut pids)?;
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|pid| self.is_live(*pid));
        if pids.is_empty() {
            return Err(PodResolveError::NoRunningProcess {
                uid: pod_uid.to_owned(),
                cgroup,
            });
        }
        let netns = pids
            .iter()
            .map(|pid| self.proc_root.join(pid.to_string()).join("ns/net"))
            .find(|path| path.symlink_metadata().is_ok())
            .ok_or_else(|| PodResolveError::NoNetns {
                uid: pod_uid.to_owned(),
                pids: pids.clone(),
                proc_root: self.proc_root.clone(),
            })?;
        Ok(ResolvedPod {
            cgroup,
            pids,
            netns,
        })
    }

    /// The cgroup v2 hierarchy: the root itself, or `unified` in the hybrid
    /// layout.
    fn v2_root(&self) -> Result<PathBuf, PodResolveError> {
        [self.cgroup_root.clone(), self.cgroup_root.join("unified")]
            .into_iter()
            .find(|dir| dir.join("cgroup.controllers").is_file())
            .ok_or_else(|| PodResolveError::NoCgroupV2 {
                root: self.cgroup_root.clone(),
            })
    }

    fn find_pod_cgroup(&self, v2: &Path, uid: &str) -> Result<PathBuf, PodResolveError> {
        let candidates = usual_places(v2, uid);
        if let Some(found) = candidates.iter().find(|dir| dir.is_dir()) {
            return Ok(found.clone());
        }
        if let Some(found) = search(v2, uid, SEARCH_DEPTH) {
            return Ok(found);
        }
        Err(PodResolveError::NotFound {
            uid: uid.to_owned(),
            searched: format!(
                "{} and {SEARCH_DEPTH} levels below {}",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                v2.display()
            ),
        })
    }

    /// A process that still runs: its `/proc` entry exists and it is not a
    /// zombie (an exited process whose parent has not reaped it yet).
    fn is_live(&self, pid: u32) -> bool {
        let dir = self.proc_root.join(pid.to_string());
        match std::fs::read_to_string(dir.join("status")) {
            Ok(status) => !status
                .lines()
                .find_map(|line| line.strip_prefix("State:"))
                .is_some_and(|state| {
                    let state = state.trim_start();
                    state.starts_with('Z') || state.starts_with('X')
                }),
            // Without a readable status, the directory alone decides.
            Err(_) => dir.is_dir(),
        }
    }
}

/// The directory kubelet gives a pod, for each driver and QoS class.
fn usual_places(v2: &Path, uid: &str) -> Vec<PathBuf> {
    let systemd_uid = uid.replace('-', "_");
    let mut places = Vec::new();
    for qos in QOS_CLASSES {
        places.push(match qos {
            None => v2
                .join("kubepods.slice")
                .join(format!("kubepods-pod{systemd_uid}.slice")),
            Some(qos) => v2
                .join("kubepods.slice")
                .join(format!("kubepods-{qos}.slice"))
                .join(format!("kubepods-{qos}-pod{systemd_uid}.slice")),
        });
        places.push(match qos {
            None => v2.join("kubepods").join(format!("pod{uid}")),
            Some(qos) => v2.join("kubepods").join(qos).join(format!("pod{uid}")),
        });
    }
    places
}

/// Whether a directory name is the cgroup of pod `uid` in either driver's
/// naming: `pod<uid>` (cgroupfs) or `…-pod<uid_>.slice` (systemd).
fn is_pod_dir(name: &str, uid: &str) -> bool {
    let systemd_uid = uid.replace('-', "_");
    name == format!("pod{uid}") || name.ends_with(&format!("-pod{systemd_uid}.slice"))
}

/// Breadth-first search for the pod's directory, `depth` levels deep.
fn search(root: &Path, uid: &str, depth: usize) -> Option<PathBuf> {
    let mut level = vec![root.to_path_buf()];
    for _ in 0..depth {
        let mut next = Vec::new();
        for dir in &level {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if is_pod_dir(&name, uid) {
                    return Some(entry.path());
                }
                next.push(entry.path());
            }
        }
        level = next;
    }
    None
}

/// The pids in `cgroup.procs` of `dir` and every cgroup below it: the
/// containers' cgroups (and any a container made inside its own).
fn collect_pids(dir: &Path, pids: &mut Vec<u32>) -> Result<(), PodResolveError> {
    let procs = dir.join("cgroup.procs");
    match std::fs::read_to_string(&procs) {
        Ok(text) => pids.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        ),
        // A cgroup removed while we read is a container that just exited.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(PodResolveError::Io {
                path: procs,
                source,
            });
        }
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(PodResolveError::Io {
                path: dir.to_owned(),
                source,
            });
        }
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_pids(&entry.path(), pids)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "2b5c7e6a-9d41-4f3e-8a0b-1c2d3e4f5a6b";
    const CONTAINER_A: &str = "4f1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c";
    const CONTAINER_B: &str = "9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b";

    /// A fake `/sys/fs/cgroup` and `/proc`, built in a temporary directory.
    struct FakeHost {
        dir: tempfile::TempDir,
    }

    impl FakeHost {
        fn new() -> FakeHost {
            FakeHost {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn cgroup_root(&self) -> PathBuf {
            self.dir.path().join("sys/fs/cgroup")
        }
        fn proc_root(&self) -> PathBuf {
            self.dir.path().join("proc")
        }
        /// Marks `dir` (relative to the cgroup root) as a cgroup2 mount.
        fn cgroup2_at(&self, dir: &str) -> PathBuf {
            let root = self.cgroup_root().join(dir);
            std::fs::create_dir_all(&root).unwrap();
            std::fs::write(root.join("cgroup.controllers"), "cpu io memory pids\n").unwrap();
            root
        }
        /// A cgroup below `v2` holding `pids`.
        fn cgroup(&self, v2: &Path, path: &str, pids: &[u32]) -> PathBuf {
            let dir = v2.join(path);
            std::fs::create_dir_all(&dir).unwrap();
            let text: String = pids.iter().map(|p| format!("{p}\n")).collect();
            std::fs::write(dir.join("cgroup.procs"), text).unwrap();
            dir
        }
        /// A process in `/proc` with a network namespace link; `state` as
        /// in /proc/PID/status (`S (sleeping)`, `Z (zombie)`).
        fn process(&self, pid: u32, state: &str, netns_inode: u64) {
            let dir = self.proc_root().join(pid.to_string());
            std::fs::create_dir_all(dir.join("ns")).unwrap();
            std::fs::write(
                dir.join("status"),
                format!("Name:\tpause\nState:\t{state}\nPid:\t{pid}\n"),
            )
            .unwrap();
            std::os::unix::fs::symlink(format!("net:[{netns_inode}]"), dir.join("ns/net")).unwrap();
        }
        fn resolver(&self) -> PodResolver {
            PodResolver::new(self.cgroup_root(), self.proc_root())
        }
    }

    fn systemd_pod_dir(qos: Option<&str>) -> String {
        let uid = UID.replace('-', "_");
        match qos {
            None => format!("kubepods.slice/kubepods-pod{uid}.slice"),
            Some(q) => format!("kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{uid}.slice"),
        }
    }

    fn cgroupfs_pod_dir(qos: Option<&str>) -> String {
        match qos {
            None => format!("kubepods/pod{UID}"),
            Some(q) => format!("kubepods/{q}/pod{UID}"),
        }
    }

    #[test]
    fn systemd_driver_every_qos_class_on_cgroup_v2() {
        for qos in QOS_CLASSES {
            let host = FakeHost::new();
            let v2 = host.cgroup2_at("");
            let pod = systemd_pod_dir(qos);
            host.cgroup(&v2, &pod, &[]);
            host.cgroup(
                &v2,
                &format!("{pod}/cri-containerd-{CONTAINER_A}.scope"),
                &[4100],
            );
            host.cgroup(
                &v2,
                &format!("{pod}/cri-containerd-{CONTAINER_B}.scope"),
                &[4200, 4201],
            );
            for pid in [4100, 4200, 4201] {
                host.process(pid, "S (sleeping)", 4026532001);
            }
            let resolved = host.resolver().resolve(UID).unwrap();
            assert_eq!(resolved.cgroup, v2.join(&pod), "qos {qos:?}");
            assert_eq!(resolved.pids, vec![4100, 4200, 4201]);
            assert_eq!(resolved.netns, host.proc_root().join("4100/ns/net"));
        }
    }

    #[test]
    fn cgroupfs_driver_every_qos_class_in_the_hybrid_layout() {
        for qos in QOS_CLASSES {
            let host = FakeHost::new();
            // v1 controllers beside the unified v2 hierarchy.
            std::fs::create_dir_all(host.cgroup_root().join("memory/kubepods")).unwrap();
            let v2 = host.cgroup2_at("unified");
            let pod = cgroupfs_pod_dir(qos);
            host.cgroup(&v2, &format!("{pod}/{CONTAINER_A}"), &[700]);
            host.process(700, "S (sleeping)", 4026532002);
            let resolved = host.resolver().resolve(UID).unwrap();
            assert_eq!(resolved.cgroup, v2.join(&pod), "qos {qos:?}");
            assert_eq!(resolved.pids, vec![700]);
            assert_eq!(resolved.netns, host.proc_root().join("700/ns/net"));
        }
    }

    #[test]
    fn exited_containers_and_dead_processes_are_skipped() {
        let host = FakeHost::new();
        let v2 = host.cgroup2_at("");
        let pod = systemd_pod_dir(Some("burstable"));
        // An exited container whose cgroup lingers, a zombie, a pid already
        // gone from /proc, and one live process in a crio container.
        host.cgroup(&v2, &format!("{pod}/crio-{CONTAINER_A}.scope"), &[]);
        host.cgroup(
            &v2,
            &format!("{pod}/crio-conmon-{CONTAINER_A}.scope"),
            &[310],
        );
        host.process(310, "Z (zombie)", 4026532003);
        host.cgroup(&v2, &format!("{pod}/crio-{CONTAINER_B}.scope"), &[320, 330]);
        host.process(330, "S (sleeping)", 4026532003);
        let resolved = host.resolver().resolve(UID).unwrap();
        assert_eq!(resolved.pids, vec![330]);
        assert_eq!(resolved.netns, host.proc_root().join("330/ns/net"));
    }

    #[test]
    fn a_pod_whose_containers_all_exited_is_an_error_naming_its_cgroup() {
        let host = FakeHost::new();
        let v2 = host.cgroup2_at("");
        let pod = cgroupfs_pod_dir(Some("besteffort"));
        host.cgroup(&v2, &format!("{pod}/{CONTAINER_A}"), &[]);
        let err = host.resolver().resolve(UID).unwrap_err();
        assert!(
            matches!(&err, PodResolveError::NoRunningProcess { cgroup, .. } if *cgroup == v2.join(&pod)),
            "{err}"
        );
    }

    #[test]
    fn a_custom_kubelet_cgroup_root_is_found_by_searching() {
        // kind runs kubelet with --cgroup-root=/kubelet and the systemd driver.
        let host = FakeHost::new();
        let v2 = host.cgroup2_at("");
        let uid = UID.replace('-', "_");
        let pod = format!(
            "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{uid}.slice"
        );
        host.cgroup(
            &v2,
            &format!("{pod}/cri-containerd-{CONTAINER_A}.scope"),
            &[55],
        );
        host.process(55, "R (running)", 4026532004);
        let resolved = host.resolver().resolve(UID).unwrap();
        assert_eq!(resolved.cgroup, v2.join(&pod));
        assert_eq!(resolved.pids, vec![55]);
    }

    #[test]
    fn another_pods_cgroup_is_not_taken() {
        let host = FakeHost::new();
        let v2 = host.cgroup2_at("");
        let other = "11111111-2222-3333-4444-555555555555";
        host.cgroup(
            &v2,
            &format!("kubepods/burstable/pod{other}/{CONTAINER_A}"),
            &[9],
        );
        host.process(9, "S (sleeping)", 1);
        let err = host.resolver().resolve(UID).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pod {UID}: no cgroup found")),
            "{err}"
        );
        assert!(err.contains("kubepods-burstable-pod"), "{err}");
    }

    #[test]
    fn without_cgroup_v2_the_error_says_where_it_looked() {
        let host = FakeHost::new();
        std::fs::create_dir_all(host.cgroup_root().join("memory")).unwrap();
        let err = host.resolver().resolve(UID).unwrap_err();
        assert!(matches!(err, PodResolveError::NoCgroupV2 { .. }), "{err}");
        assert!(err.to_string().contains("unified"), "{err}");
    }

    #[test]
    fn a_uid_with_path_characters_is_refused() {
        let host = FakeHost::new();
        host.cgroup2_at("");
        for uid in ["../../etc", "", "a/b"] {
            let err = host.resolver().resolve(uid).unwrap_err();
            assert!(
                matches!(err, PodResolveError::InvalidUid { .. }),
                "{uid}: {err}"
            );
        }
    }

    #[test]
    fn resolves_a_real_process_of_this_machine() {
        // The real /proc and the real cgroup2 mount: this test process's own
        // cgroup stands in for a pod's container cgroup.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let Some(v2) = mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.get(2) == Some(&"cgroup2"))
            .map(|f| PathBuf::from(f[1]))
        else {
            panic!("no cgroup2 mount in /proc/self/mounts: this test needs cgroup v2 (or hybrid)");
        };
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a 0:: line in /proc/self/cgroup");
        let dir = v2.join(rel.trim_start_matches('/'));
        let pids = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(
            pids.split_whitespace()
                .any(|p| p == std::process::id().to_string()),
            "this process is not in {}",
            dir.display()
        );
        // collect_pids and is_live on the real files.
        let resolver = PodResolver::new(&v2, "/proc");
        let mut found = Vec::new();
        collect_pids(&dir, &mut found).unwrap();
        assert!(found.contains(&std::process::id()));
        assert!(resolver.is_live(std::process::id()));
    }
}
