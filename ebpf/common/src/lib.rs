//! Types shared by wisp's eBPF programs (`wisp-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` and plain data: the kernel side reads and
//! writes these values in BPF maps, the agent reads and writes the same bytes
//! through aya. Conventions, so both sides agree without guessing:
//!
//! * Addresses are `[u32; 4]`: the 16 bytes of an IPv6 address in network
//!   order, as the kernel stores `user_ip6`, `local_ip6`, … An IPv4 address is
//!   stored **IPv4-mapped** (`::ffff:a.b.c.d`), so one map serves IPv4, IPv6
//!   and dual-stack sockets alike. In user space that is
//!   [`Ipv6Addr::to_ipv4_mapped`](core::net::Ipv6Addr) and back; see
//!   [`addr_to_words`] and [`words_to_addr`].
//! * Ports are `u16` in **host** byte order.
#![no_std]

use core::net::{IpAddr, Ipv6Addr};

/// Names of the maps in the eBPF object, so the agent does not repeat strings.
pub mod maps {
    /// `HashMap<u64, Workload>`: network-namespace cookie of an enrolled pod.
    pub const ENROLLED: &str = "WISP_ENROLLED";
    /// `Array<RedirectTarget>` with two entries, [`REDIRECT_V4`](super::REDIRECT_V4)
    /// and [`REDIRECT_V6`](super::REDIRECT_V6): where steered connects go.
    pub const REDIRECT: &str = "WISP_REDIRECT";
    /// `LruHashMap<u64, OriginalDst>`: socket cookie of a steered socket whose
    /// handshake has not completed yet.
    pub const PENDING: &str = "WISP_PENDING";
    /// `LruHashMap<ConnKey, OriginalDst>`: original destination of each steered
    /// connection, keyed by the 4-tuple the agent sees on accept.
    pub const ORIGINAL_DST: &str = "WISP_ORIGINAL_DST";
    /// `PerCpuArray<WorkloadCounters>` indexed by [`Workload::slot`](super::Workload).
    pub const WORKLOAD_COUNTERS: &str = "WISP_WORKLOAD_COUNTERS";
    /// `PerCpuArray<ProgramCounters>` indexed by [`PROG_CONNECT4`](super::PROG_CONNECT4) ….
    pub const PROGRAM_COUNTERS: &str = "WISP_PROGRAM_COUNTERS";
    /// `Array<PolicyRule>`: the L4 policy, first match wins.
    pub const POLICY: &str = "WISP_POLICY";
    /// `PerCpuArray<u64>`: connects each policy rule matched.
    pub const POLICY_COUNTERS: &str = "WISP_POLICY_COUNTERS";
    /// `Array<u64>`: facts about the pinned state ([`META_BUILD`](super::META_BUILD) …).
    pub const META: &str = "WISP_META";
    /// `HashMap<ServiceKey, Service>`: service VIP:port → its backends.
    pub const SERVICES: &str = "WISP_SERVICES";
    /// `Array<Backend>`: every service's backends, each service a range.
    pub const BACKENDS: &str = "WISP_BACKENDS";
    /// `PerCpuArray<u64>`: connects sent to each backend.
    pub const BACKEND_COUNTERS: &str = "WISP_BACKEND_COUNTERS";
    /// `LruHashMap<u64, OriginalDst>`: socket cookie → the address the
    /// socket connected to (a VIP or a steered destination), for getpeername.
    pub const PEER: &str = "WISP_PEER";
    /// `SockMap`: the agent's inbound listeners inside each pod's network
    /// namespace, IPv4 at the workload's slot, IPv6 at
    /// [`MAX_WORKLOADS`](super::MAX_WORKLOADS) + slot.
    pub const INBOUND_SOCKETS: &str = "WISP_INBOUND_SOCKETS";
    /// `HashMap<[u32; 4], u32>`: address of a pod (IPv4 mapped) whose inbound
    /// connections are intercepted → its slot.
    pub const INBOUND_PODS: &str = "WISP_INBOUND_PODS";
    /// `Array<u64>`: settings the agent writes at runtime ([`SETTING_LOG_LEVEL`](super::SETTING_LOG_LEVEL) …).
    pub const SETTINGS: &str = "WISP_SETTINGS";
    /// `SockHash<ConnKey>`: sockets of same-node pairs (socket steering), by
    /// their own 4-tuple (local end as `src`).
    pub const STEERED_SOCKETS: &str = "WISP_STEERED_SOCKETS";
    /// `HashMap<ConnKey, u32>`: how each of those sockets sends
    /// ([`SOCKET_REDIRECT`](super::SOCKET_REDIRECT) or [`SOCKET_TCP`](super::SOCKET_TCP)).
    pub const SOCKET_MODE: &str = "WISP_SOCKET_MODE";
    /// `HashMap<[u32; 4], u32>`: addresses of enrolled pods → slot.
    pub const POD_ADDRS: &str = "WISP_POD_ADDRS";

