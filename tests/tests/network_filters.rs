//! Network (TCP) filters through the real agent (quick mode) over loopback:
//! plugins of kind `network` see each TCP pass-through connection — new
//! connection, data both ways (read and rewritten), pausing to buffer, close
//! events — and their failure policy decides what a failure does to the
//! connection. HTTP filters stay on HTTP connections and network filters on
//! TCP ones.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wisp_testbed::agent::{Agent, TestDir, metric};
use wisp_testbed::backend::Backend;
use wisp_testbed::wat_filters::PREAMBLE;
use wisp_testbed::{artifacts, http};

/// A TCP server on loopback that records what each connection sent (until
/// the client's FIN, or the end of an HTTP request head) and answers `pong`,
/// or a small HTTP response to a `GET`; then closes.
struct TcpServer {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TcpServer {
    fn start(port: u16) -> TcpServer {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, stop) = (received.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(mut stream) = stream else { continue };
                    let received = received.clone();
                    std::thread::spawn(move || {
                        stream
                            .set_read_timeout(Some(Duration::from_secs(10)))
                            .unwrap();
                        let mut got = Vec::new();
                        let mut buf = [0u8; 4096];
                        loop {
                            match stream.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => got.extend_from_slice(&buf[..n]),
                            }
                            if got.starts_with(b"GET ") && got.windows(4).any(|w| w == b"\r\n\r\n")
                            {
                                break;
                            }
                        }
                        let reply: &[u8] = if got.starts_with(b"GET ") {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                        } else {
                            b"pong"
                        };
                        received.lock().unwrap().push(got);
                        let _ = stream.write_all(reply);
                    });
                }
            })
        };
        TcpServer {
            addr,
            received,
            stop,
            thread: Some(thread),
        }
    }

    fn received(&self) -> Vec<String> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Connects to the agent, sends `parts` (pausing between them), half-closes
/// and returns everything the agent sent back until it closed.
fn exchange(port: u16, parts: &[&[u8]]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(150));
        }
        // The agent may already have closed (failure policy): not an error here.
        let _ = stream.write_all(part);
    }
    let _ = stream.shutdown(Shutdown::Write);
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    String::from_utf8_lossy(&reply).into_owned()
}

fn proxy(listen: u16, admin: u16, upstream: u16, extra: &[&str]) -> Agent {
    let mut args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{listen}"),
        "--upstream",
        &format!("127.0.0.1:{upstream}"),
        "--admin",
        &format!("127.0.0.1:{admin}"),
        "--workers",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    Agent::start_proxy(
        &artifacts::wisp_bin().unwrap(),
        &args,
        SocketAddr::from(([127, 0, 0, 1], admin)),
    )
    .unwrap()
}

/// Waits until `check` holds for the agent's log (close callbacks run after
/// the client has seen the connection end).
fn wait_for_log(agent: &Agent, check: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = agent.log();
        if check(&log) || std::time::Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_network_filter_rewrites_buffers_and_pauses_on_tcp_connections() {
    let server = TcpServer::start(19381);
    let conformance = artifacts::conformance_filter_wasm().unwrap();
    let agent = proxy(
        19301,
        19391,
        19381,
        &[
            "--protocol",
            "tcp",
            "--plugin",
            conformance.to_str().unwrap(),
            "--root-id",
            "tcp",
            "--plugin-kind",
            "network",
        ],
    );
    // The filter pauses until it has a whole line, then prefixes it; so the
    // server gets the two writes as one rewritten line. The client's FIN is
    // an empty end-of-stream buffer, which the filter prefixes too (Envoy
    // calls onData with it as well).
    let reply = exchange(19301, &[b"hel", b"lo\n"]);
    assert_eq!(server.received(), vec!["[wisp] hello\n[wisp] ".to_owned()]);
    // It appends `<eom>` to every upstream buffer: once to "pong", once to
    // the empty buffer of the end of stream (as Envoy calls onWrite then).
    assert_eq!(reply, "pong<eom><eom>");

    let metrics = agent.metrics().unwrap();
    assert_eq!(
        metric(
            &metrics,
            "wisp_downstream_connections_total",
            &[("protocol", "tcp")]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "wisp_tcp_sent_bytes_total", &[]),
        "[wisp] hello\n[wisp] ".len() as f64,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "wisp_tcp_received_bytes_total", &[]),
        "pong<eom><eom>".len() as f64,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "wisp_wasm_plugin_failures_total", &[]),
        0.0,
        "{metrics}"
    );
}

