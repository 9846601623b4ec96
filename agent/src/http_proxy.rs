//! HTTP proxying of one accepted connection: HTTP/1.1 or HTTP/2 (hyper's
//! auto server tells them apart by the HTTP/2 preface), each request through
//! the worker's filter chain and on to the connection's destination over
//! the worker's pooled upstream client, in the same HTTP version.

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::watch;
use tracing::Instrument;
use wisp_wasm_host::{HeaderMap, HttpStream, LocalResponse};

use crate::access_log::{AccessLog, Entry};
use crate::filter_chain::{FilterChain, RequestVerdict, StreamContexts};
use crate::metrics::{Metrics, PluginLabels, RequestLabels};
use crate::tls::TlsInfo;
use crate::upstream::{LocalExec, UpstreamError, Upstreams};

pub type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head accepted (hyper answers 431 past it, as Envoy's
/// 60 KiB `max_request_headers_kb` default does).
pub const MAX_HEADER_BYTES: usize = 60 * 1024;

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// Where one accepted connection came from and is going.
pub struct ConnectionInfo {
    pub listener: String,
    /// Index of the listener in the worker's listener list.
    pub listener_index: usize,
    /// What TLS termination established, if the listener terminates TLS.
    pub tls: Option<TlsInfo>,
    pub peer: SocketAddr,
    pub destination: SocketAddr,
    pub source_workload: String,
}

/// A worker's HTTP machinery, shared by all its connections (one thread).
pub struct HttpWorker {
    /// The filter chain new requests use. A config reload swaps in a new one;
    /// requests already running keep the chain they started with.
    chain: RefCell<Rc<RefCell<FilterChain>>>,
    pub metrics: Arc<Metrics>,
    /// Per listener, in the worker's listener order.
    upstreams: Vec<Upstreams>,
    access_log: Option<AccessLog>,
}

impl HttpWorker {
    pub fn new(
        chain: FilterChain,
        metrics: Arc<Metrics>,
        upstreams: Vec<Upstreams>,
        access_log: Option<AccessLog>,
    ) -> HttpWorker {
        HttpWorker {
            chain: RefCell::new(Rc::new(RefCell::new(chain))),
            metrics,
            upstreams,
            access_log,
        }
    }

    /// The chain a request starting now runs through.
    pub fn current_chain(&self) -> Rc<RefCell<FilterChain>> {
        self.chain.borrow().clone()
    }

    /// Makes `chain` the one new requests use.
    pub fn replace_chain(&self, chain: FilterChain) {
        *self.chain.borrow_mut() = Rc::new(RefCell::new(chain));
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
    let conn = Rc::new(conn);
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

async fn handle(
    worker: Rc<HttpWorker>,
    conn: Rc<ConnectionInfo>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
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
        (
            req.method().clone(),
            authority,
            path,
            req.version(),
            std::time::SystemTime::now(),
        )
    });
    let response = proxy_request(&worker, &conn, req).instrument(span).await;
    if let (Some(log), Some((method, authority, path, version, start))) =
        (&worker.access_log, logged)
    {
        log.record(&Entry {
            start_time_unix_ms: start
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            listener: &conn.listener,
            source_workload: &conn.source_workload,
            peer: conn.peer,
            destination: conn.destination,
            protocol: if version == Version::HTTP_2 {
                "HTTP/2"
            } else {
                "HTTP/1.1"
            },
            method: method.as_str(),
            authority: &authority,
            path: &path,
            response_code: response.status().as_u16(),
        });
    }
    worker
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            source_workload: conn.source_workload.clone(),
            response_code: response.status().as_u16(),
        })
        .inc();
    worker
        .metrics
        .request_duration
        .get_or_create(&PluginLabels {
            plugin: "chain".into(),
        })
        .observe(started.elapsed().as_secs_f64());
    Ok(response)
}

