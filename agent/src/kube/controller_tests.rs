//! The controller against a mocked API server (tower-test): each request it
//! makes is asserted, the lists it gets back drive one reconcile, and the
//! status patch it writes is checked byte for byte as JSON.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::json;

use super::*;
use crate::kube::{FileModuleResolver, PodInfo, PodNetnsResolver};

struct FakeNetns;

impl PodNetnsResolver for FakeNetns {
    fn netns_of(&self, pod: &PodInfo) -> Result<PathBuf, String> {
        Ok(Path::new("/netns").join(&pod.uid))
    }
}

/// Records what it is asked to apply; fails the plugin named `bad`.
#[derive(Clone, Default)]
struct Recorder {
    applied: Arc<Mutex<Vec<Config>>>,
}

impl ConfigSink for Recorder {
    fn check_plugin(&mut self, plugin: &PluginSpec) -> Result<(), String> {
        if plugin.name.ends_with("/bad") {
            return Err("canary instance failed: trap in _start".into());
        }
        Ok(())
    }
    fn apply(&mut self, config: Config) -> Result<(), String> {
        self.applied.lock().unwrap().push(config);
        Ok(())
    }
}

fn list(kind: &str, api_version: &str, items: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": api_version, "kind": format!("{kind}List"),
           "metadata": {"resourceVersion": "7"}, "items": items})
}

fn reply(value: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(value).unwrap()))
        .unwrap()
}

#[derive(Debug)]
struct Seen {
    method: Method,
    path: String,
    query: String,
    content_type: String,
    body: Option<serde_json::Value>,
}

