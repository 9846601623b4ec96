//! `cargo xtask`: wisp's developer commands.
//!
//! * `setup`: install what building and testing need (idempotent, fast when
//!   everything is there); run automatically by the commands below.
//! * `build-ebpf`, `build-filters`, `build`: build the kernel programs, the
//!   Proxy-Wasm test filters, and the agent with its test tools.
//! * `demo`: a simulated node on this machine, traffic through the agent.
//! * `test`: formatting, lints, unit and integration tests (as root).

mod build;
mod demo;
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
    /// Build the Proxy-Wasm test filters (wasm32-wasip1).
    BuildFilters,
    /// Build everything: eBPF, filters, the `wisp` agent and test tools.
    Build,
    /// Run wisp on a simulated two-pod node on this machine (needs root).
    Demo,
    /// fmt, clippy, unit and integration tests (needs root).
    Test,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(setup::Mode::Report),
        Command::BuildEbpf => setup::run(setup::Mode::Quiet).and_then(|()| build::ebpf()),
        Command::BuildFilters => setup::run(setup::Mode::Quiet).and_then(|()| build::filters()),
        Command::Build => setup::run(setup::Mode::Quiet).and_then(|()| build::all()),
        Command::Demo => demo::run(),
        Command::Test => test::run(),
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

fn cargo() -> std::process::Command {
    std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}
