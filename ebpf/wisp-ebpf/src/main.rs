//! wisp's kernel programs, all attached at the cgroup v2 root.
//!
//! * `wisp_connect4` (`cgroup/connect4`) and `wisp_connect6`
//!   (`cgroup/connect6`): when a process in an **enrolled** network namespace
//!   connects, apply the L4 policy (a denied connect fails with `EPERM`), and
//!   for TCP rewrite the destination to the node agent, remembering where it
//!   was going under the socket cookie. connect6 also sees the IPv4-mapped
//!   connects of dual-stack sockets (`::ffff:a.b.c.d`); those are steered to
//!   the agent's IPv4 address, mapped.
//! * `wisp_sock_ops` (`sockops`): when such a steered connection completes its
//!   handshake, re-key that record by the 4-tuple so the agent can look it up
//!   from the socket it accepts; with socket steering on, put the sockets of
//!   same-node pairs (application ↔ agent, agent ↔ local server) into
//!   `WISP_STEERED_SOCKETS`.
//! * `wisp_sk_msg` (`sk_msg`, attached to that sockhash): moves what one
//!   socket of a pair sends straight into its peer's receive queue
//!   (`bpf_msg_redirect_hash` with `BPF_F_INGRESS`), skipping TCP/IP.
//!
//! Kernel-side debug logs go through aya-log, gated by the level the agent
//! writes into `WISP_SETTINGS` (0, off, by default: one array read).
//!
//! Enrollment is by network-namespace cookie: every container of a pod shares
//! the pod's namespace, and the agent runs in the host namespace, which is
//! never enrolled — so the agent's own connects are never steered (loop
//! avoidance by construction, the Kmesh pattern).
//!
//! Addresses are kept in one form, 16 bytes with IPv4 mapped (see
//! `wisp-common`), so one set of maps serves IPv4, IPv6 and dual stack.
#![no_std]
#![no_main]

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, bpf_sock_addr,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sk_msg, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash, SockMap},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use wisp_common::{
    ANY_WORKLOAD, Backend, ConnKey, LOG_DEBUG, MAX_BACKENDS, MAX_BACKENDS_PER_SERVICE,
    MAX_POLICY_RULES, MAX_SERVICES, MAX_STEERED_SOCKETS, MAX_TRACKED_CONNECTIONS, MAX_WORKLOADS,
    META_ENTRIES, OriginalDst, POLICY_DENY, PROG_CONNECT4, PROG_CONNECT6, PROG_SK_LOOKUP,
    PROG_SK_MSG, PROG_SOCK_OPS, PROGRAM_COUNT, PolicyRule, ProgramCounters, REDIRECT_V4,
    REDIRECT_V6, RedirectTarget, SERVICE_L7, SETTING_AGENT_NETNS, SETTING_LOG_LEVEL,
    SETTING_SOCKET_STEERING, SETTINGS_ENTRIES, SOCKET_REDIRECT, SOCKET_TCP, Service, ServiceKey,
    Workload, WorkloadCounters,
};

/// Returned by cgroup sock_addr programs to let the syscall proceed.
const ALLOW: i32 = 1;
/// Returned to refuse it: the caller's connect() fails with EPERM.
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[map(name = "WISP_ENROLLED")]
static ENROLLED: HashMap<u64, Workload> = HashMap::with_max_entries(MAX_WORKLOADS, 0);

#[map(name = "WISP_REDIRECT")]
static REDIRECT: Array<RedirectTarget> = Array::with_max_entries(2, 0);

#[map(name = "WISP_PENDING")]
static PENDING: LruHashMap<u64, OriginalDst> =
    LruHashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

#[map(name = "WISP_ORIGINAL_DST")]
static ORIGINAL_DST: LruHashMap<ConnKey, OriginalDst> =
    LruHashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

#[map(name = "WISP_WORKLOAD_COUNTERS")]
static WORKLOAD_COUNTERS: PerCpuArray<WorkloadCounters> =
    PerCpuArray::with_max_entries(MAX_WORKLOADS, 0);

#[map(name = "WISP_PROGRAM_COUNTERS")]
static PROGRAM_COUNTERS: PerCpuArray<ProgramCounters> =
    PerCpuArray::with_max_entries(PROGRAM_COUNT, 0);

