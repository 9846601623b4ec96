//! The agent's configuration file (`wisp run --config FILE`).
//!
//! YAML, parsed with serde-saphyr. Unknown fields are refused, every field has
//! a default where one makes sense, and [`Config::load`] runs [`Config::validate`]
//! so a mistake is reported at start-up with the field and the line it is on.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use wisp_wasm_host::FailurePolicy;

use crate::listener::Protocol;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Parse {
        path: PathBuf,
        /// 0 when the parser could not tell.
        line: u64,
        message: String,
    },
    #[error("{path}:{line}: `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        line: u64,
        field: String,
        message: String,
    },
}

/// The whole agent configuration.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The listener that accepts connections the kernel steers to the agent.
    pub outbound: OutboundConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    /// Worker threads, each with its own runtime and Wasm instances.
    /// Default: the number of CPUs.
    #[serde(default)]
    pub workers: Option<usize>,
    /// The Proxy-Wasm filter chain run on every steered HTTP request, in order.
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
    /// Pods whose outbound TCP connections are steered to the agent.
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    /// Where the kernel side lives on this node.
    #[serde(default)]
    pub ebpf: EbpfConfig,
    /// L4 policy enforced in the kernel on enrolled pods' connects: the
    /// first matching rule decides, unmatched connects are allowed.
    #[serde(default)]
    pub policy: Vec<crate::ebpf::policy::PolicyRuleSpec>,
    /// Services whose VIP:port the kernel balances over their backends at
    /// connect time (see `ebpf::services`).
    #[serde(default)]
    pub services: Vec<crate::ebpf::services::ServiceSpec>,
    /// Interception of connections arriving at enrolled pods.
    #[serde(default)]
    pub inbound: crate::ebpf::inbound::InboundConfig,
    /// On SIGTERM, how long in-flight connections may take to finish.
    #[serde(default = "Config::default_drain_timeout_seconds")]
    pub drain_timeout_seconds: u64,
    /// Append one JSON line per HTTP request to this file.
    #[serde(default)]
    pub access_log: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// Address the agent listens on, e.g. `0.0.0.0:15001`.
    pub listen: Located<SocketAddr>,
    /// The address of this node that steered connects are rewritten to. Every
    /// enrolled pod must be able to reach it, and `listen` must accept on it.
    /// Default: the `listen` address when that is a specific IPv4 address.
    #[serde(default)]
    pub redirect_address: Option<Located<IpAddr>>,
    /// The node's IPv6 address steered IPv6 connects are rewritten to; IPv6
    /// is steered only when it is set, and `listen` must then accept IPv6
    /// (`[::]:PORT`, dual stack, or this address).
    #[serde(default)]
    pub redirect_address_v6: Option<Located<std::net::Ipv6Addr>>,
    /// Protocol of steered connections: `auto` (default: detect HTTP/1.1,
    /// HTTP/2 or plain TCP from the first bytes), `http1`, `http2` or `tcp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Per destination port, overriding `protocol`, e.g. `{5432: tcp}` for a
    /// server-first protocol that detection would wait on.
    #[serde(default)]
    pub ports: BTreeMap<u16, Protocol>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `/metrics` and `/ready`; on localhost by default.
    #[serde(default = "AdminConfig::default_listen")]
    pub listen: Located<SocketAddr>,
}

impl AdminConfig {
    fn default_listen() -> Located<SocketAddr> {
        Located {
            value: SocketAddr::from(([127, 0, 0, 1], 15000)),
            line: 0,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: AdminConfig::default_listen(),
        }
    }
}

/// One Proxy-Wasm plugin of the filter chain.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    pub name: String,
    /// Path of the `.wasm` module; relative paths are resolved against the
    /// directory of the config file.
    pub module: Spanned<PathBuf>,
    #[serde(default)]
    pub root_id: String,
    #[serde(default)]
    pub vm_id: String,
    /// Handed to the plugin's `on_configure` as PLUGIN_CONFIGURATION.
    #[serde(default)]
    pub configuration: String,
    /// Handed to the plugin's `on_vm_start` as VM_CONFIGURATION.
    #[serde(default)]
    pub vm_configuration: String,
    /// What a request gets when the plugin fails: `FAIL_CLOSED` (503, the
    /// default, as in Envoy), `FAIL_OPEN` (the plugin is skipped) or
    /// `FAIL_RELOAD` (503, and the instance is re-created with backoff).
    #[serde(default)]
    pub failure_policy: FailurePolicy,
}

