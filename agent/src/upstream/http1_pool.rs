//! One worker's keep-alive HTTP/1.1 connections, pooled per destination.
//!
//! A worker is one thread, so the pool is a `RefCell`: no lock, no shared
//! map, and no task per request. hyper can send the next request on an
//! HTTP/1.1 connection only once the previous response has been read to
//! its end; a connection goes back to the pool as soon as its response
//! headers arrived, and a request takes one that hyper says is ready again
//! (`is_ready`), or opens a new one. A connection the server closed is
//! dropped when found; one idle for [`POOL_IDLE_TIMEOUT`] is closed by us.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use super::{Dialer, POOL_IDLE_TIMEOUT, UpstreamError, error_chain};
use crate::FastMap;

pub struct Http1Pool<B> {
    dialer: Dialer,
    connections: RefCell<FastMap<SocketAddr, Vec<Pooled<B>>>>,
    /// When idle connections of every destination were last swept.
    last_sweep: Cell<Instant>,
}

struct Pooled<B> {
    sender: http1::SendRequest<B>,
    last_used: Instant,
}

/// How [`Http1Pool::send`] starts: on a pooled connection, the request
/// already handed to hyper (`F` waits for the response), or kept for a new
/// connection.
enum Attempt<B, F> {
    Pooled(http1::SendRequest<B>, F),
    Fresh(Request<B>),
}

impl<B> Pooled<B> {
    fn expired(&self, now: Instant) -> bool {
        self.sender.is_closed()
            || (self.sender.is_ready() && now.duration_since(self.last_used) > POOL_IDLE_TIMEOUT)
    }
}

impl<B> Http1Pool<B>
where
    B: hyper::body::Body<Data = bytes::Bytes> + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub fn new(dialer: Dialer) -> Http1Pool<B> {
        Http1Pool {
            dialer,
            connections: RefCell::new(FastMap::default()),
            last_sweep: Cell::new(Instant::now()),
        }
    }

    /// Sends `request` (origin-form URI, `Host` set) to `destination` on a
    /// pooled connection, or on a new one.
    ///
    /// Not an `async fn`: on a pooled connection the request goes to hyper
    /// right here (hyper queues it for the connection's task), and the future
    /// holds only what waiting for the response needs.
    pub fn send(
        &self,
        destination: SocketAddr,
        mut request: Request<B>,
    ) -> impl Future<Output = Result<Response<Incoming>, UpstreamError>> + '_ {
        origin_form(&mut request);
        let attempt = match self.take_ready(destination) {
            Some(mut sender) => {
                let response = sender.try_send_request(request);
                Attempt::Pooled(sender, response)
            }
            None => Attempt::Fresh(request),
        };
        async move {
            let request = match attempt {
                Attempt::Pooled(sender, response) => match response.await {
                    Ok(response) => {
                        self.put_back(destination, sender);
                        return Ok(response);
                    }
                    Err(mut error) => match error.take_message() {
                        // A pooled connection the server closed just then
                        // hands the request back unsent: once more on a new
                        // one.
                        Some(unsent) => unsent,
                        None => return Err(UpstreamError::request(error.error())),
                    },
                },
                Attempt::Fresh(request) => request,
            };
            // Boxed: connecting is rare, and inline its future would make
            // every request's future several KiB larger to move.
            Box::pin(self.send_on_new_connection(destination, request)).await
        }
    }

    async fn send_on_new_connection(
        &self,
        destination: SocketAddr,
        request: Request<B>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut sender = self.connect(destination).await?;
        match sender.try_send_request(request).await {
            Ok(response) => {
                self.put_back(destination, sender);
                Ok(response)
            }
            Err(error) => Err(UpstreamError::request(error.error())),
        }
    }

    /// A pooled connection to `destination` ready for a request, if any.
    ///
    /// The newest ready connection is taken (its socket is the warmest);
    /// closed or idle-expired ones met on the way are dropped, the others
    /// wait for [`Self::sweep`], so a request looks at few connections.
    fn take_ready(&self, destination: SocketAddr) -> Option<http1::SendRequest<B>> {
        let now = Instant::now();
        self.sweep(now);
        let mut connections = self.connections.borrow_mut();
        let pooled = connections.get_mut(&destination)?;
        let mut index = pooled.len();
        while index > 0 {
            index -= 1;
            if pooled[index].expired(now) {
                pooled.swap_remove(index);
            } else if pooled[index].sender.is_ready() {
                return Some(pooled.swap_remove(index).sender);
            }
        }
        None
    }

    fn put_back(&self, destination: SocketAddr, sender: http1::SendRequest<B>) {
        if sender.is_closed() {
            return;
        }
        self.connections
            .borrow_mut()
            .entry(destination)
            .or_default()
            .push(Pooled {
                sender,
                last_used: Instant::now(),
            });
    }

    /// Closes what expired at every destination, at most twice per idle
    /// timeout (destinations no request goes to any more included).
    fn sweep(&self, now: Instant) {
        if now.duration_since(self.last_sweep.get()) < POOL_IDLE_TIMEOUT / 2 {
            return;
        }
        self.last_sweep.set(now);
        let mut connections = self.connections.borrow_mut();
        for pooled in connections.values_mut() {
            pooled.retain(|p| !p.expired(now));
        }
        connections.retain(|_, pooled| !pooled.is_empty());
    }

    async fn connect(
        &self,
        destination: SocketAddr,
    ) -> Result<http1::SendRequest<B>, UpstreamError> {
        let stream = self
            .dialer
            .dial(destination)
            .await
            .map_err(UpstreamError::Connect)?;
        let (mut sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|error| UpstreamError::Connect(error_chain(&error)))?;
        tokio::task::spawn_local(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%destination, %error, "upstream HTTP/1.1 connection ended");
            }
        });
        sender
            .ready()
            .await
            .map_err(|error| UpstreamError::Connect(error_chain(&error)))?;
        Ok(sender)
    }
}

