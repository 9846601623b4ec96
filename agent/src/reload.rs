//! Hot reload of `wisp run`'s config file, on SIGHUP or when the file
//! changes: the new file is validated, its plugins compiled and instantiated
//! once on a canary, and only then handed to the workers, which swap their
//! filter chains atomically — requests in flight finish on the old chain.
//! A bad file changes nothing and is reported in the log and on `/metrics`.
//!
//! What a reload applies: the plugin chain (modules, configuration, failure
//! policy, order), the enrolled workloads, the L4 policy and the balanced
//! services. Listener addresses, workers, the admin address, the eBPF
//! settings and inbound interception need a restart; a reload that changes
//! them says so. The Kubernetes controller applies through the same
//! [`Applier`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::admin::AdminState;
use crate::app::{compile_local_plugin, load_plugins, plugin_source, plugin_sources};
use crate::config::Config;
use crate::metrics::{Metrics, ReloadLabels};
use crate::module_fetch::ModuleFetcher;
use crate::plugins::ConfiguredPlugin;
use crate::worker::{SharedDataplane, build_chains};

/// How often the config file's modification time is checked.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Puts a new config in effect: the one path a file reload and the
/// Kubernetes controller share. Plugins are compiled and instantiated once
/// on a canary first; then the kernel side (workloads, policy, services) is
/// updated and the workers swap their filter chains atomically.
pub struct Applier {
    /// The config in effect.
    pub current: Config,
    pub plugins: watch::Sender<Arc<Vec<ConfiguredPlugin>>>,
    pub admin: Arc<AdminState>,
    pub metrics: Arc<Metrics>,
    /// `None` in quick mode.
    pub dataplane: Option<SharedDataplane>,
    /// Plugins the Kubernetes controller already compiled and checked, by
    /// their `plugins[]` entry (the module path names its digest there), so
    /// applying them does not compile them again.
    pub checked: std::collections::HashMap<String, ConfiguredPlugin>,
}

/// The cache key of a `plugins[]` entry.
fn plugin_key(spec: &crate::config::PluginSpec) -> String {
    serde_json::to_string(spec).unwrap_or_default()
}

impl Applier {
    /// Applies `config`, counting the result on `/metrics`; on an error the
    /// previous config stays in effect. Returns the number of plugins.
    pub fn apply(&mut self, config: Config) -> anyhow::Result<usize> {
        self.apply_loaded(config, None)
    }

    /// [`Applier::apply`] with the plugins already fetched and compiled
    /// (`plugins`, in `config.plugins` order), as a file reload does.
    pub fn apply_loaded(
        &mut self,
        config: Config,
        plugins: Option<Vec<ConfiguredPlugin>>,
    ) -> anyhow::Result<usize> {
        let result = self.try_apply(config, plugins);
        self.count(result.is_ok());
        result
    }

    /// Counts one applied or rejected config on `/metrics`.
    pub fn count(&self, applied: bool) {
        let label = if applied { "applied" } else { "rejected" };
        self.metrics
            .config_reloads
            .get_or_create(&ReloadLabels {
                result: label.into(),
            })
            .inc();
    }