/// An enrolled workload: a pod, identified by its network namespace.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// A name for logs and metrics, e.g. `default/web-0`.
    pub name: String,
    /// The pod's network namespace, e.g. `/var/run/netns/NAME` or
    /// `/proc/PID/ns/net`.
    pub netns: Spanned<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EbpfConfig {
    /// The cgroup v2 directory the programs are attached to. Default: the
    /// root of the cgroup2 mount found in `/proc/self/mounts`.
    #[serde(default)]
    pub cgroup_root: Option<PathBuf>,
    /// bpffs directory where programs, links and maps are pinned (mounted
    /// at /sys/fs/bpf when bpffs is absent). A restarted agent re-adopts
    /// what it finds there. Default: /sys/fs/bpf/wisp.
    #[serde(default)]
    pub pin_path: Option<PathBuf>,
    /// On SIGINT/SIGTERM, leave the programs attached and pinned so pods stay
    /// steered across an agent upgrade (DaemonSet). Default false: the agent
    /// detaches and unpins everything it attached.
    #[serde(default)]
    pub keep_on_exit: bool,
    /// Socket steering: sockops + sockhash + sk_msg hand the bytes of
    /// same-node socket pairs (pod ↔ agent, agent ↔ local pod) straight to
    /// the peer socket, skipping TCP/IP. Default false: Cilium removed its
    /// version and others report stalls (see docs/architecture.md).
    #[serde(default)]
    pub socket_steering: bool,
    /// Kernel-side aya-log records: `off` (default), `error`, `warn`,
    /// `info`, `debug`, `trace`. Change it while the agent runs with
    /// `wisp ebpf log-level LEVEL`.
    #[serde(default)]
    pub log_level: crate::ebpf::KernelLogLevel,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(path, &text)?;
        config.resolve_paths(path);
        config.validate(path)?;
        Ok(config)
    }

    fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        serde_saphyr::from_str(text).map_err(|e| {
            let (line, message) = locate_parse_error(text, &e);
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                message,
            }
        })
    }

    fn resolve_paths(&mut self, config_path: &Path) {
        let base = config_path.parent().unwrap_or(Path::new("."));
        for plugin in &mut self.plugins {
            if plugin.module.value.is_relative() {
                plugin.module.value = base.join(&plugin.module.value);
            }
        }
    }

    /// Checks what the types alone cannot: files exist, names are unique,
    /// the redirect address is usable.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |line: u64, field: String, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            line,
            field,
            message,
        };
        let listen = &self.outbound.listen;
        if listen.value.port() == 0 {
            return Err(invalid(
                listen.line,
                "outbound.listen".into(),
                "needs a fixed port: the kernel rewrites connects to it".into(),
            ));
        }
        let redirect_line = self
            .outbound
            .redirect_address
            .as_ref()
            .map_or(listen.line, |r| r.line);
        let redirect = self.redirect_target().map_err(|message| {
            invalid(redirect_line, "outbound.redirect_address".into(), message)
        })?;
        if redirect.ip().is_loopback() {
            return Err(invalid(
                redirect_line,
                "outbound.redirect_address".into(),
                "a loopback address is the pod's own loopback, not the node's; use an address of this node that pods can reach".into(),
            ));
        }
        if self.workers == Some(0) {
            return Err(invalid(0, "workers".into(), "must be at least 1".into()));
        }
        for (i, plugin) in self.plugins.iter().enumerate() {
            let module = &plugin.module;
            if !module.value.is_file() {
                return Err(invalid(
                    module.referenced.line(),
                    format!("plugins[{i}].module"),
                    format!("no such file: {}", module.value.display()),
                ));
            }
            if self.plugins[..i].iter().any(|p| p.name == plugin.name) {
                return Err(invalid(
                    module.referenced.line(),
                    format!("plugins[{i}].name"),
                    format!("duplicate plugin name {:?}", plugin.name),
                ));
            }
        }
        if let Some(v6) = &self.outbound.redirect_address_v6 {
            self.redirect_target_v6().map_err(|message| {
                invalid(v6.line, "outbound.redirect_address_v6".into(), message)
            })?;
        }
        for (i, service) in self.services.iter().enumerate() {
            service
                .check(i, &self.services[..i])
                .map_err(|(line, field, message)| invalid(line, field, message))?;
        }
        for (i, rule) in self.policy.iter().enumerate() {
            rule.check(i, &self.workloads)
                .map_err(|(line, field, message)| invalid(line, field, message))?;
        }
        for (i, workload) in self.workloads.iter().enumerate() {
            let netns = &workload.netns;
            if !netns.value.exists() {
                return Err(invalid(
                    netns.referenced.line(),
                    format!("workloads[{i}].netns"),
                    format!("no such network namespace: {}", netns.value.display()),
                ));
            }
            if self.workloads[..i].iter().any(|w| w.name == workload.name) {
                return Err(invalid(
                    netns.referenced.line(),
                    format!("workloads[{i}].name"),
                    format!("duplicate workload name {:?}", workload.name),
                ));
            }
        }
        Ok(())
    }

    /// Where the kernel rewrites steered IPv6 connects to, if anywhere.
    pub fn redirect_target_v6(&self) -> Result<Option<std::net::SocketAddrV6>, String> {
        let Some(v6) = &self.outbound.redirect_address_v6 else {
            return Ok(None);
        };
        let ip = v6.value;
        let listen = self.outbound.listen.value;
        if ip.is_unspecified() || ip.is_loopback() || ip.to_ipv4_mapped().is_some() {
            return Err(format!(
                "{ip}: use an IPv6 address of this node that pods can reach (not ::, ::1 or IPv4-mapped)"
            ));
        }
        match listen.ip() {
            IpAddr::V6(l) if l.is_unspecified() || l == ip => {}
            _ => {
                return Err(format!(
                    "outbound.listen ({listen}) does not accept IPv6 on {ip}; listen on [::]:{} (dual stack)",
                    listen.port()
                ));
            }
        }
        Ok(Some(std::net::SocketAddrV6::new(ip, listen.port(), 0, 0)))
    }

    /// The address the kernel rewrites steered connects to.
    pub fn redirect_target(&self) -> Result<std::net::SocketAddrV4, String> {
        let listen = self.outbound.listen.value;
        let ip = match (&self.outbound.redirect_address, listen.ip()) {
            (Some(r), _) => r.value,
            (None, ip) if !ip.is_unspecified() => ip,
            (None, _) => {
                return Err(format!(
                    "required when outbound.listen ({listen}) does not name one address"
                ));
            }
        };
        let IpAddr::V4(ip) = ip else {
            return Err(format!("{ip}: only IPv4 is steered so far"));
        };
        if !listen.ip().is_unspecified() && listen.ip() != IpAddr::V4(ip) {
            return Err(format!(
                "{ip} is not where outbound.listen ({listen}) accepts connections"
            ));
        }
        if ip == Ipv4Addr::UNSPECIFIED {
            return Err("0.0.0.0 cannot be connected to".into());
        }
        Ok(std::net::SocketAddrV4::new(ip, listen.port()))
    }

    fn default_drain_timeout_seconds() -> u64 {
        20
    }

    pub fn drain_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.drain_timeout_seconds)
    }

    /// Fields that differ from `new` but only take effect after a restart.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let json = |c: &Config| serde_json::to_value(c).unwrap_or_default();
        let (old, new) = (json(self), json(new));
        [
            "outbound",
            "admin",
            "workers",
            "workloads",
            "ebpf",
            "drain_timeout_seconds",
            "access_log",
            "policy",
            "services",
            "inbound",
        ]
        .into_iter()
        .filter(|field| old.get(field) != new.get(field))
        .collect()
    }

    /// Worker threads to start.
    pub fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

