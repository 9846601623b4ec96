//! Running the callouts a plugin queued, and handing their answers back to
//! the chain that owns the plugin.
//!
//! Both chains make callouts: the HTTP filter chain ([`crate::filter_chain`])
//! and the network chain ([`crate::network_chain`]). Each queued
//! [`Callout`] becomes a task on the worker that made it; when its answer
//! (or each event of a gRPC stream) arrives, the task borrows the chain
//! again and calls [`CalloutOwner::deliver`], which hands the [`Answer`] to
//! the same plugin instance, with the calling stream when the chain has one.

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use wisp_wasm_host::{HeaderMap, HttpCallResponse, HttpStream, PluginInstance, Supervisor};

use crate::callout::{self, Callout, CalloutQueue, ClusterClients, GrpcOutcome, StreamEvent};

/// A chain whose plugins make callouts.
pub trait CalloutOwner: 'static {
    /// Slot `index`'s callout queue (`None` if there is no such slot).
    fn callout_queue(&self, index: usize) -> Option<&CalloutQueue>;

    /// Slot `index`'s [`Supervisor::generation`](wisp_wasm_host::Supervisor::generation):
    /// answers go only to the instance that made the call.
    fn instance_generation(&self, index: usize) -> Option<u64>;

    /// Hands `answer` to call `token` of slot `index`'s instance; `origin`
    /// is the context that made the call. Runs what the plugin asked for in
    /// that callback (more callouts, closing or resuming streams).
    fn deliver(&mut self, index: usize, token: u32, origin: u32, answer: Answer);
}

/// What comes back to a plugin from one of its callouts.
#[derive(Debug)]
pub enum Answer {
    /// The whole `http_call` response; `None` when the call failed.
    Http(Option<HttpCallResponse>),
    GrpcInitialMetadata(HeaderMap),
    GrpcMessage(Vec<u8>),
    GrpcTrailingMetadata(HeaderMap),
    /// The call or stream ended with this status and message.
    GrpcClose(i32, String),
}

impl Answer {
    /// Calls the plugin's callback for this answer; `stream` is the calling
    /// context's stream, if the chain has one and it is still alive.
    pub fn deliver_to(
        self,
        instance: &mut PluginInstance,
        token: u32,
        stream: Option<&mut HttpStream>,
    ) -> Result<(), wisp_wasm_host::Error> {
        match self {
            Answer::Http(response) => instance.on_http_call_response(token, response, stream),
            Answer::GrpcInitialMetadata(metadata) => {
                instance.on_grpc_receive_initial_metadata(token, metadata, stream)
            }
            Answer::GrpcMessage(message) => instance.on_grpc_receive(token, message, stream),
            Answer::GrpcTrailingMetadata(metadata) => {
                instance.on_grpc_receive_trailing_metadata(token, metadata, stream)
            }
            Answer::GrpcClose(code, message) => {
                instance.on_grpc_close(token, code, &message, stream)
            }
        }
    }
}

impl From<GrpcOutcome> for Answer {
    fn from(outcome: GrpcOutcome) -> Answer {
        match outcome {
            GrpcOutcome::Message(message) => Answer::GrpcMessage(message),
            GrpcOutcome::Closed(code, message) => Answer::GrpcClose(code, message),
        }
    }
}

impl From<StreamEvent> for Answer {
    fn from(event: StreamEvent) -> Answer {
        match event {
            StreamEvent::InitialMetadata(metadata) => Answer::GrpcInitialMetadata(metadata),
            StreamEvent::Message(message) => Answer::GrpcMessage(message),
            StreamEvent::TrailingMetadata(metadata) => Answer::GrpcTrailingMetadata(metadata),
            StreamEvent::Close(code, message) => Answer::GrpcClose(code, message),
        }
    }
}

/// Reports a failed call to `supervisor`; when that discards the instance,
/// the calls it queued and its open streams go with it (their answers could
/// only reach the instance that replaces it). Returns the failure action.
pub fn fail(
    supervisor: &mut Supervisor,
    queue: &CalloutQueue,
    error: &wisp_wasm_host::Error,
) -> wisp_wasm_host::FailureAction {
    let generation = supervisor.generation();
    let action = supervisor.on_failure(error, std::time::Instant::now());
    if supervisor.generation() != generation {
        queue.clear();
    }
    action
}

