//! Per-request data the embedder owns and lends to a plugin during a callback.

use std::collections::HashMap;
use std::sync::Arc;

use crate::headers::HeaderMap;

/// A reply a plugin asked for with `proxy_send_local_response`.
///
/// The host only records it on the [`HttpStream`]; the embedder decides how to
/// send it (Envoy sends it instead of, or in place of, the upstream response).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u16,
    /// Envoy's "response code details"; empty when the plugin gave none.
    pub details: String,
    pub body: Vec<u8>,
    /// Extra response headers, names lower-case, in the plugin's order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// gRPC status for gRPC replies; `-1` means "not a gRPC reply".
    pub grpc_status: i32,
}

/// The HTTP state of one request, as the plugins of a filter chain see it.
///
/// The embedder owns it; the host moves it into the plugin's store for the
/// duration of a callback and hands it back afterwards, so the plugin reads and
/// writes these maps directly.
#[derive(Clone, Debug, Default)]
pub struct HttpStream {
    /// Request headers, including the pseudo-headers `:method`, `:path`,
    /// `:authority` and `:scheme` as Envoy presents them.
    pub request_headers: HeaderMap,
    /// Response headers, including `:status`.
    pub response_headers: HeaderMap,
    /// Set when a plugin calls `proxy_send_local_response`.
    pub local_response: Option<LocalResponse>,
    /// Properties for `proxy_get_property`, keyed by the path segments joined
    /// with `.`, e.g. `"source.address"`. Values are passed as they are.
    /// `proxy_set_property` during a stream callback writes here too.
    pub properties: HashMap<String, Vec<u8>>,
    /// Properties every stream of a connection shares (addresses, TLS),
    /// looked up after [`HttpStream::properties`]. The embedder builds them
    /// once per connection instead of once per request.
    pub connection_properties: Option<Arc<HashMap<String, Vec<u8>>>>,
    /// The buffered request body (HTTP_REQUEST_BODY). The embedder appends
    /// each chunk before `on_request_body`; after `Action::Continue` it sends
    /// what is here and clears it, after `Action::Pause` it keeps buffering
    /// (Envoy's StopIterationAndBuffer).
    pub request_body: Vec<u8>,
    /// The buffered response body (HTTP_RESPONSE_BODY), handled like `request_body`.
    pub response_body: Vec<u8>,
    /// Request trailers (HTTP_REQUEST_TRAILERS).
    pub request_trailers: HeaderMap,
    /// Response trailers (HTTP_RESPONSE_TRAILERS).
    pub response_trailers: HeaderMap,
}

impl HttpStream {
    /// A property as `proxy_get_property` sees it for this stream: the
    /// stream's own, else the connection's.
    pub fn property(&self, path: &str) -> Option<&[u8]> {
        self.properties
            .get(path)
            .or_else(|| self.connection_properties.as_deref()?.get(path))
            .map(Vec::as_slice)
    }
}

/// The state of one TCP connection through a network filter: the data
/// buffers of `proxy_on_downstream_data` / `proxy_on_upstream_data`.
#[derive(Clone, Debug, Default)]
pub struct TcpConnection {
    /// Bytes from the client not yet forwarded (DOWNSTREAM_DATA).
    pub downstream_data: Vec<u8>,
    /// Bytes from the server not yet forwarded (UPSTREAM_DATA).
    pub upstream_data: Vec<u8>,
    /// Properties for `proxy_get_property` (`source.address`, `connection.id`, ...).
    pub properties: HashMap<String, Vec<u8>>,
}

/// Which side closed a connection (`proxy_peer_type_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum PeerType {
    Unknown = 0,
    Local = 1,
    Remote = 2,
}

/// What a header callback told the host to do with the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Go on to the next filter.
    Continue,
    /// Stop iterating (cpp-host turns this into StopAllIterationAndWatermark);
    /// also returned whenever the plugin sent a local response.
    Pause,
}

/// What a plugin asked for with `proxy_continue_stream` / `proxy_close_stream`
/// (and the 0.1.0 `proxy_continue_request` / `proxy_continue_response`).
///
/// The host records them; the embedder takes them with
/// [`PluginInstance::take_stream_requests`](crate::PluginInstance::take_stream_requests)
/// after every call into the instance and resumes (or resets) the paused
/// stream of `context_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamRequest {
    /// The context that asked (the effective context at the time).
    pub context_id: u32,
    pub stream: crate::abi::StreamType,
    pub kind: StreamRequestKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamRequestKind {
    Continue,
    Close,
}
