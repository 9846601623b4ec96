//! TLS from the config file of `wisp run` (`listeners:`), with certificates
//! generated in the test: a listener terminates TLS (ALPN h2 / http/1.1, or
//! what `alpn` allows) and requires client certificates under mTLS, plugins
//! read what the handshake established as `connection.*` properties, and a
//! listener originates mTLS to an upstream that requires it, and so do
//! plugins' callouts to a cluster with `tls:`. Mistakes in the TLS settings
//! are refused with the file, line and field.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use wisp_testbed::agent::{Agent, TestDir, metric, test_pin_path};
use wisp_testbed::artifacts;
use wisp_testbed::http::curl;
use wisp_testbed::pki::TestPki;
use wisp_testbed::process::ChildGuard;
use wisp_testbed::wat_filters::PREAMBLE;

/// An HTTP filter that copies `connection.*` properties into response
/// headers (`x-tls-version`, `x-mtls`, `x-sni`, `x-peer-sha256`).
fn properties_to_headers() -> String {
    format!(
        r#"
(module
  (import "env" "proxy_get_property" (func $get (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  {PREAMBLE}
  (data (i32.const 100) "connection\00tls_version")
  (data (i32.const 130) "x-tls-version")
  (data (i32.const 150) "connection\00mtls")
  (data (i32.const 170) "x-mtls")
  (data (i32.const 180) "connection\00requested_server_name")
  (data (i32.const 220) "x-sni")
  (data (i32.const 230) "connection\00sha256_peer_certificate_digest")
  (data (i32.const 280) "x-peer-sha256")
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func $copy (param $path i32) (param $path_len i32) (param $name i32) (param $name_len i32)
    (if (i32.eqz (call $get (local.get $path) (local.get $path_len) (i32.const 8) (i32.const 12)))
      (then
        (drop (call $add (i32.const 2) (local.get $name) (local.get $name_len)
          (i32.load (i32.const 8)) (i32.load (i32.const 12)))))))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (call $copy (i32.const 100) (i32.const 22) (i32.const 130) (i32.const 13))
    (call $copy (i32.const 150) (i32.const 15) (i32.const 170) (i32.const 6))
    (call $copy (i32.const 180) (i32.const 32) (i32.const 220) (i32.const 5))
    (call $copy (i32.const 230) (i32.const 41) (i32.const 280) (i32.const 13))
    (i32.const 0)))
"#
    )
}

fn echo(port: u16) -> ChildGuard {
    wisp_testbed::echo::spawn_on_loopback(&artifacts::echo_bin().unwrap(), port).unwrap()
}

fn p(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}

/// The start of a `wisp run` config that steers nothing (no workloads): the
/// agent serves only its `listeners:`. The redirect address is required but
/// unused without workloads.
fn run_config(outbound_port: u16, admin: u16) -> String {
    format!(
        "outbound:\n  listen: 0.0.0.0:{outbound_port}\n  redirect_address: 10.213.65.1\nadmin:\n  listen: 127.0.0.1:{admin}\nworkers: 1\nebpf:\n  pin_path: {}\n",
        test_pin_path(outbound_port).display()
    )
}

fn wisp_run(yaml: &str, admin: u16) -> Agent {
    Agent::start_yaml(
        &artifacts::wisp_bin().unwrap(),
        yaml,
        SocketAddr::from(([127, 0, 0, 1], admin)),
    )
    .unwrap()
}

/// The SHA-256 fingerprint of a PEM certificate, as `openssl` computes it
/// (lower-case hex without colons).
fn fingerprint(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert)
        .output()
        .expect("openssl (Debian package openssl) is needed to check certificate digests");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (_, hex) = text.trim().split_once('=').unwrap();
    hex.replace(':', "").to_lowercase()
}

