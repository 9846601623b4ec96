//! Building the pieces that need more than `cargo build`: the eBPF programs
//! (another target, `core` from source, bpf-linker) and the Proxy-Wasm test
//! filters (wasm32-wasip1).

use anyhow::Context;

/// Builds `ebpf/wisp-ebpf` to `target/bpfel-unknown-none/release/wisp-ebpf`,
/// where the agent's build script embeds it from.
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
            // Unstable -Z build-std on our stable toolchain, for this build only.
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
            .env("PATH", path),
    )
}

pub fn filters() -> anyhow::Result<()> {
    crate::step("building the Proxy-Wasm test filters (wasm32-wasip1)");
    crate::run_cmd(crate::cargo().args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip1",
        "--package",
        "wisp-header-filter",
    ]))
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
