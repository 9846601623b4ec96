//! Types shared by wisp's eBPF programs (`wisp-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` and plain data: the kernel side reads and
//! writes these values in BPF maps, the agent reads and writes the same bytes
//! through aya. Conventions, so both sides agree without guessing:
//!
//! * IPv4 addresses are `u32` holding the four address bytes in network order
//!   (what the kernel stores in `user_ip4`, `local_ip4`, …). In user space
//!   that is `u32::from_ne_bytes(addr.octets())`.
//! * Ports are `u16` in **host** byte order.
#![no_std]

/// Names of the maps in the eBPF object, so the agent does not repeat strings.
pub mod maps {
    /// `HashMap<u64, Workload>`: network-namespace cookie of an enrolled pod.
    pub const ENROLLED: &str = "WISP_ENROLLED";
    /// `Array<RedirectTarget>` with one entry: where steered connects go.
    pub const REDIRECT: &str = "WISP_REDIRECT";
    /// `LruHashMap<u64, OriginalDst>`: socket cookie of a steered socket whose
    /// handshake has not completed yet.
    pub const PENDING: &str = "WISP_PENDING";
    /// `LruHashMap<ConnKey, OriginalDst>`: original destination of each steered
    /// connection, keyed by the 4-tuple the agent sees on accept.
    pub const ORIGINAL_DST: &str = "WISP_ORIGINAL_DST";
    /// `PerCpuArray<WorkloadCounters>` indexed by [`Workload::slot`].
    pub const WORKLOAD_COUNTERS: &str = "WISP_WORKLOAD_COUNTERS";
}

/// Names of the programs in the eBPF object.
pub mod programs {
    pub const CONNECT4: &str = "wisp_connect4";
    pub const SOCK_OPS: &str = "wisp_sock_ops";
}

/// How many workloads the agent can enroll at once (size of the enrollment
/// map and of the per-workload counter array).
pub const MAX_WORKLOADS: u32 = 4096;
/// Capacity of the original-destination maps (LRU: old entries of connections
/// the agent never accepted are evicted first).
pub const MAX_TRACKED_CONNECTIONS: u32 = 65_536;

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
    pub ip: u32,
    pub port: u16,
    /// 1 once the agent has written a target; connects pass untouched before.
    pub enabled: u16,
}

/// Where a steered connection was originally going.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginalDst {
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
    /// Enrollment slot of the workload that connected.
    pub slot: u32,
    pub _pad2: u32,
    /// Network-namespace cookie of the workload that connected.
    pub netns_cookie: u64,
}

/// A TCP connection as the agent sees it after `accept`: the client end
/// (`src`) in the pod and the agent's listener (`dst`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub src_ip: u32,
    pub dst_ip: u32,
    pub src_port: u16,
    pub dst_port: u16,
}

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
}

impl WorkloadCounters {
    /// Adds another CPU's copy into this one.
    pub fn add(&mut self, other: &WorkloadCounters) {
        self.connects_redirected += other.connects_redirected;
        self.connects_passed += other.connects_passed;
        self.connections_established += other.connections_established;
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
}
