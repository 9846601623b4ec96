//! End to end, in real network namespaces against the real kernel: the
//! `wisp` agent steers an enrolled pod's connections through its Proxy-Wasm
//! filter, leaves other pods alone, and leaves nothing behind.
//!
//! Needs root, bpftool, curl and iproute2 (`cargo xtask test` sets them up).
//! Without them the tests fail with a message naming what is missing.

use std::net::SocketAddr;

use wisp_testbed::agent::{Agent, AgentConfig, PluginSpec, metric};
use wisp_testbed::node::SimNode;
use wisp_testbed::{artifacts, http, leftovers};

const ECHO_PORT: u16 = 8080;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create network namespaces and attach eBPF programs: run them as root (`cargo xtask test`)"
    );
}

fn header_filter(value: &str) -> PluginSpec {
    PluginSpec {
        name: "header-filter".into(),
        module: artifacts::header_filter_wasm().unwrap(),
        configuration: format!(r#"{{"header_value": "{value}"}}"#),
        failure_policy: "FAIL_CLOSED",
    }
}

#[test]
fn enrolled_pod_goes_through_the_filter_and_other_pods_go_direct() {
    require_root();
    let node = SimNode::create("st", 11, &["a", "b", "c"]).unwrap();
    let echo = artifacts::echo_bin().unwrap();
    let (a, b, c) = (
        node.pod("a").unwrap(),
        node.pod("b").unwrap(),
        node.pod("c").unwrap(),
    );
    let echo_b = b.spawn_echo(&echo, ECHO_PORT).unwrap();
    let b_addr = SocketAddr::from((b.ip, ECHO_PORT));

    let mut agent = Agent::start(
        &artifacts::wisp_bin().unwrap(),
        &AgentConfig {
            listen: SocketAddr::from((node.node_ip(), 15101)),
            admin: "127.0.0.1:15191".parse().unwrap(),
            workers: 2,
            plugins: vec![header_filter("e2e")],
            workloads: vec![("a".into(), a.netns_path())],
        },
    )
    .unwrap();

    // Enrolled pod a: steered to the agent, through the filter, on to b.
    let allowed = http::get(a, b_addr, "/hello?x=1", &[("x-test", "yes")]).unwrap();
    assert_eq!(
        allowed.status,
        200,
        "{allowed:?}\nagent log:\n{}",
        agent.log()
    );
    assert_eq!(allowed.header("x-wisp-filter"), Some("e2e"), "{allowed:?}");
    let echo_seen = allowed.echo().expect("the echo server's JSON");
    assert_eq!(echo_seen["server"], "b", "reached the original destination");
    assert_eq!(echo_seen["path"], "/hello?x=1");
    assert_eq!(
        echo_seen["headers"]["x-test"], "yes",
        "request headers forwarded"
    );
    assert_eq!(
        echo_seen["peer"],
        node.node_ip().to_string(),
        "b must see the agent (node address) as its peer, proving the hop through wisp"
    );

    // The marker header: the filter answers 403 itself; b never sees it.
    let denied = http::get(a, b_addr, "/secret", &[("x-wisp-deny", "1")]).unwrap();
    assert_eq!(denied.status, 403, "{denied:?}");
    assert_eq!(denied.header("x-wisp-denied-by"), Some("e2e"));
    assert!(
        denied.body.contains("denied by wisp header filter"),
        "{denied:?}"
    );
    assert!(
        denied.echo().is_none(),
        "b answered a denied request: {denied:?}"
    );

    // Pod c is not enrolled: it reaches b directly, untouched.
    let direct = http::get(c, b_addr, "/direct", &[("x-wisp-deny", "1")]).unwrap();
    assert_eq!(direct.status, 200, "{direct:?}");
    assert_eq!(direct.header("x-wisp-filter"), None);
    assert_eq!(direct.echo().unwrap()["peer"], c.ip.to_string());

    // Per-pod counters, from the agent and from the kernel programs.
    let metrics = agent.metrics().unwrap();
    let count = |labels: &[(&str, &str)]| metric(&metrics, "wisp_http_requests_total", labels);
    assert_eq!(
        count(&[("source_workload", "a"), ("response_code", "200")]),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        count(&[("source_workload", "a"), ("response_code", "403")]),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "wisp_kernel_connects_redirected_total",
            &[("workload", "a")]
        ),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "wisp_kernel_connections_established_total",
            &[("workload", "a")]
        ),
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            "wisp_wasm_local_responses_total",
            &[("plugin", "header-filter")]
        ),
        1.0
    );
    assert_eq!(
        metric(&metrics, "wisp_unsteered_connections_total", &[]),
        0.0
    );

    // SIGTERM: the agent exits cleanly and its steering goes with it.
    let status = agent.stop().expect("the agent was running");
    assert!(
        status.success(),
        "wisp exited with {status}\n{}",
        agent.log()
    );
    let log = agent.log();
    assert!(log.contains("detaching eBPF programs"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    let after = http::get(a, b_addr, "/after", &[]).unwrap();
    assert_eq!(after.status, 200);
    assert_eq!(
        after.header("x-wisp-filter"),
        None,
        "still steered after the agent stopped"
    );
    assert_eq!(after.echo().unwrap()["peer"], a.ip.to_string());

    drop(echo_b);
    drop(node);
    assert_eq!(leftovers::find(Some("st")), Vec::<String>::new());
}

#[test]
fn a_steered_connection_to_a_closed_port_gets_a_503_with_a_reason() {
    require_root();
    let node = SimNode::create("up", 12, &["a", "b"]).unwrap();
    let (a, b) = (node.pod("a").unwrap(), node.pod("b").unwrap());
    let agent = Agent::start(
        &artifacts::wisp_bin().unwrap(),
        &AgentConfig {
            listen: SocketAddr::from((node.node_ip(), 15102)),
            admin: "127.0.0.1:15192".parse().unwrap(),
            workers: 1,
            plugins: vec![header_filter("up")],
            workloads: vec![("a".into(), a.netns_path())],
        },
    )
    .unwrap();
    // Nothing listens on b:9 — the agent accepted, so the client gets an
    // HTTP answer from it rather than a reset.
    let reply = http::get(a, SocketAddr::from((b.ip, 9)), "/", &[]).unwrap();
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(reply.body.contains("upstream connect error"), "{reply:?}");
    // Like Envoy, the filter also sees the locally generated reply.
    assert_eq!(reply.header("x-wisp-filter"), Some("up"));
    let metrics = agent.metrics().unwrap();
    assert_eq!(
        metric(&metrics, "wisp_upstream_connect_errors_total", &[]),
        1.0,
        "{metrics}"
    );
    assert!(
        agent
            .log()
            .contains("cannot connect to the original destination")
    );
}
