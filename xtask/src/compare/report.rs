//! The comparison's statistics and outputs: merged HDR histograms per mode,
//! `results.json`, `report.md` with ratios to the node proxy, and charts
//! (SVG and PNG) drawn with plotters.

use std::path::{Path, PathBuf};

use anyhow::Context;
use hdrhistogram::Histogram;
use plotters::prelude::*;
use wisp_testbed::loadgen::{LoadReport, decode, new_histogram};

use super::{Mode, Options};

/// Files every comparison writes into `--out`.
pub const OUTPUT_FILES: [&str; 8] = [
    "results.json",
    "report.md",
    "memory.svg",
    "memory.png",
    "p99.svg",
    "p99.png",
    "rps.svg",
    "rps.png",
];

/// One mode at one pod count.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ModeResult {
    pub mode: Mode,
    pub pods: usize,
    /// Proxy processes this mode ran.
    pub proxies: usize,
    pub requests: u64,
    pub errors: u64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub connect_p50_ms: f64,
    pub connect_p99_ms: f64,
    /// RSS summed over the mode's proxy processes.
    pub idle_rss_mib: f64,
    pub loaded_rss_mib: f64,
    /// CPU seconds the proxies used during the load.
    pub proxy_cpu_seconds: f64,
    /// From starting the proxies until all of them said ready.
    pub ready_seconds: f64,
    /// Requests counted by the proxies themselves.
    pub proxy_requests: f64,
}

fn ms(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    if histogram.is_empty() {
        return f64::NAN;
    }
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

impl ModeResult {
    /// Merges the load clients' histograms (exactly, not by averaging
    /// percentiles) and sums their counts.
    #[allow(clippy::too_many_arguments)]
    pub fn from_loads(
        mode: Mode,
        pods: usize,
        proxies: usize,
        loads: &[LoadReport],
        idle_rss_mib: f64,
        loaded_rss_mib: f64,
        proxy_cpu_seconds: f64,
        ready_seconds: f64,
        proxy_requests: f64,
    ) -> anyhow::Result<ModeResult> {
        let mut latency = new_histogram();
        let mut connect = new_histogram();
        for load in loads {
            latency
                .add(decode(&load.latency_us).context("a latency histogram")?)
                .context("merging latency histograms")?;
            connect
                .add(decode(&load.connect_us).context("a connect histogram")?)
                .context("merging connect histograms")?;
        }
        let seconds = loads.iter().map(|l| l.seconds).fold(0.0, f64::max);
        let requests = loads.iter().map(|l| l.requests).sum::<u64>();
        Ok(ModeResult {
            mode,
            pods,
            proxies,
            requests,
            errors: loads.iter().map(|l| l.errors).sum(),
            requests_per_second: if seconds > 0.0 {
                requests as f64 / seconds
            } else {
                0.0
            },
            p50_ms: ms(&latency, 0.50),
            p90_ms: ms(&latency, 0.90),
            p99_ms: ms(&latency, 0.99),
            connect_p50_ms: ms(&connect, 0.50),
            connect_p99_ms: ms(&connect, 0.99),
            idle_rss_mib,
            loaded_rss_mib,
            proxy_cpu_seconds,
            ready_seconds,
            proxy_requests,
        })
    }

    pub fn summary_line(&self) -> String {
        format!(
            "{} pods, {:<13} {:>8.0} req/s  p50 {:.3} ms  p99 {:.3} ms  proxies {:>2}  RSS {:>7.1} MiB  CPU {:>6.2} s  ready {:.2} s  errors {}",
            self.pods,
            self.mode.name(),
            self.requests_per_second,
            self.p50_ms,
            self.p99_ms,
            self.proxies,
            self.loaded_rss_mib,
            self.proxy_cpu_seconds,
            self.ready_seconds,
            self.errors
        )
    }
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Results {
    pub machine: String,
    pub seconds: u64,
    pub connections_per_pod: usize,
    pub plugin: PathBuf,
    pub runs: Vec<ModeResult>,
}

impl Results {
    pub fn new(options: &Options, plugin: &Path) -> Results {
        Results {
            machine: crate::report::machine_description(),
            seconds: options.seconds,
            connections_per_pod: options.connections,
            plugin: plugin.to_owned(),
            runs: Vec::new(),
        }
    }

    /// Every proxy mode must have carried the load through its proxies, as
    /// the proxies themselves counted it — never assumed.
    pub fn check_traffic_went_through_proxies(&self) -> anyhow::Result<()> {
        for run in self.runs.iter().filter(|r| r.mode != Mode::Direct) {
            anyhow::ensure!(
                run.requests > 0 && run.proxy_requests >= run.requests as f64 * 0.9,
                "{} pods, {}: the clients completed {} requests but the proxies counted {} — traffic did not go through them",
                run.pods,
                run.mode.name(),
                run.requests,
                run.proxy_requests
            );
        }
        Ok(())
    }

    fn pod_counts(&self) -> Vec<usize> {
        let mut counts: Vec<usize> = self.runs.iter().map(|r| r.pods).collect();
        counts.dedup();
        counts
    }

    fn find(&self, pods: usize, mode: Mode) -> Option<&ModeResult> {
        self.runs.iter().find(|r| r.pods == pods && r.mode == mode)
    }
}

/// Proxy CPU milliseconds per 1000 requests: a closed-loop workload runs as
/// fast as the proxies allow, so total CPU alone would reward slowness.
fn cpu_per_request(r: &ModeResult) -> f64 {
    if r.requests == 0 {
        return f64::NAN;
    }
    r.proxy_cpu_seconds * 1000.0 / (r.requests as f64 / 1000.0)
}

fn ratio(value: f64, base: f64) -> String {
    if base > 0.0 && value.is_finite() {
        format!("{:.2}×", value / base)
    } else {
        "–".into()
    }
}

/// The main table, one row per pod count and mode.
pub fn summary_table(results: &Results) -> String {
    let mut md = String::from(
        "| pods | mode | proxies | req/s | p50 ms | p90 ms | p99 ms | connect p50 ms | proxy RSS MiB | proxy CPU s | CPU ms / 1k req | ready s | errors |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &results.runs {
        // No proxies, nothing to weigh.
        let (rss, cpu, per_request, ready) = if r.proxies == 0 {
            (
                "–".to_owned(),
                "–".to_owned(),
                "–".to_owned(),
                "–".to_owned(),
            )
        } else {
            (
                format!("{:.1}", r.loaded_rss_mib),
                format!("{:.2}", r.proxy_cpu_seconds),
                format!("{:.0}", cpu_per_request(r)),
                format!("{:.2}", r.ready_seconds),
            )
        };
        md.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {rss} | {cpu} | {per_request} | {ready} | {} |\n",
            r.pods,
            r.mode.name(),
            r.proxies,
            r.requests_per_second,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.connect_p50_ms,
            r.errors
        ));
    }
    md
}

