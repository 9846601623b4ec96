//! Cluster objects → the agent's [`Config`]: the local pods of enrolled
//! namespaces become `workloads`, the `WasmPlugin`s that select them become
//! `plugins` (with a `match` naming those pods), and Services with their
//! EndpointSlices become the connect-time balanced `services`.
//!
//! Pure functions over snapshots, so the whole mapping is unit-tested
//! without an API server; the controller feeds them its reflector stores.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use serde_saphyr::{Location, Spanned};

use super::crd::{PluginType, WasmPlugin, WasmPluginSpec};
use super::{DISABLED, ENABLED, NAMESPACE_LABEL, PodInfo, PodNetnsResolver};
use crate::config::{Config, Located, PluginLimits, PluginSpec, WorkloadSpec};
use crate::ebpf::services::{BackendSpec, ServiceSpec};
use crate::plugins::{PluginKind, PluginMatch};

/// One snapshot of what the reflectors hold.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub pods: Vec<Arc<Pod>>,
    pub namespaces: Vec<Arc<Namespace>>,
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub plugins: Vec<Arc<WasmPlugin>>,
}

/// A local pod to enroll.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalWorkload {
    /// `namespace/name`.
    pub name: String,
    pub info: PodInfo,
    pub labels: BTreeMap<String, String>,
    pub netns: PathBuf,
}

/// A pod that should be enrolled but could not be, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Skipped {
    pub pod: String,
    pub reason: String,
}

/// A `WasmPlugin` and the local workloads it selects.
#[derive(Clone, Debug)]
pub struct Selected {
    pub plugin: Arc<WasmPlugin>,
    /// `namespace/name` of the plugin.
    pub key: String,
    pub workloads: Vec<String>,
    /// The spec cannot apply here (e.g. a cross-namespace selector outside
    /// the root namespace).
    pub invalid: Option<String>,
}

