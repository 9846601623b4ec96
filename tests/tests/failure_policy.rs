//! A plugin that traps on every request, through the real agent (quick
//! mode), under each failure policy: FAIL_CLOSED answers 503 and keeps
//! answering 503 (the instance is gone, as in Envoy), FAIL_OPEN lets requests
//! through without the plugin, FAIL_RELOAD answers 503 and re-creates the
//! instance with backoff. The agent never crashes.

use std::net::SocketAddr;

use wisp_testbed::agent::{Agent, fresh_dir, metric};
use wisp_testbed::process::ChildGuard;
use wisp_testbed::wat_filters::PREAMBLE;
use wisp_testbed::{artifacts, http};

/// A minimal Proxy-Wasm module whose request-headers callback traps.
fn trapping_plugin() -> String {
    format!(
        r#"
(module
  {PREAMBLE}
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) unreachable))
"#
    )
}

fn curl(port: u16) -> http::Reply {
    http::curl(&[&format!("http://127.0.0.1:{port}/")]).unwrap()
}

fn run(
    policy: &str,
    port: u16,
    upstream: u16,
    admin: u16,
) -> (Agent, ChildGuard, std::path::PathBuf) {
    let dir = fresh_dir().unwrap();
    let wasm = dir.join("trap.wasm");
    std::fs::write(&wasm, wat::parse_str(trapping_plugin()).unwrap()).unwrap();
    let echo =
        wisp_testbed::echo::spawn_on_loopback(&artifacts::echo_bin().unwrap(), upstream).unwrap();
    let args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--upstream",
        &format!("127.0.0.1:{upstream}"),
        "--admin",
        &format!("127.0.0.1:{admin}"),
        "--workers",
        "1",
        "--failure-policy",
        policy,
        "--plugin",
        wasm.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let agent = Agent::start_proxy(
        &artifacts::wisp_bin().unwrap(),
        &args,
        SocketAddr::from(([127, 0, 0, 1], admin)),
    )
    .unwrap();
    (agent, echo, dir)
}

#[test]
fn fail_closed_answers_503_and_keeps_the_plugin_out() {
    let (agent, _echo, dir) = run("FAIL_CLOSED", 17901, 17980, 17991);
    for _ in 0..3 {
        let reply = curl(17901);
        assert_eq!(reply.status, 503, "{reply:?}");
        assert!(reply.body.contains("wasm_fail_stream"), "{reply:?}");
    }
    let metrics = agent.metrics().unwrap();
    assert_eq!(
        metric(&metrics, "wisp_wasm_plugin_failures_total", &[]),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "wisp_wasm_plugin_unavailable_total", &[]),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "wisp_wasm_traps_total", &[("plugin", "trap")]),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "wisp_wasm_reloads_total", &[("plugin", "trap")]),
        0.0,
        "FAIL_CLOSED never reloads"
    );
    assert!(!agent.log().contains("panicked"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn fail_open_lets_requests_through_without_the_plugin() {
    let (agent, _echo, dir) = run("FAIL_OPEN", 17902, 17981, 17992);
    for _ in 0..3 {
        let reply = curl(17902);
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.echo().unwrap()["server"], "upstream");
    }
    let metrics = agent.metrics().unwrap();
    assert_eq!(
        metric(&metrics, "wisp_wasm_plugin_failures_total", &[]),
        1.0,
        "{metrics}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn fail_reload_answers_503_and_reloads_the_instance() {
    let (agent, _echo, dir) = run("FAIL_RELOAD", 17903, 17982, 17993);
    let first = curl(17903);
    assert_eq!(first.status, 503, "{first:?}");
    // Requests keep getting 503; once the backoff (1–1.5 s) has passed, one
    // of them re-creates the instance, which traps again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !agent.log().contains("plugin instance reloaded") {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload within 10 s\n{}",
            agent.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
        let reply = curl(17903);
        assert_eq!(reply.status, 503, "{reply:?}");
    }
    let metrics = agent.metrics().unwrap();
    assert!(
        metric(&metrics, "wisp_wasm_plugin_failures_total", &[]) >= 2.0,
        "{metrics}"
    );
    // The host's own counters, per plugin.
    assert!(
        metric(&metrics, "wisp_wasm_reloads_total", &[("plugin", "trap")]) >= 1.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "wisp_wasm_traps_total", &[("plugin", "trap")]) >= 2.0,
        "{metrics}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
