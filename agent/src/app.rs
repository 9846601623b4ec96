//! Start-up and shutdown. `wisp run` (node agent: kernel steering plus
//! listeners from the config file) and `wisp proxy` (quick mode: one
//! listener, no eBPF) share one path: compile plugins, start workers, then
//! whatever steers traffic, the admin listener, and on SIGINT/SIGTERM the
//! reverse with a graceful drain.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};
use wisp_wasm_host::{FailurePolicy, Plugin, PluginConfig};

use crate::admin::{self, AdminState};
use crate::config::{Config, ModulesConfig};
use crate::ebpf::Dataplane;
use crate::filter_chain::ChainEnv;
use crate::listener::{Destination, ListenerSpec, Protocol};
use crate::metrics::{KernelCounters, Metrics};
use crate::module_fetch::ModuleFetcher;
use crate::plugins::{ConfiguredPlugin, PluginKind, PluginMatch};
use crate::worker::SharedDataplane;
use crate::worker::{DataplaneCell, WorkerContext, Workers};

/// A plugin to load: where its module is, how to configure it, and whether
/// it is an HTTP or a network filter and for which traffic.
pub struct PluginSource {
    /// A path or URL (see [`crate::module_fetch`]).
    pub module: String,
    /// The module's pin, `HEX` or `sha256:HEX`.
    pub sha256: Option<String>,
    /// Where the plugin is configured, for errors: `FILE:LINE: `plugins[i].module``.
    pub defined_at: Option<String>,
    pub config: PluginConfig,
    pub kind: PluginKind,
    pub matcher: Option<PluginMatch>,
}

impl PluginSource {
    /// `FILE:LINE: `plugins[i].module`: ` for errors, or nothing.
    fn at(&self) -> String {
        self.defined_at
            .as_ref()
            .map_or_else(String::new, |at| format!("{at}: "))
    }

    /// An error about this plugin, prefixed with where it is configured.
    fn error(&self, message: impl std::fmt::Display) -> anyhow::Error {
        anyhow::anyhow!("{}plugin {:?}: {message}", self.at(), self.config.name)
    }

    /// Compiles the module's `bytes` into the plugin every worker
    /// instantiates. The host also accepts the text format (for its own
    /// tests); a deployed plugin must be a binary module.
    fn compile(&self, bytes: &[u8]) -> anyhow::Result<ConfiguredPlugin> {
        if !bytes.starts_with(b"\0asm") {
            return Err(self.error(format_args!(
                "{} is not a WebAssembly binary module (no \\0asm header)",
                self.module
            )));
        }
        let plugin = Plugin::compile(self.config.clone(), bytes).with_context(|| {
            format!(
                "{}plugin {:?} ({})",
                self.at(),
                self.config.name,
                self.module
            )
        })?;
        Ok(ConfiguredPlugin {
            plugin,
            kind: self.kind,
            matcher: self.matcher.clone(),
        })
    }
}

/// Fetches (or reads) every module and compiles it once; every worker
/// instantiates the result. Fails on the first plugin that cannot load,
/// naming it and where it is configured.
pub async fn load_plugins(
    fetcher: &ModuleFetcher,
    sources: &[PluginSource],
) -> anyhow::Result<Vec<ConfiguredPlugin>> {
    let mut plugins = Vec::with_capacity(sources.len());
    for source in sources {
        let module = fetcher
            .fetch(&source.module, source.sha256.as_deref())
            .await
            .map_err(|e| source.error(e))?;
        plugins.push(source.compile(&module.bytes)?);
    }
    Ok(plugins)
}

/// [`load_plugins`] from outside a runtime (start-up, `check-config`).
pub fn compile_plugins(
    sources: &[PluginSource],
    modules: &ModulesConfig,
) -> anyhow::Result<Vec<ConfiguredPlugin>> {
    let fetcher = ModuleFetcher::new(modules)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime that fetches modules")?
        .block_on(load_plugins(&fetcher, sources))
}

/// Compiles one plugin whose module is a local file, without a runtime:
/// for the apply path, which runs inside one. URL modules are fetched first
/// ([`load_plugins`]; the Kubernetes controller stores them as files).
pub fn compile_local_plugin(source: &PluginSource) -> anyhow::Result<ConfiguredPlugin> {
    let path = match crate::module_fetch::ModuleLocation::parse(&source.module) {
        Ok(crate::module_fetch::ModuleLocation::File(path)) => path,
        Ok(_) => {
            return Err(source.error(format_args!(
                "{} must be fetched before it is applied",
                source.module
            )));
        }
        Err(error) => return Err(source.error(error)),
    };
    let sha256 = source
        .sha256
        .as_deref()
        .map(crate::module_fetch::parse_sha256)
        .transpose()
        .map_err(|e| source.error(e))?;
    // The host's load error names the plugin itself.
    let bytes = wisp_wasm_host::ModuleSource::File { path, sha256 }
        .load(&source.config.name)
        .map_err(|e| anyhow::anyhow!("{}{e}", source.at()))?;
    source.compile(&bytes)
}

