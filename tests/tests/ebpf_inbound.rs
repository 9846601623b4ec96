//! Inbound interception: a connection arriving at an enrolled pod from a pod
//! that is not enrolled is handed by `wisp_sk_lookup` (attached to the pod's
//! network namespace) to the agent's inbound listener inside that namespace;
//! the agent forwards it to the pod IP:port the client asked for. The
//! client's view is unchanged (no NAT: getpeername is the pod), the agent's
//! own forwarded connections and the pod's connections to itself are not
//! intercepted again, and when the agent stops, inbound goes direct.

use std::net::SocketAddr;

use wisp_testbed::agent::{Agent, metric, test_pin_path};
use wisp_testbed::node::SimNode;
use wisp_testbed::sockets::{http_get, peer_of, unmap};
use wisp_testbed::{artifacts, http, leftovers};

const LISTEN_PORT: u16 = 15407;
const ADMIN: &str = "127.0.0.1:15497";

#[test]
fn connections_into_an_enrolled_pod_go_through_the_agent_without_looping() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and attaches eBPF programs: run it as root"
    );
    let node = SimNode::create("in", 36, &["a", "b", "c"]).unwrap();
    let echo = artifacts::echo_bin().unwrap();
    let (a, b, c) = (
        node.pod("a").unwrap(),
        node.pod("b").unwrap(),
        node.pod("c").unwrap(),
    );
    let echo_b = b
        .spawn_echo_on(&echo, "[::]:8080".parse().unwrap())
        .unwrap();
    let b_addr = SocketAddr::from((b.ip, 8080));
    let yaml = format!(
        "outbound:\n  listen: '[::]:{LISTEN_PORT}'\n  redirect_address: {}\n  redirect_address_v6: '{}'\nadmin:\n  listen: {ADMIN}\nworkers: 1\n\
         ebpf:\n  pin_path: {}\ninbound:\n  enabled: true\n\
         plugins:\n  - name: header-filter\n    module: {}\n    configuration: '{{\"header_value\": \"inbound\"}}'\n\
         workloads:\n  - name: a\n    netns: {}\n  - name: b\n    netns: {}\n",
        node.node_ip(),
        node.node_ip6(),
        test_pin_path(LISTEN_PORT).display(),
        artifacts::header_filter_wasm().unwrap().display(),
        a.netns_path().display(),
        b.netns_path().display(),
    );
    let mut agent = Agent::start_yaml(
        &artifacts::wisp_bin().unwrap(),
        &yaml,
        ADMIN.parse().unwrap(),
    )
    .unwrap();
    let peer_seen = |reply: &wisp_testbed::http::Reply| {
        unmap(
            reply.echo().expect("the echo server's JSON")["peer"]
                .as_str()
                .unwrap(),
        )
    };

    // c (not enrolled) → b: intercepted, b's server sees the agent.
    let reply = http_get(&c.netns_path(), b_addr, "/in").unwrap();
    assert_eq!(reply.status, 200, "{reply:?}\n{}", agent.log());
    assert_eq!(reply.echo().unwrap()["path"], "/in");
    assert_eq!(
        peer_seen(&reply),
        node.node_ip().to_string(),
        "the connection into b must go through the agent\n{}",
        agent.log()
    );
    // The client's view is untouched: no NAT, it is connected to b.
    assert_eq!(peer_of(&c.netns_path(), b_addr).unwrap(), b_addr);

    // Through the HTTP filter chain: the filter's response header on the
    // way back, and its 403 for the marker header, which b never sees.
    let filtered = http::get(c, b_addr, "/filtered", &[("x-test", "in")]).unwrap();
    assert_eq!(filtered.status, 200, "{filtered:?}\n{}", agent.log());
    assert_eq!(
        filtered.header("x-wisp-filter"),
        Some("inbound"),
        "{filtered:?}"
    );
    let seen = filtered.echo().expect("the echo server's JSON");
    assert_eq!(seen["path"], "/filtered", "b saw the request");
    assert_eq!(seen["headers"]["x-test"], "in");
    let denied = http::get(c, b_addr, "/secret", &[("x-wisp-deny", "1")]).unwrap();
    assert_eq!(denied.status, 403, "{denied:?}\n{}", agent.log());
    assert_eq!(denied.header("x-wisp-denied-by"), Some("inbound"));
    assert!(denied.echo().is_none(), "b answered a denied request");

    // IPv6 too: c → [b]:8080.
    let b6 = SocketAddr::from((b.ip6, 8080));
    let reply = http_get(&c.netns_path(), b6, "/in6").unwrap();
    assert_eq!(reply.status, 200, "{reply:?}\n{}", agent.log());
    assert_eq!(peer_seen(&reply), node.node_ip6().to_string());
    assert_eq!(peer_of(&c.netns_path(), b6).unwrap(), b6);

    // b → its own address: b is enrolled, so this is steered *out* through
    // the agent (connect4); the agent's connection back into b is not
    // intercepted again (the inbound count below stays at c's two).
    let reply = http_get(&b.netns_path(), b_addr, "/self").unwrap();
    assert_eq!(reply.status, 200, "{reply:?}\n{}", agent.log());
    assert_eq!(peer_seen(&reply), node.node_ip().to_string());

    // a (enrolled) → b: steered out through the agent once; the agent's
    // forwarded connection is not intercepted again on the way in.
    let reply = http_get(&a.netns_path(), b_addr, "/mesh").unwrap();
    assert_eq!(reply.status, 200, "{reply:?}\n{}", agent.log());
    assert_eq!(peer_seen(&reply), node.node_ip().to_string());

    let metrics = agent.metrics().unwrap();
    assert_eq!(
        metric(
            &metrics,
            "wisp_inbound_connections_total",
            &[("workload", "b")]
        ),
        6.0,
        "c's six connections: {metrics}"
    );
    // Metrics tell inbound from outbound by listener: c's four HTTP
    // connections in, the two peer_of connects (silent, so TCP) in, and
    // b's and a's two HTTP connections out.
    let connections = |listener: &str, protocol: &str| {
        metric(
            &metrics,
            "wisp_downstream_connections_total",
            &[("listener", listener), ("protocol", protocol)],
        )
    };
    assert_eq!(connections("inbound", "http1"), 4.0, "{metrics}");
    assert_eq!(connections("inbound", "tcp"), 2.0, "{metrics}");
    assert_eq!(connections("outbound", "http1"), 2.0, "{metrics}");
    assert_eq!(
        metric(
            &metrics,
            "wisp_inbound_connections_total",
            &[("workload", "a")]
        ),
        0.0
    );
    assert_eq!(
        metric(
            &metrics,
            "wisp_kernel_program_actions_total",
            &[("program", "wisp_sk_lookup")]
        ),
        6.0,
        "{metrics}"
    );

    // `wisp ebpf status` shows the per-namespace links next to the pins.
    let bin = artifacts::wisp_bin().unwrap();
    let pin_path = test_pin_path(LISTEN_PORT);
    let status = wisp_testbed::cmd::run(
        bin.to_str().unwrap(),
        &["ebpf", "status", "--pin-path", pin_path.to_str().unwrap()],
    )
    .unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.contains("wisp_sk_lookup") && l.contains("not pinned")),
        "{status}"
    );

    // Agent gone: inbound goes direct again.
    assert!(agent.stop().unwrap().success(), "{}", agent.log());
    let reply = http_get(&c.netns_path(), b_addr, "/after").unwrap();
    assert_eq!(peer_seen(&reply), c.ip.to_string());
    let reply = http_get(&c.netns_path(), b6, "/after6").unwrap();
    assert_eq!(peer_seen(&reply), c.ip6.to_string());

    drop(agent);
    drop(echo_b);
    drop(node);
    assert_eq!(leftovers::find(Some("in")), Vec::<String>::new());
}
