//! One worker's Proxy-Wasm filter chain: its own instance of each plugin, run
//! in order on the request (headers, body chunks, trailers) and in reverse
//! order on the response, as Envoy's HTTP filter manager does.
//!
//! Each plugin runs under a [`Supervisor`] with its failure policy, as in
//! Envoy: a plugin that fails (a trap, a deadline, a host error) gives the
//! request its policy — FAIL_CLOSED and FAIL_RELOAD answer 503, FAIL_OPEN
//! skips the plugin — and its instance is thrown away, since a trapped
//! instance's memory can no longer be trusted. FAIL_RELOAD re-creates it
//! with jittered backoff until a crash-loop limit; the other policies keep
//! applying to later requests until the configuration is reloaded.
//!
//! **Pausing.** A plugin that stops a header or trailer phase without a
//! local response (or stops the last body chunk) pauses the stream at its
//! position; the request path waits on the stream's [`StreamState`] until
//! the plugin calls `proxy_continue_stream` (typically from an
//! `on_http_call_response` or `on_tick`), sends a local response, or closes
//! the stream. Every call into an instance is followed by
//! [`FilterChain::after_call`], which starts the callouts the plugin queued,
//! routes its continue/close requests to the streams they name, and tells
//! the tick loop about a new tick period.
//!
//! **Bodies.** Each plugin has its own buffer per direction: a chunk goes
//! through the plugins in order; one that returns Pause (Envoy's
//! StopIterationAndBuffer) keeps what it got and sees it again, with the
//! next chunk appended, on the next call; what it lets through goes on to
//! the next plugin. The request path enforces the buffer limit.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::sync::Arc;

use tokio::sync::Notify;
use wisp_wasm_host::abi::StreamType;
use wisp_wasm_host::{
    Action, Embedder, FailureAction, HttpStream, LocalResponse, Plugin, StreamRequestKind,
    Supervisor,
};

use crate::FastMap;
use crate::callout::{CalloutQueue, ClusterClients, Clusters};
use crate::callout_runner::{self, Answer, CalloutOwner};
use crate::metrics::{Metrics, PluginLabels};
use crate::plugin_metrics::PluginMetrics;
use crate::plugin_timers::SlotTimers;
use crate::plugins::{Facts, PluginMatch};

/// The response details Envoy gives a stream failed by a Wasm plugin.
pub const WASM_FAIL_DETAILS: &str = "wasm_fail_stream";

/// A worker's chain, shared by its requests and its background tasks.
pub type SharedChain = Rc<RefCell<FilterChain>>;

/// What a chain needs from its worker beyond the plugins.
#[derive(Clone, Default)]
pub struct ChainEnv {
    pub clusters: Clusters,
    /// The worker's pooled client for callouts (`None` for the reload
    /// canary, which never runs a request).
    pub cluster_client: Option<Rc<ClusterClients>>,
    pub plugin_metrics: Option<Arc<PluginMetrics>>,
    pub metrics: Option<Arc<Metrics>>,
}

/// One plugin's instance as a chain slot holds it: under its supervisor,
/// with its callout queue and timers wired in.
pub struct SupervisedPlugin {
    pub supervisor: Supervisor,
    pub callouts: Arc<CalloutQueue>,
    pub timers: SlotTimers,
}

impl ChainEnv {
    /// Starts `plugin`'s instance for a slot of one of this worker's chains
    /// (its `on_vm_start` and `on_configure` run here), noting the tick
    /// period it set.
    pub fn supervise(&self, plugin: &Plugin) -> Result<SupervisedPlugin, wisp_wasm_host::Error> {
        let callouts = CalloutQueue::new(self.clusters.clone());
        let mut timers = SlotTimers::default();
        let embedder = Embedder {
            callouts: Some(callouts.clone()),
            metrics: self.plugin_metrics.as_ref().map(|m| m.sink(plugin.name())),
            queue_waker: Some(timers.queue_waker()),
            ..Default::default()
        };
        let mut supervisor = Supervisor::new(plugin.clone(), embedder)?;
        timers.set_tick_period(supervisor.current_instance().and_then(|i| i.tick_period()));
        Ok(SupervisedPlugin {
            supervisor,
            callouts,
            timers,
        })
    }

