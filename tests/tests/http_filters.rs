//! The agent's HTTP request path through Proxy-Wasm filters, with real
//! traffic through `wisp proxy`: request and response bodies (streamed,
//! buffered, rewritten, with their framing fixed), the buffer limit (413 /
//! 500), trailers over HTTP/2 and chunked HTTP/1.1, a stream paused in its
//! headers and resumed by an http_call answer, a gRPC close or a tick,
//! http_call, unary gRPC and gRPC streams to named clusters (unknown
//! cluster, dead cluster, timeout), a plugin trapping on a body,
//! shared-queue wakeups and plugin-defined metrics on /metrics.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use wisp_testbed::agent::{Agent, fresh_dir, metric};
use wisp_testbed::backend::{Backend, TrailerBody, runtime};
use wisp_testbed::process::ChildGuard;
use wisp_testbed::wat_filters::PREAMBLE;
use wisp_testbed::{artifacts, http};

fn echo(port: u16) -> ChildGuard {
    wisp_testbed::echo::spawn_on_loopback(&artifacts::echo_bin().unwrap(), port).unwrap()
}

/// `wisp proxy` on `listen` in front of the echo on `upstream`.
fn proxy(listen: u16, admin: u16, upstream: u16, extra: &[String]) -> Agent {
    let mut args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{listen}"),
        "--upstream",
        &format!("127.0.0.1:{upstream}"),
        "--admin",
        &format!("127.0.0.1:{admin}"),
        "--workers",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().cloned());
    Agent::start_proxy(
        &artifacts::wisp_bin().unwrap(),
        &args,
        SocketAddr::from(([127, 0, 0, 1], admin)),
    )
    .unwrap()
}

fn conformance() -> Vec<String> {
    vec![
        "--plugin".into(),
        artifacts::conformance_filter_wasm()
            .unwrap()
            .display()
            .to_string(),
    ]
}

/// A directory of the test's files, removed on drop.
struct TestDir(std::path::PathBuf);

impl TestDir {
    fn join(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A plugin given as WebAssembly text, written to a file of the test.
fn wat_plugin(name: &str, text: &str) -> (TestDir, Vec<String>) {
    let dir = TestDir(fresh_dir().unwrap());
    let path = dir.join(&format!("{name}.wasm"));
    std::fs::write(&path, wat::parse_str(text).unwrap()).unwrap();
    let args = vec!["--plugin".into(), path.display().to_string()];
    (dir, args)
}

fn curl(args: &[&str]) -> http::Reply {
    http::curl(args).unwrap()
}

/// Buffers both bodies to their end, then appends "+wat" without touching
/// content-length: the proxy must fix the framing.
fn appender() -> String {
    format!(
        r#"(module
  (import "env" "proxy_set_buffer_bytes" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  {PREAMBLE}
  (data (i32.const 16) "+wat")
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (if (i32.eqz (local.get $eos)) (then (return (i32.const 1))))
    (drop (call $set (i32.const 0) (local.get $size) (i32.const 0) (i32.const 16) (i32.const 4)))
    (i32.const 0))
  (func (export "proxy_on_response_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (if (i32.eqz (local.get $eos)) (then (return (i32.const 1))))
    (drop (call $set (i32.const 1) (local.get $size) (i32.const 0) (i32.const 16) (i32.const 4)))
    (i32.const 0)))"#
    )
}

/// Ticks every 50 ms (counting `wat_ticks`); pauses every request in its
/// headers and resumes it from the next tick (counting `wat_resumed`);
/// each request also enqueues an item into the plugin's own shared queue,
/// whose `on_queue_ready` counts `wat_queue_ready`.
fn ticker() -> String {
    format!(
        r#"(module
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $inc (param i32 i64) (result i32)))
  (import "env" "proxy_set_effective_context" (func $effective (param i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $register (param i32 i32 i32) (result i32)))
  (import "env" "proxy_enqueue_shared_queue" (func $enqueue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $dequeue (param i32 i32 i32) (result i32)))
  {PREAMBLE}
  (data (i32.const 16) "wat_ticks")
  (data (i32.const 32) "wat_resumed")
  (data (i32.const 48) "wat_queue_ready")
  (data (i32.const 96) "wq")
  (global $paused (mut i32) (i32.const 0))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $tick (i32.const 50)))
    (drop (call $define (i32.const 0) (i32.const 16) (i32.const 9) (i32.const 64)))
    (drop (call $define (i32.const 0) (i32.const 32) (i32.const 11) (i32.const 68)))
    (drop (call $define (i32.const 0) (i32.const 48) (i32.const 15) (i32.const 76)))
    (drop (call $register (i32.const 96) (i32.const 2) (i32.const 72)))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    (drop (call $enqueue (i32.load (i32.const 72)) (i32.const 96) (i32.const 2)))
    (global.set $paused (local.get $ctx))
    (i32.const 1))
  (func (export "proxy_on_queue_ready") (param i32) (param $queue i32)
    (block $done (loop $next
      (br_if $done (call $dequeue (local.get $queue) (i32.const 80) (i32.const 84)))
      (drop (call $inc (i32.load (i32.const 76)) (i64.const 1)))
      (br $next))))
  (func (export "proxy_on_tick") (param i32)
    (drop (call $inc (i32.load (i32.const 64)) (i64.const 1)))
    (if (global.get $paused) (then
      (drop (call $effective (global.get $paused)))
      (drop (call $continue (i32.const 0)))
      (drop (call $inc (i32.load (i32.const 68)) (i64.const 1)))
      (global.set $paused (i32.const 0))))))"#
    )
}

