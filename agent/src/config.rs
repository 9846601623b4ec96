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
use crate::module_fetch::{ModuleLocation, parse_sha256};
use crate::plugins::{PluginKind, PluginMatch};

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
    /// Extra listeners with one fixed upstream each (gateways, ingress),
    /// with TLS termination and origination (see `listener::ListenerConfig`).
    #[serde(default)]
    pub listeners: Vec<crate::listener::ListenerConfig>,
    /// Where plugin modules fetched over the network are cached, and how
    /// they are fetched.
    #[serde(default)]
    pub modules: ModulesConfig,
    /// The file this configuration was read from, for errors that name it.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// Upstreams plugins may call with `http_call` / gRPC, by name.
    #[serde(default)]
    pub clusters: BTreeMap<String, crate::callout::ClusterSpec>,
    /// The HTTP request path (body buffer limit).
    #[serde(default)]
    pub http: crate::body::HttpSettings,
    /// Kubernetes mode (`wisp run --kubernetes`): where this node's pods
    /// live. Ignored in file mode.
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
}

/// The `kubernetes:` section (see docs/kubernetes.md).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// This node's name; `--node-name` and `WISP_NODE_NAME` take precedence.
    #[serde(default)]
    pub node_name: Option<String>,
    /// The host's `/proc` as mounted in the agent's container.
    #[serde(default = "KubernetesConfig::default_proc_root")]
    pub proc_root: PathBuf,
    /// The host's cgroup v2 root (kubelet's pod cgroups). Default: the
    /// cgroup2 mount found in `/proc/self/mounts`.
    #[serde(default)]
    pub cgroup_root: Option<PathBuf>,
    /// Fetched modules, stored by digest.
    #[serde(default = "KubernetesConfig::default_module_dir")]
    pub module_dir: PathBuf,
    /// `WasmPlugin`s in this namespace may select pods in other namespaces.
    #[serde(default = "KubernetesConfig::default_root_namespace")]
    pub root_namespace: String,
    /// Find each pod's network namespace at `DIR/<pod uid>` instead of
    /// through kubelet's cgroups (for tests and runtimes that publish them).
    #[serde(default)]
    pub netns_dir: Option<PathBuf>,
}

impl KubernetesConfig {
    fn default_proc_root() -> PathBuf {
        PathBuf::from("/proc")
    }
    fn default_module_dir() -> PathBuf {
        PathBuf::from("/run/wisp/modules")
    }
    fn default_root_namespace() -> String {
        "wisp-system".into()
    }
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            node_name: None,
            proc_root: KubernetesConfig::default_proc_root(),
            cgroup_root: None,
            module_dir: KubernetesConfig::default_module_dir(),
            root_namespace: KubernetesConfig::default_root_namespace(),
            netns_dir: None,
        }
    }
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
    /// Per destination port: originate TLS (mTLS with a client certificate)
    /// to steered HTTP connections to that port, e.g. `{443: {ca, server_name}}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub upstream_tls: BTreeMap<u16, crate::tls::UpstreamTlsConfig>,
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
    /// The `.wasm` module: a path (relative paths are resolved against the
    /// directory of the config file), `file:///…`, `https://…` or
    /// `oci://registry/repo:tag` / `oci://registry/repo@sha256:…`
    /// (see [`crate::module_fetch`]).
    pub module: Spanned<String>,
    /// The module's sha256 (`HEX` or `sha256:HEX`); required for `https://`
    /// and for `oci://` by tag, checked for files when given. For `oci://`
    /// it may also be the image manifest's digest, as in Istio.
    #[serde(default)]
    pub sha256: Option<Spanned<String>>,
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
    /// `http` (default): an HTTP filter, run on requests; `network`: a
    /// network filter, run on TCP pass-through connections; `singleton`: one
    /// instance for the agent, with only a root context (see `plugins`).
    #[serde(default)]
    pub kind: PluginKind,
    /// Which traffic the plugin applies to: `{ports, workloads, hosts,
    /// paths}`, every present condition must hold. Default: all of it.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matcher: Option<Spanned<PluginMatch>>,
    /// How instances are shared: `per_worker` (default), `per_plugin`,
    /// `per_use` or `per_request`.
    #[serde(default)]
    pub isolation: wisp_wasm_host::IsolationMode,
    /// Per-instance limits; unset fields keep the host's defaults.
    #[serde(default)]
    pub limits: PluginLimits,
    /// When set, only these `env` and WASI function names work.
    #[serde(default)]
    pub allowed_capabilities: Option<Vec<String>>,
}

