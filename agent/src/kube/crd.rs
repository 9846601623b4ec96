//! The `WasmPlugin` custom resource (`wisp.dev/v1alpha1`), modelled on
//! Istio's `extensions.istio.io/v1alpha1` `WasmPlugin`: which pods a
//! Proxy-Wasm module runs for, where the module comes from, how it is
//! configured and ordered, and a per-node status written by each agent.
//!
//! The CRD YAML under `manifests/crds/` is generated from these types
//! (`cargo xtask manifests`), so the schema and the code cannot drift.
//! xtask compiles this file on its own (it cannot depend on the agent, whose
//! build needs the eBPF object), so it uses nothing else of the agent.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a `WasmPlugin` asks every agent to run.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "wisp.dev",
    version = "v1alpha1",
    kind = "WasmPlugin",
    plural = "wasmplugins",
    singular = "wasmplugin",
    shortname = "wp",
    namespaced,
    status = "WasmPluginStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".spec.phase"}"#,
    printcolumn = r#"{"name":"Priority","type":"integer","jsonPath":".spec.priority"}"#,
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".spec.url"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WasmPluginSpec {
    /// The pods the plugin runs for. Empty: every enrolled pod of the
    /// plugin's namespace.
    #[serde(default)]
    pub selector: WorkloadSelector,
    /// Which requests of the selected pods go through the plugin. Empty:
    /// all of them.
    #[serde(default, rename = "match")]
    pub match_: TrafficMatch,
    /// `HTTP` (default): an HTTP filter; `NETWORK`: a network filter on the
    /// selected pods' TCP pass-through connections (as Istio's `type`).
    #[serde(default, rename = "type")]
    pub type_: PluginType,
    /// The module: `file:///path.wasm`, `https://host/path.wasm` or
    /// `oci://registry/repository:tag` (an image as Istio's `WasmPlugin`
    /// and the Wasm OCI image spec store it).
    pub url: String,
    /// The module's SHA-256 (64 hex digits); a module with another digest
    /// is refused. Required for `https://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The root context in a multi-root module (Envoy's `root_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_name: Option<String>,
    /// Handed to the plugin's `on_configure` (PLUGIN_CONFIGURATION): a
    /// string as it is, or a JSON object serialised as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub plugin_config: Option<serde_json::Value>,
    /// Where in the chain the plugin runs: AUTHN, then AUTHZ, then STATS
    /// plugins, then UNSPECIFIED_PHASE ones (as Istio).
    #[serde(default)]
    pub phase: PluginPhase,
    /// Within a phase, plugins with a higher priority run first; ties are
    /// ordered by namespace and name.
    #[serde(default)]
    pub priority: i32,
    /// What a request gets when the plugin fails.
    #[serde(default)]
    pub failure_policy: FailurePolicySetting,
    /// How plugin instances are shared.
    #[serde(default)]
    pub vm_isolation: VmIsolation,
    /// Limits of each plugin instance.
    #[serde(default)]
    pub limits: PluginResourceLimits,
    /// When set, only these Proxy-Wasm (`env`) and WASI function names
    /// work (Envoy's `capability_restriction_config`); unset: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_capabilities: Option<Vec<String>>,
}

/// Pods by labels, in the plugin's namespace (or, for a plugin in the root
/// namespace, the namespaces listed).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Every label must be present with this value. Empty: all pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Only for a plugin in the agent's root namespace (`wisp-system` by
    /// default): the namespaces whose pods it selects; empty: all enrolled
    /// namespaces. Elsewhere a plugin selects pods of its own namespace only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
}

/// Which requests go through the plugin; each list that is set must match.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrafficMatch {
    /// Destination ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Destination Services, `namespace/name` (every port) or
    /// `namespace/name:port-name`; only for Services whose port has L7
    /// filters, which are the connections the agent sees with their VIP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// Request hosts (`:authority` / `Host`), exact or `*.suffix`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Request path prefixes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// Istio's `PluginPhase`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PluginPhase {
    Authn,
    Authz,
    Stats,
    #[default]
    UnspecifiedPhase,
}

