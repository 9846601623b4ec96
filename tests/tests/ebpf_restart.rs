//! Restart safety: the programs, links and maps are pinned in bpffs, so an
//! agent killed with SIGKILL leaves steering in force (the pod's connects keep
//! going to the agent's address, never around it), and the restarted agent
//! adopts the pinned programs instead of attaching new ones. `wisp ebpf
//! status` shows them; `wisp ebpf detach` removes every trace. With
//! `ebpf.keep_on_exit`, a SIGTERM leaves them too (DaemonSet upgrades).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wisp_testbed::agent::Agent;
use wisp_testbed::node::SimNode;
use wisp_testbed::pins::PinGuard;
use wisp_testbed::sockets::{http_get, unmap};
use wisp_testbed::{artifacts, cmd, leftovers};

const ECHO_PORT: u16 = 8080;
const LISTEN_PORT: u16 = 15403;
const ADMIN: &str = "127.0.0.1:15493";

#[derive(Debug, PartialEq)]
enum Outcome {
    ViaAgent,
    Direct,
    Failed(String),
}

fn wisp(args: &[&str]) -> String {
    let bin = artifacts::wisp_bin().unwrap();
    cmd::run(bin.to_str().unwrap(), args).unwrap()
}

#[test]
fn sigkilled_agent_keeps_steering_pinned_and_the_restarted_one_adopts_it() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and attaches eBPF programs: run it as root"
    );
    let pin_path = format!("/sys/fs/bpf/wisp-test-{LISTEN_PORT}");
    // Declared before the agents: dropped after them, removing what they left.
    let pins = PinGuard::new(&pin_path);
    let node = SimNode::create("rs", 32, &["a", "b"]).unwrap();
    let echo = artifacts::echo_bin().unwrap();
    let (a, b) = (node.pod("a").unwrap(), node.pod("b").unwrap());
    let _echo_b = b.spawn_echo(&echo, ECHO_PORT).unwrap();
    let b_addr = SocketAddr::from((b.ip, ECHO_PORT));
    let yaml = |keep_on_exit: bool| {
        format!(
            "outbound:\n  listen: {}:{LISTEN_PORT}\nadmin:\n  listen: {ADMIN}\nworkers: 1\n\
             ebpf:\n  pin_path: {pin_path}\n  keep_on_exit: {keep_on_exit}\n\
             workloads:\n  - name: a\n    netns: {}\n",
            node.node_ip(),
            a.netns_path().display()
        )
    };
    let wisp_bin = artifacts::wisp_bin().unwrap();
    let admin: SocketAddr = ADMIN.parse().unwrap();
    let mut first = Agent::start_yaml(&wisp_bin, &yaml(false), admin).unwrap();

    let outcome = |path: &str| match http_get(&a.netns_path(), b_addr, path) {
        Ok(reply) if reply.status == 200 => {
            let peer = reply
                .echo()
                .map(|e| unmap(e["peer"].as_str().unwrap_or("")))
                .unwrap_or_default();
            if peer == node.node_ip().to_string() {
                Outcome::ViaAgent
            } else if peer == a.ip.to_string() {
                Outcome::Direct
            } else {
                Outcome::Failed(format!("peer {peer}"))
            }
        }
        Ok(reply) => Outcome::Failed(format!("{reply:?}")),
        Err(e) => Outcome::Failed(e.to_string()),
    };
    assert_eq!(outcome("/before"), Outcome::ViaAgent, "{}", first.log());
    let status = wisp(&["ebpf", "status", "--pin-path", &pin_path]);
    for program in ["wisp_connect4", "wisp_connect6", "wisp_sock_ops"] {
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("link") && l.contains(program) && l.contains("attached")),
            "{status}"
        );
    }
    assert!(
        status.contains("enrolled network namespaces: 1"),
        "{status}"
    );

    // A client that keeps connecting through the kill and the restart.
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            let mut seen = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                seen.push(outcome(&format!("/during/{n}")));
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        });
        std::thread::sleep(Duration::from_millis(200));
        let status = first.kill().expect("the first agent was running");
        assert!(!status.success(), "SIGKILL: {status}");
        assert!(
            std::path::Path::new(&pin_path)
                .join("links/wisp_connect4")
                .exists(),
            "the links must stay pinned when the agent dies"
        );
        // Down for a while: connects are still steered (to a closed port).
        std::thread::sleep(Duration::from_millis(500));
        let second = Agent::start_yaml(&wisp_bin, &yaml(false), admin).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let seen = client.join().expect("client thread");
        (second, seen)
    });
    let (mut second, seen) = outcomes;
    let log = second.log();
    assert!(log.contains("adopted from their pins"), "{log}");
    assert!(
        !seen.contains(&Outcome::Direct),
        "a connect went around the agent while it was down or restarting: {seen:?}"
    );
    assert!(
        seen.iter().any(|o| matches!(o, Outcome::Failed(_))),
        "the client never saw the agent down: {seen:?}"
    );
    assert_eq!(
        seen.last(),
        Some(&Outcome::ViaAgent),
        "steered through the restarted agent at the end: {seen:?}\n{log}"
    );
    assert_eq!(outcome("/after-restart"), Outcome::ViaAgent);

    // keep_on_exit: false (the default) — SIGTERM removes everything.
    let status = second.stop().unwrap();
    assert!(status.success(), "{status}\n{}", second.log());
    assert!(
        !std::path::Path::new(&pin_path).exists(),
        "pins left after SIGTERM"
    );
    assert_eq!(outcome("/after-sigterm"), Outcome::Direct);

    // keep_on_exit: true — SIGTERM leaves them attached and pinned, and
    // `wisp ebpf detach` removes them all.
    let mut third = Agent::start_yaml(&wisp_bin, &yaml(true), admin).unwrap();
    assert!(
        third.log().contains("attached and pinned"),
        "{}",
        third.log()
    );
    assert_eq!(outcome("/third"), Outcome::ViaAgent);
    assert!(third.stop().unwrap().success());
    assert!(third.log().contains("keep_on_exit"), "{}", third.log());
    assert!(
        matches!(outcome("/kept"), Outcome::Failed(_)),
        "still steered after a kept exit"
    );
    let detached = wisp(&["ebpf", "detach", "--pin-path", &pin_path]);
    assert!(
        detached.contains("detached and unpinned link wisp_connect4"),
        "{detached}"
    );
    assert!(!std::path::Path::new(&pin_path).exists(), "{detached}");
    assert_eq!(outcome("/detached"), Outcome::Direct);
    let status = wisp(&["ebpf", "status", "--pin-path", &pin_path]);
    assert!(status.starts_with("nothing pinned at"), "{status}");

    drop(third);
    drop(_echo_b);
    drop(node);
    drop(pins);
    assert_eq!(leftovers::find(Some("rs")), Vec::<String>::new());
    assert!(
        !leftovers::wisp_pins()
            .iter()
            .any(|p| p.contains(&format!("wisp-test-{LISTEN_PORT}"))),
        "{:?}",
        leftovers::wisp_pins()
    );
}
