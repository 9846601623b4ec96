//! Hot reload of `wisp run`'s config: a changed plugin configuration takes
//! effect without a restart and without failing a single request of a
//! client that keeps sending during the swap; a broken file is rejected and
//! the previous configuration stays in effect.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wisp_testbed::agent::{Agent, AgentConfig, PluginSpec, metric};
use wisp_testbed::node::SimNode;
use wisp_testbed::{artifacts, http};

fn wait_for_reloads(agent: &Agent, result: &str, count: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = agent.metrics().unwrap();
        if metric(&metrics, "wisp_config_reloads_total", &[("result", result)]) >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {result} reload after 20 s\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn plugin_config_reloads_under_load_without_failed_requests() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root: run `cargo xtask test`"
    );
    let node = SimNode::create("rl", 22, &["a", "b"]).unwrap();
    let (a, b) = (node.pod("a").unwrap(), node.pod("b").unwrap());
    let echo = b.spawn_echo(&artifacts::echo_bin().unwrap(), 8080).unwrap();
    let b_addr = SocketAddr::from((b.ip, 8080));
    let config = |value: &str| AgentConfig {
        listen: SocketAddr::from((node.node_ip(), 15103)),
        admin: "127.0.0.1:15194".parse().unwrap(),
        workers: 2,
        plugins: vec![PluginSpec {
            name: "header-filter".into(),
            module: artifacts::header_filter_wasm().unwrap(),
            configuration: format!(r#"{{"header_value": "{value}"}}"#),
            failure_policy: "FAIL_CLOSED",
        }],
        workloads: vec![("a".into(), a.netns_path())],
    };
    let agent = Agent::start(&artifacts::wisp_bin().unwrap(), &config("v1")).unwrap();
    assert_eq!(
        http::get(a, b_addr, "/", &[])
            .unwrap()
            .header("x-wisp-filter"),
        Some("v1")
    );

    // A client in pod a that keeps sending while the config changes.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let pod = node.pod("a").unwrap().netns.clone();
        let ip = b.ip;
        std::thread::spawn(move || {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let out = std::process::Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &pod,
                        "curl",
                        "-s",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                    ])
                    .arg(format!("http://{ip}:8080/load"))
                    .output()
                    .unwrap();
                statuses.push(String::from_utf8_lossy(&out.stdout).into_owned());
            }
            statuses
        })
    };

    std::fs::write(agent.config_path(), config("v2").to_yaml()).unwrap();
    wait_for_reloads(&agent, "applied", 1.0);
    assert_eq!(
        http::get(a, b_addr, "/", &[])
            .unwrap()
            .header("x-wisp-filter"),
        Some("v2")
    );

    // SIGHUP with a broken file: rejected, v2 stays.
    std::fs::write(
        agent.config_path(),
        config("v3").to_yaml().replace("workers:", "wrokers:"),
    )
    .unwrap();
    agent.send_signal(nix::sys::signal::Signal::SIGHUP);
    wait_for_reloads(&agent, "rejected", 1.0);
    assert_eq!(
        http::get(a, b_addr, "/", &[])
            .unwrap()
            .header("x-wisp-filter"),
        Some("v2")
    );
    assert!(
        agent.log().contains("configuration NOT reloaded"),
        "{}",
        agent.log()
    );
    assert!(
        agent.log().contains("wrokers"),
        "the log names the bad field"
    );

    stop.store(true, Ordering::Relaxed);
    let statuses = load.join().unwrap();
    assert!(statuses.len() > 5, "the load client ran: {statuses:?}");
    assert!(
        statuses.iter().all(|s| s == "200"),
        "a request failed during reload: {statuses:?}"
    );
    drop(agent);
    drop(echo);
}
