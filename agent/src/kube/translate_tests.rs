use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::kube::PodInfo;

/// Netns of a pod: `/netns/<uid>`, or an error for uid "missing".
struct FakeNetns;

impl PodNetnsResolver for FakeNetns {
    fn netns_of(&self, pod: &PodInfo) -> Result<PathBuf, String> {
        if pod.uid == "missing" {
            return Err("no processes yet".into());
        }
        Ok(Path::new("/netns").join(&pod.uid))
    }
}

fn obj<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Arc<T> {
    Arc::new(serde_json::from_value(value).unwrap())
}

fn namespace(name: &str, enrolled: bool) -> Arc<Namespace> {
    let labels = if enrolled {
        json!({"wisp.dev/dataplane": "enabled"})
    } else {
        json!({})
    };
    obj(json!({"metadata": {"name": name, "labels": labels}}))
}

fn pod(
    ns: &str,
    name: &str,
    uid: &str,
    node: &str,
    labels: serde_json::Value,
) -> serde_json::Value {
    json!({
        "metadata": {"namespace": ns, "name": name, "uid": uid, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "app"}]},
        "status": {"phase": "Running", "qosClass": "Burstable",
                   "containerStatuses": [{"name": "app", "containerID": format!("containerd://{uid}"),
                                          "image": "x", "imageID": "", "ready": true, "restartCount": 0}]}
    })
}

fn plugin(ns: &str, name: &str, spec: serde_json::Value) -> Arc<WasmPlugin> {
    obj(json!({
        "apiVersion": "wisp.dev/v1alpha1", "kind": "WasmPlugin",
        "metadata": {"namespace": ns, "name": name, "generation": 3},
        "spec": spec,
    }))
}

fn base() -> Config {
    serde_saphyr::from_str("outbound:\n  listen: 10.213.80.1:19501\n").unwrap()
}

fn state() -> ClusterState {
    let mut opted_out = pod("shop", "legacy", "u4", "k1", json!({"app": "web"}));
    opted_out["metadata"]["annotations"] = json!({"wisp.dev/dataplane": "disabled"});
    let mut host_net = pod("shop", "agent", "u5", "k1", json!({}));
    host_net["spec"]["hostNetwork"] = json!(true);
    let mut pending = pod("shop", "starting", "u6", "k1", json!({"app": "web"}));
    pending["status"]["phase"] = json!("Pending");
    ClusterState {
        namespaces: vec![namespace("shop", true), namespace("plain", false)],
        pods: vec![
            obj(pod("shop", "web-1", "u1", "k1", json!({"app": "web"}))),
            obj(pod("shop", "db-0", "u2", "k1", json!({"app": "db"}))),
            obj(pod("plain", "web-9", "u3", "k1", json!({"app": "web"}))),
            obj(opted_out),
            obj(host_net),
            obj(pending),
            obj(pod("shop", "web-2", "u7", "k2", json!({"app": "web"}))),
            obj(pod("shop", "web-3", "missing", "k1", json!({"app": "web"}))),
        ],
        ..Default::default()
    }
}

#[test]
fn only_local_running_pods_of_enrolled_namespaces_are_workloads() {
    let (workloads, skipped) = local_workloads(&state(), "k1", &FakeNetns);
    let names: Vec<&str> = workloads.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["shop/db-0", "shop/web-1"]);
    assert_eq!(workloads[1].netns, Path::new("/netns/u1"));
    assert_eq!(workloads[1].info.qos_class, "Burstable");
    assert_eq!(workloads[1].info.container_ids, ["containerd://u1"]);
    assert_eq!(
        skipped,
        [Skipped {
            pod: "shop/web-3".into(),
            reason: "no processes yet".into()
        }]
    );
}

#[test]
fn plugins_select_by_labels_and_are_ordered_by_phase_then_priority() {
    let mut state = state();
    state.plugins = vec![
        plugin(
            "shop",
            "stats",
            json!({"url": "file:///s.wasm", "phase": "STATS", "priority": 100}),
        ),
        plugin(
            "shop",
            "authz-low",
            json!({"url": "file:///a.wasm", "phase": "AUTHZ", "priority": 1,
                                          "selector": {"matchLabels": {"app": "web"}}}),
        ),
        plugin(
            "shop",
            "authz-high",
            json!({"url": "file:///a.wasm", "phase": "AUTHZ", "priority": 5}),
        ),
        plugin(
            "shop",
            "nothing-here",
            json!({"url": "file:///n.wasm",
                                             "selector": {"matchLabels": {"app": "cache"}}}),
        ),
        plugin("plain", "other-ns", json!({"url": "file:///o.wasm"})),
        plugin(
            "shop",
            "authn",
            json!({"url": "file:///n.wasm", "phase": "AUTHN", "priority": -4}),
        ),
    ];
    let (workloads, _) = local_workloads(&state, "k1", &FakeNetns);
    let selected = select_plugins(&state, &workloads, "wisp-system");
    let order: Vec<(&str, Vec<String>)> = selected
        .iter()
        .map(|s| (s.key.as_str(), s.workloads.clone()))
        .collect();
    let both = vec!["shop/db-0".to_string(), "shop/web-1".to_string()];
    assert_eq!(
        order,
        [
            ("shop/authn", both.clone()),
            ("shop/authz-high", both.clone()),
            ("shop/authz-low", vec!["shop/web-1".to_string()]),
            ("shop/stats", both),
        ]
    );
}

