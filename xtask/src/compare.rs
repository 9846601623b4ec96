//! `cargo xtask compare`: sidecars against a node proxy, measured on this
//! machine. For each pod count it builds a simulated node (pods = network
//! namespace + veth + cgroup, each with an echo server and a load client
//! calling the next pod), then runs the same workload under each deployment:
//!
//! 1. `direct` — no mesh;
//! 2. `wisp-node` — one wisp agent, eBPF steering of every pod;
//! 3. `wisp-sidecar` — one `wisp proxy` per pod, iptables REDIRECT capture;
//! 4. `envoy-sidecar` — one Envoy 1.40 per pod, same filter, same capture.
//!
//! Sidecars run as uid 1337 and iptables exempts that uid, as Istio does.
//! Every mode is one proxy hop per request (outbound capture only), so the
//! modes differ in how many proxies exist and how traffic reaches them.

mod report;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use wisp_testbed::agent::{Agent, AgentConfig, PluginSpec, fresh_dir, metric};
use wisp_testbed::envoy::{Envoy, EnvoyConfig, EnvoyPlugin, EnvoyUpstream, envoy_bin};
use wisp_testbed::load::{cpu_seconds, rss_mib};
use wisp_testbed::loadgen::LoadReport;
use wisp_testbed::node::{Pod, SimNode};

use crate::{build, cargo, run_cmd, setup, step};
pub use report::{ModeResult, Results};

const TAG: &str = "cmp";
const SUBNET: u8 = 240;
const APP_PORT: u16 = 8080;
const SIDECAR_PORT: u16 = 15001;
const NODE_PROXY_PORT: u16 = 15001;
const SIDECAR_UID: u32 = 1337;

pub struct Options {
    pub pods: Vec<usize>,
    pub seconds: u64,
    pub plugin: Option<PathBuf>,
    pub plugin_config: String,
    pub out: PathBuf,
    /// Keep-alive connections per pod's load client.
    pub connections: usize,
    /// Compare release builds (the default); the smoke run in `cargo xtask
    /// test` uses the debug build it already has.
    pub release: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Direct,
    WispNode,
    WispSidecar,
    EnvoySidecar,
}

impl Mode {
    pub const ALL: [Mode; 4] = [
        Mode::Direct,
        Mode::WispNode,
        Mode::WispSidecar,
        Mode::EnvoySidecar,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::WispNode => "wisp-node",
            Mode::WispSidecar => "wisp-sidecar",
            Mode::EnvoySidecar => "envoy-sidecar",
        }
    }
}

/// A proxy process of one mode.
enum Proxy {
    Wisp(Agent),
    Envoy(Envoy),
}

impl Proxy {
    fn pid(&self) -> u32 {
        match self {
            Proxy::Wisp(a) => a.pid(),
            Proxy::Envoy(e) => e.pid(),
        }
    }

    /// HTTP requests the proxy itself counted.
    fn requests(&self) -> anyhow::Result<f64> {
        Ok(match self {
            Proxy::Wisp(a) => metric(&a.metrics()?, "wisp_http_requests_total", &[]),
            Proxy::Envoy(e) => metric(
                &e.stats()?,
                "envoy_http_downstream_rq_total",
                &[("envoy_http_conn_manager_prefix", "main")],
            ),
        })
    }
}

struct Binaries {
    wisp: PathBuf,
    echo: PathBuf,
    load: PathBuf,
    envoy: PathBuf,
    plugin: PathBuf,
}