/// Each sidecar mode relative to the node proxy at the same pod count.
pub fn ratio_table(results: &Results) -> String {
    let mut md = String::from(
        "| pods | mode | proxy RSS vs wisp-node | proxy CPU per request vs wisp-node | req/s vs wisp-node | p99 vs wisp-node |\n\
         |---:|---|---:|---:|---:|---:|\n",
    );
    for pods in results.pod_counts() {
        let Some(node) = results.find(pods, Mode::WispNode) else {
            continue;
        };
        for mode in [Mode::WispSidecar, Mode::EnvoySidecar, Mode::Direct] {
            if let Some(r) = results.find(pods, mode) {
                let (rss, cpu) = if r.proxies == 0 {
                    ("no proxy".to_owned(), "no proxy".to_owned())
                } else {
                    (
                        ratio(r.loaded_rss_mib, node.loaded_rss_mib),
                        ratio(cpu_per_request(r), cpu_per_request(node)),
                    )
                };
                md.push_str(&format!(
                    "| {pods} | {} | {rss} | {cpu} | {} | {} |\n",
                    mode.name(),
                    ratio(r.requests_per_second, node.requests_per_second),
                    ratio(r.p99_ms, node.p99_ms)
                ));
            }
        }
    }
    md
}

fn report_md(results: &Results) -> String {
    format!(
        "# Sidecars vs node proxy\n\n\
         Machine: {}.\n\n\
         Each pod runs an echo server and a closed-loop client (`wisp-load`, {} keep-alive connections) \
         calling the next pod's server for {} s; latency percentiles come from the clients' HDR histograms, \
         merged. Every mode adds one proxy hop (outbound capture); sidecars run as uid 1337 behind iptables \
         REDIRECT, the node proxy is one wisp agent with eBPF steering. Plugin: `{}`. Proxy memory is RSS summed \
         over the mode's proxy processes after the load; CPU is the proxies' user+system time during it.\n\n\
         ## Results\n\n{}\n## Relative to the node proxy\n\n{}\n\
         Charts: ![memory](memory.svg) ![p99](p99.svg) ![rps](rps.svg)\n",
        results.machine,
        results.connections_per_pod,
        results.seconds,
        results
            .plugin
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        summary_table(results),
        ratio_table(results)
    )
}

