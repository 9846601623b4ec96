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

/// One conformance scenario as a client sees it: status, the response
/// headers a filter can make, and the body — the upstream's echo
/// normalised as in [`upstream_view`] (and unwrapped from the `/body`
/// scenario's `<<…>>`), or the text of a local reply.
fn conformance_view(reply: &http::Reply) -> (u16, Vec<(String, String)>, serde_json::Value) {
    let headers = comparable(reply)
        .into_iter()
        // Framing differs by proxy (Envoy answers a body whose length a
        // plugin removed chunked; wisp sends the length it knows).
        .filter(|(k, _)| k != "transfer-encoding")
        .collect();
    let text = reply
        .body
        .strip_prefix("<<")
        .and_then(|b| b.strip_suffix(">>"))
        .unwrap_or(&reply.body);
    let body = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(_) => {
            let unwrapped = http::Reply {
                status: reply.status,
                headers: reply.headers.clone(),
                body: text.to_owned(),
            };
            let mut echo = upstream_view(&unwrapped);
            if let Some(headers) = echo["headers"].as_object_mut() {
                // source.address: the same client address, another port.
                // Callout tokens are opaque handles; each host numbers them
                // its own way (wisp's also spends one on a refused call).
                if let Some(token) = headers.get_mut("x-conf-token") {
                    let numeric = token.as_str().is_some_and(|t| t.parse::<u32>().is_ok());
                    *token = numeric.into();
                }
                if let Some(source) = headers.get_mut("x-conf-source") {
                    let ip = source
                        .as_str()
                        .and_then(|s| s.rsplit_once(':'))
                        .map(|(ip, _)| ip.to_owned());
                    *source = ip.into();
                }
            }
            echo
        }
        Err(_) => serde_json::Value::String(reply.body.clone()),
    };
    (reply.status, headers, body)
}

