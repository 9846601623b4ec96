//! Singleton plugins (`kind: singleton`): one instance for the agent, on
//! the main thread, with only a root context. Here one ticks, counts its
//! ticks in a plugin-defined metric, fetches something from a cluster with
//! `http_call` and leaves both in shared data, which an HTTP filter on the
//! workers reads into every request.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use wisp_testbed::agent::{Agent, TestDir, metric, test_pin_path};
use wisp_testbed::artifacts;
use wisp_testbed::http::curl;
use wisp_testbed::wat_filters::PREAMBLE;

const LISTEN: u16 = 19344;
const ADMIN: u16 = 19345;
const UPSTREAM: u16 = 19346;
const BACKEND: u16 = 19347;

/// Ticks every 20 ms: counts `singleton_ticks` and sets shared data
/// `from-singleton` to `tick`. Its first tick POSTs `singleton` to
/// `/check` on cluster `backend`; the answer's body goes to shared data
/// `callout`.
fn ticking_singleton() -> String {
    format!(
        r#"
(module
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $inc (param i32 i64) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $buf (param i32 i32 i32 i32 i32) (result i32)))
  {PREAMBLE}
  (data (i32.const 16) "singleton_ticks")
  (data (i32.const 48) "from-singleton")
  (data (i32.const 80) "tick")
  (data (i32.const 88) "callout")
  (data (i32.const 100) "backend")
  (data (i32.const 112) "singleton")
  ;; The request's header pairs, serialized: count, (name, value) lengths,
  ;; then each name and value followed by a NUL.
  (data (i32.const 128)
    "\03\00\00\00"
    "\07\00\00\00\04\00\00\00" "\05\00\00\00\06\00\00\00" "\0a\00\00\00\07\00\00\00"
    ":method\00POST\00:path\00/check\00:authority\00backend\00")
  (global $called (mut i32) (i32.const 0))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $tick (i32.const 20)))
    (drop (call $define (i32.const 0) (i32.const 16) (i32.const 15) (i32.const 64)))
    (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (drop (call $inc (i32.load (i32.const 64)) (i64.const 1)))
    (drop (call $set (i32.const 48) (i32.const 14) (i32.const 80) (i32.const 4) (i32.const 0)))
    (if (i32.eqz (global.get $called))
      (then
        (global.set $called (i32.const 1))
        (drop (call $call (i32.const 100) (i32.const 7) (i32.const 128) (i32.const 73)
                          (i32.const 112) (i32.const 9) (i32.const 0) (i32.const 0)
                          (i32.const 5000) (i32.const 72))))))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32) (param $body i32) (param i32)
    (drop (call $buf (i32.const 4) (i32.const 0) (local.get $body) (i32.const 8) (i32.const 12)))
    (drop (call $set (i32.const 88) (i32.const 7) (i32.load (i32.const 8)) (i32.load (i32.const 12)) (i32.const 0)))))
"#
    )
}

/// Copies shared data `from-singleton` and `callout` into the request
/// headers `x-singleton` and `x-callout`, when they are there.
fn shared_data_reader() -> String {
    format!(
        r#"
(module
  (import "env" "proxy_get_shared_data" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  {PREAMBLE}
  (data (i32.const 48) "from-singleton")
  (data (i32.const 88) "callout")
  (data (i32.const 96) "x-singleton")
  (data (i32.const 112) "x-callout")
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eqz (call $get (i32.const 48) (i32.const 14) (i32.const 8) (i32.const 12) (i32.const 24)))
      (then (drop (call $add (i32.const 0) (i32.const 96) (i32.const 11)
                            (i32.load (i32.const 8)) (i32.load (i32.const 12))))))
    (if (i32.eqz (call $get (i32.const 88) (i32.const 7) (i32.const 8) (i32.const 12) (i32.const 24)))
      (then (drop (call $add (i32.const 0) (i32.const 112) (i32.const 9)
                            (i32.load (i32.const 8)) (i32.load (i32.const 12))))))
    (i32.const 0)))
"#
    )
}

