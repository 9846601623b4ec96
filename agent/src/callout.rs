//! Callouts from plugins to named clusters: `proxy_http_call` and unary
//! `proxy_grpc_call`, as Envoy's Wasm filter makes them.
//!
//! `clusters:` in the config file (or `--cluster NAME=ADDR` in quick mode)
//! names the upstreams a plugin may call. Inside the hostcall the plugin's
//! [`CalloutQueue`] (its [`Callouts`]) only checks the name and queues the
//! request; after the callback the filter chain takes the queue and runs
//! each call as a task on the same worker, over the worker's pooled client,
//! and delivers the answer to the same instance (`on_http_call_response`,
//! `on_grpc_receive` / `on_grpc_close`).
//!
//! Statuses are cpp-host's: an unknown cluster is BAD_ARGUMENT for
//! `http_call` and PARSE_FAILURE for gRPC (the host maps
//! [`CalloutError::UnknownUpstream`]). gRPC streams (`proxy_grpc_stream`)
//! carry the plugin's `proxy_grpc_send` messages up and deliver every
//! answer message, the metadata and the close.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderName, HeaderValue, Request, Version};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use wisp_wasm_host::{
    CalloutError, Callouts, GrpcCallRequest, HeaderMap, HttpCallRequest, HttpCallResponse,
};

use crate::body::WholeBody;
use crate::config::Located;
use crate::upstream::Upstreams;

/// gRPC status UNAVAILABLE, for calls that never got an answer.
const GRPC_UNAVAILABLE: i32 = 14;
/// gRPC status DEADLINE_EXCEEDED.
const GRPC_DEADLINE_EXCEEDED: i32 = 4;
/// gRPC status INTERNAL, for answers that are not valid gRPC.
const GRPC_INTERNAL: i32 = 13;
/// Largest callout answer body kept (the rest is an error, not truncation).
pub const MAX_CALLOUT_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// One entry of `clusters:` in the config file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// `IP:PORT` of the cluster's one endpoint.
    pub address: Located<SocketAddr>,
    /// Caps every call's timeout (a plugin's own timeout still applies when
    /// it is shorter). Default: the plugin's timeout alone.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// `http1` (default) or `http2` for `http_call`; gRPC calls always use HTTP/2.
    #[serde(default)]
    pub protocol: ClusterProtocol,
    /// Originate TLS (or mTLS) to the cluster: `ca`, `server_name`,
    /// optionally `client_cert` and `client_key`, as a listener's
    /// `upstream_tls`. ALPN offers what `protocol` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tls::UpstreamTlsConfig>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClusterProtocol {
    #[default]
    Http1,
    Http2,
}

/// A cluster as the request path uses it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Cluster {
    /// The name plugins call it by.
    pub name: String,
    pub address: SocketAddr,
    pub timeout: Option<Duration>,
    pub protocol: ClusterProtocol,
    /// `None`: plain TCP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tls::UpstreamTls>,
}

