//! The in-memory embedder the integration tests plug into instances:
//! records callouts and metric events, offers foreign function `echo`, and
//! counts queue wake-ups.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use wisp_wasm_host::{
    CalloutError, Callouts, Embedder, GrpcCallRequest, HttpCallRequest, MetricKind, MetricsSink,
};

#[derive(Default)]
pub struct Recorder {
    pub http_calls: Mutex<Vec<HttpCallRequest>>,
    pub grpc_calls: Mutex<Vec<GrpcCallRequest>>,
    pub grpc_messages: Mutex<Vec<(u32, Vec<u8>, bool)>>,
    pub grpc_cancelled: Mutex<Vec<u32>>,
    pub metric_events: Mutex<Vec<String>>,
    pub queue_wakes: AtomicUsize,
}

/// Known upstreams: `backend` (HTTP) and `grpc-backend`.
impl Callouts for Recorder {
    fn http_call(&self, request: HttpCallRequest) -> Result<(), CalloutError> {
        if request.upstream != "backend" {
            return Err(CalloutError::UnknownUpstream(request.upstream));
        }
        self.http_calls.lock().unwrap().push(request);
        Ok(())
    }

    fn grpc_call(&self, request: GrpcCallRequest) -> Result<(), CalloutError> {
        if request.upstream != "grpc-backend" {
            return Err(CalloutError::UnknownUpstream(request.upstream));
        }
        self.grpc_calls.lock().unwrap().push(request);
        Ok(())
    }

    fn grpc_send(&self, token: u32, message: Vec<u8>, end: bool) -> Result<(), CalloutError> {
        self.grpc_messages
            .lock()
            .unwrap()
            .push((token, message, end));
        Ok(())
    }

    fn grpc_cancel(&self, token: u32) -> Result<(), CalloutError> {
        self.grpc_cancelled.lock().unwrap().push(token);
        Ok(())
    }

    fn grpc_close(&self, _token: u32) -> Result<(), CalloutError> {
        Ok(())
    }
}

impl MetricsSink for Recorder {
    fn defined(&self, name: &str, kind: MetricKind) {
        self.metric_events
            .lock()
            .unwrap()
            .push(format!("defined {name} {kind:?}"));
    }

    fn updated(&self, name: &str, kind: MetricKind, value: i64) {
        self.metric_events
            .lock()
            .unwrap()
            .push(format!("updated {name} {kind:?} {value}"));
    }

    fn recorded(&self, name: &str, value: u64) {
        self.metric_events
            .lock()
            .unwrap()
            .push(format!("recorded {name} {value}"));
    }
}

#[derive(Clone, Default)]
pub struct TestEmbedder(pub Arc<Recorder>);

impl std::ops::Deref for TestEmbedder {
    type Target = Recorder;

    fn deref(&self) -> &Recorder {
        &self.0
    }
}

impl TestEmbedder {
    pub fn embedder(&self) -> Embedder {
        let recorder = Arc::clone(&self.0);
        let mut embedder = Embedder {
            callouts: Some(Arc::clone(&self.0) as Arc<dyn Callouts>),
            metrics: Some(Arc::clone(&self.0) as Arc<dyn MetricsSink>),
            queue_waker: Some(Arc::new(move || {
                recorder.queue_wakes.fetch_add(1, Ordering::SeqCst);
            })),
            ..Default::default()
        };
        embedder
            .foreign_functions
            .insert("echo".into(), Arc::new(|args: &[u8]| Ok(args.to_vec())));
        embedder
    }
}

/// `<target dir>/<target>/release/<name>.wasm`, read once per test binary.
pub fn module(target: &str, name: &str) -> &'static [u8] {
    static CACHE: OnceLock<Mutex<std::collections::HashMap<String, &'static [u8]>>> =
        OnceLock::new();
    let key = format!("{target}/{name}");
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap();
    if let Some(bytes) = cache.get(&key) {
        return bytes;
    }
    let path = target_dir()
        .join(target)
        .join("release")
        .join(format!("{name}.wasm"));
    let bytes = std::fs::read(&path).unwrap_or_else(|error| {
        panic!(
            "cannot read {}: {error}\nbuild the test filters first with `cargo xtask build-filters`",
            path.display()
        )
    });
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    cache.insert(key, bytes);
    bytes
}

/// `CARGO_TARGET_DIR` if set (relative to the workspace root), else `<workspace>/target`.
fn target_dir() -> PathBuf {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("wasm-host sits in the workspace root")
        .to_path_buf();
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    }
}

/// The engines the suites run on: Wasmtime always; WasmEdge too when
/// `WASMEDGE_DIR` points at an installed WasmEdge. That needs the
/// `wasmedge` feature (which then links libwasmedge); `WASMEDGE_DIR` without
/// the feature fails instead of quietly testing Wasmtime alone.
#[allow(dead_code, reason = "not every test binary uses every helper")]
pub fn engines() -> Vec<wisp_wasm_host::EngineKind> {
    let mut engines = vec![wisp_wasm_host::EngineKind::Wasmtime];
    if let Some(dir) = std::env::var_os("WASMEDGE_DIR") {
        if !cfg!(feature = "wasmedge") {
            panic!(
                "WASMEDGE_DIR is set ({}): run the tests with `--features wasmedge` to test WasmEdge too",
                PathBuf::from(dir).display()
            );
        }
        engines.push(wisp_wasm_host::EngineKind::WasmEdge);
    }
    engines
}
