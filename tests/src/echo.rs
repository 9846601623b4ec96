//! The echo server run in test pods (`wisp-echo`): answers every request with
//! a JSON description of what it received — its own name, the peer address
//! it saw, method, path and headers — so a test can tell whether a request
//! came straight from a pod or through the agent, and what the filters did.
//! `?delay_ms=N` delays the answer.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
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
) -> Result<Response<Full<Bytes>>, Infallible> {
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
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
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
    });
    let mut response = Response::new(Full::new(Bytes::from(format!("{reply}\n"))));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
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
