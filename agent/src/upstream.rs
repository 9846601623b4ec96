//! A worker's connections to upstream destinations, pooled per destination:
//! HTTP/1.1 keep-alive connections ([`http1_pool`]), HTTP/2 as one
//! multiplexed connection per destination; plain TCP, or TLS / mTLS when
//! the listener's upstream asks for it.
//!
//! Connections go to the original destination address, whatever the
//! request's `Host` / `:authority` says (a service name).

mod http1_pool;

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::Either;
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::{TlsError, UpstreamTls};

/// How long connecting to a destination may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle HTTP/1.1 connections are closed after this.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connection failure: {0}")]
    Connect(String),
    #[error("{0}")]
    Request(String),
}

impl UpstreamError {
    /// A request that failed on an open connection, with the error's causes.
    fn request(error: &dyn std::error::Error) -> UpstreamError {
        UpstreamError::Request(error_chain(error))
    }
}

/// Runs connection tasks on the worker's own thread (our futures are not
/// `Send`); hyper's HTTP/2 needs an executor.
#[derive(Clone, Copy, Default)]
pub struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, future: F) {
        tokio::task::spawn_local(future);
    }
}

/// Opens connections to upstreams: TCP, then TLS if configured.
#[derive(Clone)]
pub struct Dialer {
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl Dialer {
    /// `alpn`: what to offer over TLS (`http/1.1` or `h2`).
    pub fn new(tls: Option<&UpstreamTls>, alpn: &[u8]) -> Result<Dialer, TlsError> {
        let tls = tls.map(|tls| tls.connector_with_alpn(alpn)).transpose()?;
        Ok(Dialer { tls })
    }

    pub async fn dial(&self, destination: SocketAddr) -> Result<UpstreamStream, String> {
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(destination)).await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(error)) => return Err(error.to_string()),
            Err(_) => return Err(format!("timed out after {CONNECT_TIMEOUT:?}")),
        };
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(UpstreamStream::Plain(tcp)),
            Some((connector, name)) => connector
                .connect(name.clone(), tcp)
                .await
                .map(|tls| UpstreamStream::Tls(Box::new(tls)))
                .map_err(|error| format!("TLS handshake with {destination}: {error}")),
        }
    }
}

/// A connection to an upstream, with or without TLS.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Pools of one worker's upstream connections for request bodies of type
/// `B`: the listener's destinations (streamed bodies) or the clusters
/// plugins call out to (whole bodies).
pub struct Upstreams<B = crate::body::ChannelBody> {
    http1: http1_pool::Http1Pool<B>,
    http2_dialer: Dialer,
    http2: RefCell<HashMap<SocketAddr, http2::SendRequest<B>>>,
}

impl<B> Upstreams<B>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Connection pools for one listener's upstreams, with TLS if `tls`.
    pub fn new(tls: Option<&UpstreamTls>) -> Result<Upstreams<B>, TlsError> {
        Ok(Upstreams {
            http1: http1_pool::Http1Pool::new(Dialer::new(tls, b"http/1.1")?),
            http2_dialer: Dialer::new(tls, b"h2")?,
            http2: RefCell::new(HashMap::new()),
        })
    }

    /// Sends `request` to `destination` in the request's HTTP version. For
    /// HTTP/1.1 the request URI is sent as it is (origin form: the path).
    ///
    /// Not an `async fn`: on a pooled connection the request goes to hyper
    /// right here, and the future only waits for the response. An async fn
    /// would carry the 320-byte request through every layer's state and copy
    /// it at each (see docs/benchmarks.md).
    pub fn send(
        &self,
        destination: SocketAddr,
        request: Request<B>,
    ) -> impl Future<Output = Result<Response<Incoming>, UpstreamError>> + '_ {
        if request.version() != Version::HTTP_2 {
            return Either::Left(self.http1.send(destination, request));
        }
        let pooled = self
            .http2
            .borrow()
            .get(&destination)
            .filter(|sender| !sender.is_closed())
            .cloned();
        Either::Right(match pooled {
            Some(mut sender) => {
                let response = sender.send_request(request);
                Either::Left(async move {
                    response
                        .await
                        .map_err(|error| UpstreamError::request(&error))
                })
            }
            // Boxed: connecting is rare (see `Http1Pool::send`).
            None => Either::Right(Box::pin(async move {
                let mut sender = self.open_http2(destination).await?;
                sender
                    .send_request(request)
                    .await
                    .map_err(|error| UpstreamError::request(&error))
            })),
        })
    }

    async fn open_http2(
        &self,
        destination: SocketAddr,
    ) -> Result<http2::SendRequest<B>, UpstreamError> {
        let stream = self
            .http2_dialer
            .dial(destination)
            .await
            .map_err(UpstreamError::Connect)?;
        let (sender, connection) = http2::Builder::new(LocalExec)
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|error| UpstreamError::Connect(error_chain(&error)))?;
        tokio::task::spawn_local(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%destination, %error, "upstream HTTP/2 connection ended");
            }
        });
        self.http2.borrow_mut().insert(destination, sender.clone());
        Ok(sender)
    }
}

/// An error with its causes, `a: b: c`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