#[map(name = "WISP_POLICY")]
static POLICY: Array<PolicyRule> = Array::with_max_entries(MAX_POLICY_RULES, 0);

#[map(name = "WISP_POLICY_COUNTERS")]
static POLICY_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_POLICY_RULES, 0);

/// Written by the agent only; read by `wisp ebpf status` and on re-adoption.
#[map(name = "WISP_META")]
static META: Array<u64> = Array::with_max_entries(META_ENTRIES, 0);

#[map(name = "WISP_SERVICES")]
static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "WISP_BACKENDS")]
static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "WISP_BACKEND_COUNTERS")]
static BACKEND_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// What each translated or steered socket connected to, by socket cookie,
/// so getpeername shows that instead of the backend or the agent.
#[map(name = "WISP_PEER")]
static PEER: LruHashMap<u64, OriginalDst> =
    LruHashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

#[map(name = "WISP_INBOUND_SOCKETS")]
static INBOUND_SOCKETS: SockMap = SockMap::with_max_entries(2 * MAX_WORKLOADS, 0);

#[map(name = "WISP_INBOUND_PODS")]
static INBOUND_PODS: HashMap<[u32; 4], u32> = HashMap::with_max_entries(2 * MAX_WORKLOADS, 0);

/// Written by the agent: log level, socket steering on/off, its own netns.
#[map(name = "WISP_SETTINGS")]
static SETTINGS: Array<u64> = Array::with_max_entries(SETTINGS_ENTRIES, 0);

/// Sockets of same-node pairs, by their own 4-tuple (local as `src`).
#[map(name = "WISP_STEERED_SOCKETS")]
static STEERED_SOCKETS: SockHash<ConnKey> = SockHash::with_max_entries(MAX_STEERED_SOCKETS, 0);

/// How each socket in `WISP_STEERED_SOCKETS` sends, decided at its first
/// send and kept: [`SOCKET_REDIRECT`] or [`SOCKET_TCP`]. A plain hash (not
/// LRU: a forgotten "TCP" would let later bytes overtake earlier ones),
/// emptied as sockets close; it holds at most one entry per socket there.
#[map(name = "WISP_SOCKET_MODE")]
static SOCKET_MODE: HashMap<ConnKey, u32> = HashMap::with_max_entries(MAX_STEERED_SOCKETS, 0);

/// Addresses of enrolled pods, for the agent's upstream sockets to them.
#[map(name = "WISP_POD_ADDRS")]
static POD_ADDRS: HashMap<[u32; 4], u32> = HashMap::with_max_entries(2 * MAX_WORKLOADS, 0);

/// `::ffff:0:0/96`, the IPv4-mapped prefix, as the third address word.
const MAPPED_WORD: u32 = 0x0000_ffffu32.to_be();

#[cgroup_sock_addr(connect4)]
pub fn wisp_connect4(ctx: SockAddrContext) -> i32 {
    count_program(PROG_CONNECT4, |c| c.runs += 1);
    let addr: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `addr` is the context pointer the verifier checks accesses on.
    let dst_ip4 = unsafe { (*addr).user_ip4 };
    let dst = [0, 0, MAPPED_WORD, dst_ip4];
    connect(&ctx, PROG_CONNECT4, dst, true)
}

#[cgroup_sock_addr(connect6)]
pub fn wisp_connect6(ctx: SockAddrContext) -> i32 {
    count_program(PROG_CONNECT6, |c| c.runs += 1);
    let addr: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: as above; user_ip6 is readable in connect6 (32-bit loads).
    let dst = unsafe {
        [
            (*addr).user_ip6[0],
            (*addr).user_ip6[1],
            (*addr).user_ip6[2],
            (*addr).user_ip6[3],
        ]
    };
    connect(&ctx, PROG_CONNECT6, dst, false)
}

