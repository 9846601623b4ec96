//! Socket steering (`ebpf.socket_steering`, off by default): for
//! connections whose two ends are both on this node — an application's
//! steered socket and the agent's accepted one, the agent's upstream socket
//! and a local server's — `wisp_sock_ops` puts both sockets into the
//! `WISP_STEERED_SOCKETS` sockhash and `wisp_sk_msg` hands each send straight
//! to the peer socket's receive queue, skipping TCP/IP (the Merbridge / old
//! Cilium sockmap acceleration).
//!
//! Correctness rules the kernel side follows: a socket decides at its first
//! send whether it redirects (the peer is in the map) or uses TCP (the
//! peer's handshake had not completed), and keeps that for its life, so bytes
//! are never read out of order; FIN and RST still travel by TCP after the
//! redirected bytes, so half-close works; the kernel drops a socket from the
//! sockhash when it closes, and a state callback forgets its mode. Off by
//! default because Cilium removed this and others report stalls
//! (`docs/architecture.md`).

use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::Path;

/// The addresses of the network namespace at `netns` (not loopback, not
/// IPv6 link-local).
pub fn pod_addresses(netns: &Path) -> std::io::Result<Vec<IpAddr>> {
    let file = std::fs::File::open(netns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                addresses_here(true)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")))
    })
}

/// The addresses of the calling thread's network namespace, without
/// loopback and IPv6 link-local ones; IPv6 only when `v6`.
pub fn addresses_here(v6: bool) -> std::io::Result<Vec<IpAddr>> {
    let mut addrs = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
        let Some(address) = ifa.address else { continue };
        if let Some(a) = address.as_sockaddr_in() {
            addrs.push(IpAddr::V4(a.ip()));
        } else if let Some(a) = address.as_sockaddr_in6() {
            let ip = a.ip();
            // fe80::/10 is per link, not the pod's address.
            if v6 && (ip.segments()[0] & 0xffc0) != 0xfe80 {
                addrs.push(IpAddr::V6(ip));
            }
        }
    }
    addrs.retain(|ip| !ip.is_loopback());
    Ok(addrs)
}
