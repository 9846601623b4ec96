//! `cargo xtask build-pgo`: the `wisp` agent built with profile-guided
//! optimisation (PGO), the build to deploy when speed matters.
//!
//! 1. Build wisp instrumented (`-Cprofile-generate`) in `target/pgo/instrumented`.
//! 2. Train it: run it in quick mode on the traffic a node agent carries
//!    (the [`SCENARIOS`] below: HTTP/1.1 with and without sniffing, request
//!    bodies, TLS, HTTP/2 with prior knowledge and over ALPN, TCP
//!    pass-through; one and two workers), each stopped with SIGTERM so it
//!    writes its profile on the way out.
//! 3. Merge the profiles with the toolchain's `llvm-profdata` into
//!    `target/pgo/wisp.profdata`.
//! 4. Build wisp again with `-Cprofile-use` in `target/pgo/optimized`, and
//!    copy the binary to `target/pgo/wisp`.
//!
//! rustc lists the `-Cprofile-use` file in its dep-info, so cargo rebuilds
//! every crate when a new profile is written. The profile is reused while
//! the instrumented binary is older than it, so a second run with unchanged
//! sources only checks that both builds are fresh. Both builds pass `--target` explicitly so the flags reach wisp and
//! its dependencies but not the build scripts and proc macros, which would
//! otherwise write profiles of the compiler's own helpers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use wisp_testbed::agent::{Agent, fresh_dir};
use wisp_testbed::artifacts;
use wisp_testbed::cmd;
use wisp_testbed::load::wrk;
use wisp_testbed::nginx::Nginx;
use wisp_testbed::pki::TestPki;

use crate::{build, cargo, run_cmd, setup, step};

const NGINX: u16 = 18980;
const WISP: u16 = 18981;
const ECHO: u16 = 18982;
const WISP_ADMIN: u16 = 18991;
const FILTER_CONFIG: &str = r#"{"header_value": "pgo"}"#;

/// Seconds of load per training step. Profiles count executions, so this
/// only has to be long enough for the hot paths to dominate start-up.
const SECONDS: u64 = 5;

/// Where the upstream of a scenario is.
#[derive(Clone, Copy)]
enum Upstream {
    /// nginx, a fixed 17-byte body.
    Nginx,
    /// `wisp-echo` (hyper, HTTP/1.1 and HTTP/2), which answers with the
    /// request's body.
    Echo,
}

/// The load a scenario sends.
#[derive(Clone, Copy)]
enum Load {
    /// wrk GETs over HTTP/1.1 keep-alive connections.
    Wrk,
    /// wrk POSTs with a 4 KiB body.
    WrkPost,
    /// h2load over HTTP/2: h2c with prior knowledge for `http`, ALPN for `https`.
    H2load,
}

struct Scenario {
    name: &'static str,
    upstream: Upstream,
    /// `wisp proxy` flags besides the addresses and the plugin.
    flags: &'static [&'static str],
    /// Load the header test filter.
    header_filter: bool,
    tls: bool,
    loads: &'static [Load],
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "HTTP/1.1, header filter, 1 worker",
        upstream: Upstream::Nginx,
        flags: &["--protocol", "http1", "--workers", "1"],
        header_filter: true,
        tls: false,
        loads: &[Load::Wrk],
    },
    Scenario {
        name: "HTTP/1.1, header filter, 2 workers",
        upstream: Upstream::Nginx,
        flags: &["--protocol", "http1", "--workers", "2"],
        header_filter: true,
        tls: false,
        loads: &[Load::Wrk],
    },
    Scenario {
        name: "sniffed HTTP/1.1 and HTTP/2 (h2c), request bodies, header filter",
        upstream: Upstream::Echo,
        flags: &["--workers", "1"],
        header_filter: true,
        tls: false,
        loads: &[Load::WrkPost, Load::H2load],
    },
    Scenario {
        name: "TLS termination, HTTP/1.1 and HTTP/2 over ALPN, header filter",
        // Requests go upstream in the client's HTTP version, and nginx
        // (Debian's, without TLS) speaks only HTTP/1.1 in the clear.
        upstream: Upstream::Echo,
        flags: &["--workers", "1"],
        header_filter: true,
        tls: true,
        loads: &[Load::Wrk, Load::H2load],
    },
    Scenario {
        name: "TCP pass-through",
        upstream: Upstream::Nginx,
        flags: &["--protocol", "tcp", "--workers", "1"],
        header_filter: false,
        tls: false,
        loads: &[Load::Wrk],
    },
];