#[test]
fn http_filters_run_on_http_and_network_filters_on_tcp_connections() {
    let server = TcpServer::start(19382);
    let conformance = artifacts::conformance_filter_wasm().unwrap();
    let header_filter = artifacts::header_filter_wasm().unwrap();
    let agent = proxy(
        19302,
        19392,
        19382,
        &[
            "--plugin",
            header_filter.to_str().unwrap(),
            "--plugin-config",
            r#"{"header_value": "http-only"}"#,
            "--root-id",
            "",
            "--plugin-kind",
            "http",
            "--plugin",
            conformance.to_str().unwrap(),
            "--plugin-config",
            "",
            "--root-id",
            "tcp",
            "--plugin-kind",
            "network",
        ],
    );
    // HTTP (sniffed): the header filter answers, the network filter is not
    // involved (it would trap on HTTP callbacks and fail the request).
    let reply = http::curl(&["http://127.0.0.1:19302/x"]).unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-wisp-filter"), Some("http-only"));
    assert_eq!(reply.body, "ok");
    // Not HTTP: the network filter rewrites, the header filter never sees it.
    let tcp = exchange(19302, &[b"ping\n"]);
    assert_eq!(tcp, "pong<eom><eom>");
    let received = server.received();
    assert!(
        received[0].starts_with("GET /x HTTP/1.1\r\n"),
        "{received:?}"
    );
    assert_eq!(received[1], "[wisp] ping\n[wisp] ");
    let metrics = agent.metrics().unwrap();
    assert_eq!(
        metric(&metrics, "wisp_wasm_plugin_failures_total", &[]),
        0.0,
        "{metrics}"
    );
}

/// A network filter that logs its close events with the peer type
/// (`proxy_peer_type`: 1 local, 2 remote).
const CLOSE_LOGGER: &str = r#"
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "downstream closed, peer 0")
  (data (i32.const 64) "upstream closed, peer 0")
  (data (i32.const 112) "new connection")
  (global $next (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $next))
    (global.set $next (i32.add (global.get $next) (local.get $size)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_new_connection") (param i32) (result i32)
    (drop (call $log (i32.const 2) (i32.const 112) (i32.const 14)))
    (i32.const 0))
  (func (export "proxy_on_downstream_data") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_upstream_data") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_downstream_connection_close") (param i32) (param $peer i32)
    (i32.store8 (i32.const 40) (i32.add (i32.const 48) (local.get $peer)))
    (drop (call $log (i32.const 2) (i32.const 16) (i32.const 25))))
  (func (export "proxy_on_upstream_connection_close") (param i32) (param $peer i32)
    (i32.store8 (i32.const 86) (i32.add (i32.const 48) (local.get $peer)))
    (drop (call $log (i32.const 2) (i32.const 64) (i32.const 23)))))
"#;

/// A network filter whose downstream-data callback traps.
fn trapping() -> String {
    format!(
        r#"
(module
  {PREAMBLE}
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_new_connection") (param i32) (result i32) (i32.const 0))
  (func (export "proxy_on_downstream_data") (param i32 i32 i32) (result i32) unreachable))
"#
    )
}

/// A module compiled from `wat`, in a directory removed when dropped.
struct WasmFile {
    _dir: TestDir,
    path: std::path::PathBuf,
}

impl WasmFile {
    fn to_str(&self) -> Option<&str> {
        self.path.to_str()
    }
}

fn wasm_file(name: &str, wat: &str) -> WasmFile {
    let dir = TestDir::new().unwrap();
    let path = dir.join(name);
    std::fs::write(&path, wat::parse_str(wat).unwrap()).unwrap();
    WasmFile { _dir: dir, path }
}