/// `plugins[].limits`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginLimits {
    #[serde(default)]
    pub memory_mib: Option<u32>,
    #[serde(default)]
    pub callback_deadline_ms: Option<u64>,
    #[serde(default)]
    pub fuel: Option<u64>,
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

/// How plugin modules are fetched (`modules:`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModulesConfig {
    /// Content-addressed cache of fetched modules (by sha256); a pinned
    /// module found here is loaded without contacting its server. Created on
    /// the first fetch. Default: /var/lib/wisp/modules.
    #[serde(default = "ModulesConfig::default_cache_dir")]
    pub cache_dir: PathBuf,
    /// Size cap of the cache: past it, the least recently used modules are
    /// removed. Also the largest module that may be fetched. Default 256 MiB.
    #[serde(default = "ModulesConfig::default_cache_max_bytes")]
    pub cache_max_bytes: Spanned<u64>,
    /// Deadline of one fetch attempt, in seconds. Default 30.
    #[serde(default = "ModulesConfig::default_fetch_timeout_seconds")]
    pub fetch_timeout_seconds: Spanned<u64>,
    /// Retries after a transient failure (connect error, timeout, 5xx, 429),
    /// with exponential backoff from 200 ms. Default 3.
    #[serde(default = "ModulesConfig::default_fetch_retries")]
    pub fetch_retries: u32,
    /// PEM bundle of extra CA certificates trusted for `https://` and
    /// `oci://` (a private registry), beside the system's roots.
    #[serde(default)]
    pub ca_file: Option<Spanned<PathBuf>>,
    /// Allow plain `http://` module URLs (and redirects to them). Default
    /// false: a module's pin protects its content, but not the fact that
    /// somebody on the path sees which modules a node loads.
    #[serde(default)]
    pub allow_http: bool,
}

impl ModulesConfig {
    fn default_cache_dir() -> PathBuf {
        PathBuf::from("/var/lib/wisp/modules")
    }
    fn default_cache_max_bytes() -> Spanned<u64> {
        unlocated(256 << 20)
    }
    fn default_fetch_timeout_seconds() -> Spanned<u64> {
        unlocated(30)
    }
    fn default_fetch_retries() -> u32 {
        3
    }
}

impl Default for ModulesConfig {
    fn default() -> Self {
        ModulesConfig {
            cache_dir: ModulesConfig::default_cache_dir(),
            cache_max_bytes: ModulesConfig::default_cache_max_bytes(),
            fetch_timeout_seconds: ModulesConfig::default_fetch_timeout_seconds(),
            fetch_retries: ModulesConfig::default_fetch_retries(),
            ca_file: None,
            allow_http: false,
        }
    }
}

