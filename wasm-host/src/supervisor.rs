//! [`Supervisor`]: one worker's instance of one plugin, with the failure
//! policy applied — Envoy's FAIL_CLOSED / FAIL_OPEN / FAIL_RELOAD.
//!
//! As in Envoy (`PluginConfig::maybeReloadHandleIfNeeded`), a failed instance
//! is dropped (its memory can no longer be trusted). With FAIL_CLOSED and
//! FAIL_OPEN it is not replaced: every later request gets a 503 or passes
//! through, until the embedder installs a new configuration. With FAIL_RELOAD
//! a new instance is created on the first request after a jittered,
//! exponentially growing backoff; requests during the backoff get a 503. A
//! crash loop (too many failures in a window) stops reloading for good.
//! Everything is counted in [`PluginCounters`](crate::PluginCounters).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::embedder::Embedder;
use crate::error::Error;
use crate::instance::PluginInstance;
use crate::plugin::{Plugin, PluginCounters};

/// FAIL_RELOAD settings (Envoy's `ReloadConfig`, plus the crash-loop limit
/// Envoy lacks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReloadConfig {
    /// Backoff after the first failure (Envoy's default: 1 s); doubles per
    /// consecutive failure.
    pub base_interval: Duration,
    /// The backoff never grows past this.
    pub max_interval: Duration,
    /// This many failures within `crash_loop_window` stop reloading.
    pub crash_loop_limit: u32,
    pub crash_loop_window: Duration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            base_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(60),
            crash_loop_limit: 5,
            crash_loop_window: Duration::from_secs(300),
        }
    }
}

impl ReloadConfig {
    /// The un-jittered backoff after `consecutive` failures (1 = the first).
    pub fn backoff(&self, consecutive: u32) -> Duration {
        let factor = 1u32
            .checked_shl(consecutive.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base_interval
            .saturating_mul(factor)
            .min(self.max_interval)
    }

    /// The backoff with jitter: somewhere in `[backoff, 1.5 × backoff)`, so
    /// workers that failed together do not reload together.
    pub fn jittered_backoff(&self, consecutive: u32) -> Duration {
        let backoff = self.backoff(consecutive);
        let jitter_ms = u64::try_from(backoff.as_millis() / 2).unwrap_or(u64::MAX);
        let jitter = if jitter_ms == 0 {
            0
        } else {
            rand::rng().random_range(0..jitter_ms)
        };
        backoff + Duration::from_millis(jitter)
    }
}

/// What to do with a request the plugin cannot handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureAction {
    /// Answer 503 with details `wasm_fail_stream` (FAIL_CLOSED, FAIL_RELOAD).
    Reject,
    /// Skip the plugin (FAIL_OPEN).
    PassThrough,
}

/// One worker's instance of a plugin under its failure policy.
pub struct Supervisor {
    plugin: Plugin,
    embedder: Embedder,
    instance: Option<PluginInstance>,
    consecutive_failures: u32,
    recent_failures: VecDeque<Instant>,
    next_reload: Option<Instant>,
    stopped: bool,
    /// How many instances were discarded so far.
    generation: u64,
}

impl Supervisor {
    /// Starts the first instance; a plugin that cannot start is an error
    /// (found at configuration time, not on the first request).
    pub fn new(plugin: Plugin, embedder: Embedder) -> Result<Supervisor, Error> {
        let instance = plugin.instantiate_with(embedder.clone())?;
        Ok(Supervisor {
            plugin,
            embedder,
            instance: Some(instance),
            consecutive_failures: 0,
            recent_failures: VecDeque::new(),
            next_reload: None,
            stopped: false,
            generation: 0,
        })
    }

    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    fn counters(&self) -> &PluginCounters {
        self.plugin.counters()
    }

    /// The live instance, reloading it first if FAIL_RELOAD allows it at
    /// `now`; `None` means "apply [`Supervisor::failure_action`]".
    pub fn instance(&mut self, now: Instant) -> Option<&mut PluginInstance> {
        if self.instance.is_none() {
            self.reload_if_allowed(now);
        }
        self.instance.as_mut()
    }

    /// [`Supervisor::instance`] at the current time; the clock is read only
    /// when there is no live instance (the request path calls this often).
    pub fn current_instance(&mut self) -> Option<&mut PluginInstance> {
        if self.instance.is_none() {
            self.reload_if_allowed(Instant::now());
        }
        self.instance.as_mut()
    }