/// Builds the PGO-optimised agent and returns the path of the binary
/// (`target/pgo/wisp`).
pub fn build() -> anyhow::Result<PathBuf> {
    setup::run(setup::Mode::Quiet)?;
    // The training run needs the filters and wisp-echo; wisp's build embeds
    // the eBPF object.
    build::all()?;
    build_prepared()
}

/// [`build`] for a caller that has already run setup and `build::all`.
pub fn build_prepared() -> anyhow::Result<PathBuf> {
    let profdata_tool = setup::llvm_profdata()?;
    let host = setup::host_triple()?;

    let root = crate::workspace_root().join("target/pgo");
    let raw_dir = root.join("profiles");
    let profdata = root.join("wisp.profdata");

    step("building wisp instrumented for PGO (target/pgo/instrumented)");
    let instrumented_dir = root.join("instrumented");
    run_cmd(release_build(&host, &instrumented_dir).env(
        "CARGO_ENCODED_RUSTFLAGS",
        format!("-Cprofile-generate={}", raw_dir.display()),
    ))?;
    let instrumented = instrumented_dir.join(&host).join("release/wisp");

    if is_newer(&profdata, &instrumented) {
        step(format!(
            "reusing the PGO profile {} (newer than the instrumented build)",
            profdata.display()
        ));
    } else {
        if raw_dir.exists() {
            std::fs::remove_dir_all(&raw_dir)
                .with_context(|| format!("removing old profiles in {}", raw_dir.display()))?;
        }
        std::fs::create_dir_all(&raw_dir)?;
        train(&instrumented, &raw_dir)?;
        step("merging the profiles (llvm-profdata)");
        let mut merge = std::process::Command::new(&profdata_tool);
        merge.arg("merge").arg("-o").arg(&profdata);
        merge.args(profiles_in(&raw_dir)?);
        run_cmd(&mut merge)?;
    }

    step("building wisp with the profile (target/pgo/optimized)");
    let optimized_dir = root.join("optimized");
    run_cmd(release_build(&host, &optimized_dir).env(
        "CARGO_ENCODED_RUSTFLAGS",
        format!("-Cprofile-use={}", profdata.display()),
    ))?;
    let binary = root.join("wisp");
    std::fs::copy(optimized_dir.join(&host).join("release/wisp"), &binary)
        .with_context(|| format!("copying the optimised binary to {}", binary.display()))?;
    println!("PGO build: {}", binary.display());
    Ok(binary)
}

/// `cargo build --release --package wisp --target HOST --target-dir DIR`.
fn release_build(host: &str, target_dir: &Path) -> std::process::Command {
    let mut command = cargo();
    command
        .args(["build", "--release", "--package", "wisp", "--target", host])
        .arg("--target-dir")
        .arg(target_dir)
        // The build script looks for it relative to the target directory,
        // which is not `target/` here.
        .env(
            "WISP_EBPF_OBJECT",
            crate::workspace_root().join("target/ebpf/bpfel-unknown-none/release/wisp-ebpf"),
        );
    command
}

/// `a` exists and was modified after `b`.
fn is_newer(a: &Path, b: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    matches!((modified(a), modified(b)), (Some(a), Some(b)) if a > b)
}