/// A default value, which no line of the file holds.
fn unlocated<T>(value: T) -> Spanned<T> {
    Spanned::new(
        value,
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    )
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
        config.source = Some(path.to_owned());
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
            // Only plain paths; URLs (and bad locations, which validate()
            // reports) stay as written.
            if let Ok(ModuleLocation::File(path)) = ModuleLocation::parse(&plugin.module.value)
                && path.is_relative()
            {
                plugin.module.value = base.join(path).display().to_string();
            }
        }
        for listener in &mut self.listeners {
            listener.resolve_paths(base);
        }
        for tls in self.outbound.upstream_tls.values_mut() {
            tls.resolve_paths(base);
        }
        for tls in self.clusters.values_mut().filter_map(|c| c.tls.as_mut()) {
            tls.resolve_paths(base);
        }
        if self.modules.cache_dir.is_relative() {
            self.modules.cache_dir = base.join(&self.modules.cache_dir);
        }
        if let Some(ca) = &mut self.modules.ca_file
            && ca.value.is_relative()
        {
            ca.value = base.join(&ca.value);
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
        self.validate_modules(path)?;
        for (i, plugin) in self.plugins.iter().enumerate() {
            let module = &plugin.module;
            let module_line = module.referenced.line();
            let location = ModuleLocation::parse(&module.value)
                .map_err(|e| invalid(module_line, format!("plugins[{i}].module"), e.to_string()))?;
            let sha_line = plugin
                .sha256
                .as_ref()
                .map_or(module_line, |s| s.referenced.line());
            if let Some(sha) = &plugin.sha256 {
                parse_sha256(&sha.value).map_err(|e| {
                    invalid(sha_line, format!("plugins[{i}].sha256"), e.to_string())
                })?;
            }
            match &location {
                ModuleLocation::File(file) if !file.is_file() => {
                    return Err(invalid(
                        module_line,
                        format!("plugins[{i}].module"),
                        format!("no such file: {}", file.display()),
                    ));
                }
                ModuleLocation::Http(url) if url.scheme() == "http" && !self.modules.allow_http => {
                    return Err(invalid(
                        module_line,
                        format!("plugins[{i}].module"),
                        format!(
                            "{url}: plain http:// is refused; use https://, or set `modules.allow_http: true` for a trusted network"
                        ),
                    ));
                }
                _ => {}
            }
            if location.is_remote() && plugin.sha256.is_none() && location.own_pin().is_none() {
                return Err(invalid(
                    module_line,
                    format!("plugins[{i}].sha256"),
                    format!(
                        "required for a module fetched from {}: add `sha256: <hex>` (sha256sum of the module{})",
                        module.value,
                        if matches!(location, ModuleLocation::Oci(_)) {
                            ", or the image manifest digest; or reference the image by @sha256:"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            if self.plugins[..i].iter().any(|p| p.name == plugin.name) {
                return Err(invalid(
                    module.referenced.line(),
                    format!("plugins[{i}].name"),
                    format!("duplicate plugin name {:?}", plugin.name),
                ));
            }
            if plugin.kind == PluginKind::Singleton
                && plugin.isolation == wisp_wasm_host::IsolationMode::PerRequest
            {
                return Err(invalid(
                    module.referenced.line(),
                    format!("plugins[{i}].isolation"),
                    "a singleton plugin has one instance and no requests: per_request does not apply"
                        .into(),
                ));
            }
            if let Some(matcher) = &plugin.matcher {
                matcher
                    .value
                    .check(plugin.kind)
                    .map_err(|(field, message)| {
                        invalid(
                            matcher.referenced.line(),
                            format!("plugins[{i}].{field}"),
                            message,
                        )
                    })?;
                let known: Vec<&str> = ["outbound", "inbound"]
                    .into_iter()
                    .chain(self.listeners.iter().map(|l| l.name.as_str()))
                    .collect();
                let names = matcher.value.listeners.iter().flatten();
                if let Some((j, name)) = names
                    .enumerate()
                    .find(|(_, name)| !known.contains(&name.as_str()))
                {
                    return Err(invalid(
                        matcher.referenced.line(),
                        format!("plugins[{i}].match.listeners[{j}]"),
                        format!(
                            "no listener is named {name:?} (listeners: {})",
                            known.join(", ")
                        ),
                    ));
                }
            }
        }
        for (port, tls) in &self.outbound.upstream_tls {
            let protocol = self
                .outbound
                .ports
                .get(port)
                .copied()
                .unwrap_or(self.outbound.protocol);
            if protocol == Protocol::Tcp {
                return Err(invalid(
                    tls.ca.referenced.line(),
                    format!("outbound.upstream_tls.{port}"),
                    format!(
                        "port {port} is passed through as tcp; TLS origination wraps HTTP (protocol auto, http1 or http2)"
                    ),
                ));
            }
            tls.check().map_err(|(line, field, message)| {
                invalid(
                    line,
                    format!("outbound.upstream_tls.{port}.{field}"),
                    message,
                )
            })?;
        }
        for (i, listener) in self.listeners.iter().enumerate() {
            listener.check(&self.listeners[..i], listen.value).map_err(
                |(line, field, message)| invalid(line, format!("listeners[{i}].{field}"), message),
            )?;
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
        for (name, cluster) in &self.clusters {
            if name.is_empty() {
                return Err(invalid(
                    cluster.address.line,
                    "clusters".into(),
                    "a cluster name is empty".into(),
                ));
            }
            if cluster.address.value.port() == 0 {
                return Err(invalid(
                    cluster.address.line,
                    format!("clusters.{name}.address"),
                    "needs a port".into(),
                ));
            }
            if cluster.timeout_ms == Some(0) {
                return Err(invalid(
                    cluster.address.line,
                    format!("clusters.{name}.timeout_ms"),
                    "must be at least 1".into(),
                ));
            }
            if let Some(tls) = &cluster.tls {
                tls.check().map_err(|(line, field, message)| {
                    invalid(line, format!("clusters.{name}.tls.{field}"), message)
                })?;
            }
        }
        if self.http.buffer_limit_bytes == 0 {
            return Err(invalid(
                0,
                "http.buffer_limit_bytes".into(),
                "must be at least 1".into(),
            ));
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

    fn validate_modules(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |line: u64, field: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            line,
            field: format!("modules.{field}"),
            message,
        };
        let modules = &self.modules;
        if modules.fetch_timeout_seconds.value == 0 {
            return Err(invalid(
                modules.fetch_timeout_seconds.referenced.line(),
                "fetch_timeout_seconds",
                "must be at least 1".into(),
            ));
        }
        if modules.cache_max_bytes.value == 0 {
            return Err(invalid(
                modules.cache_max_bytes.referenced.line(),
                "cache_max_bytes",
                "must be at least 1 (it is also the largest module that may be fetched)".into(),
            ));
        }
        if let Some(ca) = &modules.ca_file {
            let line = ca.referenced.line();
            match std::fs::read_to_string(&ca.value) {
                Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => {}
                Ok(_) => {
                    return Err(invalid(
                        line,
                        "ca_file",
                        format!("{} holds no PEM certificate", ca.value.display()),
                    ));
                }
                Err(e) => {
                    return Err(invalid(
                        line,
                        "ca_file",
                        format!("cannot read {}: {e}", ca.value.display()),
                    ));
                }
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
            "ebpf",
            "drain_timeout_seconds",
            "access_log",
            "inbound",
            "listeners",
            "clusters",
            "http",
            "kubernetes",
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
        let matcher = config.plugins[0].matcher.as_ref().unwrap();
        assert_eq!(matcher.value.ports, Some(vec![80, 8080]));
        assert_eq!(config.plugins[0].kind, crate::plugins::PluginKind::Http);
    }

    #[test]
    fn accepts_a_good_config_and_resolves_module_paths() {
        let config = load_str(GOOD).unwrap();
        assert!(Path::new(&config.plugins[0].module.value).is_absolute());
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
    fn url_modules_need_a_pin_and_http_needs_allow_http() {
        let sha = "ab".repeat(32);
        let https = GOOD.replace(
            "    module: filter.wasm",
            &format!("    module: https://plugins.test/f.wasm\n    sha256: sha256:{sha}"),
        );
        let config = load_str(&https).unwrap();
        assert_eq!(
            config.plugins[0].module.value,
            "https://plugins.test/f.wasm"
        );
        assert_eq!(config.modules.fetch_retries, 3);
        let unpinned = GOOD.replace("    module: filter.wasm", "    module: oci://r.test/f:v1");
        let err = load_str(&unpinned).unwrap_err().to_string();
        assert!(err.contains(":6: `plugins[0].sha256`: required"), "{err}");
        // A reference by digest pins itself.
        let digest = GOOD.replace(
            "    module: filter.wasm",
            &format!("    module: oci://r.test/f@sha256:{sha}"),
        );
        load_str(&digest).unwrap();
        let bad_sha = https.replace(&format!("sha256:{sha}"), "sha256:abc");
        let err = load_str(&bad_sha).unwrap_err().to_string();
        assert!(err.contains(":7: `plugins[0].sha256`"), "{err}");
        let http = https.replace("https://", "http://");
        let err = load_str(&http).unwrap_err().to_string();
        assert!(
            err.contains(":6: `plugins[0].module`") && err.contains("allow_http"),
            "{err}"
        );
        load_str(&format!("{http}modules:\n  allow_http: true\n")).unwrap();
        let ftp = GOOD.replace("    module: filter.wasm", "    module: ftp://x/f.wasm");
        let err = load_str(&ftp).unwrap_err().to_string();
        assert!(err.contains("unsupported scheme ftp://"), "{err}");
    }

    #[test]
    fn modules_fields_are_checked_and_paths_resolved() {
        let with = |modules: &str| format!("{GOOD}modules:\n{modules}");
        let config = load_str(&with("  cache_dir: cache\n")).unwrap();
        assert!(config.modules.cache_dir.is_absolute());
        let err = load_str(&with("  cache_dir: c\n  fetch_timeout_seconds: 0\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":12: `modules.fetch_timeout_seconds`"),
            "{err}"
        );
        let err = load_str(&with("  ca_file: nope.pem\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":11: `modules.ca_file`") && err.contains("nope.pem"),
            "{err}"
        );
        let err = load_str(&with("  ca_file: filter.wasm\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let err = load_str(&with("  cache_size: 1\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `cache_size`"), "{err}");
    }

    #[test]
    fn kubernetes_section_has_defaults_and_refuses_unknown_fields() {
        let config = load_str(GOOD).unwrap();
        assert_eq!(config.kubernetes.proc_root, Path::new("/proc"));
        assert_eq!(config.kubernetes.root_namespace, "wisp-system");
        assert_eq!(config.kubernetes.node_name, None);
        let text = format!(
            "{GOOD}kubernetes:\n  node_name: n1\n  proc_root: /host/proc\n  cgroup_root: /host/cgroup\n"
        );
        let config = load_str(&text).unwrap();
        assert_eq!(config.kubernetes.node_name.as_deref(), Some("n1"));
        assert_eq!(config.kubernetes.proc_root, Path::new("/host/proc"));
        assert_eq!(
            config.kubernetes.cgroup_root.as_deref(),
            Some(Path::new("/host/cgroup"))
        );
        let err = load_str(&format!("{GOOD}kubernetes:\n  nodename: n1\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(":11: unknown field `nodename`"), "{err}");
    }

    #[test]
    fn plugin_match_and_limits_parse() {
        let text = GOOD.replace(
            "    module: filter.wasm\n",
            "    module: filter.wasm\n    match:\n      ports: [8080]\n      workloads: [self]\n    isolation: per_plugin\n    limits:\n      memory_mib: 8\n",
        );
        let config = load_str(&text).unwrap();
        let plugin = &config.plugins[0];
        let matcher = &plugin.matcher.as_ref().expect("a match").value;
        assert_eq!(matcher.ports, Some(vec![8080]));
        assert_eq!(matcher.workloads, Some(vec!["self".to_string()]));
        assert_eq!(plugin.isolation, wisp_wasm_host::IsolationMode::PerPlugin);
        assert_eq!(plugin.limits.memory_mib, Some(8));
    }

    #[test]
    fn missing_netns_is_named() {
        let text = GOOD.replace("/proc/self/ns/net", "/var/run/netns/does-not-exist");
        let err = load_str(&text).unwrap_err().to_string();
        assert!(err.contains(":9: `workloads[0].netns`"), "{err}");
    }

    #[test]
    fn clusters_and_the_buffer_limit() {
        let text = format!(
            "{GOOD}clusters:\n  backend:\n    address: 127.0.0.1:9000\n    timeout_ms: 250\n  grpc:\n    address: 127.0.0.1:9001\n    protocol: http2\nhttp:\n  buffer_limit_bytes: 4096\n"
        );
        let config = load_str(&text).unwrap();
        let clusters = crate::callout::clusters_from_specs(&config.clusters);
        assert_eq!(clusters["backend"].address.to_string(), "127.0.0.1:9000");
        assert_eq!(
            clusters["backend"].timeout,
            Some(std::time::Duration::from_millis(250))
        );
        assert_eq!(
            clusters["grpc"].protocol,
            crate::callout::ClusterProtocol::Http2
        );
        assert_eq!(config.http.buffer_limit_bytes, 4096);
        assert_eq!(
            load_str(GOOD).unwrap().http.buffer_limit_bytes,
            crate::body::DEFAULT_BUFFER_LIMIT_BYTES
        );

        let zero = text.replace("timeout_ms: 250", "timeout_ms: 0");
        let err = load_str(&zero).unwrap_err().to_string();
        assert!(err.contains("`clusters.backend.timeout_ms`"), "{err}");
        assert!(err.contains(":12:"), "{err}");
        let bad = text.replace("127.0.0.1:9000", "nowhere");
        let err = load_str(&bad).unwrap_err().to_string();
        assert!(err.contains(":12:"), "{err}");
        let unknown = text.replace("timeout_ms: 250", "timeout: 250");
        let err = load_str(&unknown).unwrap_err().to_string();
        assert!(err.contains("unknown field `timeout`"), "{err}");
    }
}
