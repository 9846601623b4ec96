//! `wisp ebpf status` and `wisp ebpf detach`: what wisp has attached and
//! pinned on this node, and removing all of it (for uninstalling, or after an
//! agent that kept its programs with `ebpf.keep_on_exit` is gone for good);
//! `wisp ebpf log-level` changes the kernel programs' log level at runtime.

use std::fmt::Write as _;
use std::path::PathBuf;

use aya::maps::{Array, HashMap, Map, MapData};
use aya::programs::links::{FdLink, PinnedLink};
use wisp_common::{
    META_BUILD, META_CGROUP, REDIRECT_V4, REDIRECT_V6, RedirectTarget, SETTING_LOG_LEVEL,
    SETTING_SOCKET_STEERING, maps,
};

use super::{DEFAULT_PIN_PATH, KernelLogLevel, Pins, build_id, pins};

#[derive(Debug, clap::Subcommand)]
pub enum EbpfCommand {
    /// Show the programs, links and maps wisp has pinned, what they are
    /// attached to, and what the maps hold.
    Status {
        /// The agent's `ebpf.pin_path`.
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Detach and unpin everything under the pin path. A running agent stops
    /// steering too (its links are force-detached).
    Detach {
        /// The agent's `ebpf.pin_path`.
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Set the kernel programs' log level while they run (aya-log records,
    /// shown in the agent's log as `wisp::kernel`): off, error, warn, info,
    /// debug or trace. Lasts until the agent restarts with `ebpf.log_level`.
    LogLevel {
        level: KernelLogLevel,
        /// The agent's `ebpf.pin_path`.
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
}

/// Runs the subcommand; the text is printed on stdout.
pub fn run(command: &EbpfCommand) -> Result<String, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("reading pinned BPF objects needs root; run it as root".into());
    }
    match command {
        EbpfCommand::Status { pin_path } => Ok(status(&Pins::new(pin_path))),
        EbpfCommand::LogLevel { level, pin_path } => {
            let pins = Pins::new(pin_path);
            let path = pins.map(maps::SETTINGS);
            let mut settings = MapData::from_pin(&path)
                .ok()
                .and_then(|m| Map::from_map_data(m).ok())
                .and_then(|m| Array::<MapData, u64>::try_from(m).ok())
                .ok_or_else(|| {
                    format!(
                        "no wisp settings map at {} (is an agent running with this ebpf.pin_path?)",
                        path.display()
                    )
                })?;
            let previous = settings.get(&SETTING_LOG_LEVEL, 0).unwrap_or(0);
            settings
                .set(SETTING_LOG_LEVEL, level.to_kernel(), 0)
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
            Ok(format!(
                "kernel log level {} (was {})\n",
                level,
                KernelLogLevel::from_kernel(previous)
            ))
        }
        EbpfCommand::Detach { pin_path } => {
            let pins = Pins::new(pin_path);
            if !pins.root.exists() {
                return Ok(format!("nothing pinned at {}\n", pins.root.display()));
            }
            let removed = pins
                .remove_all(true)
                .map_err(|e| format!("removing the pins under {}: {e}", pins.root.display()))?;
            let mut out = String::new();
            for item in &removed {
                let _ = writeln!(out, "detached and unpinned {item}");
            }
            let _ = writeln!(
                out,
                "removed {} pinned object(s) and {}",
                removed.len(),
                pins.root.display()
            );
            Ok(out)
        }
    }
}

fn status(pins: &Pins) -> String {
    let mut out = String::new();
    let listed = pins.list();
    if listed.is_empty() {
        let bpffs = if pins::is_bpffs(pins.root.parent().unwrap_or(&pins.root)) {
            ""
        } else {
            " (its parent is not a bpffs mount)"
        };
        let _ = writeln!(out, "nothing pinned at {}{bpffs}", pins.root.display());
        return out;
    }
    let _ = writeln!(out, "pin path {}", pins.root.display());
    let programs: std::collections::HashMap<u32, String> = aya::programs::loaded_programs()
        .flatten()
        .map(|p| (p.id(), p.name_as_str().unwrap_or("?").to_owned()))
        .collect();
    for (kind, name, path) in &listed {
        let detail = match *kind {
            "link" => match PinnedLink::from_pin(path).map(FdLink::from) {
                Ok(link) => match link.info() {
                    Ok(info) if info.program_id() != 0 => format!(
                        "attached: link id {}, program id {} ({})",
                        info.id(),
                        info.program_id(),
                        programs.get(&info.program_id()).map_or("?", String::as_str)
                    ),
                    Ok(info) => format!("link id {}, detached", info.id()),
                    Err(e) => format!("unreadable: {e}"),
                },
                Err(e) => format!("unreadable: {e}"),
            },
            "program" => match aya::programs::ProgramInfo::from_pin(path) {
                Ok(info) => format!("program id {}, ran {} time(s)", info.id(), info.run_count()),
                Err(e) => format!("unreadable: {e}"),
            },
            _ => match aya::maps::MapInfo::from_pin(path) {
                Ok(info) => format!("map id {}, {} entries max", info.id(), info.max_entries()),
                Err(e) => format!("unreadable: {e}"),
            },
        };
        let _ = writeln!(out, "{kind:<8} {name:<24} {detail}");
    }
    // Links of wisp's programs that are not pinned here: the per-namespace
    // sk_lookup links of a running agent (inbound), or another agent's.
    let pinned_links: std::collections::HashSet<u32> = listed
        .iter()
        .filter(|(kind, _, _)| *kind == "link")
        .filter_map(|(_, _, path)| PinnedLink::from_pin(path).ok())
        .filter_map(|link| FdLink::from(link).info().ok().map(|i| i.id()))
        .collect();
    for info in aya::programs::loaded_links().flatten() {
        let Some(name) = programs.get(&info.program_id()) else {
            continue;
        };
        if name.starts_with("wisp_") && !pinned_links.contains(&info.id()) {
            let _ = writeln!(
                out,
                "{:<8} {:<24} attached by a running agent: link id {}, program id {} (not pinned)",
                "link",
                name,
                info.id(),
                info.program_id()
            );
        }
    }
    let open = |name: &str| {
        MapData::from_pin(pins.map(name))
            .ok()
            .and_then(|m| Map::from_map_data(m).ok())
    };
    if let Some(meta) = open(maps::META).and_then(|m| Array::<MapData, u64>::try_from(m).ok()) {
        let build = meta.get(&META_BUILD, 0).unwrap_or(0);
        let cgroup = meta.get(&META_CGROUP, 0).unwrap_or(0);
        let same = if build == build_id() {
            "this wisp build"
        } else {
            "another wisp build"
        };
        let _ = writeln!(
            out,
            "made by {same} (build {build:016x}); attached to the cgroup with inode {cgroup}"
        );
    }
    if let Some(redirect) =
        open(maps::REDIRECT).and_then(|m| Array::<MapData, RedirectTarget>::try_from(m).ok())
    {
        for (family, index) in [("IPv4", REDIRECT_V4), ("IPv6", REDIRECT_V6)] {
            match redirect.get(&index, 0) {
                Ok(t) if t.enabled != 0 => {
                    let addr = std::net::SocketAddr::new(wisp_common::words_to_addr(t.ip), t.port);
                    let _ = writeln!(out, "{family} connects steered to {addr}");
                }
                _ => {
                    let _ = writeln!(out, "{family} connects not steered");
                }
            }
        }
    }
    if let Some(enrolled) = open(maps::ENROLLED)
        .and_then(|m| HashMap::<MapData, u64, wisp_common::Workload>::try_from(m).ok())
    {
        let _ = writeln!(
            out,
            "enrolled network namespaces: {}",
            enrolled.keys().filter(Result::is_ok).count()
        );
    }
    if let Some(settings) =
        open(maps::SETTINGS).and_then(|m| Array::<MapData, u64>::try_from(m).ok())
    {
        let steering = settings.get(&SETTING_SOCKET_STEERING, 0).unwrap_or(0) != 0;
        let level = KernelLogLevel::from_kernel(settings.get(&SETTING_LOG_LEVEL, 0).unwrap_or(0));
        let _ = writeln!(
            out,
            "socket steering {}; kernel log level {level}",
            if steering { "on" } else { "off" }
        );
    }
    out
}
