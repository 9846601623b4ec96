//! `cargo xtask bench redirect`: what capturing a connection costs at
//! connect time. A client pod opens connections one after another to a
//! server pod: directly; steered by wisp's eBPF `connect4` to the agent; and
//! DNAT-ed by iptables in the pod to the same agent address, the way sidecar
//! meshes capture traffic. Reports connect latency (HDR p50/p99) and the
//! connection setup rate; then bulk throughput through the agent with socket
//! steering (sockops + sk_msg) off and on, next to direct. Written to
//! docs/benchmarks.md.
//!
//! **Why batches.** A closed-loop client connecting back to back sets up
//! connections (~50k/s here) faster than a one-worker server accepts them,
//! so the listener's accept queue fills; at its backlog (1024) the kernel
//! drops the next SYN (`TcpExtListenOverflows`) and the client retransmits
//! it after the 1 s initial RTO — the stall every series of the first run
//! showed, direct included. The series now runs in batches below the
//! backlog, waits for the accept queue to drain between batches (not timed),
//! and reports the listener's overflow and drop counters, which must stay 0.
//! One back-to-back series is kept as a diagnostic row.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use wisp_testbed::agent::{Agent, AgentConfig};
use wisp_testbed::loadgen::{LoadReport, decode};
use wisp_testbed::node::{Pod, SimNode};
use wisp_testbed::sockets::in_netns;

use crate::{build, cargo, report, run_cmd, setup, step};

const TAG: &str = "brd";
const SUBNET: u8 = 241;
const APP_PORT: u16 = 8080;
const AGENT_PORT: u16 = 15001;
/// Connects per batch: well below every listener's backlog (1024).
const BATCH: usize = 250;
/// The bulk-transfer server in the server pod, and the agents for it.
const BULK_PORT: u16 = 9000;
const BULK_AGENT: u16 = 19410;
const BULK_ADMIN: &str = "127.0.0.1:19490";
const BULK_PIN_PATH: &str = "/sys/fs/bpf/wisp-test-d9-bench";
const BULK_BYTES: usize = 1 << 30;
const BULK_RUNS: usize = 3;

struct Row {
    setup: &'static str,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    per_second: f64,
    /// The listener's accept-queue overflows and SYN drops in the series.
    listen_drops: u64,
}

struct BulkRow {
    setup: &'static str,
    /// Best of the runs, MiB/s.
    best: f64,
    median: f64,
    /// Sends the kernel redirected to the peer socket (socket steering).
    redirected: Option<f64>,
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
    // Where the listener of each setup lives, for its overflow counters:
    // the server pod (direct) or the host namespace (the agent).
    let host_netns = Path::new("/proc/self/ns/net").to_owned();
    let measure = |setup: &'static str,
                   listener_netns: &Path,
                   listen_port: u16,
                   batch: usize|
     -> anyhow::Result<Row> {
        // Warm caches and conntrack, then measure.
        connect_series(client, &release, target, connects / 10)?;
        wait_for_empty_accept_queue(listener_netns, listen_port)?;
        let before = listen_counters(listener_netns)?;
        let mut histogram = None;
        let mut seconds = 0.0;
        let mut left = connects;
        while left > 0 {
            let n = left.min(batch);
            let report = connect_series(client, &release, target, n)?;
            let h = decode(&report.connect_us).context("the connect histogram")?;
            match &mut histogram {
                None => histogram = Some(h),
                Some(total) => total.add(&h).context("merging connect histograms")?,
            }
            seconds += report.connect_seconds;
            left -= n;
            // Let the server drain its accept queue (not timed).
            wait_for_empty_accept_queue(listener_netns, listen_port)?;
        }
        let histogram = histogram.context("no connects")?;
        let listen_drops = listen_counters(listener_netns)?.saturating_sub(before);
        let row = Row {
            setup,
            p50_us: histogram.value_at_quantile(0.5) as f64,
            p99_us: histogram.value_at_quantile(0.99) as f64,
            max_us: histogram.max() as f64,
            per_second: connects as f64 / seconds.max(1e-9),
            listen_drops,
        };
        println!(
            "{setup}: p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs, {:.0} connections/s, {} listen overflows/drops",
            row.p50_us, row.p99_us, row.max_us, row.per_second, row.listen_drops
        );
        Ok(row)
    };
    let mut rows = Vec::new();

