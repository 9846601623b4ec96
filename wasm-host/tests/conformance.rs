//! Runs the SDK-built conformance filter (`tests/filters/conformance`,
//! proxy-wasm Rust SDK 0.2.5) through the host with an in-memory embedder,
//! for both `wasm32-wasip1` and `wasm32-unknown-unknown` builds.
//!
//! Every test runs on each engine of [`embedder::engines`] (Wasmtime, plus
//! WasmEdge where `WASMEDGE_DIR` is set) × both targets; a "target" below is
//! `<engine>/<wasm target>`, which also keeps vm_ids apart per engine.
//!
//! Build the modules first with `cargo xtask build-filters`; a missing module
//! fails the tests rather than skipping them.

mod embedder;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use embedder::{TestEmbedder, engines, module};
use wisp_wasm_host::{
    Action, EngineKind, Error, HeaderMap, HttpCallResponse, HttpStream, PeerType, Plugin,
    PluginConfig, PluginInstance, StreamRequest, StreamRequestKind, TcpConnection, abi::StreamType,
    metrics, shared,
};

const WASM_TARGETS: [&str; 2] = ["wasm32-wasip1", "wasm32-unknown-unknown"];

/// Every `<engine>/<wasm target>` this run covers.
fn targets() -> Vec<&'static str> {
    static TARGETS: OnceLock<Vec<&'static str>> = OnceLock::new();
    TARGETS
        .get_or_init(|| {
            engines()
                .into_iter()
                .flat_map(|engine| {
                    WASM_TARGETS.map(|target| {
                        &*Box::leak(format!("{}/{target}", engine_name(engine)).into_boxed_str())
                    })
                })
                .collect()
        })
        .clone()
}

fn engine_name(engine: EngineKind) -> &'static str {
    match engine {
        EngineKind::WasmEdge => "wasmedge",
        _ => "wasmtime",
    }
}

/// `<engine>/<wasm target>` → its parts.
fn split(target: &str) -> (EngineKind, &str) {
    let (engine, wasm_target) = target.split_once('/').expect("engine/target");
    let engine = if engine == "wasmedge" {
        EngineKind::WasmEdge
    } else {
        EngineKind::Wasmtime
    };
    (engine, wasm_target)
}

/// A plugin with its own vm_id (shared data and queues are per vm_id and
/// process-wide, so tests must not share one).
fn plugin(target: &str, test: &str, root_id: &str, configuration: &str) -> Plugin {
    let config = PluginConfig {
        name: format!("conformance-{test}"),
        root_id: root_id.into(),
        vm_id: format!("{test}-{target}"),
        configuration: configuration.as_bytes().to_vec(),
        vm_configuration: b"vm-config-bytes".to_vec(),
        engine: split(target).0,
        ..Default::default()
    };
    compiled(target)
        .with_config(config)
        .expect("the filter links")
}

/// The filter compiled once per target and test binary (compiling is the
/// slow part in debug builds).
fn compiled(target: &str) -> Plugin {
    static COMPILED: OnceLock<Mutex<HashMap<String, Plugin>>> = OnceLock::new();
    COMPILED
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(target.to_owned())
        .or_insert_with(|| {
            let (engine, wasm_target) = split(target);
            let config = PluginConfig {
                engine,
                ..Default::default()
            };
            Plugin::compile(config, module(wasm_target, "wisp_conformance_filter"))
                .expect("the filter compiles")
        })
        .clone()
}

fn start(target: &str, test: &str) -> (PluginInstance, TestEmbedder) {
    let embedder = TestEmbedder::default();
    let instance = plugin(target, test, "http", "")
        .instantiate_with(embedder.embedder())
        .expect("the filter starts");
    (instance, embedder)
}

