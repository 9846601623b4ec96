//! The agent's side of the kernel programs: check the kernel has what they
//! need, load the embedded eBPF object (or re-adopt the one a previous agent
//! pinned), attach it at the cgroup v2 root, enroll workloads, program the L4
//! policy, and look up where each steered connection was going.
//!
//! **Pinning and restart safety.** Programs, links and maps are pinned under
//! `ebpf.pin_path` (default `/sys/fs/bpf/wisp`, see [`pins`]). A starting
//! agent that finds a complete set pinned by the same build on the same cgroup
//! adopts it — the programs never stop steering, and the maps (enrollment,
//! original destinations in flight, counters) carry over; anything else pinned
//! there is replaced. On SIGINT/SIGTERM the agent removes everything unless
//! `ebpf.keep_on_exit` is set (for DaemonSet upgrades); a crashed or killed
//! agent leaves the pins, so steering stays in force until it is back.
//! `wisp ebpf status` / `wisp ebpf detach` ([`cli`]) inspect and remove them.

pub mod cli;
#[cfg(test)]
mod config_tests;
pub mod inbound;
pub mod kernel_log;
pub mod metrics;
pub mod pins;
pub mod policy;
pub mod probe;
pub mod services;
pub mod steering;
mod workloads;

use std::collections::HashSet;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, SockHash, SockMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::sk_msg::SkMsgLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SkMsg, SockOps};
use aya::{Ebpf, EbpfLoader};
use wisp_common::{
    Backend, ConnKey, MAX_BACKENDS, MAX_POLICY_RULES, MAX_SERVICES, MAX_WORKLOADS, META_BUILD,
    META_CGROUP, OriginalDst, PROG_CONNECT4, PROG_CONNECT6, PROG_SK_MSG, PROG_SOCK_OPS, PolicyRule,
    ProgramCounters, REDIRECT_V4, REDIRECT_V6, RedirectTarget, SETTING_AGENT_NETNS,
    SETTING_LOG_LEVEL, SETTING_SOCKET_STEERING, Service, ServiceKey, Workload, WorkloadCounters,
    addr_to_words, maps, programs, words_to_addr,
};

pub use kernel_log::KernelLogLevel;
pub use pins::Pins;
pub use policy::{Cidr, PolicyAction, ResolvedRule};
pub use services::ResolvedService;

/// The compiled kernel programs, built by `cargo xtask build-ebpf` and
/// embedded so that `wisp` ships as one binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wisp-ebpf.o"));

/// Where wisp pins its programs, links and maps unless configured otherwise.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/wisp";

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
    #[error(
        "ebpf.cgroup_root {0} is not a cgroup v2 directory; wisp's programs attach to the cgroup v2 hierarchy: point ebpf.cgroup_root at a cgroup2 mount (see `grep cgroup2 /proc/self/mounts`) or leave it unset"
    )]
    NotCgroup2(PathBuf),
    #[error("cannot open cgroup {path}: {source}")]
    OpenCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ebpf.pin_path: {0}")]
    Bpffs(String),
    #[error(
        "this kernel cannot load {what} BPF programs ({program} needs them); wisp needs Linux 5.9 or newer with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF"
    )]
    ProgramTypeMissing {
        what: &'static str,
        program: &'static str,
    },
    #[error("pinning {path}: {message}")]
    Pin { path: PathBuf, message: String },
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
    #[error("too many policy rules: the kernel evaluates at most {MAX_POLICY_RULES}")]
    TooManyRules,
    #[error(
        "too many services or backends: the kernel balances at most {MAX_SERVICES} services with {MAX_BACKENDS} backends in all"
    )]
    TooManyServices,
}

/// What [`Dataplane::start`] needs to know.
#[derive(Clone, Debug)]
pub struct DataplaneOptions {
    /// `None`: the cgroup2 mount found in `/proc/self/mounts`.
    pub cgroup_root: Option<PathBuf>,
    pub pin_path: PathBuf,
    /// Leave everything attached and pinned when the agent stops.
    pub keep_on_exit: bool,
    /// Where steered IPv4 connects (and IPv4-mapped ones) go.
    pub redirect_v4: SocketAddrV4,
    /// Where steered IPv6 connects go; `None` leaves IPv6 untouched.
    pub redirect_v6: Option<SocketAddrV6>,
    /// sockops + sk_msg redirect between same-node socket pairs.
    pub socket_steering: bool,
    /// Kernel-side aya-log records written from the start.
    pub log_level: KernelLogLevel,
}

