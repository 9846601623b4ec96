//! `wisp`: the node agent's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wisp_agent::config::Config;

#[derive(Parser)]
#[command(
    name = "wisp",
    version,
    about = "wisp node agent: eBPF steering + Proxy-Wasm filters, one process per node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the kernel programs, enroll workloads and proxy their traffic
    /// until SIGINT or SIGTERM.
    Run {
        /// The agent's YAML configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// Program the node from the Kubernetes API (in-cluster config, or
        /// KUBECONFIG): pods, namespaces, services and WasmPlugins.
        #[arg(long)]
        kubernetes: bool,
        /// This node's name in Kubernetes mode (default: $WISP_NODE_NAME,
        /// then kubernetes.node_name in the config).
        #[arg(long, requires = "kubernetes")]
        node_name: Option<String>,
    },
    /// Validate a configuration file (and compile its plugins) without
    /// touching the kernel.
    CheckConfig {
        /// The YAML file to check.
        config: PathBuf,
    },
    /// Quick mode: one listener without eBPF, as a sidecar or a gateway.
    Proxy(Box<ProxyArgs>),
    /// The kernel side on this node: what is attached and pinned, and
    /// removing it.
    #[command(subcommand)]
    Ebpf(wisp_agent::ebpf::cli::EbpfCommand),
}

#[derive(clap::Args)]
struct ProxyArgs {
    /// Address to accept connections on.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Where connections go: ADDR:PORT, or `original-dst` for the destination
    /// iptables REDIRECT recorded (sidecar capture).
    #[arg(long)]
    upstream: wisp_agent::app::Upstream,
    /// A Proxy-Wasm plugin (.wasm); repeat for a chain, in order.
    #[arg(long = "plugin", value_name = "FILE.wasm")]
    plugins: Vec<PathBuf>,
    /// Configuration of the preceding --plugin (PLUGIN_CONFIGURATION).
    #[arg(long = "plugin-config", value_name = "STRING")]
    plugin_configs: Vec<String>,
    /// Root id of the preceding --plugin.
    #[arg(long = "root-id", value_name = "ID")]
    root_ids: Vec<String>,
    /// Kind of the preceding --plugin: `http` (default, an HTTP filter),
    /// `network` (a network filter, run on TCP pass-through connections) or
    /// `singleton` (one instance for the agent, root context only).
    #[arg(long = "plugin-kind", value_name = "KIND")]
    plugin_kinds: Vec<wisp_agent::plugins::PluginKind>,
    /// Failure policy for all plugins: FAIL_CLOSED (default), FAIL_OPEN or FAIL_RELOAD.
    #[arg(long, default_value = "FAIL_CLOSED", value_parser = wisp_agent::app::parse_failure_policy)]
    failure_policy: wisp_wasm_host::FailurePolicy,
    /// Protocol: auto (detect), http1, http2 or tcp.
    #[arg(long, default_value = "auto", value_parser = parse_protocol)]
    protocol: wisp_agent::listener::Protocol,
    /// Worker threads (default: the number of CPUs).
    #[arg(long)]
    workers: Option<usize>,
    /// Admin listener (/metrics, /ready, /config_dump, /plugins).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: std::net::SocketAddr,
    /// Seconds in-flight connections get to finish on SIGTERM.
    #[arg(long, default_value_t = 20)]
    drain_timeout_seconds: u64,
    /// Terminate TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mTLS.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Originate TLS to the upstream, verifying it against this CA (PEM).
    #[arg(long, requires = "upstream_sni")]
    upstream_tls_ca: Option<PathBuf>,
    /// Server name to send to and verify on the upstream.
    #[arg(long, requires = "upstream_tls_ca")]
    upstream_sni: Option<String>,
    /// Client certificate (PEM) for mTLS to the upstream; needs --upstream-client-key.
    #[arg(long, requires_all = ["upstream_client_key", "upstream_tls_ca"])]
    upstream_client_cert: Option<PathBuf>,
    /// Private key (PEM) of --upstream-client-cert.
    #[arg(long, requires = "upstream_client_cert")]
    upstream_client_key: Option<PathBuf>,
    /// Append one JSON line per HTTP request to this file.
    #[arg(long)]
    access_log: Option<PathBuf>,
    /// An upstream plugins may call (http_call, gRPC) by NAME; repeat for more.
    /// Options after commas: `timeout_ms=N` caps every call, `http2` for
    /// http_call over HTTP/2 (gRPC always uses HTTP/2).
    #[arg(long = "cluster", value_name = "NAME=ADDR[,timeout_ms=N][,http2]", value_parser = wisp_agent::callout::parse_cluster_flag)]
    clusters: Vec<(String, wisp_agent::callout::Cluster)>,
    /// Most body bytes the plugins of one stream may buffer (413 for
    /// requests, 500 for responses past it).
    #[arg(long, default_value_t = wisp_agent::body::DEFAULT_BUFFER_LIMIT_BYTES)]
    buffer_limit_bytes: usize,
}

fn parse_protocol(text: &str) -> Result<wisp_agent::listener::Protocol, String> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| format!("{text:?}: expected auto, http1, http2 or tcp"))
}