#[tokio::test]
async fn lists_and_watches_this_node_and_applies_status_per_node() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("headers.wasm");
    std::fs::write(&module, b"\0asm\x01\0\0\0").unwrap();
    let url = format!("file://{}", module.display());
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let base: Config = serde_saphyr::from_str("outbound:\n  listen: 10.213.80.1:19502\n").unwrap();
    let settings = KubernetesConfig {
        module_dir: dir.path().join("modules"),
        ..Default::default()
    };
    let controller = Controller {
        client,
        node: "k1".into(),
        base,
        settings,
        modules: Arc::new(FileModuleResolver),
        netns: Arc::new(FakeNetns),
    };
    let recorder = Recorder::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(controller.run(recorder.clone(), stop_rx));

    let pods = list(
        "Pod",
        "v1",
        json!([{
        "metadata": {"namespace": "shop", "name": "web-1", "uid": "u1", "labels": {"app": "web"}},
        "spec": {"nodeName": "k1", "containers": [{"name": "app"}]},
        "status": {"phase": "Running"}}]),
    );
    let namespaces = list(
        "Namespace",
        "v1",
        json!([
        {"metadata": {"name": "shop", "labels": {"wisp.dev/dataplane": "enabled"}}}]),
    );
    let services = list("Service", "v1", json!([]));
    let slices = list("EndpointSlice", "discovery.k8s.io/v1", json!([]));
    let plugin = |name: &str| {
        json!({
        "apiVersion": "wisp.dev/v1alpha1", "kind": "WasmPlugin",
        "metadata": {"namespace": "shop", "name": name, "generation": 2},
        "spec": {"url": url, "selector": {"matchLabels": {"app": "web"}}}})
    };
    let plugins = list(
        "WasmPlugin",
        "wisp.dev/v1alpha1",
        json!([plugin("headers"), plugin("bad")]),
    );

    let mut seen: Vec<Seen> = Vec::new();
    // Watches are left hanging, as an API server holds them open.
    let mut watches = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    // Until both statuses are written and every kind's watch is open (the
    // reflectors start their watches independently of the status writes).
    let watched_kinds = |seen: &[Seen]| {
        let mut paths: Vec<&str> = seen
            .iter()
            .filter(|s| s.query.contains("watch=true"))
            .map(|s| s.path.as_str())
            .collect();
        paths.sort();
        paths.dedup();
        paths.len()
    };
    while seen.iter().filter(|s| s.method == Method::PATCH).count() < 2 || watched_kinds(&seen) < 5
    {
        let next = tokio::time::timeout_at(deadline, handle.next_request()).await;
        let (request, respond) = next
            .expect("the controller stopped making requests before writing both statuses and watching every kind")
            .expect("the client went away");
        let (parts, body) = request.into_parts();
        let bytes = http_body_util::BodyExt::collect(body)
            .await
            .unwrap()
            .to_bytes();
        let entry = Seen {
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or("").to_owned(),
            content_type: parts
                .headers
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default(),
            body: serde_json::from_slice(&bytes).ok(),
        };
        if entry.query.contains("watch=true") {
            watches.push(respond);
        } else if entry.method == Method::GET {
            let answer = match entry.path.as_str() {
                "/api/v1/pods" => &pods,
                "/api/v1/namespaces" => &namespaces,
                "/api/v1/services" => &services,
                "/apis/discovery.k8s.io/v1/endpointslices" => &slices,
                "/apis/wisp.dev/v1alpha1/wasmplugins" => &plugins,
                other => panic!("unexpected GET {other}"),
            };
            respond.send_response(reply(answer));
        } else {
            let name = entry.path.rsplit('/').nth(1).unwrap().to_owned();
            respond.send_response(reply(&plugin(&name)));
        }
        seen.push(entry);
    }
    stop_tx.send(true).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .expect("the controller did not stop on shutdown")
        .unwrap();

    // One list per kind; the pod list (and watch) only for this node.
    let lists: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.method == Method::GET && !s.query.contains("watch=true"))
        .collect();
    let mut paths: Vec<&str> = lists.iter().map(|s| s.path.as_str()).collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/api/v1/namespaces",
            "/api/v1/pods",
            "/api/v1/services",
            "/apis/discovery.k8s.io/v1/endpointslices",
            "/apis/wisp.dev/v1alpha1/wasmplugins",
        ]
    );
    let node_selector = "fieldSelector=spec.nodeName%3Dk1";
    for s in seen.iter().filter(|s| s.path == "/api/v1/pods") {
        assert!(s.query.contains(node_selector), "{s:?}");
    }
    for s in seen
        .iter()
        .filter(|s| s.path != "/api/v1/pods" && s.method == Method::GET)
    {
        assert!(!s.query.contains("fieldSelector"), "{s:?}");
    }
    // Every kind is watched from the list's resourceVersion.
    let watched: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.query.contains("watch=true"))
        .collect();
    for path in paths {
        assert!(
            watched
                .iter()
                .any(|w| w.path == path && w.query.contains("resourceVersion=7")),
            "{path} not watched from resourceVersion 7: {watched:?}"
        );
    }

    // Status: server-side apply under this node's field manager, forced,
    // with exactly this node's entry.
    let patches: Vec<&Seen> = seen.iter().filter(|s| s.method == Method::PATCH).collect();
    for p in &patches {
        assert_eq!(p.content_type, "application/apply-patch+yaml");
        assert!(p.query.contains("fieldManager=wisp-agent%2Fk1"), "{p:?}");
        assert!(p.query.contains("force=true"), "{p:?}");
    }
    let body_of = |name: &str| {
        patches
            .iter()
            .find(|p| {
                p.path
                    == format!("/apis/wisp.dev/v1alpha1/namespaces/shop/wasmplugins/{name}/status")
            })
            .and_then(|p| p.body.clone())
            .unwrap_or_else(|| panic!("no status patch for {name}: {patches:?}"))
    };
    assert_eq!(
        body_of("headers"),
        json!({"apiVersion": "wisp.dev/v1alpha1", "kind": "WasmPlugin",
               "metadata": {"name": "headers", "namespace": "shop"},
               "status": {"nodes": [{"node": "k1", "state": "Loaded",
                                     "observedGeneration": 2, "workloads": 1}]}})
    );
    assert_eq!(
        body_of("bad"),
        json!({"apiVersion": "wisp.dev/v1alpha1", "kind": "WasmPlugin",
               "metadata": {"name": "bad", "namespace": "shop"},
               "status": {"nodes": [{"node": "k1", "state": "Failed",
                                     "reason": "canary instance failed: trap in _start",
                                     "observedGeneration": 2, "workloads": 1}]}})
    );

    // What was applied: the pod and the plugin that loaded, not the bad one.
    let applied = recorder.applied.lock().unwrap();
    let config = applied.last().expect("nothing applied");
    assert_eq!(config.workloads.len(), 1);
    assert_eq!(config.workloads[0].name, "shop/web-1");
    assert_eq!(config.workloads[0].netns.value, Path::new("/netns/u1"));
    let names: Vec<&str> = config.plugins.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["shop/headers"]);
    assert_eq!(
        config.plugins[0]
            .matcher
            .as_ref()
            .and_then(|m| m.value.workloads.clone()),
        Some(vec!["shop/web-1".to_string()])
    );
    assert!(Path::new(&config.plugins[0].module.value).starts_with(dir.path().join("modules")));
}

