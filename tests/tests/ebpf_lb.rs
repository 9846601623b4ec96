//! Connect-time service load balancing in the kernel: a connect to a service
//! VIP:port is rewritten to a backend picked at random by weight, and
//! getpeername still shows the VIP. A service whose port has L7 filters keeps
//! its VIP for enrolled pods — their connect goes to the agent, which runs
//! the filters and whose own connect to the VIP is balanced.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use wisp_testbed::agent::{Agent, TestDir, metric, test_pin_path};
use wisp_testbed::node::SimNode;
use wisp_testbed::sockets::{connect, get_on, http_get, in_netns, peer_of, unmap};
use wisp_testbed::wat_filters::header_marker;
use wisp_testbed::{artifacts, leftovers};

const LISTEN_PORT: u16 = 15406;
const ADMIN: &str = "127.0.0.1:15496";
const CONNECTS: usize = 200;

#[test]
fn vip_connects_spread_by_weight_and_getpeername_shows_the_vip() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and attaches eBPF programs: run it as root"
    );
    let node = SimNode::create("lb", 35, &["a", "c", "b1", "b2", "b3"]).unwrap();
    let echo = artifacts::echo_bin().unwrap();
    let (a, c) = (node.pod("a").unwrap(), node.pod("c").unwrap());
    let backends: Vec<_> = ["b1", "b2", "b3"]
        .iter()
        .map(|n| node.pod(n).unwrap())
        .collect();
    let mut echoes: Vec<_> = backends
        .iter()
        .map(|b| b.spawn_echo(&echo, 5432).unwrap())
        .collect();
    echoes.push(backends[0].spawn_echo(&echo, 8080).unwrap());

    // Marks the requests it runs on with a header, for `match: services`.
    let dir = TestDir::new().unwrap();
    let marker = dir.join("marker.wasm");
    std::fs::write(&marker, wat::parse_str(header_marker()).unwrap()).unwrap();

    let db_vip: SocketAddr = "10.96.35.10:5432".parse().unwrap();
    let web_vip: SocketAddr = "10.96.35.11:80".parse().unwrap();
    let yaml = format!(
        "outbound:\n  listen: {node_ip}:{LISTEN_PORT}\n  ports:\n    5432: tcp\n\
         admin:\n  listen: {ADMIN}\nworkers: 1\nebpf:\n  pin_path: {pin}\naccess_log: {log}\n\
         plugins:\n  - name: header-filter\n    module: {filter}\n    configuration: '{{\"header_value\": \"lb\"}}'\n\
         \x20 - name: web-only\n    module: {marker}\n    configuration: x-ran-web\n    match:\n      services: [web]\n\
         \x20 - name: db-only\n    module: {marker}\n    configuration: x-ran-db\n    match:\n      services: [db]\n\
         workloads:\n  - name: a\n    netns: {netns}\n\
         services:\n\
         \x20 - name: db\n    vip: {db_ip}\n    port: 5432\n    backends:\n\
         \x20     - address: {b1}:5432\n\
         \x20     - address: {b2}:5432\n        weight: 1\n\
         \x20     - address: {b3}:5432\n        weight: 2\n\
         \x20 - name: web\n    vip: {web_ip}\n    port: 80\n    backends:\n\
         \x20     - address: {b1}:8080\n",
        node_ip = node.node_ip(),
        pin = test_pin_path(LISTEN_PORT).display(),
        filter = artifacts::header_filter_wasm().unwrap().display(),
        marker = marker.display(),
        log = dir.join("access.log").display(),
        netns = a.netns_path().display(),
        db_ip = db_vip.ip(),
        web_ip = web_vip.ip(),
        b1 = backends[0].ip,
        b2 = backends[1].ip,
        b3 = backends[2].ip,
    );
    let agent = Agent::start_yaml(
        &artifacts::wisp_bin().unwrap(),
        &yaml,
        ADMIN.parse().unwrap(),
    )
    .unwrap();

    // 200 connects from enrolled pod a to the db VIP: no L7 filters on 5432
    // (outbound.ports says tcp), so the kernel picks a backend and a talks
    // to it directly.
    let replies = in_netns(&a.netns_path(), || {
        (0..CONNECTS)
            .map(|i| {
                let stream = connect(None, db_vip, Duration::from_secs(5))?;
                get_on(stream, "db", &format!("/q/{i}"))
            })
            .collect::<std::io::Result<Vec<_>>>()
    })
    .unwrap()
    .unwrap();
    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    for reply in &replies {
        let seen = reply
            .echo()
            .unwrap_or_else(|| panic!("{reply:?}\n{}", agent.log()));
        assert_eq!(
            unmap(seen["peer"].as_str().unwrap()),
            a.ip.to_string(),
            "db is balanced in the kernel: a reaches the backend directly"
        );
        *spread
            .entry(seen["server"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    // Weights 1:1:2 → expected 50, 50, 100 of 200; allow 5 standard
    // deviations (σ ≈ 6.1 and 7.1): a false failure has odds below 1e-6.
    let within = |name: &str, low: usize, high: usize| {
        let n = spread.get(name).copied().unwrap_or(0);
        assert!(
            (low..=high).contains(&n),
            "{name} got {n} of {CONNECTS} connects: {spread:?}"
        );
    };
    within("b1", 20, 80);
    within("b2", 20, 80);
    within("b3", 65, 135);

    // getpeername shows the VIP, for a and for c (not enrolled: it is
    // balanced too, like kube-proxy would).
    assert_eq!(peer_of(&a.netns_path(), db_vip).unwrap(), db_vip);
    assert_eq!(peer_of(&c.netns_path(), db_vip).unwrap(), db_vip);

    // web:80 has L7 filters: a's connect keeps the VIP and goes to the agent,
    // which runs the filter and connects to the VIP itself — balanced there.
    let reply = http_get(&a.netns_path(), web_vip, "/web").unwrap();
    assert_eq!(reply.status, 200, "{reply:?}\n{}", agent.log());
    assert_eq!(reply.header("x-wisp-filter"), Some("lb"), "{reply:?}");
    let seen = reply.echo().unwrap();
    assert_eq!(seen["server"], "b1");
    // The agent saw the VIP, so it knows the service: `match: services`
    // selects web's plugin and not db's.
    assert_eq!(seen["headers"]["x-ran-web"], "1", "{seen}");
    assert!(seen["headers"].get("x-ran-db").is_none(), "{seen}");
    assert_eq!(
        unmap(seen["peer"].as_str().unwrap()),
        node.node_ip().to_string()
    );
    assert_eq!(
        peer_of(&a.netns_path(), web_vip).unwrap(),
        web_vip,
        "a steered socket's getpeername shows where it connected, not the agent"
    );

    // The same backend asked for directly, not through the service: it is
    // steered to the agent too, but no service plugin applies.
    let direct = SocketAddr::from((backends[0].ip, 8080));
    let reply = http_get(&a.netns_path(), direct, "/direct").unwrap();
    assert_eq!(reply.status, 200, "{reply:?}\n{}", agent.log());
    assert_eq!(reply.header("x-wisp-filter"), Some("lb"), "{reply:?}");
    let seen = reply.echo().unwrap();
    assert!(seen["headers"].get("x-ran-web").is_none(), "{seen}");

    // The access log names the service a request asked for.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let entries: Vec<serde_json::Value> = loop {
        let text = std::fs::read_to_string(dir.join("access.log")).unwrap_or_default();
        let entries: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if entries.len() >= 2 || std::time::Instant::now() > deadline {
            break entries;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let by_path = |path: &str| {
        entries
            .iter()
            .find(|e| e["path"] == path)
            .unwrap_or_else(|| panic!("no {path} in {entries:?}"))
    };
    assert_eq!(by_path("/web")["destination_service"], "web");
    assert!(by_path("/direct").get("destination_service").is_none());

    let metrics = agent.metrics().unwrap();
    let connects = |service: &str| {
        metric(
            &metrics,
            "wisp_kernel_service_connects_total",
            &[("service", service)],
        )
    };
    assert_eq!(connects("db"), (CONNECTS + 2) as f64, "{metrics}");
    // The agent's own connects to the VIP (the GET, and maybe the bare
    // getpeername connection, depending on when the agent dials upstream).
    assert!(connects("web") >= 1.0, "{metrics}");
    assert_eq!(
        metric(
            &metrics,
            "wisp_kernel_connects_redirected_total",
            &[("workload", "a")]
        ),
        3.0,
        "only the two web connects and the direct one went to the agent: {metrics}"
    );

    drop(agent);
    drop(echoes);
    drop(node);
    assert_eq!(leftovers::find(Some("lb")), Vec::<String>::new());
}