#[test]
fn request_and_response_bodies_go_through_the_plugin() {
    let _echo = echo(19280);
    let agent = proxy(19201, 19291, 19280, &conformance());
    for http2 in [false, true] {
        let mut args = vec!["--data-binary", "hello wisp, streamed"];
        if http2 {
            args.push("--http2-prior-knowledge");
        }
        args.push("http://127.0.0.1:19201/body");
        let reply = curl(&args);
        assert_eq!(reply.status, 200, "http2={http2}: {reply:?}");
        // The plugin buffered the request to its end and upper-cased it.
        let inner = reply
            .body
            .strip_prefix("<<")
            .and_then(|b| b.strip_suffix(">>"))
            .unwrap_or_else(|| panic!("response body not wrapped: {reply:?}"));
        let seen: serde_json::Value = serde_json::from_str(inner).unwrap();
        assert_eq!(seen["body"], "HELLO WISP, STREAMED", "{seen}");
        assert_eq!(seen["headers"]["content-length"], "20", "{seen}");
        assert_eq!(reply.header("x-conformance"), Some("1"));
    }
    // Without a body, the body callbacks do not change anything.
    let plain = curl(&["http://127.0.0.1:19201/plain"]);
    assert_eq!(plain.status, 200);
    assert!(plain.echo().is_some(), "{plain:?}");
    let metrics = agent.metrics().unwrap();
    assert_eq!(
        metric(&metrics, "wisp_wasm_plugin_failures_total", &[]),
        0.0,
        "{metrics}"
    );
}

