//! L4 policy in the kernel: rules from the agent config, evaluated by the
//! connect hooks for enrolled pods (first match wins, default allow). A
//! denied connect fails in the pod with EPERM; every rule counts its matches
//! on `/metrics`.

use std::net::SocketAddr;

use wisp_testbed::agent::{Agent, metric, test_pin_path};
use wisp_testbed::node::SimNode;
use wisp_testbed::sockets::{connect_result, http_get, unmap};
use wisp_testbed::{artifacts, leftovers};

const LISTEN_PORT: u16 = 15405;
const ADMIN: &str = "127.0.0.1:15495";

#[test]
fn denied_connects_fail_with_eperm_and_each_rule_counts_its_matches() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and attaches eBPF programs: run it as root"
    );
    let node = SimNode::create("pol", 33, &["a", "b", "c"]).unwrap();
    let echo = artifacts::echo_bin().unwrap();
    let (a, b, c) = (
        node.pod("a").unwrap(),
        node.pod("b").unwrap(),
        node.pod("c").unwrap(),
    );
    let _echo_b = b.spawn_echo(&echo, 8080).unwrap();
    let _echo_b2 = b.spawn_echo(&echo, 8081).unwrap();
    let yaml = format!(
        "outbound:\n  listen: {node_ip}:{LISTEN_PORT}\nadmin:\n  listen: {ADMIN}\nworkers: 1\n\
         ebpf:\n  pin_path: {pin}\n\
         workloads:\n  - name: a\n    netns: {netns}\n\
         policy:\n\
         \x20 - name: no-b-admin\n    action: deny\n    from: a\n    to: {b}/32\n    port: 8081\n\
         \x20 - name: pod-net-http\n    action: allow\n    to: 10.213.33.0/24\n    port: 8080\n\
         \x20 - name: rest-of-pod-net\n    action: deny\n    to: 10.213.33.0/24\n\
         \x20 - name: no-v6-pods\n    action: deny\n    to: fd00:213:21::/64\n",
        node_ip = node.node_ip(),
        pin = test_pin_path(LISTEN_PORT).display(),
        netns = a.netns_path().display(),
        b = b.ip,
    );
    let agent = Agent::start_yaml(
        &artifacts::wisp_bin().unwrap(),
        &yaml,
        ADMIN.parse().unwrap(),
    )
    .unwrap();

    let eperm = |target: SocketAddr| {
        let result = connect_result(&a.netns_path(), target).unwrap();
        let error = result.expect_err(&format!("a → {target} must be refused"));
        assert_eq!(
            error.raw_os_error(),
            Some(libc::EPERM),
            "a → {target}: {error}"
        );
    };
    // Rule 1: a → b:8081 denied, although b listens there.
    eperm(SocketAddr::from((b.ip, 8081)));
    // Rule 2: a → b:8080 allowed, and steered as usual.
    let reply = http_get(&a.netns_path(), SocketAddr::from((b.ip, 8080)), "/ok").unwrap();
    assert_eq!(reply.status, 200, "{reply:?}\n{}", agent.log());
    assert_eq!(
        unmap(reply.echo().unwrap()["peer"].as_str().unwrap()),
        node.node_ip().to_string()
    );
    // Rule 3: anything else on the pod network, e.g. c:9090.
    eperm(SocketAddr::from((c.ip, 9090)));
    // Rule 4: IPv6 pod addresses.
    eperm(SocketAddr::from((b.ip6, 8080)));
    // c is not enrolled: the policy is not for it.
    let reply = http_get(&c.netns_path(), SocketAddr::from((b.ip, 8081)), "/c").unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.echo().unwrap()["peer"], c.ip.to_string());

    let metrics = agent.metrics().unwrap();
    let matches = |rule: &str| {
        metric(
            &metrics,
            "wisp_kernel_policy_matches_total",
            &[("rule", rule)],
        )
    };
    assert_eq!(matches("no-b-admin"), 1.0, "{metrics}");
    assert_eq!(matches("pod-net-http"), 1.0, "{metrics}");
    assert_eq!(matches("rest-of-pod-net"), 1.0, "{metrics}");
    assert_eq!(matches("no-v6-pods"), 1.0, "{metrics}");
    assert_eq!(
        metric(
            &metrics,
            "wisp_kernel_policy_matches_total",
            &[("rule", "no-b-admin"), ("action", "deny")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "wisp_kernel_connects_denied_total",
            &[("workload", "a")]
        ),
        3.0,
        "{metrics}"
    );

    drop(agent);
    drop((_echo_b, _echo_b2));
    drop(node);
    assert_eq!(leftovers::find(Some("pol")), Vec::<String>::new());
}