/// The work of both connect hooks. `dst` is the destination in map form;
/// `is_v4_socket` tells which context fields to rewrite.
#[inline(always)]
fn connect(ctx: &SockAddrContext, prog: u32, dst: [u32; 4], is_v4_socket: bool) -> i32 {
    // SAFETY: the helper only reads the context the kernel passed us.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the enrollment map is only written by the agent from user
    // space; we copy the value out at once.
    let enrolled = (unsafe { ENROLLED.get(&netns_cookie) }).copied();
    let addr: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `addr` is the context pointer the verifier checks accesses on.
    let (sock_type, protocol, dst_port_be) =
        unsafe { ((*addr).type_, (*addr).protocol, (*addr).user_port) };
    let dst_port = u16::from_be(dst_port_be as u16);
    let mapped = dst[0] == 0 && dst[1] == 0 && dst[2] == MAPPED_WORD;
    let is_loopback = if mapped {
        dst[3].to_ne_bytes()[0] == 127
    } else {
        dst[0] == 0 && dst[1] == 0 && dst[2] == 0 && dst[3] == 1u32.to_be()
    };
    let is_tcp = sock_type == SOCK_STREAM && protocol == IPPROTO_TCP;
    let Some(workload) = enrolled else {
        // Not a mesh pod (or the agent itself): only service load balancing.
        if is_tcp && !is_loopback {
            balance(ctx, prog, dst, dst_port, is_v4_socket, false);
        }
        return ALLOW;
    };
    if is_loopback {
        count(workload.slot, |c| c.connects_passed += 1);
        return ALLOW;
    }

    if policy_denies(workload.slot, &dst, dst_port) {
        count(workload.slot, |c| c.connects_denied += 1);
        count_program(prog, |c| c.acted += 1);
        return REFUSE;
    }

    // A service without L7 filters is balanced right here, and the pod
    // talks to the backend directly; an L7 one keeps its VIP for the agent.
    if is_tcp && balance(ctx, prog, dst, dst_port, is_v4_socket, true) {
        count(workload.slot, |c| c.connects_passed += 1);
        return ALLOW;
    }

    let index = if mapped { REDIRECT_V4 } else { REDIRECT_V6 };
    let target = match REDIRECT.get(index) {
        Some(t) if t.enabled != 0 => *t,
        _ => {
            count(workload.slot, |c| c.connects_passed += 1);
            return ALLOW;
        }
    };
    let is_agent = dst == target.ip && dst_port == target.port;
    if !is_tcp || is_agent {
        count(workload.slot, |c| c.connects_passed += 1);
        return ALLOW;
    }

    // SAFETY: reads the socket cookie of the context's socket.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let original = OriginalDst {
        ip: dst,
        port: dst_port,
        slot: workload.slot,
        netns_cookie,
        ..Default::default()
    };
    if PENDING.insert(&socket_cookie, &original, 0).is_err() {
        // Without a record the agent could not forward the connection, so
        // leave it alone rather than steer it into a dead end.
        count(workload.slot, |c| c.connects_passed += 1);
        count_program(prog, |c| c.errors += 1);
        return ALLOW;
    }
    let _ = PEER.insert(&socket_cookie, &original, 0);
    rewrite(addr, target.ip, target.port, is_v4_socket);
    if log_enabled(LOG_DEBUG) {
        debug!(
            ctx,
            "connect steered: workload slot {} port {} -> agent port {} (socket cookie {})",
            workload.slot,
            dst_port,
            target.port,
            socket_cookie
        );
    }
    count(workload.slot, |c| c.connects_redirected += 1);
    count_program(prog, |c| c.acted += 1);
    ALLOW
}

#[inline(always)]
fn rewrite(addr: *mut bpf_sock_addr, ip: [u32; 4], port: u16, is_v4_socket: bool) {
    // SAFETY: the context pointer; these fields are writable in connect4/6
    // and getpeername4/6.
    unsafe {
        if is_v4_socket {
            (*addr).user_ip4 = ip[3];
        } else {
            (*addr).user_ip6[0] = ip[0];
            (*addr).user_ip6[1] = ip[1];
            (*addr).user_ip6[2] = ip[2];
            (*addr).user_ip6[3] = ip[3];
        }
        (*addr).user_port = u32::from(port.to_be());
    }
}

