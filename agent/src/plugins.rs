//! What each configured plugin is to the agent: its compiled code, whether it
//! is an HTTP filter or a network (TCP) filter, and which traffic it applies
//! to (`match:`).
//!
//! **HTTP vs network filter.** As in Envoy, which keeps HTTP filters (in the
//! HTTP connection manager) and network filters (on the connection) in
//! separate lists, a plugin is one or the other, set by `kind:` (`http`, the
//! default, or `network`; Istio's `WasmPlugin.spec.type` HTTP / NETWORK). The
//! host cannot find out by itself: the SDKs decide in the guest which context
//! a root context creates, and calling a TCP callback on an HTTP context
//! traps. An HTTP filter runs on every request of an HTTP connection; a
//! network filter on every connection served as TCP pass-through (protocol
//! `tcp`, or sniffed as not HTTP). The root id is only the plugin's own
//! business (`plugin_root_id`): e.g. wisp's conformance test filter creates
//! stream contexts when its root id is `"tcp"`, so it is configured with
//! `kind: network, root_id: tcp`. A third kind, `singleton`, runs one
//! instance for the whole agent on the main thread and sees no traffic
//! (see `singletons`).
//!
//! **Match.** `match: {listeners, ports, services, workloads, hosts, paths}`:
//! every condition that is present must hold, an absent one holds for
//! everything. `listeners` are the names of the listeners that accepted the
//! connection (`outbound`, `inbound`, or a `listeners[].name`), `ports`
//! destination ports, `services` the destination service a workload asked
//! for (its VIP:port, from `services:` or Kubernetes Services: `name`, or
//! `namespace/name` for every port of a Kubernetes Service), `workloads`
//! source workload names, `hosts` the request's authority without its port
//! (exact, or `*.suffix` for any name ending in `.suffix`; case-insensitive),
//! `paths` prefixes of the path (without the query). A request that does not
//! match skips the plugin: its HTTP context is not even created. Network
//! filters match on everything but `hosts` and `paths`.

use serde::{Deserialize, Serialize};
use wisp_wasm_host::{HttpStream, Plugin};

/// HTTP filter or network filter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    /// Runs on HTTP requests (request and response headers, bodies, …).
    #[default]
    Http,
    /// Runs on TCP pass-through connections (`on_new_connection`, data, close).
    Network,
    /// One instance for the agent, on the main thread, with only a root
    /// context (ticks, queues, callouts, shared data): see `singletons`.
    Singleton,
}

impl std::str::FromStr for PluginKind {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "http" => Ok(PluginKind::Http),
            "network" => Ok(PluginKind::Network),
            "singleton" => Ok(PluginKind::Singleton),
            other => Err(format!("{other:?}: expected http, network or singleton")),
        }
    }
}

/// Which traffic a plugin applies to; every present condition must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PluginMatch {
    /// Names of the listeners that accepted the connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listeners: Option<Vec<String>>,
    /// Destination ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<u16>>,
    /// Destination services (`services[].name`; for Kubernetes Services
    /// `namespace/name` or `namespace/name:port-name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<Vec<String>>,
    /// Source workload names (`workloads[].name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workloads: Option<Vec<String>>,
    /// Request authorities without the port: `name` or `*.suffix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    /// Path prefixes, e.g. `/api/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
}

/// What a match is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    pub listener: &'a str,
    pub destination_port: u16,
    /// The service whose VIP:port the workload connected to, if any.
    pub destination_service: Option<&'a str>,
    pub source_workload: &'a str,
    /// `None` for TCP connections.
    pub authority: Option<&'a [u8]>,
    pub path: Option<&'a [u8]>,
}