#[test]
fn body_rewrites_get_correct_framing_and_the_buffer_limit_is_enforced() {
    let _echo = echo(19281);
    let (dir, mut args) = wat_plugin("appender", &appender());
    args.extend(["--buffer-limit-bytes".into(), "2000".into()]);
    let _agent = proxy(19202, 19292, 19281, &args);
    for http2 in [false, true] {
        let version = if http2 {
            "--http2-prior-knowledge"
        } else {
            "--http1.1"
        };
        let reply = curl(&[
            version,
            "--data-binary",
            "0123456789",
            "http://127.0.0.1:19202/",
        ]);
        assert_eq!(reply.status, 200, "{reply:?}");
        // Request: buffered, 4 bytes appended, content-length fixed.
        let inner = reply.body.strip_suffix("+wat").unwrap_or_else(|| {
            panic!("response body not appended: {reply:?}");
        });
        let seen: serde_json::Value = serde_json::from_str(inner).unwrap();
        assert_eq!(seen["body"], "0123456789+wat", "{seen}");
        assert_eq!(seen["headers"]["content-length"], "14", "{seen}");
        // Response: the length the client got is the rewritten one.
        assert_eq!(
            reply.header("content-length"),
            Some(reply.body.len().to_string().as_str()),
            "{reply:?}"
        );

        // A request body past the limit (in many chunks, which the plugin
        // buffers): 413, and the upstream never sees it. A body that
        // arrives whole and is not held back is not limited, as in Envoy.
        let big = dir.join("big.txt");
        std::fs::write(&big, "x".repeat(200_000)).unwrap();
        let big = format!("@{}", big.display());
        let reply = curl(&[version, "--data-binary", &big, "http://127.0.0.1:19202/"]);
        assert_eq!(reply.status, 413, "{reply:?}");
        assert!(reply.body.contains("Payload Too Large"), "{reply:?}");

        // A response body past the limit: 500.
        let reply = curl(&[version, "http://127.0.0.1:19202/?pad=200000"]);
        assert_eq!(reply.status, 500, "{reply:?}");
        assert!(reply.echo().is_none(), "{reply:?}");
    }
}

#[test]
fn trailers_go_through_the_plugin_over_http2() {
    let _echo = echo(19282);
    let _agent = proxy(19203, 19293, 19282, &conformance());
    runtime().block_on(async {
        let tcp = tokio::net::TcpStream::connect("127.0.0.1:19203")
            .await
            .unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(connection);
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert("x-client-trailer", "c".parse().unwrap());
        let request = hyper::Request::post("http://svc.test/trailers")
            .header("x-echo-trailers", "1")
            .body(TrailerBody {
                data: Some(Bytes::from_static(b"payload")),
                trailers: Some(trailers),
            })
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let seen: serde_json::Value = serde_json::from_slice(&collected.to_bytes()).unwrap();
        // The upstream got the client's trailer and the one the plugin added.
        assert_eq!(seen["trailers"]["x-client-trailer"], "c", "{seen}");
        assert_eq!(seen["trailers"]["x-trailers-seen"], "1", "{seen}");
        assert_eq!(seen["body"], "payload", "{seen}");
        // The client got the upstream's trailer and the one the plugin set.
        assert_eq!(trailers["x-echo-trailer"], "yes", "{trailers:?}");
        assert_eq!(trailers["x-response-trailer"], "added", "{trailers:?}");
    });
}

#[test]
fn http_call_pauses_the_request_until_the_cluster_answers() {
    let _echo = echo(19283);
    let _backend = Backend::start(19270);
    let mut args = conformance();
    args.extend([
        "--cluster".into(),
        "backend=127.0.0.1:19270,timeout_ms=1000".into(),
        "--cluster".into(),
        "grpc-backend=127.0.0.1:19270".into(),
    ]);
    let _agent = proxy(19204, 19294, 19283, &args);

    for version in ["--http1.1", "--http2-prior-knowledge"] {
        // Paused in request headers, resumed by on_http_call_response.
        let reply = curl(&[
            version,
            "-H",
            "x-callout-body: hi",
            "http://127.0.0.1:19204/callout",
        ]);
        assert_eq!(reply.status, 200, "{reply:?}");
        let seen = reply.echo().unwrap();
        let headers = &seen["headers"];
        assert_eq!(headers["x-conf-callout-status"], "200", "{seen}");
        assert_eq!(
            headers["x-conf-callout-body"], "checked:POST:/check:hi",
            "{seen}"
        );

        // An unknown cluster: the plugin gets BAD_ARGUMENT and answers 502.
        let reply = curl(&[version, "http://127.0.0.1:19204/callout-unknown"]);
        assert_eq!(reply.status, 502, "{reply:?}");
        assert_eq!(reply.header("x-dispatch"), Some("Some(BadArgument)"));

        // The cluster's timeout (1 s) cuts the slow answer (3 s): the plugin
        // sees a failed call and answers 503 itself.
        let started = Instant::now();
        let reply = curl(&[
            version,
            "-H",
            "x-callout-body: slow",
            "http://127.0.0.1:19204/callout",
        ]);
        assert_eq!(reply.status, 503, "{reply:?}");
        assert!(
            reply
                .header("x-callout-failed")
                .is_some_and(|v| v.starts_with("11:")),
            "{reply:?}"
        );
        assert!(started.elapsed() < Duration::from_millis(2800));

        // Unary gRPC over HTTP/2 to the cluster, answer delivered, request resumed.
        let reply = curl(&[version, "http://127.0.0.1:19204/grpc"]);
        assert_eq!(reply.status, 200, "{reply:?}");
        let seen = reply.echo().unwrap();
        assert_eq!(
            seen["headers"]["x-conf-grpc-message"], "allow:1:request-message",
            "{seen}"
        );
    }
}

