//! [`MockApiServer`]: a stand-in for kube-apiserver on loopback (no real API
//! server can run on these machines). It answers LISTs with the objects the
//! test gives it, holds WATCHes open without events (as an API server does
//! when nothing changes), answers PATCHes with the object and records every
//! request, so a test can assert what the agent asked and wrote. It stops
//! when dropped.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};

/// One request the agent made.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Option<serde_json::Value>,
}

#[derive(Default)]
struct State {
    /// LIST path → the items to return.
    lists: BTreeMap<String, (String, Vec<serde_json::Value>)>,
    /// Open watches: (path, where their events go).
    watches: Vec<(String, tokio::sync::mpsc::UnboundedSender<Bytes>)>,
    seen: Vec<SeenRequest>,
}

pub struct MockApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// An open watch: the events [`MockApiServer::push_event`] sends, one JSON
/// line each, and otherwise nothing, for as long as the server runs.
struct WatchBody(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

impl hyper::body::Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|event| event.map(|bytes| Ok(Frame::data(bytes))))
    }
}

fn json_reply(status: u16, value: &serde_json::Value) -> Response<BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .unwrap_or_default()
}

async fn handle(
    state: Arc<Mutex<State>>,
    request: Request<Incoming>,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let (parts, body) = request.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let seen = SeenRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or("").to_owned(),
        content_type: parts
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned(),
        body: serde_json::from_slice(&bytes).ok(),
    };
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    state.seen.push(seen.clone());
    if seen.method == "GET" && seen.query.contains("watch=true") {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        state.watches.push((seen.path.clone(), tx));
        return Ok(Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(WatchBody(rx).boxed())
            .unwrap_or_default());
    }
    if seen.method == "GET" {
        return Ok(match state.lists.get(&seen.path) {
            Some((kind, items)) => json_reply(
                200,
                &serde_json::json!({
                    "apiVersion": "v1", "kind": kind,
                    "metadata": {"resourceVersion": "100"},
                    "items": items,
                }),
            ),
            None => json_reply(
                404,
                &serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                    "reason": "NotFound", "code": 404,
                                    "message": format!("the mock serves no {}", seen.path)}),
            ),
        });
    }
    // PATCH of …/namespaces/NS/PLURAL/NAME/status: the listed object with
    // the applied status, as the API server answers.
    let segments: Vec<&str> = seen.path.split('/').collect();
    let object = match segments.as_slice() {
        [prefix @ .., "namespaces", ns, plural, name, "status"] => {
            let list = format!("{}/{plural}", prefix.join("/"));
            state.lists.get(&list).and_then(|(_, items)| {
                items
                    .iter()
                    .find(|o| o["metadata"]["namespace"] == *ns && o["metadata"]["name"] == *name)
                    .cloned()
            })
        }
        _ => None,
    };
    Ok(match object {
        Some(mut object) => {
            object["status"] = seen
                .body
                .as_ref()
                .map_or(serde_json::Value::Null, |b| b["status"].clone());
            json_reply(200, &object)
        }
        None => json_reply(
            404,
            &serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                "reason": "NotFound", "code": 404,
                                "message": format!("the mock has no object for {}", seen.path)}),
        ),
    })
}

impl MockApiServer {
    /// Listens on `addr` (loopback) in a thread of its own.
    pub fn start(addr: SocketAddr) -> std::io::Result<MockApiServer> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let state = Arc::new(Mutex::new(State::default()));
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread_state = state.clone();
        let thread = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            let state = thread_state.clone();
                            tokio::spawn(async move {
                                let service = hyper::service::service_fn(move |r| handle(state.clone(), r));
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                    .await;
                            });
                        }
                        _ = &mut stop_rx => break,
                    }
                }
            });
        });
        Ok(MockApiServer {
            addr,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// What a LIST of `path` (e.g. `/api/v1/pods`) returns, of `kind`
    /// (e.g. `PodList`).
    pub fn set_list(&self, path: &str, kind: &str, items: Vec<serde_json::Value>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .lists
            .insert(path.to_owned(), (kind.to_owned(), items));
    }

    /// Sends a watch event (`ADDED`, `MODIFIED`, `DELETED`) for `object` to
    /// every open watch of `path`; returns how many watches got it.
    pub fn push_event(&self, path: &str, kind: &str, object: &serde_json::Value) -> usize {
        let line = format!("{}\n", serde_json::json!({"type": kind, "object": object}));
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.watches.retain(|(_, tx)| !tx.is_closed());
        state
            .watches
            .iter()
            .filter(|(p, _)| p == path)
            .filter(|(_, tx)| tx.send(Bytes::from(line.clone())).is_ok())
            .count()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .clone()
    }

    /// A kubeconfig pointing at this server, written into `dir`.
    pub fn write_kubeconfig(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: mock\n  cluster:\n    server: http://{}\n\
                 users:\n- name: agent\n  user: {{}}\ncontexts:\n- name: mock\n  context:\n    cluster: mock\n    user: agent\n\
                 current-context: mock\n",
                self.addr
            ),
        )?;
        Ok(path)
    }
}

impl Drop for MockApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