/// `namespace/name` of any object.
pub fn key_of<K: kube::Resource>(object: &K) -> String {
    format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

fn enrolled_namespaces(state: &ClusterState) -> BTreeSet<String> {
    state
        .namespaces
        .iter()
        .filter(|ns| ns.labels().get(NAMESPACE_LABEL).map(String::as_str) == Some(ENABLED))
        .map(|ns| ns.name_any())
        .collect()
}

/// What the netns resolver gets to know about a pod.
pub fn pod_info(pod: &Pod) -> PodInfo {
    let status = pod.status.as_ref();
    PodInfo {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        namespace: pod.namespace().unwrap_or_default(),
        name: pod.name_any(),
        qos_class: status.and_then(|s| s.qos_class.clone()).unwrap_or_default(),
        container_ids: status
            .and_then(|s| s.container_statuses.as_ref())
            .map(|cs| cs.iter().filter_map(|c| c.container_id.clone()).collect())
            .unwrap_or_default(),
    }
}

/// The pods on `node` in enrolled namespaces, not opted out, running, not
/// on the host network, with their network namespaces; sorted by name.
pub fn local_workloads(
    state: &ClusterState,
    node: &str,
    resolver: &dyn PodNetnsResolver,
) -> (Vec<LocalWorkload>, Vec<Skipped>) {
    let enrolled = enrolled_namespaces(state);
    let mut workloads = Vec::new();
    let mut skipped = Vec::new();
    for pod in &state.pods {
        let namespace = pod.namespace().unwrap_or_default();
        let spec = pod.spec.as_ref();
        let on_node = spec.and_then(|s| s.node_name.as_deref()) == Some(node);
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        let opted_out =
            pod.annotations().get(NAMESPACE_LABEL).map(String::as_str) == Some(DISABLED);
        if !on_node || host_network || !running || opted_out || !enrolled.contains(&namespace) {
            continue;
        }
        let info = pod_info(pod);
        let name = format!("{namespace}/{}", info.name);
        match resolver.netns_of(&info) {
            Ok(netns) => workloads.push(LocalWorkload {
                name,
                labels: pod.labels().clone(),
                info,
                netns,
            }),
            Err(reason) => skipped.push(Skipped { pod: name, reason }),
        }
    }
    workloads.sort_by(|a, b| a.name.cmp(&b.name));
    (workloads, skipped)
}

/// For each `WasmPlugin`, the local workloads it selects; plugins that
/// select none on this node are left out. In chain order: phase, then
/// priority (higher first), then `namespace/name`.
pub fn select_plugins(
    state: &ClusterState,
    workloads: &[LocalWorkload],
    root_namespace: &str,
) -> Vec<Selected> {
    let mut selected: Vec<Selected> = state
        .plugins
        .iter()
        .filter_map(|plugin| {
            let namespace = plugin.namespace().unwrap_or_default();
            let selector = &plugin.spec.selector;
            let mut invalid = None;
            let in_scope = |pod_ns: &str| {
                if namespace == root_namespace {
                    selector.namespaces.is_empty() || selector.namespaces.iter().any(|n| n == pod_ns)
                } else {
                    pod_ns == namespace
                }
            };
            if namespace != root_namespace && !selector.namespaces.is_empty() {
                invalid = Some(format!(
                    "selector.namespaces is only allowed in the root namespace {root_namespace:?}; this plugin selects pods of {namespace:?} only"
                ));
            }
            let names: Vec<String> = workloads
                .iter()
                .filter(|w| in_scope(&w.info.namespace))
                .filter(|w| {
                    selector
                        .match_labels
                        .iter()
                        .all(|(k, v)| w.labels.get(k) == Some(v))
                })
                .map(|w| w.name.clone())
                .collect();
            // A mistake in one plugin's match is that plugin's status, not
            // a reason to refuse the node's whole configuration.
            if invalid.is_none()
                && let Err((field, message)) =
                    traffic_match(&plugin.spec, &names).check(plugin_kind(&plugin.spec))
            {
                invalid = Some(format!("{field}: {message}"));
            }
            (!names.is_empty()).then(|| Selected {
                key: key_of(plugin.as_ref()),
                plugin: plugin.clone(),
                workloads: names,
                invalid,
            })
        })
        .collect();
    selected.sort_by(|a, b| {
        let (pa, pb) = (&a.plugin.spec, &b.plugin.spec);
        pa.phase
            .rank()
            .cmp(&pb.phase.rank())
            .then(pb.priority.cmp(&pa.priority))
            .then(a.key.cmp(&b.key))
    });
    selected
}

/// PLUGIN_CONFIGURATION from `pluginConfig`: a string as it is, anything
/// else as JSON.
pub fn plugin_configuration(value: Option<&serde_json::Value>) -> String {
    match value {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

fn non_empty<T: Clone>(items: &[T]) -> Option<Vec<T>> {
    (!items.is_empty()).then(|| items.to_vec())
}

fn spanned<T>(value: T) -> Spanned<T> {
    Spanned::new(value, Location::UNKNOWN, Location::UNKNOWN)
}

fn plugin_kind(spec: &WasmPluginSpec) -> PluginKind {
    match spec.type_ {
        PluginType::Network => PluginKind::Network,
        PluginType::Http | PluginType::UnspecifiedPluginType => PluginKind::Http,
    }
}

/// The plugin's `match` for the selected `workloads`. Empty lists of the
/// CRD mean "any"; the selected workloads are never empty (a plugin that
/// selects no local pod is left out).
fn traffic_match(spec: &WasmPluginSpec, workloads: &[String]) -> PluginMatch {
    PluginMatch {
        ports: non_empty(&spec.match_.ports),
        services: non_empty(&spec.match_.services),
        workloads: non_empty(workloads),
        hosts: non_empty(&spec.match_.hosts),
        paths: non_empty(&spec.match_.paths),
        ..Default::default()
    }
}

/// The `plugins[]` entry of a selected plugin whose module is at `module`.
pub fn plugin_spec(selected: &Selected, module: PathBuf) -> PluginSpec {
    let spec = &selected.plugin.spec;
    PluginSpec {
        name: selected.key.clone(),
        module: spanned(module.display().to_string()),
        sha256: None,
        root_id: spec.plugin_name.clone().unwrap_or_default(),
        vm_id: String::new(),
        configuration: plugin_configuration(spec.plugin_config.as_ref()),
        vm_configuration: String::new(),
        failure_policy: spec.failure_policy.into(),
        kind: plugin_kind(spec),
        matcher: Some(spanned(traffic_match(spec, &selected.workloads))),
        isolation: spec.vm_isolation.into(),
        limits: PluginLimits {
            memory_mib: spec.limits.memory_mib,
            callback_deadline_ms: spec.limits.callback_deadline_ms,
            fuel: spec.limits.fuel,
        },
        allowed_capabilities: spec.allowed_capabilities.clone(),
    }
}

/// `services[]`: one entry per TCP port of each ClusterIP Service with
/// ready endpoints, named `namespace/service:port`. Backends are the ready
/// addresses of the Service's EndpointSlices (of the VIP's IP family) on
/// the slice port with the service port's name.
pub fn services(state: &ClusterState) -> Vec<ServiceSpec> {
    let max = wisp_common::MAX_BACKENDS_PER_SERVICE as usize;
    let mut out = Vec::new();
    for service in &state.services {
        let namespace = service.namespace().unwrap_or_default();
        let name = service.name_any();
        let Some(spec) = service.spec.as_ref() else {
            continue;
        };
        let Some(vip) = spec
            .cluster_ip
            .as_deref()
            .and_then(|ip| ip.parse::<IpAddr>().ok())
        else {
            // Headless ("None") or not yet allocated.
            continue;
        };
        let slices: Vec<&EndpointSlice> = state
            .endpoint_slices
            .iter()
            .map(Arc::as_ref)
            .filter(|s| {
                s.namespace().as_deref() == Some(namespace.as_str())
                    && s.labels().get("kubernetes.io/service-name") == Some(&name)
            })
            .collect();
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let Ok(service_port) = u16::try_from(port.port) else {
                continue;
            };
            let mut backends = BTreeSet::new();
            for slice in &slices {
                let slice_port = slice.ports.iter().flatten().find(|p| {
                    p.name.as_deref().unwrap_or("") == port.name.as_deref().unwrap_or("")
                        && p.protocol.as_deref().unwrap_or("TCP") == "TCP"
                });
                let Some(target) = slice_port
                    .and_then(|p| p.port)
                    .and_then(|p| u16::try_from(p).ok())
                else {
                    continue;
                };
                for endpoint in &slice.endpoints {
                    // Ready unless the condition says otherwise (the API's rule).
                    let ready = endpoint
                        .conditions
                        .as_ref()
                        .and_then(|c| c.ready)
                        .unwrap_or(true);
                    if !ready {
                        continue;
                    }
                    for address in &endpoint.addresses {
                        if let Ok(ip) = address.parse::<IpAddr>()
                            && ip.is_ipv4() == vip.is_ipv4()
                        {
                            backends.insert(std::net::SocketAddr::new(ip, target));
                        }
                    }
                }
            }
            if backends.is_empty() {
                continue;
            }
            let port_name = port
                .name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| service_port.to_string());
            out.push(ServiceSpec {
                name: format!("{namespace}/{name}:{port_name}"),
                vip: Located {
                    value: vip,
                    line: 0,
                },
                port: service_port,
                backends: backends
                    .into_iter()
                    .take(max)
                    .map(|address| BackendSpec {
                        address: Located {
                            value: address,
                            line: 0,
                        },
                        weight: 1,
                    })
                    .collect(),
                l7: None,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The agent config for this state: `base` (the file's listeners, admin,
/// eBPF settings and any static entries) plus the workloads, plugins and
/// services from the cluster. `plugins` are the selected plugins with the
/// local path of their module, in chain order.
pub fn build_config(
    base: &Config,
    workloads: &[LocalWorkload],
    plugins: &[(Selected, PathBuf)],
    services: Vec<ServiceSpec>,
) -> Config {
    let mut config = base.clone();
    config
        .workloads
        .extend(workloads.iter().map(|w| WorkloadSpec {
            name: w.name.clone(),
            netns: spanned(w.netns.clone()),
        }));
    config.plugins.extend(
        plugins
            .iter()
            .map(|(selected, module)| plugin_spec(selected, module.clone())),
    );
    config.services.extend(services);
    config
}

impl From<super::crd::FailurePolicySetting> for wisp_wasm_host::FailurePolicy {
    fn from(policy: super::crd::FailurePolicySetting) -> Self {
        match policy {
            super::crd::FailurePolicySetting::FailClosed => {
                wisp_wasm_host::FailurePolicy::FailClosed
            }
            super::crd::FailurePolicySetting::FailOpen => wisp_wasm_host::FailurePolicy::FailOpen,
            super::crd::FailurePolicySetting::FailReload => {
                wisp_wasm_host::FailurePolicy::FailReload
            }
        }
    }
}

impl From<super::crd::VmIsolation> for wisp_wasm_host::IsolationMode {
    fn from(mode: super::crd::VmIsolation) -> Self {
        match mode {
            super::crd::VmIsolation::PerWorker => wisp_wasm_host::IsolationMode::PerWorker,
            super::crd::VmIsolation::PerPlugin => wisp_wasm_host::IsolationMode::PerPlugin,
            super::crd::VmIsolation::PerRequest => wisp_wasm_host::IsolationMode::PerRequest,
        }
    }
}

#[cfg(test)]
#[path = "translate_tests.rs"]
mod tests;
