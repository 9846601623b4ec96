//! `cargo xtask bench proxy`: wisp against Envoy 1.40 on the same machine,
//! with the same upstream (nginx), the same load generator (wrk) and the same
//! Proxy-Wasm filter (the header test filter), with one and two workers;
//! wisp both as the plain release build and as the PGO build. Reports
//! requests per second, p50/p99 latency, proxy CPU per request and proxy
//! RSS, and the wisp/Envoy ratios, in docs/benchmarks.md.
//!
//! A shared machine's speed drifts over minutes, so each worker count runs
//! the proxies side by side and measures them in alternation for several
//! rounds; the table shows the median of each column.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use wisp_testbed::agent::Agent;
use wisp_testbed::envoy::{Envoy, EnvoyConfig, EnvoyPlugin, EnvoyUpstream, envoy_bin};
use wisp_testbed::load::{WrkResult, cpu_times, machine_cpu_ticks, rss_mib, steal_percent, wrk};
use wisp_testbed::nginx::Nginx;

use crate::{build, cargo, report, run_cmd, setup, step};

const NGINX: u16 = 18880;
const ENVOY: u16 = 18801;
const ENVOY_ADMIN: u16 = 18891;
const WISP: u16 = 18802;
const WISP_ADMIN: u16 = 18892;
const WISP_PGO: u16 = 18803;
const WISP_PGO_ADMIN: u16 = 18893;
const FILTER_CONFIG: &str = r#"{"header_value": "bench"}"#;

pub struct Options {
    pub seconds: u64,
    pub connections: usize,
    pub rounds: usize,
    /// Also measure the PGO build (`cargo xtask build-pgo`).
    pub pgo: bool,
}

/// One measurement of one setup.
struct Sample {
    result: WrkResult,
    /// The proxy's user + system CPU per request, in µs.
    cpu_us_per_request: Option<f64>,
    /// The system (kernel) part of it.
    kernel_us_per_request: Option<f64>,
    loaded_rss_mib: Option<f64>,
    /// The machine's CPU time stolen by the hypervisor during the run, in %.
    steal_percent: Option<f64>,
}

/// A setup's samples, summarised by their medians.
struct Row {
    setup: String,
    samples: Vec<Sample>,
    idle_rss_mib: Option<f64>,
}

