//! [`SimNode`]: a node bridge with pods hanging off it.
//!
//! ```text
//!   host netns:  bridge wb-TAG  10.213.N.1/24, fd00:213:N::1/64   (the node address; the agent listens here)
//!                  ├── veth wv-TAG-0 ── pod netns wisp-TAG-a: eth0 10.213.N.2/24, fd00:213:N::2/64, default via .1 / ::1
//!                  └── veth wv-TAG-1 ── pod netns wisp-TAG-b: eth0 10.213.N.3/24, fd00:213:N::3/64, default via .1 / ::1
//!   cgroup v2:   <cgroup2 root>/wisp-TAG/{a,b}   (each pod's processes)
//! ```
//!
//! Names carry a short tag so concurrent tests never collide; the subnet
//! index `N` must differ between nodes that exist at the same time.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cmd::{self, CmdError};
use crate::process::ChildGuard;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the simulated node needs root (network namespaces, veths and cgroups); run as root")]
    NotRoot,
    #[error("no cgroup v2 hierarchy is mounted (no `cgroup2` line in /proc/self/mounts)")]
    NoCgroup2,
    #[error(
        "tag {0:?} is too long: interface names are limited to 15 bytes, keep tags to 6 characters"
    )]
    TagTooLong(String),
    #[error("no pod named {0:?}")]
    NoSuchPod(String),
}

/// One pod: a network namespace, its veth, its IP and its cgroup.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address (dual stack): `fd00:213:N::<2+index>`.
    pub ip6: Ipv6Addr,
    /// `ip netns` name.
    pub netns: String,
    /// The cgroup v2 directory its processes join.
    pub cgroup: PathBuf,
}

