//! Ticks and shared-queue wakeups of a worker's plugin instances, for the
//! HTTP and the network filter chain alike. Per plugin, one task calls
//! `on_tick` every period the plugin set (`proxy_set_tick_period_milliseconds`)
//! and another delivers `on_queue_ready` when one of its shared queues got
//! items, from any worker. Both run on the worker that owns the instance and
//! end when their chain is dropped (a reload swapped in a new one).

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

/// How often the loops check that their chain still exists while they have
/// nothing else to wait for.
const LIVENESS_CHECK: Duration = Duration::from_secs(1);

/// One plugin's tick period and wakeups.
pub struct SlotTimers {
    tick_period: Option<Duration>,
    /// Woken when the tick period changed.
    tick_changed: Rc<Notify>,
    /// Woken (from any thread) when a shared queue of this plugin got items.
    queue_ready: Arc<Notify>,
}

impl Default for SlotTimers {
    fn default() -> Self {
        SlotTimers {
            tick_period: None,
            tick_changed: Rc::new(Notify::new()),
            queue_ready: Arc::new(Notify::new()),
        }
    }
}

impl SlotTimers {
    /// What the plugin's [`wisp_wasm_host::Embedder`] calls when one of its
    /// queues got items.
    pub fn queue_waker(&self) -> wisp_wasm_host::QueueWaker {
        let ready = self.queue_ready.clone();
        Arc::new(move || ready.notify_one())
    }

    /// Notes the tick period the instance asks for now (after every call
    /// into it); the tick loop picks a change up at once.
    pub fn set_tick_period(&mut self, period: Option<Duration>) {
        if period != self.tick_period {
            self.tick_period = period;
            self.tick_changed.notify_one();
        }
    }
}

/// A chain of plugin slots whose timers [`start`] runs.
pub trait TimedChain: 'static {
    fn slot_count(&self) -> usize;
    fn timers(&self, index: usize) -> &SlotTimers;
    /// Calls `on_tick` on slot `index`.
    fn tick(&mut self, index: usize);
    /// Delivers `on_queue_ready` to slot `index`, if it has items waiting.
    fn queue_ready(&mut self, index: usize);
}

/// Starts the tick and queue loops of every slot of `chain` on this worker.
pub fn start<C: TimedChain>(chain: &Rc<RefCell<C>>) {
    let count = chain.borrow().slot_count();
    for index in 0..count {
        tokio::task::spawn_local(tick_loop(Rc::downgrade(chain), index));
        tokio::task::spawn_local(queue_loop(Rc::downgrade(chain), index));
    }
}

async fn tick_loop<C: TimedChain>(chain: Weak<RefCell<C>>, index: usize) {
    loop {
        let (period, changed) = {
            let Some(chain) = chain.upgrade() else { return };
            let chain = chain.borrow();
            let timers = chain.timers(index);
            (timers.tick_period, timers.tick_changed.clone())
        };
        let due = match period {
            Some(period) => tokio::select! {
                _ = tokio::time::sleep(period) => true,
                _ = changed.notified() => false,
            },
            None => {
                tokio::select! {
                    _ = changed.notified() => {}
                    _ = tokio::time::sleep(LIVENESS_CHECK) => {}
                }
                false
            }
        };
        if due {
            let Some(chain) = chain.upgrade() else { return };
            // Busy means a connection is inside the chain right now; the
            // tick comes one period later.
            if let Ok(mut chain) = chain.try_borrow_mut() {
                chain.tick(index);
            }
        }
    }
}

async fn queue_loop<C: TimedChain>(chain: Weak<RefCell<C>>, index: usize) {
    loop {
        let ready = {
            let Some(chain) = chain.upgrade() else { return };
            let chain = chain.borrow();
            chain.timers(index).queue_ready.clone()
        };
        tokio::select! {
            _ = ready.notified() => {}
            _ = tokio::time::sleep(LIVENESS_CHECK) => {}
        }
        let Some(chain) = chain.upgrade() else { return };
        if let Ok(mut chain) = chain.try_borrow_mut() {
            chain.queue_ready(index);
        }
    }
}