#[tokio::test]
async fn a_failed_list_is_retried_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let base: Config = serde_saphyr::from_str("outbound:\n  listen: 10.213.80.1:19503\n").unwrap();
    let controller = Controller {
        client,
        node: "k1".into(),
        base,
        settings: KubernetesConfig {
            module_dir: dir.path().join("modules"),
            ..Default::default()
        },
        modules: Arc::new(FileModuleResolver),
        netns: Arc::new(FakeNetns),
    };
    let recorder = Recorder::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(controller.run(recorder.clone(), stop_rx));
    let pods = list(
        "Pod",
        "v1",
        json!([{
        "metadata": {"namespace": "shop", "name": "web-1", "uid": "u1"},
        "spec": {"nodeName": "k1", "containers": [{"name": "app"}]},
        "status": {"phase": "Running"}}]),
    );
    let namespaces = list(
        "Namespace",
        "v1",
        json!([
        {"metadata": {"name": "shop", "labels": {"wisp.dev/dataplane": "enabled"}}}]),
    );
    let empty = list("Thing", "v1", json!([]));
    let mut pod_lists = Vec::new();
    let mut watches = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while recorder.applied.lock().unwrap().is_empty() {
        let Ok(Some((request, respond))) =
            tokio::time::timeout(std::time::Duration::from_millis(200), handle.next_request())
                .await
        else {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nothing applied after 20 s"
            );
            continue;
        };
        let (path, query) = (
            request.uri().path().to_owned(),
            request.uri().query().unwrap_or("").to_owned(),
        );
        if query.contains("watch=true") {
            watches.push(respond);
            continue;
        }
        if path == "/api/v1/pods" {
            pod_lists.push(tokio::time::Instant::now());
            if pod_lists.len() == 1 {
                // The API server is briefly unavailable.
                let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                    "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500});
                respond.send_response(
                    Response::builder()
                        .status(500)
                        .header("content-type", "application/json")
                        .body(Body::from(serde_json::to_vec(&status).unwrap()))
                        .unwrap(),
                );
                continue;
            }
            respond.send_response(reply(&pods));
        } else if path == "/api/v1/namespaces" {
            respond.send_response(reply(&namespaces));
        } else {
            respond.send_response(reply(&empty));
        }
    }
    stop_tx.send(true).unwrap();
    task.await.unwrap();
    assert_eq!(pod_lists.len(), 2, "one failed list, one retry");
    let waited = pod_lists[1] - pod_lists[0];
    assert!(
        waited >= std::time::Duration::from_millis(100),
        "relisted without backoff (after {waited:?})"
    );
    let applied = recorder.applied.lock().unwrap();
    assert_eq!(applied[0].workloads[0].name, "shop/web-1");
}
