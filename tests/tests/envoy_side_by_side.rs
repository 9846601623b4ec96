//! The same Proxy-Wasm filter, the same requests, through real Envoy 1.40
//! (V8) and through wisp: the client must see the same status, the same
//! filter-made headers and the same body, and the upstream the same request
//! (ignoring what Envoy adds on its own: x-envoy-*, x-request-id,
//! x-forwarded-proto, date, server).

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use wisp_testbed::agent::Agent;
use wisp_testbed::envoy::{Envoy, EnvoyConfig, EnvoyPlugin, EnvoyUpstream, envoy_bin};
use wisp_testbed::{artifacts, http};

const UPSTREAM: u16 = 17680;
const ENVOY: u16 = 17601;
const WISP: u16 = 17602;
const FILTER_CONFIG: &str = r#"{"header_value": "side-by-side"}"#;

fn curl(port: u16, extra: &[&str]) -> http::Reply {
    let url = format!("http://127.0.0.1:{port}/compare?x=1");
    let args: Vec<&str> = ["-H", "host: svc.test"]
        .into_iter()
        .chain(extra.iter().copied())
        .chain([url.as_str()])
        .collect();
    http::curl(&args).unwrap()
}

/// Headers a client compares: everything but what differs by proxy brand.
fn comparable(reply: &http::Reply) -> Vec<(String, String)> {
    reply
        .headers
        .iter()
        .filter(|(k, _)| {
            !matches!(k.as_str(), "date" | "server" | "content-length") && !k.starts_with("x-envoy")
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Request headers the upstream saw, minus what Envoy adds by itself.
fn upstream_view(reply: &http::Reply) -> serde_json::Value {
    let mut echo = reply.echo().expect("an echo reply");
    if let Some(headers) = echo["headers"].as_object_mut() {
        // `host` is compared as the echo's "authority" (HTTP/2 has none).
        headers.retain(|k, _| {
            !k.starts_with("x-envoy")
                && !matches!(k.as_str(), "x-request-id" | "x-forwarded-proto" | "host")
        });
    }
    // Envoy talks HTTP/1.1 to its cluster by default, wisp keeps the
    // downstream's version; compare the request, not the framing.
    echo["peer"] = serde_json::Value::Null;
    echo["version"] = serde_json::Value::Null;
    if let Some(path) = echo["path"].as_str() {
        let origin_form = path
            .strip_prefix("http://svc.test")
            .unwrap_or(path)
            .to_owned();
        echo["path"] = origin_form.into();
    }
    echo
}

#[test]
fn header_filter_behaves_the_same_in_envoy_and_wisp() {
    let _echo =
        wisp_testbed::echo::spawn_on_loopback(&artifacts::echo_bin().unwrap(), UPSTREAM).unwrap();
    let filter = artifacts::header_filter_wasm().unwrap();
    let _envoy = Envoy::start(
        &envoy_bin().unwrap(),
        &EnvoyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], ENVOY)),
            admin: SocketAddr::from(([127, 0, 0, 1], 17691)),
            upstream: EnvoyUpstream::Addr(SocketAddr::from(([127, 0, 0, 1], UPSTREAM))),
            plugins: vec![EnvoyPlugin {
                name: "header-filter".into(),
                module: filter.clone(),
                root_id: String::new(),
                configuration: FILTER_CONFIG.into(),
            }],
            concurrency: 1,
        },
        None,
    )
    .unwrap();
    let args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{WISP}"),
        "--upstream",
        &format!("127.0.0.1:{UPSTREAM}"),
        "--admin",
        "127.0.0.1:17692",
        "--workers",
        "1",
        "--plugin",
        filter.to_str().unwrap(),
        "--plugin-config",
        FILTER_CONFIG,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _wisp = Agent::start_proxy(
        &artifacts::wisp_bin().unwrap(),
        &args,
        "127.0.0.1:17692".parse().unwrap(),
    )
    .unwrap();
    assert!(TcpStream::connect(("127.0.0.1", UPSTREAM)).is_ok());
    std::thread::sleep(Duration::from_millis(100));

    for (case, extra) in [
        ("allowed", &["-H", "x-custom: 1"][..]),
        ("denied", &["-H", "x-wisp-deny: yes"][..]),
        ("http2 allowed", &["--http2-prior-knowledge"][..]),
        (
            "http2 denied",
            &["--http2-prior-knowledge", "-H", "x-wisp-deny: 1"][..],
        ),
    ] {
        let envoy = curl(ENVOY, extra);
        let wisp = curl(WISP, extra);
        assert_eq!(
            envoy.status, wisp.status,
            "{case}: status\nenvoy {envoy:?}\nwisp {wisp:?}"
        );
        assert_eq!(
            comparable(&envoy),
            comparable(&wisp),
            "{case}: response headers"
        );
        if envoy.status == 200 {
            assert_eq!(
                upstream_view(&envoy),
                upstream_view(&wisp),
                "{case}: what the upstream saw"
            );
        } else {
            assert_eq!(envoy.body, wisp.body, "{case}: local response body");
        }
    }
}
