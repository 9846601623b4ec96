//! The admin listener (localhost by default): `/metrics` in Prometheus text
//! format, `/ready`, `/config_dump` (the configuration in effect, as JSON) and
//! `/plugins` (the loaded Proxy-Wasm plugins).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on admin address {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct AdminState {
    pub registry: Registry,
    pub ready: std::sync::atomic::AtomicBool,
    /// Replaced by a config reload.
    pub config_dump: std::sync::RwLock<serde_json::Value>,
    pub plugins: serde_json::Value,
}

/// What `/plugins` says about each loaded plugin.
pub fn plugin_summaries(plugins: &[crate::plugins::ConfiguredPlugin]) -> serde_json::Value {
    plugins
        .iter()
        .map(|configured| {
            let plugin = &configured.plugin;
            let config = plugin.config();
            serde_json::json!({
                "name": config.name,
                "kind": configured.kind,
                "match": configured.matcher,
                "root_id": config.root_id,
                "vm_id": config.vm_id,
                "abi_version": format!("{:?}", plugin.abi_version()),
                "failure_policy": config.failure_policy,
                "configuration_bytes": config.configuration.len(),
            })
        })
        .collect()
}

/// Binds the admin listener; serving starts with [`serve`].
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, AdminError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Listen { addr, source })
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(req, state.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<AdminState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
                Ok(()) => (
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(error) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{error}\n"),
                ),
            }
        }
        "/config_dump" => match state.config_dump.read() {
            Ok(dump) => json(&dump),
            Err(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "config dump unavailable\n".to_owned(),
            ),
        },
        "/plugins" => json(&state.plugins),
        "/ready" if state.ready.load(std::sync::atomic::Ordering::Acquire) => {
            (StatusCode::OK, "text/plain", "ready\n".to_owned())
        }
        "/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "starting\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics, /ready, /config_dump or /plugins\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    Ok(response)
}

fn json(value: &serde_json::Value) -> (StatusCode, &'static str, String) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => (StatusCode::OK, "application/json", text + "\n"),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{error}\n"),
        ),
    }
}