#[test]
fn a_cluster_that_is_down_fails_the_call_not_the_proxy() {
    let _echo = echo(19286);
    // Nothing listens on 19271.
    let mut args = conformance();
    args.extend([
        "--cluster".into(),
        "backend=127.0.0.1:19271".into(),
        "--cluster".into(),
        "grpc-backend=127.0.0.1:19271".into(),
    ]);
    let agent = proxy(19206, 19296, 19286, &args);
    let reply = curl(&["http://127.0.0.1:19206/callout"]);
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(
        reply
            .header("x-callout-failed")
            .is_some_and(|v| v.starts_with("11:")),
        "{reply:?}"
    );
    // A gRPC call that cannot connect ends with on_grpc_close(UNAVAILABLE);
    // the plugin reports it and resumes the request.
    let reply = curl(&["http://127.0.0.1:19206/grpc"]);
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = reply.echo().unwrap();
    let failed = seen["headers"]["x-conf-grpc-failed"]
        .as_str()
        .unwrap_or_default();
    assert!(failed.starts_with("14:"), "{seen}");
    // The proxy still answers.
    assert_eq!(curl(&["http://127.0.0.1:19206/plain"]).status, 200);
    drop(agent);

    // gRPC to a cluster that is not configured: PARSE_FAILURE, as Envoy.
    let bare = proxy(19200, 19274, 19286, &conformance());
    let reply = curl(&["http://127.0.0.1:19200/grpc"]);
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = reply.echo().unwrap();
    assert_eq!(
        seen["headers"]["x-conf-grpc-dispatch"], "ParseFailure",
        "{seen}"
    );
    drop(bare);
}

#[test]
fn ticks_resume_paused_streams_queues_wake_their_worker_and_metrics_are_exported() {
    let _echo = echo(19284);
    let (_dir, mut args) = wat_plugin("ticker", &ticker());
    args.extend(conformance());
    let agent = proxy(19205, 19295, 19284, &args);
    for _ in 0..4 {
        // Paused in its headers by the first plugin, resumed by its next tick,
        // then through the conformance filter to the upstream.
        let reply = curl(&["http://127.0.0.1:19205/metrics"]);
        assert_eq!(reply.status, 200, "{reply:?}");
        let seen = reply.echo().unwrap();
        assert!(seen["headers"]["x-conf-counter"].is_string(), "{seen}");
    }
    std::thread::sleep(Duration::from_millis(500));
    let metrics = agent.metrics().unwrap();
    let plugin = |name: &str, plugin: &str| {
        metric(
            &metrics,
            "wisp_wasm_plugin_counter_total",
            &[("plugin", plugin), ("name", name)],
        )
    };
    assert_eq!(plugin("wat_resumed", "ticker"), 4.0, "{metrics}");
    assert_eq!(plugin("wat_queue_ready", "ticker"), 4.0, "{metrics}");
    // 2 workers, 50 ms each, for well over half a second.
    assert!(plugin("wat_ticks", "ticker") >= 10.0, "{metrics}");
    assert_eq!(
        plugin("conf_requests", "wisp_conformance_filter"),
        4.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "wisp_wasm_plugin_gauge",
            &[
                ("plugin", "wisp_conformance_filter"),
                ("name", "conf_inflight")
            ]
        ),
        12.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "wisp_wasm_plugin_histogram_count",
            &[
                ("plugin", "wisp_conformance_filter"),
                ("name", "conf_sizes")
            ]
        ),
        4.0,
        "{metrics}"
    );
}