    fn reload_if_allowed(&mut self, now: Instant) {
        if self.may_reload(now) {
            match self.plugin.instantiate_with(self.embedder.clone()) {
                Ok(instance) => {
                    PluginCounters::bump(&self.counters().reloads);
                    tracing::info!(plugin = self.plugin.name(), "plugin instance reloaded");
                    self.instance = Some(instance);
                    self.next_reload = None;
                }
                Err(error) => {
                    PluginCounters::bump(&self.counters().reload_failures);
                    tracing::error!(plugin = self.plugin.name(), %error, "plugin reload failed");
                    self.record_failure(now);
                }
            }
        }
    }

    fn may_reload(&mut self, now: Instant) -> bool {
        if !self.plugin.config().failure_policy.reloads() || self.stopped {
            return false;
        }
        match self.next_reload {
            Some(at) if now < at => {
                PluginCounters::bump(&self.counters().reload_backoffs);
                false
            }
            _ => true,
        }
    }

    /// Reports that a call into the instance failed: drops a runtime-failed
    /// instance, schedules the reload and says what to do with the request.
    /// Errors that leave the instance usable (e.g. an unknown context id) only
    /// get the failure action.
    pub fn on_failure(&mut self, error: &Error, now: Instant) -> FailureAction {
        tracing::error!(plugin = self.plugin.name(), %error, "plugin failed");
        if error.is_runtime_failure()
            || self
                .instance
                .as_ref()
                .is_some_and(PluginInstance::is_failed)
        {
            self.instance = None;
            self.generation += 1;
            self.record_failure(now);
        }
        self.failure_action()
    }

    fn record_failure(&mut self, now: Instant) {
        let reload = self.plugin.config().reload.clone();
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.recent_failures.push_back(now);
        while self
            .recent_failures
            .front()
            .is_some_and(|&t| now.duration_since(t) > reload.crash_loop_window)
        {
            self.recent_failures.pop_front();
        }
        if !self.plugin.config().failure_policy.reloads() || self.stopped {
            return;
        }
        if self.recent_failures.len() >= reload.crash_loop_limit.max(1) as usize {
            self.stopped = true;
            PluginCounters::bump(&self.counters().crash_loop_stops);
            tracing::error!(
                plugin = self.plugin.name(),
                failures = self.recent_failures.len(),
                "plugin is crash-looping; no more reloads until it is reconfigured"
            );
            return;
        }
        self.next_reload = Some(now + reload.jittered_backoff(self.consecutive_failures));
    }

    /// What requests get while there is no instance.
    pub fn failure_action(&self) -> FailureAction {
        if self.plugin.config().failure_policy.rejects() {
            FailureAction::Reject
        } else {
            FailureAction::PassThrough
        }
    }

    /// Tells the supervisor a request went through the plugin fine: the
    /// backoff starts from the base interval again after the next failure.
    pub fn on_success(&mut self) {
        self.consecutive_failures = 0;
    }

    /// Whether the crash-loop limit stopped reloading.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Which instance is current: bumped whenever the instance is discarded,
    /// so whatever an older instance started (a callout) never reaches a
    /// newer one, whose context ids and tokens mean something else.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// When FAIL_RELOAD will next try to reload, if it is waiting.
    pub fn next_reload(&self) -> Option<Instant> {
        self.next_reload
            .filter(|_| self.instance.is_none() && !self.stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitter_stays_in_range() {
        let config = ReloadConfig {
            base_interval: Duration::from_millis(100),
            max_interval: Duration::from_millis(500),
            ..Default::default()
        };
        assert_eq!(config.backoff(1), Duration::from_millis(100));
        assert_eq!(config.backoff(2), Duration::from_millis(200));
        assert_eq!(config.backoff(3), Duration::from_millis(400));
        assert_eq!(config.backoff(4), Duration::from_millis(500));
        assert_eq!(config.backoff(100), Duration::from_millis(500));
        for n in 1..6 {
            let jittered = config.jittered_backoff(n);
            let base = config.backoff(n);
            assert!(jittered >= base && jittered < base + base / 2 + Duration::from_millis(1));
        }
    }
}