fn profiles_in(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut profiles = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "profraw") {
            profiles.push(path);
        }
    }
    Ok(profiles)
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Runs every scenario against the instrumented binary; each must leave a
/// profile behind.
fn train(wisp: &Path, raw_dir: &Path) -> anyhow::Result<()> {
    let header_filter = artifacts::header_filter_wasm()?;
    let echo_bin = artifacts::echo_bin()?;
    let pki_dir = fresh_dir()?;
    let pki = TestPki::generate(&pki_dir).context("generating the training certificates")?;
    let _nginx = Nginx::start(addr(NGINX), 1).context("starting nginx")?;
    let _echo =
        wisp_testbed::echo::spawn_on_loopback(&echo_bin, ECHO).context("starting wisp-echo")?;
    let post_script = pki_dir.join("post.lua");
    std::fs::write(
        &post_script,
        "wrk.method = \"POST\"\n\
         wrk.body = string.rep(\"x\", 4096)\n\
         wrk.headers[\"Content-Type\"] = \"application/octet-stream\"\n",
    )?;

    for scenario in SCENARIOS {
        step(format!("PGO training: {}", scenario.name));
        let upstream = match scenario.upstream {
            Upstream::Nginx => NGINX,
            Upstream::Echo => ECHO,
        };
        let mut args: Vec<String> = vec![
            "--listen".into(),
            addr(WISP).to_string(),
            "--upstream".into(),
            addr(upstream).to_string(),
            "--admin".into(),
            addr(WISP_ADMIN).to_string(),
        ];
        args.extend(scenario.flags.iter().map(|f| f.to_string()));
        if scenario.header_filter {
            args.extend([
                "--plugin".into(),
                header_filter.display().to_string(),
                "--plugin-config".into(),
                FILTER_CONFIG.into(),
            ]);
        }
        if scenario.tls {
            args.extend([
                "--tls-cert".into(),
                pki.server_cert.display().to_string(),
                "--tls-key".into(),
                pki.server_key.display().to_string(),
            ]);
        }
        let before = profiles_in(raw_dir)?.len();
        let mut command = std::process::Command::new(wisp);
        command
            .arg("proxy")
            .args(&args)
            .env("WISP_LOG", "warn")
            // One file per process (%p) and binary (%m).
            .env("LLVM_PROFILE_FILE", raw_dir.join("wisp-%p-%m.profraw"));
        let mut agent = Agent::spawn(command, fresh_dir()?, addr(WISP_ADMIN))?;
        let scheme = if scenario.tls { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{WISP}/");
        for load in scenario.loads {
            let requests = match load {
                Load::Wrk => wrk(&url, 1, 32, SECONDS, &[])?.requests,
                Load::WrkPost => {
                    let script = post_script.display().to_string();
                    wrk(&url, 1, 16, SECONDS, &["-s", &script])?.requests
                }
                Load::H2load => h2load(&url)?,
            };
            println!("  {load}: {requests} requests");
            anyhow::ensure!(
                requests > 0,
                "PGO training `{}` sent no request through wisp; its log:\n{}",
                scenario.name,
                agent.log()
            );
        }
        let status = agent.stop();
        anyhow::ensure!(
            status.is_some_and(|s| s.success()),
            "the instrumented wisp of `{}` did not exit cleanly on SIGTERM ({status:?}); its log:\n{}",
            scenario.name,
            agent.log()
        );
        anyhow::ensure!(
            profiles_in(raw_dir)?.len() > before,
            "the instrumented wisp of `{}` wrote no profile into {}",
            scenario.name,
            raw_dir.display()
        );
    }
    Ok(())
}

/// `h2load` for [`SECONDS`] over 8 connections with 8 streams each; returns
/// the requests that succeeded.
fn h2load(url: &str) -> anyhow::Result<u64> {
    let out = cmd::output(
        std::process::Command::new("h2load")
            .args(["-c", "8", "-m", "8", "-D"])
            .arg(SECONDS.to_string())
            .arg(url),
    )?;
    h2load_succeeded(&out).with_context(|| format!("cannot read h2load's report:\n{out}"))
}

/// The succeeded requests in h2load's report, from its line
/// `requests: 1000 total, 1000 started, 1000 done, 998 succeeded, 2 failed, …`.
fn h2load_succeeded(report: &str) -> Option<u64> {
    report.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("requests:")?;
        rest.split(',')
            .find_map(|part| part.trim().strip_suffix(" succeeded")?.parse().ok())
    })
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Load::Wrk => "wrk GET",
            Load::WrkPost => "wrk POST 4 KiB",
            Load::H2load => "h2load",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::h2load_succeeded;

    #[test]
    fn reads_the_succeeded_requests_from_an_h2load_report() {
        let report = "finished in 5.00s, 31234.40 req/s, 1.10MB/s\n\
                      requests: 156172 total, 156236 started, 156172 done, 156170 succeeded, 2 failed, 0 errored, 0 timeout\n\
                      status codes: 156170 2xx, 0 3xx, 0 4xx, 0 5xx\n";
        assert_eq!(h2load_succeeded(report), Some(156170));
        assert_eq!(h2load_succeeded("h2load: connection refused"), None);
    }
}