/// The plugins a config file names.
pub fn plugin_sources(config: &Config) -> Vec<PluginSource> {
    config
        .plugins
        .iter()
        .enumerate()
        .map(|(i, spec)| plugin_source(config.source.as_deref(), i, spec))
        .collect()
}

/// One `plugins[]` entry (the `i`th of the file at `source`) as the host loads it.
pub fn plugin_source(
    source: Option<&std::path::Path>,
    i: usize,
    spec: &crate::config::PluginSpec,
) -> PluginSource {
    PluginSource {
        module: spec.module.value.clone(),
        sha256: spec.sha256.as_ref().map(|s| s.value.clone()),
        defined_at: source.map(|path| {
            format!(
                "{}:{}: `plugins[{i}].module`",
                path.display(),
                spec.module.referenced.line()
            )
        }),
        config: PluginConfig {
            name: spec.name.clone(),
            root_id: spec.root_id.clone(),
            vm_id: spec.vm_id.clone(),
            configuration: spec.configuration.clone().into_bytes(),
            vm_configuration: spec.vm_configuration.clone().into_bytes(),
            failure_policy: spec.failure_policy,
            isolation: spec.isolation,
            limits: plugin_limits(&spec.limits),
            allowed_capabilities: spec
                .allowed_capabilities
                .as_ref()
                .map(|names| names.iter().cloned().collect()),
            ..Default::default()
        },
        kind: spec.kind,
        matcher: spec.matcher.as_ref().map(|m| m.value.clone()),
    }
}

/// The host's limits with what `plugins[].limits` sets.
fn plugin_limits(limits: &crate::config::PluginLimits) -> wisp_wasm_host::ResourceLimits {
    let mut out = wisp_wasm_host::ResourceLimits::default();
    if let Some(mib) = limits.memory_mib {
        out.max_memory_bytes = (mib as usize) << 20;
    }
    if let Some(ms) = limits.callback_deadline_ms {
        out.callback_deadline = Duration::from_millis(ms);
    }
    if limits.fuel.is_some() {
        out.fuel = limits.fuel;
    }
    out
}

/// What changes the config of `wisp run` after start-up.
enum Control {
    /// Quick mode: nothing.
    None,
    /// The config file, reloaded on SIGHUP or change, and what it said.
    File(PathBuf, Config),
    /// The Kubernetes API (`--kubernetes`), on top of the file's config.
    Kubernetes(Box<KubernetesMode>, Config),
}

/// `wisp run --kubernetes`.
pub struct KubernetesMode {
    /// This node's name (`--node-name`, `WISP_NODE_NAME`, `kubernetes.node_name`).
    pub node_name: String,
}

/// What one agent process serves.
struct ServeSpec {
    listeners: Vec<ListenerSpec>,
    plugins: Vec<ConfiguredPlugin>,
    workers: usize,
    admin: SocketAddr,
    drain_timeout: Duration,
    /// Served on `/config_dump`.
    config_dump: serde_json::Value,
    /// What changes the config at run time.
    control: Control,
    /// Where to append the JSON-lines access log.
    access_log: Option<PathBuf>,
    /// Clusters and body settings of the request path.
    http: crate::worker::HttpContext,
}