async fn proxy_request(
    worker: &HttpWorker,
    conn: &ConnectionInfo,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    let version = parts.version;
    let mut stream = HttpStream {
        request_headers: request_header_map(&parts, conn.tls.is_some()),
        properties: properties(conn, version),
        ..Default::default()
    };
    let mut contexts = StreamContexts::default();
    let chain = worker.current_chain();
    let verdict = chain.borrow_mut().on_request_headers(
        &mut contexts,
        &mut stream,
        body.is_end_stream(),
        &worker.metrics,
    );

    let upstream_response = match verdict {
        RequestVerdict::Respond(local) => Err(local),
        RequestVerdict::Forward => {
            match upstream_request(&stream.request_headers, conn.destination, version, body) {
                Ok(request) => forward(worker, conn, request).await,
                Err(message) => {
                    tracing::warn!(%message, "filter chain produced an invalid request");
                    Err(local_reply(500, "invalid_request_after_filters", &message))
                }
            }
        }
    };

    let (status, headers, body) = match upstream_response {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            (parts.status, parts.headers, body.boxed_unsync())
        }
        Err(local) => local_response_parts(local),
    };
    stream.response_headers = response_header_map(status, &headers);
    let replaced = chain.borrow_mut().on_response_headers(
        &mut contexts,
        &mut stream,
        body.is_end_stream(),
        &worker.metrics,
    );
    let response = match replaced {
        Some(local) => {
            let (status, headers, body) = local_response_parts(local);
            build_response(status, &response_header_map(status, &headers), body)
        }
        None => build_response(status, &stream.response_headers, body),
    };
    chain
        .borrow_mut()
        .finish(contexts, &mut stream, &worker.metrics);
    response
}

/// Sends the request to the connection's destination; a failure becomes
/// Envoy's 503 reply with the reason.
async fn forward(
    worker: &HttpWorker,
    conn: &ConnectionInfo,
    request: Request<Incoming>,
) -> Result<Response<Incoming>, LocalResponse> {
    let destination = conn.destination;
    let upstreams = &worker.upstreams[conn.listener_index];
    upstreams.send(destination, request).await.map_err(|error| {
        let details = match &error {
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
    })
}

/// Properties plugins can read with `proxy_get_property`.
fn properties(
    conn: &ConnectionInfo,
    version: Version,
) -> std::collections::HashMap<String, Vec<u8>> {
    let protocol = match version {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    let tls = conn
        .tls
        .as_ref()
        .map(TlsInfo::properties)
        .unwrap_or_default();
    [
        ("source.address", conn.peer.to_string()),
        ("source.port", conn.peer.port().to_string()),
        ("destination.address", conn.destination.to_string()),
        ("destination.port", conn.destination.port().to_string()),
        ("source.workload", conn.source_workload.clone()),
        ("request.protocol", protocol.to_owned()),
    ]
    .into_iter()
    .chain(tls)
    .map(|(k, v)| (k.to_owned(), v.into_bytes()))
    .chain(std::iter::once(listener_direction(conn)))
    .collect()
}

/// Envoy's `listener_direction` attribute (an int64: 1 INBOUND, 2
/// OUTBOUND), so a plugin can tell connections into a pod from those out.
fn listener_direction(conn: &ConnectionInfo) -> (String, Vec<u8>) {
    let direction: i64 = if conn.listener == "inbound" { 1 } else { 2 };
    (
        "listener_direction".to_owned(),
        direction.to_le_bytes().to_vec(),
    )
}

/// The request headers as Proxy-Wasm plugins see them in Envoy: pseudo-headers
/// first, `host` folded into `:authority`, hop-by-hop headers dropped.
fn request_header_map(parts: &http::request::Parts, tls: bool) -> HeaderMap {
    let authority = parts
        .headers
        .get(header::HOST)
        .map(|h| h.as_bytes().to_vec())
        .or_else(|| {
            parts
                .uri
                .authority()
                .map(|a| a.as_str().as_bytes().to_vec())
        })
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .as_bytes()
        .to_vec();
    let mut map: HeaderMap = [
        (":authority".to_owned(), authority),
        (":path".to_owned(), path),
        (
            ":method".to_owned(),
            parts.method.as_str().as_bytes().to_vec(),
        ),
        (
            ":scheme".to_owned(),
            if tls {
                b"https".to_vec()
            } else {
                b"http".to_vec()
            },
        ),
    ]
    .into_iter()
    .collect();
    for (name, value) in &parts.headers {
        if name != header::HOST && !HOP_BY_HOP.contains(&name.as_str()) {
            map.add(name.as_str(), value.as_bytes());
        }
    }
    map
}

fn response_header_map(status: StatusCode, headers: &http::HeaderMap) -> HeaderMap {
    let mut map: HeaderMap =
        std::iter::once((":status".to_owned(), status.as_str().as_bytes().to_vec())).collect();
    for (name, value) in headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            map.add(name.as_str(), value.as_bytes());
        }
    }
    map
}