    /// Every map, in the order they are pinned.
    pub const ALL: [&str; 19] = [
        ENROLLED,
        REDIRECT,
        PENDING,
        ORIGINAL_DST,
        WORKLOAD_COUNTERS,
        PROGRAM_COUNTERS,
        POLICY,
        POLICY_COUNTERS,
        META,
        SERVICES,
        BACKENDS,
        BACKEND_COUNTERS,
        PEER,
        INBOUND_SOCKETS,
        INBOUND_PODS,
        SETTINGS,
        STEERED_SOCKETS,
        SOCKET_MODE,
        POD_ADDRS,
    ];
}

/// Names of the programs in the eBPF object.
pub mod programs {
    pub const CONNECT4: &str = "wisp_connect4";
    pub const CONNECT6: &str = "wisp_connect6";
    pub const SOCK_OPS: &str = "wisp_sock_ops";
    pub const GETPEERNAME4: &str = "wisp_getpeername4";
    pub const GETPEERNAME6: &str = "wisp_getpeername6";
    /// `sk_lookup`, attached to each pod's network namespace (not pinned
    /// there: it goes with the agent's inbound listeners).
    pub const SK_LOOKUP: &str = "wisp_sk_lookup";
    /// `sk_msg`, attached to the `WISP_STEERED_SOCKETS` sockhash (the
    /// attachment lives with the pinned map; there is no link).
    pub const SK_MSG: &str = "wisp_sk_msg";
    /// The programs attached at the cgroup root, in the order they are
    /// attached; each has a pinned link.
    pub const ALL: [&str; 5] = [CONNECT4, CONNECT6, SOCK_OPS, GETPEERNAME4, GETPEERNAME6];
}

/// How many workloads the agent can enroll at once (size of the enrollment
/// map and of the per-workload counter array).
pub const MAX_WORKLOADS: u32 = 4096;
/// Capacity of the original-destination maps (LRU: old entries of connections
/// the agent never accepted are evicted first).
pub const MAX_TRACKED_CONNECTIONS: u32 = 65_536;
/// How many L4 policy rules the kernel evaluates.
pub const MAX_POLICY_RULES: u32 = 64;

/// How many services and backends (in all) the kernel balances.
pub const MAX_SERVICES: u32 = 1024;
pub const MAX_BACKENDS: u32 = 4096;
/// How many backends one service can have (the kernel's loop bound).
pub const MAX_BACKENDS_PER_SERVICE: u32 = 64;

/// Index of the IPv4 target in the redirect map (connect4 and IPv4-mapped
/// connects of IPv6 sockets).
pub const REDIRECT_V4: u32 = 0;
/// Index of the IPv6 target in the redirect map.
pub const REDIRECT_V6: u32 = 1;

/// Indexes of the program counter array.
pub const PROG_CONNECT4: u32 = 0;
pub const PROG_CONNECT6: u32 = 1;
pub const PROG_SOCK_OPS: u32 = 2;
pub const PROG_SK_LOOKUP: u32 = 3;
/// `runs`: messages sent on steered sockets; `acted`: delivered straight to
/// the peer socket; `errors`: a socket that could not enter the sockhash.
pub const PROG_SK_MSG: u32 = 4;
pub const PROGRAM_COUNT: u32 = 5;

/// Capacity of the socket-steering sockhash (and of its mode map).
pub const MAX_STEERED_SOCKETS: u32 = 65_536;
/// Modes of a steered socket, decided at its first send.
pub const SOCKET_REDIRECT: u32 = 1;
pub const SOCKET_TCP: u32 = 2;

/// Indexes of the settings map.
pub const SETTING_LOG_LEVEL: u32 = 0;
/// 1: sock_ops puts same-node socket pairs into the sockhash.
pub const SETTING_SOCKET_STEERING: u32 = 1;
/// Cookie of the agent's network namespace.
pub const SETTING_AGENT_NETNS: u32 = 2;
pub const SETTINGS_ENTRIES: u32 = 4;

/// Kernel log levels in `SETTINGS[SETTING_LOG_LEVEL]` (aya-log's order);
/// a log line is written when its level is at most the setting.
pub const LOG_OFF: u64 = 0;
pub const LOG_ERROR: u64 = 1;
pub const LOG_WARN: u64 = 2;
pub const LOG_INFO: u64 = 3;
pub const LOG_DEBUG: u64 = 4;
pub const LOG_TRACE: u64 = 5;

/// Indexes of the meta map: a hash of the eBPF object that created the pinned
/// state, and the cgroup (inode) its programs are attached to.
pub const META_BUILD: u32 = 0;
pub const META_CGROUP: u32 = 1;
pub const META_ENTRIES: u32 = 4;

/// Value of the enrollment map: one enrolled workload (pod).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// Index into the per-workload counter array; chosen by the agent.
    pub slot: u32,
    /// Reserved for per-workload flags; zero today.
    pub flags: u32,
}

/// The agent's listener that steered connects are rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectTarget {
    /// IPv4-mapped for the IPv4 target.
    pub ip: [u32; 4],
    pub port: u16,
    /// 1 once the agent has written a target; connects pass untouched before.
    pub enabled: u16,
}

