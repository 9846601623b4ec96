//! What the embedder (the wisp agent, or a test) plugs into an instance:
//! callouts to upstream clusters, a metrics sink, foreign functions and a
//! waker for shared-queue work.
//!
//! Everything here is optional. Without [`Callouts`] every `proxy_http_call`
//! and `proxy_grpc_*` names an unknown upstream; without a [`MetricsSink`]
//! metrics still work (the host keeps their values, see
//! [`crate::metrics::snapshot`]); without foreign functions
//! `proxy_call_foreign_function` is NOT_FOUND.
//!
//! The flow of a callout, as in Envoy:
//! 1. the plugin calls `proxy_http_call`; the host allocates a token and calls
//!    [`Callouts::http_call`] with an [`HttpCallRequest`];
//! 2. the embedder sends the request to the named upstream, asynchronously;
//! 3. when the answer (or a failure) arrives, the embedder calls
//!    [`PluginInstance::on_http_call_response`](crate::PluginInstance::on_http_call_response)
//!    on the same instance with the token;
//! 4. the plugin typically resumes its stream with `proxy_continue_stream`,
//!    which the embedder sees in
//!    [`PluginInstance::take_stream_requests`](crate::PluginInstance::take_stream_requests).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::abi::Status;
use crate::headers::HeaderMap;

/// An outgoing `proxy_http_call`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpCallRequest {
    /// The token the response must be delivered with.
    pub token: u32,
    /// The root context that owns the call (responses go back to it).
    pub root_context_id: u32,
    /// The context that was effective when the plugin made the call, usually
    /// the HTTP context of the request that waits for the answer: lend that
    /// stream when delivering the response.
    pub context_id: u32,
    /// The upstream (Envoy: cluster) name; never a URL.
    pub upstream: String,
    /// Request headers including `:method`, `:path` and `:authority`.
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub trailers: HeaderMap,
    pub timeout: Duration,
}

/// The answer to an [`HttpCallRequest`]. `None` in place of a response means
/// the call failed (reset, timeout, no healthy upstream): the plugin then gets
/// `proxy_on_http_call_response` with zero headers, as in Envoy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpCallResponse {
    /// Response headers including `:status`.
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub trailers: HeaderMap,
}

/// An outgoing `proxy_grpc_call` (unary) or `proxy_grpc_stream`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcCallRequest {
    pub token: u32,
    pub root_context_id: u32,
    /// See [`HttpCallRequest::context_id`].
    pub context_id: u32,
    pub upstream: String,
    pub service: String,
    pub method: String,
    pub initial_metadata: HeaderMap,
    /// The request message of a unary call; empty for a stream.
    pub message: Vec<u8>,
    /// `None` for streams, which have no deadline.
    pub timeout: Option<Duration>,
    /// Whether this is `proxy_grpc_stream` (messages follow via [`Callouts::grpc_send`]).
    pub streaming: bool,
}

/// Why the embedder refused a callout; each maps to the status cpp-host
/// returns to the plugin.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CalloutError {
    /// No such upstream (`http_call`: BAD_ARGUMENT; gRPC: PARSE_FAILURE, as Envoy).
    #[error("unknown upstream {0:?}")]
    UnknownUpstream(String),
    /// The token does not name a live call of this plugin: NOT_FOUND.
    #[error("unknown callout token {0}")]
    UnknownToken(u32),
    /// Anything else: INTERNAL_FAILURE.
    #[error("callout failed: {0}")]
    Internal(String),
}

/// Dispatches a plugin's callouts to named upstreams.
///
/// Methods run inside a hostcall, on the worker thread, while the guest waits:
/// they must only queue the work (e.g. send it on a channel) and return.
pub trait Callouts: Send + Sync {
    fn http_call(&self, request: HttpCallRequest) -> Result<(), CalloutError>;

    fn grpc_call(&self, request: GrpcCallRequest) -> Result<(), CalloutError>;

    /// A message on an open gRPC stream.
    fn grpc_send(
        &self,
        token: u32,
        message: Vec<u8>,
        end_of_stream: bool,
    ) -> Result<(), CalloutError>;

    /// Abandons a call or stream: no more callbacks for `token`.
    fn grpc_cancel(&self, token: u32) -> Result<(), CalloutError>;

    /// Half-closes a stream from the plugin's side; the embedder still
    /// delivers the remaining messages and the close.
    fn grpc_close(&self, token: u32) -> Result<(), CalloutError>;
}

/// The metric kinds of `proxy_define_metric` (`proxy_metric_type_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// Receives metric updates as they happen, e.g. to export them with the
/// agent's Prometheus registry. Values are also kept by the host.
pub trait MetricsSink: Send + Sync {
    /// A plugin defined `name` (called once per name and kind per process).
    fn defined(&self, name: &str, kind: MetricKind);
    /// A counter or gauge changed to `value`.
    fn updated(&self, name: &str, kind: MetricKind, value: i64);
    /// A value was recorded into a histogram.
    fn recorded(&self, name: &str, value: u64);
}

/// A host function a plugin calls with `proxy_call_foreign_function(name, args)`.
/// `Err(status)` goes back to the plugin as is.
pub type ForeignFunction = Arc<dyn Fn(&[u8]) -> Result<Vec<u8>, Status> + Send + Sync>;

/// Called (from any thread) when a shared queue owned by this instance got an
/// item: the embedder should arrange for
/// [`PluginInstance::deliver_queue_ready`](crate::PluginInstance::deliver_queue_ready)
/// to run on the instance's worker.
pub type QueueWaker = Arc<dyn Fn() + Send + Sync>;

/// The embedder's side of an instance; see the module docs.
#[derive(Clone, Default)]
pub struct Embedder {
    pub callouts: Option<Arc<dyn Callouts>>,
    pub metrics: Option<Arc<dyn MetricsSink>>,
    pub foreign_functions: HashMap<String, ForeignFunction>,
    pub queue_waker: Option<QueueWaker>,
}

impl fmt::Debug for Embedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Embedder")
            .field("callouts", &self.callouts.is_some())
            .field("metrics", &self.metrics.is_some())
            .field(
                "foreign_functions",
                &self.foreign_functions.keys().collect::<Vec<_>>(),
            )
            .field("queue_waker", &self.queue_waker.is_some())
            .finish()
    }
}