/// `wisp run`: the node agent, until SIGINT or SIGTERM; `config_path` is
/// reloaded on SIGHUP or when it changes, or, with `kubernetes`, the
/// cluster's objects are added to it as they change.
pub fn run(
    config: Config,
    config_path: PathBuf,
    kubernetes: Option<KubernetesMode>,
) -> anyhow::Result<()> {
    if kubernetes.is_some() && config.inbound.enabled {
        anyhow::bail!(
            "inbound.enabled is not supported in Kubernetes mode yet (inbound interception covers only the workloads enrolled at start)"
        );
    }
    let plugins = compile_plugins(&plugin_sources(&config), &config.modules)?;
    let redirect = config
        .redirect_target()
        .map_err(|message| anyhow::anyhow!("outbound.redirect_address: {message}"))?;
    let outbound = ListenerSpec {
        name: "outbound".into(),
        addr: config.outbound.listen.value,
        destination: Destination::Steered,
        protocol: config.outbound.protocol,
        port_protocols: config.outbound.ports.clone(),
        // Steered traffic is the pods' own: TLS they speak stays end to end;
        // TLS is only added towards ports that ask for it.
        tls: None,
        upstream_tls: None,
        port_upstream_tls: config
            .outbound
            .upstream_tls
            .iter()
            .map(|(port, tls)| (*port, tls.upstream_tls()))
            .collect(),
    };
    let mut listeners: Vec<ListenerSpec> = std::iter::once(outbound)
        .chain(config.listeners.iter().map(|l| l.spec()))
        .collect();
    if config.inbound.enabled {
        listeners.push(ListenerSpec {
            name: "inbound".into(),
            // Unused: the sockets are opened inside each pod's namespace.
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            destination: Destination::Inbound,
            protocol: config.inbound.protocol,
            port_protocols: config.inbound.ports.clone(),
            tls: None,
            upstream_tls: None,
            port_upstream_tls: Default::default(),
        });
    }
    let spec = ServeSpec {
        listeners,
        plugins,
        workers: config.worker_count(),
        admin: config.admin.listen.value,
        drain_timeout: config.drain_timeout(),
        config_dump: serde_json::to_value(&config).unwrap_or_default(),
        control: match kubernetes {
            Some(mode) => Control::Kubernetes(Box::new(mode), config.clone()),
            None => Control::File(config_path, config.clone()),
        },
        access_log: config.access_log.clone(),
        http: crate::worker::HttpContext {
            clusters: crate::callout::clusters_from_specs(&config.clusters),
            settings: config.http.clone(),
            plugin_metrics: None,
        },
    };
    serve(spec, |registry| {
        let options = crate::ebpf::DataplaneOptions::from_config(&config, redirect);
        let mut dataplane = Dataplane::start(&options)?;
        for workload in &config.workloads {
            dataplane
                .enroll(&workload.name, &workload.netns.value)
                .with_context(|| format!("workload {:?}", workload.name))?;
        }
        dataplane.apply_config(&config)?;
        let dataplane = Arc::new(std::sync::RwLock::new(dataplane));
        registry.register_collector(Box::new(KernelCounters(dataplane.clone())));
        Ok(Some(dataplane))
    })
}

/// Where quick mode sends connections.
#[derive(Clone, Debug)]
pub enum Upstream {
    Addr(SocketAddr),
    /// `original-dst`: the destination iptables REDIRECT recorded.
    OriginalDst,
}

impl std::str::FromStr for Upstream {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if text == "original-dst" {
            return Ok(Upstream::OriginalDst);
        }
        text.parse()
            .map(Upstream::Addr)
            .map_err(|e| format!("{text:?} is neither ADDR:PORT nor original-dst: {e}"))
    }
}

/// `wisp proxy`: one listener without eBPF, as a sidecar or a gateway.
pub struct QuickMode {
    pub listen: SocketAddr,
    pub upstream: Upstream,
    pub protocol: Protocol,
    pub plugins: Vec<PluginSource>,
    pub workers: usize,
    pub admin: SocketAddr,
    pub drain_timeout: Duration,
    /// Terminate TLS with these certificates.
    pub tls: Option<crate::tls::ServerTls>,
    /// Originate TLS (or mTLS) to the upstream.
    pub upstream_tls: Option<crate::tls::UpstreamTls>,
    /// Where to append the JSON-lines access log.
    pub access_log: Option<PathBuf>,
    /// `--cluster NAME=ADDR`: upstreams plugins may call out to.
    pub clusters: BTreeMap<String, crate::callout::Cluster>,
    /// `--buffer-limit-bytes`.
    pub http: crate::body::HttpSettings,
}

