//! A configuration with a mistake is refused at start with an error naming
//! the field (and line) or the file — by `wisp check-config` and `wisp run`
//! alike — and the agent never panics on it or attaches anything.

use std::path::Path;
use std::process::Command;

use wisp_testbed::artifacts;

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

fn wisp(args: &[&str], config: &str) -> Outcome {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("wisp-config-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("wisp.yaml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(artifacts::wisp_bin().unwrap())
        .args(args)
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    Outcome {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn base() -> String {
    let filter = artifacts::header_filter_wasm().unwrap();
    format!(
        "outbound:\n  listen: 10.213.99.1:15001\nplugins:\n  - name: f\n    module: {}\nworkloads:\n  - name: me\n    netns: /proc/self/ns/net\n",
        filter.display()
    )
}

/// Both `check-config FILE` and `run --config FILE` refuse it the same way.
fn assert_refused(config: &str, expected: &[&str]) {
    for args in [&["check-config"][..], &["run", "--config"][..]] {
        let outcome = wisp(args, config);
        assert_eq!(
            outcome.code,
            Some(78),
            "wisp {args:?} should exit with EX_CONFIG: {}",
            outcome.stderr
        );
        for text in expected {
            assert!(
                outcome.stderr.contains(text),
                "wisp {args:?}: expected {text:?} in:\n{}",
                outcome.stderr
            );
        }
        assert!(!outcome.stderr.contains("panicked"), "{}", outcome.stderr);
    }
}

#[test]
fn the_base_config_is_accepted_by_check_config() {
    let outcome = wisp(&["check-config"], &base());
    assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);
}

#[test]
fn unknown_field_is_named_with_its_line() {
    let config = base().replace("    module:", "    rooot_id: x\n    module:");
    assert_refused(&config, &[":5: unknown field `rooot_id`"]);
}

#[test]
fn missing_filter_file_is_named() {
    let config = base().replace(".wasm", ".missing.wasm");
    assert_refused(
        &config,
        &[":5: `plugins[0].module`", "wisp_header_filter.missing.wasm"],
    );
}

#[test]
fn bad_address_is_named_with_its_line() {
    let config = base().replace("10.213.99.1:15001", "10.213.99.1:notaport");
    assert_refused(&config, &[":2: `listen`", "notaport"]);
}

#[test]
fn a_module_that_is_not_wasm_is_refused_naming_the_plugin() {
    let dir =
        std::env::temp_dir().join(format!("wisp-config-test-{}-bad-wasm", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bogus = dir.join("bogus.wasm");
    std::fs::write(&bogus, b"not wasm at all").unwrap();
    let filter = artifacts::header_filter_wasm().unwrap();
    let config = base().replace(filter.to_str().unwrap(), bogus.to_str().unwrap());
    let outcome = wisp(&["check-config"], &config);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(outcome.code, Some(1), "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("plugin \"f\""),
        "{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains(Path::new(&bogus).to_str().unwrap()),
        "{}",
        outcome.stderr
    );
    assert!(!outcome.stderr.contains("panicked"), "{}", outcome.stderr);
}

#[test]
fn enrolling_the_agents_own_namespace_is_refused() {
    // /proc/self/ns/net as seen by wisp is wisp's own namespace: steering it
    // would loop the agent's connections back to itself.
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root to load eBPF: run `cargo xtask test` as root"
    );
    let config = base().replace(
        "  listen: 10.213.99.1:15001\n",
        "  listen: 0.0.0.0:15093\n  redirect_address: 10.213.99.1\nadmin:\n  listen: 127.0.0.1:15193\n",
    );
    let outcome = wisp(&["run", "--config"], &config);
    assert_eq!(outcome.code, Some(1), "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("refusing to enroll me"),
        "{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains("own network namespace"),
        "{}",
        outcome.stderr
    );
    assert!(!outcome.stderr.contains("panicked"), "{}", outcome.stderr);
}