impl<'a> Facts<'a> {
    /// The facts of an HTTP request, from what plugins see of it: the
    /// `wisp.listener`, `destination.port`, `cluster_name` and
    /// `source.workload` properties and the `:authority` and `:path`
    /// pseudo-headers.
    pub fn of_request(stream: &'a HttpStream) -> Facts<'a> {
        let text = |name| {
            stream
                .property(name)
                .and_then(|value| std::str::from_utf8(value).ok())
        };
        let port = stream
            .property("destination.port")
            .and_then(|p| std::str::from_utf8(p).ok()?.parse().ok())
            .unwrap_or(0);
        Facts {
            listener: text(LISTENER_PROPERTY).unwrap_or(""),
            destination_port: port,
            destination_service: text(SERVICE_PROPERTY),
            source_workload: text("source.workload").unwrap_or(""),
            authority: Some(stream.request_headers.get(":authority").unwrap_or(b"")),
            path: Some(stream.request_headers.get(":path").unwrap_or(b"")),
        }
    }
}

/// The property that names the listener a connection came in on (wisp's own).
pub const LISTENER_PROPERTY: &str = "wisp.listener";
/// The property that names the destination service: Envoy's `cluster_name`,
/// the upstream cluster, which for wisp is the service asked for.
pub const SERVICE_PROPERTY: &str = "cluster_name";

impl PluginMatch {
    /// Whether traffic with these facts goes through the plugin. A host or
    /// path condition never holds for a TCP connection (no request).
    pub fn matches(&self, facts: &Facts<'_>) -> bool {
        let listeners = self
            .listeners
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == facts.listener));
        let services = self.services.as_ref().is_none_or(|names| {
            facts
                .destination_service
                .is_some_and(|service| names.iter().any(|n| service_matches(n, service)))
        });
        let ports = self
            .ports
            .as_ref()
            .is_none_or(|ports| ports.contains(&facts.destination_port));
        let workloads = self
            .workloads
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == facts.source_workload));
        let hosts = self.hosts.as_ref().is_none_or(|hosts| {
            facts
                .authority
                .is_some_and(|authority| hosts.iter().any(|h| host_matches(h, authority)))
        });
        let paths = self.paths.as_ref().is_none_or(|prefixes| {
            facts.path.is_some_and(|path| {
                let path = path.split(|&b| b == b'?').next().unwrap_or(path);
                prefixes.iter().any(|p| path.starts_with(p.as_bytes()))
            })
        });
        listeners && ports && services && workloads && hosts && paths
    }

    /// Checks the match of `plugins[index]`; errors are `(field, message)`
    /// with the field relative to the plugin entry (`match.hosts[1]`).
    pub fn check(&self, kind: PluginKind) -> Result<(), (String, String)> {
        if kind == PluginKind::Singleton {
            return Err((
                "match".into(),
                "a singleton plugin sees no traffic: leave `match` out".into(),
            ));
        }
        let empty = |field: &str| {
            Err((
                format!("match.{field}"),
                "an empty list matches nothing; leave the field out to match everything".into(),
            ))
        };
        if self.listeners.as_ref().is_some_and(Vec::is_empty) {
            return empty("listeners");
        }
        if self.ports.as_ref().is_some_and(Vec::is_empty) {
            return empty("ports");
        }
        if self.services.as_ref().is_some_and(Vec::is_empty) {
            return empty("services");
        }
        if self.workloads.as_ref().is_some_and(Vec::is_empty) {
            return empty("workloads");
        }
        if self.hosts.as_ref().is_some_and(Vec::is_empty) {
            return empty("hosts");
        }
        if self.paths.as_ref().is_some_and(Vec::is_empty) {
            return empty("paths");
        }
        if let Some(i) = self.ports.iter().flatten().position(|&p| p == 0) {
            return Err((format!("match.ports[{i}]"), "0 is not a port".into()));
        }
        // Workload and service names are not checked against `workloads:`
        // and `services:`: pods and Services that appear later (Kubernetes)
        // are matched by the same names. Listener names are checked by the
        // config, which knows them.
        for (field, names) in [
            ("listeners", &self.listeners),
            ("services", &self.services),
            ("workloads", &self.workloads),
        ] {
            if let Some(i) = names.iter().flatten().position(String::is_empty) {
                return Err((format!("match.{field}[{i}]"), "an empty name".into()));
            }
        }
        if kind == PluginKind::Network {
            for field in ["hosts", "paths"] {
                let present = match field {
                    "hosts" => self.hosts.is_some(),
                    _ => self.paths.is_some(),
                };
                if present {
                    return Err((
                        format!("match.{field}"),
                        "a network filter sees connections, not requests: only `listeners`, `ports`, `services` and `workloads` apply".into(),
                    ));
                }
            }
        }
        for (i, host) in self.hosts.iter().flatten().enumerate() {
            let name = host.strip_prefix("*.").unwrap_or(host);
            if name.is_empty()
                || name.contains(['*', ':', '/', ' '])
                || name.starts_with('.')
                || name.ends_with('.')
            {
                return Err((
                    format!("match.hosts[{i}]"),
                    format!(
                        "{host:?}: expected a host name (`api.example.com`) or `*.` and a suffix (`*.example.com`), without a port"
                    ),
                ));
            }
        }
        for (i, path) in self.paths.iter().flatten().enumerate() {
            if !path.starts_with('/') {
                return Err((
                    format!("match.paths[{i}]"),
                    format!("{path:?}: a path prefix starts with `/`"),
                ));
            }
        }
        Ok(())
    }
}

