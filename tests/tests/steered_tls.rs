//! TLS origination per destination port on the steered listener, in real
//! network namespaces against the real kernel: an enrolled pod speaks plain
//! HTTP to a port listed in `outbound.upstream_tls`, and the agent carries
//! the request to that destination over mTLS with certificates generated in
//! the test. On the way, plugins matched by source workload run for the
//! steered pod's requests and the others do not.
//!
//! Needs root, curl and iproute2 (`cargo xtask test` sets them up).

use std::net::SocketAddr;

use wisp_testbed::agent::{Agent, TestDir, metric, test_pin_path};
use wisp_testbed::node::SimNode;
use wisp_testbed::pki::TestPki;
use wisp_testbed::{artifacts, http};

use wisp_testbed::wat_filters::header_marker;

#[test]
fn a_steered_request_to_a_port_with_upstream_tls_goes_out_over_mtls() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and attaches eBPF programs: run it as root (`cargo xtask test`)"
    );
    let dir = TestDir::new().unwrap();
    let pki = TestPki::generate(&dir).unwrap();
    let p = |path: &std::path::Path| path.to_str().unwrap().to_owned();
    let node = SimNode::create("t1", 65, &["a"]).unwrap();
    let pod = node.pod("a").unwrap();
    let node_ip = node.node_ip();

    let _echo =
        wisp_testbed::echo::spawn_on_loopback(&artifacts::echo_bin().unwrap(), 19364).unwrap();
    // The destination: a TLS server on the node that requires client
    // certificates (a wisp in quick mode in front of the echo server).
    let backend = Agent::start_mtls_front(
        &artifacts::wisp_bin().unwrap(),
        SocketAddr::from((node_ip, 19362)),
        SocketAddr::from(([127, 0, 0, 1], 19364)),
        SocketAddr::from(([127, 0, 0, 1], 19363)),
        &pki,
    )
    .unwrap();

    // Adds the request header named by its plugin configuration.
    let marker = dir.join("marker.wasm");
    std::fs::write(&marker, wat::parse_str(header_marker()).unwrap()).unwrap();
    let plugins = format!(
        "plugins:\n  - name: for-a\n    module: {m}\n    configuration: x-ran-for-a\n    match:\n      workloads: [a]\n  - name: for-b\n    module: {m}\n    configuration: x-ran-for-b\n    match:\n      workloads: [b]\n",
        m = marker.display()
    );
    let yaml = format!(
        "{plugins}outbound:\n  listen: {node_ip}:19360\n  upstream_tls:\n    19362:\n      ca: {}\n      server_name: svc.test\n      client_cert: {}\n      client_key: {}\nadmin:\n  listen: 127.0.0.1:19361\nworkers: 1\nebpf:\n  pin_path: {}\nworkloads:\n  - name: a\n    netns: {}\n",
        p(&pki.ca),
        p(&pki.client_cert),
        p(&pki.client_key),
        test_pin_path(19360).display(),
        pod.netns_path().display(),
    );
    let agent = Agent::start_yaml(
        &artifacts::wisp_bin().unwrap(),
        &yaml,
        SocketAddr::from(([127, 0, 0, 1], 19361)),
    )
    .unwrap();

    // The pod speaks plain HTTP to a TLS-only port: only the agent's TLS
    // origination can make this work.
    let reply = http::get(pod, SocketAddr::from((node_ip, 19362)), "/tls-out", &[]).unwrap();
    assert_eq!(reply.status, 200, "{reply:?}\nagent log:\n{}", agent.log());
    let seen = reply.echo().expect("the echo server's JSON");
    assert_eq!(seen["path"], "/tls-out");
    assert_eq!(seen["server"], "upstream");
    assert_eq!(seen["headers"]["x-ran-for-a"], "1", "{seen}");
    assert!(seen["headers"].get("x-ran-for-b").is_none(), "{seen}");

    let front = agent.metrics().unwrap();
    assert_eq!(
        metric(
            &front,
            "wisp_http_requests_total",
            &[("source_workload", "a"), ("response_code", "200")]
        ),
        1.0,
        "the request was steered through the agent: {front}"
    );
    let back = backend.metrics().unwrap();
    assert_eq!(
        metric(
            &back,
            "wisp_downstream_connections_total",
            &[("protocol", "https")]
        ),
        1.0,
        "the destination saw one mTLS connection: {back}"
    );
    assert_eq!(
        metric(&back, "wisp_tls_handshake_errors_total", &[]),
        0.0,
        "{back}"
    );
}
