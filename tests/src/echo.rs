//! The echo server run in test pods (`wisp-echo`): answers every request with
//! a JSON description of what it received — its own name, the peer address
//! it saw, method, path and headers — so a test can tell whether a request
//! came straight from a pod or through the agent, and what the filters did.
//! `?delay_ms=N` delays the answer, `?pad=N` adds N bytes of padding to it,
//! `?trailers=1` (or a request header `x-echo-trailers`) ends it with the
//! trailer `x-echo-trailer: yes`. The reply
//! also shows the request body (as text, up to 64 KiB) and its trailers.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Serves until the process is signalled.
pub async fn serve(listen: SocketAddr, name: String) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (stream, peer) = listener.accept().await?;
        let name = name.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| respond(req, peer, name.clone()));
            // HTTP/1.1 and HTTP/2 (prior knowledge), told apart by the preface.
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(
    req: Request<Incoming>,
    peer: SocketAddr,
    name: String,
) -> Result<Response<EchoBody>, Infallible> {
    let (parts, body) = req.into_parts();
    // `?delay_ms=N` holds the response back, for drain tests.
    let delay = parts
        .uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("delay_ms=")))
        .and_then(|ms| ms.parse::<u64>().ok());
    if let Some(ms) = delay {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let query = |key: &str| {
        parts.uri.query().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
        })
    };
    let (body, trailers) = match body.collect().await {
        Ok(collected) => {
            let trailers = collected.trailers().cloned().unwrap_or_default();
            (collected.to_bytes(), trailers)
        }
        Err(_) => (Bytes::new(), Default::default()),
    };
    let trailers: serde_json::Map<String, serde_json::Value> = trailers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into(),
            )
        })
        .collect();
    let pad = query("pad")
        .and_then(|n| n.parse::<usize>().ok())
        .map_or_else(String::new, |n| "p".repeat(n));
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into(),
            )
        })
        .collect();
    let reply = serde_json::json!({
        "server": name,
        "peer": peer.ip().to_string(),
        "method": parts.method.as_str(),
        "version": format!("{:?}", parts.version),
        // HTTP/1.1 carries it as Host, HTTP/2 as :authority (in the URI).
        "authority": parts.uri.authority().map(|a| a.to_string()).or_else(|| {
            parts.headers.get(hyper::header::HOST).map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        }),
        "path": parts.uri.to_string(),
        "headers": headers,
        "body_bytes": body.len(),
        "body": String::from_utf8_lossy(&body[..body.len().min(64 * 1024)]),
        "trailers": trailers,
        "pad": pad,
    });
    let send_trailers =
        query("trailers").is_some() || parts.headers.contains_key("x-echo-trailers");
    let mut response = Response::new(EchoBody {
        data: Some(Bytes::from(format!("{reply}\n"))),
        trailers: send_trailers,
    });
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    if send_trailers {
        // HTTP/1.1 carries only declared trailers.
        response.headers_mut().insert(
            hyper::header::TRAILER,
            hyper::header::HeaderValue::from_static("x-echo-trailer"),
        );
    }
    response.headers_mut().insert(
        "x-echo-server",
        hyper::header::HeaderValue::from_str(&name)
            .unwrap_or(hyper::header::HeaderValue::from_static("echo")),
    );
    Ok(response)
}

/// Starts the `wisp-echo` binary on 127.0.0.1:`port` in the host namespace
/// (named "upstream") and waits until it accepts connections.
pub fn spawn_on_loopback(
    echo_bin: &std::path::Path,
    port: u16,
) -> std::io::Result<crate::process::ChildGuard> {
    let child = std::process::Command::new(echo_bin)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--name",
            "upstream",
        ])
        .spawn()?;
    let guard = crate::process::ChildGuard::new("echo", child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if std::time::Instant::now() > deadline {
            return Err(std::io::Error::other(format!(
                "wisp-echo did not listen on port {port}"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(guard)
}

/// The echo's reply: one data frame, then optionally a trailer.
pub struct EchoBody {
    data: Option<Bytes>,
    trailers: bool,
}

impl hyper::body::Body for EchoBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(data))));
        }
        if std::mem::take(&mut self.trailers) {
            let mut trailers = hyper::HeaderMap::new();
            trailers.insert(
                "x-echo-trailer",
                hyper::header::HeaderValue::from_static("yes"),
            );
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::trailers(trailers))));
        }
        std::task::Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && !self.trailers
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match (&self.data, self.trailers) {
            (Some(data), false) => hyper::body::SizeHint::with_exact(data.len() as u64),
            _ => hyper::body::SizeHint::default(),
        }
    }
}
