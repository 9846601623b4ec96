//! `cargo xtask bench wasm`: the Proxy-Wasm host's criterion benchmarks
//! (`wasm-host/benches/wasm.rs`): per-request cost of the header filter on a
//! shared instance and with an instance per request, instantiation per
//! isolation mode, and linear memory per idle instance. Results go to stdout
//! (and criterion's reports under `target/criterion`).

/// Builds the test filters the benchmarks load, then runs the benchmarks.
pub fn wasm() -> anyhow::Result<()> {
    crate::build::filters()?;
    crate::step("benchmarking the Proxy-Wasm host (criterion)");
    crate::run_cmd(crate::cargo().args(["bench", "--package", "wisp-wasm-host", "--bench", "wasm"]))
}
