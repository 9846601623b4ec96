//! Load generation with wrk (Debian) and reading a process's memory, for the
//! benchmark commands. Nothing here asserts speed: results are reported.

use std::process::Command;

use crate::cmd::{self, CmdError};

/// What one wrk run measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct WrkResult {
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    /// Responses that were not 2xx/3xx, plus socket errors.
    pub errors: u64,
}

/// `wrk -t THREADS -c CONNECTIONS -d SECONDS --latency URL` (optionally with
/// extra args such as `-H`), parsed.
pub fn wrk(
    url: &str,
    threads: usize,
    connections: usize,
    seconds: u64,
    extra: &[&str],
) -> Result<WrkResult, CmdError> {
    let out = cmd::output(
        Command::new("wrk")
            .args(["-t", &threads.to_string(), "-c", &connections.to_string()])
            .args(["-d", &format!("{seconds}s"), "--latency"])
            .args(extra)
            .arg(url),
    )?;
    Ok(parse_wrk(&out))
}

fn duration_ms(text: &str) -> f64 {
    let text = text.trim();
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (text, 1.0)
    };
    number.parse::<f64>().map_or(f64::NAN, |n| n * factor)
}

/// Parses wrk's `--latency` report.
pub fn parse_wrk(out: &str) -> WrkResult {
    let mut result = WrkResult::default();
    for line in out.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("50%"), Some(v)) => result.p50_ms = duration_ms(v),
            (Some("90%"), Some(v)) => result.p90_ms = duration_ms(v),
            (Some("99%"), Some(v)) => result.p99_ms = duration_ms(v),
            (Some("Requests/sec:"), Some(v)) => {
                result.requests_per_second = v.parse().unwrap_or(0.0)
            }
            (Some(n), Some("requests")) => result.requests = n.parse().unwrap_or(0),
            (Some("Non-2xx"), _) => {
                result.errors += line
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            }
            (Some("Socket"), Some("errors:")) => {
                result.errors += line
                    .split([',', ':'])
                    .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    result
}

/// Resident set size of a process in MiB (`VmRSS` in /proc/PID/status).
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// The machine's CPU time so far, from the first line of /proc/stat, in
/// clock ticks: (all of it, the part a hypervisor gave to other guests).
/// Steal is how a shared VM shows that its cores were busy elsewhere.
pub fn machine_cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice],
    // guest time is already counted in user.
    let total = fields.iter().take(8).sum();
    Some((total, *fields.get(7)?))
}

/// The share of the machine's CPU time stolen between two
/// [`machine_cpu_ticks`] readings, in percent.
pub fn steal_percent(before: (u64, u64), after: (u64, u64)) -> Option<f64> {
    let total = after.0.checked_sub(before.0)?;
    let steal = after.1.checked_sub(before.1)?;
    (total > 0).then(|| steal as f64 * 100.0 / total as f64)
}

/// CPU time a process has used so far, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuTimes {
    /// In user space: the process's own code.
    pub user: f64,
    /// In the kernel on the process's behalf: its system calls, and for
    /// loopback TCP also the receiving side's network stack.
    pub system: f64,
}

impl CpuTimes {
    pub fn total(&self) -> f64 {
        self.user + self.system
    }
}

/// CPU time (user and system) a process has used, from `/proc/PID/stat`.
pub fn cpu_times(pid: u32) -> Option<CpuTimes> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(CpuTimes {
        user: utime / hz,
        system: stime / hz,
    })
}

/// CPU time (user + system) a process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_times(pid).map(|times| times.total())
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_a_wrk_report() {
        let out = "Running 2s test @ http://127.0.0.1:1/\n  1 threads and 4 connections\n  Latency Distribution\n     50%  120.00us\n     75%  150.00us\n     90%  200.00us\n     99%    1.50ms\n  40000 requests in 2.00s, 6.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 3\nRequests/sec:  19999.50\nTransfer/sec:      3.00MB\n";
        let r = super::parse_wrk(out);
        assert_eq!(r.requests, 40000);
        assert!((r.requests_per_second - 19999.5).abs() < 1e-9);
        assert!((r.p50_ms - 0.12).abs() < 1e-9);
        assert!((r.p99_ms - 1.5).abs() < 1e-9);
        assert_eq!(r.errors, 6);
    }

    #[test]
    fn reads_the_machines_cpu_ticks() {
        let (total, steal) = super::machine_cpu_ticks().expect("/proc/stat has a cpu line");
        assert!(total > 0 && steal <= total);
        assert_eq!(super::steal_percent((100, 10), (300, 30)), Some(10.0));
        assert_eq!(super::steal_percent((100, 10), (100, 10)), None);
    }

    #[test]
    fn reads_a_process_cpu_times() {
        // Burn some user time, so the reading cannot be all zeros.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let times = super::cpu_times(std::process::id()).expect("/proc/self/stat is readable");
        assert!(times.user > 0.0, "{times:?}");
        assert!(times.system >= 0.0);
        assert_eq!(
            super::cpu_seconds(std::process::id()).map(|s| s > 0.0),
            Some(true)
        );
        assert_eq!(super::cpu_times(u32::MAX), None);
    }
}