/// HTTP/1.1 requests go out in origin form (`/path?query`); a URI that
/// names a scheme and authority is cut down to its path.
fn origin_form<B>(request: &mut Request<B>) {
    if request.uri().scheme().is_none() && request.uri().authority().is_none() {
        return;
    }
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    *request.uri_mut() = http::Uri::from(path);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers every request on a connection with `hello`, and
    /// counts the connections it accepted.
    async fn server() -> (SocketAddr, std::rc::Rc<Cell<usize>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::rc::Rc::new(Cell::new(0));
        let count = accepted.clone();
        tokio::task::spawn_local(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                count.set(count.get() + 1);
                tokio::task::spawn_local(async move {
                    let mut buf = vec![0; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let n = match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
                            if stream.write_all(reply).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn request(addr: SocketAddr) -> Request<Empty<Bytes>> {
        Request::builder()
            .uri("/")
            .header("host", addr.to_string())
            .body(Empty::new())
            .unwrap()
    }

    #[test]
    fn sequential_requests_reuse_one_connection_and_concurrent_ones_open_more() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&runtime, async {
            let (addr, accepted) = server().await;
            let pool = Http1Pool::new(Dialer::new(None, b"http/1.1").unwrap());
            for _ in 0..5 {
                let response = pool.send(addr, request(addr)).await.unwrap();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(&body[..], b"hello");
            }
            assert_eq!(
                accepted.get(),
                1,
                "keep-alive: one connection for 5 requests"
            );

            // Two at once: the second cannot wait for the first's connection.
            let (a, b) = tokio::join!(
                pool.send(addr, request(addr)),
                pool.send(addr, request(addr))
            );
            for response in [a.unwrap(), b.unwrap()] {
                response.into_body().collect().await.unwrap();
            }
            assert_eq!(accepted.get(), 2);
        });
    }

    #[test]
    fn absolute_uris_go_out_in_origin_form() {
        let mut absolute = Request::builder()
            .uri("http://10.0.0.1:8080/a?b=c")
            .body(())
            .unwrap();
        origin_form(&mut absolute);
        assert_eq!(absolute.uri(), "/a?b=c");
        let mut origin = Request::builder().uri("/x").body(()).unwrap();
        origin_form(&mut origin);
        assert_eq!(origin.uri(), "/x");
    }

    #[test]
    fn an_unreachable_destination_is_a_connect_error() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&runtime, async {
            // Bound but not listening: the connect is refused.
            let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = socket.local_addr().unwrap();
            drop(socket);
            let pool: Http1Pool<Empty<Bytes>> =
                Http1Pool::new(Dialer::new(None, b"http/1.1").unwrap());
            match pool.send(addr, request(addr)).await {
                Err(UpstreamError::Connect(_)) => {}
                other => panic!("expected a connect error, got {other:?}"),
            }
        });
    }
}