    step("direct, back to back (diagnostic: the accept queue overflows)");
    let diagnostic = measure(
        "direct, back to back (old method)",
        &server.netns_path(),
        APP_PORT,
        connects,
    )?;
    step("direct");
    rows.push(measure("direct", &server.netns_path(), APP_PORT, BATCH)?);

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
        rows.push(measure(
            "eBPF connect4 steering",
            &host_netns,
            AGENT_PORT,
            BATCH,
        )?);
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
        let row = measure("iptables DNAT", &host_netns, AGENT_PORT, BATCH);
        rule("-D")?;
        rows.push(row?);
    }

    step("bulk throughput: direct, through the agent with socket steering off and on");
    let bulk_rows = bulk(&node, client, server, &release)?;
    // The server must leave its cgroup before the node removes it.
    drop(echo);
    drop(node);

    let markdown = table(&rows, &diagnostic, &bulk_rows, connects);
    println!("\n{markdown}");
    report::write_section("redirect", &markdown)
}

/// Waits until the TCP listener on `port` in the namespace at `netns` has
/// no connection left in its accept queue (`rx_queue` of the LISTEN entry
/// in /proc/net/tcp{,6}), at most 10 s.
fn wait_for_empty_accept_queue(netns: &Path, port: u16) -> anyhow::Result<()> {
    let queued = || -> anyhow::Result<u64> {
        let files = in_netns(netns, || {
            ["tcp", "tcp6"].map(|f| {
                std::fs::read_to_string(format!("/proc/thread-self/net/{f}")).unwrap_or_default()
            })
        })
        .context("entering the listener's namespace")?;
        let suffix = format!(":{port:04X}");
        Ok(files
            .iter()
            .flat_map(|text| text.lines().skip(1))
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let (local, state, queues) = (fields.get(1)?, fields.get(3)?, fields.get(4)?);
                if !(local.ends_with(&suffix) && *state == "0A") {
                    return None;
                }
                u64::from_str_radix(queues.split(':').nth(1)?, 16).ok()
            })
            .sum())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while queued()? > 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the listener on port {port} did not drain its accept queue in 10 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// `TcpExtListenOverflows + TcpExtListenDrops` of the network namespace at
/// `netns`: SYNs a listener dropped because its accept queue was full.
fn listen_counters(netns: &Path) -> anyhow::Result<u64> {
    let text = in_netns(netns, || {
        std::fs::read_to_string("/proc/thread-self/net/netstat")
    })
    .context("entering the listener's namespace")?
    .context("reading /proc/net/netstat")?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next(), lines.next());
    let (Some(names), Some(values)) = (names, values) else {
        bail!("no TcpExt counters in /proc/net/netstat");
    };
    Ok(names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter(|(name, _)| *name == "ListenOverflows" || *name == "ListenDrops")
        .filter_map(|(_, value)| value.parse::<u64>().ok())
        .sum())
}

/// Bulk throughput from the client pod to the server pod: direct, then
/// through an agent (eBPF steering, TCP pass-through) with socket steering
/// off and on. Both pods are enrolled so that both socket pairs qualify.
fn bulk(
    node: &SimNode,
    client: &Pod,
    server: &Pod,
    release: &Path,
) -> anyhow::Result<Vec<BulkRow>> {
    let listener = in_netns(&server.netns_path(), || {
        TcpListener::bind(("0.0.0.0", BULK_PORT))
    })
    .context("entering the server pod")?
    .context("listening for the bulk transfer")?;
    std::thread::spawn(move || bulk_server(listener));
    let target = SocketAddr::from((server.ip, BULK_PORT));
    let runs = |setup: &'static str, admin: Option<SocketAddr>| -> anyhow::Result<BulkRow> {
        let mut results = Vec::new();
        for _ in 0..BULK_RUNS {
            results.push(bulk_once(client, target)?);
        }
        results.sort_by(f64::total_cmp);
        let redirected = match admin {
            Some(admin) => {
                let metrics = wisp_testbed::agent::get_host(admin, "/metrics")?.body;
                Some(wisp_testbed::agent::metric(
                    &metrics,
                    "wisp_kernel_program_actions_total",
                    &[("program", "wisp_sk_msg")],
                ))
            }
            None => None,
        };
        let row = BulkRow {
            setup,
            best: results[results.len() - 1],
            median: results[results.len() / 2],
            redirected,
        };
        println!(
            "{setup}: best {:.0} MiB/s, median {:.0} MiB/s{}",
            row.best,
            row.median,
            row.redirected
                .map_or(String::new(), |n| format!(", {n:.0} sends redirected"))
        );
        Ok(row)
    };
    let mut rows = vec![runs("direct", None)?];
    for (setup, steering) in [
        ("agent, socket steering off", false),
        ("agent, socket steering on", true),
    ] {
        let yaml = format!(
            "outbound:\n  listen: {}:{BULK_AGENT}\n  ports: {{{BULK_PORT}: tcp}}\nadmin:\n  listen: {BULK_ADMIN}\nworkers: 1\n\
             ebpf:\n  pin_path: {BULK_PIN_PATH}\n  socket_steering: {steering}\n\
             workloads:\n  - name: client\n    netns: {}\n  - name: server\n    netns: {}\n",
            node.node_ip(),
            client.netns_path().display(),
            server.netns_path().display(),
        );
        let admin: SocketAddr = BULK_ADMIN.parse()?;
        let _agent = Agent::start_yaml(&release.join("wisp"), &yaml, admin)?;
        rows.push(runs(setup, steering.then_some(admin))?);
    }
    Ok(rows)
}