#[test]
fn a_config_listener_terminates_mtls_with_alpn_and_plugins_see_the_connection() {
    let dir = TestDir::new().unwrap();
    let pki = TestPki::generate(&dir).unwrap();
    let plugin = dir.join("properties.wasm");
    std::fs::write(&plugin, wat::parse_str(properties_to_headers()).unwrap()).unwrap();
    let _echo = echo(19370);
    let yaml = format!(
        "{}plugins:\n  - name: props\n    module: {}\nlisteners:\n  - name: tls-in\n    listen: 127.0.0.1:19311\n    upstream: 127.0.0.1:19370\n    tls:\n      cert: {}\n      key: {}\n      client_ca: {}\n  - name: h1-only\n    listen: 127.0.0.1:19314\n    upstream: 127.0.0.1:19370\n    tls:\n      cert: {}\n      key: {}\n      alpn: [http/1.1]\n",
        run_config(19310, 19390),
        p(&plugin),
        p(&pki.server_cert),
        p(&pki.server_key),
        p(&pki.ca),
        p(&pki.server_cert),
        p(&pki.server_key),
    );
    let agent = wisp_run(&yaml, 19390);
    let ca = p(&pki.ca);
    let (cert, key) = (p(&pki.client_cert), p(&pki.client_key));
    let url = "https://svc.test:19311/secure";
    let resolve = "svc.test:19311:127.0.0.1";

    let reply = curl(&[
        "--cacert",
        &ca,
        "--resolve",
        resolve,
        "--http1.1",
        "--cert",
        &cert,
        "--key",
        &key,
        url,
    ])
    .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.echo().unwrap()["path"], "/secure");
    assert_eq!(reply.header("x-tls-version"), Some("TLSv1.3"), "{reply:?}");
    assert_eq!(reply.header("x-mtls"), Some("true"), "{reply:?}");
    assert_eq!(reply.header("x-sni"), Some("svc.test"), "{reply:?}");
    assert_eq!(
        reply.header("x-peer-sha256"),
        Some(fingerprint(&pki.client_cert).as_str()),
        "{reply:?}"
    );

    let h2 = curl(&[
        "--cacert",
        &ca,
        "--resolve",
        resolve,
        "--http2",
        "--cert",
        &cert,
        "--key",
        &key,
        url,
    ])
    .unwrap();
    assert_eq!(h2.status, 200, "{h2:?}");
    assert_eq!(h2.echo().unwrap()["version"], "HTTP/2.0", "ALPN h2");

    // No client certificate: the handshake is refused.
    let refused = curl(&["--cacert", &ca, "--resolve", resolve, url]);
    assert!(
        refused.is_err(),
        "got through without a client certificate: {refused:?}"
    );

    // `alpn: [http/1.1]`: a client asking for h2 gets HTTP/1.1; no client CA,
    // so no client certificate is needed and plugins see mtls=false.
    let h1 = curl(&[
        "--cacert",
        &ca,
        "--resolve",
        "svc.test:19314:127.0.0.1",
        "--http2",
        "https://svc.test:19314/h1",
    ])
    .unwrap();
    assert_eq!(h1.status, 200, "{h1:?}");
    assert_eq!(h1.echo().unwrap()["version"], "HTTP/1.1", "{h1:?}");
    assert_eq!(h1.header("x-mtls"), Some("false"), "{h1:?}");
    assert_eq!(h1.header("x-peer-sha256"), None, "{h1:?}");

    let metrics = agent.metrics().unwrap();
    let connections = |listener: &str, protocol: &str| {
        metric(
            &metrics,
            "wisp_downstream_connections_total",
            &[("listener", listener), ("protocol", protocol)],
        )
    };
    assert_eq!(connections("tls-in", "https"), 1.0, "{metrics}");
    assert_eq!(connections("tls-in", "https2"), 1.0, "{metrics}");
    assert_eq!(connections("h1-only", "https"), 1.0, "{metrics}");
    assert_eq!(
        metric(&metrics, "wisp_tls_handshake_errors_total", &[]),
        1.0,
        "{metrics}"
    );
}

