//! Connect-time service load balancing: a connect to a service VIP:port is
//! rewritten in the kernel to one of the service's backends, picked at random
//! by weight, and getpeername keeps showing the VIP.
//!
//! Only services without L7 filters are balanced for enrolled pods: for an L7
//! service the pod's connect keeps the VIP and is steered to the agent (which
//! must see which service was asked for), and the agent's own connect to the
//! VIP is balanced instead — the agent is not enrolled, and every connect that
//! is not an enrolled pod's is balanced.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use aya::maps::PerCpuValues;
use serde::{Deserialize, Serialize};
use wisp_common::{
    Backend, MAX_BACKENDS, MAX_BACKENDS_PER_SERVICE, MAX_SERVICES, SERVICE_L7, Service, ServiceKey,
    addr_to_words, maps,
};

use super::{BackendStats, Dataplane, EbpfError, per_cpu_sums};
use crate::config::Located;

/// One service as written in the agent config (`services:`).
///
/// ```yaml
/// services:
///   - name: db
///     vip: 10.96.0.20
///     port: 5432
///     backends:
///       - address: 10.213.250.7:5432
///         weight: 3          # default 1
///       - address: 10.213.250.8:5432
///     # l7: false            # default: true when plugins are configured and the
///                            # port's protocol (outbound.ports / outbound.protocol) is not `tcp`
/// ```
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub vip: Located<IpAddr>,
    pub port: u16,
    pub backends: Vec<BackendSpec>,
    #[serde(default)]
    pub l7: Option<bool>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub address: Located<SocketAddr>,
    #[serde(default = "BackendSpec::default_weight")]
    pub weight: u32,
}

impl BackendSpec {
    fn default_weight() -> u32 {
        1
    }
}

/// A service as the kernel gets it.
#[derive(Clone, Debug)]
pub struct ResolvedService {
    pub name: String,
    pub vip: SocketAddr,
    pub backends: Vec<(SocketAddr, u32)>,
    pub l7: bool,
}

impl ServiceSpec {
    /// What `Config::validate` reports: `(line, field, message)`.
    pub fn check(
        &self,
        index: usize,
        earlier: &[ServiceSpec],
    ) -> Result<(), (u64, String, String)> {
        let line = self.vip.line;
        let field = |f: &str| format!("services[{index}].{f}");
        if self.port == 0 {
            return Err((line, field("port"), "must be a port number, not 0".into()));
        }
        if earlier.iter().any(|s| s.name == self.name) {
            return Err((
                line,
                field("name"),
                format!("duplicate service name {:?}", self.name),
            ));
        }
        if earlier
            .iter()
            .any(|s| s.vip.value == self.vip.value && s.port == self.port)
        {
            return Err((
                line,
                field("vip"),
                format!(
                    "{}:{} is already another service",
                    self.vip.value, self.port
                ),
            ));
        }
        if self.vip.value.is_unspecified() || self.vip.value.is_loopback() {
            return Err((
                line,
                field("vip"),
                "a VIP cannot be unspecified or loopback".into(),
            ));
        }
        if self.backends.is_empty() || self.backends.len() > MAX_BACKENDS_PER_SERVICE as usize {
            return Err((
                line,
                field("backends"),
                format!("needs 1 to {MAX_BACKENDS_PER_SERVICE} backends"),
            ));
        }
        let mut total: u64 = 0;
        for (j, backend) in self.backends.iter().enumerate() {
            let addr = backend.address.value;
            let bfield = format!("services[{index}].backends[{j}]");
            if addr.is_ipv4() != self.vip.value.is_ipv4() {
                return Err((
                    backend.address.line,
                    format!("{bfield}.address"),
                    format!(
                        "{addr} is not the same IP family as the VIP {}; the kernel rewrites the connect in place",
                        self.vip.value
                    ),
                ));
            }
            if addr.port() == 0 {
                return Err((
                    backend.address.line,
                    format!("{bfield}.address"),
                    "needs a port".into(),
                ));
            }
            if backend.weight == 0 {
                return Err((
                    backend.address.line,
                    format!("{bfield}.weight"),
                    "must be at least 1 (remove the backend to send it nothing)".into(),
                ));
            }
            total += u64::from(backend.weight);
        }
        if total > u64::from(u32::MAX) {
            return Err((
                line,
                field("backends"),
                "the weights add up to more than 2^32".into(),
            ));
        }
        Ok(())
    }

