//! `cargo xtask test`: everything CI checks, in the order that fails fastest:
//! formatting, lints, the Kubernetes manifests (offline), then unit and
//! integration tests (the integration tests build pods from network
//! namespaces and load eBPF programs, so they need root), then a check that
//! nothing of ours was left on the machine.

use anyhow::bail;

use crate::{build, cargo, run_cmd, setup, step};

pub fn run() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "cargo xtask test needs root: the integration tests create network namespaces, veths and cgroups \
             and attach eBPF programs. Run it as root (CI does); it never skips those tests."
        );
    }
    setup::run(setup::Mode::Report)?;
    build::all()?;

    step("cargo fmt --check");
    run_cmd(cargo().args(["fmt", "--all", "--", "--check"]))?;

    step("generated manifests are up to date");
    crate::manifests::run(true)?;

    step("cargo clippy (host crates, all targets)");
    run_cmd(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;

    step("manifests: offline validation (kubernetes-validate; CRD schemas for custom resources)");
    crate::manifests_check::run()?;

    step("unit and integration tests");
    run_cmd(cargo().args(["test", "--", "--color", "always"]))?;

    step("comparison smoke run: 2 pods, every mode, a few seconds each");
    let out = crate::workspace_root().join("target/compare-smoke");
    let _ = std::fs::remove_dir_all(&out);
    crate::compare::run(crate::compare::Options {
        pods: vec![2],
        seconds: 2,
        plugin: None,
        plugin_config: r#"{"header_value": "smoke"}"#.into(),
        out: out.clone(),
        connections: 1,
        release: false,
    })?;
    let missing = crate::compare::missing_outputs(&out);
    if !missing.is_empty() {
        bail!("the comparison did not write {}", missing.join(", "));
    }

    step("checking that nothing of ours was left behind");
    let leftovers = wisp_testbed::leftovers::find(None);
    if !leftovers.is_empty() {
        bail!("the tests left these behind:\n  {}", leftovers.join("\n  "));
    }
    println!("clean: no wisp network namespaces, interfaces, cgroups or BPF programs remain");
    println!("\nall checks passed");
    Ok(())
}
