//! Runs the real `wisp-header-filter` plugin (built with the proxy-wasm Rust
//! SDK 0.2.5 for wasm32-wasip1) through the host.
//!
//! The module comes from `WISP_HEADER_FILTER_WASM`, or else
//! `<target dir>/wasm32-wasip1/release/wisp_header_filter.wasm`; build it with
//! `cargo xtask build-filters`. A missing module fails the tests rather than
//! skipping them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use wisp_wasm_host::{
    AbiVersion, Action, Error, HeaderMap, HttpStream, Plugin, PluginConfig, PluginInstance,
};

fn filter_wasm() -> &'static [u8] {
    static WASM: OnceLock<Vec<u8>> = OnceLock::new();
    WASM.get_or_init(|| {
        let path = match std::env::var_os("WISP_HEADER_FILTER_WASM") {
            Some(path) => PathBuf::from(path),
            None => target_dir().join("wasm32-wasip1/release/wisp_header_filter.wasm"),
        };
        std::fs::read(&path).unwrap_or_else(|error| {
            panic!(
                "cannot read the header filter module {}: {error}\n\
                 build it first with `cargo xtask build-filters` \
                 (or point WISP_HEADER_FILTER_WASM at it)",
                path.display()
            )
        })
    })
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

/// The filter under `configuration`; the module is compiled once per test binary.
fn plugin(configuration: &str) -> Plugin {
    plugin_named("header-filter", configuration)
}

fn plugin_named(name: &str, configuration: &str) -> Plugin {
    capture_logs();
    static COMPILED: OnceLock<Plugin> = OnceLock::new();
    let compiled = COMPILED.get_or_init(|| {
        Plugin::compile(PluginConfig::default(), filter_wasm()).expect("the header filter compiles")
    });
    let config = PluginConfig {
        name: name.into(),
        root_id: "header_root".into(),
        vm_id: "test_vm".into(),
        configuration: configuration.as_bytes().to_vec(),
        ..Default::default()
    };
    compiled
        .with_config(config)
        .expect("the header filter links")
}

fn instance(configuration: &str) -> PluginInstance {
    plugin(configuration)
        .instantiate()
        .expect("the header filter starts")
}

fn request(path: &str, extra: &[(&str, &str)]) -> HttpStream {
    let mut request_headers: HeaderMap = [
        (":method", "GET"),
        (":path", path),
        (":authority", "example.test"),
        (":scheme", "http"),
    ]
    .into_iter()
    .collect();
    for (name, value) in extra {
        request_headers.add(name, value.as_bytes());
    }
    HttpStream {
        request_headers,
        ..Default::default()
    }
}

fn header<'a>(map: &'a HeaderMap, name: &str) -> Option<&'a str> {
    map.get(name).map(|v| std::str::from_utf8(v).unwrap())
}

#[test]
fn detects_abi_0_2_1() {
    assert_eq!(plugin("").abi_version(), AbiVersion::V0_2_1);
}

#[test]
fn allowed_request_continues_and_the_response_gets_the_filter_header() {
    let mut instance = instance("");
    let id = instance.create_http_context().unwrap();
    let mut stream = request("/hello", &[]);

    let action = instance.on_request_headers(id, &mut stream, true).unwrap();
    assert_eq!(action, Action::Continue);
    assert!(stream.local_response.is_none());
    assert_eq!(
        header(&stream.request_headers, ":path"),
        Some("/hello"),
        "request headers come back"
    );

    stream.response_headers.add(":status", b"200");
    let action = instance
        .on_response_headers(id, &mut stream, false)
        .unwrap();
    assert_eq!(action, Action::Continue);
    assert_eq!(
        header(&stream.response_headers, "x-wisp-filter"),
        Some("wisp-header-filter")
    );
    assert_eq!(header(&stream.response_headers, ":status"), Some("200"));

    instance.finish_http_context(id, &mut stream).unwrap();
}

#[test]
fn marker_header_gets_a_local_403() {
    let mut instance = instance("");
    let id = instance.create_http_context().unwrap();
    let mut stream = request("/secret", &[("x-wisp-deny", "1")]);

    let action = instance.on_request_headers(id, &mut stream, true).unwrap();
    assert_eq!(action, Action::Pause);
    let reply = stream.local_response.as_ref().expect("a local response");
    assert_eq!(reply.status, 403);
    assert_eq!(reply.body, b"denied by wisp header filter\n");
    assert_eq!(
        reply.headers,
        [(
            "x-wisp-denied-by".to_owned(),
            b"wisp-header-filter".to_vec()
        )]
    );
    assert_eq!(
        reply.grpc_status, -1,
        "the Rust SDK sends -1 for plain HTTP replies"
    );
    assert_eq!(reply.details, "");

    instance.finish_http_context(id, &mut stream).unwrap();
}

