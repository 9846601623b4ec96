//! Start-up and shutdown. `wisp run` (node agent: kernel steering plus
//! listeners from the config file) and `wisp proxy` (quick mode: one
//! listener, no eBPF) share one path: compile plugins, start workers, then
//! whatever steers traffic, the admin listener, and on SIGINT/SIGTERM the
//! reverse with a graceful drain.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};
use wisp_wasm_host::{FailurePolicy, Plugin, PluginConfig};

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::ebpf::Dataplane;
use crate::listener::{Destination, ListenerSpec, Protocol};
use crate::metrics::{KernelCounters, Metrics};
use crate::worker::{DataplaneCell, WorkerContext, Workers};

/// A plugin to load: where its module is and how to configure it.
pub struct PluginSource {
    pub module: PathBuf,
    pub config: PluginConfig,
}

/// Compiles plugins once; every worker instantiates them.
pub fn compile_plugins(sources: &[PluginSource]) -> anyhow::Result<Vec<Plugin>> {
    sources
        .iter()
        .map(|source| {
            let path = &source.module;
            let name = &source.config.name;
            let wasm = std::fs::read(path)
                .with_context(|| format!("reading plugin module {}", path.display()))?;
            // The host also accepts the text format (for its own tests); a
            // deployed plugin must be a binary module.
            anyhow::ensure!(
                wasm.starts_with(b"\0asm"),
                "plugin {name:?}: {} is not a WebAssembly binary module (no \\0asm header)",
                path.display()
            );
            Plugin::compile(source.config.clone(), &wasm)
                .with_context(|| format!("plugin {name:?} ({})", path.display()))
        })
        .collect()
}

/// The plugins a config file names.
pub fn plugin_sources(config: &Config) -> Vec<PluginSource> {
    config
        .plugins
        .iter()
        .map(|spec| PluginSource {
            module: spec.module.value.clone(),
            config: PluginConfig {
                name: spec.name.clone(),
                root_id: spec.root_id.clone(),
                vm_id: spec.vm_id.clone(),
                configuration: spec.configuration.clone().into_bytes(),
                vm_configuration: spec.vm_configuration.clone().into_bytes(),
                failure_policy: spec.failure_policy,
                ..Default::default()
            },
        })
        .collect()
}

/// What one agent process serves.
struct ServeSpec {
    listeners: Vec<ListenerSpec>,
    plugins: Vec<Plugin>,
    workers: usize,
    admin: SocketAddr,
    drain_timeout: Duration,
    /// Served on `/config_dump`.
    config_dump: serde_json::Value,
    /// The config file to reload on SIGHUP or change, and what it said.
    reload: Option<(PathBuf, Config)>,
    /// Where to append the JSON-lines access log.
    access_log: Option<PathBuf>,
}

/// `wisp run`: the node agent, until SIGINT or SIGTERM; `config_path` is
/// reloaded on SIGHUP or when it changes.
pub fn run(config: Config, config_path: PathBuf) -> anyhow::Result<()> {
    let plugins = compile_plugins(&plugin_sources(&config))?;
    let redirect = config
        .redirect_target()
        .map_err(|message| anyhow::anyhow!("outbound.redirect_address: {message}"))?;
    let mut listeners = vec![ListenerSpec {
        name: "outbound".into(),
        addr: config.outbound.listen.value,
        destination: Destination::Steered,
        protocol: config.outbound.protocol,
        port_protocols: config.outbound.ports.clone(),
        // Steered traffic is the pods' own: TLS stays end to end.
        tls: None,
        upstream_tls: None,
    }];
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
        });
    }
    let spec = ServeSpec {
        listeners,
        plugins,
        workers: config.worker_count(),
        admin: config.admin.listen.value,
        drain_timeout: config.drain_timeout(),
        config_dump: serde_json::to_value(&config).unwrap_or_default(),
        reload: Some((config_path, config.clone())),
        access_log: config.access_log.clone(),
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
        let dataplane = Arc::new(dataplane);
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
}

pub fn proxy(quick: QuickMode) -> anyhow::Result<()> {
    let plugins = compile_plugins(&quick.plugins)?;
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
            "failure_policy": p.config.failure_policy,
        })).collect::<Vec<_>>(),
        "workers": quick.workers,
        "admin": quick.admin,
    });
    serve(
        ServeSpec {
            listeners: vec![listener],
            plugins,
            workers: quick.workers,
            admin: quick.admin,
            drain_timeout: quick.drain_timeout,
            config_dump,
            reload: None,
            access_log: quick.access_log,
        },
        |_| Ok(None),
    )
}

/// Runs `spec` until SIGINT or SIGTERM. `steer` starts whatever sends traffic
/// to the listeners (the kernel programs, for `wisp run`) once they listen.
fn serve(
    spec: ServeSpec,
    steer: impl FnOnce(&mut Registry) -> anyhow::Result<Option<Arc<Dataplane>>>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the main runtime")?;
    runtime.block_on(async move {
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        let plugin_count = spec.plugins.len();
        let (plugins_tx, plugins_rx) = tokio::sync::watch::channel(Arc::new(spec.plugins));
        registry.register_collector(Box::new(crate::metrics::PluginCounters(plugins_rx.clone())));
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
            },
        )?;
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
        if let Some((path, current)) = spec.reload {
            let reloader = crate::reload::Reloader {
                path,
                current,
                plugins: plugins_tx,
                admin: admin_state.clone(),
                metrics: metrics.clone(),
            };
            tokio::spawn(reloader.run(shutdown_rx.clone()));
        }
        admin_state.ready.store(true, Ordering::Release);
        tracing::info!(admin = %spec.admin, "wisp is ready");

        let signal_name = wait_for_shutdown_signal().await?;
        tracing::info!(signal = signal_name, drain_timeout = ?spec.drain_timeout, "shutting down: no new connections, draining in-flight ones");
        admin_state.ready.store(false, Ordering::Release);
        let _ = shutdown_tx.send(true);
        let _ = admin_task.await;
        tokio::task::spawn_blocking(move || workers.join()).await?;
        if let Some(dataplane) = dataplane {
            // The last references: dropping the dataplane detaches the programs.
            drop(dataplane_cell);
            drop(admin_state);
            match Arc::try_unwrap(dataplane) {
                Ok(dataplane) => drop(dataplane),
                Err(_) => tracing::warn!(
                    "eBPF programs still referenced at exit; the kernel detaches them when the process ends"
                ),
            }
            tracing::info!("stopped; everything wisp attached is detached");
        } else {
            tracing::info!("stopped");
        }
        Ok(())
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
