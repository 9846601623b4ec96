//! Singleton plugins (`kind: singleton`): one instance for the whole agent,
//! on the main thread, as Envoy runs its singleton Wasm services
//! (`envoy.bootstrap.wasm` with `singleton: true`).
//!
//! A singleton sees no traffic: it has only its root context. It starts
//! (`on_vm_start`, `on_configure`), gets `on_tick` every period it sets and
//! `on_queue_ready` when its shared queues get items, may call the upstreams
//! in `clusters:` (`http_call`, gRPC), and defines metrics. It talks to the
//! per-worker filters through the process-wide shared data and queues of its
//! `vm_id` — the usual job is fetching something periodically and leaving it
//! in shared data for every worker's filters to read.
//!
//! Failures get the plugin's policy in the only sense that applies: the
//! failed instance is discarded, and FAIL_RELOAD re-creates it (with
//! backoff) on its next tick. A configuration reload swaps in new
//! singletons with the other plugins; the old ones stop.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use tokio::sync::watch;
use wisp_wasm_host::{Embedder, Supervisor};

use crate::callout::{CalloutQueue, ClusterClients};
use crate::callout_runner::{self, Answer, CalloutOwner};
use crate::filter_chain::{ChainEnv, SupervisedPlugin};
use crate::metrics::{Metrics, PluginLabels};
use crate::plugin_timers::{SlotTimers, TimedChain};
use crate::plugins::{ConfiguredPlugin, PluginKind};

struct Slot {
    supervisor: Supervisor,
    callouts: Arc<CalloutQueue>,
    timers: SlotTimers,
}

/// The agent's singleton plugins, each in its own instance.
pub struct Singletons {
    slots: Vec<Slot>,
    metrics: Arc<Metrics>,
    cluster_client: Option<Rc<ClusterClients>>,
    this: Weak<RefCell<Singletons>>,
}

impl Singletons {
    /// Instantiates the singleton plugins among `plugins` (running their
    /// `on_vm_start` and `on_configure`) and starts their timers on this
    /// thread's `LocalSet`; they run until the returned value is dropped.
    pub fn start(
        plugins: &[ConfiguredPlugin],
        env: &ChainEnv,
    ) -> Result<Rc<RefCell<Singletons>>, wisp_wasm_host::Error> {
        let slots = crate::plugins::of_kind(plugins, PluginKind::Singleton)
            .iter()
            .map(|configured| {
                let SupervisedPlugin {
                    supervisor,
                    callouts,
                    timers,
                } = env.supervise(&configured.plugin)?;
                Ok(Slot {
                    supervisor,
                    callouts,
                    timers,
                })
            })
            .collect::<Result<Vec<_>, wisp_wasm_host::Error>>()?;
        let metrics = env.metrics_or_detached();
        let singletons = Rc::new(RefCell::new(Singletons {
            slots,
            metrics,
            cluster_client: env.cluster_client.clone(),
            this: Weak::new(),
        }));
        singletons.borrow_mut().this = Rc::downgrade(&singletons);
        // Callouts queued by on_vm_start / on_configure go out now.
        for index in 0..singletons.borrow().slots.len() {
            singletons.borrow().start_callouts(index);
        }
        crate::plugin_timers::start(&singletons);
        Ok(singletons)
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// What follows every call into slot `index`: a new tick period, and the
    /// callouts it queued.
    fn after_call(&mut self, index: usize, result: Result<(), wisp_wasm_host::Error>) {
        let slot = &mut self.slots[index];
        match result {
            Ok(()) => slot.supervisor.on_success(),
            Err(error) => {
                let labels = PluginLabels {
                    plugin: slot.supervisor.plugin().name().to_owned(),
                };
                self.metrics.plugin_failures.get_or_create(&labels).inc();
                callout_runner::fail(&mut slot.supervisor, &slot.callouts, &error);
            }
        }
        // Without an instance (discarded, waiting to reload) the period
        // stays, so the next tick tries FAIL_RELOAD's reload.
        if let Some(instance) = slot.supervisor.current_instance() {
            let period = instance.tick_period();
            slot.timers.set_tick_period(period);
        }
        self.start_callouts(index);
    }

    fn start_callouts(&self, index: usize) {
        let slot = &self.slots[index];
        callout_runner::start_queued(
            &self.this,
            index,
            &slot.supervisor,
            &slot.callouts,
            self.cluster_client.as_ref(),
        );
    }
}

impl TimedChain for Singletons {
    fn slot_count(&self) -> usize {
        self.slots.len()
    }

    fn timers(&self, index: usize) -> &SlotTimers {
        &self.slots[index].timers
    }

    fn tick(&mut self, index: usize) {
        let Some(instance) = self.slots[index].supervisor.current_instance() else {
            return;
        };
        let result = instance.on_tick();
        self.after_call(index, result);
    }

    fn queue_ready(&mut self, index: usize) {
        let Some(instance) = self.slots[index].supervisor.current_instance() else {
            return;
        };
        if !instance.has_pending_queue_ready() {
            return;
        }
        let result = instance.deliver_queue_ready().map(drop);
        self.after_call(index, result);
    }
}

impl CalloutOwner for Singletons {
    fn callout_queue(&self, index: usize) -> Option<&CalloutQueue> {
        self.slots.get(index).map(|slot| &*slot.callouts)
    }

    fn instance_generation(&self, index: usize) -> Option<u64> {
        self.slots
            .get(index)
            .map(|slot| slot.supervisor.generation())
    }

    /// A singleton's calls all come from its root context: no stream.
    fn deliver(&mut self, index: usize, token: u32, _origin: u32, answer: Answer) {
        let Some(instance) = self.slots[index].supervisor.current_instance() else {
            return;
        };
        let result = answer.deliver_to(instance, token, None);
        self.after_call(index, result);
    }
}

/// Instantiates each singleton among `plugins` once and drops it: the
/// reload canary, run before new plugins are handed out.
pub fn canary(plugins: &[ConfiguredPlugin]) -> Result<(), wisp_wasm_host::Error> {
    for configured in crate::plugins::of_kind(plugins, PluginKind::Singleton) {
        Supervisor::new(configured.plugin.clone(), Embedder::default())?;
    }
    Ok(())
}

/// Keeps `first` (started from the current plugins) running on this
/// thread until `shutdown`, swapping in new singletons when the plugins
/// change (a config reload). The main thread validated new plugins on a
/// canary instance first, so a failure here is rare; the old singletons then
/// keep running.
pub async fn run(
    first: Rc<RefCell<Singletons>>,
    mut plugins: watch::Receiver<Arc<Vec<ConfiguredPlugin>>>,
    env: ChainEnv,
    mut shutdown: watch::Receiver<bool>,
) {
    if !first.borrow().is_empty() {
        tracing::info!(
            singletons = first.borrow().len(),
            "singleton plugins running"
        );
    }
    let mut current = first;
    plugins.borrow_and_update();
    loop {
        tokio::select! {
            changed = plugins.changed() => if changed.is_err() { return },
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let configured = plugins.borrow_and_update().clone();
        match Singletons::start(&configured, &env) {
            Ok(singletons) => {
                let (before, now) = (current.borrow().len(), singletons.borrow().len());
                if before > 0 || now > 0 {
                    tracing::info!(singletons = now, "new singleton plugins running");
                }
                // Dropping the old ones ends their timers and callouts.
                current = singletons;
            }
            Err(error) => {
                tracing::error!(%error, "cannot instantiate the new singleton plugins; keeping the old ones")
            }
        }
    }
}
