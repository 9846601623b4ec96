//! `wisp`: the node agent's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wisp_agent::config::Config;

#[derive(Parser)]
#[command(
    name = "wisp",
    version,
    about = "wisp node agent: eBPF steering + Proxy-Wasm filters, one process per node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the kernel programs, enroll workloads and proxy their traffic
    /// until SIGINT or SIGTERM.
    Run {
        /// The agent's YAML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file (and compile its plugins) without
    /// touching the kernel.
    CheckConfig {
        /// The YAML file to check.
        config: PathBuf,
    },
}

/// `sysexits.h` EX_CONFIG: the configuration is wrong.
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WISP_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let config_path = match &cli.command {
        Command::Run { config } | Command::CheckConfig { config } => config,
    };
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("wisp: invalid configuration: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = match cli.command {
        Command::Run { .. } => wisp_agent::app::run(config),
        Command::CheckConfig { .. } => wisp_agent::app::compile_plugins(&config).map(|plugins| {
            println!(
                "{}: ok ({} plugin(s), {} workload(s))",
                config_path.display(),
                plugins.len(),
                config.workloads.len()
            );
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("wisp: {error:#}");
            ExitCode::FAILURE
        }
    }
}
