//! A closed-loop HTTP/1.1 load generator run inside a pod (`wisp-load`):
//! K keep-alive connections send requests back to back for D seconds and
//! record every request's latency in an HDR histogram; then it times a
//! series of fresh TCP connects (connection setup latency). The histograms
//! travel as base64 V2 serializations so runs in many pods can be merged
//! exactly, instead of averaging percentiles.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// What one `wisp-load` run measured.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct LoadReport {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    /// Request latency in microseconds (HDR, V2 + base64).
    pub latency_us: String,
    /// TCP connect latency in microseconds (HDR, V2 + base64).
    pub connect_us: String,
    /// Wall time of the connect series (connects run one after another).
    #[serde(default)]
    pub connect_seconds: f64,
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 µs … 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

pub fn encode(histogram: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    let _ = V2Serializer::new().serialize(histogram, &mut bytes);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn decode(text: &str) -> Option<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    Deserializer::new().deserialize(&mut bytes.as_slice()).ok()
}

/// Runs the load: `connections` keep-alive connections for `duration`,
/// then `connects` fresh TCP connects.
pub async fn run(
    target: SocketAddr,
    path: &str,
    connections: usize,
    duration: Duration,
    connects: usize,
) -> LoadReport {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let path = path.to_owned();
        tasks.spawn(async move { connection_loop(target, &path, deadline).await });
    }
    let mut latency = new_histogram();
    let (mut requests, mut errors) = (0, 0);
    while let Some(Ok((hist, ok, failed))) = tasks.join_next().await {
        let _ = latency.add(&hist);
        requests += ok;
        errors += failed;
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut connect = new_histogram();
    let connects_started = Instant::now();
    for _ in 0..connects {
        let t = Instant::now();
        match tokio::net::TcpStream::connect(target).await {
            Ok(stream) => {
                let _ = connect.record(t.elapsed().as_micros().max(1) as u64);
                drop(stream);
            }
            Err(_) => errors += 1,
        }
    }
    LoadReport {
        requests,
        errors,
        seconds,
        latency_us: encode(&latency),
        connect_us: encode(&connect),
        connect_seconds: connects_started.elapsed().as_secs_f64(),
    }
}

async fn connection_loop(
    target: SocketAddr,
    path: &str,
    deadline: Instant,
) -> (Histogram<u64>, u64, u64) {
    let mut histogram = new_histogram();
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut sender = None;
    while Instant::now() < deadline {
        if sender.is_none() {
            match connect(target).await {
                Ok(s) => sender = Some(s),
                Err(_) => {
                    failed += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else { continue };
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, target.to_string())
            .body(Empty::<Bytes>::new())
            .expect("a valid request");
        let t = Instant::now();
        let result = async {
            s.ready().await?;
            let response = s.send_request(request).await?;
            let status = response.status();
            response.into_body().collect().await?;
            Ok::<_, hyper::Error>(status)
        }
        .await;
        match result {
            Ok(status) if status.is_success() => {
                ok += 1;
                let _ = histogram.record(t.elapsed().as_micros().max(1) as u64);
            }
            Ok(_) => failed += 1,
            Err(_) => {
                failed += 1;
                sender = None;
            }
        }
    }
    (histogram, ok, failed)
}

async fn connect(
    target: SocketAddr,
) -> std::io::Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let tcp = tokio::net::TcpStream::connect(target).await?;
    let _ = tcp.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    Ok(sender)
}
