//! The agent's side of the kernel programs: load the embedded eBPF object,
//! attach it at the cgroup v2 root, enroll workloads, and look up where each
//! steered connection was going.
//!
//! Nothing is pinned: the programs stay attached exactly as long as this
//! process holds them, so a crashed agent leaves no steering behind.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SockOps};
use wisp_common::{
    ConnKey, MAX_WORKLOADS, OriginalDst, RedirectTarget, Workload, WorkloadCounters, maps, programs,
};

/// The compiled kernel programs, built by `cargo xtask build-ebpf` and
/// embedded so that `wisp` ships as one binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wisp-ebpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "loading eBPF programs needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN); run wisp as root"
    )]
    NotPrivileged,
    #[error(
        "no cgroup v2 hierarchy is mounted (looked for a `cgroup2` entry in /proc/self/mounts); mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`, or set ebpf.cgroup_root"
    )]
    NoCgroup2,
    #[error("cannot open cgroup {path}: {source}")]
    OpenCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the kernel refused to load the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("the eBPF object has no {0}; was it built from this source tree?")]
    Missing(&'static str),
    #[error("cannot read the network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "refusing to enroll {name}: {path} is the agent's own network namespace, whose connections must never be steered back to it"
    )]
    OwnNamespace { name: String, path: PathBuf },
    #[error("too many workloads: at most {MAX_WORKLOADS} can be enrolled")]
    TooManyWorkloads,
}

/// An enrolled workload, as the agent remembers it.
#[derive(Clone, Debug)]
pub struct EnrolledWorkload {
    pub name: String,
    pub netns_cookie: u64,
    pub slot: u32,
}

/// The loaded and attached kernel programs. Dropping it detaches them.
pub struct Dataplane {
    // Owns the programs and their links; dropping it detaches everything.
    _ebpf: Ebpf,
    cgroup_root: PathBuf,
    enrolled_map: HashMap<MapData, u64, Workload>,
    original_dst: Mutex<HashMap<MapData, ConnKey, OriginalDst>>,
    counters: PerCpuArray<MapData, WorkloadCounters>,
    workloads: Vec<EnrolledWorkload>,
}