    /// The worker's metrics, or a private set nobody exports (the reload
    /// canary and unit tests have no registry).
    pub fn metrics_or_detached(&self) -> Arc<Metrics> {
        self.metrics.clone().unwrap_or_else(|| {
            Arc::new(Metrics::new(
                &mut prometheus_client::registry::Registry::default(),
            ))
        })
    }
}

struct Slot {
    supervisor: Supervisor,
    callouts: Arc<CalloutQueue>,
    timers: SlotTimers,
    labels: PluginLabels,
    /// Requests that do not match skip the plugin (`plugins[].match`).
    matcher: Option<PluginMatch>,
}

pub struct FilterChain {
    slots: Vec<Slot>,
    /// The live streams by (slot, context id), for callout answers and
    /// `proxy_continue_stream` from other callbacks.
    streams: FastMap<(usize, u32), Rc<StreamState>>,
    env: ChainEnv,
    metrics: Arc<Metrics>,
    this: Weak<RefCell<FilterChain>>,
}

/// Which way through the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::Request => 0,
            Direction::Response => 1,
        }
    }
}

/// One request as the chain sees it: the maps and bodies lent to plugins,
/// the contexts it holds in each plugin, and how paused phases resume.
#[derive(Default)]
pub struct StreamState {
    pub stream: RefCell<HttpStream>,
    /// Per slot: the context id, if the plugin has a context for this stream.
    contexts: RefCell<Vec<Option<u32>>>,
    /// Per direction, per slot: body bytes the plugin holds back.
    buffers: [RefCell<Vec<Vec<u8>>>; 2],
    /// Per direction: the slot that asked to continue.
    resumed: [Cell<Option<usize>>; 2],
    closed: Cell<bool>,
    /// A plugin failed in an asynchronous callback: `Some(reply)` to send,
    /// `None` to go on without it (FAIL_OPEN), with the slot.
    failure: RefCell<Option<(usize, Option<LocalResponse>)>>,
    /// Per direction: woken on any of the above.
    wake: [Notify; 2],
}

impl StreamState {
    pub fn new(stream: HttpStream) -> Rc<StreamState> {
        Rc::new(StreamState {
            stream: RefCell::new(stream),
            ..Default::default()
        })
    }

    fn wake_all(&self) {
        self.wake[0].notify_one();
        self.wake[1].notify_one();
    }

    /// Bytes held back by all plugins in both directions.
    pub fn buffered_bytes(&self) -> usize {
        self.buffers
            .iter()
            .map(|b| b.borrow().iter().map(Vec::len).sum::<usize>())
            .sum()
    }

    /// Waits until something may have changed for a phase paused in `dir`.
    pub async fn changed(&self, dir: Direction) {
        self.wake[dir.index()].notified().await;
    }

    /// What resumed a phase paused at `slot`, if anything yet.
    pub fn poll_resume(&self, dir: Direction, slot: usize) -> Option<Resume> {
        if let Some(local) = self.stream.borrow_mut().local_response.take() {
            return Some(Resume::Respond(local));
        }
        if self.closed.get() {
            return Some(Resume::Reset);
        }
        if let Some((_, failure)) = self.failure.borrow_mut().take() {
            return Some(match failure {
                Some(local) => Resume::Respond(local),
                None => Resume::Continue,
            });
        }
        if self.resumed[dir.index()].get() == Some(slot) {
            self.resumed[dir.index()].set(None);
            return Some(Resume::Continue);
        }
        None
    }

    /// The slot whose plugin asked to continue `dir`, if any (taken).
    pub fn take_resumed(&self, dir: Direction) -> Option<usize> {
        self.resumed[dir.index()].take()
    }
}

/// One plugin's answer to a body chunk.
enum OneBody {
    /// What it let through.
    Through(Vec<u8>),
    /// It keeps everything (now in its buffer).
    Held,
    Respond(LocalResponse),
}

/// How a paused phase ends.
#[derive(Debug)]
pub enum Resume {
    Continue,
    Respond(LocalResponse),
    /// `proxy_close_stream`: reset the stream.
    Reset,
}

/// The outcome of running a header or trailer phase.
#[derive(Debug)]
pub enum Step {
    /// Every plugin let it through.
    Continue,
    /// The plugin in this slot stopped; wait for it, then resume after it.
    Paused(usize),
    /// Answer with this instead.
    Respond(LocalResponse),
}