/// A service pattern names the service, or a Kubernetes Service without its
/// port name (`default/reviews` matches `default/reviews:http`).
fn service_matches(pattern: &str, service: &str) -> bool {
    service
        .strip_prefix(pattern)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(':'))
}

/// `pattern` is `name` or `*.suffix`; `authority` may carry a port.
fn host_matches(pattern: &str, authority: &[u8]) -> bool {
    let host = strip_port(authority);
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
                && host[host.len() - suffix.len() - 1] == b'.'
        }
        None => host.eq_ignore_ascii_case(pattern.as_bytes()),
    }
}

fn strip_port(authority: &[u8]) -> &[u8] {
    if authority.starts_with(b"[") {
        // [v6]:port
        return match authority.iter().position(|&b| b == b']') {
            Some(end) => &authority[..=end],
            None => authority,
        };
    }
    match authority.iter().rposition(|&b| b == b':') {
        Some(colon) if authority[colon + 1..].iter().all(u8::is_ascii_digit) => &authority[..colon],
        _ => authority,
    }
}

/// A compiled plugin with its role in the agent.
#[derive(Clone)]
pub struct ConfiguredPlugin {
    pub plugin: Plugin,
    pub kind: PluginKind,
    pub matcher: Option<PluginMatch>,
}

impl ConfiguredPlugin {
    /// Whether traffic with these facts goes through the plugin.
    pub fn applies(&self, facts: &Facts<'_>) -> bool {
        self.matcher.as_ref().is_none_or(|m| m.matches(facts))
    }
}

