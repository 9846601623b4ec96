//! Where the build puts what the tests and the demo run: the `wisp` binary
//! and the Proxy-Wasm test filters. `cargo xtask test` and `cargo xtask demo`
//! build them first; a missing one is an error that says how to build it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[error("{what} not found at {path}: run `{fix}` first (cargo xtask test and demo build it)")]
pub struct MissingArtifact {
    pub what: &'static str,
    pub path: PathBuf,
    pub fix: &'static str,
}

/// The cargo target directory of this workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn existing(
    env: &str,
    default: PathBuf,
    what: &'static str,
    fix: &'static str,
) -> Result<PathBuf, MissingArtifact> {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or(default);
    if path.is_file() {
        Ok(path)
    } else {
        Err(MissingArtifact { what, path, fix })
    }
}

/// The agent binary (`WISP_BIN`, default `target/debug/wisp`).
pub fn wisp_bin() -> Result<PathBuf, MissingArtifact> {
    existing(
        "WISP_BIN",
        target_dir().join("debug/wisp"),
        "the wisp agent binary",
        "cargo xtask build",
    )
}

/// The header test filter (`WISP_HEADER_FILTER_WASM`, default the release
/// wasm32-wasip1 build).
pub fn header_filter_wasm() -> Result<PathBuf, MissingArtifact> {
    existing(
        "WISP_HEADER_FILTER_WASM",
        target_dir().join("wasm32-wasip1/release/wisp_header_filter.wasm"),
        "the header test filter",
        "cargo xtask build-filters",
    )
}

/// The echo server binary, built next to the `wisp` binary.
pub fn echo_bin() -> Result<PathBuf, MissingArtifact> {
    existing(
        "WISP_ECHO_BIN",
        target_dir().join("debug/wisp-echo"),
        "the wisp-echo test server",
        "cargo xtask build",
    )
}

/// The conformance test filter (`WISP_CONFORMANCE_FILTER_WASM`, default the
/// release wasm32-wasip1 build).
pub fn conformance_filter_wasm() -> Result<PathBuf, MissingArtifact> {
    existing(
        "WISP_CONFORMANCE_FILTER_WASM",
        target_dir().join("wasm32-wasip1/release/wisp_conformance_filter.wasm"),
        "the conformance test filter",
        "cargo xtask build-filters",
    )
}