/// Builds the upstream request from the headers the filter chain left,
/// addressed to `destination` (the pool key) in the downstream's HTTP version.
fn upstream_request(
    headers: &HeaderMap,
    destination: SocketAddr,
    version: Version,
    body: Incoming,
) -> Result<Request<Incoming>, String> {
    let pseudo = |name: &str| {
        headers
            .get(name)
            .ok_or_else(|| format!("the request lost its {name} pseudo-header"))
    };
    let method =
        http::Method::from_bytes(pseudo(":method")?).map_err(|e| format!(":method: {e}"))?;
    let path = std::str::from_utf8(pseudo(":path")?).map_err(|e| format!(":path: {e}"))?;
    if !path.starts_with('/') && path != "*" {
        return Err(format!(":path {path:?} is not an origin-form path"));
    }
    let authority =
        std::str::from_utf8(pseudo(":authority")?).map_err(|e| format!(":authority: {e}"))?;
    let mut builder = Request::builder().method(method).version(version);
    if version == Version::HTTP_2 {
        // HTTP/2 carries the authority in the URI (:authority); the
        // connection itself goes to `destination` (see upstream.rs).
        let authority = if authority.is_empty() {
            destination.to_string()
        } else {
            authority.to_owned()
        };
        builder = builder.uri(format!("http://{authority}{path}"));
    } else {
        // HTTP/1.1: the URI names the destination (the pool key) and is sent
        // in origin form; the authority travels as Host.
        builder = builder.uri(format!("http://{destination}{path}"));
        if !authority.is_empty() {
            let host = HeaderValue::from_str(authority).map_err(|e| format!(":authority: {e}"))?;
            builder = builder.header(header::HOST, host);
        }
    }
    for (name, value) in headers.iter().filter(|(name, _)| !name.starts_with(':')) {
        let name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|e| format!("header {name:?}: {e}"))?;
        let value = HeaderValue::from_bytes(value).map_err(|e| format!("header {name}: {e}"))?;
        builder = builder.header(name, value);
    }
    builder.body(body).map_err(|e| e.to_string())
}

/// Builds the downstream response from the headers the filter chain left.
fn build_response(status: StatusCode, headers: &HeaderMap, body: ProxyBody) -> Response<ProxyBody> {
    let status = headers
        .get(":status")
        .and_then(|s| std::str::from_utf8(s).ok()?.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(status);
    let mut response = Response::new(body);
    *response.status_mut() = status;
    for (name, value) in headers.iter().filter(|(name, _)| !name.starts_with(':')) {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            (Ok(name), Ok(value)) => {
                response.headers_mut().append(name, value);
            }
            _ => tracing::warn!(
                header = name,
                "dropping a response header that is not valid HTTP"
            ),
        }
    }
    response
}

fn local_response_parts(local: LocalResponse) -> (StatusCode, http::HeaderMap, ProxyBody) {
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
    let body = Full::new(Bytes::from(local.body))
        .map_err(|never: Infallible| match never {})
        .boxed_unsync();
    (status, headers, body)
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
