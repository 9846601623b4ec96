//! `cargo xtask manifests [--check]`: writes the CRD YAML under
//! `manifests/crds/` from the Rust types in `agent/src/kube/crd.rs`;
//! `--check` fails when the committed YAML differs from what the types say.

use anyhow::{Context, bail};

// The agent's CRD types, compiled here directly: depending on the agent
// crate would need the eBPF object its build script embeds.
#[allow(dead_code)]
#[path = "../../agent/src/kube/crd.rs"]
mod crd;

/// (path under the workspace, generated contents).
fn generated() -> anyhow::Result<Vec<(&'static str, String)>> {
    Ok(vec![(
        "manifests/crds/wasmplugins.wisp.dev.yaml",
        crd::crd_yaml().map_err(|e| anyhow::anyhow!("serialising the WasmPlugin CRD: {e}"))?,
    )])
}

pub fn run(check: bool) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let mut stale = Vec::new();
    for (path, text) in generated()? {
        let file = root.join(path);
        let current = std::fs::read_to_string(&file).unwrap_or_default();
        if current == text {
            println!("{path}: up to date");
            continue;
        }
        if check {
            stale.push(path);
            continue;
        }
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        println!("{path}: written");
    }
    if !stale.is_empty() {
        bail!(
            "stale generated manifests (the Rust types changed): {}; run `cargo xtask manifests` and commit the result",
            stale.join(", ")
        );
    }
    Ok(())
}
