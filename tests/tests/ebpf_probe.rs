//! Feature probing at start: what the kernel side needs and is missing is
//! refused at start with one clear error naming it and what to do.
//! (A kernel without cgroup_sock_addr / sock_ops program types cannot be
//! produced on a test machine; that error comes from the same probe.)

use std::net::SocketAddr;

use wisp_testbed::agent::{Agent, AgentError};
use wisp_testbed::artifacts;

const ADMIN: &str = "127.0.0.1:15494";

fn start_failure(ebpf_section: &str) -> String {
    let yaml = format!(
        "outbound:\n  listen: 0.0.0.0:15404\n  redirect_address: 10.213.34.1\n\
         admin:\n  listen: {ADMIN}\nworkers: 1\nebpf:\n{ebpf_section}"
    );
    let admin: SocketAddr = ADMIN.parse().unwrap();
    match Agent::start_yaml(&artifacts::wisp_bin().unwrap(), &yaml, admin) {
        Err(AgentError::Exited { status, log }) => {
            assert!(!status.success());
            log
        }
        Err(other) => panic!("expected the agent to exit: {other}"),
        Ok(agent) => panic!("the agent started:\n{}", agent.log()),
    }
}

#[test]
fn a_cgroup_root_that_is_not_cgroup_v2_is_named() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "run as root: the probe runs after the root check"
    );
    let dir = std::env::temp_dir().join(format!("wisp-probe-cg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = start_failure(&format!(
        "  cgroup_root: {}\n  pin_path: /sys/fs/bpf/wisp-test-15404\n",
        dir.display()
    ));
    let _ = std::fs::remove_dir(&dir);
    assert!(log.contains("is not a cgroup v2 directory"), "{log}");
    assert!(log.contains("ebpf.cgroup_root"), "{log}");
    assert!(!std::path::Path::new("/sys/fs/bpf/wisp-test-15404").exists());
}

#[test]
fn a_pin_path_outside_bpffs_is_named() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "run as root: the probe runs after the root check"
    );
    let dir = std::env::temp_dir().join(format!("wisp-probe-pin-{}", std::process::id()));
    let log = start_failure(&format!("  pin_path: {}\n", dir.display()));
    assert!(log.contains("ebpf.pin_path"), "{log}");
    assert!(log.contains("is not on a bpf filesystem"), "{log}");
    assert!(log.contains("mount -t bpf"), "{log}");
    assert!(!dir.exists());
}