/// Traps in the body callback of whichever direction the request's method
/// picks: POST requests trap in `on_request_body`, GET responses in
/// `on_response_body`.
const BODY_TRAP: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 4096))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32) unreachable)
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32) unreachable))"#;

#[test]
fn a_plugin_trapping_on_a_body_gets_its_failure_policy_before_anything_is_sent() {
    let _echo = echo(19289);
    let (_dir, mut args) = wat_plugin("body-trap", BODY_TRAP);
    args.extend(["--failure-policy".into(), "FAIL_RELOAD".into()]);
    let agent = proxy(19208, 19298, 19289, &args);
    // The request body reaches the plugin before the upstream sees anything:
    // FAIL_RELOAD answers 503.
    let reply = curl(&["--data-binary", "x", "http://127.0.0.1:19208/"]);
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(reply.body.contains("wasm_fail_stream"), "{reply:?}");
    // The response body too: the client gets a 503, not a truncated 200.
    std::thread::sleep(Duration::from_millis(1600));
    let reply = curl(&["http://127.0.0.1:19208/"]);
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(reply.body.contains("wasm_fail_stream"), "{reply:?}");
    let metrics = agent.metrics().unwrap();
    assert!(
        metric(&metrics, "wisp_wasm_plugin_failures_total", &[]) >= 2.0,
        "{metrics}"
    );
    // The worker survived: a request without a body callback still works.
    assert!(agent.admin_get("/ready").unwrap().status == 200);
}

