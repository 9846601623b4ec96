//! Per-plugin `match:` through the real agent (`wisp run` with config
//! listeners, over loopback): a plugin runs only on requests whose
//! destination port, source workload, host and path match; the others skip
//! it. Each test plugin adds a request header named by its configuration,
//! so the upstream's echo of the request tells which plugins ran.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use wisp_testbed::agent::{Agent, TestDir, test_pin_path};
use wisp_testbed::artifacts;
use wisp_testbed::http::curl;
use wisp_testbed::process::ChildGuard;

use wisp_testbed::wat_filters::header_marker;

fn echo(port: u16) -> ChildGuard {
    wisp_testbed::echo::spawn_on_loopback(&artifacts::echo_bin().unwrap(), port).unwrap()
}

/// The marker headers the upstream saw, sorted.
fn ran(port: u16, host: &str, path: &str) -> Vec<String> {
    let reply = curl(&[
        "-H",
        &format!("host: {host}"),
        &format!("http://127.0.0.1:{port}{path}"),
    ])
    .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = reply.echo().unwrap();
    let mut names: Vec<String> = seen["headers"]
        .as_object()
        .unwrap()
        .keys()
        .filter_map(|k| k.strip_prefix("x-ran-").map(str::to_owned))
        .collect();
    names.sort();
    names
}

#[test]
fn plugins_run_only_on_requests_their_match_selects() {
    let dir = TestDir::new().unwrap();
    let marker = dir.join("marker.wasm");
    std::fs::write(&marker, wat::parse_str(header_marker()).unwrap()).unwrap();
    let _api = echo(19373);
    let _other = echo(19374);
    let plugin = |name: &str, matcher: &str| {
        format!(
            "  - name: {name}\n    module: {}\n    configuration: x-ran-{name}\n{matcher}",
            marker.display()
        )
    };
    let plugins = [
        plugin("all", ""),
        plugin("paths", "    match:\n      paths: [/api/]\n"),
        plugin("hosts", "    match:\n      hosts: ['*.svc.test']\n"),
        plugin("port", "    match:\n      ports: [19374]\n"),
        plugin(
            "both",
            "    match:\n      paths: [/api/]\n      hosts: [exact.test]\n",
        ),
        // Connections that were not steered come from no known workload.
        plugin("workload", "    match:\n      workloads: [default/web]\n"),
        plugin("listener", "    match:\n      listeners: [api]\n"),
        // Fixed-upstream listeners have no destination service.
        plugin("service", "    match:\n      services: [api]\n"),
    ]
    .concat();
    let yaml = format!(
        "outbound:\n  listen: 0.0.0.0:19330\n  redirect_address: 10.213.66.1\nadmin:\n  listen: 127.0.0.1:19394\nworkers: 1\nebpf:\n  pin_path: {}\nplugins:\n{plugins}listeners:\n  - name: api\n    listen: 127.0.0.1:19331\n    upstream: 127.0.0.1:19373\n  - name: other\n    listen: 127.0.0.1:19332\n    upstream: 127.0.0.1:19374\n",
        test_pin_path(19330).display()
    );
    let agent = Agent::start_yaml(
        &artifacts::wisp_bin().unwrap(),
        &yaml,
        SocketAddr::from(([127, 0, 0, 1], 19394)),
    )
    .unwrap();

    assert_eq!(
        ran(19331, "a.svc.test", "/api/v1?x=1"),
        ["all", "hosts", "listener", "paths"]
    );
    assert_eq!(ran(19332, "exact.test", "/other"), ["all", "port"]);
    assert_eq!(
        ran(19331, "exact.test:19331", "/api/x"),
        ["all", "both", "listener", "paths"]
    );
    // `*.svc.test` is a suffix match on whole labels; `/api/` a prefix of
    // the path, not of the query.
    assert_eq!(ran(19331, "svc.test", "/x?/api/"), ["all", "listener"]);

    let plugins: serde_json::Value =
        serde_json::from_str(&agent.admin_get("/plugins").unwrap().body).unwrap();
    assert_eq!(plugins[3]["match"]["ports"][0], 19374, "{plugins}");
    assert_eq!(plugins[3]["kind"], "http", "{plugins}");
}

/// `wisp check-config` on `yaml`: exit code and stderr.
fn check_config(dir: &Path, yaml: &str) -> (Option<i32>, String) {
    let path = dir.join("wisp.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(artifacts::wisp_bin().unwrap())
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn match_mistakes_are_refused_with_line_and_field() {
    let dir = TestDir::new().unwrap();
    std::fs::write(dir.join("f.wasm"), wat::parse_str(header_marker()).unwrap()).unwrap();
    let head =
        "outbound:\n  listen: 10.213.66.1:19339\nplugins:\n  - name: f\n    module: f.wasm\n";
    let cases = [
        (
            format!("{head}    match:\n      hosts: [ok.test, 'api.test:80']\n"),
            vec![":7: `plugins[0].match.hosts[1]`", "without a port"],
        ),
        (
            format!("{head}    kind: network\n    match:\n      paths: [/]\n"),
            vec![
                ":8: `plugins[0].match.paths`",
                "only `listeners`, `ports`, `services` and `workloads` apply",
            ],
        ),
        (
            format!("{head}    match:\n      paths: [api]\n"),
            vec![":7: `plugins[0].match.paths[0]`", "starts with `/`"],
        ),
        (
            format!("{head}    match:\n      ports: []\n"),
            vec![":7: `plugins[0].match.ports`", "matches nothing"],
        ),
        (
            format!("{head}    match:\n      port: [80]\n"),
            vec![":7:", "unknown field `port`"],
        ),
        (format!("{head}    kind: tcp\n"), vec![":6:", "kind", "tcp"]),
        (
            format!("{head}    match:\n      listeners: [outbound, gateway]\n"),
            vec![
                ":7: `plugins[0].match.listeners[1]`",
                "no listener is named \"gateway\" (listeners: outbound, inbound)",
            ],
        ),
        (
            format!("{head}    kind: singleton\n    match:\n      ports: [80]\n"),
            vec![
                ":8: `plugins[0].match`",
                "a singleton plugin sees no traffic",
            ],
        ),
        (
            format!("{head}    kind: singleton\n    isolation: per_request\n"),
            vec!["`plugins[0].isolation`", "per_request does not apply"],
        ),
        (
            format!("{head}    match:\n      services: [db, '']\n"),
            vec![":7: `plugins[0].match.services[1]`", "an empty name"],
        ),
    ];
    for (yaml, expected) in cases {
        let (code, stderr) = check_config(&dir, &yaml);
        assert_eq!(code, Some(78), "{yaml}\n{stderr}");
        for text in expected {
            assert!(
                stderr.contains(text),
                "expected {text:?} in:\n{stderr}\nfor:\n{yaml}"
            );
        }
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let (code, stderr) = check_config(
        &dir,
        &format!(
            "{head}    match:\n      listeners: [outbound]\n      ports: [80]\n      services: [db]\n      workloads: [default/web]\n      hosts: ['*.svc.test']\n      paths: [/api/]\n"
        ),
    );
    assert_eq!(code, Some(0), "{stderr}");
}