impl DataplaneOptions {
    /// The options `wisp run` takes from its config; `redirect_v4` is
    /// [`Config::redirect_target`](crate::config::Config::redirect_target).
    pub fn from_config(
        config: &crate::config::Config,
        redirect_v4: SocketAddrV4,
    ) -> DataplaneOptions {
        DataplaneOptions {
            cgroup_root: config.ebpf.cgroup_root.clone(),
            pin_path: config
                .ebpf
                .pin_path
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_PATH)),
            keep_on_exit: config.ebpf.keep_on_exit,
            redirect_v4,
            // Validated with the config.
            redirect_v6: config.redirect_target_v6().ok().flatten(),
            socket_steering: config.ebpf.socket_steering,
            log_level: config.ebpf.log_level,
        }
    }
}

/// An enrolled workload, as the agent remembers it.
#[derive(Clone, Debug)]
pub struct EnrolledWorkload {
    pub name: String,
    pub netns: PathBuf,
    pub netns_cookie: u64,
    pub slot: u32,
}

/// Kernel-side counters of one program, summed over CPUs.
#[derive(Clone, Debug)]
pub struct ProgramStats {
    pub program: &'static str,
    pub counters: ProgramCounters,
}

/// Connects one policy rule matched.
#[derive(Clone, Debug)]
pub struct RuleStats {
    pub name: String,
    pub action: PolicyAction,
    pub matches: u64,
}

/// Connects the kernel sent to one backend of a service.
#[derive(Clone, Debug)]
pub struct BackendStats {
    pub service: String,
    pub backend: SocketAddr,
    pub connects: u64,
}

/// The attached kernel programs and the agent's handles on their maps.
/// Dropping it detaches and unpins everything, unless `keep_on_exit`.
pub struct Dataplane {
    // Holds the programs when this agent loaded them (not when adopted).
    _ebpf: Option<Ebpf>,
    links: Vec<PinnedLink>,
    pins: Pins,
    keep_on_exit: bool,
    adopted: bool,
    cgroup_root: PathBuf,
    enrolled_map: HashMap<MapData, u64, Workload>,
    original_dst: Mutex<HashMap<MapData, ConnKey, OriginalDst>>,
    counters: Mutex<PerCpuArray<MapData, WorkloadCounters>>,
    program_counters: PerCpuArray<MapData, ProgramCounters>,
    policy_map: Array<MapData, PolicyRule>,
    policy_counters: Mutex<PerCpuArray<MapData, u64>>,
    rules: Vec<(String, PolicyAction)>,
    services_map: HashMap<MapData, ServiceKey, Service>,
    backends_map: Array<MapData, Backend>,
    backend_counters: Mutex<PerCpuArray<MapData, u64>>,
    /// (service, backend) of each used slot of the backend array.
    backends: Vec<(String, SocketAddr)>,
    /// Service names by VIP:port, for plugin matches and `cluster_name`.
    service_names: std::collections::HashMap<SocketAddr, String>,
    /// Owns the per-namespace sk_lookup links (dropping it detaches them).
    sk_lookup: SkLookup,
    inbound_sockets: SockMap<MapData>,
    inbound_pods: HashMap<MapData, [u32; 4], u32>,
    inbound_stats: inbound::InboundStats,
    inbound_listeners: Vec<inbound::InboundListener>,
    pod_addrs: HashMap<MapData, [u32; 4], u32>,
    steered_sockets: SockHash<MapData, ConnKey>,
    /// Attaches `wisp_sk_msg` to the sockhash when this agent loaded it
    /// (adopted state keeps the attachment with the pinned map).
    sk_msg_link: Option<SkMsgLink>,
    socket_steering: bool,
    _kernel_log: Option<kernel_log::KernelLogReader>,
    /// An IPv6 redirect address is configured: the agent's own IPv6
    /// connections come from it, so IPv6 inbound can exempt them.
    steers_v6: bool,
    workloads: Vec<EnrolledWorkload>,
    /// Enrolled cookies found in adopted maps and not (yet) re-enrolled.
    stale: HashSet<u64>,
}