#[test]
fn only_the_root_namespace_selects_across_namespaces() {
    let mut state = state();
    state.namespaces.push(namespace("wisp-system", false));
    state.plugins = vec![
        plugin(
            "wisp-system",
            "mesh-wide",
            json!({"url": "file:///m.wasm", "selector": {"namespaces": ["shop"]}}),
        ),
        plugin(
            "shop",
            "sneaky",
            json!({"url": "file:///m.wasm", "selector": {"namespaces": ["plain"]}}),
        ),
    ];
    let (workloads, _) = local_workloads(&state, "k1", &FakeNetns);
    let selected = select_plugins(&state, &workloads, "wisp-system");
    assert_eq!(selected.len(), 2);
    let mesh = selected
        .iter()
        .find(|s| s.key == "wisp-system/mesh-wide")
        .unwrap();
    assert_eq!(mesh.workloads, ["shop/db-0", "shop/web-1"]);
    assert!(mesh.invalid.is_none());
    let sneaky = selected.iter().find(|s| s.key == "shop/sneaky").unwrap();
    assert!(
        sneaky
            .invalid
            .as_deref()
            .unwrap()
            .contains("only allowed in the root namespace"),
        "{:?}",
        sneaky.invalid
    );
}

#[test]
fn a_plugin_becomes_a_plugins_entry_with_its_match() {
    let mut state = state();
    state.plugins = vec![plugin(
        "shop",
        "headers",
        json!({
            "url": "file:///h.wasm", "sha256": "ab", "pluginName": "root",
            "pluginConfig": {"header_value": "k8s"},
            "selector": {"matchLabels": {"app": "web"}},
            "match": {"ports": [80, 8080], "services": ["shop/cart"], "hosts": ["*.shop.svc"], "paths": ["/api"]},
            "failurePolicy": "FAIL_OPEN", "vmIsolation": "PER_PLUGIN",
            "limits": {"memoryMib": 16, "callbackDeadlineMs": 50},
            "allowedCapabilities": ["proxy_log"],
        }),
    )];
    let (workloads, _) = local_workloads(&state, "k1", &FakeNetns);
    let selected = select_plugins(&state, &workloads, "wisp-system");
    let chain: Vec<_> = selected
        .into_iter()
        .map(|s| (s, PathBuf::from("/cache/ab.wasm")))
        .collect();
    let config = build_config(&base(), &workloads, &chain, services(&state));
    let names: Vec<(&str, &Path)> = config
        .workloads
        .iter()
        .map(|w| (w.name.as_str(), w.netns.value.as_path()))
        .collect();
    assert_eq!(
        names,
        [
            ("shop/db-0", Path::new("/netns/u2")),
            ("shop/web-1", Path::new("/netns/u1"))
        ]
    );
    let p = &config.plugins[0];
    assert_eq!(p.name, "shop/headers");
    assert_eq!(Path::new(&p.module.value), Path::new("/cache/ab.wasm"));
    assert_eq!(p.root_id, "root");
    assert_eq!(p.configuration, r#"{"header_value":"k8s"}"#);
    assert_eq!(p.failure_policy, wisp_wasm_host::FailurePolicy::FailOpen);
    assert_eq!(p.isolation, wisp_wasm_host::IsolationMode::PerPlugin);
    assert_eq!(p.limits.memory_mib, Some(16));
    assert_eq!(p.limits.callback_deadline_ms, Some(50));
    assert_eq!(
        p.allowed_capabilities.as_deref(),
        Some(&["proxy_log".to_string()][..])
    );
    assert_eq!(
        p.matcher.as_ref().map(|m| m.value.clone()),
        Some(PluginMatch {
            ports: Some(vec![80, 8080]),
            services: Some(vec!["shop/cart".into()]),
            workloads: Some(vec!["shop/web-1".into()]),
            hosts: Some(vec!["*.shop.svc".into()]),
            paths: Some(vec!["/api".into()]),
            ..Default::default()
        })
    );
    // The file's listener stays.
    assert_eq!(
        config.outbound.listen.value.to_string(),
        "10.213.80.1:19501"
    );
}

#[test]
fn the_plugin_type_picks_http_or_network_filter() {
    use crate::plugins::PluginKind;

    let mut state = state();
    state.plugins = vec![
        plugin(
            "shop",
            "a-tcp",
            json!({"url": "file:///t.wasm", "type": "NETWORK"}),
        ),
        plugin(
            "shop",
            "b-http",
            json!({"url": "file:///h.wasm", "type": "HTTP"}),
        ),
        plugin("shop", "c-unset", json!({"url": "file:///u.wasm"})),
    ];
    let (workloads, _) = local_workloads(&state, "k1", &FakeNetns);
    let chain: Vec<_> = select_plugins(&state, &workloads, "wisp-system")
        .into_iter()
        .map(|s| (s, PathBuf::from("/cache/x.wasm")))
        .collect();
    let config = build_config(&base(), &workloads, &chain, services(&state));
    let kinds: Vec<(&str, PluginKind)> = config
        .plugins
        .iter()
        .map(|p| (p.name.as_str(), p.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            ("shop/a-tcp", PluginKind::Network),
            ("shop/b-http", PluginKind::Http),
            ("shop/c-unset", PluginKind::Http)
        ]
    );

    // A network filter cannot match on paths: that plugin is invalid (its
    // status says why), the others are not.
    state.plugins.push(plugin(
        "shop",
        "d-bad",
        json!({"url": "file:///d.wasm", "type": "NETWORK", "match": {"paths": ["/x"]}}),
    ));
    let selected = select_plugins(&state, &workloads, "wisp-system");
    let invalid: Vec<(&str, Option<&str>)> = selected
        .iter()
        .map(|s| (s.key.as_str(), s.invalid.as_deref()))
        .collect();
    assert_eq!(invalid[..3].iter().filter(|(_, i)| i.is_some()).count(), 0);
    assert_eq!(invalid[3].0, "shop/d-bad");
    assert!(
        invalid[3]
            .1
            .is_some_and(|reason| reason.starts_with("match.paths: ")),
        "{invalid:?}"
    );
}

#[test]
fn string_plugin_config_is_passed_as_it_is() {
    assert_eq!(plugin_configuration(Some(&json!("a: b"))), "a: b");
    assert_eq!(plugin_configuration(None), "");
    assert_eq!(
        plugin_configuration(Some(&json!({"k": [1]}))),
        r#"{"k":[1]}"#
    );
}

#[test]
fn services_come_from_cluster_ips_and_ready_endpoints() {
    let state = ClusterState {
        services: vec![
            obj(json!({"metadata": {"namespace": "shop", "name": "db"},
                       "spec": {"clusterIP": "10.96.0.20", "ports": [
                           {"name": "pg", "port": 5432, "protocol": "TCP"},
                           {"name": "dns", "port": 53, "protocol": "UDP"}]}})),
            obj(
                json!({"metadata": {"namespace": "shop", "name": "headless"},
                       "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
            ),
            obj(json!({"metadata": {"namespace": "shop", "name": "empty"},
                       "spec": {"clusterIP": "10.96.0.21", "ports": [{"port": 80}]}})),
        ],
        endpoint_slices: vec![
            obj(json!({"metadata": {"namespace": "shop", "name": "db-abc",
                                    "labels": {"kubernetes.io/service-name": "db"}},
                       "addressType": "IPv4",
                       "ports": [{"name": "pg", "port": 15432, "protocol": "TCP"}],
                       "endpoints": [
                           {"addresses": ["10.213.81.7"], "conditions": {"ready": true}},
                           {"addresses": ["10.213.81.8"]},
                           {"addresses": ["10.213.81.9"], "conditions": {"ready": false}}]})),
            obj(json!({"metadata": {"namespace": "other", "name": "db-x",
                                    "labels": {"kubernetes.io/service-name": "db"}},
                       "addressType": "IPv4",
                       "ports": [{"name": "pg", "port": 1, "protocol": "TCP"}],
                       "endpoints": [{"addresses": ["10.213.81.66"]}]})),
        ],
        ..Default::default()
    };
    let services = services(&state);
    assert_eq!(services.len(), 1, "{services:?}");
    let db = &services[0];
    assert_eq!(db.name, "shop/db:pg");
    assert_eq!(db.vip.value.to_string(), "10.96.0.20");
    assert_eq!(db.port, 5432);
    let backends: Vec<String> = db
        .backends
        .iter()
        .map(|b| b.address.value.to_string())
        .collect();
    assert_eq!(backends, ["10.213.81.7:15432", "10.213.81.8:15432"]);
}