#[test]
fn close_events_reach_the_filter_with_who_closed() {
    let _server = TcpServer::start(19383);
    let logger = wasm_file("close-logger.wasm", CLOSE_LOGGER);
    let agent = proxy(
        19303,
        19393,
        19383,
        &[
            "--protocol",
            "tcp",
            "--plugin",
            logger.to_str().unwrap(),
            "--plugin-kind",
            "network",
        ],
    );
    // The client half-closes, the server answers and closes: both sides
    // were closed by their peers.
    assert_eq!(exchange(19303, &[b"hi\n"]), "pong");
    let log = wait_for_log(&agent, |log| log.contains("upstream closed, peer 2"));
    assert!(log.contains("new connection"), "{log}");
    assert!(log.contains("downstream closed, peer 2"), "{log}");
    assert!(log.contains("upstream closed, peer 2"), "{log}");
    drop(agent);

    // Nothing listens upstream: wisp closes the client's side itself.
    let agent = proxy(
        19306,
        19396,
        19386,
        &[
            "--protocol",
            "tcp",
            "--plugin",
            logger.to_str().unwrap(),
            "--plugin-kind",
            "network",
        ],
    );
    assert_eq!(exchange(19306, &[b"hi\n"]), "");
    let log = wait_for_log(&agent, |log| log.contains("upstream closed"));
    assert!(log.contains("downstream closed, peer 1"), "{log}");
    assert!(log.contains("upstream closed, peer 2"), "{log}");
    let metrics = agent.metrics().unwrap();
    assert_eq!(
        metric(&metrics, "wisp_upstream_connect_errors_total", &[]),
        1.0,
        "{metrics}"
    );
}

#[test]
fn fail_closed_closes_the_connection_and_fail_open_passes_bytes_untouched() {
    let closed_server = TcpServer::start(19384);
    let trap = wasm_file("trap.wasm", &trapping());
    let closed = proxy(
        19304,
        19394,
        19384,
        &[
            "--protocol",
            "tcp",
            "--failure-policy",
            "FAIL_CLOSED",
            "--plugin",
            trap.to_str().unwrap(),
            "--plugin-kind",
            "network",
        ],
    );
    assert_eq!(exchange(19304, &[b"secret\n"]), "");
    // The instance is gone, so the next connection is refused too.
    assert_eq!(exchange(19304, &[b"again\n"]), "");
    std::thread::sleep(Duration::from_millis(200));
    for got in closed_server.received() {
        assert_eq!(got, "", "the upstream saw bytes of a failed connection");
    }
    let metrics = closed.metrics().unwrap();
    assert_eq!(
        metric(
            &metrics,
            "wisp_wasm_plugin_failures_total",
            &[("plugin", "trap")]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "wisp_wasm_plugin_unavailable_total",
            &[("plugin", "trap")]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "wisp_tcp_plugin_closes_total",
            &[("plugin", "trap")]
        ),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "wisp_tcp_sent_bytes_total", &[]),
        0.0,
        "{metrics}"
    );

    let open_server = TcpServer::start(19385);
    let open = proxy(
        19305,
        19395,
        19385,
        &[
            "--protocol",
            "tcp",
            "--failure-policy",
            "FAIL_OPEN",
            "--plugin",
            trap.to_str().unwrap(),
            "--plugin-kind",
            "network",
        ],
    );
    assert_eq!(exchange(19305, &[b"hello\n"]), "pong");
    assert_eq!(exchange(19305, &[b"again\n"]), "pong");
    assert_eq!(
        open_server.received(),
        vec!["hello\n".to_owned(), "again\n".to_owned()]
    );
    let metrics = open.metrics().unwrap();
    assert_eq!(
        metric(
            &metrics,
            "wisp_wasm_plugin_failures_total",
            &[("plugin", "trap")]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "wisp_tcp_plugin_closes_total", &[]),
        0.0,
        "{metrics}"
    );
}

#[test]
fn a_network_filter_runs_only_on_connections_its_match_selects() {
    let matched = TcpServer::start(19387);
    let other = TcpServer::start(19388);
    let conformance = artifacts::conformance_filter_wasm().unwrap();
    let yaml = format!(
        "outbound:\n  listen: 0.0.0.0:19340\n  redirect_address: 10.213.67.1\nadmin:\n  listen: 127.0.0.1:19397\nworkers: 1\nebpf:\n  pin_path: {}\nplugins:\n  - name: tagger\n    module: {}\n    root_id: tcp\n    kind: network\n    match:\n      ports: [19387]\nlisteners:\n  - name: tcp-a\n    listen: 127.0.0.1:19341\n    upstream: 127.0.0.1:19387\n    protocol: tcp\n  - name: tcp-b\n    listen: 127.0.0.1:19342\n    upstream: 127.0.0.1:19388\n    protocol: tcp\n",
        wisp_testbed::agent::test_pin_path(19340).display(),
        conformance.display()
    );
    let _agent = Agent::start_yaml(
        &artifacts::wisp_bin().unwrap(),
        &yaml,
        SocketAddr::from(([127, 0, 0, 1], 19397)),
    )
    .unwrap();
    assert_eq!(exchange(19341, &[b"ping\n"]), "pong<eom><eom>");
    assert_eq!(matched.received(), vec!["[wisp] ping\n[wisp] ".to_owned()]);
    assert_eq!(exchange(19342, &[b"ping\n"]), "pong");
    assert_eq!(other.received(), vec!["ping\n".to_owned()]);
}