pub fn proxy(quick: QuickMode) -> anyhow::Result<()> {
    let plugins = compile_plugins(&quick.plugins, &ModulesConfig::default())?;
    let destination = match quick.upstream {
        Upstream::Addr(addr) => Destination::Fixed(addr),
        Upstream::OriginalDst => Destination::OriginalDst,
    };
    let listener = ListenerSpec {
        name: "proxy".into(),
        addr: quick.listen,
        destination,
        protocol: quick.protocol,
        port_protocols: BTreeMap::new(),
        tls: quick.tls,
        upstream_tls: quick.upstream_tls,
        port_upstream_tls: BTreeMap::new(),
    };
    // Certificates are read now so a bad file stops start-up with its name.
    if let Some(tls) = &listener.tls {
        tls.acceptor()?;
    }
    if let Some(tls) = &listener.upstream_tls {
        tls.connector_with_alpn(b"http/1.1")?;
    }
    let config_dump = serde_json::json!({
        "mode": "proxy",
        "listeners": [&listener],
        "plugins": quick.plugins.iter().map(|p| serde_json::json!({
            "name": p.config.name,
            "module": p.module,
            "root_id": p.config.root_id,
            "kind": p.kind,
            "failure_policy": p.config.failure_policy,
        })).collect::<Vec<_>>(),
        "workers": quick.workers,
        "admin": quick.admin,
        "clusters": &quick.clusters,
        "http": &quick.http,
    });
    serve(
        ServeSpec {
            listeners: vec![listener],
            plugins,
            workers: quick.workers,
            admin: quick.admin,
            drain_timeout: quick.drain_timeout,
            config_dump,
            control: Control::None,
            access_log: quick.access_log,
            http: crate::worker::HttpContext {
                clusters: Arc::new(quick.clusters),
                settings: quick.http,
                plugin_metrics: None,
            },
        },
        |_| Ok(None),
    )
}

/// Runs `spec` until SIGINT or SIGTERM. `steer` starts whatever sends traffic
/// to the listeners (the kernel programs, for `wisp run`) once they listen.
fn serve(
    spec: ServeSpec,
    steer: impl FnOnce(&mut Registry) -> anyhow::Result<Option<SharedDataplane>>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the main runtime")?;
    // The main thread's own tasks (singleton plugins) are not Send.
    let main_thread = tokio::task::LocalSet::new();
    runtime.block_on(main_thread.run_until(async move {
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        let plugin_count = spec.plugins.len();
        let (plugins_tx, plugins_rx) = tokio::sync::watch::channel(Arc::new(spec.plugins));
        registry.register_collector(Box::new(crate::metrics::PluginCounters(plugins_rx.clone())));
        let plugin_metrics = Arc::new(crate::plugin_metrics::PluginMetrics::default());
        registry.register_collector(Box::new(crate::plugin_metrics::PluginMetricsCollector(
            plugin_metrics.clone(),
        )));
        let mut http = spec.http;
        http.plugin_metrics = Some(plugin_metrics.clone());
        let singleton_env = ChainEnv {
            clusters: http.clusters.clone(),
            cluster_client: Some(Rc::new(
                crate::callout::ClusterClients::new(&http.clusters)
                    .context("building the singleton plugins' callout clients")?,
            )),
            plugin_metrics: Some(plugin_metrics),
            metrics: Some(metrics.clone()),
        };
        let listeners = Arc::new(spec.listeners);
        // Listen before steering anything, so a steered connect never meets
        // a closed port.
        let dataplane_cell: DataplaneCell = Default::default();
        let access_log = match &spec.access_log {
            Some(path) => Some(Arc::new(
                crate::access_log::AccessLog::open(path)
                    .with_context(|| format!("opening the access log {}", path.display()))?,
            )),
            None => None,
        };
        // Like the workers' instances, a singleton that cannot start stops
        // the agent here rather than later.
        let first_singletons = crate::singletons::Singletons::start(
            &plugins_rx.borrow(),
            &singleton_env,
        )
        .context("starting the singleton plugins")?;
        let singletons = tokio::task::spawn_local(crate::singletons::run(
            first_singletons,
            plugins_rx.clone(),
            singleton_env,
            shutdown_rx.clone(),
        ));
        let workers = Workers::start(
            spec.workers,
            WorkerContext {
                listeners: listeners.clone(),
                plugins: plugins_rx,
                dataplane: dataplane_cell.clone(),
                metrics: metrics.clone(),
                shutdown: shutdown_rx.clone(),
                drain_timeout: spec.drain_timeout,
                access_log,
                http,
            },
        )?;
        // Every worker has instantiated its plugins: what compiling and
        // instantiating freed can go back to the kernel.
        crate::heap::release_free_memory();
        for listener in listeners.iter() {
            if listener.destination == Destination::Inbound {
                tracing::info!(listener = %listener.name, workers = spec.workers, "listening inside each enrolled pod's network namespace (sk_lookup)");
                continue;
            }
            tracing::info!(
                listener = %listener.name,
                addr = %listener.addr,
                destination = ?listener.destination,
                protocol = ?listener.protocol,
                workers = spec.workers,
                plugins = plugin_count,
                "listening"
            );
        }

        let dataplane = steer(&mut registry)?;
        if let Some(dataplane) = &dataplane {
            let _ = dataplane_cell.set(dataplane.clone());
        }

        let admin_listener = admin::bind(spec.admin).await?;
        let admin_state = Arc::new(AdminState {
            registry,
            ready: AtomicBool::new(false),
            config_dump: std::sync::RwLock::new(spec.config_dump),
            plugins: admin::plugin_summaries(&plugins_tx.borrow()),
        });
        let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state.clone(), shutdown_rx.clone()));
        let applier = |current: Config| crate::reload::Applier {
            current,
            plugins: plugins_tx.clone(),
            admin: admin_state.clone(),
            metrics: metrics.clone(),
            dataplane: dataplane.clone(),
            checked: Default::default(),
        };
        let control_task = match spec.control {
            Control::None => None,
            Control::File(path, current) => {
                let reloader = crate::reload::Reloader {
                    path,
                    applier: applier(current),
                };
                Some(tokio::spawn(reloader.run(shutdown_rx.clone())))
            }
            Control::Kubernetes(mode, base) => {
                let controller = kubernetes_controller(&mode, base.clone()).await?;
                Some(tokio::spawn(
                    controller.run(applier(base), shutdown_rx.clone()),
                ))
            }
        };
        admin_state.ready.store(true, Ordering::Release);
        tracing::info!(admin = %spec.admin, "wisp is ready");

        let signal_name = wait_for_shutdown_signal().await?;
        tracing::info!(signal = signal_name, drain_timeout = ?spec.drain_timeout, "shutting down: no new connections, draining in-flight ones");
        admin_state.ready.store(false, Ordering::Release);
        let _ = shutdown_tx.send(true);
        let _ = singletons.await;
        let _ = admin_task.await;
        if let Some(task) = control_task {
            // It holds the dataplane; it ends on the shutdown signal.
            let _ = task.await;
        }
        tokio::task::spawn_blocking(move || workers.join()).await?;
        if let Some(dataplane) = dataplane {
            // The last references: dropping the dataplane detaches the programs.
            drop(dataplane_cell);
            drop(admin_state);
            match Arc::try_unwrap(dataplane) {
                Ok(dataplane) => drop(dataplane.into_inner()),
                Err(_) => tracing::warn!(
                    "eBPF programs still referenced at exit; the kernel detaches them when the process ends"
                ),
            }
            tracing::info!("stopped; everything wisp attached is detached");
        } else {
            tracing::info!("stopped");
        }
        Ok(())
    }))
}