fn request(path: &str) -> HttpStream {
    let mut stream = HttpStream {
        request_headers: [
            (":method", "GET"),
            (":path", path),
            (":authority", "svc"),
            ("x-replaced", "old"),
            ("x-remove-me", "1"),
        ]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    stream
        .properties
        .insert("source.address".into(), b"10.1.2.3:4567".to_vec());
    stream
}

fn header(map: &HeaderMap, name: &str) -> String {
    map.get(name)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_else(|| panic!("no {name} in {map:?}"))
}

/// Request headers through the filter: (context id, action).
fn headers(instance: &mut PluginInstance, stream: &mut HttpStream) -> (u32, Action) {
    let id = instance.create_http_context().unwrap();
    let action = instance.on_request_headers(id, stream, true).unwrap();
    (id, action)
}

fn shared_string(vm_id: &str, key: &str) -> String {
    String::from_utf8(shared::shared_data(vm_id, key).unwrap_or_default()).unwrap()
}

#[test]
fn start_up_reads_configuration_and_rejects_bad_config() {
    for target in targets() {
        let (instance, _) = start(target, "startup");
        assert_eq!(
            shared_string(&format!("startup-{target}"), "vm_config"),
            "vm-config-bytes"
        );
        assert_eq!(instance.tick_period(), None);
        let error = plugin(target, "startup", "http", "reject")
            .instantiate()
            .err()
            .expect("configuration rejected");
        assert!(matches!(error, Error::ConfigureFailed { .. }), "{error}");
    }
}

#[test]
fn header_map_calls() {
    for target in targets() {
        let (mut instance, _) = start(target, "headers");
        let mut stream = request("/headers");
        let (id, action) = headers(&mut instance, &mut stream);
        assert_eq!(action, Action::Continue, "{target}");
        let h = &stream.request_headers;
        assert_eq!(header(h, "x-conf-count"), "5");
        assert_eq!(header(h, "x-added"), "1");
        assert_eq!(header(h, "x-replaced"), "new");
        assert_eq!(header(h, "x-via-set-map"), "yes");
        assert_eq!(header(h, "x-conf-missing-is-none"), "true");
        assert!(!h.contains("x-remove-me"));
        stream.response_headers.add(":status", b"200");
        assert_eq!(
            instance
                .on_response_headers(id, &mut stream, false)
                .unwrap(),
            Action::Continue
        );
        assert_eq!(header(&stream.response_headers, "x-conformance"), "1");
        instance.finish_http_context(id, &mut stream).unwrap();
    }
}

#[test]
fn local_response() {
    for target in targets() {
        let (mut instance, _) = start(target, "local");
        let mut stream = request("/local");
        let (_, action) = headers(&mut instance, &mut stream);
        assert_eq!(action, Action::Pause);
        let reply = stream.local_response.expect("a local response");
        assert_eq!(reply.status, 418);
        assert_eq!(reply.body, b"short and stout");
        assert_eq!(reply.headers, vec![("x-local".to_owned(), b"yes".to_vec())]);
    }
}

#[test]
fn bodies_are_buffered_and_rewritten() {
    for target in targets() {
        let (mut instance, _) = start(target, "body");
        let mut stream = request("/body");
        let id = instance.create_http_context().unwrap();
        assert_eq!(
            instance.on_request_headers(id, &mut stream, false).unwrap(),
            Action::Continue
        );
        stream.request_body.extend_from_slice(b"hello ");
        assert_eq!(
            instance.on_request_body(id, &mut stream, false).unwrap(),
            Action::Pause
        );
        stream.request_body.extend_from_slice(b"world");
        assert_eq!(
            instance.on_request_body(id, &mut stream, true).unwrap(),
            Action::Continue
        );
        assert_eq!(stream.request_body, b"HELLO WORLD");

        stream.response_headers.add("content-length", b"4");
        instance
            .on_response_headers(id, &mut stream, false)
            .unwrap();
        assert!(!stream.response_headers.contains("content-length"));
        stream.response_body = b"body".to_vec();
        assert_eq!(
            instance.on_response_body(id, &mut stream, true).unwrap(),
            Action::Continue
        );
        assert_eq!(stream.response_body, b"<<body>>");
    }
}

#[test]
fn trailers() {
    for target in targets() {
        let (mut instance, _) = start(target, "trailers");
        let mut stream = request("/trailers");
        let (id, _) = headers(&mut instance, &mut stream);
        stream.request_trailers.add("grpc-status", b"0");
        assert_eq!(
            instance.on_request_trailers(id, &mut stream).unwrap(),
            Action::Continue
        );
        assert_eq!(header(&stream.request_trailers, "x-trailers-seen"), "1");
        assert_eq!(
            instance.on_response_trailers(id, &mut stream).unwrap(),
            Action::Continue
        );
        assert_eq!(
            header(&stream.response_trailers, "x-response-trailer"),
            "added"
        );
    }
}

#[test]
fn properties() {
    for target in targets() {
        let (mut instance, _) = start(target, "properties");
        let mut stream = request("/properties");
        headers(&mut instance, &mut stream);
        let h = &stream.request_headers;
        assert_eq!(header(h, "x-conf-plugin-name"), "conformance-properties");
        assert_eq!(header(h, "x-conf-source"), "10.1.2.3:4567");
        assert_eq!(header(h, "x-conf-absent"), "<none>");
        assert_eq!(header(h, "x-conf-roundtrip"), "set-by-plugin");
        assert_eq!(stream.properties["wisp.test"], b"set-by-plugin");
    }
}

#[test]
fn shared_data_with_cas_across_instances() {
    for target in targets() {
        let mut instances = [start(target, "shared").0, start(target, "shared").0];
        for (n, which) in [0, 1, 0].into_iter().enumerate() {
            let mut stream = request("/shared");
            headers(&mut instances[which], &mut stream);
            let h = &stream.request_headers;
            assert_eq!(header(h, "x-conf-hits"), (n + 1).to_string(), "{target}");
            assert_eq!(header(h, "x-conf-stale-cas"), "Err(CasMismatch)");
            assert_eq!(header(h, "x-conf-deleted"), "true");
        }
    }
}

#[test]
fn shared_queue_wakes_the_owning_instance() {
    for target in targets() {
        let (mut owner, embedder) = start(target, "queue");
        // Another worker's instance of the same VM enqueues.
        let (mut producer, _) = start(target, "queue");
        assert!(!owner.has_pending_queue_ready());
        let mut stream = request("/queue");
        stream.request_headers.add("x-item", b"job-1");
        headers(&mut producer, &mut stream);
        assert_eq!(header(&stream.request_headers, "x-conf-queued"), "true");
        assert_eq!(
            header(&stream.request_headers, "x-conf-unknown-queue"),
            "None"
        );
        // Registered last by `producer` (same name, same vm_id): it owns the
        // queue now, as a re-created instance takes its queue over.
        assert!(producer.has_pending_queue_ready());
        assert!(!owner.has_pending_queue_ready());
        assert_eq!(producer.deliver_queue_ready().unwrap(), 1);
        assert_eq!(
            shared_string(&format!("queue-{target}"), "last_item"),
            "job-1"
        );
        assert_eq!(owner.deliver_queue_ready().unwrap(), 0);
        // The owner's waker did not fire; the producer has no waker.
        assert_eq!(embedder.queue_wakes.load(Ordering::SeqCst), 0);
    }
}

#[test]
fn queue_waker_fires_for_the_owner() {
    for target in targets() {
        let (mut owner, embedder) = start(target, "waker");
        let mut stream = request("/queue");
        stream.request_headers.add("x-item", b"job-2");
        headers(&mut owner, &mut stream);
        assert_eq!(embedder.queue_wakes.load(Ordering::SeqCst), 1);
        assert!(owner.has_pending_queue_ready());
        assert_eq!(owner.deliver_queue_ready().unwrap(), 1);
        assert_eq!(
            shared_string(&format!("waker-{target}"), "last_item"),
            "job-2"
        );
    }
}

#[test]
fn metrics_reach_the_registry_and_the_sink() {
    for target in targets() {
        let (mut instance, embedder) = start(target, "metrics");
        let mut stream = request("/metrics");
        headers(&mut instance, &mut stream);
        let counter: u64 = header(&stream.request_headers, "x-conf-counter")
            .parse()
            .unwrap();
        assert!(counter >= 1);
        let snapshot = metrics::snapshot();
        assert!(
            snapshot
                .iter()
                .any(|m| m.name == "conf_sizes" && m.count >= 1)
        );
        let events = embedder.metric_events.lock().unwrap();
        assert!(
            events.iter().any(|e| e == "defined conf_requests Counter"),
            "{events:?}"
        );
        assert!(
            events.iter().any(|e| e == "recorded conf_sizes 42"),
            "{events:?}"
        );
    }
}

#[test]
fn http_call_pauses_and_the_answer_resumes_the_stream() {
    for target in targets() {
        let (mut instance, embedder) = start(target, "callout");
        let mut stream = request("/callout");
        stream.request_headers.add("x-callout-body", b"payload");
        let (id, action) = headers(&mut instance, &mut stream);
        assert_eq!(action, Action::Pause);
        let call = embedder
            .http_calls
            .lock()
            .unwrap()
            .pop()
            .expect("an http call");
        assert_eq!(call.upstream, "backend");
        assert_eq!(call.context_id, id);
        assert_eq!(call.root_context_id, instance.root_context_id());
        assert_eq!(call.body, b"payload");
        assert_eq!(header(&call.headers, ":path"), "/check");
        assert_eq!(header(&call.trailers, "x-trailer"), "t");
        assert_eq!(call.timeout.as_secs(), 5);
        assert_eq!(instance.pending_callouts(), [call.token]);

        let answer = HttpCallResponse {
            headers: [(":status", "200")].into_iter().collect(),
            body: b"allowed".to_vec(),
            trailers: [("x-answer-trailer", "tt")].into_iter().collect(),
        };
        instance
            .on_http_call_response(call.token, Some(answer), Some(&mut stream))
            .unwrap();
        let h = &stream.request_headers;
        assert_eq!(header(h, "x-conf-callout-status"), "200");
        assert_eq!(header(h, "x-conf-callout-body"), "allowed");
        assert_eq!(header(h, "x-conf-callout-trailer"), "tt");
        assert_eq!(
            instance.take_stream_requests(),
            [StreamRequest {
                context_id: id,
                stream: StreamType::HttpRequest,
                kind: StreamRequestKind::Continue,
            }]
        );
        assert!(instance.pending_callouts().is_empty());
        // A token is answered once.
        let again = instance.on_http_call_response(call.token, None, None);
        assert!(
            matches!(again, Err(Error::UnknownContext { .. })),
            "{again:?}"
        );
    }
}

#[test]
fn failed_and_refused_http_calls() {
    for target in targets() {
        let (mut instance, embedder) = start(target, "callout-fail");
        let mut stream = request("/callout");
        headers(&mut instance, &mut stream);
        let token = embedder.http_calls.lock().unwrap().pop().unwrap().token;
        instance
            .on_http_call_response(token, None, Some(&mut stream))
            .unwrap();
        let reply = stream.local_response.expect("a 503");
        assert_eq!(reply.status, 503);
        assert_eq!(
            reply.headers,
            vec![("x-callout-failed".into(), b"11:callout failed".to_vec())]
        );

        let mut stream = request("/callout-unknown");
        let (_, action) = headers(&mut instance, &mut stream);
        assert_eq!(action, Action::Pause);
        let reply = stream.local_response.expect("a 502");
        assert_eq!(
            reply.headers,
            vec![("x-dispatch".into(), b"Some(BadArgument)".to_vec())]
        );

        // Without callouts at all, every upstream is unknown.
        let mut bare = plugin(target, "callout-bare", "http", "")
            .instantiate()
            .unwrap();
        let mut stream = request("/callout");
        headers(&mut bare, &mut stream);
        assert_eq!(
            header(&stream.request_headers, "x-conf-dispatch"),
            "BadArgument"
        );
    }
}

#[test]
fn grpc_call_success_and_failure() {
    for target in targets() {
        let (mut instance, embedder) = start(target, "grpc");
        let mut stream = request("/grpc");
        let (id, action) = headers(&mut instance, &mut stream);
        assert_eq!(action, Action::Pause);
        let call = embedder
            .grpc_calls
            .lock()
            .unwrap()
            .pop()
            .expect("a grpc call");
        assert_eq!(
            (
                call.upstream.as_str(),
                call.service.as_str(),
                call.method.as_str()
            ),
            ("grpc-backend", "wisp.Check", "Allow")
        );
        assert_eq!(call.message, b"request-message");
        assert!(!call.streaming);
        assert_eq!(call.token & 3, 1, "gRPC call tokens carry kind 1");
        instance
            .on_grpc_receive(call.token, b"reply".to_vec(), Some(&mut stream))
            .unwrap();
        assert_eq!(
            header(&stream.request_headers, "x-conf-grpc-message"),
            "reply"
        );
        assert_eq!(instance.take_stream_requests()[0].context_id, id);
        assert!(
            instance.pending_callouts().is_empty(),
            "a unary call ends with its message"
        );

        // Failure: only a close, with the status proxy_get_status reports.
        let mut stream = request("/grpc");
        headers(&mut instance, &mut stream);
        let call = embedder.grpc_calls.lock().unwrap().pop().unwrap();
        instance
            .on_grpc_close(call.token, 14, "unavailable", Some(&mut stream))
            .unwrap();
        assert_eq!(
            header(&stream.request_headers, "x-conf-grpc-failed"),
            "14:unavailable"
        );
        assert_eq!(instance.take_stream_requests().len(), 1);
        assert!(instance.pending_callouts().is_empty());
    }
}

#[test]
fn foreign_functions_both_ways() {
    for target in targets() {
        let (mut instance, _) = start(target, "foreign");
        let mut stream = request("/foreign");
        headers(&mut instance, &mut stream);
        assert_eq!(header(&stream.request_headers, "x-conf-foreign"), "ping");
        assert_eq!(
            header(&stream.request_headers, "x-conf-foreign-missing"),
            "Some(NotFound)"
        );
        instance.on_foreign_function(7, b"args".to_vec()).unwrap();
        assert_eq!(
            shared_string(&format!("foreign-{target}"), "foreign_args"),
            "7:args"
        );
    }
}

#[test]
fn time_and_logging() {
    for target in targets() {
        let (mut instance, _) = start(target, "time");
        let mut stream = request("/time");
        headers(&mut instance, &mut stream);
        assert_eq!(header(&stream.request_headers, "x-conf-time-ok"), "true");
        assert!(header(&stream.request_headers, "x-conf-log-level").starts_with("Ok("));
    }
}

#[test]
fn ticks() {
    for target in targets() {
        let embedder = TestEmbedder::default();
        let mut instance = plugin(target, "tick", "http", "25")
            .instantiate_with(embedder.embedder())
            .unwrap();
        assert_eq!(
            instance.tick_period(),
            Some(std::time::Duration::from_millis(25))
        );
        instance.on_tick().unwrap();
        instance.on_tick().unwrap();
        assert_eq!(shared_string(&format!("tick-{target}"), "ticks"), "2");
        assert!(
            instance.shutdown().unwrap(),
            "the root context is done at once"
        );
        assert!(instance.is_done().unwrap());
    }
}

#[test]
fn tcp_filter() {
    for target in targets() {
        let mut instance = plugin(target, "tcp", "tcp", "").instantiate().unwrap();
        let mut conn = TcpConnection::default();
        conn.properties
            .insert("source.address".into(), b"10.9.9.9:1".to_vec());
        let id = instance.create_tcp_context().unwrap();
        assert_eq!(
            instance.on_new_connection(id, &mut conn).unwrap(),
            Action::Continue
        );
        let vm = format!("tcp-{target}");
        assert_eq!(
            shared_string(&vm, &format!("tcp_{id}_source")),
            "10.9.9.9:1"
        );

        conn.downstream_data = b"partial".to_vec();
        assert_eq!(
            instance.on_downstream_data(id, &mut conn, false).unwrap(),
            Action::Pause
        );
        conn.downstream_data.extend_from_slice(b" line\n");
        assert_eq!(
            instance.on_downstream_data(id, &mut conn, false).unwrap(),
            Action::Continue
        );
        assert_eq!(conn.downstream_data, b"[wisp] partial line\n");

        conn.upstream_data = b"answer".to_vec();
        assert_eq!(
            instance.on_upstream_data(id, &mut conn, false).unwrap(),
            Action::Continue
        );
        assert_eq!(conn.upstream_data, b"answer<eom>");

        instance
            .on_downstream_connection_close(id, &mut conn, PeerType::Remote)
            .unwrap();
        instance
            .on_upstream_connection_close(id, &mut conn, PeerType::Local)
            .unwrap();
        assert_eq!(
            shared_string(&vm, &format!("tcp_{id}_downstream_close")),
            "2"
        );
        assert_eq!(shared_string(&vm, &format!("tcp_{id}_upstream_close")), "1");
        instance.finish_tcp_context(id, &mut conn).unwrap();
        // HTTP calls on a TCP context are refused.
        let mut stream = HttpStream::default();
        assert!(matches!(
            instance.on_request_headers(id, &mut stream, true),
            Err(Error::UnknownContext { .. })
        ));
    }
}

#[test]
fn embedder_is_shared_by_clones() {
    let embedder = TestEmbedder::default();
    let a = embedder.embedder();
    assert!(Arc::ptr_eq(
        a.callouts.as_ref().unwrap(),
        embedder.embedder().callouts.as_ref().unwrap()
    ));
}
