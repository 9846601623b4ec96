//! Connect-time service load balancing: a connect to a service VIP:port is
//! rewritten in the kernel to one of the service's backends, picked at random
//! by weight, and getpeername keeps showing the VIP.
//!
//! Only services without L7 filters are balanced for enrolled pods: for an L7
//! service the pod's connect keeps the VIP and is steered to the agent (which
//! must see which service was asked for), and the agent's own connect to the
//! VIP is balanced instead — the agent is not enrolled, and every connect that
//! is not an enrolled pod's is balanced.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use wisp_common::MAX_BACKENDS_PER_SERVICE;

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
