//! TLS with certificates generated in the test: `wisp proxy` terminates TLS
//! (HTTP/1.1 and, by ALPN, HTTP/2), requires client certificates when given a
//! client CA (mTLS), and originates mTLS to an upstream that requires it.

use std::net::SocketAddr;

use wisp_testbed::agent::{Agent, fresh_dir, metric};
use wisp_testbed::artifacts;
use wisp_testbed::http::curl;
use wisp_testbed::pki::TestPki;
use wisp_testbed::process::ChildGuard;

fn echo(port: u16) -> ChildGuard {
    wisp_testbed::echo::spawn_on_loopback(&artifacts::echo_bin().unwrap(), port).unwrap()
}

fn wisp_proxy(args: &[&str], admin: u16) -> Agent {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let mut all = args;
    all.extend([
        "--admin".into(),
        format!("127.0.0.1:{admin}"),
        "--workers".into(),
        "1".into(),
    ]);
    Agent::start_proxy(
        &artifacts::wisp_bin().unwrap(),
        &all,
        SocketAddr::from(([127, 0, 0, 1], admin)),
    )
    .unwrap()
}

#[test]
fn terminates_tls_with_alpn_and_requires_client_certificates_under_mtls() {
    let dir = fresh_dir().unwrap();
    let pki = TestPki::generate(&dir).unwrap();
    let _echo = echo(17780);
    let p = |path: &std::path::Path| path.to_str().unwrap().to_owned();
    let agent = wisp_proxy(
        &[
            "--listen",
            "127.0.0.1:17701",
            "--upstream",
            "127.0.0.1:17780",
            "--tls-cert",
            &p(&pki.server_cert),
            "--tls-key",
            &p(&pki.server_key),
            "--tls-client-ca",
            &p(&pki.ca),
            "--plugin",
            &p(&artifacts::header_filter_wasm().unwrap()),
            "--plugin-config",
            r#"{"header_value": "tls"}"#,
        ],
        17791,
    );
    let url = "https://svc.test:17701/secure";
    let resolve = "svc.test:17701:127.0.0.1";
    let client = ["--cert", &p(&pki.client_cert), "--key", &p(&pki.client_key)];

    let reply = curl(
        &[
            &["--cacert", &p(&pki.ca), "--resolve", resolve, "--http1.1"][..],
            &client[..],
            &[url][..],
        ]
        .concat(),
    )
    .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-wisp-filter"), Some("tls"));
    assert_eq!(reply.echo().unwrap()["authority"], "svc.test:17701");

    let h2 = curl(
        &[
            &["--cacert", &p(&pki.ca), "--resolve", resolve, "--http2"][..],
            &client[..],
            &[url][..],
        ]
        .concat(),
    )
    .unwrap();
    assert_eq!(h2.status, 200, "{h2:?}");
    assert_eq!(
        h2.echo().unwrap()["version"],
        "HTTP/2.0",
        "ALPN h2 downstream, HTTP/2 upstream"
    );

    // No client certificate: the handshake is refused.
    let refused = curl(&["--cacert", &p(&pki.ca), "--resolve", resolve, url]);
    assert!(
        refused.is_err(),
        "a client without a certificate got through: {refused:?}"
    );

    let metrics = agent.metrics().unwrap();
    assert_eq!(
        metric(
            &metrics,
            "wisp_downstream_connections_total",
            &[("protocol", "https")]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "wisp_downstream_connections_total",
            &[("protocol", "https2")]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "wisp_tls_handshake_errors_total", &[]),
        1.0,
        "{metrics}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn originates_mtls_to_an_upstream_that_requires_it() {
    let dir = fresh_dir().unwrap();
    let pki = TestPki::generate(&dir).unwrap();
    let p = |path: &std::path::Path| path.to_str().unwrap().to_owned();
    let _echo = echo(17880);
    // The upstream: a TLS-terminating wisp that requires client certificates.
    let _back = wisp_proxy(
        &[
            "--listen",
            "127.0.0.1:17802",
            "--upstream",
            "127.0.0.1:17880",
            "--tls-cert",
            &p(&pki.server_cert),
            "--tls-key",
            &p(&pki.server_key),
            "--tls-client-ca",
            &p(&pki.ca),
        ],
        17892,
    );
    // The front: plain downstream, mTLS upstream.
    let _front = wisp_proxy(
        &[
            "--listen",
            "127.0.0.1:17801",
            "--upstream",
            "127.0.0.1:17802",
            "--upstream-tls-ca",
            &p(&pki.ca),
            "--upstream-sni",
            "svc.test",
            "--upstream-client-cert",
            &p(&pki.client_cert),
            "--upstream-client-key",
            &p(&pki.client_key),
        ],
        17891,
    );
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        let reply = curl(&[version, "http://127.0.0.1:17801/through-mtls"]).unwrap();
        assert_eq!(reply.status, 200, "{version}: {reply:?}");
        // HTTP/2 shows the authority in the request URI; the path is the same.
        let path = reply.echo().unwrap()["path"].as_str().unwrap().to_owned();
        assert!(path.ends_with("/through-mtls"), "{version}: {path}");
    }
    // Without the client certificate the upstream refuses: 503 with the reason.
    let _plain_front = wisp_proxy(
        &[
            "--listen",
            "127.0.0.1:17803",
            "--upstream",
            "127.0.0.1:17802",
            "--upstream-tls-ca",
            &p(&pki.ca),
            "--upstream-sni",
            "svc.test",
        ],
        17893,
    );
    let refused = curl(&["http://127.0.0.1:17803/"]).unwrap();
    assert_eq!(refused.status, 503, "{refused:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn clients_that_send_an_ip_address_as_sni_do_not_flood_the_log() {
    // wrk (OpenSSL) sends the URL's host as SNI even when it is an IP
    // address, which the TLS RFCs forbid and rustls ignores; many clients
    // do the same, so the agent must not log a warning for each handshake.
    let dir = fresh_dir().unwrap();
    let pki = TestPki::generate(&dir).unwrap();
    let _echo = echo(17781);
    let p = |path: &std::path::Path| path.to_str().unwrap().to_owned();
    let agent = wisp_proxy(
        &[
            "--listen",
            "127.0.0.1:17702",
            "--upstream",
            "127.0.0.1:17781",
            "--tls-cert",
            &p(&pki.server_cert),
            "--tls-key",
            &p(&pki.server_key),
        ],
        17792,
    );
    // Four connections, each with its own handshake.
    let result = wisp_testbed::load::wrk("https://127.0.0.1:17702/", 1, 4, 1, &[]).unwrap();
    assert!(result.requests > 0, "{result:?}");
    assert_eq!(result.errors, 0, "{result:?}");
    let metrics = agent.metrics().unwrap();
    assert_eq!(
        metric(
            &metrics,
            "wisp_downstream_connections_total",
            &[("protocol", "https")]
        ),
        4.0,
        "{metrics}"
    );
    let log = agent.log();
    assert!(
        !log.contains("Illegal SNI"),
        "a warning per handshake in the agent's log:\n{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