impl Pod {
    /// `/var/run/netns/<name>`: what the agent's config names.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.netns)
    }

    /// A command that runs inside this pod: in its network namespace and its
    /// cgroup, as a container's process would.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command, NodeError> {
        let netns_path = self.netns_path();
        let netns: OwnedFd = File::open(&netns_path)
            .map_err(|source| NodeError::Io {
                what: "opening network namespace",
                path: netns_path,
                source,
            })?
            .into();
        let procs_path = self.cgroup.join("cgroup.procs");
        let procs: OwnedFd = std::fs::OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .map_err(|source| NodeError::Io {
                what: "opening",
                path: procs_path,
                source,
            })?
            .into();
        let mut command = Command::new(program);
        // SAFETY: only async-signal-safe calls (setns, write) on descriptors
        // opened before the fork.
        unsafe {
            command.pre_exec(move || {
                // Writing "0" moves the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(command)
    }

    /// Like [`Pod::command`], but the process then runs as `uid` (the way
    /// Istio runs its sidecar as 1337, so iptables can exempt its traffic).
    pub fn command_as(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        uid: u32,
    ) -> Result<Command, NodeError> {
        let mut command = self.command(program)?;
        // SAFETY: setgroups/setgid/setuid are async-signal-safe. This runs
        // after the netns and cgroup hooks, which need root.
        unsafe {
            command.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(command)
    }

    /// Starts `wisp-echo` in this pod on `port`; it answers every request
    /// with what it received, as JSON.
    pub fn spawn_echo(&self, echo_bin: &Path, port: u16) -> Result<ChildGuard, NodeError> {
        let child = self
            .command(echo_bin)?
            .args(["--listen", &format!("0.0.0.0:{port}"), "--name", &self.name])
            .stdin(std::process::Stdio::null())
            .spawn()
            .map_err(|source| NodeError::Io {
                what: "starting",
                path: echo_bin.to_owned(),
                source,
            })?;
        let guard = ChildGuard::new(format!("echo in {}", self.name), child);
        self.wait_for_port(port)?;
        Ok(guard)
    }

    /// Starts `wisp-echo` in this pod listening on `listen` (e.g. `[::]:PORT`
    /// for IPv4 and IPv6 at once).
    pub fn spawn_echo_on(
        &self,
        echo_bin: &Path,
        listen: std::net::SocketAddr,
    ) -> Result<ChildGuard, NodeError> {
        let child = self
            .command(echo_bin)?
            .args(["--listen", &listen.to_string(), "--name", &self.name])
            .stdin(std::process::Stdio::null())
            .spawn()
            .map_err(|source| NodeError::Io {
                what: "starting",
                path: echo_bin.to_owned(),
                source,
            })?;
        let guard = ChildGuard::new(format!("echo in {}", self.name), child);
        self.wait_for_port(listen.port())?;
        Ok(guard)
    }

    /// Waits until something in the pod listens on `port` (up to 10 s).
    pub fn wait_for_port(&self, port: u16) -> Result<(), NodeError> {
        let needle = format!(":{port} ");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let out = cmd::ip(&["netns", "exec", &self.netns, "ss", "-Htln"])?;
            if out.lines().any(|l| l.contains(&needle)) {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(CmdError::Failed {
                    command: format!("waiting for port {port} in {}", self.netns),
                    status: Default::default(),
                    stderr: "nothing listened within 10 s".into(),
                }
                .into());
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
    }
}

/// A bridge in the host namespace with pods attached. Dropping it removes
/// the pods' namespaces, veths and cgroups and the bridge.
pub struct SimNode {
    tag: String,
    bridge: String,
    node_ip: Ipv4Addr,
    node_ip6: Ipv6Addr,
    cgroup_dir: PathBuf,
    pods: Vec<Pod>,
    /// What was created, in order, so drop undoes exactly that.
    created: Vec<Created>,
}

#[derive(Debug)]
enum Created {
    Bridge(String),
    Netns(String),
    Veth(String),
    Cgroup(PathBuf),
}

impl SimNode {
    /// Builds a node with the given pods. `subnet` picks `10.213.<subnet>.0/24`.
    pub fn create(tag: &str, subnet: u8, pod_names: &[&str]) -> Result<SimNode, NodeError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(NodeError::NotRoot);
        }
        if tag.len() > 6 {
            return Err(NodeError::TagTooLong(tag.to_owned()));
        }
        let cgroup_root = cgroup2_root()?.ok_or(NodeError::NoCgroup2)?;
        let mut node = SimNode {
            tag: tag.to_owned(),
            bridge: format!("wb-{tag}"),
            node_ip: Ipv4Addr::new(10, 213, subnet, 1),
            node_ip6: Ipv6Addr::new(0xfd00, 0x213, u16::from(subnet), 0, 0, 0, 0, 1),
            cgroup_dir: cgroup_root.join(format!("{}-{tag}", crate::PREFIX)),
            pods: Vec::new(),
            created: Vec::new(),
        };
        // Leftovers of an earlier, killed run with the same tag would make
        // every step below fail; remove them first.
        node.remove_stale();
        node.build(subnet, pod_names)?;
        Ok(node)
    }

    fn build(&mut self, subnet: u8, pod_names: &[&str]) -> Result<(), NodeError> {
        let bridge = self.bridge.clone();
        cmd::ip(&["link", "add", &bridge, "type", "bridge"])?;
        self.created.push(Created::Bridge(bridge.clone()));
        cmd::ip(&[
            "addr",
            "add",
            &format!("{}/24", self.node_ip),
            "dev",
            &bridge,
        ])?;
        // nodad: usable at once, without waiting for duplicate detection.
        cmd::ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", self.node_ip6),
            "dev",
            &bridge,
            "nodad",
        ])?;
        cmd::ip(&["link", "set", &bridge, "up"])?;
        make_dir(&self.cgroup_dir)?;
        self.created.push(Created::Cgroup(self.cgroup_dir.clone()));

        for (index, name) in pod_names.iter().enumerate() {
            let ip = Ipv4Addr::new(10, 213, subnet, 2 + index as u8);
            let ip6 = Ipv6Addr::new(
                0xfd00,
                0x213,
                u16::from(subnet),
                0,
                0,
                0,
                0,
                2 + index as u16,
            );
            let netns = format!("{}-{}-{name}", crate::PREFIX, self.tag);
            let host_veth = format!("wv-{}-{index}", self.tag);
            let pod_veth = format!("wp-{}-{index}", self.tag);
            cmd::ip(&["netns", "add", &netns])?;
            self.created.push(Created::Netns(netns.clone()));
            cmd::ip(&[
                "link", "add", &host_veth, "type", "veth", "peer", "name", &pod_veth,
            ])?;
            self.created.push(Created::Veth(host_veth.clone()));
            cmd::ip(&["link", "set", &host_veth, "master", &bridge, "up"])?;
            cmd::ip(&["link", "set", &pod_veth, "netns", &netns])?;
            let in_pod = |args: &[&str]| {
                let mut full = vec!["-n", netns.as_str()];
                full.extend_from_slice(args);
                cmd::ip(&full)
            };
            in_pod(&["link", "set", &pod_veth, "name", "eth0"])?;
            in_pod(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            in_pod(&["link", "set", "eth0", "up"])?;
            in_pod(&["link", "set", "lo", "up"])?;
            in_pod(&["route", "add", "default", "via", &self.node_ip.to_string()])?;
            in_pod(&[
                "-6",
                "addr",
                "add",
                &format!("{ip6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            in_pod(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &self.node_ip6.to_string(),
            ])?;
            let cgroup = self.cgroup_dir.join(name);
            make_dir(&cgroup)?;
            self.created.push(Created::Cgroup(cgroup.clone()));
            self.pods.push(Pod {
                name: (*name).to_owned(),
                ip,
                ip6,
                netns,
                cgroup,
            });
        }
        Ok(())
    }

    /// The node's own address on the pod network: where pods reach the host.
    pub fn node_ip(&self) -> Ipv4Addr {
        self.node_ip
    }

    /// The node's IPv6 address on the pod network.
    pub fn node_ip6(&self) -> Ipv6Addr {
        self.node_ip6
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn pod(&self, name: &str) -> Result<&Pod, NodeError> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| NodeError::NoSuchPod(name.to_owned()))
    }

    /// Removes everything, reporting each item; also what `Drop` does.
    pub fn teardown(&mut self) -> Vec<String> {
        let mut removed = Vec::new();
        while let Some(item) = self.created.pop() {
            let result = match &item {
                Created::Bridge(name) | Created::Veth(name) => {
                    cmd::ip(&["link", "del", name]).map(|_| ())
                }
                Created::Netns(name) => cmd::ip(&["netns", "del", name]).map(|_| ()),
                Created::Cgroup(path) => remove_cgroup(path),
            };
            match result {
                Ok(()) => removed.push(describe(&item)),
                Err(error) => eprintln!("testbed: could not remove {}: {error}", describe(&item)),
            }
        }
        removed
    }

    fn remove_stale(&self) {
        let _ = cmd::ip(&["link", "del", &self.bridge]);
        if let Ok(list) = cmd::ip(&["netns", "list"]) {
            let prefix = format!("{}-{}-", crate::PREFIX, self.tag);
            for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
                if name.starts_with(&prefix) {
                    let _ = cmd::ip(&["netns", "del", name]);
                }
            }
        }
        if self.cgroup_dir.exists() {
            if let Ok(entries) = std::fs::read_dir(&self.cgroup_dir) {
                for entry in entries.flatten().filter(|e| e.path().is_dir()) {
                    let _ = remove_cgroup(&entry.path());
                }
            }
            let _ = remove_cgroup(&self.cgroup_dir);
        }
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn describe(item: &Created) -> String {
    match item {
        Created::Bridge(name) => format!("bridge {name}"),
        Created::Veth(name) => format!("veth {name}"),
        Created::Netns(name) => format!("network namespace {name}"),
        Created::Cgroup(path) => format!("cgroup {}", path.display()),
    }
}

fn make_dir(path: &Path) -> Result<(), NodeError> {
    std::fs::create_dir(path).map_err(|source| NodeError::Io {
        what: "creating cgroup",
        path: path.to_owned(),
        source,
    })
}

/// Removes a cgroup directory, waiting briefly for exiting processes to
/// leave it (rmdir fails with EBUSY while any remain).
fn remove_cgroup(path: &Path) -> Result<(), CmdError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if std::time::Instant::now() > deadline => {
                let pids = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
                return Err(CmdError::Failed {
                    command: format!("rmdir {}", path.display()),
                    status: Default::default(),
                    stderr: format!(
                        "{e}; processes still in it: [{}] (stop them before the node is dropped)",
                        pids.split_whitespace().collect::<Vec<_>>().join(", ")
                    ),
                });
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

/// The mount point of the cgroup v2 hierarchy (on hybrid hosts not
/// `/sys/fs/cgroup` itself).
pub fn cgroup2_root() -> Result<Option<PathBuf>, NodeError> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(|source| NodeError::Io {
        what: "reading",
        path: "/proc/self/mounts".into(),
        source,
    })?;
    Ok(mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(target))
    }))
}