impl PluginPhase {
    /// Position in the chain: lower runs first.
    pub fn rank(self) -> u8 {
        match self {
            PluginPhase::Authn => 0,
            PluginPhase::Authz => 1,
            PluginPhase::Stats => 2,
            PluginPhase::UnspecifiedPhase => 3,
        }
    }
}

/// HTTP or network filter (Istio's `PluginType`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
// The variants are the wire names (UNSPECIFIED_PLUGIN_TYPE as Istio).
#[allow(clippy::enum_variant_names)]
pub enum PluginType {
    /// Istio's unset value: an HTTP filter.
    UnspecifiedPluginType,
    /// Runs on the requests of HTTP connections.
    #[default]
    Http,
    /// Runs on TCP pass-through connections; `match.hosts` and
    /// `match.paths` do not apply.
    Network,
}

/// wisp's failure policies (Istio's `failStrategy`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
// The variants are the wire names (FAIL_*, PER_*).
#[allow(clippy::enum_variant_names)]
pub enum FailurePolicySetting {
    /// 503 (Envoy's default).
    #[default]
    FailClosed,
    /// The plugin is skipped.
    FailOpen,
    /// 503, and the instance is re-created with backoff.
    FailReload,
}

/// The Proxy-Wasm VM isolation modes.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
// The variants are the wire names (FAIL_*, PER_*).
#[allow(clippy::enum_variant_names)]
pub enum VmIsolation {
    /// One instance per worker thread, shared by plugins with the same VM.
    #[default]
    PerWorker,
    /// One instance per worker per plugin.
    PerPlugin,
    /// A fresh instance for every request.
    PerRequest,
}

/// Per-instance limits; unset fields keep the host's defaults (128 MiB,
/// 1 s per callback, unmetered).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PluginResourceLimits {
    /// Linear memory per instance, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub memory_mib: Option<u32>,
    /// Wall-clock time one callback may run, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub callback_deadline_ms: Option<u64>,
    /// Fuel (about one unit per Wasm instruction) per callback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub fuel: Option<u64>,
}

/// One entry per node whose agent runs (or failed to run) the plugin;
/// each agent owns its own entry through server-side apply.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WasmPluginStatus {
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<NodeStatus>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub node: String,
    pub state: PluginState,
    /// Why the plugin failed on this node (empty when loaded).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The `metadata.generation` this entry describes.
    #[serde(default)]
    pub observed_generation: i64,
    /// Pods on this node the plugin runs for.
    #[serde(default)]
    pub workloads: u32,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum PluginState {
    /// Fetched, compiled, instantiated and in the chain of this node.
    #[default]
    Loaded,
    /// Not in effect on this node (or an older version still is): see `reason`.
    Failed,
}

/// Any JSON value: a string or an object (`x-kubernetes-preserve-unknown-fields`).
fn any_value(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "A string, handed to the plugin as it is, or a JSON object, handed to it serialised as JSON.",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// The CRD as YAML, as `cargo xtask manifests` writes it.
pub fn crd_yaml() -> Result<String, String> {
    use kube::CustomResourceExt;
    let yaml = serde_saphyr::to_string(&WasmPlugin::crd()).map_err(|e| e.to_string())?;
    Ok(format!(
        "# Generated from agent/src/kube/crd.rs by `cargo xtask manifests`; do not edit.\n{yaml}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_crd_is_the_generated_one() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../manifests/crds/wasmplugins.wisp.dev.yaml"
        );
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == crd_yaml().unwrap(),
            "{path} is stale: run `cargo xtask manifests`"
        );
    }

    #[test]
    fn status_nodes_is_a_map_list_keyed_by_node() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(WasmPlugin::crd()).unwrap();
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["subresources"]["status"], serde_json::json!({}));
        let nodes =
            &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["nodes"];
        assert_eq!(nodes["x-kubernetes-list-type"], "map");
        assert_eq!(
            nodes["x-kubernetes-list-map-keys"],
            serde_json::json!(["node"])
        );
        let config = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["pluginConfig"];
        assert_eq!(config["x-kubernetes-preserve-unknown-fields"], true);
    }
}