#[test]
fn plugin_configuration_changes_the_header_value() {
    let mut instance = instance(r#"{"header_value": "blue"}"#);

    let id = instance.create_http_context().unwrap();
    let mut stream = request("/", &[]);
    instance.on_request_headers(id, &mut stream, true).unwrap();
    instance.on_response_headers(id, &mut stream, true).unwrap();
    assert_eq!(
        header(&stream.response_headers, "x-wisp-filter"),
        Some("blue")
    );
    instance.finish_http_context(id, &mut stream).unwrap();

    let id = instance.create_http_context().unwrap();
    let mut denied = request("/", &[("X-Wisp-Deny", "yes")]);
    assert_eq!(
        instance.on_request_headers(id, &mut denied, true).unwrap(),
        Action::Pause
    );
    let reply = denied.local_response.unwrap();
    assert_eq!(
        reply.headers,
        [("x-wisp-denied-by".to_owned(), b"blue".to_vec())]
    );
}

#[test]
fn malformed_configuration_is_rejected() {
    let error = plugin("{not json")
        .instantiate()
        .err()
        .expect("configure fails");
    assert!(
        matches!(error, Error::ConfigureFailed { ref plugin } if plugin == "header-filter"),
        "{error}"
    );
    assert!(error.to_string().contains("header-filter"), "{error}");
}

#[test]
fn many_contexts_share_one_instance() {
    let mut instance = instance("");
    let root = instance.root_context_id();
    let a = instance.create_http_context().unwrap();
    let b = instance.create_http_context().unwrap();
    let c = instance.create_http_context().unwrap();
    assert_eq!(root, 1);
    assert!(
        root < a && a < b && b < c,
        "ids are fresh: {root} {a} {b} {c}"
    );

    // Interleave the streams' callbacks.
    let mut stream_a = request("/a", &[]);
    let mut stream_b = request("/b", &[("x-wisp-deny", "1")]);
    let mut stream_c = request("/c", &[]);
    assert_eq!(
        instance.on_request_headers(a, &mut stream_a, true).unwrap(),
        Action::Continue
    );
    assert_eq!(
        instance.on_request_headers(b, &mut stream_b, true).unwrap(),
        Action::Pause
    );
    assert_eq!(
        instance.on_request_headers(c, &mut stream_c, true).unwrap(),
        Action::Continue
    );
    instance
        .on_response_headers(c, &mut stream_c, true)
        .unwrap();
    instance.finish_http_context(b, &mut stream_b).unwrap();
    instance
        .on_response_headers(a, &mut stream_a, true)
        .unwrap();

    assert_eq!(
        header(&stream_a.response_headers, "x-wisp-filter"),
        Some("wisp-header-filter")
    );
    assert_eq!(
        header(&stream_c.response_headers, "x-wisp-filter"),
        Some("wisp-header-filter")
    );
    assert!(stream_a.local_response.is_none() && stream_c.local_response.is_none());
    assert_eq!(
        stream_b.local_response.as_ref().map(|r| r.status),
        Some(403)
    );

    instance.finish_http_context(a, &mut stream_a).unwrap();
    instance.finish_http_context(c, &mut stream_c).unwrap();

    // A finished context is gone; new ones keep working.
    let error = instance
        .on_request_headers(a, &mut stream_a, true)
        .unwrap_err();
    assert!(
        matches!(error, Error::UnknownContext { context_id, .. } if context_id == a),
        "{error}"
    );
    let d = instance.create_http_context().unwrap();
    assert!(d > c);
    let mut stream_d = request("/d", &[]);
    assert_eq!(
        instance.on_request_headers(d, &mut stream_d, true).unwrap(),
        Action::Continue
    );
}

#[test]
fn instances_are_independent_and_movable_across_threads() {
    let plugin = plugin("");
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let mut instance = plugin.instantiate().unwrap();
            std::thread::spawn(move || {
                let id = instance.create_http_context().unwrap();
                let mut stream = request("/", &[]);
                instance.on_request_headers(id, &mut stream, true).unwrap();
                instance.on_response_headers(id, &mut stream, true).unwrap();
                header(&stream.response_headers, "x-wisp-filter").map(str::to_owned)
            })
        })
        .collect();
    for worker in workers {
        assert_eq!(
            worker.join().unwrap().as_deref(),
            Some("wisp-header-filter")
        );
    }
}

/// Collects `(target, plugin field, message)` of every event.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<(String, String, String)>>>);

/// Installs the capturing subscriber as the global default, before any plugin
/// runs: a per-test `with_default` subscriber is flaky when other test threads
/// register the same callsites concurrently.
fn capture_logs() -> &'static Captured {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    CAPTURED.get_or_init(|| {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::registry().with(captured.clone());
        tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber");
        captured
    })
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Captured {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        #[derive(Default)]
        struct Fields {
            plugin: String,
            message: String,
        }
        impl tracing::field::Visit for Fields {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "plugin" {
                    self.plugin = value.to_owned();
                }
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                match field.name() {
                    "message" => self.message = format!("{value:?}"),
                    "plugin" => self.plugin = format!("{value:?}"),
                    _ => {}
                }
            }
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let target = event.metadata().target().to_owned();
        self.0
            .lock()
            .unwrap()
            .push((target, fields.plugin, fields.message));
    }
}

#[test]
fn plugin_logs_go_to_the_wasm_target_with_the_plugin_name() {
    let mut instance = plugin_named("logged-filter", "").instantiate().unwrap();
    let id = instance.create_http_context().unwrap();
    let mut stream = request("/logged", &[]);
    instance.on_request_headers(id, &mut stream, true).unwrap();

    let events = capture_logs().0.lock().unwrap();
    let plugin_logs: Vec<_> = events
        .iter()
        .filter(|(target, plugin, _)| target == "wasm" && plugin == "logged-filter")
        .map(|(_, _, message)| message.as_str())
        .collect();
    assert!(
        plugin_logs
            .iter()
            .any(|m| m.contains("configured: header_value=wisp-header-filter")),
        "{plugin_logs:?}"
    );
    assert!(
        plugin_logs.iter().any(|m| m.ends_with("allow /logged")),
        "{plugin_logs:?}"
    );
}
