//! Offline validation of `manifests/` for `cargo xtask test`: built-in kinds
//! with kubernetes-validate (PyPI, strict) against the Kubernetes schemas it
//! ships, custom resources (the `WasmPlugin` examples) against the schema of
//! their CRD under `manifests/crds/`, since kubernetes-validate cannot. The
//! checks themselves are in `validate_manifests.py`, run with the tools
//! venv's Python that `cargo xtask setup` fills.

use std::process::Command;

use anyhow::Context;

pub fn run() -> anyhow::Result<()> {
    let python = crate::setup::envoy_venv().join("bin/python");
    anyhow::ensure!(
        python.is_file(),
        "{} is missing: run `cargo xtask setup` (it installs kubernetes-validate there)",
        python.display()
    );
    let root = crate::workspace_root();
    crate::run_cmd(
        Command::new(&python)
            .arg(root.join("xtask/src/validate_manifests.py"))
            .arg(root.join("manifests")),
    )
    .context(
        "the manifests under manifests/ are not valid Kubernetes objects (see the ERROR lines)",
    )
}
