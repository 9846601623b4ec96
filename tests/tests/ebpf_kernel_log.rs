//! Kernel-side logs (aya-log) with the level set at runtime: off by default,
//! so a steered connect logs nothing; `wisp ebpf log-level debug` turns the
//! kernel programs' debug records on while the agent runs, and the next
//! steered connect shows up in the agent's log; `off` stops them again.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use wisp_testbed::agent::Agent;
use wisp_testbed::node::SimNode;
use wisp_testbed::sockets::http_get;
use wisp_testbed::{artifacts, leftovers};

const LISTEN_PORT: u16 = 19402;
const ADMIN: &str = "127.0.0.1:19492";
const PIN_PATH: &str = "/sys/fs/bpf/wisp-test-d2";
const ECHO_PORT: u16 = 8080;
const LINE: &str = "connect steered";

fn kernel_lines(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("wisp::kernel") && l.contains(LINE))
        .count()
}

#[test]
fn kernel_debug_logs_are_switched_on_and_off_at_runtime() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and attaches eBPF programs: run it as root"
    );
    let node = SimNode::create("d2", 71, &["a", "b"]).unwrap();
    let (a, b) = (node.pod("a").unwrap(), node.pod("b").unwrap());
    let echo = artifacts::echo_bin().unwrap();
    let echo_b = b.spawn_echo(&echo, ECHO_PORT).unwrap();
    let b_addr = SocketAddr::from((b.ip, ECHO_PORT));
    let yaml = format!(
        "outbound:\n  listen: {}:{LISTEN_PORT}\nadmin:\n  listen: {ADMIN}\nworkers: 1\n\
         ebpf:\n  pin_path: {PIN_PATH}\n\
         workloads:\n  - name: a\n    netns: {}\n",
        node.node_ip(),
        a.netns_path().display(),
    );
    let mut agent = Agent::start_yaml(
        &artifacts::wisp_bin().unwrap(),
        &yaml,
        ADMIN.parse().unwrap(),
    )
    .unwrap();
    let bin = artifacts::wisp_bin().unwrap();
    let set_level = |level: &str| {
        wisp_testbed::cmd::run(
            bin.to_str().unwrap(),
            &["ebpf", "log-level", level, "--pin-path", PIN_PATH],
        )
        .unwrap()
    };

    // Default off: a steered connect writes no kernel log record.
    let reply = http_get(&a.netns_path(), b_addr, "/quiet").unwrap();
    assert_eq!(reply.status, 200, "{reply:?}\n{}", agent.log());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(kernel_lines(&agent.log()), 0, "{}", agent.log());

    // On at runtime: the next steered connect is logged by the kernel.
    let out = set_level("debug");
    assert!(out.contains("kernel log level debug (was off)"), "{out}");
    let reply = http_get(&a.netns_path(), b_addr, "/loud").unwrap();
    assert_eq!(reply.status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while kernel_lines(&agent.log()) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("wisp::kernel") && l.contains(LINE))
        .unwrap_or_else(|| panic!("no kernel log line for the steered connect:\n{log}"));
    assert!(
        line.contains(&format!("port {ECHO_PORT} -> agent port {LISTEN_PORT}")),
        "{line}"
    );
    let status = wisp_testbed::cmd::run(
        bin.to_str().unwrap(),
        &["ebpf", "status", "--pin-path", PIN_PATH],
    )
    .unwrap();
    assert!(status.contains("kernel log level debug"), "{status}");

    // Off again: no new records.
    let out = set_level("off");
    assert!(out.contains("(was debug)"), "{out}");
    let before = kernel_lines(&agent.log());
    let reply = http_get(&a.netns_path(), b_addr, "/quiet-again").unwrap();
    assert_eq!(reply.status, 200);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(kernel_lines(&agent.log()), before, "{}", agent.log());

    // A bad level is refused with the choices.
    let bad = wisp_testbed::cmd::run(
        bin.to_str().unwrap(),
        &["ebpf", "log-level", "loud", "--pin-path", PIN_PATH],
    );
    assert!(
        bad.as_ref()
            .is_err_and(|e| e.to_string().contains("expected off")),
        "{bad:?}"
    );

    assert!(agent.stop().unwrap().success(), "{}", agent.log());
    drop(agent);
    drop(echo_b);
    drop(node);
    assert_eq!(leftovers::find(Some("d2")), Vec::<String>::new());
}