#[test]
fn a_singleton_ticks_once_for_the_agent_and_shares_data_with_the_workers() {
    let dir = TestDir::new().unwrap();
    let singleton = dir.join("singleton.wasm");
    std::fs::write(&singleton, wat::parse_str(ticking_singleton()).unwrap()).unwrap();
    let reader = dir.join("reader.wasm");
    std::fs::write(&reader, wat::parse_str(shared_data_reader()).unwrap()).unwrap();
    let _upstream =
        wisp_testbed::echo::spawn_on_loopback(&artifacts::echo_bin().unwrap(), UPSTREAM).unwrap();
    let _backend = wisp_testbed::backend::Backend::start(BACKEND);
    let args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{LISTEN}"),
        "--upstream",
        &format!("127.0.0.1:{UPSTREAM}"),
        "--admin",
        &format!("127.0.0.1:{ADMIN}"),
        // Two workers, one singleton: the tick count is the singleton's
        // alone, not one per worker.
        "--workers",
        "2",
        "--plugin",
        singleton.to_str().unwrap(),
        "--plugin-kind",
        "singleton",
        "--plugin",
        reader.to_str().unwrap(),
        "--cluster",
        &format!("backend=127.0.0.1:{BACKEND}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let started = Instant::now();
    let agent = Agent::start_proxy(
        &artifacts::wisp_bin().unwrap(),
        &args,
        SocketAddr::from(([127, 0, 0, 1], ADMIN)),
    )
    .unwrap();

    let ticks = |metrics: &str| {
        metric(
            metrics,
            "wisp_wasm_plugin_counter_total",
            &[("plugin", "singleton"), ("name", "singleton_ticks")],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let metrics = agent.metrics().unwrap();
        if ticks(&metrics) >= 5.0 || Instant::now() > deadline {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(ticks(&metrics) >= 5.0, "the singleton ticks: {metrics}");
    // One instance ticking every 20 ms: never more ticks than that allows
    // (two instances would double it). Loose bound, the clock is coarse.
    let elapsed_ticks = started.elapsed().as_millis() as f64 / 20.0;
    assert!(
        ticks(&metrics) <= elapsed_ticks + 2.0,
        "{} ticks in {:?}: more than one instance?\n{metrics}",
        ticks(&metrics),
        started.elapsed()
    );

    // Every request, on either worker, sees what the singleton shared,
    // including the answer to its callout (which may take a moment).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut answered = 0;
    while answered < 4 {
        let reply = curl(&[&format!("http://127.0.0.1:{LISTEN}/")]).unwrap();
        assert_eq!(reply.status, 200, "{reply:?}");
        let seen = reply.echo().unwrap();
        assert_eq!(seen["headers"]["x-singleton"], "tick", "{seen}");
        if seen["headers"]["x-callout"] == "checked:POST:/check:singleton" {
            answered += 1;
        } else {
            assert!(
                Instant::now() < deadline,
                "no callout answer: {seen}\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let plugins: serde_json::Value =
        serde_json::from_str(&agent.admin_get("/plugins").unwrap().body).unwrap();
    assert_eq!(plugins[0]["kind"], "singleton", "{plugins}");
    assert_eq!(plugins[1]["kind"], "http", "{plugins}");
    assert_eq!(
        metric(&metrics, "wisp_wasm_plugin_failures_total", &[]),
        0.0,
        "{metrics}"
    );
}

/// Ticks every 20 ms and sets shared data `from-singleton` to its plugin
/// configuration: after a reload, the value says which instance ticks.
fn configured_singleton() -> String {
    format!(
        r#"
(module
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  {PREAMBLE}
  (data (i32.const 48) "from-singleton")
  (global $config (mut i32) (i32.const 0))
  (global $len (mut i32) (i32.const 0))
  (func (export "proxy_on_configure") (param i32) (param $size i32) (result i32)
    (drop (call $buf (i32.const 7) (i32.const 0) (local.get $size) (i32.const 8) (i32.const 12)))
    (global.set $config (i32.load (i32.const 8)))
    (global.set $len (i32.load (i32.const 12)))
    (drop (call $tick (i32.const 20)))
    (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (drop (call $set (i32.const 48) (i32.const 14) (global.get $config) (global.get $len) (i32.const 0)))))
"#
    )
}

#[test]
fn a_reload_replaces_the_singleton_and_the_old_one_stops() {
    let dir = TestDir::new().unwrap();
    let singleton = dir.join("configured.wasm");
    std::fs::write(&singleton, wat::parse_str(configured_singleton()).unwrap()).unwrap();
    let reader = dir.join("reader.wasm");
    std::fs::write(&reader, wat::parse_str(shared_data_reader()).unwrap()).unwrap();
    let _upstream =
        wisp_testbed::echo::spawn_on_loopback(&artifacts::echo_bin().unwrap(), 19353).unwrap();
    let config = |value: &str| {
        format!(
            "outbound:\n  listen: 0.0.0.0:19355\n  redirect_address: 10.213.69.1\nadmin:\n  listen: 127.0.0.1:19354\nworkers: 2\nebpf:\n  pin_path: {pin}\nplugins:\n  - name: configured\n    module: {singleton}\n    kind: singleton\n    configuration: {value}\n  - name: reader\n    module: {reader}\nlisteners:\n  - name: api\n    listen: 127.0.0.1:19352\n    upstream: 127.0.0.1:19353\n",
            pin = test_pin_path(19355).display(),
            singleton = singleton.display(),
            reader = reader.display(),
        )
    };
    let agent = Agent::start_yaml(
        &artifacts::wisp_bin().unwrap(),
        &config("first"),
        SocketAddr::from(([127, 0, 0, 1], 19354)),
    )
    .unwrap();
    let shared = || -> String {
        let reply = curl(&["http://127.0.0.1:19352/"]).unwrap();
        assert_eq!(reply.status, 200, "{reply:?}");
        let seen = reply.echo().unwrap();
        seen["headers"]["x-singleton"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let wait_for = |value: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared() != value {
            assert!(
                Instant::now() < deadline,
                "shared data never became {value:?}\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for("first");

    // The agent notices the changed file and reloads.
    std::fs::write(agent.config_path(), config("second")).unwrap();
    wait_for("second");
    // The first instance is gone: were it still ticking, it would write
    // `first` back within 20 ms. Watch for a few dozen of its periods.
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            shared(),
            "second",
            "the old singleton still ticks\n{}",
            agent.log()
        );
    }
    let metrics = agent.metrics().unwrap();
    assert!(
        metric(
            &metrics,
            "wisp_config_reloads_total",
            &[("result", "applied")]
        ) >= 1.0,
        "{metrics}"
    );
}
