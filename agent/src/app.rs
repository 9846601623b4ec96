//! Start-up and shutdown of `wisp run`: plugins, workers, kernel programs,
//! admin listener — and, on SIGINT or SIGTERM, the reverse.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};
use wisp_wasm_host::{Plugin, PluginConfig};

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::ebpf::Dataplane;
use crate::metrics::{KernelCounters, Metrics};
use crate::worker::{WorkerContext, Workers};

/// Compiles the configured plugins (once; workers instantiate them).
pub fn compile_plugins(config: &Config) -> anyhow::Result<Vec<Plugin>> {
    config
        .plugins
        .iter()
        .map(|spec| {
            let path = &spec.module.value;
            let wasm = std::fs::read(path)
                .with_context(|| format!("reading plugin module {}", path.display()))?;
            // The host also accepts the text format (for its own tests); a
            // deployed plugin must be a binary module.
            anyhow::ensure!(
                wasm.starts_with(b"\0asm"),
                "plugin {:?}: {} is not a WebAssembly binary module (no \\0asm header)",
                spec.name,
                path.display()
            );
            let plugin_config = PluginConfig {
                name: spec.name.clone(),
                root_id: spec.root_id.clone(),
                vm_id: spec.vm_id.clone(),
                configuration: spec.configuration.clone().into_bytes(),
                vm_configuration: spec.vm_configuration.clone().into_bytes(),
                failure_policy: spec.failure_policy,
                ..Default::default()
            };
            Plugin::compile(plugin_config, &wasm)
                .with_context(|| format!("plugin {:?} ({})", spec.name, path.display()))
        })
        .collect()
}

/// Runs the agent until SIGINT or SIGTERM.
pub fn run(config: Config) -> anyhow::Result<()> {
    let plugins = Arc::new(compile_plugins(&config)?);
    let redirect = config
        .redirect_target()
        .map_err(|message| anyhow::anyhow!("outbound.redirect_address: {message}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the main runtime")?;
    runtime.block_on(async move {
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        // Listen before steering anything, so a steered connect never meets a
        // closed port.
        let dataplane_cell: crate::worker::DataplaneCell = Default::default();
        let workers = Workers::start(
            config.worker_count(),
            WorkerContext {
                listen: config.outbound.listen.value,
                plugins: plugins.clone(),
                dataplane: dataplane_cell.clone(),
                metrics: metrics.clone(),
                shutdown: shutdown_rx.clone(),
            },
        )?;
        tracing::info!(
            listen = %config.outbound.listen.value,
            workers = config.worker_count(),
            plugins = plugins.len(),
            "outbound listener ready"
        );

        let mut dataplane = Dataplane::start(config.ebpf.cgroup_root.as_deref(), redirect)?;
        for workload in &config.workloads {
            dataplane
                .enroll(&workload.name, &workload.netns.value)
                .with_context(|| format!("workload {:?}", workload.name))?;
        }
        let dataplane = Arc::new(dataplane);
        let _ = dataplane_cell.set(dataplane.clone());
        registry.register_collector(Box::new(KernelCounters(dataplane.clone())));

        let admin_listener = admin::bind(config.admin.listen.value).await?;
        let admin_state = Arc::new(AdminState {
            registry,
            ready: AtomicBool::new(false),
        });
        let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state.clone(), shutdown_rx));
        admin_state.ready.store(true, Ordering::Release);
        tracing::info!(admin = %config.admin.listen.value, "wisp is ready");

        let signal_name = wait_for_shutdown_signal().await?;
        tracing::info!(signal = signal_name, "shutting down");
        admin_state.ready.store(false, Ordering::Release);
        let _ = shutdown_tx.send(true);
        let _ = admin_task.await;
        tokio::task::spawn_blocking(move || workers.join()).await?;
        // The last references: dropping the dataplane detaches the programs.
        drop(dataplane_cell);
        drop(admin_state);
        match Arc::try_unwrap(dataplane) {
            Ok(dataplane) => drop(dataplane),
            Err(_) => tracing::warn!("eBPF programs still referenced at exit; the kernel detaches them when the process ends"),
        }
        tracing::info!("stopped; everything wisp attached is detached");
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