/// Who made a callout: slot `index`'s instance of this generation.
#[derive(Clone, Copy, Debug)]
struct Caller {
    index: usize,
    generation: u64,
}

/// Starts the calls slot `index` queued in `queue` during its last
/// callback, each as a task on this thread, for `supervisor`'s current
/// instance. Without a client (the reload canary, which never serves) they
/// are dropped with a warning. Called from inside the chain, while it is
/// borrowed.
pub fn start_queued<C: CalloutOwner>(
    chain: &Weak<RefCell<C>>,
    index: usize,
    supervisor: &Supervisor,
    queue: &CalloutQueue,
    client: Option<&Rc<ClusterClients>>,
) {
    let calls = queue.take();
    if calls.is_empty() {
        return;
    }
    let Some(client) = client else {
        tracing::warn!(
            plugin = supervisor.plugin().name(),
            "callouts are not available here"
        );
        return;
    };
    let caller = Caller {
        index,
        generation: supervisor.generation(),
    };
    for call in calls {
        tokio::task::spawn_local(run(chain.clone(), caller, call, client.clone()));
    }
}

/// Runs one callout and delivers its answer, unless the plugin cancelled
/// it or the chain is gone.
async fn run<C: CalloutOwner>(
    chain: Weak<RefCell<C>>,
    caller: Caller,
    call: Callout,
    client: Rc<ClusterClients>,
) {
    match call {
        Callout::Http(request, cluster) => {
            let (token, origin) = (request.token, request.context_id);
            let span = tracing::debug_span!("http_call", cluster = %request.upstream, token);
            let response = tracing::Instrument::instrument(
                callout::send_http(&client.pools(&cluster).calls, &cluster, request),
                span,
            )
            .await;
            deliver(&chain, caller, token, origin, Answer::Http(response));
        }
        Callout::Grpc(request, cluster) => {
            let (token, origin) = (request.token, request.context_id);
            let outcome =
                callout::send_grpc(&client.pools(&cluster).calls, &cluster, request).await;
            deliver(&chain, caller, token, origin, outcome.into());
        }
        Callout::GrpcStream(request, cluster, sends) => {
            let (token, origin) = (request.token, request.context_id);
            callout::run_grpc_stream(
                &client.pools(&cluster).streams,
                &cluster,
                request,
                sends,
                |event| deliver_stream_event(&chain, caller, token, origin, event),
            )
            .await;
        }
    }
}

/// Delivers a whole call's answer.
fn deliver<C: CalloutOwner>(
    chain: &Weak<RefCell<C>>,
    caller: Caller,
    token: u32,
    origin: u32,
    answer: Answer,
) {
    let Some(chain) = chain.upgrade() else { return };
    let index = caller.index;
    let Ok(mut chain) = chain.try_borrow_mut() else {
        // Should not happen: answers run in their own tasks, and the chains
        // are borrowed only inside callbacks, never across an await.
        tracing::warn!(token, "callout answer dropped: the chain is busy");
        return;
    };
    let cancelled = chain
        .callout_queue(index)
        .is_none_or(|queue| queue.take_cancelled(token));
    if !cancelled && chain.instance_generation(index) == Some(caller.generation) {
        chain.deliver(index, token, origin, answer);
    }
}

/// Delivers one event of gRPC stream `token`; false once the plugin no
/// longer listens (cancelled, closed, or the instance is gone).
fn deliver_stream_event<C: CalloutOwner>(
    chain: &Weak<RefCell<C>>,
    caller: Caller,
    token: u32,
    origin: u32,
    event: StreamEvent,
) -> bool {
    let Some(chain) = chain.upgrade() else {
        return false;
    };
    let index = caller.index;
    let Ok(mut chain) = chain.try_borrow_mut() else {
        tracing::warn!(token, "gRPC stream event dropped: the chain is busy");
        return true;
    };
    if chain.instance_generation(index) != Some(caller.generation) {
        return false;
    }
    let Some(queue) = chain.callout_queue(index) else {
        return false;
    };
    if !queue.stream_open(token) {
        return false;
    }
    let open = !matches!(event, StreamEvent::Close(..));
    if !open {
        queue.end_stream(token);
    }
    chain.deliver(index, token, origin, event.into());
    open && chain
        .callout_queue(index)
        .is_some_and(|queue| queue.stream_open(token))
}
