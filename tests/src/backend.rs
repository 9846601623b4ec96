//! A cluster plugins call out to, on loopback, run inside the test
//! process: `POST /check` answers `checked:<method>:<path>:<body>` (after
//! 3 s when the body is `slow`), with the trailer `x-answer-trailer: t1`;
//! `/deny` answers 403 `denied:<body>`; the gRPC method `/wisp.Check/Allow`
//! answers the message `allow:<x-md metadata>:<request message>`, and the
//! stream `/wisp.Check/Stream` answers each message `m` with `echo:m`. Serves
//! HTTP/1.1 and HTTP/2 (prior knowledge). Stopped on drop.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A request body that ends with trailers.
pub struct TrailerBody {
    pub data: Option<Bytes>,
    pub trailers: Option<hyper::HeaderMap>,
}

impl Body for TrailerBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A current-thread runtime for a test's own clients and servers.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The running backend.
pub struct Backend {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    /// Listens on 127.0.0.1:`port` (panics if it cannot: a test setup error).
    pub fn start(port: u16) -> Backend {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            runtime().block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let (tcp, _) = tokio::select! {
                        accepted = listener.accept() => accepted.unwrap(),
                        _ = &mut stopped => return,
                    };
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(backend_answer);
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tcp), service)
                            .await;
                    });
                }
            });
        });
        Backend {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn backend_answer(
    request: hyper::Request<Incoming>,
) -> Result<hyper::Response<TrailerBody>, Infallible> {
    let (parts, body) = request.into_parts();
    let mut body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    if path.starts_with("/wisp.Check/") {
        let metadata = parts
            .headers
            .get("x-md")
            .map(|v| v.to_str().unwrap_or_default().to_owned())
            .unwrap_or_default();
        let mut messages = Vec::new();
        while body.len() >= 5 {
            let length = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
            body.advance(5);
            let length = length.min(body.len());
            messages.push(String::from_utf8_lossy(&body[..length]).into_owned());
            body.advance(length);
        }
        // Allow: one answer; Stream: one answer per message.
        let answers: Vec<String> = if path == "/wisp.Check/Stream" {
            messages.iter().map(|m| format!("echo:{m}")).collect()
        } else {
            vec![format!("allow:{metadata}:{}", messages.concat())]
        };
        let mut framed = Vec::new();
        for answer in answers {
            framed.push(0);
            framed.extend_from_slice(&(answer.len() as u32).to_be_bytes());
            framed.extend_from_slice(answer.as_bytes());
        }
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let mut response = hyper::Response::new(TrailerBody {
            data: Some(Bytes::from(framed)),
            trailers: Some(trailers),
        });
        response
            .headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        return Ok(response);
    }
    if &body[..] == b"slow" {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    if path == "/deny" {
        let mut response = hyper::Response::new(TrailerBody {
            data: Some(Bytes::from(format!(
                "denied:{}",
                String::from_utf8_lossy(&body)
            ))),
            trailers: None,
        });
        *response.status_mut() = hyper::StatusCode::FORBIDDEN;
        return Ok(response);
    }
    let answer = format!(
        "checked:{}:{}:{}",
        parts.method,
        path,
        String::from_utf8_lossy(&body)
    );
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("x-answer-trailer", "t1".parse().unwrap());
    Ok(hyper::Response::new(TrailerBody {
        data: Some(Bytes::from(answer)),
        // HTTP/1.1 only carries them to a client that asked (te: trailers).
        trailers: Some(trailers),
    }))
}
