//! `wisp proxy` (quick mode, no eBPF) over loopback: HTTP/1.1 and HTTP/2
//! through the filter, TCP pass-through, bad input, unreachable upstreams,
//! the admin endpoints and graceful drain — all against the real binary.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use wisp_testbed::agent::{Agent, metric};
use wisp_testbed::process::ChildGuard;
use wisp_testbed::{artifacts, http};

/// `wisp-echo` on loopback.
fn echo(port: u16) -> ChildGuard {
    wisp_testbed::echo::spawn_on_loopback(&artifacts::echo_bin().unwrap(), port).unwrap()
}

fn curl(args: &[&str]) -> http::Reply {
    http::curl(args).unwrap()
}

/// `wisp proxy` in front of `upstream` with the header filter.
fn proxy(listen: u16, admin: u16, upstream: &str, extra: &[&str]) -> Agent {
    let mut args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{listen}"),
        "--upstream",
        upstream,
        "--admin",
        &format!("127.0.0.1:{admin}"),
        "--workers",
        "2",
        "--plugin",
        artifacts::header_filter_wasm().unwrap().to_str().unwrap(),
        "--plugin-config",
        r#"{"header_value": "quick"}"#,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    Agent::start_proxy(
        &artifacts::wisp_bin().unwrap(),
        &args,
        SocketAddr::from(([127, 0, 0, 1], admin)),
    )
    .unwrap()
}

/// Sends raw bytes and returns everything the proxy answers until it closes.
fn raw(port: u16, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn http1_and_http2_go_through_the_filter_to_the_upstream() {
    let _echo = echo(17080);
    let agent = proxy(17001, 17091, "127.0.0.1:17080", &[]);

    let reply = curl(&["-H", "x-test: 1", "http://127.0.0.1:17001/one?q=2"]);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-wisp-filter"), Some("quick"));
    let seen = reply.echo().unwrap();
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(seen["path"], "/one?q=2");
    assert_eq!(
        seen["headers"]["host"], "127.0.0.1:17001",
        "Host kept as the client sent it"
    );
    assert_eq!(seen["headers"]["x-test"], "1");

    let h2 = curl(&[
        "--http2-prior-knowledge",
        "-H",
        "host: svc.example:80",
        "http://127.0.0.1:17001/two",
    ]);
    assert_eq!(h2.status, 200, "{h2:?}");
    assert_eq!(h2.header("x-wisp-filter"), Some("quick"));
    let seen = h2.echo().unwrap();
    assert_eq!(
        seen["version"], "HTTP/2.0",
        "HTTP/2 downstream goes upstream as HTTP/2"
    );
    assert_eq!(
        seen["path"], "http://svc.example:80/two",
        ":authority kept for the upstream"
    );

    let denied = curl(&[
        "--http2-prior-knowledge",
        "-H",
        "x-wisp-deny: 1",
        "http://127.0.0.1:17001/",
    ]);
    assert_eq!(denied.status, 403);
    assert!(denied.echo().is_none());

    let metrics = agent.metrics().unwrap();
    let conns = |protocol| {
        metric(
            &metrics,
            "wisp_downstream_connections_total",
            &[("protocol", protocol)],
        )
    };
    assert_eq!(conns("http1"), 1.0, "{metrics}");
    assert_eq!(conns("http2"), 2.0, "{metrics}");
    assert_eq!(
        metric(
            &metrics,
            "wisp_http_requests_total",
            &[("response_code", "200")]
        ),
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            "wisp_http_requests_total",
            &[("response_code", "403")]
        ),
        1.0
    );
}