/// The plugins of `kind`, in configuration order.
pub fn of_kind(plugins: &[ConfiguredPlugin], kind: PluginKind) -> Vec<ConfiguredPlugin> {
    plugins.iter().filter(|p| p.kind == kind).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(port: u16, workload: &'a str, authority: &'a str, path: &'a str) -> Facts<'a> {
        Facts {
            listener: "outbound",
            destination_port: port,
            destination_service: None,
            source_workload: workload,
            authority: Some(authority.as_bytes()),
            path: Some(path.as_bytes()),
        }
    }

    #[test]
    fn absent_conditions_match_everything_and_present_ones_must_all_hold() {
        let any = PluginMatch::default();
        assert!(any.matches(&facts(80, "a", "x", "/")));
        let m = PluginMatch {
            ports: Some(vec![80, 8080]),
            workloads: Some(vec!["default/web".into()]),
            hosts: Some(vec!["api.test".into(), "*.svc.test".into()]),
            paths: Some(vec!["/v1/".into()]),
            ..Default::default()
        };
        assert!(m.matches(&facts(8080, "default/web", "API.test:8080", "/v1/x?q=1")));
        assert!(m.matches(&facts(80, "default/web", "a.b.svc.test", "/v1/")));
        assert!(!m.matches(&facts(81, "default/web", "api.test", "/v1/")));
        assert!(!m.matches(&facts(80, "other", "api.test", "/v1/")));
        assert!(!m.matches(&facts(80, "default/web", "svc.test", "/v1/")));
        assert!(!m.matches(&facts(80, "default/web", "xsvc.test", "/v1/")));
        assert!(!m.matches(&facts(80, "default/web", "api.test", "/v2/v1/")));
        assert!(!m.matches(&facts(80, "default/web", "api.test", "/x?/v1/")));
    }

    #[test]
    fn tcp_connections_never_match_host_or_path_conditions() {
        let m = PluginMatch {
            hosts: Some(vec!["api.test".into()]),
            ..Default::default()
        };
        let tcp = Facts {
            listener: "outbound",
            destination_port: 5432,
            destination_service: None,
            source_workload: "a",
            authority: None,
            path: None,
        };
        assert!(!m.matches(&tcp));
    }

    #[test]
    fn listeners_and_services_match_by_name() {
        let m = PluginMatch {
            listeners: Some(vec!["outbound".into(), "gateway".into()]),
            services: Some(vec!["db".into(), "default/reviews".into()]),
            ..Default::default()
        };
        let to = |listener, service| Facts {
            listener,
            destination_service: service,
            ..facts(80, "a", "x", "/")
        };
        assert!(m.matches(&to("outbound", Some("db"))));
        assert!(m.matches(&to("gateway", Some("default/reviews:http"))));
        assert!(m.matches(&to("outbound", Some("default/reviews"))));
        assert!(!m.matches(&to("inbound", Some("db"))));
        // No service: a connection to a pod or an address outside services.
        assert!(!m.matches(&to("outbound", None)));
        assert!(!m.matches(&to("outbound", Some("dbx"))));
        assert!(!m.matches(&to("outbound", Some("default/reviews-v2:http"))));
    }

    #[test]
    fn ports_are_stripped_from_authorities() {
        assert_eq!(strip_port(b"a.test:80"), b"a.test");
        assert_eq!(strip_port(b"a.test"), b"a.test");
        assert_eq!(strip_port(b"[::1]:80"), b"[::1]");
    }

    #[test]
    fn checks_name_the_field() {
        let bad_host = PluginMatch {
            hosts: Some(vec!["ok.test".into(), "*.".into()]),
            ..Default::default()
        };
        assert_eq!(
            bad_host.check(PluginKind::Http).unwrap_err().0,
            "match.hosts[1]"
        );
        let network = PluginMatch {
            paths: Some(vec!["/".into()]),
            ..Default::default()
        };
        assert_eq!(
            network.check(PluginKind::Network).unwrap_err().0,
            "match.paths"
        );
        let unnamed = PluginMatch {
            workloads: Some(vec![String::new()]),
            ..Default::default()
        };
        assert_eq!(
            unnamed.check(PluginKind::Http).unwrap_err().0,
            "match.workloads[0]"
        );
        let empty = PluginMatch {
            ports: Some(vec![]),
            ..Default::default()
        };
        assert_eq!(empty.check(PluginKind::Http).unwrap_err().0, "match.ports");
        let unnamed_service = PluginMatch {
            services: Some(vec!["db".into(), String::new()]),
            ..Default::default()
        };
        assert_eq!(
            unnamed_service.check(PluginKind::Network).unwrap_err().0,
            "match.services[1]"
        );
        let network = PluginMatch {
            listeners: Some(vec!["outbound".into()]),
            services: Some(vec!["db".into()]),
            ..Default::default()
        };
        assert_eq!(network.check(PluginKind::Network), Ok(()));
        // A singleton sees no traffic, so any match is a mistake.
        assert_eq!(
            PluginMatch::default()
                .check(PluginKind::Singleton)
                .unwrap_err()
                .0,
            "match"
        );
        assert_eq!("singleton".parse(), Ok(PluginKind::Singleton));
    }
}
