//! Original destinations stay right under concurrency: 10 enrolled pods each
//! open 10 connections at the same moment, all from the same 10 explicit
//! source ports, each to a different destination. The kernel's records are
//! keyed by the pod's address and port as the agent sees them, so no two
//! pods' connections can be mixed up; every request must reach the server it
//! was addressed to.

use std::net::SocketAddr;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use wisp_testbed::agent::{Agent, metric, test_pin_path};
use wisp_testbed::node::SimNode;
use wisp_testbed::sockets::{connect, get_on, in_netns, unmap};
use wisp_testbed::{artifacts, leftovers};

const PODS: usize = 10;
const PER_POD: usize = 10;
const FIRST_SOURCE_PORT: u16 = 41000;
const ECHO_PORT: u16 = 8080;
const LISTEN_PORT: u16 = 15402;
const ADMIN: &str = "127.0.0.1:15492";

#[test]
fn a_hundred_concurrent_connections_from_ten_pods_on_the_same_source_ports() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and attaches eBPF programs: run it as root"
    );
    let names: Vec<String> = (0..PODS).map(|i| format!("p{i}")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let node = SimNode::create("cc", 31, &name_refs).unwrap();
    let echo = artifacts::echo_bin().unwrap();
    let _echoes: Vec<_> = node
        .pods()
        .iter()
        .map(|p| p.spawn_echo(&echo, ECHO_PORT).unwrap())
        .collect();

    let mut yaml = format!(
        "outbound:\n  listen: {}:{LISTEN_PORT}\nadmin:\n  listen: {ADMIN}\nworkers: 2\n\
         ebpf:\n  pin_path: {}\nworkloads:\n",
        node.node_ip(),
        test_pin_path(LISTEN_PORT).display()
    );
    for pod in node.pods() {
        yaml.push_str(&format!(
            "  - name: {}\n    netns: {}\n",
            pod.name,
            pod.netns_path().display()
        ));
    }
    let agent = Agent::start_yaml(
        &artifacts::wisp_bin().unwrap(),
        &yaml,
        ADMIN.parse().unwrap(),
    )
    .unwrap();

    // Pod i's j-th connection uses source port FIRST_SOURCE_PORT + j and
    // goes to pod (i + 1 + j % 9) % 10 — never itself, and for one source
    // port every pod aims somewhere else.
    let target_of = |i: usize, j: usize| (i + 1 + j % (PODS - 1)) % PODS;
    let barrier = Arc::new(Barrier::new(PODS * PER_POD));
    let results = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for (i, pod) in node.pods().iter().enumerate() {
            for j in 0..PER_POD {
                let target_pod = &node.pods()[target_of(i, j)];
                let target = SocketAddr::from((target_pod.ip, ECHO_PORT));
                let bind = SocketAddr::from((pod.ip, FIRST_SOURCE_PORT + j as u16));
                let barrier = barrier.clone();
                let netns = pod.netns_path();
                handles.push(scope.spawn(move || {
                    in_netns(&netns, || {
                        let stream = connect(Some(bind), target, Duration::from_secs(10));
                        // All 100 are connected (or failed) before any sends:
                        // the records of all of them exist at once.
                        barrier.wait();
                        get_on(stream?, &target.to_string(), &format!("/from/{i}/{j}"))
                    })
                    .and_then(|r| r)
                    .map(|reply| (i, j, reply))
                }));
            }
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread panicked"))
            .collect::<Vec<_>>()
    });

    let mut failures = Vec::new();
    for result in &results {
        match result {
            Ok((i, j, reply)) => {
                let expected = format!("p{}", target_of(*i, *j));
                let seen = reply.echo();
                let ok = reply.status == 200
                    && seen.as_ref().is_some_and(|s| {
                        s["server"] == expected.as_str()
                            && s["path"] == format!("/from/{i}/{j}").as_str()
                            && unmap(s["peer"].as_str().unwrap_or("")) == node.node_ip().to_string()
                    });
                if !ok {
                    failures.push(format!(
                        "p{i} port {}: expected {expected} via the agent, got {reply:?}",
                        FIRST_SOURCE_PORT + *j as u16
                    ));
                }
            }
            Err(e) => failures.push(format!("client error: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} connections went wrong:\n{}\nagent log:\n{}",
        failures.len(),
        results.len(),
        failures.join("\n"),
        agent.log()
    );

    let metrics = agent.metrics().unwrap();
    for pod in node.pods() {
        assert_eq!(
            metric(
                &metrics,
                "wisp_kernel_connections_established_total",
                &[("workload", pod.name.as_str())]
            ),
            PER_POD as f64,
            "{metrics}"
        );
    }
    assert_eq!(
        metric(&metrics, "wisp_unsteered_connections_total", &[]),
        0.0
    );
    assert_eq!(
        metric(&metrics, "wisp_kernel_program_errors_total", &[]),
        0.0,
        "{metrics}"
    );

    drop(agent);
    drop(_echoes);
    drop(node);
    assert_eq!(leftovers::find(Some("cc")), Vec::<String>::new());
}
