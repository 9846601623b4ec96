//! One worker's network (TCP) filters: its own instance of each plugin of
//! `kind: network`, run on the connections served as TCP pass-through, as
//! Envoy's network filter manager runs read and write filters.
//!
//! * `on_new_connection` runs through the filters in order when the
//!   connection is accepted; the upstream is connected once every filter has
//!   let it through (a filter that pauses holds the connect back until the
//!   next downstream data goes through it, as Envoy's `StopIteration`).
//! * Downstream data (DOWNSTREAM_DATA) goes through the filters in order,
//!   upstream data (UPSTREAM_DATA) in reverse order, as Envoy iterates write
//!   filters. Each may read and rewrite the buffer. A filter that pauses
//!   keeps the bytes buffered; the next read appends to them and the whole
//!   buffer goes through the chain again from the first filter (Envoy's
//!   connection read buffer behaves the same way).
//! * When the connection is over: `on_downstream_connection_close` and
//!   `on_upstream_connection_close` (peer `Remote` when that side closed
//!   first, `Local` when wisp closed it), then `on_done` / `on_log` /
//!   `on_delete`.
//! * A plugin may close the connection (`proxy_close_stream`, e.g. the
//!   SDK's `close_downstream()`).
//! * Root contexts get `on_tick` every period they set and `on_queue_ready`
//!   when their shared queues get items, on the worker that owns the
//!   instance (see `plugin_timers`); plugin-defined metrics are exported as
//!   for HTTP filters. A `proxy_close_stream` from a tick or a queue
//!   callback closes the connection of the context it names.
//!   `proxy_continue_stream` on a network stream is UNIMPLEMENTED, as in
//!   Envoy: a paused connection goes on with its next data.
//! * Plugins may make callouts (`proxy_http_call`, `proxy_grpc_call`,
//!   `proxy_grpc_stream`) to the configured clusters from any callback, as
//!   HTTP filters do (see `callout_runner`). The answer is delivered while
//!   the calling connection is open (or, for a root-context call, while the
//!   instance lives); the plugin reads it and may close the connection. As
//!   in Envoy, the connection's data buffers are readable only inside the
//!   data callbacks.
//!
//! Failure policies, per plugin: FAIL_CLOSED and FAIL_RELOAD close the
//! connection (an HTTP stream gets a 503; a TCP connection can only be
//! closed), FAIL_OPEN lets the bytes through as they were before the failed
//! call and skips the plugin for the rest of the connection. As for HTTP, the
//! failed instance is discarded, so every connection it held applies the
//! policy too; FAIL_RELOAD re-creates it for new connections.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use wisp_wasm_host::abi::StreamType;
use wisp_wasm_host::{
    Action, FailureAction, PeerType, StreamRequestKind, Supervisor, TcpConnection,
};

use crate::callout::{CalloutQueue, ClusterClients};
use crate::callout_runner::{self, Answer, CalloutOwner};
use crate::filter_chain::{ChainEnv, SupervisedPlugin};
use crate::metrics::{Metrics, PluginLabels};
use crate::plugin_timers::{SlotTimers, TimedChain};
use crate::plugins::{ConfiguredPlugin, Facts};

struct Slot {
    supervisor: Supervisor,
    callouts: Arc<CalloutQueue>,
    timers: SlotTimers,
    /// Bumped whenever the instance is discarded: a context id of an older
    /// generation belongs to an instance that is gone.
    generation: u64,
    configured: ConfiguredPlugin,
}

/// A worker's network filters.
pub struct NetworkChain {
    slots: Vec<Slot>,
    /// The open connections by (slot, context id), so a plugin can close
    /// one from a root-context callback.
    connections: HashMap<(usize, u32), CancellationToken>,
    /// For failures in root-context calls (ticks, queues, callout
    /// answers); connection calls get the worker's metrics passed in.
    metrics: Arc<Metrics>,
    /// The worker's pooled client for callouts (`None` for the reload
    /// canary, which never runs a connection).
    cluster_client: Option<Rc<ClusterClients>>,
    /// This chain as its callout tasks hold it (set by [`NetworkFilters`]).
    this: Weak<RefCell<NetworkChain>>,
}

