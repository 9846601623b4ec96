//! The kernel-side fields of the agent config are refused with the field
//! and the line they are on.

use crate::config::Config;

fn load(text: &str) -> Result<Config, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wisp.yaml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).map_err(|e| e.to_string())
}

const BASE: &str = "\
outbound:
  listen: '[::]:15001'
  redirect_address: 10.1.0.1
  redirect_address_v6: 'fd00::1'
workloads:
  - name: web
    netns: /proc/self/ns/net
";

#[test]
fn ipv6_redirect_with_a_dual_stack_listener_is_accepted() {
    let config = load(BASE).unwrap();
    assert_eq!(
        config.redirect_target_v6().unwrap().unwrap().to_string(),
        "[fd00::1]:15001"
    );
    assert_eq!(
        config.redirect_target().unwrap().to_string(),
        "10.1.0.1:15001"
    );
}

#[test]
fn ipv6_redirect_needs_a_listener_that_accepts_ipv6() {
    let err = load(&BASE.replace("'[::]:15001'", "0.0.0.0:15001")).unwrap_err();
    assert!(err.contains(":4: `outbound.redirect_address_v6`"), "{err}");
    assert!(err.contains("[::]:15001"), "{err}");
    let err = load(&BASE.replace("'fd00::1'", "'::1'")).unwrap_err();
    assert!(err.contains(":4: `outbound.redirect_address_v6`"), "{err}");
}

#[test]
fn policy_from_an_unknown_workload_is_named() {
    let text = format!("{BASE}policy:\n  - action: deny\n    from: nope\n    to: 10.0.0.0/8\n");
    let err = load(&text).unwrap_err();
    assert!(err.contains(":10: `policy[0].from`"), "{err}");
    let text = format!("{BASE}policy:\n  - action: deny\n    to: 10.0.0.0/33\n");
    let err = load(&text).unwrap_err();
    assert!(err.contains(":10:"), "{err}");
    assert!(err.contains("prefix length"), "{err}");
    let text = format!("{BASE}policy:\n  - action: maybe\n");
    assert!(load(&text).is_err());
}

#[test]
fn service_backends_of_another_family_are_named() {
    let text = format!(
        "{BASE}services:\n  - name: db\n    vip: 10.96.0.1\n    port: 5432\n    backends:\n      - address: '[fd00::5]:5432'\n"
    );
    let err = load(&text).unwrap_err();
    assert!(
        err.contains(":13: `services[0].backends[0].address`"),
        "{err}"
    );
    let text = format!(
        "{BASE}services:\n  - name: db\n    vip: 10.96.0.1\n    port: 5432\n    backends: []\n"
    );
    let err = load(&text).unwrap_err();
    assert!(err.contains("`services[0].backends`"), "{err}");
}

#[test]
fn ebpf_section_defaults() {
    let config = load(BASE).unwrap();
    assert_eq!(config.ebpf.pin_path, None);
    assert!(!config.ebpf.keep_on_exit);
    let options = super::DataplaneOptions::from_config(&config, config.redirect_target().unwrap());
    assert_eq!(
        options.pin_path,
        std::path::Path::new(super::DEFAULT_PIN_PATH)
    );
}

#[test]
fn socket_steering_and_kernel_log_level_default_off_and_parse() {
    let config = load(BASE).unwrap();
    assert!(!config.ebpf.socket_steering);
    assert_eq!(config.ebpf.log_level, crate::ebpf::KernelLogLevel::Off);
    let config = load(&format!(
        "{BASE}ebpf:\n  socket_steering: true\n  log_level: debug\ninbound:\n  enabled: true\n  ports: {{5432: tcp}}\n"
    ))
    .unwrap();
    assert!(config.ebpf.socket_steering);
    assert_eq!(config.ebpf.log_level, crate::ebpf::KernelLogLevel::Debug);
    assert_eq!(
        config.inbound.ports.get(&5432),
        Some(&crate::listener::Protocol::Tcp)
    );
}

#[test]
fn an_unknown_kernel_log_level_is_named_with_its_line() {
    let err = load(&format!("{BASE}ebpf:\n  log_level: loud\n")).unwrap_err();
    assert!(err.contains(":9:"), "{err}");
    assert!(err.contains("loud"), "{err}");
}
