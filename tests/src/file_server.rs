//! A small static file server for module-fetch tests, over HTTPS (rustls,
//! with a certificate from [`crate::pki`]) or plain HTTP, on its own thread.
//! It records every request path, can be told to answer 503 to the next N
//! requests (a server having trouble) or to redirect a path, and stops when
//! dropped.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

#[derive(Default)]
struct State {
    files: Mutex<HashMap<String, Vec<u8>>>,
    redirects: Mutex<HashMap<String, String>>,
    requests: Mutex<Vec<String>>,
    fail_next: AtomicU32,
}

pub struct FileServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FileServer {
    /// HTTPS with this certificate chain and key (PEM files).
    pub fn start_https(addr: SocketAddr, cert: &Path, key: &Path) -> std::io::Result<FileServer> {
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(std::io::Error::other)?;
        let key =
            rustls_pki_types::PrivateKeyDer::from_pem_file(key).map_err(std::io::Error::other)?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(std::io::Error::other)?;
        FileServer::start(
            addr,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        )
    }

    /// Plain HTTP.
    pub fn start_http(addr: SocketAddr) -> std::io::Result<FileServer> {
        FileServer::start(addr, None)
    }

    fn start(
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<FileServer> {
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let state = Arc::new(State::default());
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread_state = state.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the file server");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener)
                    .expect("registering the file server's listener");
                loop {
                    let stream = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((stream, _)) => stream,
                            Err(_) => continue,
                        },
                        _ = &mut stopped => return,
                    };
                    let state = thread_state.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(respond(&state, req)) }
                        });
                        let http = hyper::server::conn::http1::Builder::new();
                        match tls {
                            Some(tls) => {
                                if let Ok(stream) = tls.accept(stream).await {
                                    let _ =
                                        http.serve_connection(TokioIo::new(stream), service).await;
                                }
                            }
                            None => {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    });
                }
            });
        });
        Ok(FileServer {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Serves `body` at `path` (e.g. `/filter.wasm`).
    pub fn put(&self, path: &str, body: Vec<u8>) {
        self.state
            .files
            .lock()
            .expect("file server state")
            .insert(path.to_owned(), body);
    }

    /// Answers requests for `path` with `302 Found` to `location`.
    pub fn redirect(&self, path: &str, location: &str) {
        self.state
            .redirects
            .lock()
            .expect("file server state")
            .insert(path.to_owned(), location.to_owned());
    }

    /// Answers `503 Service Unavailable` to the next `n` requests.
    pub fn fail_next(&self, n: u32) {
        self.state.fail_next.store(n, Ordering::SeqCst);
    }

    /// The paths requested so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.state
            .requests
            .lock()
            .expect("file server state")
            .clone()
    }
}

fn respond(state: &State, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    state
        .requests
        .lock()
        .expect("file server state")
        .push(path.clone());
    let failing = state
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if let Some(location) = state
        .redirects
        .lock()
        .expect("file server state")
        .get(&path)
    {
        return Response::builder()
            .status(302)
            .header("location", location)
            .body(Full::new(Bytes::new()))
            .expect("a valid response");
    }
    let (status, body) = if failing {
        (503, b"try again later\n".to_vec())
    } else {
        match state.files.lock().expect("file server state").get(&path) {
            Some(body) => (200, body.clone()),
            None => (404, b"not found\n".to_vec()),
        }
    };
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

impl Drop for FileServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