/// The outcome of running a body chunk.
#[derive(Debug)]
pub enum BodyStep {
    /// What the last plugin let through (may be empty).
    Forward(Vec<u8>),
    /// A plugin holds the data; feed the next chunk.
    Buffered,
    /// A plugin stopped the end of the body; wait for it to resume.
    Paused(usize),
    Respond(LocalResponse),
    /// The plugins hold more than the buffer limit.
    Overflow,
}

impl FilterChain {
    /// Instantiates every plugin for this worker; fails if one cannot start,
    /// so a bad plugin is found at start-up rather than on the first request.
    pub fn new(plugins: &[Plugin], env: ChainEnv) -> Result<SharedChain, wisp_wasm_host::Error> {
        let mut slots = Vec::with_capacity(plugins.len());
        for plugin in plugins {
            let SupervisedPlugin {
                supervisor,
                callouts,
                timers,
            } = env.supervise(plugin)?;
            slots.push(Slot {
                supervisor,
                callouts,
                timers,
                labels: PluginLabels {
                    plugin: plugin.name().to_owned(),
                },
                matcher: None,
            });
        }
        let metrics = env.metrics_or_detached();
        Ok(Rc::new_cyclic(|this| {
            RefCell::new(FilterChain {
                slots,
                streams: FastMap::default(),
                env,
                metrics,
                this: this.clone(),
            })
        }))
    }