/// A scalar parsed with `FromStr` (addresses, ports), remembering its line.
/// serde-saphyr cannot place errors raised inside `Deserialize` impls, so a
/// parse error carries its own line for [`locate_parse_error`] to report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Located<T> {
    pub value: T,
    #[serde(skip)]
    pub line: u64,
}

/// Prefix of the errors [`Located`] raises: `at line N: …`.
const LINE_MARK: &str = "at line ";

impl<'de, T> Deserialize<'de> for Located<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = Spanned::<String>::deserialize(deserializer)?;
        let line = text.referenced.line();
        match text.value.parse() {
            Ok(value) => Ok(Located { value, line }),
            Err(e) => Err(serde::de::Error::custom(format!(
                "{LINE_MARK}{line}: {:?}: {e}",
                text.value
            ))),
        }
    }
}

/// Turns a parse error into `(line, "`field`: message")`: the line the
/// parser or [`Located`] reported, and the YAML key written on that line —
/// for an unknown field, the line where that field actually is rather than
/// where its mapping starts.
fn locate_parse_error(text: &str, error: &serde_saphyr::Error) -> (u64, String) {
    let message = tidy_parser_message(&error.to_string());
    let (mut line, message) = match message
        .strip_prefix(LINE_MARK)
        .and_then(|rest| rest.split_once(": "))
    {
        Some((n, rest)) => (n.parse().unwrap_or(0), rest.to_owned()),
        None => (error.location().map_or(0, |l| l.line()), message),
    };
    let key_on = |n: u64| -> Option<&str> {
        let l = text.lines().nth(usize::try_from(n).ok()?.checked_sub(1)?)?;
        let key = l
            .trim_start()
            .trim_start_matches("- ")
            .split(':')
            .next()?
            .trim();
        (!key.is_empty() && !key.starts_with('#')).then_some(key)
    };
    let unknown_field = message
        .split_once("unknown field `")
        .and_then(|(_, rest)| rest.split('`').next());
    if let Some(n) =
        unknown_field.and_then(|field| (line..line + 200).find(|n| key_on(*n) == Some(field)))
    {
        line = n;
    }
    let message = match key_on(line) {
        Some(key) if !message.contains(&format!("`{key}`")) => format!("`{key}`: {message}"),
        _ => message,
    };
    (line, message)
}