    /// `l7` as configured, or from whether this port gets the L7 chain.
    pub fn resolve(&self, config: &crate::config::Config) -> ResolvedService {
        let l7 = self.l7.unwrap_or_else(|| {
            let protocol = config
                .outbound
                .ports
                .get(&self.port)
                .copied()
                .unwrap_or(config.outbound.protocol);
            !config.plugins.is_empty() && protocol != crate::listener::Protocol::Tcp
        });
        ResolvedService {
            name: self.name.clone(),
            vip: SocketAddr::new(self.vip.value, self.port),
            backends: self
                .backends
                .iter()
                .map(|b| (b.address.value, b.weight))
                .collect(),
            l7,
        }
    }
}

/// The balanced services as the dataplane keeps them.
impl Dataplane {
    /// Replaces the services the kernel balances (and resets their counters).
    pub fn set_services(&mut self, services: &[ResolvedService]) -> Result<(), EbpfError> {
        let total: usize = services.iter().map(|s| s.backends.len()).sum();
        if services.len() > MAX_SERVICES as usize || total > MAX_BACKENDS as usize {
            return Err(EbpfError::TooManyServices);
        }
        let map_err = |name| move |source| EbpfError::Map { name, source };
        let key = |vip: SocketAddr| ServiceKey {
            ip: addr_to_words(vip.ip()),
            port: vip.port(),
            _pad: 0,
        };
        // Services of a previous configuration (adopted maps) go first.
        let wanted: HashSet<ServiceKey> = services.iter().map(|s| key(s.vip)).collect();
        let old: Vec<ServiceKey> = self.services_map.keys().filter_map(Result::ok).collect();
        for k in old.into_iter().filter(|k| !wanted.contains(k)) {
            let _ = self.services_map.remove(&k);
        }
        let cpus = aya::util::nr_cpus().unwrap_or(1);
        let mut counters = self
            .backend_counters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut first = 0u32;
        let mut names = Vec::new();
        for service in services {
            let mut cumulative = 0u32;
            for (i, (addr, weight)) in service.backends.iter().enumerate() {
                cumulative += weight;
                let index = first + i as u32;
                let backend = Backend {
                    ip: addr_to_words(addr.ip()),
                    port: addr.port(),
                    _pad: 0,
                    cumulative_weight: cumulative,
                };
                self.backends_map
                    .set(index, backend, 0)
                    .map_err(map_err(maps::BACKENDS))?;
                if let Ok(zero) = PerCpuValues::try_from(vec![0u64; cpus]) {
                    let _ = counters.set(index, zero, 0);
                }
                names.push((service.name.clone(), *addr));
            }
            let value = Service {
                first,
                count: service.backends.len() as u32,
                total_weight: cumulative,
                flags: if service.l7 { SERVICE_L7 } else { 0 },
            };
            self.services_map
                .insert(key(service.vip), value, 0)
                .map_err(map_err(maps::SERVICES))?;
            tracing::info!(
                service = %service.name,
                vip = %service.vip,
                backends = service.backends.len(),
                l7 = service.l7,
                "service balanced at connect time{}",
                if service.l7 { " (enrolled pods keep the VIP: it goes through the agent)" } else { "" }
            );
            first += service.backends.len() as u32;
        }
        self.backends = names;
        self.service_names = services.iter().map(|s| (s.vip, s.name.clone())).collect();
        Ok(())
    }

    /// The service whose VIP:port is `addr`.
    pub fn service_at(&self, addr: SocketAddr) -> Option<&str> {
        self.service_names.get(&addr).map(String::as_str)
    }

    /// Connects the kernel sent to each backend, summed over CPUs.
    pub fn backend_counters(&self) -> Vec<BackendStats> {
        let connects = per_cpu_sums(&self.backend_counters, self.backends.len());
        self.backends
            .iter()
            .zip(connects)
            .map(|((service, backend), connects)| BackendStats {
                service: service.clone(),
                backend: *backend,
                connects,
            })
            .collect()
    }
}