impl ProxyArgs {
    fn into_quick_mode(self) -> Result<wisp_agent::app::QuickMode, String> {
        if self.plugin_configs.len() > self.plugins.len()
            || self.root_ids.len() > self.plugins.len()
            || self.plugin_kinds.len() > self.plugins.len()
        {
            return Err(
                "--plugin-config, --root-id and --plugin-kind each belong to a --plugin given before them".into(),
            );
        }
        if self.workers == Some(0) {
            return Err("--workers must be at least 1".into());
        }
        if self.buffer_limit_bytes == 0 {
            return Err("--buffer-limit-bytes must be at least 1".into());
        }
        let mut clusters = std::collections::BTreeMap::new();
        for (name, cluster) in self.clusters {
            if clusters.insert(name.clone(), cluster).is_some() {
                return Err(format!("--cluster {name}: given twice"));
            }
        }
        let plugins = self
            .plugins
            .iter()
            .enumerate()
            .map(|(i, module)| wisp_agent::app::PluginSource {
                module: module.display().to_string(),
                sha256: None,
                defined_at: Some(format!("--plugin {}", module.display())),
                config: wisp_wasm_host::PluginConfig {
                    name: module.file_stem().map_or_else(
                        || format!("plugin-{i}"),
                        |s| s.to_string_lossy().into_owned(),
                    ),
                    root_id: self.root_ids.get(i).cloned().unwrap_or_default(),
                    configuration: self
                        .plugin_configs
                        .get(i)
                        .cloned()
                        .unwrap_or_default()
                        .into_bytes(),
                    failure_policy: self.failure_policy,
                    ..Default::default()
                },
                kind: self.plugin_kinds.get(i).copied().unwrap_or_default(),
                matcher: None,
            })
            .collect();
        Ok(wisp_agent::app::QuickMode {
            listen: self.listen,
            upstream: self.upstream,
            protocol: self.protocol,
            plugins,
            workers: self.workers.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
            }),
            admin: self.admin,
            drain_timeout: std::time::Duration::from_secs(self.drain_timeout_seconds),
            tls: match (self.tls_cert, self.tls_key) {
                (Some(cert), Some(key)) => Some(wisp_agent::tls::ServerTls {
                    cert,
                    key,
                    client_ca: self.tls_client_ca,
                    alpn: Vec::new(),
                }),
                _ => None,
            },
            upstream_tls: match (self.upstream_tls_ca, self.upstream_sni) {
                (Some(ca), Some(server_name)) => Some(wisp_agent::tls::UpstreamTls {
                    ca,
                    server_name,
                    client_cert: self.upstream_client_cert.zip(self.upstream_client_key),
                }),
                _ => None,
            },
            access_log: self.access_log,
            clusters,
            http: wisp_agent::body::HttpSettings {
                buffer_limit_bytes: self.buffer_limit_bytes,
            },
        })
    }
}

/// `sysexits.h` EX_CONFIG: the configuration is wrong.
const EXIT_CONFIG: u8 = 78;
/// `sysexits.h` EX_USAGE: the command line is wrong.
const EXIT_USAGE: u8 = 64;

/// The log filter: `WISP_LOG` (default `info`). rustls warns at every
/// handshake whose client sends an IP address as SNI, which OpenSSL-based
/// clients (wrk, h2load, many HTTP libraries) do; it is harmless and would
/// flood the log, so rustls's handshake parser logs only errors unless
/// `WISP_LOG` names rustls itself.
fn log_filter() -> tracing_subscriber::EnvFilter {
    let spec = std::env::var("WISP_LOG").unwrap_or_default();
    let spec = if spec.trim().is_empty() {
        "info"
    } else {
        &spec
    };
    let spec = if spec.contains("rustls") {
        spec.to_owned()
    } else {
        format!("{spec},rustls::msgs::handshake=error")
    };
    tracing_subscriber::EnvFilter::try_new(spec)
        .unwrap_or_else(|_| "info,rustls::msgs::handshake=error".into())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let config_path = match cli.command {
        Command::Run { ref config, .. } | Command::CheckConfig { ref config } => config.clone(),
        Command::Proxy(args) => {
            let quick = match (*args).into_quick_mode() {
                Ok(quick) => quick,
                Err(error) => {
                    eprintln!("wisp proxy: {error}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            return exit(wisp_agent::app::proxy(quick));
        }
        Command::Ebpf(command) => {
            return match wisp_agent::ebpf::cli::run(&command) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("wisp ebpf: {error}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    let config_path = &config_path;
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("wisp: invalid configuration: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = match cli.command {
        Command::Run {
            kubernetes,
            node_name,
            ..
        } => {
            let mode = match kubernetes_mode(kubernetes, node_name, &config) {
                Ok(mode) => mode,
                Err(error) => {
                    eprintln!("wisp run: {error}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            wisp_agent::app::run(config, config_path.clone(), mode)
        }
        Command::Proxy(_) | Command::Ebpf(_) => unreachable!("handled above"),
        Command::CheckConfig { .. } => wisp_agent::app::compile_plugins(
            &wisp_agent::app::plugin_sources(&config),
            &config.modules,
        )
        .map(|plugins| {
            println!(
                "{}: ok ({} plugin(s), {} workload(s))",
                config_path.display(),
                plugins.len(),
                config.workloads.len()
            );
        }),
    };
    exit(result)
}

/// `--kubernetes` with the node name from the flag, the environment or
/// the config.
fn kubernetes_mode(
    kubernetes: bool,
    node_name: Option<String>,
    config: &Config,
) -> Result<Option<wisp_agent::app::KubernetesMode>, wisp_agent::kube::KubeError> {
    if !kubernetes {
        return Ok(None);
    }
    let node_name = node_name
        .or_else(|| std::env::var("WISP_NODE_NAME").ok())
        .filter(|n| !n.is_empty())
        .or_else(|| config.kubernetes.node_name.clone())
        .ok_or(wisp_agent::kube::KubeError::NoNodeName)?;
    Ok(Some(wisp_agent::app::KubernetesMode { node_name }))
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("wisp: {error:#}");
            ExitCode::FAILURE
        }
    }
}