    /// Starts the chain's timers and shared-queue listeners on this
    /// worker; they end when the chain is dropped.
    pub fn start_background(chain: &SharedChain) {
        crate::plugin_timers::start(chain);
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Sets each plugin's match, in plugin order.
    pub fn set_matches(&mut self, matches: Vec<Option<PluginMatch>>) {
        for (slot, matcher) in self.slots.iter_mut().zip(matches) {
            slot.matcher = matcher;
        }
    }

    fn slot_at(&self, dir: Direction, pos: usize) -> usize {
        match dir {
            Direction::Request => pos,
            Direction::Response => self.slots.len() - 1 - pos,
        }
    }

    fn pos_of(&self, dir: Direction, slot: usize) -> usize {
        // The mapping is its own inverse.
        self.slot_at(dir, slot)
    }

    /// Runs request or response headers through the chain, starting after
    /// the slot `after` (a resumed phase) or at the start. Request headers
    /// create each plugin's context for the stream as they reach it.
    pub fn headers(
        &mut self,
        dir: Direction,
        after: Option<usize>,
        state: &Rc<StreamState>,
        end_of_stream: bool,
    ) -> Step {
        let n = self.slots.len();
        let from = after.map_or(0, |slot| self.pos_of(dir, slot) + 1);
        state.contexts.borrow_mut().resize(n, None);
        for pos in from..n {
            let index = self.slot_at(dir, pos);
            let existing = state.contexts.borrow()[index];
            let slot = &mut self.slots[index];
            if dir == Direction::Request
                && let Some(matcher) = &slot.matcher
                && !matcher.matches(&Facts::of_request(&state.stream.borrow()))
            {
                // Not for this request: no HTTP context, as if not configured.
                state.contexts.borrow_mut()[index] = None;
                continue;
            }
            let Some(instance) = slot.supervisor.current_instance() else {
                state.contexts.borrow_mut()[index] = None;
                if dir == Direction::Request {
                    match slot.unavailable(&self.metrics) {
                        Some(response) => return Step::Respond(response),
                        None => continue,
                    }
                }
                continue;
            };
            let result = match (dir, existing) {
                (Direction::Request, _) => instance.create_http_context().and_then(|id| {
                    state.contexts.borrow_mut()[index] = Some(id);
                    self.streams.insert((index, id), state.clone());
                    let mut stream = state.stream.borrow_mut();
                    instance.on_request_headers(id, &mut stream, end_of_stream)
                }),
                (Direction::Response, Some(id)) => {
                    let mut stream = state.stream.borrow_mut();
                    instance.on_response_headers(id, &mut stream, end_of_stream)
                }
                (Direction::Response, None) => continue,
            };
            if let Some(step) = self.settle(index, dir, state, result) {
                return step;
            }
        }
        Step::Continue
    }

    /// The common end of a header or trailer callback: local response,
    /// pause, or failure policy; `None` means "go on to the next plugin".
    fn settle(
        &mut self,
        index: usize,
        dir: Direction,
        state: &Rc<StreamState>,
        result: Result<Action, wisp_wasm_host::Error>,
    ) -> Option<Step> {
        if result.is_ok() {
            self.slots[index].supervisor.on_success();
        }
        state.resumed[dir.index()].set(None);
        self.after_call(index);
        match result {
            Ok(_) if state.stream.borrow().local_response.is_some() => {
                let response = state.stream.borrow_mut().local_response.take()?;
                self.count_local_response(index);
                Some(Step::Respond(response))
            }
            Ok(Action::Continue) => None,
            Ok(Action::Pause) => {
                // A plugin that resumed within its own callback goes on.
                if state.take_resumed(dir) == Some(index) {
                    return None;
                }
                Some(Step::Paused(index))
            }
            Err(error) => {
                state.contexts.borrow_mut()[index] = None;
                self.slots[index]
                    .fail(error, &self.metrics)
                    .map(Step::Respond)
            }
        }
    }

    /// Runs one body chunk (`data`, `end_of_stream`) through the chain,
    /// starting after slot `after` (whose buffer is then released) or at
    /// the start.
    pub fn body(
        &mut self,
        dir: Direction,
        after: Option<usize>,
        state: &Rc<StreamState>,
        mut data: Vec<u8>,
        end_of_stream: bool,
        limit: usize,
    ) -> BodyStep {
        let n = self.slots.len();
        state.contexts.borrow_mut().resize(n, None);
        state.buffers[dir.index()]
            .borrow_mut()
            .resize(n, Vec::new());
        let from = match after {
            Some(slot) => {
                let mut held = std::mem::take(&mut state.buffers[dir.index()].borrow_mut()[slot]);
                held.extend_from_slice(&data);
                data = held;
                self.pos_of(dir, slot) + 1
            }
            None => 0,
        };
        for pos in from..n {
            let index = self.slot_at(dir, pos);
            match self.call_body(index, dir, state, data, end_of_stream) {
                OneBody::Through(out) => data = out,
                OneBody::Respond(response) => return BodyStep::Respond(response),
                OneBody::Held => {
                    if state.buffered_bytes() > limit {
                        return BodyStep::Overflow;
                    }
                    return if end_of_stream {
                        BodyStep::Paused(index)
                    } else {
                        BodyStep::Buffered
                    };
                }
            }
        }
        BodyStep::Forward(data)
    }

    /// One plugin's body callback on what it held plus `data`.
    fn call_body(
        &mut self,
        index: usize,
        dir: Direction,
        state: &Rc<StreamState>,
        data: Vec<u8>,
        end_of_stream: bool,
    ) -> OneBody {
        let Some(id) = state.contexts.borrow()[index] else {
            return OneBody::Through(data);
        };
        let slot = &mut self.slots[index];
        let Some(instance) = slot.supervisor.current_instance() else {
            state.contexts.borrow_mut()[index] = None;
            return OneBody::Through(data);
        };
        let result = {
            let mut held = std::mem::take(&mut state.buffers[dir.index()].borrow_mut()[index]);
            held.extend_from_slice(&data);
            let mut stream = state.stream.borrow_mut();
            match dir {
                Direction::Request => {
                    stream.request_body = held;
                    instance.on_request_body(id, &mut stream, end_of_stream)
                }
                Direction::Response => {
                    stream.response_body = held;
                    instance.on_response_body(id, &mut stream, end_of_stream)
                }
            }
        };
        let out = {
            let mut stream = state.stream.borrow_mut();
            match dir {
                Direction::Request => std::mem::take(&mut stream.request_body),
                Direction::Response => std::mem::take(&mut stream.response_body),
            }
        };
        if result.is_ok() {
            self.slots[index].supervisor.on_success();
        }
        state.resumed[dir.index()].set(None);
        self.after_call(index);
        match result {
            Ok(_) if state.stream.borrow().local_response.is_some() => {
                let response = state
                    .stream
                    .borrow_mut()
                    .local_response
                    .take()
                    .unwrap_or_default();
                self.count_local_response(index);
                OneBody::Respond(response)
            }
            Ok(Action::Continue) => OneBody::Through(out),
            Ok(Action::Pause) if state.take_resumed(dir) == Some(index) => OneBody::Through(out),
            Ok(Action::Pause) => {
                state.buffers[dir.index()].borrow_mut()[index] = out;
                OneBody::Held
            }
            Err(error) => {
                state.contexts.borrow_mut()[index] = None;
                match self.slots[index].fail(error, &self.metrics) {
                    Some(response) => OneBody::Respond(response),
                    // FAIL_OPEN: the data goes on without the plugin.
                    None => OneBody::Through(out),
                }
            }
        }
    }

    /// Runs trailers (in `state.stream`) through the chain after slot
    /// `after`. A plugin that was holding body data gives it up here (the
    /// body has ended): `carry` collects it for the caller to send before
    /// the trailers; on a pause it stays with the paused slot.
    pub fn trailers(
        &mut self,
        dir: Direction,
        after: Option<usize>,
        state: &Rc<StreamState>,
        carry: &mut Vec<u8>,
    ) -> Step {
        let n = self.slots.len();
        state.contexts.borrow_mut().resize(n, None);
        state.buffers[dir.index()]
            .borrow_mut()
            .resize(n, Vec::new());
        let from = match after {
            Some(slot) => {
                let held = std::mem::take(&mut state.buffers[dir.index()].borrow_mut()[slot]);
                carry.splice(0..0, held);
                self.pos_of(dir, slot) + 1
            }
            None => 0,
        };
        for pos in from..n {
            let index = self.slot_at(dir, pos);
            let Some(id) = state.contexts.borrow()[index] else {
                continue;
            };
            // Data let through by earlier plugins reaches this one first.
            if !carry.is_empty() {
                match self.call_body(index, dir, state, std::mem::take(carry), false) {
                    OneBody::Through(out) => *carry = out,
                    OneBody::Held => {}
                    OneBody::Respond(response) => return Step::Respond(response),
                }
            }
            let slot = &mut self.slots[index];
            let Some(instance) = slot.supervisor.current_instance() else {
                state.contexts.borrow_mut()[index] = None;
                continue;
            };
            let result = {
                let mut stream = state.stream.borrow_mut();
                match dir {
                    Direction::Request => instance.on_request_trailers(id, &mut stream),
                    Direction::Response => instance.on_response_trailers(id, &mut stream),
                }
            };
            let held = std::mem::take(&mut state.buffers[dir.index()].borrow_mut()[index]);
            carry.splice(0..0, held);
            match self.settle(index, dir, state, result) {
                None => {}
                Some(Step::Paused(slot)) => {
                    state.buffers[dir.index()].borrow_mut()[index] = std::mem::take(carry);
                    return Step::Paused(slot);
                }
                Some(step) => return step,
            }
        }
        Step::Continue
    }

    fn count_local_response(&self, index: usize) {
        self.metrics
            .local_responses
            .get_or_create(&self.slots[index].labels)
            .inc();
    }

    /// Counts a local response a plugin sent from an asynchronous callback.
    pub fn count_async_local_response(&self, index: usize) {
        if index < self.slots.len() {
            self.count_local_response(index);
        }
    }

    /// Ends the stream's contexts (`on_done`, `on_log`, `on_delete`).
    pub fn finish(&mut self, state: &Rc<StreamState>) {
        let ids = std::mem::take(&mut *state.contexts.borrow_mut());
        for (index, id) in ids.into_iter().enumerate() {
            let Some(id) = id else { continue };
            self.streams.remove(&(index, id));
            let Some(slot) = self.slots.get_mut(index) else {
                continue;
            };
            let Some(instance) = slot.supervisor.current_instance() else {
                continue;
            };
            let result = {
                let mut stream = state.stream.borrow_mut();
                instance.finish_http_context(id, &mut stream)
            };
            if let Err(error) = result {
                // The response is already on its way; only the instance pays.
                let _ = slot.fail(error, &self.metrics);
            }
            self.after_call(index);
        }
    }

    /// What follows every call into slot `index`'s instance: start the
    /// callouts it queued, route its continue/close requests, notice a new
    /// tick period.
    fn after_call(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        let (requests, period) = match slot.supervisor.current_instance() {
            Some(instance) => (instance.take_stream_requests(), instance.tick_period()),
            None => (Vec::new(), None),
        };
        slot.timers.set_tick_period(period);
        for request in requests {
            let Some(state) = self.streams.get(&(index, request.context_id)) else {
                tracing::debug!(
                    plugin = %slot.labels.plugin,
                    context = request.context_id,
                    "continue/close for a stream that is gone"
                );
                continue;
            };
            match request.kind {
                StreamRequestKind::Continue => {
                    let dir = match request.stream {
                        StreamType::HttpResponse => Direction::Response,
                        _ => Direction::Request,
                    };
                    state.resumed[dir.index()].set(Some(index));
                }
                StreamRequestKind::Close => state.closed.set(true),
            }
            state.wake_all();
        }
        callout_runner::start_queued(
            &self.this,
            index,
            &slot.supervisor,
            &slot.callouts,
            self.env.cluster_client.as_ref(),
        );
    }
}

impl CalloutOwner for FilterChain {
    fn callout_queue(&self, index: usize) -> Option<&CalloutQueue> {
        self.slots.get(index).map(|slot| &*slot.callouts)
    }