/// Writes results.json, report.md and the charts; returns their paths.
pub fn write(results: &Results, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let mut put = |name: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let path = out.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
        Ok(())
    };
    put(
        "results.json",
        serde_json::to_string_pretty(results)?.as_bytes(),
    )?;
    put("report.md", report_md(results).as_bytes())?;
    register_font()?;
    for chart in [Chart::Memory, Chart::P99, Chart::Rps] {
        let svg = out.join(format!("{}.svg", chart.name()));
        chart
            .draw(
                SVGBackend::new(&svg, (800, 480)).into_drawing_area(),
                results,
            )
            .with_context(|| format!("drawing {}", svg.display()))?;
        let png = out.join(format!("{}.png", chart.name()));
        chart
            .draw(
                BitMapBackend::new(&png, (800, 480)).into_drawing_area(),
                results,
            )
            .with_context(|| format!("drawing {}", png.display()))?;
        written.push(svg);
        written.push(png);
    }
    Ok(written)
}

#[derive(Clone, Copy)]
enum Chart {
    Memory,
    P99,
    Rps,
}

impl Chart {
    fn name(self) -> &'static str {
        match self {
            Chart::Memory => "memory",
            Chart::P99 => "p99",
            Chart::Rps => "rps",
        }
    }

    fn draw<DB: DrawingBackend>(
        self,
        root: DrawingArea<DB, plotters::coord::Shift>,
        results: &Results,
    ) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        match self {
            Chart::Memory => draw_memory(root, results),
            Chart::P99 => draw_bars(root, results, "p99 request latency", "ms", |r| r.p99_ms),
            Chart::Rps => draw_bars(root, results, "Requests per second", "req/s", |r| {
                r.requests_per_second
            }),
        }
    }
}

/// PNG text needs a real font; DejaVu Sans ships with Debian
/// (`fonts-dejavu-core`).
fn register_font() -> anyhow::Result<()> {
    const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
    let bytes = std::fs::read(FONT).with_context(|| {
        format!("{FONT} is missing: `apt-get install fonts-dejavu-core` (cargo xtask setup)")
    })?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))
}

const PROXY_MODES: [Mode; 3] = [Mode::WispNode, Mode::WispSidecar, Mode::EnvoySidecar];

fn color(mode: Mode) -> RGBColor {
    match mode {
        Mode::Direct => RGBColor(120, 120, 120),
        Mode::WispNode => RGBColor(31, 119, 180),
        Mode::WispSidecar => RGBColor(44, 160, 44),
        Mode::EnvoySidecar => RGBColor(214, 39, 40),
    }
}