/// serde-saphyr's messages carry the position twice and a source snippet;
/// keep the first line without positions, since we print `file:line:`.
fn tidy_parser_message(raw: &str) -> String {
    let first = raw.lines().next().unwrap_or(raw);
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let first = match first
        .strip_prefix("line ")
        .and_then(|rest| rest.split_once(": "))
    {
        Some((position, rest)) if position.contains("column") => rest,
        _ => first,
    };
    match first.rsplit_once(" at line ") {
        Some((message, position)) if position.contains("column") => message.to_owned(),
        _ => first.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("filter.wasm"), b"\0asm").unwrap();
        let path = dir.path().join("wisp.yaml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    const GOOD: &str = "\
outbound:
  listen: 0.0.0.0:15001
  redirect_address: 10.1.0.1
plugins:
  - name: headers
    module: filter.wasm
workloads:
  - name: self
    netns: /proc/self/ns/net
";

    #[test]
    fn the_example_config_parses() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/wisp.yaml"
        ));
        let text = std::fs::read_to_string(path).unwrap();
        let config = Config::parse(path, &text).unwrap();
        assert_eq!(config.outbound.ports.get(&5432), Some(&Protocol::Tcp));
        assert_eq!(config.plugins.len(), 1);
    }

    #[test]
    fn accepts_a_good_config_and_resolves_module_paths() {
        let config = load_str(GOOD).unwrap();
        assert!(config.plugins[0].module.value.is_absolute());
        assert_eq!(
            config.redirect_target().unwrap().to_string(),
            "10.1.0.1:15001"
        );
        assert_eq!(config.admin.listen.value.to_string(), "127.0.0.1:15000");
        assert_eq!(config.plugins[0].failure_policy, FailurePolicy::FailClosed);
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let text = GOOD.replace(
            "    module: filter.wasm",
            "    module: filter.wasm\n    rootid: x",
        );
        let err = load_str(&text).unwrap_err().to_string();
        assert!(err.contains(":7: unknown field `rootid`"), "{err}");
    }

    #[test]
    fn missing_module_file_names_field_file_and_line() {
        let text = GOOD.replace("filter.wasm", "nope.wasm");
        let err = load_str(&text).unwrap_err().to_string();
        assert!(err.contains(":6: `plugins[0].module`"), "{err}");
        assert!(err.contains("nope.wasm"), "{err}");
    }

    #[test]
    fn bad_address_is_refused_with_its_line() {
        let text = GOOD.replace("0.0.0.0:15001", "0.0.0.0:99999");
        let err = load_str(&text).unwrap_err().to_string();
        assert!(err.contains(":2: `listen`: \"0.0.0.0:99999\""), "{err}");
    }

    #[test]
    fn wildcard_listen_needs_a_redirect_address() {
        let text = GOOD.replace("  redirect_address: 10.1.0.1\n", "");
        let err = load_str(&text).unwrap_err().to_string();
        assert!(err.contains("`outbound.redirect_address`"), "{err}");
    }

    #[test]
    fn missing_netns_is_named() {
        let text = GOOD.replace("/proc/self/ns/net", "/var/run/netns/does-not-exist");
        let err = load_str(&text).unwrap_err().to_string();
        assert!(err.contains(":9: `workloads[0].netns`"), "{err}");
    }
}