/// Connect-time load balancing: when `dst:port` is a service VIP, rewrite
/// the connect to one of its backends, picked at random by weight, and
/// remember the VIP for getpeername. `skip_l7`: leave L7 services alone (an
/// enrolled pod's connect to them goes to the agent with the VIP). Returns
/// whether the connect was translated.
#[inline(always)]
fn balance(
    ctx: &SockAddrContext,
    prog: u32,
    dst: [u32; 4],
    port: u16,
    is_v4_socket: bool,
    skip_l7: bool,
) -> bool {
    let key = ServiceKey {
        ip: dst,
        port,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let Some(service) = (unsafe { SERVICES.get(&key) }).copied() else {
        return false;
    };
    if (skip_l7 && service.flags & SERVICE_L7 != 0) || service.total_weight == 0 {
        return false;
    }
    // SAFETY: a helper without arguments.
    let pick = unsafe { bpf_get_prandom_u32() } % service.total_weight;
    let mut i = 0;
    let mut chosen: Option<(u32, Backend)> = None;
    while i < MAX_BACKENDS_PER_SERVICE && i < service.count {
        let index = service.first + i;
        if let Some(backend) = BACKENDS.get(index)
            && pick < backend.cumulative_weight
        {
            chosen = Some((index, *backend));
            break;
        }
        i += 1;
    }
    let Some((index, backend)) = chosen else {
        return false;
    };
    // SAFETY: reads the socket cookie of the context's socket.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let vip = OriginalDst {
        ip: dst,
        port,
        ..Default::default()
    };
    let _ = PEER.insert(&socket_cookie, &vip, 0);
    rewrite(ctx.sock_addr, backend.ip, backend.port, is_v4_socket);
    if let Some(counter) = BACKEND_COUNTERS.get_ptr_mut(index) {
        // SAFETY: this CPU's copy.
        unsafe { *counter += 1 };
    }
    count_program(prog, |c| c.acted += 1);
    true
}

/// getpeername of a socket whose connect was translated (to a backend) or
/// steered (to the agent) shows what the application connected to.
#[inline(always)]
fn restore_peer(ctx: &SockAddrContext, is_v4_socket: bool) -> i32 {
    // SAFETY: reads the socket cookie of the context's socket.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    if let Some(peer) = (unsafe { PEER.get(&socket_cookie) }).copied() {
        rewrite(ctx.sock_addr, peer.ip, peer.port, is_v4_socket);
    }
    ALLOW
}

/// Inbound: a TCP connection arriving at an enrolled pod's address from
/// outside the pod is handed to the agent's inbound listener in that pod's
/// namespace (`bpf_sk_assign`). Nothing is rewritten: the accepted socket's
/// local address is the pod IP:port the client asked for, and replies leave
/// from it. The agent's own forwarded connections (from its redirect
/// address) and the pod's connections to itself pass.
#[sk_lookup]
pub fn wisp_sk_lookup(ctx: SkLookupContext) -> u32 {
    const SK_PASS: u32 = 1;
    count_program(PROG_SK_LOOKUP, |c| c.runs += 1);
    let lookup = ctx.lookup;
    // SAFETY: the context pointer; fixed-offset reads of readable fields.
    let (family, protocol, local4, remote4, local6, remote6) = unsafe {
        (
            read_volatile(&raw const (*lookup).family),
            read_volatile(&raw const (*lookup).protocol),
            read_volatile(&raw const (*lookup).local_ip4),
            read_volatile(&raw const (*lookup).remote_ip4),
            [
                read_volatile(&raw const (*lookup).local_ip6[0]),
                read_volatile(&raw const (*lookup).local_ip6[1]),
                read_volatile(&raw const (*lookup).local_ip6[2]),
                read_volatile(&raw const (*lookup).local_ip6[3]),
            ],
            [
                read_volatile(&raw const (*lookup).remote_ip6[0]),
                read_volatile(&raw const (*lookup).remote_ip6[1]),
                read_volatile(&raw const (*lookup).remote_ip6[2]),
                read_volatile(&raw const (*lookup).remote_ip6[3]),
            ],
        )
    };
    if protocol != IPPROTO_TCP || (family != AF_INET && family != AF_INET6) {
        return SK_PASS;
    }
    let v4 = family == AF_INET;
    let (local, remote) = if v4 {
        ([0, 0, MAPPED_WORD, local4], [0, 0, MAPPED_WORD, remote4])
    } else {
        (local6, remote6)
    };
    let remote_loopback = if v4 {
        remote4.to_ne_bytes()[0] == 127
    } else {
        remote6[0] == 0 && remote6[1] == 0 && remote6[2] == 0 && remote6[3] == 1u32.to_be()
    };
    if local == remote || remote_loopback {
        return SK_PASS;
    }
    // SAFETY: copied out at once.
    let Some(slot) = (unsafe { INBOUND_PODS.get(&local) }).copied() else {
        return SK_PASS;
    };
    let agent_index = if v4 { REDIRECT_V4 } else { REDIRECT_V6 };
    if let Some(agent) = REDIRECT.get(agent_index)
        && agent.enabled != 0
        && agent.ip == remote
    {
        return SK_PASS;
    }
    let index = if v4 { slot } else { MAX_WORKLOADS + slot };
    match INBOUND_SOCKETS.redirect_sk_lookup(&ctx, index, 0) {
        Ok(()) => count_program(PROG_SK_LOOKUP, |c| c.acted += 1),
        // No listener (the agent is gone): normal delivery, to the pod.
        Err(_) => count_program(PROG_SK_LOOKUP, |c| c.errors += 1),
    }
    SK_PASS
}