/// Every HTTP scenario of the conformance filter that Envoy can run, with
/// the same requests through Envoy 1.40 and through wisp. Legitimate
/// differences, handled below:
/// * `/headers` reports how many request headers the plugin saw: Envoy's
///   connection manager adds `x-forwarded-proto` and `x-request-id` before
///   any filter runs, so its count is 2 higher (wisp adds neither);
/// * `/properties` reports `source.address`, the client's address and
///   port: each proxy sees its own connection, so only the IP is compared;
///   and it reads back the property `wisp.test` it has just set: Envoy 1.40
///   answers none for a path of the plugin's own (it keeps set properties
///   as filter state, readable only where declared), wisp returns the value,
///   as the ABI describes `proxy_set_property` / `proxy_get_property`;
/// * `/callout` reports its callout token, an opaque number each host
///   allocates its own way: only that it is a number is compared.
///
/// Not compared: `/foreign` and `/time` (no Envoy counterpart for the
/// foreign function `echo`; the log level a plugin reads is each proxy's
/// own setting), and
/// `/trailers` (curl cannot send request trailers; the HTTP/2 trailer path
/// is covered by `http_filters`).
#[test]
fn conformance_filter_behaves_the_same_in_envoy_and_wisp() {
    use wisp_testbed::backend::Backend;
    use wisp_testbed::envoy::EnvoyCluster;
    const UPSTREAM: u16 = 19285;
    const ENVOY: u16 = 19210;
    const WISP: u16 = 19211;
    const BACKEND: u16 = 19272;
    let _echo =
        wisp_testbed::echo::spawn_on_loopback(&artifacts::echo_bin().unwrap(), UPSTREAM).unwrap();
    let _backend = Backend::start(BACKEND);
    let filter = artifacts::conformance_filter_wasm().unwrap();
    let backend = SocketAddr::from(([127, 0, 0, 1], BACKEND));
    let envoy = Envoy::start_with(
        &envoy_bin().unwrap(),
        &EnvoyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], ENVOY)),
            admin: SocketAddr::from(([127, 0, 0, 1], 19212)),
            upstream: EnvoyUpstream::Addr(SocketAddr::from(([127, 0, 0, 1], UPSTREAM))),
            plugins: vec![EnvoyPlugin {
                // wisp's quick mode names a plugin after its file.
                name: "wisp_conformance_filter".into(),
                module: filter.clone(),
                root_id: String::new(),
                configuration: String::new(),
            }],
            concurrency: 1,
        },
        &[
            // HTTP/2, so the answer's trailers reach the plugin: Envoy fails
            // the SDK's trailer read of an answer without trailers (the
            // plugin traps and the stream never resumes).
            EnvoyCluster {
                name: "backend".into(),
                addr: backend,
                http2: true,
            },
            EnvoyCluster {
                name: "grpc-backend".into(),
                addr: backend,
                http2: true,
            },
        ],
        None,
    )
    .unwrap();
    let args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{WISP}"),
        "--upstream",
        &format!("127.0.0.1:{UPSTREAM}"),
        "--admin",
        "127.0.0.1:19213",
        "--workers",
        "1",
        "--plugin",
        filter.to_str().unwrap(),
        "--cluster",
        &format!("backend={backend},http2"),
        "--cluster",
        &format!("grpc-backend={backend}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let wisp = Agent::start_proxy(
        &artifacts::wisp_bin().unwrap(),
        &args,
        "127.0.0.1:19213".parse().unwrap(),
    )
    .unwrap();

    let scenarios: &[(&str, &[&str])] = &[
        (
            "/headers",
            &["-H", "x-replaced: old", "-H", "x-remove-me: 1"],
        ),
        ("/local", &[]),
        ("/body", &["--data-binary", "hello side by side"]),
        ("/properties", &[]),
        ("/shared", &[]),
        ("/metrics", &[]),
        ("/callout", &["-H", "x-callout-body: hi"]),
        ("/callout-unknown", &[]),
        ("/grpc", &[]),
        ("/queue", &["-H", "x-item: side-by-side"]),
    ];
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        for (path, extra) in scenarios {
            let run = |port: u16| {
                let url = format!("http://127.0.0.1:{port}{path}");
                let args: Vec<&str> = ["-H", "host: svc.test", version]
                    .into_iter()
                    .chain(extra.iter().copied())
                    .chain([url.as_str()])
                    .collect();
                http::curl(&args).unwrap_or_else(|e| panic!("{path} {version} on port {port}: {e}"))
            };
            let (envoy_reply, wisp_reply) = (run(ENVOY), run(WISP));
            let case = format!("{path} {version}\nenvoy {envoy_reply:?}\nwisp {wisp_reply:?}");
            let (mut e, mut w) = (
                conformance_view(&envoy_reply),
                conformance_view(&wisp_reply),
            );
            if *path == "/headers" {
                let count = |v: &mut serde_json::Value| {
                    v["headers"]
                        .as_object_mut()
                        .and_then(|h| h.remove("x-conf-count"))
                        .and_then(|c| c.as_str()?.parse::<u32>().ok())
                };
                let (ec, wc) = (count(&mut e.2), count(&mut w.2));
                assert_eq!(
                    ec,
                    wc.map(|c| c + 2),
                    "{case}: header count (see the doc comment)"
                );
            }
            if *path == "/properties" {
                let roundtrip = |v: &mut serde_json::Value| {
                    v["headers"]
                        .as_object_mut()
                        .and_then(|h| h.remove("x-conf-roundtrip"))
                };
                assert_eq!(roundtrip(&mut e.2), Some("<none>".into()), "{case}");
                assert_eq!(roundtrip(&mut w.2), Some("set-by-plugin".into()), "{case}");
            }
            assert_eq!(e.0, w.0, "{case}: status");
            assert_eq!(e.1, w.1, "{case}: response headers");
            assert_eq!(e.2, w.2, "{case}: body");
        }
    }
    drop(envoy);
    drop(wisp);
}
