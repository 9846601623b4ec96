//! wisp's kernel programs.
//!
//! * `wisp_connect4` (`cgroup/connect4`, attached at the cgroup v2 root): when
//!   a process in an **enrolled** network namespace opens a TCP connection,
//!   rewrite the destination to the node agent and remember where it was
//!   going, keyed by the socket cookie.
//! * `wisp_sock_ops` (`sockops`, same attachment): when such a steered
//!   connection completes its handshake, re-key that record by the 4-tuple so
//!   the agent can look it up from the socket it accepts.
//!
//! Enrollment is by network-namespace cookie: every container of a pod shares
//! the pod's namespace, and the agent runs in the host namespace, which is
//! never enrolled — so the agent's own connects are never steered (loop
//! avoidance by construction, the Kmesh pattern).
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
};
use wisp_common::{
    ConnKey, MAX_TRACKED_CONNECTIONS, MAX_WORKLOADS, OriginalDst, RedirectTarget, Workload,
    WorkloadCounters,
};

/// Returned by cgroup sock_addr programs to let the syscall proceed.
const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;

#[map(name = "WISP_ENROLLED")]
static ENROLLED: HashMap<u64, Workload> = HashMap::with_max_entries(MAX_WORKLOADS, 0);

#[map(name = "WISP_REDIRECT")]
static REDIRECT: Array<RedirectTarget> = Array::with_max_entries(1, 0);

#[map(name = "WISP_PENDING")]
static PENDING: LruHashMap<u64, OriginalDst> =
    LruHashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

#[map(name = "WISP_ORIGINAL_DST")]
static ORIGINAL_DST: LruHashMap<ConnKey, OriginalDst> =
    LruHashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

#[map(name = "WISP_WORKLOAD_COUNTERS")]
static WORKLOAD_COUNTERS: PerCpuArray<WorkloadCounters> =
    PerCpuArray::with_max_entries(MAX_WORKLOADS, 0);

#[cgroup_sock_addr(connect4)]
pub fn wisp_connect4(ctx: SockAddrContext) -> i32 {
    steer_connect4(&ctx);
    // Steering never refuses a connect; L4 policy is a later program.
    ALLOW
}

#[inline(always)]
fn steer_connect4(ctx: &SockAddrContext) {
    // SAFETY: the helper only reads the context the kernel passed us.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the enrollment map is only written by the agent from user
    // space; we copy the value out at once.
    let Some(workload) = (unsafe { ENROLLED.get(&netns_cookie) }).copied() else {
        return;
    };
    let addr: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `addr` is the context pointer the verifier checks accesses on.
    let (sock_type, protocol, dst_ip, dst_port_be) = unsafe {
        (
            (*addr).type_,
            (*addr).protocol,
            (*addr).user_ip4,
            (*addr).user_port,
        )
    };
    let dst_port = u16::from_be(dst_port_be as u16);
    let target = match REDIRECT.get(0) {
        Some(t) if t.enabled != 0 => *t,
        _ => return,
    };
    let is_loopback = (dst_ip.to_ne_bytes()[0]) == 127;
    let is_agent = dst_ip == target.ip && dst_port == target.port;
    if sock_type != SOCK_STREAM || protocol != IPPROTO_TCP || is_loopback || is_agent {
        count(workload.slot, |c| c.connects_passed += 1);
        return;
    }

    // SAFETY: reads the socket cookie of the context's socket.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let original = OriginalDst {
        ip: dst_ip,
        port: dst_port,
        slot: workload.slot,
        netns_cookie,
        ..Default::default()
    };
    if PENDING.insert(&socket_cookie, &original, 0).is_err() {
        // Without a record the agent could not forward the connection, so
        // leave it alone rather than steer it into a dead end.
        count(workload.slot, |c| c.connects_passed += 1);
        return;
    }
    // SAFETY: as above; these context fields are writable in connect4.
    unsafe {
        (*addr).user_ip4 = target.ip;
        (*addr).user_port = u32::from(target.port.to_be());
    }
    count(workload.slot, |c| c.connects_redirected += 1);
}

#[sock_ops]
pub fn wisp_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        record_established(&ctx);
    }
    0
}

/// Moves the original destination of a steered socket from its cookie to the
/// 4-tuple the agent will see. This runs when the client's handshake completes,
/// before its final ACK leaves, so the record exists before the agent can
/// accept the connection.
#[inline(always)]
fn record_established(ctx: &SockOpsContext) {
    const AF_INET: u32 = 2;
    if ctx.family() != AF_INET {
        return;
    }
    // SAFETY: reads the socket cookie of the context's socket.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once; a concurrent delete can only make us miss.
    let Some(original) = (unsafe { PENDING.get(&socket_cookie) }).copied() else {
        return;
    };
    let key = ConnKey {
        src_ip: ctx.local_ip4(),
        dst_ip: ctx.remote_ip4(),
        src_port: ctx.local_port() as u16,
        dst_port: remote_port(ctx.remote_port()),
    };
    if ORIGINAL_DST.insert(&key, &original, 0).is_ok() {
        count(original.slot, |c| c.connections_established += 1);
    }
    let _ = PENDING.remove(&socket_cookie);
}

/// `bpf_sock_ops.remote_port` is in network byte order, and on the kernels we
/// support it sits in the upper 16 bits of the field; newer kernels may put it
/// in the lower 16. Accept both.
#[inline(always)]
fn remote_port(raw: u32) -> u16 {
    let be = if raw > 0xffff {
        (raw >> 16) as u16
    } else {
        raw as u16
    };
    u16::from_be(be)
}

#[inline(always)]
fn count(slot: u32, update: impl FnOnce(&mut WorkloadCounters)) {
    if let Some(counters) = WORKLOAD_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value of this CPU; nothing else writes it while this
        // program runs on this CPU.
        update(unsafe { &mut *counters });
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