impl Dataplane {
    /// Loads the programs, attaches them at `cgroup_root` (or the cgroup v2
    /// root found in `/proc/self/mounts`) and points steered connects at
    /// `redirect`.
    pub fn start(
        cgroup_root: Option<&Path>,
        redirect: SocketAddrV4,
    ) -> Result<Dataplane, EbpfError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(EbpfError::NotPrivileged);
        }
        let cgroup_root = match cgroup_root {
            Some(path) => path.to_owned(),
            None => find_cgroup2_mount()?.ok_or(EbpfError::NoCgroup2)?,
        };
        let cgroup = std::fs::File::open(&cgroup_root).map_err(|source| EbpfError::OpenCgroup {
            path: cgroup_root.clone(),
            source,
        })?;

        let mut ebpf = Ebpf::load(EBPF_OBJECT)?;
        // Attached through BPF links, which the kernel always adds alongside
        // other programs at the root (a CNI, another agent); link_create
        // refuses explicit ALLOW_MULTI flags, hence the default mode.
        let mode = CgroupAttachMode::Single;
        let connect4: &mut CgroupSockAddr = program(&mut ebpf, programs::CONNECT4)?;
        connect4
            .load()
            .and_then(|()| connect4.attach(cgroup.as_fd(), mode))
            .map_err(|source| EbpfError::Program {
                name: programs::CONNECT4,
                source,
            })?;
        let sock_ops: &mut SockOps = program(&mut ebpf, programs::SOCK_OPS)?;
        sock_ops
            .load()
            .and_then(|()| sock_ops.attach(cgroup.as_fd(), mode))
            .map_err(|source| EbpfError::Program {
                name: programs::SOCK_OPS,
                source,
            })?;

        let mut redirect_map: Array<MapData, RedirectTarget> = take_map(&mut ebpf, maps::REDIRECT)?;
        let target = RedirectTarget {
            ip: u32::from_ne_bytes(redirect.ip().octets()),
            port: redirect.port(),
            enabled: 1,
        };
        redirect_map
            .set(0, target, 0)
            .map_err(|source| EbpfError::Map {
                name: maps::REDIRECT,
                source,
            })?;

        tracing::info!(
            cgroup = %cgroup_root.display(),
            %redirect,
            "eBPF programs attached: {} and {}",
            programs::CONNECT4,
            programs::SOCK_OPS
        );
        Ok(Dataplane {
            enrolled_map: take_map(&mut ebpf, maps::ENROLLED)?,
            original_dst: Mutex::new(take_map(&mut ebpf, maps::ORIGINAL_DST)?),
            counters: take_map(&mut ebpf, maps::WORKLOAD_COUNTERS)?,
            _ebpf: ebpf,
            cgroup_root,
            workloads: Vec::new(),
        })
    }

    /// Steers the TCP connects of the pod whose network namespace is `netns`
    /// to the agent, from the next connect on.
    pub fn enroll(&mut self, name: &str, netns: &Path) -> Result<EnrolledWorkload, EbpfError> {
        let netns_err = |source| EbpfError::Netns {
            path: netns.to_owned(),
            source,
        };
        let cookie = netns_cookie(netns).map_err(netns_err)?;
        if cookie == current_netns_cookie().map_err(netns_err)? {
            return Err(EbpfError::OwnNamespace {
                name: name.to_owned(),
                path: netns.to_owned(),
            });
        }
        let slot = u32::try_from(self.workloads.len())
            .ok()
            .filter(|slot| *slot < MAX_WORKLOADS)
            .ok_or(EbpfError::TooManyWorkloads)?;
        self.enrolled_map
            .insert(cookie, Workload { slot, flags: 0 }, 0)
            .map_err(|source| EbpfError::Map {
                name: maps::ENROLLED,
                source,
            })?;
        let workload = EnrolledWorkload {
            name: name.to_owned(),
            netns_cookie: cookie,
            slot,
        };
        tracing::info!(workload = name, netns = %netns.display(), cookie, "enrolled");
        self.workloads.push(workload.clone());
        Ok(workload)
    }

    pub fn workloads(&self) -> &[EnrolledWorkload] {
        &self.workloads
    }

    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// Where the connection from `peer` to the agent's `local` address was
    /// going before the kernel steered it here; `None` for a connection the
    /// kernel did not steer. Each record is handed out once.
    pub fn take_original_dst(
        &self,
        peer: SocketAddrV4,
        local: SocketAddrV4,
    ) -> Option<(SocketAddrV4, u32)> {
        let key = ConnKey {
            src_ip: u32::from_ne_bytes(peer.ip().octets()),
            dst_ip: u32::from_ne_bytes(local.ip().octets()),
            src_port: peer.port(),
            dst_port: local.port(),
        };
        let mut map = self.original_dst.lock().unwrap_or_else(|e| e.into_inner());
        let original = map.get(&key, 0).ok()?;
        // A later connection with the same 4-tuple must not find this record.
        let _ = map.remove(&key);
        let ip = Ipv4Addr::from(original.ip.to_ne_bytes());
        Some((SocketAddrV4::new(ip, original.port), original.slot))
    }

    /// The kernel's counters for each enrolled workload, summed over CPUs.
    pub fn workload_counters(&self) -> Vec<(EnrolledWorkload, WorkloadCounters)> {
        self.workloads
            .iter()
            .map(|w| {
                let mut total = WorkloadCounters::default();
                if let Ok(per_cpu) = self.counters.get(&w.slot, 0) {
                    per_cpu.iter().for_each(|c| total.add(c));
                }
                (w.clone(), total)
            })
            .collect()
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        tracing::info!(
            cgroup = %self.cgroup_root.display(),
            "detaching eBPF programs {} and {}",
            programs::CONNECT4,
            programs::SOCK_OPS
        );
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(EbpfError::Missing(name))?;
    program
        .try_into()
        .map_err(|source| EbpfError::Program { name, source })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(EbpfError::Missing(name))?;
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

/// The mount point of the first cgroup v2 hierarchy in `/proc/self/mounts`.
/// On hybrid hosts it is not `/sys/fs/cgroup` but e.g. `/sys/fs/cgroup/unified`.
pub fn find_cgroup2_mount() -> Result<Option<PathBuf>, EbpfError> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").map_err(|source| EbpfError::OpenCgroup {
            path: "/proc/self/mounts".into(),
            source,
        })?;
    Ok(mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(target))
    }))
}

/// The cookie the kernel gives the network namespace at `path`
/// (`bpf_get_netns_cookie` on the kernel side).
pub fn netns_cookie(path: &Path) -> std::io::Result<u64> {
    let file = std::fs::File::open(path)?;
    // setns affects only the calling thread; do it on a throwaway thread so
    // the agent's own threads stay in the host namespace.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                current_netns_cookie()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")))
    })
}

/// The cookie of the calling thread's network namespace, read with
/// `SO_NETNS_COOKIE` from a socket created in it.
pub fn current_netns_cookie() -> std::io::Result<u64> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let mount = find_cgroup2_mount()
            .unwrap()
            .expect("a cgroup2 mount on this machine");
        assert!(mount.join("cgroup.procs").is_file(), "{}", mount.display());
    }

    #[test]
    fn netns_cookie_of_our_own_namespace_matches_the_current_one() {
        let ours = current_netns_cookie().unwrap();
        assert_ne!(ours, 0);
        // Entering our own namespace again needs CAP_SYS_ADMIN (root).
        assert_eq!(netns_cookie(Path::new("/proc/self/ns/net")).unwrap(), ours);
    }
}
