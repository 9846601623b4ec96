//! `cargo xtask`: wisp's developer commands.
//!
//! * `setup`: install what building and testing need (idempotent, fast when
//!   everything is there); run automatically by the commands below.
//! * `build-ebpf`, `build-filters`, `build`: build the kernel programs, the
//!   Proxy-Wasm test filters, and the agent with its test tools.
//! * `build-pgo`: the agent built with profile-guided optimisation.
//! * `demo`: a simulated node on this machine, traffic through the agent.
//! * `test`: formatting, lints, unit and integration tests (as root).

mod bench;
mod bench_proxy;
mod bench_redirect;
mod build;
mod compare;
mod demo;
mod manifests;
mod manifests_check;
mod pgo;
mod report;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "wisp developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the toolchain pieces and system packages wisp needs.
    Setup,
    /// Build the eBPF programs (bpfel-unknown-none, via bpf-linker).
    BuildEbpf,
    /// Build the Proxy-Wasm test filters (wasm32-wasip1, wasm32-unknown-unknown).
    BuildFilters,
    /// Build everything: eBPF, filters, the `wisp` agent and test tools.
    Build,
    /// Build `wisp` with profile-guided optimisation into target/pgo/wisp
    /// (instrumented build, a training run on loopback, optimised build).
    BuildPgo,
    /// Run wisp on a simulated two-pod node on this machine (needs root).
    Demo,
    /// fmt, clippy, unit and integration tests (needs root).
    Test,
    /// Sidecars vs node proxy on this machine: memory, CPU, req/s, latency, readiness.
    Compare {
        /// Pod counts to build, e.g. `10` or `2,10,20`.
        #[arg(long, default_value = "10", value_parser = compare::parse_pods)]
        pods: std::vec::Vec<usize>,
        /// Seconds of load per mode.
        #[arg(long, default_value_t = 20)]
        duration: u64,
        /// The Proxy-Wasm filter every proxy runs (default: the header test filter).
        #[arg(long)]
        plugin: Option<std::path::PathBuf>,
        /// Its configuration.
        #[arg(long, default_value = r#"{"header_value": "compare"}"#)]
        plugin_config: String,
        /// Where results.json, report.md and the charts go.
        #[arg(long, default_value = "target/compare")]
        out: std::path::PathBuf,
        /// Keep-alive connections per pod's load client.
        #[arg(long, default_value_t = 2)]
        connections: usize,
        /// Use the debug build (quicker to build, slower to run) instead of release.
        #[arg(long)]
        debug_build: bool,
        /// Only redraw report.md and the charts from DIR/results.json.
        #[arg(long, value_name = "DIR")]
        render: Option<std::path::PathBuf>,
    },
    /// Write the CRD YAML under manifests/crds/ from the Rust types.
    Manifests {
        /// Only check that the committed YAML is up to date.
        #[arg(long)]
        check: bool,
    },
    /// Benchmarks; results go to docs/benchmarks.md.
    Bench {
        #[command(subcommand)]
        what: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// wisp vs Envoy 1.40 with the header filter: req/s, p50/p99, RSS (nginx upstream, wrk load).
    Proxy {
        /// Seconds of measured load per setup.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Concurrent connections from wrk.
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Measurements per setup, interleaved; the table shows each median.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Measure only the plain release build, not also the PGO build.
        #[arg(long)]
        no_pgo: bool,
    },
    /// The Proxy-Wasm host's criterion benchmarks: per-request cost, instantiation, memory.
    Wasm,
    /// Connection capture cost: direct vs eBPF steering vs iptables DNAT, and bulk
    /// throughput with socket steering off and on (needs root).
    Redirect {
        /// Connections to open per setup.
        #[arg(long, default_value_t = 2000)]
        connects: usize,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(setup::Mode::Report),
        Command::BuildEbpf => setup::run(setup::Mode::Quiet).and_then(|()| build::ebpf()),
        Command::BuildFilters => setup::run(setup::Mode::Quiet).and_then(|()| build::filters()),
        Command::Build => setup::run(setup::Mode::Quiet).and_then(|()| build::all()),
        Command::BuildPgo => pgo::build().map(drop),
        Command::Demo => demo::run(),
        Command::Test => test::run(),
        Command::Manifests { check } => manifests::run(check),
        Command::Compare {
            pods,
            duration,
            plugin,
            plugin_config,
            out,
            connections,
            debug_build,
            render: None,
        } => compare::run(compare::Options {
            pods,
            seconds: duration,
            plugin,
            plugin_config,
            out,
            connections,
            release: !debug_build,
        }),
        Command::Compare {
            render: Some(dir), ..
        } => compare::render(&dir),
        Command::Bench {
            what:
                Bench::Proxy {
                    seconds,
                    connections,
                    rounds,
                    no_pgo,
                },
        } => bench_proxy::run(bench_proxy::Options {
            seconds,
            connections,
            rounds,
            pgo: !no_pgo,
        }),
        Command::Bench {
            what: Bench::Redirect { connects },
        } => bench_redirect::run(connects),
        Command::Bench { what: Bench::Wasm } => {
            setup::run(setup::Mode::Quiet).and_then(|()| bench::wasm())
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("\nxtask: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Prints a step header.
fn step(text: impl std::fmt::Display) {
    println!("\n==> {text}");
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_owned()
}

/// Runs a command in the workspace root, streaming its output; fails with
/// the command line if it fails.
fn run_cmd(command: &mut std::process::Command) -> anyhow::Result<()> {
    let line = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let status = command
        .current_dir(workspace_root())
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run `{line}`: {e}"))?;
    anyhow::ensure!(status.success(), "`{line}` failed ({status})");
    Ok(())
}

/// `cargo` for the builds xtask runs, without the variables `cargo run` set
/// for xtask itself. Build scripts that track one of them (ring's tracks
/// `CARGO_MANIFEST_DIR`) would otherwise re-run, and rebuild everything
/// above them, each time a build alternates between xtask and a shell.
fn cargo() -> std::process::Command {
    let mut command =
        std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_for_xtask = key.starts_with("CARGO_PKG_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            );
        if set_for_xtask {
            command.env_remove(key);
        }
    }
    command
}