fn draw_memory<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    results: &Results,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(plot_err)?;
    let counts = results.pod_counts();
    let max_pods = counts.iter().copied().max().unwrap_or(1) as f64;
    let max_rss = results
        .runs
        .iter()
        .map(|r| r.loaded_rss_mib)
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption("Total proxy memory (RSS) vs pods", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_pods * 1.1, 0.0..max_rss * 1.15)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("pods")
        .y_desc("MiB")
        .draw()
        .map_err(plot_err)?;
    for mode in PROXY_MODES {
        let points: Vec<(f64, f64)> = counts
            .iter()
            .filter_map(|&n| results.find(n, mode).map(|r| (n as f64, r.loaded_rss_mib)))
            .collect();
        let style = color(mode).stroke_width(3);
        chart
            .draw_series(LineSeries::new(points.clone(), style))
            .map_err(plot_err)?
            .label(mode.name())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color(mode).stroke_width(3))
            });
        chart
            .draw_series(
                points
                    .iter()
                    .map(|&p| Circle::new(p, 5, color(mode).filled())),
            )
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// A bar per mode at the largest pod count.
fn draw_bars<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    results: &Results,
    title: &str,
    unit: &str,
    value: fn(&ModeResult) -> f64,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(plot_err)?;
    let pods = results.pod_counts().into_iter().max().unwrap_or(0);
    let bars: Vec<(Mode, f64)> = Mode::ALL
        .iter()
        .filter_map(|&m| results.find(pods, m).map(|r| (m, value(r))))
        .filter(|(_, v)| v.is_finite())
        .collect();
    let max = bars.iter().map(|(_, v)| *v).fold(0.0, f64::max).max(1e-9);
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title} ({pods} pods)"), ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        // A segmented range 0..n has a segment for n too; stop one short.
        .build_cartesian_2d(
            (0..bars.len().saturating_sub(1)).into_segmented(),
            0.0..max * 1.2,
        )
        .map_err(plot_err)?;
    let names: Vec<&str> = bars.iter().map(|(m, _)| m.name()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i).copied().unwrap_or("").to_owned(),
            _ => String::new(),
        })
        .y_desc(unit)
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (mode, v))| {
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), *v),
                ],
                color(*mode).filled(),
            );
            bar.set_margin(0, 0, 20, 20);
            bar
        }))
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

fn plot_err<E: std::error::Error + Send + Sync + 'static>(
    error: DrawingAreaErrorKind<E>,
) -> anyhow::Error {
    anyhow::anyhow!("{error}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use wisp_testbed::loadgen::encode;

    fn load(latencies_us: &[u64], seconds: f64) -> LoadReport {
        let mut h = new_histogram();
        for &v in latencies_us {
            h.record(v).unwrap();
        }
        let mut c = new_histogram();
        c.record(100).unwrap();
        LoadReport {
            requests: latencies_us.len() as u64,
            errors: 0,
            seconds,
            latency_us: encode(&h),
            connect_us: encode(&c),
            connect_seconds: 0.0,
        }
    }

    fn result(mode: Mode, loads: &[LoadReport], rss: f64, proxy_requests: f64) -> ModeResult {
        ModeResult::from_loads(mode, 2, 1, loads, rss, rss, 1.0, 0.1, proxy_requests).unwrap()
    }

    #[test]
    fn merges_histograms_exactly_rather_than_averaging_percentiles() {
        // One client saw 99 fast requests, the other one slow one.
        let fast = load(&[1000; 99], 1.0);
        let slow = load(&[50_000], 1.0);
        let r = result(Mode::WispNode, &[fast, slow], 10.0, 100.0);
        assert_eq!(r.requests, 100);
        assert!((r.requests_per_second - 100.0).abs() < 1e-9);
        assert!((r.p50_ms - 1.0).abs() < 0.01, "{}", r.p50_ms);
        // The merged p99 is the 99th of 100 values: still a fast one; p100 is slow.
        assert!(r.p99_ms < 1.1, "{}", r.p99_ms);
    }

    #[test]
    fn refuses_a_proxy_mode_whose_proxies_saw_no_traffic() {
        let mut results = Results {
            machine: "test".into(),
            seconds: 1,
            connections_per_pod: 1,
            plugin: "f.wasm".into(),
            runs: vec![result(Mode::Direct, &[load(&[100], 1.0)], 0.0, 0.0)],
        };
        results.check_traffic_went_through_proxies().unwrap();
        results.runs.push(result(
            Mode::WispSidecar,
            &[load(&[100, 100], 1.0)],
            5.0,
            0.0,
        ));
        let err = results
            .check_traffic_went_through_proxies()
            .unwrap_err()
            .to_string();
        assert!(err.contains("wisp-sidecar"), "{err}");
    }

    #[test]
    fn ratios_are_relative_to_the_node_proxy() {
        let results = Results {
            machine: "test".into(),
            seconds: 1,
            connections_per_pod: 1,
            plugin: "f.wasm".into(),
            runs: vec![
                result(Mode::WispNode, &[load(&[1000], 1.0)], 10.0, 1.0),
                result(Mode::EnvoySidecar, &[load(&[1000], 1.0)], 80.0, 1.0),
            ],
        };
        let table = ratio_table(&results);
        assert!(table.contains("| 2 | envoy-sidecar | 8.00× |"), "{table}");
        assert!(summary_table(&results).contains("| 2 | wisp-node | 1 |"));
    }
}