    fn instance_generation(&self, index: usize) -> Option<u64> {
        self.slots
            .get(index)
            .map(|slot| slot.supervisor.generation())
    }

    /// Delivers with the stream of the context that made the call, if that
    /// stream is still alive.
    fn deliver(&mut self, index: usize, token: u32, origin: u32, answer: Answer) {
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        let state = self.streams.get(&(index, origin)).cloned();
        let Some(instance) = slot.supervisor.current_instance() else {
            return;
        };
        let result = match state.as_ref().map(|s| s.stream.try_borrow_mut()) {
            Some(Ok(mut stream)) => answer.deliver_to(instance, token, Some(&mut stream)),
            _ => answer.deliver_to(instance, token, None),
        };
        match result {
            Ok(()) => {
                slot.supervisor.on_success();
                if let Some(state) = &state
                    && state.stream.borrow().local_response.is_some()
                {
                    state.wake_all();
                }
            }
            Err(error) => {
                let response = slot.fail(error, &self.metrics);
                if let Some(state) = &state {
                    *state.failure.borrow_mut() = Some((index, response));
                    state.wake_all();
                }
            }
        }
        self.after_call(index);
    }
}

impl crate::plugin_timers::TimedChain for FilterChain {
    fn slot_count(&self) -> usize {
        self.slots.len()
    }

