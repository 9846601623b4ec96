//! HTTP/1.1 proxying of one steered connection: each request goes through the
//! worker's filter chain and on to the connection's original destination.
//!
//! All requests of a steered connection were headed to the same destination,
//! so each downstream connection gets one upstream connection, opened on the
//! first request and reused while both sides keep it alive.

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tracing::Instrument;
use wisp_wasm_host::{HeaderMap, HttpStream, LocalResponse};

use crate::filter_chain::{FilterChain, RequestVerdict, StreamContexts};
use crate::metrics::{Metrics, PluginLabels, RequestLabels};

pub type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

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

/// What the agent knows about one steered connection.
pub struct SteeredConnection {
    pub peer: SocketAddr,
    pub original_dst: SocketAddr,
    pub source_workload: String,
}

/// Per-connection state shared by its requests (single-threaded: a worker's
/// connections never leave its thread).
pub struct ConnectionProxy {
    conn: SteeredConnection,
    chain: Rc<RefCell<FilterChain>>,
    metrics: std::sync::Arc<Metrics>,
    upstream: RefCell<Option<SendRequest<Incoming>>>,
}

impl ConnectionProxy {
    pub fn new(
        conn: SteeredConnection,
        chain: Rc<RefCell<FilterChain>>,
        metrics: std::sync::Arc<Metrics>,
    ) -> Rc<ConnectionProxy> {
        Rc::new(ConnectionProxy {
            conn,
            chain,
            metrics,
            upstream: RefCell::new(None),
        })
    }

    /// Serves HTTP/1.1 on `io` until the client or the upstream closes.
    pub async fn serve(self: Rc<Self>, io: tokio::net::TcpStream) {
        let span = tracing::info_span!(
            "conn",
            peer = %self.conn.peer,
            dst = %self.conn.original_dst,
            workload = %self.conn.source_workload
        );
        let proxy = self.clone();
        let service = hyper::service::service_fn(move |req| proxy.clone().handle(req));
        let result = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(std::time::Duration::from_secs(30))
            .serve_connection(TokioIo::new(io), service)
            .instrument(span.clone())
            .await;
        if let Err(error) = result {
            span.in_scope(|| tracing::debug!(%error, "downstream connection ended with an error"));
        }
    }

    async fn handle(
        self: Rc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let started = Instant::now();
        let span = tracing::info_span!("request", method = %req.method(), path = %req.uri().path());
        let response = self.proxy_request(req).instrument(span).await;
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                source_workload: self.conn.source_workload.clone(),
                response_code: response.status().as_u16(),
            })
            .inc();
        self.metrics
            .request_duration
            .get_or_create(&PluginLabels {
                plugin: "chain".into(),
            })
            .observe(started.elapsed().as_secs_f64());
        Ok(response)
    }

    async fn proxy_request(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let mut stream = HttpStream {
            request_headers: request_header_map(&parts),
            properties: self.properties(),
            ..Default::default()
        };
        let mut contexts = StreamContexts::default();
        let verdict = self.chain.borrow_mut().on_request_headers(
            &mut contexts,
            &mut stream,
            body.is_end_stream(),
            &self.metrics,
        );

        let upstream_response = match verdict {
            RequestVerdict::Respond(local) => Err(local),
            RequestVerdict::Forward => match upstream_request(&stream.request_headers, body) {
                Ok(request) => self.forward(request).await,
                Err(message) => {
                    tracing::warn!(%message, "filter chain produced an invalid request");
                    Err(local_reply(500, "invalid_request_after_filters", &message))
                }
            },
        };

        let (status, headers, body) = match upstream_response {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                (parts.status, parts.headers, body.boxed_unsync())
            }
            Err(local) => local_response_parts(local),
        };
        stream.response_headers = response_header_map(status, &headers);
        let replaced = self.chain.borrow_mut().on_response_headers(
            &mut contexts,
            &mut stream,
            body.is_end_stream(),
            &self.metrics,
        );
        let response = match replaced {
            Some(local) => {
                let (status, headers, body) = local_response_parts(local);
                build_response(status, &response_header_map(status, &headers), body)
            }
            None => build_response(status, &stream.response_headers, body),
        };
        self.chain
            .borrow_mut()
            .finish(contexts, &mut stream, &self.metrics);
        response
    }

    /// Sends the request on this connection's upstream connection, opening
    /// it first if needed.
    async fn forward(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Incoming>, LocalResponse> {
        let existing = self.upstream.borrow_mut().take();
        let mut sender = match existing {
            Some(sender) if !sender.is_closed() => sender,
            _ => self.connect_upstream().await?,
        };
        if sender.ready().await.is_err() {
            sender = self.connect_upstream().await?;
        }
        match sender.send_request(request).await {
            Ok(response) => {
                *self.upstream.borrow_mut() = Some(sender);
                Ok(response)
            }
            Err(error) => {
                tracing::warn!(%error, "upstream reset before response headers");
                Err(local_reply(
                    503,
                    "upstream_reset_before_response_started",
                    &format!(
                        "upstream connect error or disconnect/reset before headers. reset reason: {error}"
                    ),
                ))
            }
        }
    }

    async fn connect_upstream(&self) -> Result<SendRequest<Incoming>, LocalResponse> {
        let dst = self.conn.original_dst;
        let fail = |error: &dyn std::fmt::Display| {
            self.metrics.upstream_connect_errors.inc();
            tracing::warn!(%dst, %error, "cannot connect to the original destination");
            local_reply(
                503,
                "upstream_connection_failure",
                &format!(
                    "upstream connect error or disconnect/reset before headers. reset reason: connection failure ({error})"
                ),
            )
        };
        let tcp = tokio::net::TcpStream::connect(dst)
            .await
            .map_err(|e| fail(&e))?;
        let _ = tcp.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| fail(&e))?;
        tokio::task::spawn_local(
            async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "upstream connection ended with an error");
                }
            }
            .in_current_span(),
        );
        Ok(sender)
    }

    /// Properties plugins can read with `proxy_get_property`.
    fn properties(&self) -> std::collections::HashMap<String, Vec<u8>> {
        let conn = &self.conn;
        [
            ("source.address", conn.peer.to_string()),
            ("source.port", conn.peer.port().to_string()),
            ("destination.address", conn.original_dst.to_string()),
            ("destination.port", conn.original_dst.port().to_string()),
            ("source.workload", conn.source_workload.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.into_bytes()))
        .collect()
    }
}

/// The request headers as Proxy-Wasm plugins see them in Envoy: pseudo-headers
/// first, `host` folded into `:authority`, hop-by-hop headers dropped.
fn request_header_map(parts: &http::request::Parts) -> HeaderMap {
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
        (":scheme".to_owned(), b"http".to_vec()),
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

/// Builds the upstream request from the headers the filter chain left.
fn upstream_request(headers: &HeaderMap, body: Incoming) -> Result<Request<Incoming>, String> {
    let pseudo = |name: &str| {
        headers
            .get(name)
            .ok_or_else(|| format!("the request lost its {name} pseudo-header"))
    };
    let method =
        http::Method::from_bytes(pseudo(":method")?).map_err(|e| format!(":method: {e}"))?;
    let path = http::Uri::try_from(pseudo(":path")?).map_err(|e| format!(":path: {e}"))?;
    let mut builder = Request::builder().method(method).uri(path);
    let authority = pseudo(":authority")?;
    if !authority.is_empty() {
        builder = builder.header(
            header::HOST,
            HeaderValue::from_bytes(authority).map_err(|e| format!(":authority: {e}"))?,
        );
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
