//! `cargo xtask bench proxy`: wisp against Envoy 1.40 on the same machine,
//! with the same upstream (nginx), the same load generator (wrk) and the same
//! Proxy-Wasm filter (the header test filter), with one and two workers.
//! Reports requests per second, p50/p99 latency and proxy RSS, and the
//! wisp/Envoy ratios, in docs/benchmarks.md.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use wisp_testbed::agent::Agent;
use wisp_testbed::envoy::{Envoy, EnvoyConfig, EnvoyPlugin, EnvoyUpstream, envoy_bin};
use wisp_testbed::load::{WrkResult, rss_mib, wrk};
use wisp_testbed::nginx::Nginx;

use crate::{build, cargo, report, run_cmd, setup, step};

const NGINX: u16 = 18880;
const PROXY: u16 = 18801;
const ADMIN: u16 = 18891;
const FILTER_CONFIG: &str = r#"{"header_value": "bench"}"#;

pub struct Options {
    pub seconds: u64,
    pub connections: usize,
}

struct Row {
    setup: String,
    result: WrkResult,
    idle_rss_mib: Option<f64>,
    loaded_rss_mib: Option<f64>,
}

pub fn run(options: Options) -> anyhow::Result<()> {
    setup::run(setup::Mode::Quiet)?;
    build::all()?;
    step("building wisp in release mode");
    run_cmd(cargo().args(["build", "--release", "--package", "wisp"]))?;
    let wisp = crate::workspace_root().join("target/release/wisp");
    let filter = wisp_testbed::artifacts::header_filter_wasm()?;
    let envoy = envoy_bin()?;

    let nginx = Nginx::start(addr(NGINX), 1).context("starting nginx")?;
    let measure = |url: &str| -> anyhow::Result<WrkResult> {
        // Warm up connections, JIT tiers and pools; then measure.
        wrk(url, 1, options.connections, 2, &[])?;
        Ok(wrk(url, 1, options.connections, options.seconds, &[])?)
    };
    let mut rows = Vec::new();

    step("direct to nginx");
    rows.push(Row {
        setup: "direct (no proxy)".into(),
        result: measure(&format!("http://127.0.0.1:{NGINX}/"))?,
        idle_rss_mib: None,
        loaded_rss_mib: None,
    });

    for workers in [1, 2] {
        step(format!(
            "Envoy 1.40, {workers} worker(s), header filter (V8)"
        ));
        let proxy = Envoy::start(
            &envoy,
            &EnvoyConfig {
                listen: addr(PROXY),
                admin: addr(ADMIN),
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
        rows.push(run_proxy(
            format!("Envoy, {workers} worker(s)"),
            proxy.pid(),
            &measure,
        )?);
        drop(proxy);

        step(format!(
            "wisp, {workers} worker(s), header filter (Wasmtime)"
        ));
        let proxy = start_wisp(&wisp, &filter, workers)?;
        rows.push(run_proxy(
            format!("wisp, {workers} worker(s)"),
            proxy.pid(),
            &measure,
        )?);
        drop(proxy);
    }
    drop(nginx);

    let markdown = table(&rows, &options);
    println!("\n{markdown}");
    report::write_section("proxy", &markdown)
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn start_wisp(wisp: &Path, filter: &Path, workers: usize) -> anyhow::Result<Agent> {
    let args: Vec<String> = [
        "--listen",
        &addr(PROXY).to_string(),
        "--upstream",
        &addr(NGINX).to_string(),
        "--admin",
        &addr(ADMIN).to_string(),
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
    Ok(Agent::start_proxy_quiet(wisp, &args, addr(ADMIN))?)
}

fn run_proxy(
    setup: String,
    pid: u32,
    measure: &dyn Fn(&str) -> anyhow::Result<WrkResult>,
) -> anyhow::Result<Row> {
    std::thread::sleep(Duration::from_millis(500));
    let idle_rss_mib = rss_mib(pid);
    let result = measure(&format!("http://127.0.0.1:{PROXY}/"))?;
    let loaded_rss_mib = rss_mib(pid);
    println!(
        "{setup}: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, RSS idle {:.1} MiB / loaded {:.1} MiB, errors {}",
        result.requests_per_second,
        result.p50_ms,
        result.p99_ms,
        idle_rss_mib.unwrap_or(f64::NAN),
        loaded_rss_mib.unwrap_or(f64::NAN),
        result.errors
    );
    Ok(Row {
        setup,
        result,
        idle_rss_mib,
        loaded_rss_mib,
    })
}

fn table(rows: &[Row], options: &Options) -> String {
    let mut md = format!(
        "## Proxy: wisp vs Envoy (`cargo xtask bench proxy`)\n\n\
         Machine: {}.\n\n\
         Upstream nginx (1 worker, fixed 17-byte body) on loopback; load from wrk (1 thread, {} connections, \
         {} s after a 2 s warm-up); both proxies run the header test filter (`tests/filters/header-filter`, \
         adds a response header) — Envoy 1.40 on V8, wisp on Wasmtime — in quick mode over HTTP/1.1, both logging at warn. \
         Everything shares the machine's cores, so absolute numbers are lower than on dedicated hosts; \
         the ratios are the point.\n\n\
         | Setup | req/s | p50 ms | p99 ms | RSS idle MiB | RSS loaded MiB | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        report::machine_description(),
        options.connections,
        options.seconds
    );
    let fmt_mib = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.1}"));
    for row in rows {
        md.push_str(&format!(
            "| {} | {:.0} | {:.3} | {:.3} | {} | {} | {} |\n",
            row.setup,
            row.result.requests_per_second,
            row.result.p50_ms,
            row.result.p99_ms,
            fmt_mib(row.idle_rss_mib),
            fmt_mib(row.loaded_rss_mib),
            row.result.errors
        ));
    }
    md.push_str("\n| Workers | wisp/Envoy req/s | wisp/Envoy p99 | wisp/Envoy idle RSS |\n|---|---:|---:|---:|\n");
    for workers in [1, 2] {
        let find = |name: &str| {
            rows.iter()
                .find(|r| r.setup == format!("{name}, {workers} worker(s)"))
        };
        if let (Some(envoy), Some(wisp)) = (find("Envoy"), find("wisp")) {
            let rss = match (wisp.idle_rss_mib, envoy.idle_rss_mib) {
                (Some(w), Some(e)) => format!("{:.2}", w / e),
                _ => "–".into(),
            };
            md.push_str(&format!(
                "| {workers} | {:.2} | {:.2} | {rss} |\n",
                wisp.result.requests_per_second / envoy.result.requests_per_second,
                wisp.result.p99_ms / envoy.result.p99_ms
            ));
        }
    }
    md
}
