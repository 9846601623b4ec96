//! What of ours is still on the machine: network namespaces, interfaces and
//! cgroups whose names start with the testbed's prefixes, attached BPF
//! programs named like wisp's, and pins under /sys/fs/bpf named `wisp*`. Tests and the demo assert this is empty.

use crate::cmd;

/// Everything found, one line each; empty when the machine is clean.
/// `tag` narrows the search to one node's names (`None`: all of ours).
pub fn find(tag: Option<&str>) -> Vec<String> {
    let mut found = Vec::new();
    let netns_prefix = match tag {
        Some(tag) => format!("{}-{tag}-", crate::PREFIX),
        None => format!("{}-", crate::PREFIX),
    };
    if let Ok(list) = cmd::ip(&["netns", "list"]) {
        found.extend(
            list.lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|n| n.starts_with(&netns_prefix))
                .map(|n| format!("network namespace {n}")),
        );
    }
    let link_prefixes: Vec<String> = match tag {
        Some(tag) => vec![format!("wb-{tag}"), format!("wv-{tag}-")],
        None => vec!["wb-".into(), "wv-".into()],
    };
    if let Ok(list) = cmd::ip(&["-o", "link", "show"]) {
        for line in list.lines() {
            // "12: wv-t1-0@if11: <...>"
            let Some(name) = line
                .split(": ")
                .nth(1)
                .map(|n| n.split('@').next().unwrap_or(n))
            else {
                continue;
            };
            if link_prefixes.iter().any(|p| name.starts_with(p.as_str())) {
                found.push(format!("interface {name}"));
            }
        }
    }
    if let Ok(Some(root)) = crate::node::cgroup2_root() {
        let cgroup_prefix = match tag {
            Some(tag) => format!("{}-{tag}", crate::PREFIX),
            None => format!("{}-", crate::PREFIX),
        };
        if let Ok(entries) = std::fs::read_dir(&root) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(&cgroup_prefix) {
                    found.push(format!("cgroup {}", entry.path().display()));
                }
            }
        }
    }
    if tag.is_none() {
        found.extend(attached_wisp_programs());
        found.extend(wisp_pins());
    }
    found
}

/// Pins of ours under bpffs: entries of `/sys/fs/bpf` named `wisp*`.
pub fn wisp_pins() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(crate::PREFIX))
        .map(|name| format!("bpffs pin /sys/fs/bpf/{name}"))
        .collect()
}

/// wisp's BPF programs (by name) still loaded anywhere on the machine, as
/// bpftool lists them.
pub fn attached_wisp_programs() -> Vec<String> {
    // The kernel frees a program shortly after its last link, pin and
    // descriptor are gone (deferred work): give it a moment to settle.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let found = list_wisp_programs();
        if found.is_empty() || std::time::Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn list_wisp_programs() -> Vec<String> {
    let Ok(list) = cmd::run("bpftool", &["prog", "show"]) else {
        return vec!["bpftool prog show failed (is bpftool installed?)".into()];
    };
    list.lines()
        .filter(|l| l.contains(" name wisp_"))
        .map(|l| format!("BPF program: {}", l.trim()))
        .collect()
}