/// Where a steered connection was originally going.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginalDst {
    /// IPv4-mapped for IPv4 destinations.
    pub ip: [u32; 4],
    pub port: u16,
    pub _pad: u16,
    /// Enrollment slot of the workload that connected.
    pub slot: u32,
    /// Network-namespace cookie of the workload that connected.
    pub netns_cookie: u64,
}

/// A TCP connection as the agent sees it after `accept`: the client end
/// (`src`) in the pod and the agent's listener (`dst`). The pod's IP is part
/// of the key, and pod IPs are unique on a node, so pods that use the same
/// source port at the same time never share a key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub src_ip: [u32; 4],
    pub dst_ip: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
}

/// One L4 policy rule. A connect matches when every set field matches; the
/// first matching rule decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyRule {
    /// Destination network (IPv4-mapped for IPv4 rules) and its mask.
    pub dst_ip: [u32; 4],
    pub dst_mask: [u32; 4],
    /// Enrollment slot of the source workload, or [`ANY_WORKLOAD`].
    pub src_slot: u32,
    /// Destination port, 0 for any.
    pub dst_port: u16,
    /// [`POLICY_ALLOW`] or [`POLICY_DENY`].
    pub action: u8,
    /// 1 for a rule in use; the list ends at the first 0.
    pub used: u8,
}

pub const ANY_WORKLOAD: u32 = u32::MAX;

/// Key of the service map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// The VIP (IPv4 mapped).
    pub ip: [u32; 4],
    pub port: u16,
    pub _pad: u16,
}

/// A service: its backends are `BACKENDS[first .. first + count]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    pub first: u32,
    pub count: u32,
    /// Sum of the backends' weights; a backend is picked with
    /// `random % total_weight` against their cumulative weights.
    pub total_weight: u32,
    /// [`SERVICE_L7`]: enrolled pods' connects keep the VIP and go to the
    /// agent, whose own connect to the VIP is then balanced.
    pub flags: u32,
}

pub const SERVICE_L7: u32 = 1;

/// One backend of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// IPv4 mapped; the same family as the service's VIP.
    pub ip: [u32; 4],
    pub port: u16,
    pub _pad: u16,
    /// The sum of the weights of this backend and those before it.
    pub cumulative_weight: u32,
}
pub const POLICY_ALLOW: u8 = 1;
pub const POLICY_DENY: u8 = 2;

/// Per-workload counters kept by the kernel programs (one copy per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadCounters {
    /// TCP connects rewritten to the agent.
    pub connects_redirected: u64,
    /// Connects of an enrolled workload left alone (not TCP, loopback, or
    /// already aimed at the agent).
    pub connects_passed: u64,
    /// Steered connections whose handshake completed and whose original
    /// destination was recorded for the agent.
    pub connections_established: u64,
    /// Connects refused by the L4 policy.
    pub connects_denied: u64,
}

impl WorkloadCounters {
    /// Adds another CPU's copy into this one.
    pub fn add(&mut self, other: &WorkloadCounters) {
        self.connects_redirected += other.connects_redirected;
        self.connects_passed += other.connects_passed;
        self.connections_established += other.connections_established;
        self.connects_denied += other.connects_denied;
    }
}

/// Per-program counters (one copy per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramCounters {
    /// Times the program ran.
    pub runs: u64,
    /// Runs that acted: a connect steered or denied, a record re-keyed.
    pub acted: u64,
    /// Runs that failed to record something (a full map).
    pub errors: u64,
}

impl ProgramCounters {
    pub fn add(&mut self, other: &ProgramCounters) {
        self.runs += other.runs;
        self.acted += other.acted;
        self.errors += other.errors;
    }
}

/// The map form of an address: 16 bytes in network order, IPv4 mapped.
pub fn addr_to_words(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    let mut words = [0u32; 4];
    for (i, word) in words.iter_mut().enumerate() {
        *word = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
    }
    words
}

/// The address a map holds; IPv4-mapped addresses come back as IPv4.
pub fn words_to_addr(words: [u32; 4]) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, word) in words.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are #[repr(C)] plain data with explicit padding
    // fields, so every bit pattern is valid and there are no implicit holes.
    unsafe impl aya::Pod for Workload {}
    unsafe impl aya::Pod for RedirectTarget {}
    unsafe impl aya::Pod for OriginalDst {}
    unsafe impl aya::Pod for ConnKey {}
    unsafe impl aya::Pod for WorkloadCounters {}
    unsafe impl aya::Pod for ProgramCounters {}
    unsafe impl aya::Pod for PolicyRule {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_and_ipv4_is_mapped() {
        let v4: IpAddr = "10.213.3.2".parse().unwrap();
        let words = addr_to_words(v4);
        assert_eq!(words[0], 0);
        assert_eq!(words[1], 0);
        assert_eq!(words[2], 0xffffu32.to_be());
        assert_eq!(words[3], u32::from_ne_bytes([10, 213, 3, 2]));
        assert_eq!(words_to_addr(words), v4);
        let v6: IpAddr = "fd00:213:3::2".parse().unwrap();
        assert_eq!(words_to_addr(addr_to_words(v6)), v6);
    }
}
