//! HTTP proxying of one accepted connection: HTTP/1.1 or HTTP/2 (hyper's
//! auto server tells them apart by the HTTP/2 preface), each request through
//! the worker's filter chain and on to the connection's destination over
//! the worker's pooled upstream client, in the same HTTP version.

use std::borrow::Cow;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::watch;
use tracing::Instrument;
use wisp_wasm_host::{HeaderMap, HttpStream, LocalResponse};

use crate::access_log::{AccessLog, ConnectionFields, Entry};
use crate::body::{BodySender, ChannelBody};
use crate::filter_chain::{
    BodyStep, Direction, FilterChain, Resume, SharedChain, Step, StreamState,
};
use crate::header_conversion::{
    build_response, build_response_reusing, request_header_map, response_header_map,
    response_header_map_keeping, to_http_map, to_wasm_map, upstream_request,
};
use crate::header_pool;
use crate::metrics::{Metrics, PluginLabels, RequestLabels};
use crate::tls::TlsInfo;
use crate::upstream::{LocalExec, UpstreamError, Upstreams};

/// The body of a response to the client: what the filter chain let
/// through, a local reply, or the upstream's body as it comes.
pub type ProxyBody = ChannelBody;

/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head accepted (hyper answers 431 past it, as Envoy's
/// 60 KiB `max_request_headers_kb` default does).
pub const MAX_HEADER_BYTES: usize = 60 * 1024;

/// Where one accepted connection came from and is going.
pub struct ConnectionInfo {
    pub listener: String,
    /// Index of the listener in the worker's listener list.
    pub listener_index: usize,
    /// What TLS termination established, if the listener terminates TLS.
    pub tls: Option<TlsInfo>,
    pub peer: SocketAddr,
    pub destination: SocketAddr,
    /// The service whose VIP:port the client connected to, if any.
    pub destination_service: Option<String>,
    pub source_workload: String,
}

/// Properties for `proxy_get_property`, by path (`source.address`).
pub type Properties = std::collections::HashMap<String, Vec<u8>>;

impl ConnectionInfo {
    /// What every plugin on this connection may read with
    /// `proxy_get_property`: addresses, the workload, TLS, the direction.
    pub fn properties(&self) -> Properties {
        let tls = self
            .tls
            .as_ref()
            .map(TlsInfo::properties)
            .unwrap_or_default();
        [
            ("source.address", self.peer.to_string()),
            ("source.port", self.peer.port().to_string()),
            ("destination.address", self.destination.to_string()),
            ("destination.port", self.destination.port().to_string()),
            ("source.workload", self.source_workload.clone()),
            (crate::plugins::LISTENER_PROPERTY, self.listener.clone()),
        ]
        .into_iter()
        .chain(
            self.destination_service
                .clone()
                .map(|service| (crate::plugins::SERVICE_PROPERTY, service)),
        )
        .chain(tls)
        .map(|(k, v)| (k.to_owned(), v.into_bytes()))
        .chain(std::iter::once(self.listener_direction()))
        .collect()
    }

    /// Envoy's `listener_direction` attribute (an int64: 1 INBOUND, 2
    /// OUTBOUND), so a plugin can tell connections into a pod from those out.
    fn listener_direction(&self) -> (String, Vec<u8>) {
        let direction: i64 = if self.listener == "inbound" { 1 } else { 2 };
        (
            "listener_direction".to_owned(),
            direction.to_le_bytes().to_vec(),
        )
    }
}

/// One downstream connection as its requests see it: what they share is
/// built once, not per request.
struct Downstream {
    info: ConnectionInfo,
    /// The connection's properties plus `request.protocol`, for the HTTP
    /// version they were built for (a connection keeps its version).
    properties: RefCell<Option<(Version, Arc<Properties>)>>,
    /// This connection's `wisp_http_requests` counters, by response code.
    request_counters: RefCell<Vec<(u16, Counter)>>,
}

impl Downstream {
    fn properties(&self, version: Version) -> Arc<Properties> {
        let mut cached = self.properties.borrow_mut();
        match &*cached {
            Some((built_for, properties)) if *built_for == version => properties.clone(),
            _ => {
                let mut properties = self.info.properties();
                let protocol = match version {
                    Version::HTTP_2 => "HTTP/2",
                    Version::HTTP_10 => "HTTP/1.0",
                    _ => "HTTP/1.1",
                };
                properties.insert("request.protocol".into(), protocol.into());
                let properties = Arc::new(properties);
                *cached = Some((version, properties.clone()));
                properties
            }
        }
    }

    /// Counts one answered request.
    fn count_request(&self, metrics: &Metrics, status: u16) {
        let mut counters = self.request_counters.borrow_mut();
        if let Some((_, counter)) = counters.iter().find(|(code, _)| *code == status) {
            counter.inc();
            return;
        }
        let counter = metrics
            .requests
            .get_or_create(&RequestLabels {
                source_workload: self.info.source_workload.clone(),
                response_code: status,
            })
            .clone();
        counter.inc();
        counters.push((status, counter));
    }
}

/// A worker's HTTP machinery, shared by all its connections (one thread).
pub struct HttpWorker {
    /// The filter chain new requests use. A config reload swaps in a new one;
    /// requests already running keep the chain they started with.
    chain: RefCell<SharedChain>,
    pub metrics: Arc<Metrics>,
    /// Most body bytes the plugins of one stream may hold back.
    buffer_limit: usize,
    /// Per listener, in the worker's listener order.
    upstreams: Vec<Upstreams>,
    access_log: Option<AccessLog>,
    /// `wisp_http_request_duration` of the whole chain, looked up once.
    chain_duration: Histogram,
}

impl HttpWorker {
    pub fn new(
        chain: SharedChain,
        metrics: Arc<Metrics>,
        upstreams: Vec<Upstreams>,
        access_log: Option<AccessLog>,
        buffer_limit: usize,
    ) -> HttpWorker {
        FilterChain::start_background(&chain);
        let chain_duration = metrics
            .request_duration
            .get_or_create(&PluginLabels {
                plugin: "chain".into(),
            })
            .clone();
        HttpWorker {
            chain: RefCell::new(chain),
            metrics,
            buffer_limit,
            upstreams,
            access_log,
            chain_duration,
        }
    }

    /// The access log, if one is configured (TCP connections use it too).
    pub fn access_log(&self) -> Option<&AccessLog> {
        self.access_log.as_ref()
    }

    /// The chain a request starting now runs through.
    pub fn current_chain(&self) -> SharedChain {
        self.chain.borrow().clone()
    }

    /// Makes `chain` the one new requests use and starts its timers.
    pub fn replace_chain(&self, chain: SharedChain) {
        FilterChain::start_background(&chain);
        *self.chain.borrow_mut() = chain;
    }
}

/// Serves HTTP on `io` until the client closes, or until `shutdown` fires and
/// in-flight requests are done (graceful: HTTP/1 closes after the current
/// response, HTTP/2 sends GOAWAY).
pub async fn serve<I>(
    worker: Rc<HttpWorker>,
    conn: ConnectionInfo,
    io: I,
    mut shutdown: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let span = tracing::info_span!(
        "conn",
        listener = %conn.listener,
        peer = %conn.peer,
        dst = %conn.destination,
        workload = %conn.source_workload
    );
    let conn = Rc::new(Downstream {
        info: conn,
        properties: RefCell::new(None),
        request_counters: RefCell::new(Vec::new()),
    });
    let service = {
        let worker = worker.clone();
        hyper::service::service_fn(move |req| handle(worker.clone(), conn.clone(), req))
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(LocalExec);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let result = async {
        tokio::select! {
            result = connection.as_mut() => result,
            _ = shutdown.wait_for(|stop| *stop) => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        }
    }
    .instrument(span.clone())
    .await;
    if let Err(error) = result {
        span.in_scope(|| tracing::debug!(%error, "downstream connection ended with an error"));
    }
}

/// One request, from its head to the response's head.
///
/// Not an `async fn`: hyper calls this as soon as it has parsed the head,
/// and right after, before it polls the returned future, it polls the
/// connection for EOF. The head's path and header values are slices of
/// hyper's read buffer, so they are converted and dropped here: with no
/// slice left, hyper reuses that buffer instead of allocating a new 8 KiB
/// one for every request.
fn handle(
    worker: Rc<HttpWorker>,
    downstream: Rc<Downstream>,
    req: Request<Incoming>,
) -> impl Future<Output = Result<Response<ProxyBody>, StreamReset>> {
    let started = Instant::now();
    let span = tracing::debug_span!("request", method = %req.method(), path = %req.uri().path());
    // What the access log needs, before the request is consumed.
    let logged = worker.access_log.as_ref().map(|_| {
        let authority = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        LoggedRequest {
            method: req.method().clone(),
            authority,
            path,
            version: req.version(),
            start: std::time::SystemTime::now(),
        }
    });
    let properties = downstream.properties(req.version());
    let (parts, body) = req.into_parts();
    let head = RequestHead {
        version: parts.version,
        headers: request_header_map(&parts, downstream.info.tls.is_some()),
    };
    drop(parts);
    async move {
        let conn = &downstream.info;
        let response = proxy_request(&worker, conn, properties, head, body)
            .instrument(span)
            .await;
        finish(&worker, &downstream, started, logged, response)
    }
}

/// What [`handle`] keeps of a request's head.
struct RequestHead {
    version: Version,
    /// The plugins' view of the request headers (pseudo-headers included).
    headers: HeaderMap,
}

/// What the access log records of a request, taken from its head.
struct LoggedRequest {
    method: http::Method,
    authority: String,
    path: String,
    version: Version,
    start: std::time::SystemTime,
}

/// Logs and counts a request once its response head is known.
fn finish(
    worker: &HttpWorker,
    downstream: &Downstream,
    started: Instant,
    logged: Option<LoggedRequest>,
    response: Result<Response<ProxyBody>, StreamReset>,
) -> Result<Response<ProxyBody>, StreamReset> {
    let conn = &downstream.info;
    let response = match response {
        Ok(response) => response,
        Err(reset) => {
            tracing::debug!(%reset, "resetting the stream");
            return Err(reset);
        }
    };
    if let (Some(log), Some(logged)) = (&worker.access_log, logged) {
        let protocol = if logged.version == Version::HTTP_2 {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        };
        log.record(&Entry {
            connection: ConnectionFields::new(conn, logged.start, started, protocol),
            method: logged.method.as_str(),
            authority: &logged.authority,
            path: &logged.path,
            response_code: response.status().as_u16(),
        });
    }
    downstream.count_request(&worker.metrics, response.status().as_u16());
    worker
        .chain_duration
        .observe(started.elapsed().as_secs_f64());
    Ok(response)
}

/// The service ended the stream without a response: `proxy_close_stream`,
/// or a body that broke after its headers went out. hyper resets the
/// HTTP/2 stream or closes the HTTP/1 connection.
#[derive(Debug, thiserror::Error)]
#[error("stream reset: {0}")]
pub struct StreamReset(String);

/// Why a phase of the exchange stopped before its end.
enum Stop {
    Respond(LocalResponse),
    Reset(String),
    /// The plugins held more than the buffer limit.
    Overflow,
    /// The peer's body broke (reset, malformed chunking).
    Source(String),
}

/// What the chain let through of a body, up to a point.
enum Piece {
    /// Data; `true` if the body is complete after it.
    Data(Vec<u8>, bool),
    /// The last data and the trailers (the body is complete).
    Trailers(Vec<u8>, http::HeaderMap),
}

impl Piece {
    fn complete(&self) -> bool {
        match self {
            Piece::Data(_, end) => *end,
            Piece::Trailers(..) => true,
        }
    }

    fn data_len(&self) -> usize {
        match self {
            Piece::Data(data, _) | Piece::Trailers(data, _) => data.len(),
        }
    }

    /// The data and the trailers, if any.
    fn into_parts(self) -> (Bytes, Option<http::HeaderMap>) {
        match self {
            Piece::Data(data, _) => (Bytes::from(data), None),
            Piece::Trailers(data, trailers) => (Bytes::from(data), Some(trailers)),
        }
    }
}

/// A body the chain reads from: the peer's, or a local reply's.
enum SourceBody {
    Peer(Incoming),
    Local(Option<Bytes>),
}

type SourceFrame = Option<Result<Frame<Bytes>, String>>;

/// A body plus one frame read ahead.
struct Source {
    body: SourceBody,
    peeked: Option<SourceFrame>,
}

impl Source {
    fn peer(body: Incoming) -> Source {
        Source {
            body: SourceBody::Peer(body),
            peeked: None,
        }
    }

    fn local(data: Option<Bytes>) -> Source {
        Source {
            body: SourceBody::Local(data),
            peeked: None,
        }
    }

    async fn frame(&mut self) -> SourceFrame {
        if let Some(frame) = self.peeked.take() {
            return frame;
        }
        self.read().await
    }

    async fn read(&mut self) -> SourceFrame {
        match &mut self.body {
            SourceBody::Peer(body) => body
                .frame()
                .await
                .map(|r| r.map_err(|e| crate::upstream::error_chain(&e))),
            SourceBody::Local(data) => data.take().map(|d| Ok(Frame::data(d))),
        }
    }

    /// Whether the next frame, if it is already here, is the trailers (so
    /// the data before them is the last).
    async fn trailers_next(&mut self) -> bool {
        if self.peeked.is_none()
            && let Ok(frame) = tokio::time::timeout(Duration::ZERO, self.read()).await
        {
            self.peeked = Some(frame);
        }
        matches!(&self.peeked, Some(Some(Ok(frame))) if frame.is_trailers())
    }

    fn is_end_stream(&self) -> bool {
        if self.peeked.is_some() {
            return matches!(self.peeked, Some(None));
        }
        match &self.body {
            SourceBody::Peer(body) => body.is_end_stream(),
            SourceBody::Local(data) => data.is_none(),
        }
    }

    /// The peer's body, taken out (nothing read ahead yet).
    fn take_peer(&mut self) -> Option<Incoming> {
        if self.peeked.is_some() {
            return None;
        }
        match std::mem::replace(&mut self.body, SourceBody::Local(None)) {
            SourceBody::Peer(body) => Some(body),
            local => {
                self.body = local;
                None
            }
        }
    }

    /// The peer's body, if it may still have frames to read.
    fn into_unfinished(self) -> Option<Incoming> {
        match self.body {
            SourceBody::Peer(body) if !body.is_end_stream() => Some(body),
            _ => None,
        }
    }
}

/// One request and its response through the chain. Shared by the request
/// task and the body pumps; the last one to let go ends the plugins'
/// contexts (`on_done`, `on_log`, `on_delete`).
struct Exchange {
    chain: SharedChain,
    state: Rc<StreamState>,
    limit: usize,
    /// Why the request body pump stopped early, for the response side.
    request_failure: RefCell<Option<LocalResponse>>,
    request_pump: RefCell<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Exchange {
    fn drop(&mut self) {
        match self.chain.try_borrow_mut() {
            Ok(mut chain) => chain.finish(&self.state),
            Err(_) => tracing::warn!("stream ended while its chain was busy; contexts leak"),
        }
        // The plugins are done with the stream (`finish` ran their last
        // callbacks): its header maps serve the worker's next requests.
        if let Ok(mut stream) = self.state.stream.try_borrow_mut() {
            header_pool::give_back(std::mem::take(&mut stream.request_headers));
            header_pool::give_back(std::mem::take(&mut stream.response_headers));
        }
    }
}

impl Exchange {
    /// The upstream request from the request headers the chain left, with
    /// the body's length fix applied.
    fn upstream_request(
        &self,
        fix: &LengthFix,
        destination: SocketAddr,
        version: Version,
        body: ChannelBody,
    ) -> Result<Request<ChannelBody>, String> {
        let stream = self.state.stream.borrow();
        upstream_request(
            &fix.applied(&stream.request_headers, version),
            destination,
            version,
            body,
        )
    }

    /// Waits until the plugin that paused `dir` at `slot` lets it go on.
    async fn wait(&self, dir: Direction, slot: usize) -> Result<(), Stop> {
        loop {
            if let Some(resume) = self.state.poll_resume(dir, slot) {
                return match resume {
                    Resume::Continue => Ok(()),
                    Resume::Respond(local) => {
                        self.chain.borrow().count_async_local_response(slot);
                        Err(Stop::Respond(local))
                    }
                    Resume::Reset => Err(Stop::Reset("a plugin closed the stream".into())),
                };
            }
            self.state.changed(dir).await;
        }
    }

    /// Runs the request or response headers through the chain, waiting out pauses.
    async fn headers(&self, dir: Direction, end_of_stream: bool) -> Result<(), Stop> {
        let mut after = None;
        loop {
            let step = self
                .chain
                .borrow_mut()
                .headers(dir, after, &self.state, end_of_stream);
            match step {
                Step::Continue => return Ok(()),
                Step::Respond(local) => return Err(Stop::Respond(local)),
                Step::Paused(slot) => {
                    self.wait(dir, slot).await?;
                    after = Some(slot);
                }
            }
        }
    }

    /// Reads `source` through the chain until the plugins let something
    /// through or the body ends. `consumed` counts the bytes read.
    async fn next_piece(
        &self,
        dir: Direction,
        source: &mut Source,
        ended: &mut bool,
        consumed: &mut usize,
    ) -> Result<Piece, Stop> {
        loop {
            let frame = if *ended {
                Some(None)
            } else {
                tokio::select! {
                    biased;
                    frame = source.frame() => Some(frame),
                    _ = self.state.changed(dir) => None,
                }
            };
            let mut step = match frame {
                // Woken: a plugin holding data may have resumed or answered.
                None => {
                    if let Some(local) = self.state.stream.borrow_mut().local_response.take() {
                        return Err(Stop::Respond(local));
                    }
                    let Some(slot) = self.state.take_resumed(dir) else {
                        continue;
                    };
                    self.chain.borrow_mut().body(
                        dir,
                        Some(slot),
                        &self.state,
                        Vec::new(),
                        false,
                        self.limit,
                    )
                }
                Some(None) => {
                    if *ended && self.state.buffered_bytes() == 0 {
                        return Ok(Piece::Data(Vec::new(), true));
                    }
                    *ended = true;
                    self.chain.borrow_mut().body(
                        dir,
                        None,
                        &self.state,
                        Vec::new(),
                        true,
                        self.limit,
                    )
                }
                Some(Some(Err(error))) => return Err(Stop::Source(error)),
                Some(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        *consumed += data.len();
                        let end = source.is_end_stream();
                        *ended = end;
                        // Data and trailers that arrive together make one
                        // piece, so the trailers can be declared (HTTP/1.1).
                        let last = !end && source.trailers_next().await;
                        let step = self.chain.borrow_mut().body(
                            dir,
                            None,
                            &self.state,
                            data.to_vec(),
                            end,
                            self.limit,
                        );
                        if last {
                            let forwarded = match step {
                                BodyStep::Forward(data) => data,
                                BodyStep::Buffered | BodyStep::Paused(_) => Vec::new(),
                                BodyStep::Respond(local) => return Err(Stop::Respond(local)),
                                BodyStep::Overflow => return Err(Stop::Overflow),
                            };
                            let trailers = match source.frame().await {
                                Some(Ok(frame)) => frame.into_trailers().unwrap_or_default(),
                                _ => http::HeaderMap::new(),
                            };
                            *ended = true;
                            return match self.trailers(dir, trailers).await? {
                                Piece::Trailers(mut carry, trailers) => {
                                    carry.splice(0..0, forwarded);
                                    Ok(Piece::Trailers(carry, trailers))
                                }
                                piece => Ok(piece),
                            };
                        }
                        step
                    }
                    Err(frame) => {
                        *ended = true;
                        let trailers = frame.into_trailers().unwrap_or_default();
                        return self.trailers(dir, trailers).await;
                    }
                },
            };
            loop {
                match step {
                    BodyStep::Forward(data) => {
                        if *ended {
                            return Ok(Piece::Data(data, true));
                        }
                        if !data.is_empty() {
                            return Ok(Piece::Data(data, false));
                        }
                        break;
                    }
                    BodyStep::Buffered => break,
                    BodyStep::Paused(slot) => {
                        self.wait(dir, slot).await?;
                        step = self.chain.borrow_mut().body(
                            dir,
                            Some(slot),
                            &self.state,
                            Vec::new(),
                            true,
                            self.limit,
                        );
                    }
                    BodyStep::Respond(local) => return Err(Stop::Respond(local)),
                    BodyStep::Overflow => return Err(Stop::Overflow),
                }
            }
        }
    }

    /// Trailers through the chain; what plugins held of the body comes first.
    async fn trailers(&self, dir: Direction, trailers: http::HeaderMap) -> Result<Piece, Stop> {
        {
            let mut stream = self.state.stream.borrow_mut();
            let map = to_wasm_map(&trailers);
            match dir {
                Direction::Request => stream.request_trailers = map,
                Direction::Response => stream.response_trailers = map,
            }
        }
        let mut carry = Vec::new();
        let mut after = None;
        loop {
            let step = self
                .chain
                .borrow_mut()
                .trailers(dir, after, &self.state, &mut carry);
            match step {
                Step::Continue => break,
                Step::Respond(local) => return Err(Stop::Respond(local)),
                Step::Paused(slot) => {
                    self.wait(dir, slot).await?;
                    after = Some(slot);
                }
            }
        }
        let mut stream = self.state.stream.borrow_mut();
        let map = match dir {
            Direction::Request => std::mem::take(&mut stream.request_trailers),
            Direction::Response => std::mem::take(&mut stream.response_trailers),
        };
        Ok(Piece::Trailers(carry, to_http_map(&map)))
    }

    /// Sends the rest of `source` through the chain into `sender`.
    async fn pump(
        self: Rc<Self>,
        dir: Direction,
        mut source: Source,
        mut ended: bool,
        sender: BodySender,
    ) {
        let mut consumed = 0;
        loop {
            let piece = self
                .next_piece(dir, &mut source, &mut ended, &mut consumed)
                .await;
            match piece {
                Ok(piece) => {
                    let complete = piece.complete();
                    let (data, trailers) = piece.into_parts();
                    if !sender.data(data).await {
                        return;
                    }
                    if let Some(trailers) = trailers
                        && !sender.trailers(trailers).await
                    {
                        return;
                    }
                    if complete {
                        return;
                    }
                }
                Err(stop) => {
                    let reason = match stop {
                        Stop::Respond(local) => {
                            let reason = format!("a plugin answered {} mid-body", local.status);
                            if dir == Direction::Request {
                                *self.request_failure.borrow_mut() = Some(local);
                            }
                            reason
                        }
                        Stop::Overflow => {
                            if dir == Direction::Request {
                                *self.request_failure.borrow_mut() = Some(payload_too_large());
                            }
                            "the plugins' body buffer limit was exceeded".to_owned()
                        }
                        Stop::Reset(reason) | Stop::Source(reason) => reason,
                    };
                    tracing::info!(?dir, %reason, "body stopped after its headers went out");
                    sender.abort(reason).await;
                    return;
                }
            }
        }
    }

    /// Reads `source` up to the first piece the chain lets through and
    /// returns the body that starts with it, the sender for the rest (if
    /// more follows), and the content-length fix for the headers.
    async fn first_piece(
        &self,
        dir: Direction,
        source: &mut Source,
        ended: &mut bool,
    ) -> Result<(Option<BodySender>, ChannelBody, LengthFix), Stop> {
        let mut consumed = 0;
        let piece = self.next_piece(dir, source, ended, &mut consumed).await?;
        let complete = piece.complete();
        let forwarded = piece.data_len();
        let fix = if complete {
            let trailer_names = match &piece {
                Piece::Trailers(_, trailers) => Some(
                    trailers
                        .keys()
                        .map(|name| name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
                Piece::Data(..) => None,
            };
            LengthFix::Set(forwarded, trailer_names)
        } else if forwarded != consumed {
            LengthFix::Remove
        } else {
            LengthFix::Keep
        };
        let (data, trailers) = piece.into_parts();
        let (sender, body) = ChannelBody::new(data, trailers, !complete);
        Ok((sender, body, fix))
    }
}

/// What the headers' content-length must become once the chain had its say
/// on the first part of the body.
#[derive(Clone, Debug, PartialEq, Eq)]
enum LengthFix {
    /// Pass-through so far: keep what the plugins left.
    Keep,
    /// The plugins changed the data of a body that still streams: the
    /// length is unknown (chunked in HTTP/1.1).
    Remove,
    /// The whole body is known: its length, and the names of the trailers
    /// that follow, if any (HTTP/1.1 carries them only chunked and declared
    /// in a `trailer` header).
    Set(usize, Option<String>),
}

impl LengthFix {
    /// `headers` with the fix applied; borrowed when nothing changes, which
    /// is the common case (no plugin touched the body), so the headers are
    /// not copied for it.
    fn applied<'a>(&self, headers: &'a HeaderMap, version: Version) -> Cow<'a, HeaderMap> {
        match self {
            LengthFix::Keep => Cow::Borrowed(headers),
            LengthFix::Remove if !headers.contains("content-length") => Cow::Borrowed(headers),
            LengthFix::Remove => {
                let mut headers = headers.clone();
                headers.remove("content-length");
                Cow::Owned(headers)
            }
            LengthFix::Set(_, Some(names)) if version != Version::HTTP_2 => {
                let mut headers = headers.clone();
                headers.remove("content-length");
                if !names.is_empty() {
                    headers.replace("trailer", names.as_bytes());
                }
                Cow::Owned(headers)
            }
            LengthFix::Set(length, _) => {
                let declared = headers.get("content-length");
                if declared.is_none_or(|declared| declares(declared, *length)) {
                    return Cow::Borrowed(headers);
                }
                let mut headers = headers.clone();
                headers.replace("content-length", length.to_string().as_bytes());
                Cow::Owned(headers)
            }
        }
    }
}

/// Whether a `content-length` value is exactly `length` in canonical form
/// (no sign, no leading zeros), without formatting `length`.
fn declares(declared: &[u8], length: usize) -> bool {
    declared.iter().all(u8::is_ascii_digit)
        && (declared == b"0" || declared.first() != Some(&b'0'))
        && std::str::from_utf8(declared).is_ok_and(|d| d.parse() == Ok(length))
}

/// Envoy's answer when the plugins buffered more of a request than allowed.
fn payload_too_large() -> LocalResponse {
    local_reply(413, "request_payload_too_large", "Payload Too Large")
}

async fn proxy_request(
    worker: &HttpWorker,
    conn: &ConnectionInfo,
    properties: Arc<Properties>,
    head: RequestHead,
    body: Incoming,
) -> Result<Response<ProxyBody>, StreamReset> {
    let version = head.version;
    let ex = Rc::new(Exchange {
        chain: worker.current_chain(),
        state: StreamState::new(HttpStream {
            request_headers: head.headers,
            connection_properties: Some(properties),
            ..Default::default()
        }),
        limit: worker.buffer_limit,
        request_failure: RefCell::new(None),
        request_pump: RefCell::new(None),
    });
    let mut request_source = Source::peer(body);
    let mut ended = request_source.is_end_stream();

    let upstream_response = match request_phase(&ex, &mut request_source, &mut ended).await {
        Err(Stop::Reset(reason)) => return Err(StreamReset(reason)),
        Err(Stop::Respond(local)) => Err(local),
        Err(Stop::Overflow) => Err(payload_too_large()),
        Err(Stop::Source(reason)) => {
            tracing::info!(%reason, "the client's request body broke");
            return Err(StreamReset(reason));
        }
        Ok((fix, body)) => match ex.upstream_request(&fix, conn.destination, version, body) {
            // The request goes to the pool right here; the future only
            // waits for the answer (see `Upstreams::send`).
            Ok(request) => match worker.upstreams[conn.listener_index]
                .send(conn.destination, request)
                .await
            {
                Ok(response) => Ok(response),
                // A request body the chain stopped midway explains the failure.
                Err(_) if ex.request_failure.borrow().is_some() => {
                    Err(ex.request_failure.borrow_mut().take().unwrap_or_default())
                }
                Err(error) => Err(upstream_failure(worker, conn.destination, &error)),
            },
            Err(message) => {
                tracing::warn!(%message, "filter chain produced an invalid request");
                Err(local_reply(500, "invalid_request_after_filters", &message))
            }
        },
    };

    let (status, headers, source) = match upstream_response {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            (parts.status, parts.headers, Source::peer(body))
        }
        Err(local) => {
            let (status, headers, body) = local_response_parts(local);
            (
                status,
                headers,
                Source::local((!body.is_empty()).then_some(body)),
            )
        }
    };
    let response = response_phase(&ex, status, headers, source, version).await;
    let complete = response
        .as_ref()
        .map_or(true, |response| response.body().is_end_stream());
    if ex.request_pump.borrow().is_some() && complete {
        // The answer is complete: nothing will read the rest of the request.
        abort_request_pump(&ex);
    }
    if let (false, Some(body)) = (ended, request_source.into_unfinished()) {
        // Answered before the request body ended (a local reply, 413): read
        // and drop the rest, so an HTTP/2 client still uploading gets the
        // answer instead of a reset.
        tokio::task::spawn_local(drain(body));
    }
    response
}

/// Reads and discards what is left of a request body, within limits.
async fn drain(mut body: Incoming) {
    const MAX_DRAIN_BYTES: usize = 16 * 1024 * 1024;
    const MAX_DRAIN_TIME: Duration = Duration::from_secs(30);
    let _ = tokio::time::timeout(MAX_DRAIN_TIME, async {
        let mut drained = 0;
        while let Some(Ok(frame)) = body.frame().await {
            drained += frame.data_ref().map_or(0, Bytes::len);
            if drained > MAX_DRAIN_BYTES {
                break;
            }
        }
    })
    .await;
}

fn abort_request_pump(ex: &Exchange) {
    if let Some(pump) = ex.request_pump.borrow_mut().take() {
        pump.abort();
    }
}

/// Request headers, then the request body up to what the chain first lets
/// through; the rest streams from a task. Returns what the request
/// headers' content-length must become, and the upstream request's body.
async fn request_phase(
    ex: &Rc<Exchange>,
    source: &mut Source,
    ended: &mut bool,
) -> Result<(LengthFix, ChannelBody), Stop> {
    ex.headers(Direction::Request, *ended).await?;
    if *ended {
        return Ok((LengthFix::Keep, ChannelBody::empty()));
    }
    if ex.chain.borrow().is_empty()
        && let Some(body) = source.take_peer()
    {
        // No plugin sees the body: it streams through untouched.
        *ended = true;
        return Ok((LengthFix::Keep, ChannelBody::direct(body)));
    }
    let (sender, body, fix) = ex.first_piece(Direction::Request, source, ended).await?;
    if let Some(sender) = sender {
        let source = std::mem::replace(source, Source::local(None));
        let pump =
            tokio::task::spawn_local(ex.clone().pump(Direction::Request, source, *ended, sender));
        *ex.request_pump.borrow_mut() = Some(pump);
    }
    Ok((fix, body))
}

/// Response headers and body through the chain (in reverse order), for an
/// upstream answer or a local reply alike.
async fn response_phase(
    ex: &Rc<Exchange>,
    status: StatusCode,
    headers: http::HeaderMap,
    mut source: Source,
    version: Version,
) -> Result<Response<ProxyBody>, StreamReset> {
    let (plugin_view, original) = response_header_map_keeping(status, headers);
    ex.state.stream.borrow_mut().response_headers = plugin_view;
    let mut ended = source.is_end_stream();
    let replaced = |local: LocalResponse| {
        let (status, headers, body) = local_response_parts(local);
        Ok(build_response(
            status,
            &response_header_map(status, &headers),
            ChannelBody::full(body),
        ))
    };
    match ex.headers(Direction::Response, ended).await {
        Ok(()) => {}
        Err(Stop::Respond(local)) => return replaced(local),
        Err(Stop::Reset(reason) | Stop::Source(reason)) => return Err(StreamReset(reason)),
        Err(Stop::Overflow) => return replaced(response_too_large()),
    }
    let respond = |fix: &LengthFix, body: ProxyBody| {
        let stream = ex.state.stream.borrow();
        build_response_reusing(
            status,
            &fix.applied(&stream.response_headers, version),
            original,
            body,
        )
    };
    if ended {
        return Ok(respond(&LengthFix::Keep, ChannelBody::empty()));
    }
    if ex.chain.borrow().is_empty()
        && let Some(body) = source.take_peer()
    {
        return Ok(respond(&LengthFix::Keep, ChannelBody::direct(body)));
    }
    let (sender, body, fix) = match ex
        .first_piece(Direction::Response, &mut source, &mut ended)
        .await
    {
        Ok(first) => first,
        Err(Stop::Respond(local)) => return replaced(local),
        Err(Stop::Overflow) => return replaced(response_too_large()),
        Err(Stop::Reset(reason)) => return Err(StreamReset(reason)),
        Err(Stop::Source(reason)) => {
            tracing::warn!(%reason, "upstream reset the response body");
            return replaced(local_reply(
                503,
                "upstream_reset_after_response_started",
                &format!(
                    "upstream connect error or disconnect/reset before headers. reset reason: {reason}"
                ),
            ));
        }
    };
    if let Some(sender) = sender {
        let ex = ex.clone();
        tokio::task::spawn_local(async move {
            ex.clone()
                .pump(Direction::Response, source, ended, sender)
                .await;
            abort_request_pump(&ex);
        });
    }
    Ok(respond(&fix, body))
}

/// Envoy's answer when the plugins buffered more of a response than allowed.
fn response_too_large() -> LocalResponse {
    local_reply(500, "response_payload_too_large", "Internal Server Error")
}

/// Envoy's 503 reply, with the reason, for a request the upstream did not
/// answer; logged and counted.
fn upstream_failure(
    worker: &HttpWorker,
    destination: SocketAddr,
    error: &UpstreamError,
) -> LocalResponse {
    let details = match error {
        UpstreamError::Connect(_) => {
            worker.metrics.upstream_connect_errors.inc();
            tracing::warn!(%destination, %error, "cannot connect to the original destination");
            "upstream_connection_failure"
        }
        UpstreamError::Request(_) => {
            tracing::warn!(%destination, %error, "upstream reset before response headers");
            "upstream_reset_before_response_started"
        }
    };
    local_reply(
        503,
        details,
        &format!(
            "upstream connect error or disconnect/reset before headers. reset reason: {error}"
        ),
    )
}

fn local_response_parts(local: LocalResponse) -> (StatusCode, http::HeaderMap, Bytes) {
    let status = StatusCode::from_u16(local.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut headers = http::HeaderMap::new();
    for (name, value) in &local.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    if !local.body.is_empty() && !headers.contains_key(header::CONTENT_TYPE) {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(local.body.len()));
    (status, headers, Bytes::from(local.body))
}

fn local_reply(status: u16, details: &str, body: &str) -> LocalResponse {
    LocalResponse {
        status,
        details: details.to_owned(),
        body: format!("{body}\n").into_bytes(),
        headers: Vec::new(),
        grpc_status: -1,
    }
}

#[cfg(test)]
mod tests {
    use super::declares;

    #[test]
    fn only_the_canonical_form_declares_a_length() {
        assert!(declares(b"17", 17));
        assert!(declares(b"0", 0));
        for other in [&b"18"[..], b"017", b"+17", b" 17", b"", b"1e1"] {
            assert!(!declares(other, 17), "{:?}", String::from_utf8_lossy(other));
        }
    }
}