    fn timers(&self, index: usize) -> &SlotTimers {
        &self.slots[index].timers
    }

    fn tick(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        let Some(instance) = slot.supervisor.current_instance() else {
            return;
        };
        if let Err(error) = instance.on_tick() {
            let _ = slot.fail(error, &self.metrics);
        }
        self.after_call(index);
    }

    fn queue_ready(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        let Some(instance) = slot.supervisor.current_instance() else {
            return;
        };
        if !instance.has_pending_queue_ready() {
            return;
        }
        if let Err(error) = instance.deliver_queue_ready() {
            let _ = slot.fail(error, &self.metrics);
        }
        self.after_call(index);
    }
}

impl Slot {
    /// Applies the failure policy after a failed call; returns the response
    /// to send, or `None` when the request continues without the plugin.
    fn fail(&mut self, error: wisp_wasm_host::Error, metrics: &Metrics) -> Option<LocalResponse> {
        metrics.plugin_failures.get_or_create(&self.labels).inc();
        let action = callout_runner::fail(&mut self.supervisor, &self.callouts, &error);
        self.respond(action)
    }

    /// The policy for a request that finds no instance (failed, waiting for
    /// its reload backoff, or stopped as crash-looping).
    fn unavailable(&mut self, metrics: &Metrics) -> Option<LocalResponse> {
        metrics.plugin_unavailable.get_or_create(&self.labels).inc();
        self.respond(self.supervisor.failure_action())
    }

    fn respond(&self, action: FailureAction) -> Option<LocalResponse> {
        match action {
            FailureAction::PassThrough => None,
            FailureAction::Reject => Some(plugin_failure_response(503, WASM_FAIL_DETAILS)),
        }
    }
}

fn plugin_failure_response(status: u16, details: &str) -> LocalResponse {
    LocalResponse {
        status,
        details: details.to_owned(),
        body: format!("{details}\n").into_bytes(),
        headers: Vec::new(),
        grpc_status: -1,
    }
}