#[cgroup_sock_addr(getpeername4)]
pub fn wisp_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, true)
}

#[cgroup_sock_addr(getpeername6)]
pub fn wisp_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, false)
}

/// The first policy rule that matches decides (and counts the match);
/// `true` when it denies. No rule matching allows.
#[inline(always)]
fn policy_denies(slot: u32, dst: &[u32; 4], port: u16) -> bool {
    let mut i = 0;
    while i < MAX_POLICY_RULES {
        let Some(rule) = POLICY.get(i) else {
            return false;
        };
        if rule.used == 0 {
            return false;
        }
        let matches = (rule.src_slot == ANY_WORKLOAD || rule.src_slot == slot)
            && (rule.dst_port == 0 || rule.dst_port == port)
            && dst[0] & rule.dst_mask[0] == rule.dst_ip[0]
            && dst[1] & rule.dst_mask[1] == rule.dst_ip[1]
            && dst[2] & rule.dst_mask[2] == rule.dst_ip[2]
            && dst[3] & rule.dst_mask[3] == rule.dst_ip[3];
        if matches {
            if let Some(counter) = POLICY_COUNTERS.get_ptr_mut(i) {
                // SAFETY: this CPU's copy; nothing else writes it meanwhile.
                unsafe { *counter += 1 };
            }
            return rule.action == POLICY_DENY;
        }
        i += 1;
    }
    false
}

#[sock_ops]
pub fn wisp_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        count_program(PROG_SOCK_OPS, |c| c.runs += 1);
        let steered = record_established(&ctx);
        if setting(SETTING_SOCKET_STEERING) != 0 {
            steer_socket(&ctx, true, steered);
        }
    } else if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        if setting(SETTING_SOCKET_STEERING) != 0 {
            steer_socket(&ctx, false, false);
        }
    } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == TCP_CLOSE {
        // Only sockets that entered the sockhash ask for this callback. The
        // kernel drops them from the sockhash itself; forget their mode.
        if let Some(key) = own_key(&ctx) {
            let _ = SOCKET_MODE.remove(&key);
        }
    }
    0
}

const TCP_CLOSE: u32 = 7;