pub fn run(options: Options) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "cargo xtask compare needs root: it builds pods from network namespaces, iptables rules and eBPF"
        );
    }
    anyhow::ensure!(
        !options.pods.is_empty() && options.pods.iter().all(|&n| (2..=200).contains(&n)),
        "--pods: each count must be 2..=200"
    );
    setup::run(setup::Mode::Quiet)?;
    build::all()?;
    let profile = if options.release {
        step("building wisp and the test tools in release mode (proxies are compared as shipped)");
        run_cmd(cargo().args([
            "build",
            "--release",
            "--package",
            "wisp",
            "--package",
            "wisp-testbed",
            "--bins",
        ]))?;
        "release"
    } else {
        "debug"
    };
    let release = crate::workspace_root().join("target").join(profile);
    let bins = Binaries {
        wisp: release.join("wisp"),
        echo: release.join("wisp-echo"),
        load: release.join("wisp-load"),
        envoy: envoy_bin()?,
        plugin: match &options.plugin {
            Some(path) => path
                .canonicalize()
                .with_context(|| format!("--plugin {}", path.display()))?,
            None => wisp_testbed::artifacts::header_filter_wasm()?,
        },
    };
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("creating {}", options.out.display()))?;

    let total = options.pods.len() * Mode::ALL.len();
    let progress = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    progress.enable_steady_tick(Duration::from_millis(200));
    let mut results = Results::new(&options, &bins.plugin);
    for &pods in &options.pods {
        progress.set_message(format!("building {pods} pods"));
        let names: Vec<String> = (0..pods).map(|i| format!("p{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let node = SimNode::create(TAG, SUBNET, &names).context("building the simulated node")?;
        let _echo: Vec<_> = node
            .pods()
            .iter()
            .map(|pod| pod.spawn_echo(&bins.echo, APP_PORT))
            .collect::<Result<_, _>>()?;
        for mode in Mode::ALL {
            progress.set_message(format!(
                "{pods} pods, {}: {} s of load",
                mode.name(),
                options.seconds
            ));
            let result = run_mode(mode, &node, &bins, &options)
                .with_context(|| format!("{pods} pods, mode {}", mode.name()))?;
            progress.println(result.summary_line());
            results.runs.push(result);
            progress.inc(1);
        }
    }
    progress.finish_with_message("done");

    results.check_traffic_went_through_proxies()?;
    let written = report::write(&results, &options.out)?;
    println!("\n{}", report::summary_table(&results));
    for path in written {
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn run_mode(
    mode: Mode,
    node: &SimNode,
    bins: &Binaries,
    options: &Options,
) -> anyhow::Result<ModeResult> {
    let pods = node.pods();
    let started = Instant::now();
    let proxies = start_proxies(mode, node, bins, options)?;
    let ready_seconds = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let pids: Vec<u32> = proxies.iter().map(Proxy::pid).collect();
    let sum = |f: &dyn Fn(u32) -> Option<f64>| pids.iter().filter_map(|&pid| f(pid)).sum::<f64>();
    let idle_rss_mib = sum(&rss_mib);
    let cpu_before = sum(&cpu_seconds);

    // Every pod's client calls the next pod's server, all at once.
    let loads = pods
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            let target = SocketAddr::from((pods[(i + 1) % pods.len()].ip, APP_PORT));
            pod.command(&bins.load)?
                .args(["--target", &target.to_string()])
                .args(["--connections", &options.connections.to_string()])
                .args([
                    "--seconds",
                    &options.seconds.to_string(),
                    "--connects",
                    "100",
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .context("starting wisp-load")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut reports = Vec::new();
    for load in loads {
        let out = load.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "wisp-load failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        reports.push(
            serde_json::from_slice::<LoadReport>(&out.stdout)
                .context("parsing wisp-load's report")?,
        );
    }
    let cpu_seconds_used = sum(&cpu_seconds) - cpu_before;
    let loaded_rss_mib = sum(&rss_mib);
    let proxy_requests = proxies
        .iter()
        .map(Proxy::requests)
        .sum::<anyhow::Result<f64>>()?;
    drop(proxies);
    if matches!(mode, Mode::WispSidecar | Mode::EnvoySidecar) {
        for pod in pods {
            wisp_testbed::cmd::output(
                pod.command("iptables")?.args(["-t", "nat", "-F", "OUTPUT"]),
            )?;
        }
    }
    ModeResult::from_loads(
        mode,
        pods.len(),
        pids.len(),
        &reports,
        idle_rss_mib,
        loaded_rss_mib,
        cpu_seconds_used,
        ready_seconds,
        proxy_requests,
    )
}

fn start_proxies(
    mode: Mode,
    node: &SimNode,
    bins: &Binaries,
    options: &Options,
) -> anyhow::Result<Vec<Proxy>> {
    let pods = node.pods();
    match mode {
        Mode::Direct => Ok(Vec::new()),
        Mode::WispNode => {
            let config = AgentConfig {
                listen: SocketAddr::from((node.node_ip(), NODE_PROXY_PORT)),
                admin: "127.0.0.1:15990".parse().expect("valid address"),
                workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
                plugins: vec![PluginSpec {
                    name: "filter".into(),
                    module: bins.plugin.clone(),
                    configuration: options.plugin_config.clone(),
                    failure_policy: "FAIL_CLOSED",
                }],
                workloads: pods
                    .iter()
                    .map(|p| (p.name.clone(), p.netns_path()))
                    .collect(),
            };
            Ok(vec![Proxy::Wisp(Agent::start_quiet(&bins.wisp, &config)?)])
        }
        Mode::WispSidecar => pods
            .iter()
            .map(|pod| {
                capture_outbound(pod)?;
                let admin = SocketAddr::from((pod.ip, 15090));
                let mut command = pod.command_as(&bins.wisp, SIDECAR_UID)?;
                command.args([
                    "proxy",
                    "--listen",
                    &format!("0.0.0.0:{SIDECAR_PORT}"),
                    "--upstream",
                    "original-dst",
                ]);
                command.args([
                    "--protocol",
                    "http1",
                    "--workers",
                    "1",
                    "--admin",
                    &admin.to_string(),
                ]);
                command
                    .arg("--plugin")
                    .arg(&bins.plugin)
                    .args(["--plugin-config", &options.plugin_config]);
                // Like the Envoys: warnings and errors only.
                command.env("WISP_LOG", "warn");
                Ok(Proxy::Wisp(Agent::spawn(command, fresh_dir()?, admin)?))
            })
            .collect(),
        Mode::EnvoySidecar => pods
            .iter()
            .map(|pod| {
                capture_outbound(pod)?;
                let config = EnvoyConfig {
                    listen: SocketAddr::from(([0, 0, 0, 0], SIDECAR_PORT)),
                    admin: SocketAddr::from((pod.ip, 15000)),
                    upstream: EnvoyUpstream::OriginalDst,
                    plugins: vec![EnvoyPlugin {
                        name: "filter".into(),
                        module: bins.plugin.clone(),
                        root_id: String::new(),
                        configuration: options.plugin_config.clone(),
                    }],
                    concurrency: 1,
                };
                let wrap = pod.command_as(&bins.envoy, SIDECAR_UID)?;
                Ok(Proxy::Envoy(Envoy::start(
                    &bins.envoy,
                    &config,
                    Some(wrap),
                )?))
            })
            .collect(),
    }
}

/// Istio's outbound capture in the pod's namespace: TCP to the app port goes
/// to the sidecar, except the sidecar's own (uid 1337).
fn capture_outbound(pod: &Pod) -> anyhow::Result<()> {
    let rule = [
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "--dport",
        &APP_PORT.to_string(),
        "-m",
        "owner",
        "!",
        "--uid-owner",
        &SIDECAR_UID.to_string(),
        "-j",
        "REDIRECT",
        "--to-ports",
        &SIDECAR_PORT.to_string(),
    ];
    wisp_testbed::cmd::output(pod.command("iptables")?.args(rule))?;
    Ok(())
}

/// Writes report.md and the charts again from `dir/results.json`, without
/// measuring anything (`cargo xtask compare --render DIR`).
pub fn render(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join("results.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let results: Results =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    for path in report::write(&results, dir)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// `--pods 2,10,20` → [2, 10, 20].
pub fn parse_pods(text: &str) -> Result<Vec<usize>, String> {
    text.split(',')
        .map(|n| n.trim().parse::<usize>().map_err(|e| format!("{n:?}: {e}")))
        .collect()
}

/// What a comparison should have written into `dir` but did not.
pub fn missing_outputs(dir: &Path) -> Vec<String> {
    report::OUTPUT_FILES
        .iter()
        .filter(|f| !dir.join(f).is_file())
        .map(|f| f.to_string())
        .collect()
}