#[test]
fn a_reload_swaps_network_filters_for_new_connections_only() {
    let server = TcpServer::start(19389);
    let conformance = artifacts::conformance_filter_wasm().unwrap();
    let config = |ports: &str| {
        format!(
            "outbound:\n  listen: 0.0.0.0:19350\n  redirect_address: 10.213.68.1\nadmin:\n  listen: 127.0.0.1:19398\nworkers: 1\nebpf:\n  pin_path: {}\nplugins:\n  - name: tagger\n    module: {}\n    root_id: tcp\n    kind: network\n    match:\n      ports: [{ports}]\nlisteners:\n  - name: tcp\n    listen: 127.0.0.1:19351\n    upstream: 127.0.0.1:19389\n    protocol: tcp\n",
            wisp_testbed::agent::test_pin_path(19350).display(),
            conformance.display()
        )
    };
    // At first the tagger applies to another port only.
    let agent = Agent::start_yaml(
        &artifacts::wisp_bin().unwrap(),
        &config("1"),
        SocketAddr::from(([127, 0, 0, 1], 19398)),
    )
    .unwrap();
    let mut open = TcpStream::connect("127.0.0.1:19351").unwrap();
    open.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    open.write_all(b"before\n").unwrap();

    std::fs::write(agent.config_path(), config("19389")).unwrap();
    agent.send_signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric(
        &agent.metrics().unwrap(),
        "wisp_config_reloads_total",
        &[("result", "applied")],
    ) < 1.0
    {
        assert!(std::time::Instant::now() < deadline, "{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }

    // A new connection gets the new chain …
    assert_eq!(exchange(19351, &[b"new\n"]), "pong<eom><eom>");
    // … the one open during the reload keeps the chain it started with.
    open.write_all(b"after\n").unwrap();
    open.shutdown(Shutdown::Write).unwrap();
    let mut reply = String::new();
    open.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "pong");
    let mut received = server.received();
    received.sort();
    assert_eq!(received, ["[wisp] new\n[wisp] ", "before\nafter\n"]);
}

/// A network filter that holds every new connection (pause in
/// `on_new_connection`) until its first data: data starting with `d`
/// closes the connection (`proxy_close_stream`), anything else continues.
const GATE: &str = r#"
(module
  (import "env" "proxy_get_buffer_bytes" (func $buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_close_stream" (func $close (param i32) (result i32)))
  (memory (export "memory") 1)
  (global $next (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $next))
    (global.set $next (i32.add (global.get $next) (local.get $size)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_new_connection") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_downstream_data") (param i32) (param $size i32) (param i32) (result i32)
    (if (i32.eqz (local.get $size)) (then (return (i32.const 0))))
    (drop (call $buf (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8) (i32.const 12)))
    (if (i32.eq (i32.load8_u (i32.load (i32.const 8))) (i32.const 100))
      (then
        (drop (call $close (i32.const 2)))
        (return (i32.const 1))))
    (i32.const 0)))
"#;

#[test]
fn a_filter_holds_the_upstream_connect_and_can_close_the_connection() {
    let server = TcpServer::start(19379);
    let gate = wasm_file("gate.wasm", GATE);
    let agent = proxy(
        19308,
        19399,
        19379,
        &[
            "--protocol",
            "tcp",
            "--plugin",
            gate.to_str().unwrap(),
            "--plugin-kind",
            "network",
        ],
    );
    // Denied before the filter let the connection through: the upstream is
    // never even connected.
    assert_eq!(exchange(19308, &[b"deny\n"]), "");
    std::thread::sleep(Duration::from_millis(300));
    assert!(server.received().is_empty(), "{:?}", server.received());
    // Allowed: connected on the first data, which goes through unchanged.
    assert_eq!(exchange(19308, &[b"allow\n"]), "pong");
    assert_eq!(server.received(), ["allow\n"]);
    let metrics = agent.metrics().unwrap();
    assert_eq!(
        metric(
            &metrics,
            "wisp_tcp_plugin_closes_total",
            &[("plugin", "gate")]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "wisp_wasm_plugin_failures_total", &[]),
        0.0,
        "{metrics}"
    );
}

/// A network filter whose root context ticks every 50 ms and counts the
/// ticks, and whose every new connection puts an item into the plugin's own
/// shared queue; `on_queue_ready` drains and counts them. Both counts are
/// plugin-defined metrics.
fn tcp_ticker() -> String {
    format!(
        r#"
(module
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $inc (param i32 i64) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $register (param i32 i32 i32) (result i32)))
  (import "env" "proxy_enqueue_shared_queue" (func $enqueue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $dequeue (param i32 i32 i32) (result i32)))
  {PREAMBLE}
  (data (i32.const 16) "tcp_ticks")
  (data (i32.const 32) "tcp_queue_ready")
  (data (i32.const 96) "tq")
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $tick (i32.const 50)))
    (drop (call $define (i32.const 0) (i32.const 16) (i32.const 9) (i32.const 64)))
    (drop (call $define (i32.const 0) (i32.const 32) (i32.const 15) (i32.const 68)))
    (drop (call $register (i32.const 96) (i32.const 2) (i32.const 72)))
    (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (drop (call $inc (i32.load (i32.const 64)) (i64.const 1))))
  (func (export "proxy_on_queue_ready") (param i32) (param $queue i32)
    (block $done (loop $next
      (br_if $done (call $dequeue (local.get $queue) (i32.const 80) (i32.const 84)))
      (drop (call $inc (i32.load (i32.const 68)) (i64.const 1)))
      (br $next))))
  (func (export "proxy_on_new_connection") (param i32) (result i32)
    (drop (call $enqueue (i32.load (i32.const 72)) (i32.const 96) (i32.const 2)))
    (i32.const 0))
  (func (export "proxy_on_downstream_data") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_upstream_data") (param i32 i32 i32) (result i32) (i32.const 0)))
"#
    )
}

#[test]
fn network_filters_get_ticks_queue_wakeups_and_their_own_metrics() {
    let _server = TcpServer::start(19380);
    let ticker = wasm_file("tcp-ticker.wasm", &tcp_ticker());
    let agent = proxy(
        19307,
        19378,
        19380,
        &[
            "--protocol",
            "tcp",
            "--plugin",
            ticker.to_str().unwrap(),
            "--plugin-kind",
            "network",
        ],
    );
    for _ in 0..2 {
        assert_eq!(exchange(19307, &[b"hi\n"]), "pong");
    }
    let counter = |metrics: &str, name: &str| {
        metric(
            metrics,
            "wisp_wasm_plugin_counter_total",
            &[("plugin", "tcp-ticker"), ("name", name)],
        )
    };
    // Ticks come every 50 ms: wait until several did, within a deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let metrics = agent.metrics().unwrap();
        if counter(&metrics, "tcp_ticks") >= 5.0 || std::time::Instant::now() > deadline {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(counter(&metrics, "tcp_ticks") >= 5.0, "{metrics}");
    // One item per connection, delivered on the worker that owns the queue.
    assert_eq!(counter(&metrics, "tcp_queue_ready"), 2.0, "{metrics}");
}

/// Remembers the newest connection's context and closes that connection
/// from its next tick (every 50 ms): `proxy_set_effective_context` +
/// `proxy_close_stream(DOWNSTREAM)` in `on_tick`.
fn tick_closer() -> String {
    format!(
        r#"
(module
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $effective (param i32) (result i32)))
  (import "env" "proxy_close_stream" (func $close (param i32) (result i32)))
  {PREAMBLE}
  (global $conn (mut i32) (i32.const 0))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $tick (i32.const 50)))
    (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (if (global.get $conn) (then
      (drop (call $effective (global.get $conn)))
      (drop (call $close (i32.const 2)))
      (global.set $conn (i32.const 0)))))
  (func (export "proxy_on_new_connection") (param $ctx i32) (result i32)
    (global.set $conn (local.get $ctx))
    (i32.const 0))
  (func (export "proxy_on_downstream_data") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_upstream_data") (param i32 i32 i32) (result i32) (i32.const 0)))
"#
    )
}