    fn try_apply(
        &mut self,
        config: Config,
        loaded: Option<Vec<ConfiguredPlugin>>,
    ) -> anyhow::Result<usize> {
        let plugins = match loaded {
            Some(plugins) => plugins,
            None => config
                .plugins
                .iter()
                .enumerate()
                .map(|(i, spec)| match self.checked.get(&plugin_key(spec)) {
                    Some(plugin) => Ok(plugin.clone()),
                    None => compile_local_plugin(&plugin_source(config.source.as_deref(), i, spec)),
                })
                .collect::<anyhow::Result<Vec<ConfiguredPlugin>>>()?,
        };
        let keep: std::collections::HashSet<String> =
            config.plugins.iter().map(plugin_key).collect();
        self.checked.retain(|key, _| keep.contains(key));
        // The canary: if these plugins cannot start here, they would not
        // start on any worker either.
        build_chains(&plugins, Default::default())
            .and_then(|_| crate::singletons::canary(&plugins))
            .map_err(|e| anyhow::anyhow!("canary instance failed: {e}"))?;
        for field in self.current.restart_only_changes(&config) {
            tracing::warn!(field, "changed, but applies only after a restart");
        }
        let workload_names =
            |c: &Config| -> Vec<String> { c.workloads.iter().map(|w| w.name.clone()).collect() };
        if config.inbound.enabled && workload_names(&self.current) != workload_names(&config) {
            tracing::warn!(
                "inbound interception covers the workloads enrolled at start; restart to intercept the new set"
            );
        }
        if let Some(dataplane) = &self.dataplane {
            let mut dataplane = dataplane.write().unwrap_or_else(|e| e.into_inner());
            let failures = dataplane.update(&config)?;
            for (workload, error) in failures {
                tracing::error!(workload, %error, "workload not enrolled");
            }
        }
        let count = plugins.len();
        self.plugins.send_replace(Arc::new(plugins));
        if let Ok(mut dump) = self.admin.config_dump.write() {
            *dump = serde_json::to_value(&config).unwrap_or_default();
        }
        self.current = config;
        Ok(count)
    }
}

/// The Kubernetes controller's view of the applier.
impl crate::kube::controller::ConfigSink for Applier {
    fn check_plugin(&mut self, plugin: &crate::config::PluginSpec) -> Result<(), String> {
        let compiled =
            compile_local_plugin(&plugin_source(None, 0, plugin)).map_err(|e| format!("{e:#}"))?;
        build_chains(std::slice::from_ref(&compiled), Default::default())
            .and_then(|_| crate::singletons::canary(std::slice::from_ref(&compiled)))
            .map_err(|e| format!("canary instance failed: {e}"))?;
        self.checked.insert(plugin_key(plugin), compiled);
        Ok(())
    }

    fn apply(&mut self, config: Config) -> Result<(), String> {
        if let Err(error) = config.validate(std::path::Path::new("<kubernetes>")) {
            self.count(false);
            return Err(error.to_string());
        }
        Applier::apply(self, config)
            .map(drop)
            .map_err(|e| format!("{e:#}"))
    }
}

/// Reloads the config file on SIGHUP or when it changes.
pub struct Reloader {
    pub path: PathBuf,
    pub applier: Applier,
}

impl Reloader {
    /// Watches for SIGHUP and file changes until shutdown.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => hangup,
            Err(error) => {
                tracing::error!(%error, "cannot install the SIGHUP handler; reload on file change only");
                return;
            }
        };
        let mut last_modified = modified(&self.path);
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        loop {
            let trigger = tokio::select! {
                _ = hangup.recv() => "SIGHUP",
                _ = poll.tick() => {
                    let now = modified(&self.path);
                    if now == last_modified {
                        continue;
                    }
                    last_modified = now;
                    "file change"
                }
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            self.reload(trigger).await;
        }
    }

    async fn reload(&mut self, trigger: &'static str) {
        let result = match self.load().await {
            Ok((config, plugins)) => self.applier.apply_loaded(config, Some(plugins)),
            Err(error) => {
                self.applier.count(false);
                Err(error)
            }
        };
        match result {
            Ok(plugins) => {
                tracing::info!(trigger, path = %self.path.display(), plugins, "configuration reloaded")
            }
            Err(error) => tracing::error!(
                trigger,
                path = %self.path.display(),
                "configuration NOT reloaded, the previous one stays in effect: {error:#}"
            ),
        }
    }
}

impl Reloader {
    /// Reads the file and fetches and compiles its plugins. A module that
    /// cannot be fetched (server down, wrong sha256) fails the whole reload:
    /// the previous chain stays, and the log says why.
    async fn load(&self) -> anyhow::Result<(Config, Vec<ConfiguredPlugin>)> {
        let config = Config::load(&self.path)?;
        let fetcher = ModuleFetcher::new(&config.modules)?;
        let plugins = load_plugins(&fetcher, &plugin_sources(&config)).await?;
        Ok((config, plugins))
    }
}

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}