#[test]
fn other_protocols_pass_through_as_tcp() {
    // A line echo server that is not HTTP.
    let server = TcpListener::bind("127.0.0.1:17180").unwrap();
    std::thread::spawn(move || {
        for stream in server.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let log_dir = wisp_testbed::agent::fresh_dir().unwrap();
    let access_log = log_dir.join("access.log");
    let agent = proxy(
        17101,
        17191,
        "127.0.0.1:17180",
        &["--access-log", access_log.to_str().unwrap()],
    );
    let mut stream = TcpStream::connect("127.0.0.1:17101").unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(b"\x00\x01binary hello\n").unwrap();
    let mut buf = [0u8; 15];
    stream.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"\x00\x01binary hello\n");
    drop(stream);
    std::thread::sleep(Duration::from_millis(200));
    let metrics = agent.metrics().unwrap();
    assert_eq!(
        metric(
            &metrics,
            "wisp_downstream_connections_total",
            &[("protocol", "tcp")]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "wisp_tcp_sent_bytes_total", &[]),
        15.0,
        "{metrics}"
    );
    // The closed connection is one access-log line, with the bytes each way.
    let lines = std::fs::read_to_string(&access_log).unwrap();
    let _ = std::fs::remove_dir_all(&log_dir);
    let entry: serde_json::Value =
        serde_json::from_str(lines.lines().next().expect("one line")).unwrap();
    assert_eq!(entry["protocol"], "tcp", "{lines}");
    assert_eq!(entry["destination"], "127.0.0.1:17180");
    assert_eq!(entry["bytes_sent"], 15);
    assert_eq!(entry["bytes_received"], 15);
    assert_eq!(entry["upstream_connect_failed"], false);
    assert_eq!(lines.lines().count(), 1, "{lines}");
}

#[test]
fn bad_input_gets_a_clear_answer_and_never_reaches_the_upstream() {
    let _echo = echo(17280);
    let agent = proxy(17201, 17291, "127.0.0.1:17280", &["--protocol", "http1"]);

    let malformed = raw(
        17201,
        b"GET / HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
    );
    assert!(malformed.starts_with("HTTP/1.1 400"), "{malformed}");

    // Request smuggling: both Content-Length and Transfer-Encoding. The
    // request is framed by Transfer-Encoding alone (Content-Length dropped,
    // RFC 9112 §6.3) and the connection closes after its response, so the
    // "smuggled" second request is never read, let alone forwarded.
    let smuggle = raw(
        17201,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(
        smuggle.matches("HTTP/1.1 ").count(),
        1,
        "exactly one response, then close: {smuggle}"
    );
    assert!(
        smuggle.to_ascii_lowercase().contains("connection: close"),
        "{smuggle}"
    );
    assert!(!smuggle.contains("/smuggled"), "{smuggle}");
    let upstream_saw = http::parse(&smuggle).echo().unwrap();
    assert_eq!(upstream_saw["path"], "/");
    assert!(
        upstream_saw["headers"].get("content-length").is_none(),
        "{upstream_saw}"
    );

    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let too_large = raw(17201, huge.as_bytes());
    assert!(
        too_large.starts_with("HTTP/1.1 431"),
        "{}",
        &too_large[..too_large.len().min(200)]
    );

    let metrics = agent.metrics().unwrap();
    let proxied = metric(&metrics, "wisp_http_requests_total", &[]);
    assert_eq!(
        proxied, 1.0,
        "only the de-smuggled POST was proxied: {metrics}"
    );
    assert!(!agent.log().contains("panicked"));
}

#[test]
fn an_unreachable_upstream_gets_503_with_the_reason() {
    let agent = proxy(17301, 17391, "127.0.0.1:9", &[]);
    let reply = curl(&["http://127.0.0.1:17301/"]);
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(reply.body.contains("connection failure"), "{reply:?}");
    assert!(
        agent
            .log()
            .contains("cannot connect to the original destination")
    );
    let metrics = agent.metrics().unwrap();
    assert_eq!(
        metric(&metrics, "wisp_upstream_connect_errors_total", &[]),
        1.0
    );
}

#[test]
fn admin_endpoints_describe_the_running_proxy_and_requests_are_access_logged() {
    let _echo = echo(17480);
    let log_dir = wisp_testbed::agent::fresh_dir().unwrap();
    let access_log = log_dir.join("access.log");
    let agent = proxy(
        17401,
        17491,
        "127.0.0.1:17480",
        &["--access-log", access_log.to_str().unwrap()],
    );
    let reply = curl(&["-H", "host: svc.test", "http://127.0.0.1:17401/logged?q=1"]);
    assert_eq!(reply.status, 200);
    let lines = std::fs::read_to_string(&access_log).unwrap();
    let entry: serde_json::Value =
        serde_json::from_str(lines.lines().next().expect("one line")).unwrap();
    assert_eq!(entry["method"], "GET");
    assert_eq!(entry["path"], "/logged?q=1");
    assert_eq!(entry["authority"], "svc.test");
    assert_eq!(entry["response_code"], 200);
    assert_eq!(entry["destination"], "127.0.0.1:17480");
    let _ = std::fs::remove_dir_all(&log_dir);
    let plugins = agent.admin_get("/plugins").unwrap();
    assert_eq!(plugins.status, 200);
    let plugins: serde_json::Value = serde_json::from_str(&plugins.body).unwrap();
    assert_eq!(plugins[0]["name"], "wisp_header_filter");
    assert_eq!(plugins[0]["abi_version"], "V0_2_1");
    assert_eq!(plugins[0]["failure_policy"], "FAIL_CLOSED");
    let dump = agent.admin_get("/config_dump").unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump.body).unwrap();
    assert_eq!(dump["listeners"][0]["addr"], "127.0.0.1:17401");
    assert_eq!(
        dump["listeners"][0]["destination"]["fixed"],
        "127.0.0.1:17480"
    );
    assert_eq!(agent.admin_get("/nope").unwrap().status, 404);
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let _echo = echo(17580);
    let mut agent = proxy(17501, 17591, "127.0.0.1:17580", &[]);
    let slow = std::thread::spawn(|| curl(&["http://127.0.0.1:17501/slow?delay_ms=1500"]));
    std::thread::sleep(Duration::from_millis(400));
    let status = agent.stop().expect("the proxy was running");
    assert!(status.success(), "exit status {status}\n{}", agent.log());
    let reply = slow.join().unwrap();
    assert_eq!(
        reply.status, 200,
        "the in-flight request finished: {reply:?}"
    );
    assert_eq!(reply.echo().unwrap()["path"], "/slow?delay_ms=1500");
    assert!(
        TcpStream::connect("127.0.0.1:17501").is_err(),
        "no longer accepting"
    );
    assert!(
        agent.log().contains("drained in-flight connections"),
        "{}",
        agent.log()
    );
}

/// Sidecar mode: iptables REDIRECT in the pod's namespace captures inbound
/// connections to the app port, and `wisp proxy --upstream original-dst`
/// recovers the original destination with SO_ORIGINAL_DST.
#[test]
fn sidecar_mode_forwards_to_the_original_destination_behind_iptables() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root for namespaces and iptables: run `cargo xtask test`"
    );
    let node = wisp_testbed::node::SimNode::create("sc", 21, &["client", "app"]).unwrap();
    let (client, app) = (node.pod("client").unwrap(), node.pod("app").unwrap());
    let echo = app
        .spawn_echo(&artifacts::echo_bin().unwrap(), 8080)
        .unwrap();
    let capture = [
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "--dport",
        "8080",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15006",
    ];
    wisp_testbed::cmd::output(app.command("iptables").unwrap().args(capture)).unwrap();

    let admin = SocketAddr::from((app.ip, 15090));
    let mut command = app.command(artifacts::wisp_bin().unwrap()).unwrap();
    command.args([
        "proxy",
        "--listen",
        "0.0.0.0:15006",
        "--upstream",
        "original-dst",
        "--admin",
        &admin.to_string(),
        "--workers",
        "1",
        "--plugin",
        artifacts::header_filter_wasm().unwrap().to_str().unwrap(),
        "--plugin-config",
        r#"{"header_value": "sidecar"}"#,
    ]);
    let agent = Agent::spawn(command, wisp_testbed::agent::fresh_dir().unwrap(), admin).unwrap();

    let reply = http::get(client, SocketAddr::from((app.ip, 8080)), "/captured", &[]).unwrap();
    assert_eq!(reply.status, 200, "{reply:?}\n{}", agent.log());
    assert_eq!(reply.header("x-wisp-filter"), Some("sidecar"));
    assert_eq!(reply.echo().unwrap()["path"], "/captured");
    let metrics = agent.metrics().unwrap();
    assert_eq!(
        metric(
            &metrics,
            "wisp_http_requests_total",
            &[("response_code", "200")]
        ),
        1.0,
        "{metrics}"
    );
    drop(agent);
    drop(echo);
    drop(node);
    assert!(wisp_testbed::leftovers::find(Some("sc")).is_empty());
}