#[test]
fn a_config_listener_originates_mtls_to_its_upstream() {
    let dir = TestDir::new().unwrap();
    let pki = TestPki::generate(&dir).unwrap();
    let _echo = echo(19371);
    // The upstream: a TLS-terminating wisp that requires client certificates.
    let backend = Agent::start_mtls_front(
        &artifacts::wisp_bin().unwrap(),
        SocketAddr::from(([127, 0, 0, 1], 19322)),
        SocketAddr::from(([127, 0, 0, 1], 19371)),
        SocketAddr::from(([127, 0, 0, 1], 19393)),
        &pki,
    )
    .unwrap();
    let yaml = format!(
        "{}listeners:\n  - name: mtls-out\n    listen: 127.0.0.1:19321\n    upstream: 127.0.0.1:19322\n    upstream_tls:\n      ca: {}\n      server_name: svc.test\n      client_cert: {}\n      client_key: {}\n  - name: no-client-cert\n    listen: 127.0.0.1:19323\n    upstream: 127.0.0.1:19322\n    upstream_tls:\n      ca: {}\n      server_name: svc.test\n",
        run_config(19320, 19392),
        p(&pki.ca),
        p(&pki.client_cert),
        p(&pki.client_key),
        p(&pki.ca),
    );
    let _front = wisp_run(&yaml, 19392);

    let reply = curl(&["http://127.0.0.1:19321/through"]).unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.echo().unwrap()["path"], "/through");
    assert_eq!(reply.header("x-echo-server"), Some("upstream"));

    // Without a client certificate the upstream refuses the handshake.
    let refused = curl(&["http://127.0.0.1:19323/"]).unwrap();
    assert_eq!(refused.status, 503, "{refused:?}");

    let metrics = backend.metrics().unwrap();
    assert_eq!(
        metric(
            &metrics,
            "wisp_downstream_connections_total",
            &[("protocol", "https")]
        ),
        1.0,
        "the backend saw one mTLS connection: {metrics}"
    );
    assert!(
        metric(&metrics, "wisp_tls_handshake_errors_total", &[]) >= 1.0,
        "{metrics}"
    );
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
fn tls_mistakes_are_refused_with_file_line_and_field() {
    let dir = TestDir::new().unwrap();
    let pki = TestPki::generate(&dir).unwrap();
    std::fs::write(dir.join("garbage.pem"), "not a certificate\n").unwrap();
    let head = "outbound:\n  listen: 10.213.65.1:19319\nlisteners:\n  - name: in\n    listen: 127.0.0.1:19318\n    upstream: 127.0.0.1:19317\n";
    let tls = |cert: &str, key: &str, extra: &str| {
        format!("{head}    tls:\n      cert: {cert}\n      key: {key}\n{extra}")
    };
    let (server, server_key) = (p(&pki.server_cert), p(&pki.server_key));
    let cases = [
        (
            tls("missing.pem", &server_key, ""),
            vec![":8: `listeners[0].tls.cert`", "no such file", "missing.pem"],
        ),
        (
            tls("garbage.pem", &server_key, ""),
            vec![
                ":8: `listeners[0].tls.cert`",
                "garbage.pem",
                "no certificate",
            ],
        ),
        (
            // The client's key with the server's certificate.
            tls(&server, &p(&pki.client_key), ""),
            vec![
                ":9: `listeners[0].tls.key`",
                "does not belong to the certificate",
            ],
        ),
        (
            tls(&server, &server_key, "      alpn: [h2, h3]\n"),
            vec![":10: `listeners[0].tls.alpn[1]`", "\"h3\""],
        ),
        (
            format!(
                "{head}    upstream_tls:\n      ca: {}\n      server_name: svc.test\n      client_cert: {}\n",
                p(&pki.ca),
                p(&pki.client_cert)
            ),
            vec![
                ":10: `listeners[0].upstream_tls.client_key`",
                "required with client_cert",
            ],
        ),
        (
            format!(
                "{head}  - name: again\n    listen: 0.0.0.0:19318\n    upstream: 127.0.0.1:19317\n"
            ),
            vec![
                ":8: `listeners[1].listen`",
                "overlaps the listen address of listener \"in\"",
            ],
        ),
    ];
    let ca = p(&pki.ca);
    let outbound = |port: &str, ca: &str| {
        format!(
            "outbound:\n  listen: 10.213.65.1:19319\n  ports:\n    5432: tcp\n  upstream_tls:\n    {port}:\n      ca: {ca}\n      server_name: svc.test\n"
        )
    };
    let cases = cases.into_iter().chain([
        (
            outbound("5432", &ca),
            vec![":7: `outbound.upstream_tls.5432`", "passed through as tcp"],
        ),
        (
            outbound("443", "nope.pem"),
            vec![":7: `outbound.upstream_tls.443.ca`", "no such file"],
        ),
        (
            "outbound:\n  listen: 10.213.65.1:19319\nclusters:\n  auth:\n    address: 127.0.0.1:9000\n    tls:\n      ca: nope.pem\n      server_name: svc.test\n".to_owned(),
            vec![":7: `clusters.auth.tls.ca`", "no such file"],
        ),
    ]);
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
    // Relative paths are read from the config file's directory.
    let (code, stderr) = check_config(&dir, &tls("server.pem", "server-key.pem", ""));
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn callouts_to_a_tls_cluster_go_out_over_mtls() {
    let dir = TestDir::new().unwrap();
    let pki = TestPki::generate(&dir).unwrap();
    let _echo = echo(19328);
    // The cluster: the callout backend behind a wisp that terminates TLS and
    // requires client certificates (ALPN h2 or http/1.1).
    let _backend = wisp_testbed::backend::Backend::start(19327);
    let tls_front = Agent::start_mtls_front(
        &artifacts::wisp_bin().unwrap(),
        SocketAddr::from(([127, 0, 0, 1], 19326)),
        SocketAddr::from(([127, 0, 0, 1], 19327)),
        SocketAddr::from(([127, 0, 0, 1], 19377)),
        &pki,
    )
    .unwrap();
    let tls = format!(
        "    tls:\n      ca: {}\n      server_name: svc.test\n      client_cert: {}\n      client_key: {}\n",
        p(&pki.ca),
        p(&pki.client_cert),
        p(&pki.client_key)
    );
    let yaml = format!(
        "{}plugins:\n  - name: conformance\n    module: {}\nclusters:\n  backend:\n    address: 127.0.0.1:19326\n    timeout_ms: 2000\n{tls}  grpc-backend:\n    address: 127.0.0.1:19326\n{tls}listeners:\n  - name: api\n    listen: 127.0.0.1:19325\n    upstream: 127.0.0.1:19328\n",
        run_config(19324, 19376),
        artifacts::conformance_filter_wasm().unwrap().display(),
    );
    let _agent = wisp_run(&yaml, 19376);

    // http_call over HTTP/1.1 + mTLS: the answer reached the plugin.
    let reply = curl(&["-H", "x-callout-body: hi", "http://127.0.0.1:19325/callout"]).unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = reply.echo().unwrap();
    assert_eq!(
        seen["headers"]["x-conf-callout-body"], "checked:POST:/check:hi",
        "{seen}"
    );
    // Unary gRPC over HTTP/2 (ALPN h2) + mTLS.
    let reply = curl(&["http://127.0.0.1:19325/grpc"]).unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = reply.echo().unwrap();
    assert_eq!(
        seen["headers"]["x-conf-grpc-message"], "allow:1:request-message",
        "{seen}"
    );

    // Both went through the TLS front with a client certificate: one
    // pooled connection each, HTTP/1.1 and HTTP/2 as ALPN chose.
    let metrics = tls_front.metrics().unwrap();
    for protocol in ["https", "https2"] {
        assert_eq!(
            metric(
                &metrics,
                "wisp_downstream_connections_total",
                &[("protocol", protocol)]
            ),
            1.0,
            "the cluster saw one {protocol} connection: {metrics}"
        );
    }
    assert_eq!(
        metric(&metrics, "wisp_tls_handshake_errors_total", &[]),
        0.0,
        "{metrics}"
    );
}
