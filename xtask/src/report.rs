//! Writing benchmark results into `docs/benchmarks.md`: each benchmark
//! command owns one section between markers and replaces only that, so
//! results from different commands and days live side by side.

use std::path::PathBuf;

/// One line naming the machine and the date, for every result table.
pub fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {memory_gib:.0} GiB, Linux {}, {date}",
        kernel.trim()
    )
}

fn benchmarks_md() -> PathBuf {
    crate::workspace_root().join("docs/benchmarks.md")
}

/// Replaces the section `name` of docs/benchmarks.md with `markdown`.
pub fn write_section(name: &str, markdown: &str) -> anyhow::Result<()> {
    let path = benchmarks_md();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        "# Benchmarks\n\nWritten by the `cargo xtask bench …` commands; each section says which command \
         produced it, on which machine, and when. Benchmarks report — they never pass or fail.\n"
            .to_owned()
    });
    let start = format!("<!-- bench:{name}:start -->");
    let end = format!("<!-- bench:{name}:end -->");
    let section = format!("{start}\n{}\n{end}", markdown.trim_end());
    let updated = match (text.find(&start), text.find(&end)) {
        (Some(s), Some(e)) if e > s => format!("{}{section}{}", &text[..s], &text[e + end.len()..]),
        _ => format!("{}\n{section}\n", text.trim_end()),
    };
    std::fs::write(&path, updated)?;
    println!("wrote the {name} section of {}", path.display());
    Ok(())
}
