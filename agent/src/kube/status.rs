//! One node's entry in a `WasmPlugin`'s status, written with server-side
//! apply under the field manager `wisp-agent/<node>`: `status.nodes` is a
//! map list keyed by `node`, so each agent owns exactly its own entry, and
//! applying an empty list removes it without touching the others'.

use kube::api::{Api, Patch, PatchParams};

use super::crd::{NodeStatus, PluginState, WasmPlugin, WasmPluginStatus};

/// The field manager of the agent on `node`.
pub fn field_manager(node: &str) -> String {
    format!("wisp-agent/{node}")
}

/// The outcome for one plugin on this node; `None` removes the entry.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeOutcome {
    pub namespace: String,
    pub name: String,
    pub entry: Option<NodeStatus>,
}

impl NodeOutcome {
    pub fn loaded(node: &str, generation: i64, workloads: usize) -> NodeStatus {
        NodeStatus {
            node: node.to_owned(),
            state: PluginState::Loaded,
            reason: String::new(),
            observed_generation: generation,
            workloads: u32::try_from(workloads).unwrap_or(u32::MAX),
        }
    }

    pub fn failed(node: &str, generation: i64, workloads: usize, reason: String) -> NodeStatus {
        NodeStatus {
            state: PluginState::Failed,
            reason,
            ..NodeOutcome::loaded(node, generation, workloads)
        }
    }
}

/// The apply patch body for `outcome`.
pub fn patch_body(outcome: &NodeOutcome) -> serde_json::Value {
    let status = WasmPluginStatus {
        nodes: outcome.entry.iter().cloned().collect(),
    };
    serde_json::json!({
        "apiVersion": "wisp.dev/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": { "name": outcome.name, "namespace": outcome.namespace },
        "status": status,
    })
}

/// Writes `outcome` to the status subresource.
pub async fn apply(
    client: &kube::Client,
    node: &str,
    outcome: &NodeOutcome,
) -> Result<(), kube::Error> {
    let api: Api<WasmPlugin> = Api::namespaced(client.clone(), &outcome.namespace);
    let params = PatchParams::apply(&field_manager(node)).force();
    api.patch_status(&outcome.name, &params, &Patch::Apply(patch_body(outcome)))
        .await?;
    Ok(())
}
