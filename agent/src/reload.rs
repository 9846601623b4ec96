//! Hot reload of `wisp run`'s config file, on SIGHUP or when the file
//! changes: the new file is validated, its plugins compiled and instantiated
//! once on a canary, and only then handed to the workers, which swap their
//! filter chains atomically — requests in flight finish on the old chain.
//! A bad file changes nothing and is reported in the log and on `/metrics`.
//!
//! What a reload applies: the plugin chain (modules, configuration, failure
//! policy, order). Listener addresses, workers, the admin address and the
//! kernel side need a restart; a reload that changes them says so.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::admin::AdminState;
use crate::app::{load_plugins, plugin_sources};
use crate::config::Config;
use crate::metrics::{Metrics, ReloadLabels};
use crate::module_fetch::ModuleFetcher;
use crate::plugins::ConfiguredPlugin;
use crate::worker::build_chains;

/// How often the config file's modification time is checked.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

pub struct Reloader {
    pub path: PathBuf,
    /// The config in effect.
    pub current: Config,
    pub plugins: watch::Sender<Arc<Vec<ConfiguredPlugin>>>,
    pub admin: Arc<AdminState>,
    pub metrics: Arc<Metrics>,
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
        let result = self.try_reload().await;
        let label = if result.is_ok() {
            "applied"
        } else {
            "rejected"
        };
        self.metrics
            .config_reloads
            .get_or_create(&ReloadLabels {
                result: label.into(),
            })
            .inc();
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

    async fn try_reload(&mut self) -> anyhow::Result<usize> {
        let config = Config::load(&self.path)?;
        // A module that cannot be fetched (server down, wrong sha256) fails
        // the whole reload: the previous chain stays, and the log says why.
        let fetcher = ModuleFetcher::new(&config.modules)?;
        let plugins = load_plugins(&fetcher, &plugin_sources(&config)).await?;
        // The canary: if these plugins cannot start here, they would not
        // start on any worker either.
        build_chains(&plugins, Default::default())
            .map_err(|e| anyhow::anyhow!("canary instance failed: {e}"))?;
        for field in self.current.restart_only_changes(&config) {
            tracing::warn!(
                field,
                "changed in the file, but applies only after a restart"
            );
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

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}
