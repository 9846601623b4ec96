//! Plugin modules fetched over the network, against real local servers: an
//! HTTPS server with a certificate generated here, and a real OCI registry
//! (Debian's docker-registry) that `oras` pushes to in both forms of the Wasm
//! OCI image spec. `wisp check-config` fetches and compiles every module, so
//! it shows what a user sees; the last test runs the agent on real traffic
//! and reloads it onto a module that fails its pin, then onto an OCI one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use wisp_testbed::agent::{Agent, AgentConfig, PluginSpec, metric};
use wisp_testbed::file_server::FileServer;
use wisp_testbed::node::SimNode;
use wisp_testbed::pki::TestPki;
use wisp_testbed::registry::{ImageForm, Registry};
use wisp_testbed::{artifacts, http};

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("wisp-fetch-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// `modules:` for a test: its cache in `dir`, the test CA, `extra` lines.
fn modules_yaml(dir: &Path, pki: Option<&TestPki>, extra: &str) -> String {
    let mut yaml = format!("modules:\n  cache_dir: {}\n", dir.join("cache").display());
    if let Some(pki) = pki {
        yaml.push_str(&format!("  ca_file: {}\n", pki.ca.display()));
    }
    yaml.push_str(extra);
    yaml
}

/// A config whose plugins are `(module, sha256)`.
fn config(modules: &str, plugins: &[(&str, Option<&str>)]) -> String {
    let mut yaml = format!("outbound:\n  listen: 10.213.90.1:15001\n{modules}plugins:\n");
    for (i, (module, sha)) in plugins.iter().enumerate() {
        yaml.push_str(&format!("  - name: p{i}\n    module: {module}\n"));
        if let Some(sha) = sha {
            yaml.push_str(&format!("    sha256: {sha}\n"));
        }
    }
    yaml
}

fn check_config(dir: &Path, yaml: &str) -> Outcome {
    let path = dir.join("wisp.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(artifacts::wisp_bin().unwrap())
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let outcome = Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(!outcome.stderr.contains("panicked"), "{}", outcome.stderr);
    outcome
}

fn assert_ok(outcome: &Outcome, plugins: usize) {
    assert_eq!(
        outcome.code,
        Some(0),
        "check-config failed:\n{}",
        outcome.stderr
    );
    assert!(
        outcome.stdout.contains(&format!("ok ({plugins} plugin(s)")),
        "{}",
        outcome.stdout
    );
}

fn assert_fails(outcome: &Outcome, expected: &[&str]) {
    assert_ne!(
        outcome.code,
        Some(0),
        "check-config should fail:\n{}",
        outcome.stdout
    );
    for text in expected {
        assert!(
            outcome.stderr.contains(text),
            "expected {text:?} in:\n{}",
            outcome.stderr
        );
    }
}

fn cached_modules(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("cache/sha256"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn https_server(dir: &Path, port: u16) -> (TestPki, FileServer) {
    let pki = TestPki::generate(dir).unwrap();
    let server = FileServer::start_https(
        SocketAddr::from(([127, 0, 0, 1], port)),
        &pki.server_cert,
        &pki.server_key,
    )
    .unwrap();
    (pki, server)
}

#[test]
fn https_module_is_pinned_cached_and_loads_from_the_cache_when_the_server_is_gone() {
    let dir = Scratch::new("https");
    let filter = artifacts::header_filter_wasm().unwrap();
    let sha = sha256_of(&filter);
    let (pki, server) = https_server(dir.path(), 19601);
    server.put("/hf.wasm", std::fs::read(&filter).unwrap());
    let url = "https://127.0.0.1:19601/hf.wasm";
    let modules = modules_yaml(dir.path(), Some(&pki), "");

    // A wrong pin: the error names both digests and where the plugin is.
    let wrong = "0".repeat(64);
    let outcome = check_config(dir.path(), &config(&modules, &[(url, Some(&wrong))]));
    assert_fails(
        &outcome,
        &[
            "wisp.yaml:8: `plugins[0].module`",
            "sha256 mismatch",
            &format!("expected sha256:{wrong}"),
            &format!("got sha256:{sha}"),
        ],
    );
    assert!(
        cached_modules(dir.path()).is_empty(),
        "a module that failed its pin was cached"
    );

    // Pinned right: fetched once, then served from the cache.
    let good = config(&modules, &[(url, Some(&format!("sha256:{sha}")))]);
    assert_ok(&check_config(dir.path(), &good), 1);
    assert_eq!(server.requests(), vec!["/hf.wasm", "/hf.wasm"]);
    assert_eq!(cached_modules(dir.path()), vec![sha.clone()]);
    assert_ok(&check_config(dir.path(), &good), 1);
    assert_eq!(
        server.requests().len(),
        2,
        "a cached module was fetched again"
    );

    // The server is gone: the pinned module still loads.
    drop(server);
    assert_ok(&check_config(dir.path(), &good), 1);

    // Without the test CA the certificate is refused, at once (no retries).
    let untrusted = modules_yaml(&dir.path().join("other"), None, "");
    std::fs::create_dir_all(dir.path().join("again")).unwrap();
    let server = https_server(&dir.path().join("again"), 19601).1;
    server.put("/hf.wasm", std::fs::read(&filter).unwrap());
    let outcome = check_config(dir.path(), &config(&untrusted, &[(url, Some(&sha))]));
    assert_fails(&outcome, &["TLS: invalid peer certificate"]);
    assert!(!outcome.stderr.contains("retrying"), "{}", outcome.stderr);
}

#[test]
fn transient_failures_are_retried_and_permanent_ones_are_not() {
    let dir = Scratch::new("retry");
    let filter = artifacts::header_filter_wasm().unwrap();
    let sha = sha256_of(&filter);
    let (pki, server) = https_server(dir.path(), 19604);
    server.put("/hf.wasm", std::fs::read(&filter).unwrap());
    let modules = modules_yaml(dir.path(), Some(&pki), "  fetch_retries: 2\n");

    // Two 503s, then the module: three requests, and it loads.
    server.fail_next(2);
    let outcome = check_config(
        dir.path(),
        &config(&modules, &[("https://127.0.0.1:19604/hf.wasm", Some(&sha))]),
    );
    assert_ok(&outcome, 1);
    assert_eq!(server.requests().len(), 3);
    assert!(
        outcome.stderr.contains("503 Service Unavailable"),
        "{}",
        outcome.stderr
    );

    // A 404 will not change: one request, no retry. (A fresh cache: the
    // cache is content-addressed, so the pin alone would find the module.)
    let modules = modules_yaml(
        &dir.path().join("empty"),
        Some(&pki),
        "  fetch_retries: 2\n",
    );
    let outcome = check_config(
        dir.path(),
        &config(
            &modules,
            &[("https://127.0.0.1:19604/missing.wasm", Some(&sha))],
        ),
    );
    assert_fails(
        &outcome,
        &["https://127.0.0.1:19604/missing.wasm: the server answered 404"],
    );
    assert_eq!(server.requests().len(), 4);

    // Nobody listening: 1 + 2 retries, then the reason.
    let started = Instant::now();
    let outcome = check_config(
        dir.path(),
        &config(&modules, &[("https://127.0.0.1:19602/hf.wasm", Some(&sha))]),
    );
    assert_fails(
        &outcome,
        &["giving up after 3 attempt(s)", "Connection refused"],
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn plain_http_is_refused_unless_allowed() {
    let dir = Scratch::new("http");
    let filter = artifacts::header_filter_wasm().unwrap();
    let sha = sha256_of(&filter);
    let server = FileServer::start_http(SocketAddr::from(([127, 0, 0, 1], 19605))).unwrap();
    server.put("/hf.wasm", std::fs::read(&filter).unwrap());
    let url = "http://127.0.0.1:19605/hf.wasm";
    let outcome = check_config(
        dir.path(),
        &config(&modules_yaml(dir.path(), None, ""), &[(url, Some(&sha))]),
    );
    assert_eq!(outcome.code, Some(78), "{}", outcome.stderr);
    assert_fails(
        &outcome,
        &["wisp.yaml:7: `plugins[0].module`", "allow_http"],
    );
    assert!(server.requests().is_empty());

    // A module fetched over the network needs a pin at all.
    let outcome = check_config(
        dir.path(),
        &config(
            &modules_yaml(dir.path(), None, "  allow_http: true\n"),
            &[(url, None)],
        ),
    );
    assert_eq!(outcome.code, Some(78), "{}", outcome.stderr);
    assert_fails(&outcome, &["`plugins[0].sha256`: required"]);

    // Nor may an HTTPS URL redirect to plain HTTP.
    let (pki, tls) = https_server(dir.path(), 19607);
    tls.redirect("/hf.wasm", url);
    let redirected = "https://127.0.0.1:19607/hf.wasm";
    let outcome = check_config(
        dir.path(),
        &config(
            &modules_yaml(dir.path(), Some(&pki), ""),
            &[(redirected, Some(&sha))],
        ),
    );
    assert_fails(&outcome, &[&format!("redirected to {url}"), "allow_http"]);
    assert!(server.requests().is_empty());

    let allowed = modules_yaml(dir.path(), Some(&pki), "  allow_http: true\n");
    assert_ok(
        &check_config(dir.path(), &config(&allowed, &[(url, Some(&sha))])),
        1,
    );
    assert_eq!(server.requests(), vec!["/hf.wasm"]);
    let fresh = modules_yaml(
        &dir.path().join("fresh"),
        Some(&pki),
        "  allow_http: true\n",
    );
    assert_ok(
        &check_config(dir.path(), &config(&fresh, &[(redirected, Some(&sha))])),
        1,
    );
    assert_eq!(server.requests(), vec!["/hf.wasm", "/hf.wasm"]);
}

#[test]
fn the_cache_size_cap_evicts_the_least_recently_used_module() {
    let dir = Scratch::new("evict");
    let (header, conformance) = (
        artifacts::header_filter_wasm().unwrap(),
        artifacts::target_dir().join("wasm32-wasip1/release/wisp_conformance_filter.wasm"),
    );
    let (sha_h, sha_c) = (sha256_of(&header), sha256_of(&conformance));
    let (size_h, size_c) = (
        std::fs::metadata(&header).unwrap().len(),
        std::fs::metadata(&conformance).unwrap().len(),
    );
    let (pki, server) = https_server(dir.path(), 19606);
    server.put("/h.wasm", std::fs::read(&header).unwrap());
    server.put("/c.wasm", std::fs::read(&conformance).unwrap());
    let h = ("https://127.0.0.1:19606/h.wasm", Some(sha_h.as_str()));
    let c = ("https://127.0.0.1:19606/c.wasm", Some(sha_c.as_str()));
    // Room for either module, not both.
    let cap = size_h.max(size_c) + 1;
    assert!(cap < size_h + size_c);
    let modules = modules_yaml(
        dir.path(),
        Some(&pki),
        &format!("  cache_max_bytes: {cap}\n"),
    );

    assert_ok(&check_config(dir.path(), &config(&modules, &[h, c])), 2);
    assert_eq!(
        cached_modules(dir.path()),
        vec![sha_c.clone()],
        "h should have been evicted"
    );
    // h is fetched again (it was evicted), and c goes in turn.
    assert_ok(&check_config(dir.path(), &config(&modules, &[h])), 1);
    assert_eq!(
        server.requests(),
        vec!["/h.wasm", "/c.wasm", "/h.wasm"],
        "only the evicted module is fetched again"
    );
    assert_eq!(cached_modules(dir.path()), vec![sha_h.clone()]);

    // A module larger than the cap is refused with the limit named.
    let tiny = modules_yaml(dir.path(), Some(&pki), "  cache_max_bytes: 1000\n");
    let outcome = check_config(dir.path(), &config(&tiny, &[c]));
    assert_fails(&outcome, &["larger than 1000 bytes", "cache_max_bytes"]);
}

#[test]
fn oci_modules_in_both_image_forms_are_pulled_from_a_real_registry() {
    let dir = Scratch::new("oci");
    let filter = artifacts::header_filter_wasm().unwrap();
    let sha = sha256_of(&filter);
    let pki = TestPki::generate(dir.path()).unwrap();
    let registry = Registry::start(SocketAddr::from(([127, 0, 0, 1], 19603)), &pki).unwrap();
    let artifact = registry
        .push("wisp/header-filter:v1", &filter, ImageForm::WasmLayer)
        .unwrap();
    let image = registry
        .push("wisp/header-filter-image:v1", &filter, ImageForm::Compat)
        .unwrap();
    let base = "oci://127.0.0.1:19603/wisp";
    let modules = modules_yaml(dir.path(), Some(&pki), "");

    // The artifact by tag, pinned by the module's sha256.
    let by_tag = format!("{base}/header-filter:v1");
    assert_ok(
        &check_config(dir.path(), &config(&modules, &[(&by_tag, Some(&sha))])),
        1,
    );
    // The compat image by tag, pinned by its manifest digest (as Istio).
    let compat = format!("{base}/header-filter-image:v1");
    let fresh = modules_yaml(&dir.path().join("fresh"), Some(&pki), "");
    assert_ok(
        &check_config(dir.path(), &config(&fresh, &[(&compat, Some(&image))])),
        1,
    );
    let log = registry.log();
    assert!(
        log.contains("GET /v2/wisp/header-filter-image/blobs/sha256:"),
        "{log}"
    );
    // The same module, so one cache entry for both forms.
    assert_eq!(cached_modules(&dir.path().join("fresh")), vec![sha.clone()]);
    assert_eq!(cached_modules(dir.path()), vec![sha.clone()]);

    // By digest, without a sha256 field: the reference pins itself.
    let by_digest = format!("{base}/header-filter@{artifact}");
    let other = modules_yaml(&dir.path().join("other"), Some(&pki), "");
    assert_ok(
        &check_config(dir.path(), &config(&other, &[(&by_digest, None)])),
        1,
    );

    // A tag whose image is not what the pin says.
    let wrong = "1".repeat(64);
    let outcome = check_config(dir.path(), &config(&other, &[(&compat, Some(&wrong))]));
    assert_fails(
        &outcome,
        &[
            "sha256 mismatch",
            &format!("expected sha256:{wrong}"),
            &format!("module sha256:{sha} in image manifest {image}"),
        ],
    );
    // A tag that does not exist: the registry's answer, without retries.
    let empty = modules_yaml(&dir.path().join("empty"), Some(&pki), "");
    let outcome = check_config(
        dir.path(),
        &config(&empty, &[(&format!("{base}/header-filter:v9"), Some(&sha))]),
    );
    assert_fails(&outcome, &["header-filter:v9"]);
    assert!(!outcome.stderr.contains("retrying"), "{}", outcome.stderr);
    // A tag without any pin is a config error.
    let outcome = check_config(dir.path(), &config(&other, &[(&by_tag, None)]));
    assert_eq!(outcome.code, Some(78), "{}", outcome.stderr);
    assert_fails(
        &outcome,
        &["`plugins[0].sha256`: required", "manifest digest"],
    );

    // The registry is gone: both pins still load from the cache.
    drop(registry);
    assert_ok(
        &check_config(dir.path(), &config(&other, &[(&by_digest, None)])),
        1,
    );
    assert_ok(
        &check_config(dir.path(), &config(&fresh, &[(&compat, Some(&image))])),
        1,
    );
}

fn wait_for_reloads(agent: &Agent, result: &str, count: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = agent.metrics().unwrap();
        if metric(&metrics, "wisp_config_reloads_total", &[("result", result)]) >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {result} reload after 60 s\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_reload_onto_a_module_that_fails_its_pin_keeps_the_previous_chain() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root: run `cargo xtask test`"
    );
    let dir = Scratch::new("reload");
    let filter = artifacts::header_filter_wasm().unwrap();
    let sha = sha256_of(&filter);
    let pki = TestPki::generate(dir.path()).unwrap();
    let server = FileServer::start_https(
        SocketAddr::from(([127, 0, 0, 1], 19612)),
        &pki.server_cert,
        &pki.server_key,
    )
    .unwrap();
    server.put("/hf.wasm", std::fs::read(&filter).unwrap());
    let registry = Registry::start(SocketAddr::from(([127, 0, 0, 1], 19613)), &pki).unwrap();
    let digest = registry
        .push("wisp/hf:v2", &filter, ImageForm::Compat)
        .unwrap();

    let node = SimNode::create("f1", 90, &["a", "b"]).unwrap();
    let (a, b) = (node.pod("a").unwrap(), node.pod("b").unwrap());
    let _echo = b.spawn_echo(&artifacts::echo_bin().unwrap(), 8080).unwrap();
    let b_addr = SocketAddr::from((b.ip, 8080));
    let admin: SocketAddr = "127.0.0.1:19611".parse().unwrap();
    // The testbed writes `module:` as given; add the pin and `modules:`.
    let yaml = |module: &str, pin: &str, value: &str| {
        AgentConfig {
            listen: SocketAddr::from((node.node_ip(), 19610)),
            admin,
            workers: 1,
            plugins: vec![PluginSpec {
                name: "header-filter".into(),
                module: PathBuf::from(module),
                configuration: format!(r#"{{"header_value": "{value}"}}"#),
                failure_policy: "FAIL_CLOSED",
            }],
            workloads: vec![("a".into(), a.netns_path())],
        }
        .to_yaml()
        .replace(
            &format!("    module: {module}\n"),
            &format!("    module: {module}\n    sha256: {pin}\n"),
        ) + &modules_yaml(dir.path(), Some(&pki), "")
    };
    let https = "https://127.0.0.1:19612/hf.wasm";
    let agent = Agent::start_yaml(
        &artifacts::wisp_bin().unwrap(),
        &yaml(https, &sha, "v1"),
        admin,
    )
    .unwrap();
    let header = || {
        http::get(a, b_addr, "/", &[])
            .unwrap()
            .header("x-wisp-filter")
            .map(str::to_owned)
    };
    assert_eq!(header().as_deref(), Some("v1"));

    // The new file names a module whose content is not what its pin says.
    let wrong = "2".repeat(64);
    std::fs::write(
        agent.config_path(),
        yaml("https://127.0.0.1:19612/hf.wasm?other", &wrong, "v2"),
    )
    .unwrap();
    wait_for_reloads(&agent, "rejected", 1.0);
    assert!(agent.log().contains("sha256 mismatch"), "{}", agent.log());
    assert!(
        agent.log().contains("the previous one stays in effect"),
        "{}",
        agent.log()
    );
    assert_eq!(
        header().as_deref(),
        Some("v1"),
        "the previous chain must stay"
    );

    // Then an OCI module (the compat image, pinned by manifest digest).
    std::fs::write(
        agent.config_path(),
        yaml("oci://127.0.0.1:19613/wisp/hf:v2", &digest, "v2"),
    )
    .unwrap();
    wait_for_reloads(&agent, "applied", 1.0);
    assert_eq!(header().as_deref(), Some("v2"));
}