/// The socket's 4-tuple with its own end as `src`, addresses in map form.
#[inline(always)]
fn own_key(ctx: &SockOpsContext) -> Option<ConnKey> {
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    // Every field is read, with fixed offsets, before choosing: the
    // verifier refuses context accesses at offsets computed in a register,
    // which is what LLVM makes of a branch between two fields.
    let ops = ctx.ops;
    // SAFETY: `ops` is the context pointer; these fields are readable in
    // sockops for every family.
    let (local4, remote4, local6, remote6) = unsafe {
        (
            read_volatile(&raw const (*ops).local_ip4),
            read_volatile(&raw const (*ops).remote_ip4),
            [
                read_volatile(&raw const (*ops).local_ip6[0]),
                read_volatile(&raw const (*ops).local_ip6[1]),
                read_volatile(&raw const (*ops).local_ip6[2]),
                read_volatile(&raw const (*ops).local_ip6[3]),
            ],
            [
                read_volatile(&raw const (*ops).remote_ip6[0]),
                read_volatile(&raw const (*ops).remote_ip6[1]),
                read_volatile(&raw const (*ops).remote_ip6[2]),
                read_volatile(&raw const (*ops).remote_ip6[3]),
            ],
        )
    };
    let (src_ip, dst_ip) = if family == AF_INET {
        ([0, 0, MAPPED_WORD, local4], [0, 0, MAPPED_WORD, remote4])
    } else {
        // A dual-stack socket's IPv4 connection shows its addresses mapped
        // here, which is the form the maps keep anyway.
        (local6, remote6)
    };
    Some(ConnKey {
        src_ip,
        dst_ip,
        src_port: ctx.local_port() as u16,
        dst_port: remote_port(ctx.remote_port()),
    })
}

/// Moves the original destination of a steered socket from its cookie to the
/// 4-tuple the agent will see. This runs when the client's handshake completes,
/// before its final ACK leaves, so the record exists before the agent can
/// accept the connection. Returns whether the socket was a steered one.
#[inline(always)]
fn record_established(ctx: &SockOpsContext) -> bool {
    // SAFETY: reads the socket cookie of the context's socket.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once; a concurrent delete can only make us miss.
    let Some(original) = (unsafe { PENDING.get(&socket_cookie) }).copied() else {
        return false;
    };
    let Some(key) = own_key(ctx) else {
        return false;
    };
    if ORIGINAL_DST.insert(&key, &original, 0).is_ok() {
        count(original.slot, |c| c.connections_established += 1);
        count_program(PROG_SOCK_OPS, |c| c.acted += 1);
    } else {
        count_program(PROG_SOCK_OPS, |c| c.errors += 1);
    }
    let _ = PENDING.remove(&socket_cookie);
    true
}

/// Socket steering: puts the sockets of same-node pairs into the sockhash
/// at ESTABLISHED — an application's steered socket (`steered`) and the
/// agent's accepted socket for it (agent namespace, local address = the
/// redirect target); the agent's upstream socket to an enrolled pod (agent
/// namespace, remote = a pod address) and that pod's accepted socket
/// (enrolled namespace, remote = the agent's redirect address). Nothing
/// else: a socket whose peer is not in the map would only pay for sk_msg.
#[inline(always)]
fn steer_socket(ctx: &SockOpsContext, active: bool, steered: bool) {
    let Some(mut key) = own_key(ctx) else {
        return;
    };
    // SAFETY: the helper only reads the context the kernel passed us.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let in_agent = netns == setting(SETTING_AGENT_NETNS);
    let mapped = key.src_ip[0] == 0 && key.src_ip[1] == 0 && key.src_ip[2] == MAPPED_WORD;
    let agent = REDIRECT.get(if mapped { REDIRECT_V4 } else { REDIRECT_V6 });
    let wanted = if active {
        // SAFETY: presence check only.
        steered || (in_agent && unsafe { POD_ADDRS.get(&key.dst_ip) }.is_some())
    } else {
        match agent {
            Some(agent) if agent.enabled != 0 => {
                if in_agent {
                    key.src_ip == agent.ip && key.src_port == agent.port
                } else {
                    // SAFETY: presence check only.
                    key.dst_ip == agent.ip && unsafe { ENROLLED.get(&netns) }.is_some()
                }
            }
            _ => false,
        }
    };
    if !wanted {
        return;
    }
    // A new socket with a 4-tuple an old one had decides afresh.
    let _ = SOCKET_MODE.remove(&key);
    // SAFETY: `ops` is the live context the kernel passed us.
    let ops = unsafe { &mut *ctx.ops };
    if STEERED_SOCKETS.update(&mut key, ops, 0).is_ok() {
        // So that its mode is forgotten when it closes.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        if log_enabled(LOG_DEBUG) {
            debug!(
                ctx,
                "socket steering: socket port {} (peer port {}) in the sockhash",
                key.src_port,
                key.dst_port
            );
        }
    } else {
        count_program(PROG_SK_MSG, |c| c.errors += 1);
    }
}