/// Where one connection stands in one filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Not reached yet (`on_new_connection` not called).
    Pending,
    /// Has a context of this instance generation.
    Active { id: u32, generation: u64 },
    /// Skipped: its match excludes the connection, or it failed open.
    Skipped,
}

/// One connection's contexts in the chain and its data buffers.
pub struct NetworkStream {
    states: Vec<State>,
    /// Filters whose `on_new_connection` has run (or that were skipped).
    started: usize,
    pub conn: TcpConnection,
    /// Fired to end the connection now: a side failed, or a plugin closed
    /// it from a timer or queue callback (see [`NetworkChain`]).
    pub abort: CancellationToken,
}

/// What to do after a pass through the chain.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send these bytes on (possibly empty).
    Forward(Vec<u8>),
    /// A filter paused: the bytes stay buffered until more arrive.
    Hold,
    /// Close the connection (failure policy or a plugin's request).
    Close,
}

impl NetworkChain {
    /// Instantiates every network plugin for this worker; `env`'s plugin
    /// metrics receive the metrics plugins define.
    pub fn new(
        plugins: &[ConfiguredPlugin],
        env: &ChainEnv,
    ) -> Result<NetworkChain, wisp_wasm_host::Error> {
        let slots = plugins
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
                    generation: 0,
                    configured: configured.clone(),
                })
            })
            .collect::<Result<_, wisp_wasm_host::Error>>()?;
        let metrics = env.metrics_or_detached();
        Ok(NetworkChain {
            slots,
            connections: HashMap::new(),
            metrics,
            cluster_client: env.cluster_client.clone(),
            this: Weak::new(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// A new connection with these properties: filters whose match excludes
    /// it are skipped for its whole life.
    pub fn open(&self, properties: HashMap<String, Vec<u8>>, facts: &Facts<'_>) -> NetworkStream {
        let states = self
            .slots
            .iter()
            .map(|slot| {
                if slot.configured.applies(facts) {
                    State::Pending
                } else {
                    State::Skipped
                }
            })
            .collect();
        NetworkStream {
            states,
            started: 0,
            conn: TcpConnection {
                properties,
                ..Default::default()
            },
            abort: CancellationToken::new(),
        }
    }

    /// Runs `on_new_connection` through the filters not started yet, in
    /// order; `Ok(true)` once every filter has let the connection through
    /// (time to connect upstream), `Ok(false)` while one holds it.
    pub fn start(&mut self, stream: &mut NetworkStream, metrics: &Metrics) -> Result<bool, Closed> {
        self.start_until(stream, self.slots.len(), metrics)
    }

    /// `on_new_connection` for the filters before `limit` not started yet.
    fn start_until(
        &mut self,
        stream: &mut NetworkStream,
        limit: usize,
        metrics: &Metrics,
    ) -> Result<bool, Closed> {
        while stream.started < limit {
            let index = stream.started;
            stream.started += 1;
            if stream.states[index] == State::Skipped {
                continue;
            }
            let slot = &mut self.slots[index];
            let Some(instance) = slot.supervisor.current_instance() else {
                metrics
                    .plugin_unavailable
                    .get_or_create(&slot.labels())
                    .inc();
                slot.policy(stream, index, metrics, slot.supervisor.failure_action())?;
                continue;
            };
            let connections = &mut self.connections;
            let result = instance.create_tcp_context().and_then(|id| {
                stream.states[index] = State::Active {
                    id,
                    generation: slot.generation,
                };
                connections.insert((index, id), stream.abort.clone());
                instance.on_new_connection(id, &mut stream.conn)
            });
            let outcome = slot.outcome(result, stream, index, None, metrics);
            self.start_callouts(index);
            if outcome? == Action::Pause {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Appends `data` from the client and runs the downstream buffer through
    /// the chain. Filters not started yet get `on_new_connection` first, in
    /// order (see [`NetworkChain::start`]); `started` says whether all have.
    pub fn on_downstream(
        &mut self,
        stream: &mut NetworkStream,
        data: &[u8],
        end_of_stream: bool,
        metrics: &Metrics,
    ) -> Result<(Verdict, bool), Closed> {
        stream.conn.downstream_data.extend_from_slice(data);
        for index in 0..self.slots.len() {
            if index >= stream.started {
                // Envoy: initializes the filter, and iterates on to its
                // onData in the same pass if it continued.
                if !self.start_until(stream, index + 1, metrics)? {
                    return Ok((Verdict::Hold, false));
                }
            }
            if let Action::Pause =
                self.data(stream, index, Direction::Downstream, end_of_stream, metrics)?
            {
                return Ok((Verdict::Hold, stream.started == self.slots.len()));
            }
        }
        let bytes = std::mem::take(&mut stream.conn.downstream_data);
        Ok((Verdict::Forward(bytes), true))
    }

    /// Appends `data` from the server and runs the upstream buffer through
    /// the chain, last filter first.
    pub fn on_upstream(
        &mut self,
        stream: &mut NetworkStream,
        data: &[u8],
        end_of_stream: bool,
        metrics: &Metrics,
    ) -> Result<Verdict, Closed> {
        stream.conn.upstream_data.extend_from_slice(data);
        for index in (0..self.slots.len()).rev() {
            if let Action::Pause =
                self.data(stream, index, Direction::Upstream, end_of_stream, metrics)?
            {
                return Ok(Verdict::Hold);
            }
        }
        Ok(Verdict::Forward(std::mem::take(
            &mut stream.conn.upstream_data,
        )))
    }

    /// The connection is over: close events, then the contexts end.
    pub fn close(
        &mut self,
        mut stream: NetworkStream,
        downstream: PeerType,
        upstream: PeerType,
        metrics: &Metrics,
    ) {
        for index in 0..self.slots.len() {
            let State::Active { id, generation } = stream.states[index] else {
                continue;
            };
            self.connections.remove(&(index, id));
            let slot = &mut self.slots[index];
            if generation != slot.generation {
                continue;
            }
            let Some(instance) = slot.supervisor.current_instance() else {
                continue;
            };
            let result = instance
                .on_downstream_connection_close(id, &mut stream.conn, downstream)
                .and_then(|()| {
                    instance.on_upstream_connection_close(id, &mut stream.conn, upstream)
                })
                .and_then(|()| instance.finish_tcp_context(id, &mut stream.conn));
            match result {
                // Callouts from `on_done` / `on_log` (say, a log shipper's)
                // still go out; their answers are dropped with the connection.
                Ok(()) => self.start_callouts(index),
                Err(error) => {
                    // The connection is already closed; only the instance pays.
                    slot.failed(error, metrics);
                }
            }
        }
    }

    fn data(
        &mut self,
        stream: &mut NetworkStream,
        index: usize,
        direction: Direction,
        end_of_stream: bool,
        metrics: &Metrics,
    ) -> Result<Action, Closed> {
        let State::Active { id, generation } = stream.states[index] else {
            return Ok(Action::Continue);
        };
        let slot = &mut self.slots[index];
        if generation != slot.generation {
            // The instance that held this context is gone.
            metrics
                .plugin_unavailable
                .get_or_create(&slot.labels())
                .inc();
            slot.policy(stream, index, metrics, slot.supervisor.failure_action())?;
            return Ok(Action::Continue);
        }
        let Some(instance) = slot.supervisor.current_instance() else {
            metrics
                .plugin_unavailable
                .get_or_create(&slot.labels())
                .inc();
            slot.policy(stream, index, metrics, slot.supervisor.failure_action())?;
            return Ok(Action::Continue);
        };
        // FAIL_OPEN forwards the bytes as they were before the failed call.
        let backup =
            (!slot.configured.plugin.config().failure_policy.rejects()).then(|| match direction {
                Direction::Downstream => stream.conn.downstream_data.clone(),
                Direction::Upstream => stream.conn.upstream_data.clone(),
            });
        let result = match direction {
            Direction::Downstream => {
                instance.on_downstream_data(id, &mut stream.conn, end_of_stream)
            }
            Direction::Upstream => instance.on_upstream_data(id, &mut stream.conn, end_of_stream),
        };
        let restore = backup.map(|data| (direction, data));
        let outcome = slot.outcome(result, stream, index, restore, metrics);
        self.start_callouts(index);
        outcome
    }

    /// Starts the callouts slot `index` queued during its last call.
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

#[derive(Clone, Copy, Debug)]
enum Direction {
    Downstream,
    Upstream,
}

/// The connection must be closed: a plugin failed under FAIL_CLOSED /
/// FAIL_RELOAD, or asked for it.
#[derive(Debug)]
pub struct Closed;

impl Slot {
    /// Picks up a tick period the plugin set during its last call.
    fn note_tick_period(&mut self) {
        let period = self
            .supervisor
            .current_instance()
            .and_then(|i| i.tick_period());
        self.timers.set_tick_period(period);
    }

    /// A call failed: the failed instance is discarded, so every connection
    /// it held gets its policy, and the calls it queued are dropped.
    fn failed(&mut self, error: wisp_wasm_host::Error, metrics: &Metrics) -> FailureAction {
        metrics.plugin_failures.get_or_create(&self.labels()).inc();
        let action = callout_runner::fail(&mut self.supervisor, &self.callouts, &error);
        self.generation += 1;
        action
    }

    fn labels(&self) -> PluginLabels {
        PluginLabels {
            plugin: self.supervisor.plugin().name().to_owned(),
        }
    }

    /// Applies a call's result: success (and stream requests the plugin
    /// made during it), or its failure policy.
    fn outcome(
        &mut self,
        result: Result<Action, wisp_wasm_host::Error>,
        stream: &mut NetworkStream,
        index: usize,
        restore: Option<(Direction, Vec<u8>)>,
        metrics: &Metrics,
    ) -> Result<Action, Closed> {
        match result {
            Ok(action) => {
                self.supervisor.on_success();
                self.note_tick_period();
                let context = match stream.states[index] {
                    State::Active { id, .. } => Some(id),
                    _ => None,
                };
                // Only closes matter: the host refuses continue on network
                // streams (UNIMPLEMENTED, as Envoy), and a paused connection
                // goes on with its next data.
                let close = self
                    .supervisor
                    .current_instance()
                    .map(|instance| instance.take_stream_requests())
                    .unwrap_or_default()
                    .iter()
                    .any(|request| {
                        Some(request.context_id) == context
                            && request.kind == StreamRequestKind::Close
                            && matches!(
                                request.stream,
                                StreamType::Downstream | StreamType::Upstream
                            )
                    });
                if close {
                    tracing::info!(
                        plugin = self.supervisor.plugin().name(),
                        "plugin closed the connection"
                    );
                    metrics
                        .tcp_plugin_closes
                        .get_or_create(&self.labels())
                        .inc();
                    return Err(Closed);
                }
                Ok(action)
            }
            Err(error) => {
                let action = self.failed(error, metrics);
                if let Some((direction, data)) = restore {
                    match direction {
                        Direction::Downstream => stream.conn.downstream_data = data,
                        Direction::Upstream => stream.conn.upstream_data = data,
                    }
                }
                self.policy(stream, index, metrics, action)?;
                Ok(Action::Continue)
            }
        }
    }

    /// Skips the plugin for this connection (FAIL_OPEN) or closes it.
    fn policy(
        &self,
        stream: &mut NetworkStream,
        index: usize,
        metrics: &Metrics,
        action: FailureAction,
    ) -> Result<(), Closed> {
        stream.states[index] = State::Skipped;
        match action {
            FailureAction::PassThrough => Ok(()),
            FailureAction::Reject => {
                metrics
                    .tcp_plugin_closes
                    .get_or_create(&self.labels())
                    .inc();
                Err(Closed)
            }
        }
    }
}

impl TimedChain for NetworkChain {
    fn slot_count(&self) -> usize {
        self.slots.len()
    }

    fn timers(&self, index: usize) -> &SlotTimers {
        &self.slots[index].timers
    }

    fn tick(&mut self, index: usize) {
        let metrics = self.metrics.clone();
        let slot = &mut self.slots[index];
        let Some(instance) = slot.supervisor.current_instance() else {
            return;
        };
        match instance.on_tick() {
            Ok(()) => slot.note_tick_period(),
            Err(error) => {
                let _ = slot.failed(error, &metrics);
            }
        }
        self.route_stream_requests(index);
        self.start_callouts(index);
    }

    fn queue_ready(&mut self, index: usize) {
        let metrics = self.metrics.clone();
        let slot = &mut self.slots[index];
        let Some(instance) = slot.supervisor.current_instance() else {
            return;
        };
        if !instance.has_pending_queue_ready() {
            return;
        }
        match instance.deliver_queue_ready() {
            Ok(_) => slot.note_tick_period(),
            Err(error) => {
                let _ = slot.failed(error, &metrics);
            }
        }
        self.route_stream_requests(index);
        self.start_callouts(index);
    }
}

impl CalloutOwner for NetworkChain {
    fn callout_queue(&self, index: usize) -> Option<&CalloutQueue> {
        self.slots.get(index).map(|slot| &*slot.callouts)
    }

    fn instance_generation(&self, index: usize) -> Option<u64> {
        self.slots
            .get(index)
            .map(|slot| slot.supervisor.generation())
    }

    /// Delivers to the root context's callback with no stream (a TCP
    /// connection's buffers exist only inside its data callbacks); the
    /// plugin switches to the calling connection's context to close it. An
    /// answer for a connection that closed in the meantime is dropped, as
    /// Envoy cancels a context's calls when it is destroyed.
    fn deliver(&mut self, index: usize, token: u32, origin: u32, answer: Answer) {
        let metrics = self.metrics.clone();
        let calling_connection_open = self.connections.contains_key(&(index, origin));
        let slot = &mut self.slots[index];
        let Some(instance) = slot.supervisor.current_instance() else {
            return;
        };
        if origin != instance.root_context_id() && !calling_connection_open {
            tracing::debug!(token, "callout answer dropped: its connection is closed");
            // A gRPC stream of that connection ends here too.
            slot.callouts.end_stream(token);
            return;
        }
        match answer.deliver_to(instance, token, None) {
            Ok(()) => {
                slot.supervisor.on_success();
                slot.note_tick_period();
            }
            Err(error) => {
                let _ = slot.failed(error, &metrics);
            }
        }
        self.route_stream_requests(index);
        self.start_callouts(index);
    }
}

impl NetworkChain {
    /// Closes the connections slot `index` asked to close from a root
    /// callback (`proxy_set_effective_context` + `proxy_close_stream`).
    fn route_stream_requests(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        let Some(instance) = slot.supervisor.current_instance() else {
            return;
        };
        for request in instance.take_stream_requests() {
            let closes = request.kind == StreamRequestKind::Close
                && matches!(
                    request.stream,
                    StreamType::Downstream | StreamType::Upstream
                );
            if !closes {
                continue;
            }
            let Some(abort) = self.connections.get(&(index, request.context_id)) else {
                continue;
            };
            tracing::info!(
                plugin = slot.supervisor.plugin().name(),
                "plugin closed a connection from a timer or queue callback"
            );
            self.metrics
                .tcp_plugin_closes
                .get_or_create(&slot.labels())
                .inc();
            abort.cancel();
        }
    }
}

/// The network chain new connections of a worker use; a config reload swaps
/// in a new one, connections already open keep the one they started with.
/// Each chain's timers run while it exists.
pub struct NetworkFilters {
    current: RefCell<Rc<RefCell<NetworkChain>>>,
}

impl NetworkFilters {
    /// Takes `chain` into use and starts its timers (on this worker).
    pub fn new(chain: NetworkChain) -> NetworkFilters {
        NetworkFilters {
            current: RefCell::new(Self::run(chain)),
        }
    }

    /// Shares `chain` with its timers and callout tasks, and starts the timers.
    fn run(chain: NetworkChain) -> Rc<RefCell<NetworkChain>> {
        let chain = Rc::new(RefCell::new(chain));
        chain.borrow_mut().this = Rc::downgrade(&chain);
        crate::plugin_timers::start(&chain);
        chain
    }

    pub fn current(&self) -> Rc<RefCell<NetworkChain>> {
        self.current.borrow().clone()
    }

    /// Swaps in `chain` for new connections and starts its timers.
    pub fn replace(&self, chain: NetworkChain) {
        *self.current.borrow_mut() = Self::run(chain);
    }
}