impl Cluster {
    /// `https` for TLS clusters (HTTP/2's `:scheme`), else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

/// Every cluster by name; shared by all workers.
pub type Clusters = Arc<BTreeMap<String, Cluster>>;

/// The clusters of a config file.
pub fn clusters_from_specs(specs: &BTreeMap<String, ClusterSpec>) -> Clusters {
    Arc::new(
        specs
            .iter()
            .map(|(name, spec)| {
                (
                    name.clone(),
                    Cluster {
                        name: name.clone(),
                        address: spec.address.value,
                        timeout: spec.timeout_ms.map(Duration::from_millis),
                        protocol: spec.protocol,
                        tls: spec.tls.as_ref().map(|tls| tls.upstream_tls()),
                    },
                )
            })
            .collect(),
    )
}

/// `--cluster NAME=ADDR[,timeout_ms=N][,http2]`.
pub fn parse_cluster_flag(text: &str) -> Result<(String, Cluster), String> {
    let (name, rest) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected NAME=ADDR:PORT"))?;
    if name.is_empty() {
        return Err(format!("{text:?}: the cluster name is empty"));
    }
    let mut parts = rest.split(',');
    let addr = parts.next().unwrap_or_default();
    let address = addr
        .parse()
        .map_err(|e| format!("{text:?}: {addr:?} is not ADDR:PORT: {e}"))?;
    let mut cluster = Cluster {
        name: name.to_owned(),
        address,
        timeout: None,
        protocol: ClusterProtocol::Http1,
        tls: None,
    };
    for option in parts {
        match option.split_once('=') {
            Some(("timeout_ms", ms)) => {
                let ms: u64 = ms
                    .parse()
                    .ok()
                    .filter(|&ms| ms > 0)
                    .ok_or_else(|| format!("{text:?}: timeout_ms must be a positive number"))?;
                cluster.timeout = Some(Duration::from_millis(ms));
            }
            None if option == "http2" => cluster.protocol = ClusterProtocol::Http2,
            None if option == "http1" => cluster.protocol = ClusterProtocol::Http1,
            _ => {
                return Err(format!(
                    "{text:?}: unknown option {option:?} (timeout_ms=N, http1 or http2)"
                ));
            }
        }
    }
    Ok((name.to_owned(), cluster))
}

/// A callout the plugin made, waiting to be sent.
pub enum Callout {
    Http(HttpCallRequest, Cluster),
    Grpc(GrpcCallRequest, Cluster),
    /// A gRPC stream and what the plugin sends on it.
    GrpcStream(
        GrpcCallRequest,
        Cluster,
        tokio::sync::mpsc::UnboundedReceiver<StreamSend>,
    ),
}

impl Callout {
    pub fn token(&self) -> u32 {
        match self {
            Callout::Http(request, _) => request.token,
            Callout::Grpc(request, _) | Callout::GrpcStream(request, _, _) => request.token,
        }
    }
}

/// What the plugin does on an open gRPC stream.
#[derive(Debug)]
pub enum StreamSend {
    /// `proxy_grpc_send`: a message, and whether it is the last.
    Message(Vec<u8>, bool),
    /// `proxy_grpc_close`: no more messages from the plugin.
    HalfClose,
}

/// One plugin instance's [`Callouts`]: checks cluster names and queues the
/// calls for the worker (hostcalls must not block or await).
pub struct CalloutQueue {
    clusters: Clusters,
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    pending: Vec<Callout>,
    /// Tokens the plugin cancelled: no callback may follow.
    cancelled: HashSet<u32>,
    /// Open gRPC streams: where their messages go.
    streams: HashMap<u32, tokio::sync::mpsc::UnboundedSender<StreamSend>>,
}

impl CalloutQueue {
    pub fn new(clusters: Clusters) -> Arc<CalloutQueue> {
        Arc::new(CalloutQueue {
            clusters,
            state: Mutex::default(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The calls queued since the last take.
    pub fn take(&self) -> Vec<Callout> {
        std::mem::take(&mut self.state().pending)
    }

    /// Whether the plugin cancelled `token` (forgets it: asked once, on delivery).
    pub fn take_cancelled(&self, token: u32) -> bool {
        self.state().cancelled.remove(&token)
    }

    /// Whether gRPC stream `token` is still open on the plugin's side.
    pub fn stream_open(&self, token: u32) -> bool {
        self.state().streams.contains_key(&token)
    }

    /// Forgets stream `token` (it closed).
    pub fn end_stream(&self, token: u32) {
        self.state().streams.remove(&token);
    }

    /// Forgets what a discarded instance left: its queued calls and its open
    /// gRPC streams (their tasks end when the sending side goes).
    pub fn clear(&self) {
        let mut state = self.state();
        state.pending.clear();
        state.streams.clear();
    }

    fn cluster(&self, name: &str) -> Result<Cluster, CalloutError> {
        self.clusters
            .get(name)
            .cloned()
            .ok_or_else(|| CalloutError::UnknownUpstream(name.to_owned()))
    }
}

impl Callouts for CalloutQueue {
    fn http_call(&self, request: HttpCallRequest) -> Result<(), CalloutError> {
        let cluster = self.cluster(&request.upstream)?;
        self.state().pending.push(Callout::Http(request, cluster));
        Ok(())
    }

    fn grpc_call(&self, request: GrpcCallRequest) -> Result<(), CalloutError> {
        let cluster = self.cluster(&request.upstream)?;
        let mut state = self.state();
        if request.streaming {
            // The channel exists before the stream task does, so messages
            // sent in the same callback are not lost.
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            state.streams.insert(request.token, tx);
            state
                .pending
                .push(Callout::GrpcStream(request, cluster, rx));
        } else {
            state.pending.push(Callout::Grpc(request, cluster));
        }
        Ok(())
    }

    fn grpc_send(&self, token: u32, message: Vec<u8>, end: bool) -> Result<(), CalloutError> {
        let state = self.state();
        let stream = state
            .streams
            .get(&token)
            .ok_or(CalloutError::UnknownToken(token))?;
        stream
            .send(StreamSend::Message(message, end))
            .map_err(|_| CalloutError::Internal("the stream has ended".into()))
    }

    fn grpc_cancel(&self, token: u32) -> Result<(), CalloutError> {
        let mut state = self.state();
        state.pending.retain(|c| c.token() != token);
        // Dropping the sender ends the stream task.
        state.streams.remove(&token);
        state.cancelled.insert(token);
        Ok(())
    }

    fn grpc_close(&self, token: u32) -> Result<(), CalloutError> {
        let state = self.state();
        let stream = state
            .streams
            .get(&token)
            .ok_or(CalloutError::UnknownToken(token))?;
        let _ = stream.send(StreamSend::HalfClose);
        Ok(())
    }
}

/// A worker's pooled clients for callouts: whole requests (`http_call`,
/// unary gRPC) and streamed ones (gRPC streams); plain-TCP clusters share
/// one pair of pools, each TLS cluster has its own.
pub struct ClusterClients {
    plain: ClusterPools,
    tls: HashMap<String, ClusterPools>,
}

/// The pools callouts to some clusters go through.
pub struct ClusterPools {
    pub calls: Upstreams<WholeBody>,
    pub streams: Upstreams<crate::body::ChannelBody>,
}

impl ClusterPools {
    fn new(tls: Option<&crate::tls::UpstreamTls>) -> Result<ClusterPools, crate::tls::TlsError> {
        Ok(ClusterPools {
            calls: Upstreams::new(tls)?,
            streams: Upstreams::new(tls)?,
        })
    }
}

impl ClusterClients {
    /// Pools for `clusters`: TLS clusters get their own.
    pub fn new(clusters: &Clusters) -> Result<ClusterClients, crate::tls::TlsError> {
        let mut tls = HashMap::new();
        for cluster in clusters.values() {
            if let Some(config) = &cluster.tls {
                tls.insert(cluster.name.clone(), ClusterPools::new(Some(config))?);
            }
        }
        Ok(ClusterClients {
            plain: ClusterPools::new(None)?,
            tls,
        })
    }

    /// The pools a callout to `cluster` goes through.
    pub fn pools(&self, cluster: &Cluster) -> &ClusterPools {
        match &cluster.tls {
            Some(_) => self.tls.get(&cluster.name).unwrap_or(&self.plain),
            None => &self.plain,
        }
    }
}

/// How a gRPC call ended.
#[derive(Debug, PartialEq, Eq)]
pub enum GrpcOutcome {
    /// The response message (status OK).
    Message(Vec<u8>),
    /// A non-OK status and its message.
    Closed(i32, String),
}

/// Sends an `http_call` and waits for the whole answer; `None` when the
/// call failed (connect error, reset, timeout), which the plugin sees as
/// zero headers, as in Envoy.
pub async fn send_http(
    client: &Upstreams<WholeBody>,
    cluster: &Cluster,
    request: HttpCallRequest,
) -> Option<HttpCallResponse> {
    let timeout = effective_timeout(request.timeout, cluster.timeout);
    let version = match cluster.protocol {
        ClusterProtocol::Http1 => Version::HTTP_11,
        ClusterProtocol::Http2 => Version::HTTP_2,
    };
    let upstream = request.upstream.clone();
    let headers = request.headers.clone();
    let outgoing = match build_request(cluster, version, &headers, request) {
        Ok(outgoing) => outgoing,
        Err(error) => {
            tracing::warn!(cluster = %upstream, %error, "http_call request is not valid HTTP");
            return None;
        }
    };
    let exchange = async {
        let response = client
            .send(cluster.address, outgoing)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let collected = http_body_util::Limited::new(body, MAX_CALLOUT_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        let trailers = collected.trailers().cloned();
        let body = collected.to_bytes();
        let mut headers: HeaderMap = std::iter::once((
            ":status".to_owned(),
            parts.status.as_str().as_bytes().to_vec(),
        ))
        .collect();
        for (name, value) in &parts.headers {
            headers.add(name.as_str(), value.as_bytes());
        }
        let trailers = trailers
            .iter()
            .flatten()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        Ok::<_, String>(HttpCallResponse {
            headers,
            body: body.to_vec(),
            trailers,
        })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(response)) => Some(response),
        Ok(Err(error)) => {
            tracing::info!(cluster = %upstream, %error, "http_call failed");
            None
        }
        Err(_) => {
            tracing::info!(cluster = %upstream, ?timeout, "http_call timed out");
            None
        }
    }
}

/// Sends a unary gRPC call over HTTP/2 and waits for its message or status.
pub async fn send_grpc(
    client: &Upstreams<WholeBody>,
    cluster: &Cluster,
    request: GrpcCallRequest,
) -> GrpcOutcome {
    let timeout = effective_timeout(request.timeout.unwrap_or(Duration::ZERO), cluster.timeout);
    let mut headers: HeaderMap = [
        (":method".to_owned(), b"POST".to_vec()),
        (
            ":path".to_owned(),
            format!("/{}/{}", request.service, request.method).into_bytes(),
        ),
        (
            ":authority".to_owned(),
            request.upstream.clone().into_bytes(),
        ),
        ("content-type".to_owned(), b"application/grpc".to_vec()),
        ("te".to_owned(), b"trailers".to_vec()),
        (
            "grpc-timeout".to_owned(),
            format!("{}m", timeout.as_millis()).into_bytes(),
        ),
    ]
    .into_iter()
    .collect();
    for (name, value) in request.initial_metadata.iter() {
        if !name.starts_with(':') {
            headers.add(name, value);
        }
    }
    let mut framed = Vec::with_capacity(5 + request.message.len());
    framed.push(0);
    framed.extend_from_slice(&(request.message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&request.message);
    let outgoing = HttpCallRequest {
        token: request.token,
        root_context_id: request.root_context_id,
        context_id: request.context_id,
        upstream: request.upstream.clone(),
        headers: headers.clone(),
        body: framed,
        trailers: HeaderMap::new(),
        timeout,
    };
    let outgoing = match build_request(cluster, Version::HTTP_2, &headers, outgoing) {
        Ok(outgoing) => outgoing,
        Err(error) => return GrpcOutcome::Closed(GRPC_INTERNAL, error),
    };
    let exchange = async {
        let response = client
            .send(cluster.address, outgoing)
            .await
            .map_err(|e| GrpcOutcome::Closed(GRPC_UNAVAILABLE, e.to_string()))?;
        let (parts, body) = response.into_parts();
        if parts.status != http::StatusCode::OK {
            return Err(GrpcOutcome::Closed(
                GRPC_UNAVAILABLE,
                format!("HTTP status {}", parts.status.as_u16()),
            ));
        }
        let collected = http_body_util::Limited::new(body, MAX_CALLOUT_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| GrpcOutcome::Closed(GRPC_UNAVAILABLE, e.to_string()))?;
        // A trailers-only answer carries the status in the headers.
        let status_from = |map: &http::HeaderMap| {
            map.get("grpc-status")
                .and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
                .map(|code| {
                    let message = map
                        .get("grpc-message")
                        .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
                        .unwrap_or_default();
                    (code, message)
                })
        };
        let status = collected
            .trailers()
            .and_then(status_from)
            .or_else(|| status_from(&parts.headers));
        let mut data = collected.to_bytes();
        match status {
            Some((0, _)) => {}
            Some((code, message)) => return Err(GrpcOutcome::Closed(code, message)),
            None => {
                return Err(GrpcOutcome::Closed(
                    GRPC_INTERNAL,
                    "the answer has no grpc-status".into(),
                ));
            }
        }
        if data.len() < 5 {
            return Ok(GrpcOutcome::Message(Vec::new()));
        }
        let compressed = data.get_u8();
        let length = data.get_u32() as usize;
        if compressed != 0 || length > data.len() {
            return Err(GrpcOutcome::Closed(
                GRPC_INTERNAL,
                "malformed gRPC message frame".into(),
            ));
        }
        Ok(GrpcOutcome::Message(data[..length].to_vec()))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(outcome)) | Ok(Err(outcome)) => outcome,
        Err(_) => GrpcOutcome::Closed(GRPC_DEADLINE_EXCEEDED, "deadline exceeded".into()),
    }
}

/// What a gRPC stream delivers to the plugin, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamEvent {
    InitialMetadata(HeaderMap),
    Message(Vec<u8>),
    TrailingMetadata(HeaderMap),
    Close(i32, String),
}

/// Runs a gRPC stream over HTTP/2: the plugin's messages go up as they
/// come; `deliver` gets each event as it arrives and returns false when the
/// plugin no longer listens. Always ends with a [`StreamEvent::Close`]
/// unless the plugin stopped listening.
pub async fn run_grpc_stream(
    client: &Upstreams<crate::body::ChannelBody>,
    cluster: &Cluster,
    request: GrpcCallRequest,
    mut sends: tokio::sync::mpsc::UnboundedReceiver<StreamSend>,
    mut deliver: impl FnMut(StreamEvent) -> bool,
) {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    for (name, value) in request.initial_metadata.iter() {
        if let (false, Ok(name), Ok(value)) = (
            name.starts_with(':'),
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    let (sender, body) = crate::body::ChannelBody::new(Bytes::new(), None, true);
    let Some(sender) = sender else { return };
    let mut outgoing = Request::new(body);
    *outgoing.version_mut() = Version::HTTP_2;
    *outgoing.method_mut() = http::Method::POST;
    *outgoing.headers_mut() = headers;
    match format!(
        "{}://{}/{}/{}",
        cluster.scheme(),
        request.upstream,
        request.service,
        request.method
    )
    .parse()
    {
        Ok(uri) => *outgoing.uri_mut() = uri,
        Err(error) => {
            deliver(StreamEvent::Close(GRPC_INTERNAL, format!("{error}")));
            return;
        }
    }
    // Up: the plugin's messages, framed, until it half-closes or goes away.
    let upload = async move {
        while let Some(send) = sends.recv().await {
            match send {
                StreamSend::Message(message, end) => {
                    let mut framed = Vec::with_capacity(5 + message.len());
                    framed.push(0);
                    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
                    framed.extend_from_slice(&message);
                    if !sender.data(Bytes::from(framed)).await || end {
                        return;
                    }
                }
                StreamSend::HalfClose => return,
            }
        }
    };
    let download = async {
        let response = match client.send(cluster.address, outgoing).await {
            Ok(response) => response,
            Err(error) => {
                deliver(StreamEvent::Close(GRPC_UNAVAILABLE, error.to_string()));
                return;
            }
        };
        let (parts, mut body) = response.into_parts();
        let metadata: HeaderMap = parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        if !deliver(StreamEvent::InitialMetadata(metadata)) {
            return;
        }
        let mut buffer = bytes::BytesMut::new();
        loop {
            match body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        buffer.extend_from_slice(&data);
                        while buffer.len() >= 5 {
                            let length =
                                u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]])
                                    as usize;
                            if buffer.len() < 5 + length {
                                break;
                            }
                            let message = buffer.split_to(5 + length);
                            if !deliver(StreamEvent::Message(message[5..].to_vec())) {
                                return;
                            }
                        }
                    }
                    Err(frame) => {
                        let trailers = frame.into_trailers().unwrap_or_default();
                        let code = trailers
                            .get("grpc-status")
                            .and_then(|v| v.to_str().ok()?.parse().ok())
                            .unwrap_or(GRPC_INTERNAL);
                        let message = trailers
                            .get("grpc-message")
                            .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
                            .unwrap_or_default();
                        let metadata = trailers
                            .iter()
                            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                            .collect();
                        if deliver(StreamEvent::TrailingMetadata(metadata)) {
                            deliver(StreamEvent::Close(code, message));
                        }
                        return;
                    }
                },
                Some(Err(error)) => {
                    deliver(StreamEvent::Close(GRPC_UNAVAILABLE, error.to_string()));
                    return;
                }
                None => {
                    deliver(StreamEvent::Close(
                        GRPC_INTERNAL,
                        "the stream ended without a grpc-status".into(),
                    ));
                    return;
                }
            }
        }
    };
    // The answer may end before the plugin stops sending: the answer decides.
    tokio::pin!(upload);
    tokio::pin!(download);
    let mut uploading = true;
    loop {
        tokio::select! {
            () = &mut upload, if uploading => uploading = false,
            () = &mut download => return,
        }
    }
}