/// Socket steering, on every send of a socket in the sockhash: deliver the
/// bytes straight into the peer socket's receive queue. The first send
/// decides for the socket's life — redirect if the peer is in the map, TCP
/// if not (its handshake may not have completed yet) — because bytes that
/// went by TCP and later redirected bytes would be read out of order.
#[sk_msg]
pub fn wisp_sk_msg(ctx: SkMsgContext) -> u32 {
    const SK_PASS: u32 = 1;
    count_program(PROG_SK_MSG, |c| c.runs += 1);
    let md = ctx.msg;
    // SAFETY: the context pointer; fixed-offset reads of readable fields.
    let (family, local4, remote4, local6, remote6, local_port, remote_port_raw) = unsafe {
        (
            read_volatile(&raw const (*md).family),
            read_volatile(&raw const (*md).local_ip4),
            read_volatile(&raw const (*md).remote_ip4),
            [
                read_volatile(&raw const (*md).local_ip6[0]),
                read_volatile(&raw const (*md).local_ip6[1]),
                read_volatile(&raw const (*md).local_ip6[2]),
                read_volatile(&raw const (*md).local_ip6[3]),
            ],
            [
                read_volatile(&raw const (*md).remote_ip6[0]),
                read_volatile(&raw const (*md).remote_ip6[1]),
                read_volatile(&raw const (*md).remote_ip6[2]),
                read_volatile(&raw const (*md).remote_ip6[3]),
            ],
            read_volatile(&raw const (*md).local_port),
            read_volatile(&raw const (*md).remote_port),
        )
    };
    let (local, remote) = if family == AF_INET {
        ([0, 0, MAPPED_WORD, local4], [0, 0, MAPPED_WORD, remote4])
    } else {
        (local6, remote6)
    };
    let own = ConnKey {
        src_ip: local,
        dst_ip: remote,
        src_port: local_port as u16,
        dst_port: remote_port(remote_port_raw),
    };
    // SAFETY: copied out at once.
    let mode = unsafe { SOCKET_MODE.get(&own) }.copied();
    if mode == Some(SOCKET_TCP) {
        return SK_PASS;
    }
    let mut peer = ConnKey {
        src_ip: own.dst_ip,
        dst_ip: own.src_ip,
        src_port: own.dst_port,
        dst_port: own.src_port,
    };
    if mode.is_none() && SOCKET_MODE.insert(&own, &SOCKET_REDIRECT, 0).is_err() {
        // Cannot record a choice (the map holds one entry per socket in the
        // sockhash and is as large, so this means something leaked): TCP.
        count_program(PROG_SK_MSG, |c| c.errors += 1);
        return SK_PASS;
    }
    let found = STEERED_SOCKETS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS))
        == i64::from(SK_PASS);
    if found {
        count_program(PROG_SK_MSG, |c| c.acted += 1);
        return SK_PASS;
    }
    // The peer is not in the map: either its handshake has not completed
    // (first send), or it has closed (the kernel unhashes a socket from the
    // sockhash only then). Either way TCP from now on: nothing redirected
    // is still unread at a closed peer, and TCP gives the application what
    // it would get without steering (a reset), not an odd errno. The key
    // exists, so this overwrite cannot fail.
    let _ = SOCKET_MODE.insert(&own, &SOCKET_TCP, 0);
    SK_PASS
}

#[inline(always)]
fn setting(index: u32) -> u64 {
    SETTINGS.get(index).copied().unwrap_or(0)
}

/// Whether kernel logs at `level` are on (`WISP_SETTINGS`, set at runtime).
#[inline(always)]
fn log_enabled(level: u64) -> bool {
    setting(SETTING_LOG_LEVEL) >= level
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

#[inline(always)]
fn count_program(prog: u32, update: impl FnOnce(&mut ProgramCounters)) {
    if let Some(counters) = PROGRAM_COUNTERS.get_ptr_mut(prog) {
        // SAFETY: as in `count`.
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