/// The client (in-cluster, or KUBECONFIG) and the resolvers of this build.
async fn kubernetes_controller(
    mode: &KubernetesMode,
    base: Config,
) -> anyhow::Result<crate::kube::controller::Controller> {
    let client_config = kube::Config::infer()
        .await
        .map_err(|e| crate::kube::KubeError::ClientConfig(e.to_string()))?;
    let client = kube::Client::try_from(client_config).map_err(crate::kube::KubeError::Api)?;
    let settings = base.kubernetes.clone();
    let netns: Arc<dyn crate::kube::PodNetnsResolver> = match &settings.netns_dir {
        Some(dir) => Arc::new(crate::kube::NetnsDirResolver { dir: dir.clone() }),
        // kubelet's cgroup layout on the host's cgroup mount.
        None => Arc::new(crate::kube::resolvers::KubeletPodResolver(
            crate::pod_resolver::PodResolver::new(
                settings
                    .cgroup_root
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup")),
                settings.proc_root.clone(),
            ),
        )),
    };
    let modules = Arc::new(ModuleFetcher::new(&base.modules)?);
    tracing::info!(node = %mode.node_name, "Kubernetes mode");
    Ok(crate::kube::controller::Controller {
        client,
        node: mode.node_name.clone(),
        base,
        settings,
        modules,
        netns,
    })
}

async fn wait_for_shutdown_signal() -> anyhow::Result<&'static str> {
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    Ok(tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    })
}

/// Failure policy names as the CLI takes them.
pub fn parse_failure_policy(text: &str) -> Result<FailurePolicy, String> {
    match text {
        "FAIL_CLOSED" | "fail-closed" => Ok(FailurePolicy::FailClosed),
        "FAIL_OPEN" | "fail-open" => Ok(FailurePolicy::FailOpen),
        "FAIL_RELOAD" | "fail-reload" => Ok(FailurePolicy::FailReload),
        other => Err(format!(
            "{other:?}: expected FAIL_CLOSED, FAIL_OPEN or FAIL_RELOAD"
        )),
    }
}
