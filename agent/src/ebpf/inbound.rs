//! Inbound interception: connections that arrive at an enrolled pod from
//! outside it (a pod that is not enrolled, another node) are handed by the
//! `wisp_sk_lookup` program, attached to the pod's network namespace, to a
//! listener the agent opened **inside** that namespace. Nothing is NATed: the
//! accepted socket's local address is the pod IP:port the client asked for
//! (the original destination), and the reply path is the ordinary one.
//!
//! The agent forwards each connection from the host namespace to that pod
//! IP:port; the kernel lets it through because it comes from the agent's
//! redirect address (loop avoidance by source). Today the inbound chain is a
//! TCP relay; the HTTP filter chain can take over these listeners through
//! [`Dataplane::inbound_listeners`](super::Dataplane).

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// `inbound:` in the agent config.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// Intercept connections arriving at enrolled pods (IPv4, TCP).
    /// Default false.
    #[serde(default)]
    pub enabled: bool,
}

/// Per-workload counts of intercepted inbound connections.
#[derive(Debug, Default)]
pub struct InboundStats {
    pub connections: Vec<(String, AtomicU64)>,
    pub upstream_errors: AtomicU64,
}

/// The inbound listeners of one pod and its addresses.
pub struct PodListeners {
    pub v4: TcpListener,
    pub v6: Option<TcpListener>,
    pub addrs: Vec<IpAddr>,
}

/// Opens the inbound listeners inside the namespace at `netns` (on
/// 127.0.0.1 and ::1, ephemeral ports: `bpf_sk_assign` ignores where a
/// socket is bound, and so the pod's own ports stay free) and lists the
/// pod's addresses (not loopback, not IPv6 link-local).
pub fn open_listener(netns: &Path) -> std::io::Result<PodListeners> {
    let file = std::fs::File::open(netns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                let v4 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
                v4.set_nonblocking(true)?;
                // No IPv6 in the pod (disabled): IPv4 only.
                let v6 = TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, 0)).ok();
                if let Some(v6) = &v6 {
                    v6.set_nonblocking(true)?;
                }
                let mut addrs = Vec::new();
                for ifa in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
                    let Some(address) = ifa.address else { continue };
                    if let Some(a) = address.as_sockaddr_in() {
                        addrs.push(IpAddr::V4(a.ip()));
                    } else if let Some(a) = address.as_sockaddr_in6() {
                        let ip = a.ip();
                        // fe80::/10 is per link, not the pod's address.
                        if v6.is_some() && (ip.segments()[0] & 0xffc0) != 0xfe80 {
                            addrs.push(IpAddr::V6(ip));
                        }
                    }
                }
                addrs.retain(|ip| !ip.is_loopback());
                Ok(PodListeners { v4, v6, addrs })
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")))
    })
}

/// Runs the inbound relay on a thread of its own: accept on each pod's
/// listener, connect to the original destination (the accepted socket's
/// local address) from the host namespace, and copy both ways.
pub fn spawn_relay(listeners: Vec<(usize, TcpListener)>, stats: Arc<InboundStats>) {
    if listeners.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("wisp-inbound".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    tracing::error!(%error, "inbound relay: cannot build its runtime");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                let mut tasks = Vec::new();
                for (index, listener) in listeners {
                    let stats = stats.clone();
                    tasks.push(tokio::task::spawn_local(accept_loop(
                        index, listener, stats,
                    )));
                }
                for task in tasks {
                    let _ = task.await;
                }
            });
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "cannot start the inbound relay thread");
    }
}

async fn accept_loop(index: usize, listener: TcpListener, stats: Arc<InboundStats>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "inbound listener");
            return;
        }
    };
    loop {
        let (downstream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "inbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(original) = downstream.local_addr() else {
            continue;
        };
        if let Some((_, count)) = stats.connections.get(index) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        let stats = stats.clone();
        tokio::task::spawn_local(async move {
            let workload = stats
                .connections
                .get(index)
                .map_or("?", |(name, _)| name.as_str())
                .to_owned();
            tracing::debug!(%peer, %original, workload, "inbound connection");
            let mut downstream = downstream;
            match tokio::net::TcpStream::connect(original).await {
                Ok(mut upstream) => {
                    let _ = downstream.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
                }
                Err(error) => {
                    stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, %original, workload, %error, "inbound: cannot reach the pod");
                }
            }
        });
    }
}

/// For logs.
pub fn describe(addrs: &[IpAddr]) -> String {
    addrs
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