#[test]
fn a_network_filter_closes_a_connection_from_its_tick() {
    let _server = TcpServer::start(19312);
    let closer = wasm_file("tick-closer.wasm", &tick_closer());
    let agent = proxy(
        19309,
        19372,
        19312,
        &[
            "--protocol",
            "tcp",
            "--plugin",
            closer.to_str().unwrap(),
            "--plugin-kind",
            "network",
        ],
    );
    // The client sends a line and keeps its side open; the server waits for
    // the client's end. Only the filter's tick can end this connection.
    let mut stream = TcpStream::connect("127.0.0.1:19309").unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(8)))
        .unwrap();
    stream.write_all(b"hi\n").unwrap();
    let mut reply = Vec::new();
    let read = stream.read_to_end(&mut reply);
    assert!(
        read.is_ok(),
        "the connection was not closed by the tick: {read:?}\n{}",
        agent.log()
    );
    assert!(reply.is_empty(), "{reply:?}");
    let metrics = agent.metrics().unwrap();
    assert_eq!(
        metric(
            &metrics,
            "wisp_tcp_plugin_closes_total",
            &[("plugin", "tick-closer")]
        ),
        1.0,
        "{metrics}"
    );
}

/// The SDK-built filter in `authz:<path>` mode: `on_new_connection` POSTs the
/// source address to `backend` and pauses; the answer comes back to the
/// connection's context, which closes the connection unless it was a 200.
fn authorizing_proxy(listen: u16, admin: u16, upstream: u16, path: &str) -> Agent {
    let conformance = artifacts::conformance_filter_wasm().unwrap();
    proxy(
        listen,
        admin,
        upstream,
        &[
            "--protocol",
            "tcp",
            "--plugin",
            conformance.to_str().unwrap(),
            "--root-id",
            "tcp",
            "--plugin-kind",
            "network",
            "--plugin-config",
            &format!("authz:{path}"),
            "--cluster",
            "backend=127.0.0.1:19336",
        ],
    )
}