/// The plugin's timeout capped by the cluster's; a zero plugin timeout
/// means the cluster's (or 5 s, Envoy's route default is 15 s but a callout
/// that never ends would hold its stream forever).
fn effective_timeout(plugin: Duration, cluster: Option<Duration>) -> Duration {
    let plugin = if plugin.is_zero() {
        cluster.unwrap_or(Duration::from_secs(5))
    } else {
        plugin
    };
    cluster.map_or(plugin, |c| plugin.min(c))
}

/// The outgoing request of a callout: HTTP/1.1 in origin form with `Host`
/// from `:authority`, HTTP/2 with the authority in the URI.
fn build_request(
    cluster: &Cluster,
    version: Version,
    headers: &HeaderMap,
    call: HttpCallRequest,
) -> Result<Request<WholeBody>, String> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .ok_or_else(|| format!("missing {name}"))
    };
    let method = http::Method::from_bytes(get(":method")?.as_bytes()).map_err(|e| e.to_string())?;
    let path = get(":path")?;
    let authority = get(":authority")?;
    let uri = if version == Version::HTTP_2 {
        format!("{}://{authority}{path}", cluster.scheme())
    } else {
        path.to_owned()
    };
    let mut builder = Request::builder().method(method).uri(uri).version(version);
    if version != Version::HTTP_2 {
        builder = builder.header(http::header::HOST, authority);
    }
    for (name, value) in headers.iter().filter(|(n, _)| !n.starts_with(':')) {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
        let value = HeaderValue::from_bytes(value).map_err(|e| e.to_string())?;
        builder = builder.header(name, value);
    }
    let mut trailers = http::HeaderMap::new();
    for (name, value) in call.trailers.iter() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            trailers.append(name, value);
        }
    }
    // HTTP/1.1 trailers need chunked framing and a peer that asked for
    // them; Envoy sends callout trailers on HTTP/2 only, and so do we.
    let trailers = (version == Version::HTTP_2 && !trailers.is_empty()).then_some(trailers);
    builder
        .body(WholeBody::new(Bytes::from(call.body), trailers))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_flag() {
        let (name, cluster) = parse_cluster_flag("backend=127.0.0.1:9000").unwrap();
        assert_eq!(name, "backend");
        assert_eq!(cluster.address.to_string(), "127.0.0.1:9000");
        assert!(parse_cluster_flag("backend").is_err());
        assert!(parse_cluster_flag("=1.2.3.4:5").is_err());
        assert!(parse_cluster_flag("b=localhost").is_err());
        let (_, cluster) = parse_cluster_flag("g=127.0.0.1:9,timeout_ms=300,http2").unwrap();
        assert_eq!(cluster.timeout, Some(Duration::from_millis(300)));
        assert_eq!(cluster.protocol, ClusterProtocol::Http2);
        assert!(parse_cluster_flag("g=127.0.0.1:9,timeout_ms=0").is_err());
        assert!(parse_cluster_flag("g=127.0.0.1:9,fast").is_err());
    }

    #[test]
    fn timeouts() {
        let s = Duration::from_secs;
        assert_eq!(effective_timeout(s(5), None), s(5));
        assert_eq!(effective_timeout(s(5), Some(s(2))), s(2));
        assert_eq!(effective_timeout(s(1), Some(s(2))), s(1));
        assert_eq!(effective_timeout(Duration::ZERO, Some(s(2))), s(2));
    }

    #[test]
    fn unknown_cluster_is_refused_and_cancel_drops_queued_calls() {
        let queue = CalloutQueue::new(Arc::new(BTreeMap::from([(
            "up".to_owned(),
            parse_cluster_flag("up=127.0.0.1:1").unwrap().1,
        )])));
        let call = |upstream: &str, token| HttpCallRequest {
            token,
            root_context_id: 1,
            context_id: 2,
            upstream: upstream.into(),
            headers: HeaderMap::new(),
            body: Vec::new(),
            trailers: HeaderMap::new(),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(
            queue.http_call(call("nowhere", 4)),
            Err(CalloutError::UnknownUpstream("nowhere".into()))
        );
        queue.http_call(call("up", 8)).unwrap();
        queue.http_call(call("up", 12)).unwrap();
        queue.grpc_cancel(8).unwrap();
        let tokens: Vec<u32> = queue.take().iter().map(Callout::token).collect();
        assert_eq!(tokens, [12]);
        assert!(queue.take_cancelled(8));
        assert!(!queue.take_cancelled(8));
    }
}
