//! Kubernetes mode end to end, in real namespaces with the real kernel: a
//! mock API server reports a pod on this node in an enrolled namespace, a
//! pod in a namespace that is not enrolled, and a `WasmPlugin` selecting the
//! first; `wisp run --kubernetes` enrolls that pod's network namespace in
//! the kernel, its requests come back with the plugin's response header,
//! the other pod's do not, and the plugin's status says it loaded here.
//! A Service with an EndpointSlice from the API is balanced at connect time.
//! Then watch events change the plugin's selector (the header goes away and
//! the node's status entry is removed) and delete the pod (it is unenrolled).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::Digest;
use wisp_testbed::agent::{Agent, fresh_dir};
use wisp_testbed::kube_api::MockApiServer;
use wisp_testbed::node::SimNode;
use wisp_testbed::{artifacts, http};

const API: &str = "127.0.0.1:19510";
const LISTEN_PORT: u16 = 19511;
const ADMIN: &str = "127.0.0.1:19512";
const PIN_PATH: &str = "/sys/fs/bpf/wisp-test-k1";
/// The Service's ClusterIP (nothing answers on it: the kernel rewrites connects).
const VIP: &str = "10.213.89.10";

fn pod(namespace: &str, name: &str, uid: &str, labels: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name, "uid": uid, "labels": labels,
                     "resourceVersion": "10"},
        "spec": {"nodeName": "k1", "containers": [{"name": "app", "image": "wisp-echo"}]},
        "status": {"phase": "Running", "qosClass": "BestEffort"},
    })
}