#[test]
fn chunked_http1_trailers_go_through_the_plugin() {
    use std::io::{Read, Write};
    let _echo = echo(19290);
    let _agent = proxy(19209, 19299, 19290, &conformance());
    let mut tcp = std::net::TcpStream::connect("127.0.0.1:19209").unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(
        b"POST /trailers HTTP/1.1\r\nHost: svc.test\r\nTransfer-Encoding: chunked\r\n\
          TE: trailers\r\nX-Echo-Trailers: 1\r\nConnection: close\r\n\r\n\
          7\r\npayload\r\n0\r\nx-client-trailer: c\r\n\r\n",
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    // The upstream's view (in the chunked body) shows both request trailers.
    assert!(
        answer.contains(r#""trailers":{"x-client-trailer":"c","x-trailers-seen":"1"}"#),
        "{answer}"
    );
    // After the last chunk: the upstream's trailer and the plugin's.
    let (_, trailers) = answer.rsplit_once("\r\n0\r\n").expect("a chunked answer");
    assert!(trailers.contains("x-echo-trailer: yes"), "{answer}");
    assert!(trailers.contains("x-response-trailer: added"), "{answer}");
}

#[test]
fn without_plugins_bodies_stream_through_untouched() {
    let _echo = echo(19218);
    let _agent = proxy(19214, 19217, 19218, &[]);
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        let reply = curl(&[
            version,
            "--data-binary",
            "as is",
            "http://127.0.0.1:19214/?pad=100000",
        ]);
        assert_eq!(reply.status, 200, "{reply:?}");
        let seen = reply.echo().unwrap();
        assert_eq!(seen["body"], "as is", "{seen}");
        assert_eq!(seen["pad"].as_str().map(str::len), Some(100_000));
    }
}

/// Opens a gRPC stream to `grpc-backend` in each request's headers, sends
/// "a" then "b" (end of stream) and pauses; counts answer messages in
/// `wat_grpc_messages`, records 100 + the close status in the gauge
/// `wat_grpc_close` and resumes the request from `on_grpc_close`.
fn streamer() -> String {
    format!(
        r#"(module
  (import "env" "proxy_grpc_stream" (func $stream (param i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_send" (func $send (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $inc (param i32 i64) (result i32)))
  (import "env" "proxy_record_metric" (func $record (param i32 i64) (result i32)))
  (import "env" "proxy_set_effective_context" (func $effective (param i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  {PREAMBLE}
  (data (i32.const 16) "grpc-backend")
  (data (i32.const 32) "wisp.Check")
  (data (i32.const 48) "Stream")
  (data (i32.const 56) "ab")
  (data (i32.const 112) "wat_grpc_messages")
  (data (i32.const 160) "wat_grpc_close")
  (global $ctx (mut i32) (i32.const 0))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $define (i32.const 0) (i32.const 112) (i32.const 17) (i32.const 200)))
    (drop (call $define (i32.const 1) (i32.const 160) (i32.const 14) (i32.const 204)))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param $id i32) (param i32 i32) (result i32)
    (global.set $ctx (local.get $id))
    (if (call $stream (i32.const 16) (i32.const 12) (i32.const 32) (i32.const 10)
                      (i32.const 48) (i32.const 6) (i32.const 0) (i32.const 0) (i32.const 208))
      (then (return (i32.const 0))))
    (drop (call $send (i32.load (i32.const 208)) (i32.const 56) (i32.const 1) (i32.const 0)))
    (drop (call $send (i32.load (i32.const 208)) (i32.const 57) (i32.const 1) (i32.const 1)))
    (i32.const 1))
  (func (export "proxy_on_grpc_receive") (param i32 i32 i32)
    (drop (call $inc (i32.load (i32.const 200)) (i64.const 1))))
  (func (export "proxy_on_grpc_close") (param i32 i32) (param $status i32)
    (drop (call $record (i32.load (i32.const 204))
                        (i64.extend_i32_s (i32.add (local.get $status) (i32.const 100)))))
    (drop (call $effective (global.get $ctx)))
    (drop (call $continue (i32.const 0)))))"#
    )
}

#[test]
fn a_grpc_stream_carries_the_plugins_messages_and_delivers_every_answer() {
    let _echo = echo(19277);
    let _backend = Backend::start(19278);
    let (_dir, mut args) = wat_plugin("streamer", &streamer());
    args.extend(["--cluster".into(), "grpc-backend=127.0.0.1:19278".into()]);
    let agent = proxy(19275, 19276, 19277, &args);
    let reply = curl(&["http://127.0.0.1:19275/streamed"]);
    assert_eq!(reply.status, 200, "resumed from on_grpc_close: {reply:?}");
    assert!(reply.echo().is_some(), "{reply:?}");
    let metrics = agent.metrics().unwrap();
    let labels = |name| [("plugin", "streamer"), ("name", name)];
    assert_eq!(
        metric(
            &metrics,
            "wisp_wasm_plugin_counter_total",
            &labels("wat_grpc_messages")
        ),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "wisp_wasm_plugin_gauge",
            &labels("wat_grpc_close")
        ),
        100.0,
        "status OK: {metrics}"
    );
}

/// Closes every stream in its request headers (`proxy_close_stream`).
const CLOSER: &str = r#"(module
  (import "env" "proxy_close_stream" (func $close (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 4096))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $close (i32.const 0)))
    (i32.const 1)))"#;

#[test]
fn proxy_close_stream_resets_the_stream_and_nothing_else() {
    let _echo = echo(19261);
    let (_dir, args) = wat_plugin("closer", CLOSER);
    let agent = proxy(19279, 19260, 19261, &args);
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        let result = http::curl(&[version, "http://127.0.0.1:19279/"]);
        assert!(result.is_err(), "{version}: no answer, a reset: {result:?}");
    }
    assert_eq!(agent.admin_get("/ready").unwrap().status, 200);
}