pub fn run(options: Options) -> anyhow::Result<()> {
    anyhow::ensure!(options.rounds > 0, "--rounds must be at least 1");
    setup::run(setup::Mode::Quiet)?;
    build::all()?;
    step("building wisp in release mode");
    run_cmd(cargo().args(["build", "--release", "--package", "wisp"]))?;
    let wisp = crate::workspace_root().join("target/release/wisp");
    let wisp_pgo = if options.pgo {
        Some(crate::pgo::build_prepared()?)
    } else {
        None
    };
    let filter = wisp_testbed::artifacts::header_filter_wasm()?;
    let envoy = envoy_bin()?;

    let nginx = Nginx::start(addr(NGINX), 1).context("starting nginx")?;
    let measure = |port: u16, pid: Option<u32>| -> anyhow::Result<Sample> {
        let url = format!("http://127.0.0.1:{port}/");
        // Warm up connections, JIT tiers and pools; then measure.
        wrk(&url, 1, options.connections, 2, &[])?;
        let cpu_before = pid.and_then(cpu_times);
        let machine_before = machine_cpu_ticks();
        let result = wrk(&url, 1, options.connections, options.seconds, &[])?;
        let machine_after = machine_cpu_ticks();
        let cpu_after = pid.and_then(cpu_times);
        let per_request = |seconds: f64| seconds * 1e6 / result.requests as f64;
        let (cpu_us_per_request, kernel_us_per_request) = match (cpu_before, cpu_after) {
            (Some(before), Some(after)) if result.requests > 0 => (
                Some(per_request(after.total() - before.total())),
                Some(per_request(after.system - before.system)),
            ),
            _ => (None, None),
        };
        Ok(Sample {
            result,
            cpu_us_per_request,
            kernel_us_per_request,
            loaded_rss_mib: pid.and_then(rss_mib),
            steal_percent: machine_before
                .zip(machine_after)
                .and_then(|(before, after)| steal_percent(before, after)),
        })
    };
    let mut rows = Vec::new();

    step("direct to nginx");
    let mut direct = Row {
        setup: "direct (no proxy)".into(),
        samples: Vec::new(),
        idle_rss_mib: None,
    };
    for _ in 0..options.rounds {
        direct.samples.push(measure(NGINX, None)?);
    }
    print_row(&direct);
    rows.push(direct);

    for workers in [1, 2] {
        step(format!(
            "{workers} worker(s): Envoy 1.40 (V8) and wisp (Wasmtime), header filter, {} rounds",
            options.rounds
        ));
        let envoy = Envoy::start(
            &envoy,
            &EnvoyConfig {
                listen: addr(ENVOY),
                admin: addr(ENVOY_ADMIN),
                upstream: EnvoyUpstream::Addr(addr(NGINX)),
                plugins: vec![EnvoyPlugin {
                    name: "header-filter".into(),
                    module: filter.clone(),
                    root_id: String::new(),
                    configuration: FILTER_CONFIG.into(),
                }],
                concurrency: workers,
            },
            None,
        )?;
        let agent = start_wisp(&wisp, &filter, workers, WISP, WISP_ADMIN)?;
        let agent_pgo = wisp_pgo
            .as_ref()
            .map(|binary| start_wisp(binary, &filter, workers, WISP_PGO, WISP_PGO_ADMIN))
            .transpose()?;
        // Idle: both started, nothing sent yet.
        std::thread::sleep(Duration::from_millis(500));
        let mut envoy_row = Row {
            setup: format!("Envoy, {workers} worker(s)"),
            samples: Vec::new(),
            idle_rss_mib: rss_mib(envoy.pid()),
        };
        let mut wisp_row = Row {
            setup: format!("wisp, {workers} worker(s)"),
            samples: Vec::new(),
            idle_rss_mib: rss_mib(agent.pid()),
        };
        let mut pgo_row = agent_pgo.as_ref().map(|agent| Row {
            setup: format!("wisp PGO, {workers} worker(s)"),
            samples: Vec::new(),
            idle_rss_mib: rss_mib(agent.pid()),
        });
        for _ in 0..options.rounds {
            envoy_row.samples.push(measure(ENVOY, Some(envoy.pid()))?);
            wisp_row.samples.push(measure(WISP, Some(agent.pid()))?);
            if let (Some(row), Some(agent)) = (&mut pgo_row, &agent_pgo) {
                row.samples.push(measure(WISP_PGO, Some(agent.pid()))?);
            }
        }
        let mut measured = vec![envoy_row, wisp_row];
        measured.extend(pgo_row);
        measured.iter().for_each(print_row);
        rows.extend(measured);
        drop(agent_pgo);
        drop(agent);
        drop(envoy);
    }
    drop(nginx);

    let markdown = table(&rows, &options);
    println!("\n{markdown}");
    report::write_section("proxy", &markdown)
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn start_wisp(
    wisp: &Path,
    filter: &Path,
    workers: usize,
    port: u16,
    admin: u16,
) -> anyhow::Result<Agent> {
    let args: Vec<String> = [
        "--listen",
        &addr(port).to_string(),
        "--upstream",
        &addr(NGINX).to_string(),
        "--admin",
        &addr(admin).to_string(),
        "--workers",
        &workers.to_string(),
        "--protocol",
        "http1",
        "--plugin",
        filter.to_str().context("filter path is UTF-8")?,
        "--plugin-config",
        FILTER_CONFIG,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Ok(Agent::start_proxy_quiet(wisp, &args, addr(admin))?)
}

/// The median of what `value` gives for each sample (`None` if none do).
fn median(samples: &[Sample], value: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
    let mut values: Vec<f64> = samples.iter().filter_map(value).collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

impl Row {
    fn requests_per_second(&self) -> f64 {
        median(&self.samples, |s| Some(s.result.requests_per_second)).unwrap_or(0.0)
    }
    fn p50_ms(&self) -> f64 {
        median(&self.samples, |s| Some(s.result.p50_ms)).unwrap_or(0.0)
    }
    fn p99_ms(&self) -> f64 {
        median(&self.samples, |s| Some(s.result.p99_ms)).unwrap_or(0.0)
    }
    fn cpu_us_per_request(&self) -> Option<f64> {
        median(&self.samples, |s| s.cpu_us_per_request)
    }
    fn kernel_us_per_request(&self) -> Option<f64> {
        median(&self.samples, |s| s.kernel_us_per_request)
    }
    /// User-space CPU per request: the proxy's own code.
    fn user_us_per_request(&self) -> Option<f64> {
        median(&self.samples, |s| {
            Some(s.cpu_us_per_request? - s.kernel_us_per_request?)
        })
    }
    fn loaded_rss_mib(&self) -> Option<f64> {
        median(&self.samples, |s| s.loaded_rss_mib)
    }
    fn steal_percent(&self) -> Option<f64> {
        median(&self.samples, |s| s.steal_percent)
    }
    fn errors(&self) -> u64 {
        self.samples.iter().map(|s| s.result.errors).sum()
    }
}

fn print_row(row: &Row) {
    let each: Vec<String> = row
        .samples
        .iter()
        .map(|s| format!("{:.0}", s.result.requests_per_second))
        .collect();
    println!(
        "{}: {:.0} req/s (rounds: {}), p50 {:.3} ms, p99 {:.3} ms, CPU {} µs/request ({} in the kernel), RSS idle {} MiB / loaded {} MiB, steal {}%, errors {}",
        row.setup,
        row.requests_per_second(),
        each.join(", "),
        row.p50_ms(),
        row.p99_ms(),
        fmt_opt(row.cpu_us_per_request(), 1),
        fmt_opt(row.kernel_us_per_request(), 1),
        fmt_opt(row.idle_rss_mib, 1),
        fmt_opt(row.loaded_rss_mib(), 1),
        fmt_opt(row.steal_percent(), 1),
        row.errors()
    );
}

fn fmt_opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or("–".to_owned(), |v| format!("{v:.decimals$}"))
}

fn table(rows: &[Row], options: &Options) -> String {
    let mut md = format!(
        "## Proxy: wisp vs Envoy (`cargo xtask bench proxy`)\n\n\
         Machine: {}.\n\n\
         Upstream nginx (1 worker, fixed 17-byte body) on loopback; load from wrk (1 thread, {} connections, \
         {} s after a 2 s warm-up); both proxies run the header test filter (`tests/filters/header-filter`, \
         adds a response header) — Envoy 1.40 on V8, wisp on Wasmtime — in quick mode over HTTP/1.1, both logging at warn. \
         *wisp PGO* is the same code built by `cargo xtask build-pgo` (profile-guided optimisation, trained on \
         HTTP/1.1, HTTP/2, TLS and TCP traffic through the same filter; see docs/pgo.md). \
         For each worker count the proxies run side by side and are measured in alternation, {} rounds; \
         each cell is the median of the rounds (errors: their sum). CPU is the proxy's user + system time per request, \
         and *kernel* the system part of it: the socket calls, which over loopback also run the receiving side's \
         TCP stack. Both proxies send and receive the same per request (Envoy also reads each socket once more \
         until it is empty), so the kernel part is about the same for both, and however cheap a proxy's own code \
         (*user*), a proxy-bound req/s ratio stays below (Envoy's CPU) / (wisp's kernel CPU). \
         Everything shares the machine's cores, so absolute numbers are lower than on dedicated hosts; \
         the ratios are the point. *Steal* is the share of the machine's CPU time the hypervisor gave \
         to other guests during the measured runs (median): where it is high, the rounds were slowed \
         from outside.\n\n\
         | Setup | req/s | p50 ms | p99 ms | CPU µs/req | of it kernel | RSS idle MiB | RSS loaded MiB | steal % | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        report::machine_description(),
        options.connections,
        options.seconds,
        options.rounds,
    );
    for row in rows {
        md.push_str(&format!(
            "| {} | {:.0} | {:.3} | {:.3} | {} | {} | {} | {} | {} | {} |\n",
            row.setup,
            row.requests_per_second(),
            row.p50_ms(),
            row.p99_ms(),
            fmt_opt(row.cpu_us_per_request(), 1),
            fmt_opt(row.kernel_us_per_request(), 1),
            fmt_opt(row.idle_rss_mib, 1),
            fmt_opt(row.loaded_rss_mib(), 1),
            fmt_opt(row.steal_percent(), 1),
            row.errors()
        ));
    }
    md.push_str(
        "\n| Workers | Build | wisp/Envoy req/s | wisp/Envoy p99 | wisp/Envoy CPU per request | wisp/Envoy user CPU per request | wisp/Envoy idle RSS |\n\
         |---|---|---:|---:|---:|---:|---:|\n",
    );
    for workers in [1, 2] {
        let find = |name: &str| {
            rows.iter()
                .find(|r| r.setup == format!("{name}, {workers} worker(s)"))
        };
        let Some(envoy) = find("Envoy") else { continue };
        for (name, build) in [("wisp", "release"), ("wisp PGO", "release + PGO")] {
            let Some(wisp) = find(name) else { continue };
            let ratio = |w: Option<f64>, e: Option<f64>| match (w, e) {
                (Some(w), Some(e)) if e > 0.0 => format!("{:.2}", w / e),
                _ => "–".into(),
            };
            md.push_str(&format!(
                "| {workers} | {build} | {:.2} | {:.2} | {} | {} | {} |\n",
                wisp.requests_per_second() / envoy.requests_per_second(),
                wisp.p99_ms() / envoy.p99_ms(),
                ratio(wisp.cpu_us_per_request(), envoy.cpu_us_per_request()),
                ratio(wisp.user_us_per_request(), envoy.user_us_per_request()),
                ratio(wisp.idle_rss_mib, envoy.idle_rss_mib),
            ));
        }
    }
    md
}