#[test]
fn a_wasmplugin_from_the_api_runs_for_the_selected_pod() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root (namespaces, eBPF): run `cargo xtask test`"
    );
    let node = SimNode::create("k1", 80, &["a", "b"]).unwrap();
    let (a, b) = (node.pod("a").unwrap(), node.pod("b").unwrap());
    let echo = artifacts::echo_bin().unwrap();
    let _echo_a = a.spawn_echo(&echo, 8080).unwrap();
    let _echo_b = b.spawn_echo(&echo, 8080).unwrap();

    // Pod netns by uid, as the agent's `kubernetes.netns_dir` resolver reads them.
    let dir = fresh_dir().unwrap();
    let netns_dir = dir.join("netns");
    std::fs::create_dir_all(&netns_dir).unwrap();
    std::os::unix::fs::symlink(a.netns_path(), netns_dir.join("uid-a")).unwrap();
    std::os::unix::fs::symlink(b.netns_path(), netns_dir.join("uid-b")).unwrap();

    let module = artifacts::header_filter_wasm().unwrap();
    let digest: String = sha2::Sha256::digest(std::fs::read(&module).unwrap())
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect();
    let plugin = |app: &str, generation: i64| {
        json!({
            "apiVersion": "wisp.dev/v1alpha1", "kind": "WasmPlugin",
            "metadata": {"namespace": "shop", "name": "headers", "generation": generation,
                         "resourceVersion": format!("{}", 10 + generation)},
            "spec": {
                "url": format!("file://{}", module.display()),
                "sha256": digest,
                "selector": {"matchLabels": {"app": app}},
                "pluginConfig": {"header_value": "from-kubernetes"},
                "phase": "STATS",
            },
        })
    };
    let api = MockApiServer::start(API.parse().unwrap()).unwrap();
    api.set_list(
        "/api/v1/namespaces",
        "NamespaceList",
        vec![
            json!({"metadata": {"name": "shop", "labels": {"wisp.dev/dataplane": "enabled"}}}),
            json!({"metadata": {"name": "plain"}}),
        ],
    );
    api.set_list(
        "/api/v1/pods",
        "PodList",
        vec![
            pod("shop", "a", "uid-a", json!({"app": "web"})),
            pod("plain", "b", "uid-b", json!({"app": "web"})),
        ],
    );
    // A Service whose one ready endpoint is pod b: the kernel balances its VIP.
    api.set_list(
        "/api/v1/services",
        "ServiceList",
        vec![json!({
            "metadata": {"namespace": "shop", "name": "backend"},
            "spec": {"clusterIP": VIP, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
        })],
    );
    api.set_list(
        "/apis/discovery.k8s.io/v1/endpointslices",
        "EndpointSliceList",
        vec![json!({
            "metadata": {"namespace": "shop", "name": "backend-x1",
                         "labels": {"kubernetes.io/service-name": "backend"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [b.ip.to_string()], "conditions": {"ready": true}}],
        })],
    );
    api.set_list(
        "/apis/wisp.dev/v1alpha1/wasmplugins",
        "WasmPluginList",
        vec![plugin("web", 4)],
    );

    let listen = SocketAddr::from((node.node_ip(), LISTEN_PORT));
    let config = dir.join("wisp.yaml");
    std::fs::write(
        &config,
        format!(
            "outbound:\n  listen: {listen}\nadmin:\n  listen: {ADMIN}\nworkers: 1\n\
             ebpf:\n  pin_path: {PIN_PATH}\n\
             kubernetes:\n  netns_dir: {}\n  module_dir: {}\n",
            netns_dir.display(),
            dir.join("modules").display()
        ),
    )
    .unwrap();
    let mut command = std::process::Command::new(artifacts::wisp_bin().unwrap());
    command
        .args(["run", "--kubernetes", "--node-name", "k1", "--config"])
        .arg(&config)
        .env("KUBECONFIG", api.write_kubeconfig(&dir).unwrap());
    let agent = Agent::spawn(command, dir.clone(), ADMIN.parse().unwrap()).unwrap();

    // The pod of the enrolled namespace: steered to the agent, through the plugin.
    let to_b = SocketAddr::from((b.ip, 8080));
    let deadline = Instant::now() + Duration::from_secs(30);
    let reply = loop {
        let reply = http::get(a, to_b, "/from-a", &[]).unwrap();
        if reply.header("x-wisp-filter").is_some() || Instant::now() > deadline {
            break reply;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(reply.status, 200, "{reply:?}\n{}", agent.log());
    assert_eq!(
        reply.header("x-wisp-filter"),
        Some("from-kubernetes"),
        "pod a's request did not go through the plugin\n{}",
        agent.log()
    );
    let echo_saw = reply.echo().expect("the echo server's JSON reply");
    assert_eq!(echo_saw["path"], "/from-a", "{echo_saw}");
    // The Service's VIP reaches its endpoint (pod b), through the plugin.
    let reply = http::get(
        a,
        SocketAddr::new(VIP.parse().unwrap(), 80),
        "/via-vip",
        &[],
    )
    .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}\n{}", agent.log());
    assert_eq!(reply.echo().unwrap()["server"], "b", "{reply:?}");
    assert_eq!(reply.header("x-wisp-filter"), Some("from-kubernetes"));
    // The pod of the namespace that is not enrolled is left alone.
    let reply = http::get(b, SocketAddr::from((a.ip, 8080)), "/from-b", &[]).unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-wisp-filter"), None, "{reply:?}");
    let log = agent.log();
    assert!(log.contains(r#"enrolled workload="shop/a""#), "{log}");
    assert!(!log.contains(r#"workload="plain/b""#), "{log}");

    // The agent asked for this node's pods only, and wrote its status entry.
    let requests = api.requests();
    assert!(
        requests
            .iter()
            .filter(|r| r.path == "/api/v1/pods")
            .all(|r| r.query.contains("fieldSelector=spec.nodeName%3Dk1")),
        "{requests:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let patch = loop {
        let found = api.requests().into_iter().find(|r| {
            r.method == "PATCH"
                && r.path == "/apis/wisp.dev/v1alpha1/namespaces/shop/wasmplugins/headers/status"
        });
        if found.is_some() || Instant::now() > deadline {
            break found;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let patch = patch.unwrap_or_else(|| panic!("no status patch\n{}", agent.log()));
    assert_eq!(patch.content_type, "application/apply-patch+yaml");
    assert!(
        patch.query.contains("fieldManager=wisp-agent%2Fk1"),
        "{patch:?}"
    );
    assert_eq!(
        patch.body.unwrap()["status"],
        json!({"nodes": [{"node": "k1", "state": "Loaded", "observedGeneration": 4, "workloads": 1}]})
    );

    // Written once: an unchanged outcome is not written again.
    std::thread::sleep(Duration::from_millis(500));
    let patches = api
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();
    assert_eq!(patches, 1, "{}", agent.log());

    // The plugin now selects other pods: a's requests lose the header, and
    // this node's status entry is removed (an empty list under our manager).
    let plugins_path = "/apis/wisp.dev/v1alpha1/wasmplugins";
    let watching = |path: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if api
                .requests()
                .iter()
                .any(|r| r.path == path && r.query.contains("watch=true"))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the agent never watched {path}");
    };
    watching(plugins_path);
    assert_eq!(
        api.push_event(plugins_path, "MODIFIED", &plugin("cache", 5)),
        1
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let reply = loop {
        let reply = http::get(a, to_b, "/after-change", &[]).unwrap();
        if reply.header("x-wisp-filter").is_none() || Instant::now() > deadline {
            break reply;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.header("x-wisp-filter"),
        None,
        "{reply:?}\n{}",
        agent.log()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let removal = loop {
        let found = api
            .requests()
            .into_iter()
            .filter(|r| r.method == "PATCH")
            .find(|r| {
                r.body
                    .as_ref()
                    .is_some_and(|b| b["status"] == json!({"nodes": []}))
            });
        if found.is_some() || Instant::now() > deadline {
            break found;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let removal = removal.unwrap_or_else(|| panic!("no status removal\n{}", agent.log()));
    assert!(
        removal.query.contains("fieldManager=wisp-agent%2Fk1"),
        "{removal:?}"
    );

    // The pod is deleted: the agent unenrolls its namespace.
    assert_eq!(
        api.push_event(
            "/api/v1/pods",
            "DELETED",
            &pod("shop", "a", "uid-a", json!({"app": "web"}))
        ),
        1
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.log().contains(r#"unenrolled workload="shop/a""#) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        agent.log().contains(r#"unenrolled workload="shop/a""#),
        "{}",
        agent.log()
    );
    let reply = http::get(a, to_b, "/direct", &[]).unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.echo().unwrap()["path"], "/direct");

    drop(agent);
    assert!(
        !std::path::Path::new(PIN_PATH).exists(),
        "the agent left its pins at {PIN_PATH}"
    );
}
