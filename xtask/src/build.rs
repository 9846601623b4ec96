//! Building the pieces that need more than `cargo build`: the eBPF programs
//! (another target, `core` from source, bpf-linker) and the Proxy-Wasm test
//! filters (wasm32-wasip1).

use anyhow::Context;

/// Builds `ebpf/wisp-ebpf` to `target/ebpf/bpfel-unknown-none/release/wisp-ebpf`,
/// where the agent's build script embeds it from.
///
/// It has its own target directory: this build sets `RUSTC_BOOTSTRAP=1`, and
/// build scripts that watch that variable (proc-macro2's) would otherwise be
/// rebuilt in `target/release` with it, and again without it by the next
/// host release build, recompiling the whole agent each time.
pub fn ebpf() -> anyhow::Result<()> {
    crate::step("building the eBPF programs (bpfel-unknown-none)");
    let linker = crate::setup::which("bpf-linker")
        .context("bpf-linker is missing: run `cargo xtask setup`")?;
    let linker_dir = linker.parent().expect("a file has a parent directory");
    let path = std::env::join_paths(std::iter::once(linker_dir.to_owned()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;
    let rustflags = [
        r#"--cfg=bpf_target_arch="x86_64""#,
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ]
    .join("\x1f");
    crate::run_cmd(
        crate::cargo()
            .args(["build", "--package", "wisp-ebpf", "--release"])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .arg("--target-dir")
            .arg(crate::workspace_root().join("target/ebpf"))
            // Unstable -Z build-std on our stable toolchain, for this build only.
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
            .env("PATH", path),
    )
}

/// Every test filter for wasm32-wasip1; the conformance filter also for
/// wasm32-unknown-unknown (SDK plugins there import no WASI and export
/// `malloc`, a different shape the host must handle too).
pub fn filters() -> anyhow::Result<()> {
    const ALL: [&str; 2] = ["wisp-header-filter", "wisp-conformance-filter"];
    const NO_WASI: [&str; 1] = ["wisp-conformance-filter"];
    for (target, packages) in [
        ("wasm32-wasip1", &ALL[..]),
        ("wasm32-unknown-unknown", &NO_WASI[..]),
    ] {
        crate::step(format!("building the Proxy-Wasm test filters ({target})"));
        let mut command = crate::cargo();
        command.args(["build", "--release", "--target", target]);
        for package in packages {
            command.args(["--package", package]);
        }
        crate::run_cmd(&mut command)?;
    }
    Ok(())
}

/// eBPF, filters, then the agent and the test tools that use them.
pub fn all() -> anyhow::Result<()> {
    ebpf()?;
    filters()?;
    crate::step("building wisp and the test tools");
    crate::run_cmd(crate::cargo().args([
        "build",
        "--package",
        "wisp",
        "--package",
        "wisp-testbed",
        "--bins",
    ]))
}