/// A cheap, stable fingerprint of the embedded object: pinned state made by
/// another build is replaced, not adopted.
pub fn build_id() -> u64 {
    // FNV-1a, 64 bit.
    EBPF_OBJECT.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Dataplane {
    /// Checks the kernel, then adopts the pinned programs or loads, attaches
    /// and pins fresh ones, and points steered connects at the redirect
    /// targets.
    pub fn start(options: &DataplaneOptions) -> Result<Dataplane, EbpfError> {
        let cgroup_root = probe::check(options)?;
        let cgroup = std::fs::File::open(&cgroup_root).map_err(|source| EbpfError::OpenCgroup {
            path: cgroup_root.clone(),
            source,
        })?;
        let cgroup_id = cgroup.metadata().map(|m| m.ino()).unwrap_or(0);
        let pins = Pins::new(&options.pin_path);
        let build = build_id();

        let mut adopted = false;
        if pins.complete() {
            match Self::pinned_identity(&pins) {
                Some((b, c)) if b == build && c == cgroup_id => adopted = true,
                found => tracing::warn!(
                    pin_path = %pins.root.display(),
                    ?found,
                    "replacing pinned eBPF state of another wisp build or cgroup"
                ),
            }
        } else if pins.any() {
            tracing::warn!(pin_path = %pins.root.display(), "replacing an incomplete set of pinned eBPF objects");
        }
        if !adopted && pins.any() {
            pins.remove_all(true).map_err(|e| EbpfError::Pin {
                path: pins.root.clone(),
                message: format!("cannot remove the old pins: {e}"),
            })?;
        }

        let result = Self::finish_start(
            options,
            pins.clone(),
            adopted,
            &cgroup,
            cgroup_id,
            cgroup_root,
        );
        if result.is_err() && !adopted {
            // Never leave half an installation attached behind a failed start.
            let _ = pins.remove_all(true);
        }
        result
    }

    fn finish_start(
        options: &DataplaneOptions,
        pins: Pins,
        adopted: bool,
        cgroup: &std::fs::File,
        cgroup_id: u64,
        cgroup_root: PathBuf,
    ) -> Result<Dataplane, EbpfError> {
        let build = build_id();
        let (mut source, links, sk_msg_link, kernel_log) = if adopted {
            let links = programs::ALL
                .iter()
                .map(|p| {
                    PinnedLink::from_pin(pins.link(p)).map_err(|e| EbpfError::Pin {
                        path: pins.link(p),
                        message: e.to_string(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let kernel_log = aya::programs::ProgramInfo::from_pin(pins.program(programs::CONNECT4))
                .ok()
                .and_then(|info| kernel_log::KernelLogReader::from_program(info.id()).ok());
            (MapSource::Pinned(pins.clone()), links, None, kernel_log)
        } else {
            let (mut ebpf, links, sk_msg_link) = Self::load_and_attach(&pins, cgroup)?;
            let kernel_log = kernel_log::KernelLogReader::from_loaded(&mut ebpf);
            if let Err(error) = &kernel_log {
                tracing::warn!(%error, "kernel logs (ebpf.log_level) will not be shown");
            }
            (
                MapSource::Loaded(Box::new(ebpf)),
                links,
                Some(sk_msg_link),
                kernel_log.ok(),
            )
        };

        let mut meta: Array<MapData, u64> = source.take(maps::META)?;
        let map_err = |name| move |source| EbpfError::Map { name, source };
        meta.set(META_BUILD, build, 0)
            .map_err(map_err(maps::META))?;
        meta.set(META_CGROUP, cgroup_id, 0)
            .map_err(map_err(maps::META))?;

        let mut redirect: Array<MapData, RedirectTarget> = source.take(maps::REDIRECT)?;
        redirect
            .set(REDIRECT_V4, target(SocketAddr::V4(options.redirect_v4)), 0)
            .map_err(map_err(maps::REDIRECT))?;
        let v6 = options
            .redirect_v6
            .map_or_else(RedirectTarget::default, |a| target(SocketAddr::V6(a)));
        redirect
            .set(REDIRECT_V6, v6, 0)
            .map_err(map_err(maps::REDIRECT))?;

        let mut settings: Array<MapData, u64> = source.take(maps::SETTINGS)?;
        let agent_netns = current_netns_cookie().map_err(|source| EbpfError::Netns {
            path: "/proc/self/ns/net".into(),
            source,
        })?;
        for (index, value) in [
            (SETTING_LOG_LEVEL, options.log_level.to_kernel()),
            (SETTING_AGENT_NETNS, agent_netns),
            (SETTING_SOCKET_STEERING, u64::from(options.socket_steering)),
        ] {
            settings
                .set(index, value, 0)
                .map_err(map_err(maps::SETTINGS))?;
        }
        let mut pod_addrs: HashMap<MapData, [u32; 4], u32> = source.take(maps::POD_ADDRS)?;
        // Pods of an adopted map; enrollment adds the current ones back.
        let old: Vec<[u32; 4]> = pod_addrs.keys().filter_map(Result::ok).collect();
        for k in old {
            let _ = pod_addrs.remove(&k);
        }

        let enrolled_map: HashMap<MapData, u64, Workload> = source.take(maps::ENROLLED)?;
        let stale = enrolled_map.keys().filter_map(Result::ok).collect();
        let dataplane = Dataplane {
            enrolled_map,
            original_dst: Mutex::new(source.take(maps::ORIGINAL_DST)?),
            counters: Mutex::new(source.take(maps::WORKLOAD_COUNTERS)?),
            program_counters: source.take(maps::PROGRAM_COUNTERS)?,
            policy_map: source.take(maps::POLICY)?,
            policy_counters: Mutex::new(source.take(maps::POLICY_COUNTERS)?),
            services_map: source.take(maps::SERVICES)?,
            backends_map: source.take(maps::BACKENDS)?,
            backend_counters: Mutex::new(source.take(maps::BACKEND_COUNTERS)?),
            backends: Vec::new(),
            service_names: std::collections::HashMap::new(),
            sk_lookup: SkLookup::from_pin(pins.program(programs::SK_LOOKUP)).map_err(|source| {
                EbpfError::Program {
                    name: programs::SK_LOOKUP,
                    source,
                }
            })?,
            inbound_sockets: source.take(maps::INBOUND_SOCKETS)?,
            inbound_pods: source.take(maps::INBOUND_PODS)?,
            pod_addrs,
            steered_sockets: source.take(maps::STEERED_SOCKETS)?,
            sk_msg_link,
            socket_steering: options.socket_steering,
            _kernel_log: kernel_log,
            inbound_stats: Default::default(),
            inbound_listeners: Vec::new(),
            steers_v6: options.redirect_v6.is_some(),
            _ebpf: match source {
                MapSource::Loaded(ebpf) => Some(*ebpf),
                MapSource::Pinned(_) => None,
            },
            links,
            pins,
            keep_on_exit: options.keep_on_exit,
            adopted,
            cgroup_root,
            rules: Vec::new(),
            workloads: Vec::new(),
            stale,
        };
        tracing::info!(
            cgroup = %dataplane.cgroup_root.display(),
            pin_path = %dataplane.pins.root.display(),
            redirect = %options.redirect_v4,
            redirect_v6 = ?options.redirect_v6,
            socket_steering = options.socket_steering,
            kernel_log_level = %options.log_level,
            "eBPF programs {} ({})",
            if adopted { "adopted from their pins, steering never stopped" } else { "attached and pinned" },
            programs::ALL.join(", ")
        );
        Ok(dataplane)
    }

    /// Build id and cgroup inode recorded in the pinned meta map.
    fn pinned_identity(pins: &Pins) -> Option<(u64, u64)> {
        let map = MapData::from_pin(pins.map(maps::META)).ok()?;
        let meta: Array<MapData, u64> = Array::try_from(Map::from_map_data(map).ok()?).ok()?;
        Some((
            meta.get(&META_BUILD, 0).ok()?,
            meta.get(&META_CGROUP, 0).ok()?,
        ))
    }

    fn load_and_attach(
        pins: &Pins,
        cgroup: &std::fs::File,
    ) -> Result<(Ebpf, Vec<PinnedLink>, SkMsgLink), EbpfError> {
        let pin_err = |path: PathBuf| {
            move |e: &dyn std::fmt::Display| EbpfError::Pin {
                path,
                message: e.to_string(),
            }
        };
        pins.create_dirs()
            .map_err(|e| pin_err(pins.root.clone())(&e))?;
        let map_paths: Vec<(&str, PathBuf)> = maps::ALL.iter().map(|m| (*m, pins.map(m))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        // Attached through BPF links, which the kernel always adds alongside
        // other programs at the root (a CNI, another agent); link_create
        // refuses explicit ALLOW_MULTI flags, hence the default mode.
        let mode = CgroupAttachMode::Single;
        let mut links = Vec::new();
        for name in [
            programs::CONNECT4,
            programs::CONNECT6,
            programs::GETPEERNAME4,
            programs::GETPEERNAME6,
        ] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            let err = |source| EbpfError::Program { name, source };
            prog.load().map_err(err)?;
            prog.pin(pins.program(name))
                .map_err(|e| pin_err(pins.program(name))(&e))?;
            let id = prog.attach(cgroup.as_fd(), mode).map_err(err)?;
            let link = FdLink::try_from(prog.take_link(id).map_err(err)?)
                .map_err(|e| pin_err(pins.link(name))(&e))?;
            links.push(
                link.pin(pins.link(name))
                    .map_err(|e| pin_err(pins.link(name))(&e))?,
            );
        }
        let name = programs::SK_LOOKUP;
        let prog: &mut SkLookup = program(&mut ebpf, name)?;
        let err = |source| EbpfError::Program { name, source };
        prog.load().map_err(err)?;
        prog.pin(pins.program(name))
            .map_err(|e| pin_err(pins.program(name))(&e))?;
        let name = programs::SOCK_OPS;
        let prog: &mut SockOps = program(&mut ebpf, name)?;
        let err = |source| EbpfError::Program { name, source };
        prog.load().map_err(err)?;
        prog.pin(pins.program(name))
            .map_err(|e| pin_err(pins.program(name))(&e))?;
        let id = prog.attach(cgroup.as_fd(), mode).map_err(err)?;
        let link = FdLink::try_from(prog.take_link(id).map_err(err)?)
            .map_err(|e| pin_err(pins.link(name))(&e))?;
        links.push(
            link.pin(pins.link(name))
                .map_err(|e| pin_err(pins.link(name))(&e))?,
        );
        // sk_msg attaches to the sockhash, not to the cgroup: the map keeps
        // the attachment (and its pin keeps the map) with no link to pin.
        let sock_hash_fd = {
            let map = ebpf
                .map(maps::STEERED_SOCKETS)
                .ok_or(EbpfError::Missing(maps::STEERED_SOCKETS))?;
            let sock_hash: SockHash<&MapData, ConnKey> =
                SockHash::try_from(map).map_err(|source| EbpfError::Map {
                    name: maps::STEERED_SOCKETS,
                    source,
                })?;
            sock_hash
                .fd()
                .try_clone()
                .map_err(|e| pin_err(pins.map(maps::STEERED_SOCKETS))(&e))?
        };
        let name = programs::SK_MSG;
        let prog: &mut SkMsg = program(&mut ebpf, name)?;
        let err = |source| EbpfError::Program { name, source };
        prog.load().map_err(err)?;
        prog.pin(pins.program(name))
            .map_err(|e| pin_err(pins.program(name))(&e))?;
        let id = prog.attach(&sock_hash_fd).map_err(err)?;
        let sk_msg_link = prog.take_link(id).map_err(err)?;
        Ok((ebpf, links, sk_msg_link))
    }

    /// A new config at run time (reload or Kubernetes): the workloads, the
    /// L4 policy and the balanced services. Inbound interception stays as
    /// it was started.
    pub fn update(
        &mut self,
        config: &crate::config::Config,
    ) -> Result<Vec<(String, EbpfError)>, EbpfError> {
        let wanted: Vec<(String, PathBuf)> = config
            .workloads
            .iter()
            .map(|w| (w.name.clone(), w.netns.value.clone()))
            .collect();
        let failures = self.sync_workloads(&wanted);
        self.finish_enrollment();
        let rules: Vec<ResolvedRule> = config
            .policy
            .iter()
            .enumerate()
            .map(|(i, rule)| rule.resolve(i, &self.workloads))
            .collect();
        self.set_policy(&rules)?;
        let services: Vec<ResolvedService> =
            config.services.iter().map(|s| s.resolve(config)).collect();
        self.set_services(&services)?;
        Ok(failures)
    }

    /// After the configured workloads are enrolled: drops stale enrollments
    /// and loads the configured L4 policy.
    pub fn apply_config(&mut self, config: &crate::config::Config) -> Result<(), EbpfError> {
        self.finish_enrollment();
        let rules: Vec<ResolvedRule> = config
            .policy
            .iter()
            .enumerate()
            .map(|(i, rule)| rule.resolve(i, &self.workloads))
            .collect();
        self.set_policy(&rules)?;
        let services: Vec<ResolvedService> =
            config.services.iter().map(|s| s.resolve(config)).collect();
        self.set_services(&services)?;
        if config.inbound.enabled {
            self.enable_inbound()?;
        }
        Ok(())
    }

    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// Whether this agent adopted programs a previous one pinned.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Where the connection from `peer` to the agent's `local` address was
    /// going before the kernel steered it here, and the enrollment slot of
    /// the pod it came from; `None` for a connection the kernel did not
    /// steer. Each record is handed out once. IPv4, IPv6 and IPv4-mapped
    /// addresses (a dual-stack listener) are all accepted.
    pub fn take_original_dst(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Option<(SocketAddr, u32)> {
        let key = ConnKey {
            src_ip: addr_to_words(peer.ip()),
            dst_ip: addr_to_words(local.ip()),
            src_port: peer.port(),
            dst_port: local.port(),
        };
        let mut map = self.original_dst.lock().unwrap_or_else(|e| e.into_inner());
        let original = map.get(&key, 0).ok()?;
        // A later connection with the same 4-tuple must not find this record.
        let _ = map.remove(&key);
        let ip = words_to_addr(original.ip);
        Some((SocketAddr::new(ip, original.port), original.slot))
    }

    /// Runs and actions of each kernel program, summed over CPUs.
    pub fn program_counters(&self) -> Vec<ProgramStats> {
        [
            (programs::CONNECT4, PROG_CONNECT4),
            (programs::CONNECT6, PROG_CONNECT6),
            (programs::SOCK_OPS, PROG_SOCK_OPS),
            (programs::SK_LOOKUP, wisp_common::PROG_SK_LOOKUP),
            (programs::SK_MSG, PROG_SK_MSG),
        ]
        .into_iter()
        .map(|(program, index)| {
            let mut counters = ProgramCounters::default();
            if let Ok(per_cpu) = self.program_counters.get(&index, 0) {
                per_cpu.iter().for_each(|c| counters.add(c));
            }
            ProgramStats { program, counters }
        })
        .collect()
    }

    /// Sockets in the socket-steering sockhash right now.
    pub fn steered_sockets(&self) -> u64 {
        self.steered_sockets.keys().filter(Result::is_ok).count() as u64
    }
}

/// The first `count` entries of a per-CPU counter array, each summed over
/// CPUs (0 for an entry the kernel cannot read).
fn per_cpu_sums(counters: &Mutex<PerCpuArray<MapData, u64>>, count: usize) -> Vec<u64> {
    let counters = counters.lock().unwrap_or_else(|e| e.into_inner());
    (0..count as u32)
        .map(|i| counters.get(&i, 0).map_or(0, |v| v.iter().sum()))
        .collect()
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        if self.keep_on_exit {
            // Dropping the link would detach sk_msg from the pinned sockhash.
            std::mem::forget(self.sk_msg_link.take());
            tracing::info!(
                pin_path = %self.pins.root.display(),
                "ebpf.keep_on_exit: leaving the eBPF programs attached and pinned for the next agent ({})",
                programs::ALL.join(", ")
            );
            return;
        }
        tracing::info!(
            cgroup = %self.cgroup_root.display(),
            pin_path = %self.pins.root.display(),
            "detaching eBPF programs {} and removing their pins",
            programs::ALL.join(", ")
        );
        // Unpinning the links and dropping our descriptors detaches them;
        // force-detach too, in case another process holds one.
        if let Err(error) = self.pins.remove_all(true) {
            tracing::warn!(%error, pin_path = %self.pins.root.display(), "could not remove every pin; `wisp ebpf detach` removes the rest");
        }
        self.links.clear();
    }
}

/// Where the maps come from: the object this agent loaded, or the pins of
/// the agent before it.
enum MapSource {
    Loaded(Box<Ebpf>),
    Pinned(Pins),
}

impl MapSource {
    fn take<T>(&mut self, name: &'static str) -> Result<T, EbpfError>
    where
        T: TryFrom<Map, Error = aya::maps::MapError>,
    {
        let map_err = |source| EbpfError::Map { name, source };
        let map = match self {
            MapSource::Loaded(ebpf) => ebpf.take_map(name).ok_or(EbpfError::Missing(name))?,
            MapSource::Pinned(pins) => {
                Map::from_map_data(MapData::from_pin(pins.map(name)).map_err(map_err)?)
                    .map_err(map_err)?
            }
        };
        T::try_from(map).map_err(map_err)
    }
}

fn target(addr: SocketAddr) -> RedirectTarget {
    RedirectTarget {
        ip: addr_to_words(addr.ip()),
        port: addr.port(),
        enabled: 1,
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
