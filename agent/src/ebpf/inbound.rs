//! Inbound interception: connections that arrive at an enrolled pod from
//! outside it (a pod that is not enrolled, another node) are handed by the
//! `wisp_sk_lookup` program, attached to the pod's network namespace, to a
//! listener the agent opened **inside** that namespace. Nothing is NATed: the
//! accepted socket's local address is the pod IP:port the client asked for
//! (the original destination), and the reply path is the ordinary one.
//!
//! Every worker accepts on these listeners (a listener of kind
//! [`Destination::Inbound`](crate::listener::Destination), named `inbound`)
//! and serves them exactly as steered outbound connections: protocol
//! detection, the HTTP filter chain (plugins see `listener_direction` 1,
//! INBOUND, as in Envoy), TCP pass-through for the rest. The agent forwards
//! each connection from the host namespace to that pod IP:port; the kernel
//! lets it through because it comes from the agent's redirect address (loop
//! avoidance by source).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use wisp_common::{MAX_WORKLOADS, addr_to_words, maps, programs};

use super::{Dataplane, EbpfError};
use crate::listener::Protocol;

/// `inbound:` in the agent config.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// Intercept connections arriving at enrolled pods (TCP; IPv6 too when
    /// `outbound.redirect_address_v6` is set). Default false.
    #[serde(default)]
    pub enabled: bool,
    /// Protocol of inbound connections, as `outbound.protocol`: `auto`
    /// (default), `http1`, `http2` or `tcp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Per destination (pod) port, overriding `protocol`.
    #[serde(default)]
    pub ports: BTreeMap<u16, Protocol>,
}

/// One of the agent's inbound listeners, inside an enrolled pod's namespace.
pub struct InboundListener {
    pub workload: String,
    pub listener: TcpListener,
}

/// Per-workload counts of intercepted inbound connections, found by the
/// pod address a connection was going to.
#[derive(Debug, Default)]
pub struct InboundStats {
    pub connections: Vec<(String, AtomicU64)>,
    by_addr: HashMap<IpAddr, usize>,
}

impl InboundStats {
    /// Adds a workload and the addresses its inbound connections go to.
    pub fn add(&mut self, workload: &str, addrs: &[IpAddr]) {
        let index = self.connections.len();
        self.connections
            .push((workload.to_owned(), AtomicU64::new(0)));
        for addr in addrs {
            self.by_addr.insert(*addr, index);
        }
    }

    /// Counts a connection to `destination`; the workload it is going to.
    pub fn accepted(&self, destination: IpAddr) -> Option<&str> {
        let ip = match destination {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(destination, IpAddr::V4),
            v4 => v4,
        };
        let (name, count) = &self.connections[*self.by_addr.get(&ip)?];
        count.fetch_add(1, Ordering::Relaxed);
        Some(name)
    }
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
                let addrs = super::steering::addresses_here(v6.is_some())?;
                Ok(PodListeners { v4, v6, addrs })
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")))
    })
}

/// For logs.
pub fn describe(addrs: &[IpAddr]) -> String {
    addrs
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Inbound interception as the dataplane does it.
impl Dataplane {
    /// Intercepts the inbound connections of every enrolled workload: a
    /// listener inside each pod's namespace, its addresses in the inbound
    /// map, and `wisp_sk_lookup` attached to the namespace. The workers
    /// serve the listeners ([`Dataplane::inbound_listeners`]).
    pub fn enable_inbound(&mut self) -> Result<(), EbpfError> {
        let map_err = |name| move |source| EbpfError::Map { name, source };
        // Pods of an adopted map that may be gone.
        let old: Vec<[u32; 4]> = self.inbound_pods.keys().filter_map(Result::ok).collect();
        for k in old {
            let _ = self.inbound_pods.remove(&k);
        }
        let mut listeners = Vec::new();
        let mut stats = InboundStats::default();
        for workload in &self.workloads {
            let netns_err = |source| EbpfError::Netns {
                path: workload.netns.clone(),
                source,
            };
            let mut pod = open_listener(&workload.netns).map_err(netns_err)?;
            if !self.steers_v6 {
                // Without outbound.redirect_address_v6 the agent's own IPv6
                // connections could not be told apart: IPv6 inbound stays off.
                pod.v6 = None;
                pod.addrs.retain(IpAddr::is_ipv4);
            }
            self.inbound_sockets
                .set(workload.slot, &pod.v4, 0)
                .map_err(map_err(maps::INBOUND_SOCKETS))?;
            if let Some(v6) = &pod.v6 {
                self.inbound_sockets
                    .set(MAX_WORKLOADS + workload.slot, v6, 0)
                    .map_err(map_err(maps::INBOUND_SOCKETS))?;
            }
            for addr in &pod.addrs {
                self.inbound_pods
                    .insert(addr_to_words(*addr), workload.slot, 0)
                    .map_err(map_err(maps::INBOUND_PODS))?;
            }
            let netns = std::fs::File::open(&workload.netns).map_err(netns_err)?;
            self.sk_lookup
                .attach(netns)
                .map_err(|source| EbpfError::Program {
                    name: programs::SK_LOOKUP,
                    source,
                })?;
            tracing::info!(
                workload = %workload.name,
                addresses = %describe(&pod.addrs),
                "inbound connections intercepted"
            );
            stats.add(&workload.name, &pod.addrs);
            let workload = workload.name.clone();
            listeners.push(InboundListener {
                workload: workload.clone(),
                listener: pod.v4,
            });
            if let Some(v6) = pod.v6 {
                listeners.push(InboundListener {
                    workload,
                    listener: v6,
                });
            }
        }
        self.inbound_stats = stats;
        self.inbound_listeners = listeners;
        Ok(())
    }

    /// The agent's listeners inside the enrolled pods' namespaces (empty
    /// unless `inbound.enabled`); every worker accepts on them.
    pub fn inbound_listeners(&self) -> &[InboundListener] {
        &self.inbound_listeners
    }

    /// Counts an inbound connection to the pod address `destination`; the
    /// name of the workload it is going to.
    pub fn inbound_accepted(&self, destination: IpAddr) -> Option<&str> {
        self.inbound_stats.accepted(destination)
    }

    /// Inbound connections intercepted per workload.
    pub fn inbound_counters(&self) -> Vec<(String, u64)> {
        self.inbound_stats
            .connections
            .iter()
            .map(|(name, n)| (name.clone(), n.load(std::sync::atomic::Ordering::Relaxed)))
            .collect()
    }
}
