//! `cargo xtask bench redirect`: what capturing a connection costs at
//! connect time. A client pod opens connections one after another to a
//! server pod: directly; steered by wisp's eBPF `connect4` to the agent; and
//! DNAT-ed by iptables in the pod to the same agent address, the way sidecar
//! meshes capture traffic. Reports connect latency (HDR p50/p99) and the
//! connection setup rate in docs/benchmarks.md.
//!
//! Socket steering (sockops/sk_msg) is not implemented yet, so the bulk
//! throughput comparison with it on and off is not part of this run.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use wisp_testbed::agent::{Agent, AgentConfig};
use wisp_testbed::loadgen::{LoadReport, decode};
use wisp_testbed::node::{Pod, SimNode};

use crate::{build, cargo, report, run_cmd, setup, step};

const TAG: &str = "brd";
const SUBNET: u8 = 241;
const APP_PORT: u16 = 8080;
const AGENT_PORT: u16 = 15001;

struct Row {
    setup: &'static str,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    per_second: f64,
}

pub fn run(connects: usize) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "cargo xtask bench redirect needs root: it builds pods from network namespaces and attaches eBPF"
        );
    }
    setup::run(setup::Mode::Quiet)?;
    build::all()?;
    step("building wisp and the test tools in release mode");
    run_cmd(cargo().args([
        "build",
        "--release",
        "--package",
        "wisp",
        "--package",
        "wisp-testbed",
        "--bins",
    ]))?;
    let release = crate::workspace_root().join("target/release");

    let node = SimNode::create(TAG, SUBNET, &["client", "server"]).context("building the pods")?;
    let (client, server) = (node.pod("client")?, node.pod("server")?);
    let echo = server.spawn_echo(&release.join("wisp-echo"), APP_PORT)?;
    let target = SocketAddr::from((server.ip, APP_PORT));
    let agent_addr = SocketAddr::from((node.node_ip(), AGENT_PORT));
    let measure = |setup: &'static str| -> anyhow::Result<Row> {
        // Warm caches and conntrack, then measure.
        connect_series(client, &release, target, connects / 10)?;
        let report = connect_series(client, &release, target, connects)?;
        let histogram = decode(&report.connect_us).context("the connect histogram")?;
        let row = Row {
            setup,
            p50_us: histogram.value_at_quantile(0.5) as f64,
            p99_us: histogram.value_at_quantile(0.99) as f64,
            max_us: histogram.max() as f64,
            per_second: connects as f64 / report.connect_seconds.max(1e-9),
        };
        println!(
            "{setup}: p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs, {:.0} connections/s",
            row.p50_us, row.p99_us, row.max_us, row.per_second
        );
        Ok(row)
    };
    let mut rows = Vec::new();

    step("direct");
    rows.push(measure("direct")?);

    step("eBPF steering to the wisp agent");
    {
        let config = AgentConfig {
            listen: agent_addr,
            admin: "127.0.0.1:15980".parse().expect("valid address"),
            workers: 1,
            plugins: Vec::new(),
            workloads: vec![("client".into(), client.netns_path())],
        };
        let _agent = Agent::start_quiet(&release.join("wisp"), &config)?;
        rows.push(measure("eBPF connect4 steering")?);
    }

    step("iptables DNAT in the pod to the same agent address");
    {
        let args: Vec<String> = [
            "--listen",
            &agent_addr.to_string(),
            "--upstream",
            &target.to_string(),
            "--admin",
            "127.0.0.1:15981",
            "--workers",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let _agent =
            Agent::start_proxy_quiet(&release.join("wisp"), &args, "127.0.0.1:15981".parse()?)?;
        let rule = |action: &str| -> anyhow::Result<()> {
            let args = [
                "-t",
                "nat",
                action,
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                &server.ip.to_string(),
                "--dport",
                &APP_PORT.to_string(),
                "-j",
                "DNAT",
                "--to-destination",
                &agent_addr.to_string(),
            ];
            wisp_testbed::cmd::output(client.command("iptables")?.args(args))?;
            Ok(())
        };
        rule("-A")?;
        let row = measure("iptables DNAT");
        rule("-D")?;
        rows.push(row?);
    }
    // The server must leave its cgroup before the node removes it.
    drop(echo);
    drop(node);

    let markdown = table(&rows, connects);
    println!("\n{markdown}");
    report::write_section("redirect", &markdown)
}

/// `connects` sequential connects from `pod` to `target`, timed by wisp-load.
fn connect_series(
    pod: &Pod,
    release: &std::path::Path,
    target: SocketAddr,
    connects: usize,
) -> anyhow::Result<LoadReport> {
    let out = pod
        .command(release.join("wisp-load"))?
        .args([
            "--target",
            &target.to_string(),
            "--seconds",
            "0",
            "--connections",
            "1",
        ])
        .args(["--connects", &connects.to_string()])
        .output()
        .context("running wisp-load")?;
    anyhow::ensure!(
        out.status.success(),
        "wisp-load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: LoadReport =
        serde_json::from_slice(&out.stdout).context("parsing wisp-load's report")?;
    anyhow::ensure!(report.errors == 0, "{} connects failed", report.errors);
    Ok(report)
}

fn table(rows: &[Row], connects: usize) -> String {
    let mut md = format!(
        "## Connection capture: eBPF steering vs iptables (`cargo xtask bench redirect`)\n\n\
         Machine: {}.\n\n\
         A client pod opens {connects} TCP connections one after another to a server pod (connect, then \
         close) and times each `connect()`; the agent (release build, 1 worker, no plugins) accepts the \
         captured ones. The rate is connections per second of the whole series.\n\n\
         | Setup | connect p50 µs | connect p99 µs | connect max µs | connections/s |\n|---|---:|---:|---:|---:|\n",
        report::machine_description()
    );
    for r in rows {
        md.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            r.setup, r.p50_us, r.p99_us, r.max_us, r.per_second
        ));
    }
    let find = |name: &str| rows.iter().find(|r| r.setup.starts_with(name));
    if let (Some(direct), Some(ebpf), Some(iptables)) =
        (find("direct"), find("eBPF"), find("iptables"))
    {
        md.push_str(&format!(
            "\neBPF steering adds {:+.0} µs to p50 connect over direct, and sets up connections {:.2}× as fast as \
             iptables DNAT ({:.2}× the direct rate).\n",
            ebpf.p50_us - direct.p50_us,
            ebpf.per_second / iptables.per_second,
            ebpf.per_second / direct.per_second
        ));
    }
    md.push_str(
        "\nThe rate covers the whole series, so a single stalled handshake (a SYN retransmitted after 1 s, \
         see the max column) weighs on it far more than on the percentiles.\n",
    );
    md.push_str(
        "\nNot measured yet: bulk throughput with socket steering (sockops + sk_msg) on and off — socket \
         steering is not implemented.\n",
    );
    md
}
