//! IPv6 and dual-stack steering, in real namespaces against the real kernel:
//! an enrolled pod's IPv6 connects (connect6) and the IPv4-mapped connects of
//! its dual-stack sockets are steered to the agent, which recovers the
//! original destination and forwards there; a pod that is not enrolled goes
//! direct over IPv6.

use std::net::{SocketAddr, SocketAddrV4};

use wisp_testbed::agent::{Agent, metric, test_pin_path};
use wisp_testbed::node::SimNode;
use wisp_testbed::sockets::{http_get, http_get_v4_mapped, unmap};
use wisp_testbed::{artifacts, leftovers};

const ECHO_PORT: u16 = 8080;
const LISTEN_PORT: u16 = 15401;
const ADMIN: &str = "127.0.0.1:15491";

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create network namespaces and attach eBPF programs: run them as root (`cargo xtask test`)"
    );
}

#[test]
fn ipv6_and_ipv4_mapped_connects_of_an_enrolled_pod_are_steered() {
    require_root();
    let node = SimNode::create("e6", 30, &["a", "b", "c"]).unwrap();
    let echo = artifacts::echo_bin().unwrap();
    let (a, b, c) = (
        node.pod("a").unwrap(),
        node.pod("b").unwrap(),
        node.pod("c").unwrap(),
    );
    let any: SocketAddr = format!("[::]:{ECHO_PORT}").parse().unwrap();
    let _echo_b = b.spawn_echo_on(&echo, any).unwrap();

    let yaml = format!(
        "outbound:\n  listen: '[::]:{LISTEN_PORT}'\n  redirect_address: {}\n  redirect_address_v6: '{}'\n\
         admin:\n  listen: {ADMIN}\nworkers: 2\nebpf:\n  pin_path: {}\n\
         workloads:\n  - name: a\n    netns: {}\n",
        node.node_ip(),
        node.node_ip6(),
        test_pin_path(LISTEN_PORT).display(),
        a.netns_path().display()
    );
    let agent = Agent::start_yaml(
        &artifacts::wisp_bin().unwrap(),
        &yaml,
        ADMIN.parse().unwrap(),
    )
    .unwrap();
    let log = || agent.log();

    // IPv6: a → [b]:8080 goes through the agent (b sees the node's IPv6
    // address as its peer), and reaches b with the path intact.
    let b6 = SocketAddr::from((b.ip6, ECHO_PORT));
    let reply = http_get(&a.netns_path(), b6, "/v6?x=1").unwrap();
    assert_eq!(reply.status, 200, "{reply:?}\n{}", log());
    let seen = reply.echo().expect("the echo server's JSON");
    assert_eq!(seen["server"], "b");
    assert_eq!(seen["path"], "/v6?x=1");
    assert_eq!(
        seen["peer"],
        node.node_ip6().to_string(),
        "b must see the agent's IPv6 address, proving the hop through wisp\n{}",
        log()
    );

    // IPv4 from a dual-stack socket: connect6 with ::ffff:b, steered to the
    // agent's IPv4 address; the agent forwards over IPv4.
    let b4 = SocketAddrV4::new(b.ip, ECHO_PORT);
    let reply = http_get_v4_mapped(&a.netns_path(), b4, "/mapped").unwrap();
    assert_eq!(reply.status, 200, "{reply:?}\n{}", log());
    let seen = reply.echo().unwrap();
    assert_eq!(seen["path"], "/mapped");
    assert_eq!(
        unmap(seen["peer"].as_str().unwrap()),
        node.node_ip().to_string(),
        "{}",
        log()
    );

    // Plain IPv4 still works next to it.
    let reply = http_get(&a.netns_path(), SocketAddr::V4(b4), "/v4").unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        unmap(reply.echo().unwrap()["peer"].as_str().unwrap()),
        node.node_ip().to_string()
    );

    // c is not enrolled: direct over IPv6, b sees c's own address.
    let reply = http_get(&c.netns_path(), b6, "/direct").unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.echo().unwrap()["peer"], c.ip6.to_string());

    let metrics = agent.metrics().unwrap();
    assert_eq!(
        metric(
            &metrics,
            "wisp_kernel_connects_redirected_total",
            &[("workload", "a")]
        ),
        3.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "wisp_kernel_connections_established_total",
            &[("workload", "a")]
        ),
        3.0,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "wisp_kernel_program_actions_total",
            &[("program", "wisp_connect6")]
        ) >= 2.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "wisp_unsteered_connections_total", &[]),
        0.0,
        "{metrics}"
    );

    drop(agent);
    drop(_echo_b);
    drop(node);
    assert_eq!(leftovers::find(Some("e6")), Vec::<String>::new());
    assert!(
        !test_pin_path(LISTEN_PORT).exists(),
        "the agent's pins outlived it"
    );
}