#[test]
fn a_network_filter_authorizes_each_connection_with_an_http_call() {
    let _backend = Backend::start(19336);

    // Allowed: the answer arrives before the client sends anything, then
    // the bytes go through the filter as usual.
    let server = TcpServer::start(19335);
    let agent = authorizing_proxy(19333, 19334, 19335, "/check");
    let mut stream = TcpStream::connect(("127.0.0.1", 19333)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let log = wait_for_log(&agent, |log| log.contains("authz 200"));
    assert!(
        log.contains("authz 200: checked:POST:/check:127.0.0.1:"),
        "the filter got the callout's answer: {log}"
    );
    stream.write_all(b"ping\n").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).unwrap();
    assert_eq!(String::from_utf8_lossy(&reply), "pong<eom><eom>");
    assert_eq!(server.received(), vec!["[wisp] ping\n[wisp] ".to_owned()]);
    let metrics = agent.metrics().unwrap();
    assert_eq!(
        metric(&metrics, "wisp_tcp_plugin_closes_total", &[]),
        0.0,
        "{metrics}"
    );
    drop(agent);

    // Denied: the filter closes the connection from the answer's callback;
    // the upstream was never connected (the filter held the connect back).
    let server = TcpServer::start(19343);
    let agent = authorizing_proxy(19337, 19338, 19343, "/deny");
    let mut stream = TcpStream::connect(("127.0.0.1", 19337)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = Vec::new();
    let read = stream.read_to_end(&mut reply);
    assert!(
        read.is_ok() && reply.is_empty(),
        "wisp closed the connection without a byte: {read:?} {reply:?}"
    );
    let log = wait_for_log(&agent, |log| log.contains("authz 403"));
    assert!(
        log.contains("authz 403: denied:127.0.0.1:"),
        "the filter got the denial: {log}"
    );
    let metrics = agent.metrics().unwrap();
    assert_eq!(
        metric(&metrics, "wisp_tcp_plugin_closes_total", &[]),
        1.0,
        "{metrics}"
    );
    drop(agent);
    assert!(
        server.received().is_empty(),
        "the upstream saw no connection: {:?}",
        server.received()
    );
}