/// Reads each connection to its end, then answers with the byte count.
fn bulk_server(listener: TcpListener) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { return };
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    // A blocking socket in a sockhash may see a spurious
                    // EAGAIN (see docs/architecture.md); read again.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => return,
                }
            }
            let _ = stream.write_all(&total.to_le_bytes());
            let _ = stream.shutdown(Shutdown::Write);
        });
    }
}

/// One transfer of [`BULK_BYTES`] from the client pod; MiB/s until the
/// server confirmed every byte.
fn bulk_once(client: &Pod, target: SocketAddr) -> anyhow::Result<f64> {
    in_netns(&client.netns_path(), || -> anyhow::Result<f64> {
        let mut stream = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let chunk = vec![0x5au8; 1 << 20];
        let started = Instant::now();
        let mut sent = 0;
        while sent < BULK_BYTES {
            stream.write_all(&chunk)?;
            sent += chunk.len();
        }
        stream.shutdown(Shutdown::Write)?;
        let mut count = [0u8; 8];
        let mut got = 0;
        while got < 8 {
            match stream.read(&mut count[got..]) {
                Ok(0) => bail!("the bulk server closed before confirming"),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let confirmed = u64::from_le_bytes(count);
        anyhow::ensure!(
            confirmed == BULK_BYTES as u64,
            "the server got {confirmed} of {BULK_BYTES} bytes"
        );
        Ok(BULK_BYTES as f64 / (1 << 20) as f64 / seconds)
    })
    .context("entering the client pod")?
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

fn table(rows: &[Row], diagnostic: &Row, bulk: &[BulkRow], connects: usize) -> String {
    let mut md = format!(
        "## Connection capture: eBPF steering vs iptables (`cargo xtask bench redirect`)\n\n\
         Machine: {}.\n\n\
         A client pod opens {connects} TCP connections one after another to a server pod (connect, then \
         close) and times each `connect()`; the agent (release build, 1 worker, no plugins) accepts the \
         captured ones. The connects run in batches of {BATCH}, well below the listeners' backlog (1024); \
         between batches (not timed) the bench waits until the listener's accept queue is empty \
         (`/proc/net/tcp`); the rate is connections per \
         second of the timed batches. *Listen drops* are the listener's `ListenOverflows + ListenDrops` \
         during the series (must be 0: a dropped SYN costs a 1 s retransmit).\n\n\
         | Setup | connect p50 µs | connect p99 µs | connect max µs | connections/s | listen drops |\n|---|---:|---:|---:|---:|---:|\n",
        report::machine_description()
    );
    for r in rows.iter().chain(std::iter::once(diagnostic)) {
        md.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {} |\n",
            r.setup, r.p50_us, r.p99_us, r.max_us, r.per_second, r.listen_drops
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
    md.push_str(&format!(
        "\nThe last row is the first run's method — {connects} connects back to back. Whenever the \
         one-worker server falls a full backlog (1024) behind the client, the kernel drops a SYN \
         (`ListenOverflows`) and the client retransmits it after the 1 s initial RTO, which then dominates \
         the rate: the ~1 s stall of every series in the first run, direct included. It depends on how \
         busy the machine is; in this run it happened {} time(s).\n",
        diagnostic.listen_drops / 2
    ));
    md.push_str(&format!(
        "\n### Bulk throughput with socket steering\n\n\
         One connection sends {} MiB from the client pod to the server pod, which confirms the byte count; \
         best and median of {BULK_RUNS} runs. Through the agent the port is TCP pass-through (1 worker); with \
         socket steering the pod ↔ agent and agent ↔ pod socket pairs exchange bytes through sockhash + \
         sk_msg instead of TCP/IP.\n\n\
         | Setup | MiB/s best | MiB/s median | sends redirected |\n|---|---:|---:|---:|\n",
        BULK_BYTES >> 20
    ));
    for r in bulk {
        md.push_str(&format!(
            "| {} | {:.0} | {:.0} | {} |\n",
            r.setup,
            r.best,
            r.median,
            r.redirected.map_or("—".to_owned(), |n| format!("{n:.0}"))
        ));
    }
    md
}
