//! `cargo xtask demo`: wisp on a simulated node, on this machine, without
//! Kubernetes.
//!
//! Two pods (network namespaces on a node bridge, each with its own cgroup)
//! run an echo server. The agent runs in the host namespace, as a
//! hostNetwork DaemonSet pod would, with the header test filter, and enrolls
//! pod `a` only. The demo then shows: a's request to b passing through the
//! agent and its filter, a denied request answered 403 by the filter, b's
//! request to a going direct, and the per-pod counters. Everything is torn
//! down at the end, also on Ctrl-C or an error, and the demo says so.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use wisp_testbed::agent::{Agent, AgentConfig, PluginSpec, metric};
use wisp_testbed::node::SimNode;
use wisp_testbed::{artifacts, http, leftovers};

use crate::{build, setup, step};

const TAG: &str = "demo";
const SUBNET: u8 = 250;
const ECHO_PORT: u16 = 8080;
const AGENT_PORT: u16 = 15001;
const ADMIN: &str = "127.0.0.1:15000";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

pub fn run() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "cargo xtask demo needs root: it creates network namespaces, veths and cgroups and attaches eBPF programs"
        );
    }
    setup::run(setup::Mode::Report)?;
    build::all()?;
    install_interrupt_handler()?;

    let result = run_node();
    // Everything the node made is gone by now (guards dropped); check.
    step("checking that nothing was left behind");
    let left = leftovers::find(Some(TAG));
    let programs = leftovers::attached_wisp_programs();
    if left.is_empty() && programs.is_empty() {
        println!("clean: no demo namespaces, veths, cgroups or wisp BPF programs remain");
    } else {
        println!("left behind:\n  {}", [left, programs].concat().join("\n  "));
    }
    result
}

fn run_node() -> anyhow::Result<()> {
    step(
        "building a simulated node: a bridge and two pods (network namespace + veth + cgroup each)",
    );
    let mut node =
        SimNode::create(TAG, SUBNET, &["a", "b"]).context("creating the simulated node")?;
    println!("node address (bridge wb-{TAG}): {}", node.node_ip());
    for pod in node.pods() {
        println!(
            "pod {}: ip {}, netns {}, cgroup {}",
            pod.name,
            pod.ip,
            pod.netns,
            pod.cgroup.display()
        );
    }
    check_interrupted()?;

    let echo_bin = artifacts::echo_bin()?;
    let _echo_a = node.pod("a")?.spawn_echo(&echo_bin, ECHO_PORT)?;
    let _echo_b = node.pod("b")?.spawn_echo(&echo_bin, ECHO_PORT)?;
    println!("echo servers listening on :{ECHO_PORT} in both pods");
    check_interrupted()?;

    step("starting the wisp agent in the host namespace, enrolling pod a");
    let config = AgentConfig {
        listen: SocketAddr::from((node.node_ip(), AGENT_PORT)),
        admin: ADMIN.parse().expect("valid address"),
        workers: 2,
        plugins: vec![PluginSpec {
            name: "header-filter".into(),
            module: artifacts::header_filter_wasm()?,
            configuration: r#"{"header_value": "wisp-demo"}"#.into(),
            failure_policy: "FAIL_CLOSED",
        }],
        workloads: vec![("a".into(), node.pod("a")?.netns_path())],
    };
    let mut agent = Agent::start(&artifacts::wisp_bin()?, &config)?;
    println!(
        "wisp running (pid {}), outbound listener {}, admin http://{ADMIN}",
        agent.pid(),
        config.listen
    );
    check_interrupted()?;

    let (a, b) = (node.pod("a")?, node.pod("b")?);
    let b_addr = SocketAddr::from((b.ip, ECHO_PORT));
    let a_addr = SocketAddr::from((a.ip, ECHO_PORT));

    step(format!("pod a → pod b: curl http://{b_addr}/hello"));
    let reply = http::get(a, b_addr, "/hello", &[])?;
    show(&reply);
    let steered = reply.header("x-wisp-filter") == Some("wisp-demo");
    println!(
        "  → {}",
        if steered {
            "steered by the kernel to wisp, through the filter, then on to pod b (b saw the agent as its peer)"
        } else {
            "NOT steered: the filter's header is missing"
        }
    );
    check_interrupted()?;

    step(format!(
        "pod a → pod b with the deny marker: curl -H 'x-wisp-deny: 1' http://{b_addr}/secret"
    ));
    let denied = http::get(a, b_addr, "/secret", &[("x-wisp-deny", "1")])?;
    show(&denied);
    println!("  → the filter answered with a local response; pod b never saw the request");
    check_interrupted()?;

    step(format!(
        "pod b (not enrolled) → pod a: curl http://{a_addr}/direct"
    ));
    let direct = http::get(b, a_addr, "/direct", &[])?;
    show(&direct);
    println!("  → direct: no filter header, and pod a saw pod b's own address");
    check_interrupted()?;

    step("per-pod counters from wisp's /metrics");
    let metrics = agent.metrics()?;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("wisp_http_requests_total") || l.starts_with("wisp_kernel_"))
    {
        println!("  {line}");
    }

    step("stopping wisp (SIGTERM): it detaches its eBPF programs");
    let status = agent.stop();
    println!(
        "wisp exited: {}",
        status.map_or("unknown".into(), |s| s.to_string())
    );
    let after = http::get(a, b_addr, "/after", &[])?;
    println!(
        "pod a → pod b after wisp stopped: HTTP {}, filter header {}",
        after.status,
        after
            .header("x-wisp-filter")
            .unwrap_or("absent (no steering left)")
    );
    drop(agent);

    step("tearing down the simulated node");
    drop((_echo_a, _echo_b));
    for item in node.teardown() {
        println!("removed {item}");
    }

    let ok = steered
        && reply.status == 200
        && denied.status == 403
        && direct.status == 200
        && direct.header("x-wisp-filter").is_none()
        && metric(
            &metrics,
            "wisp_http_requests_total",
            &[("source_workload", "a")],
        ) >= 2.0;
    if !ok {
        bail!("the demo did not show what it should (see above)");
    }
    println!("\ndemo complete: steering, the Wasm filter and the per-pod counters all worked");
    Ok(())
}

fn show(reply: &http::Reply) {
    println!("  HTTP {}", reply.status);
    for name in ["x-wisp-filter", "x-wisp-denied-by", "x-echo-server"] {
        if let Some(value) = reply.header(name) {
            println!("  {name}: {value}");
        }
    }
    match reply.echo() {
        Some(echo) => println!(
            "  server {} saw peer {} ask for {}",
            echo["server"].as_str().unwrap_or("?"),
            echo["peer"].as_str().unwrap_or("?"),
            echo["path"].as_str().unwrap_or("?")
        ),
        None => println!("  body: {}", reply.body.trim()),
    }
}

fn install_interrupt_handler() -> anyhow::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(signal, &action) }.context("installing the interrupt handler")?;
    }
    Ok(())
}
