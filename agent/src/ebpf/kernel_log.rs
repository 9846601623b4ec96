//! Kernel-side debug logs: the programs write aya-log records to their
//! `AYA_LOGS` ring buffer when the level in `WISP_SETTINGS` allows it (off
//! by default, so the hot path pays one array read), and a thread of the
//! agent turns them into `tracing` events (target `wisp::kernel`, at INFO so
//! they show at the agent's default log level: what is logged is chosen by
//! `ebpf.log_level`). The level is set at start from `ebpf.log_level` and
//! can be changed while the agent runs with `wisp ebpf log-level LEVEL`,
//! which writes the pinned settings map.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use wisp_common::{LOG_DEBUG, LOG_ERROR, LOG_INFO, LOG_OFF, LOG_TRACE, LOG_WARN};

/// `ebpf.log_level`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelLogLevel {
    #[default]
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl KernelLogLevel {
    /// The value the kernel programs compare against.
    pub fn to_kernel(self) -> u64 {
        match self {
            KernelLogLevel::Off => LOG_OFF,
            KernelLogLevel::Error => LOG_ERROR,
            KernelLogLevel::Warn => LOG_WARN,
            KernelLogLevel::Info => LOG_INFO,
            KernelLogLevel::Debug => LOG_DEBUG,
            KernelLogLevel::Trace => LOG_TRACE,
        }
    }

    pub fn from_kernel(value: u64) -> KernelLogLevel {
        match value {
            LOG_OFF => KernelLogLevel::Off,
            LOG_ERROR => KernelLogLevel::Error,
            LOG_WARN => KernelLogLevel::Warn,
            LOG_INFO => KernelLogLevel::Info,
            LOG_DEBUG => KernelLogLevel::Debug,
            _ => KernelLogLevel::Trace,
        }
    }
}

impl std::str::FromStr for KernelLogLevel {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "off" => Ok(KernelLogLevel::Off),
            "error" => Ok(KernelLogLevel::Error),
            "warn" => Ok(KernelLogLevel::Warn),
            "info" => Ok(KernelLogLevel::Info),
            "debug" => Ok(KernelLogLevel::Debug),
            "trace" => Ok(KernelLogLevel::Trace),
            other => Err(format!(
                "{other:?}: expected off, error, warn, info, debug or trace"
            )),
        }
    }
}

impl std::fmt::Display for KernelLogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            KernelLogLevel::Off => "off",
            KernelLogLevel::Error => "error",
            KernelLogLevel::Warn => "warn",
            KernelLogLevel::Info => "info",
            KernelLogLevel::Debug => "debug",
            KernelLogLevel::Trace => "trace",
        };
        f.write_str(name)
    }
}

/// Forwards aya-log records to `tracing`.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        tracing::info!(target: "wisp::kernel", level = %record.level(), "{}", record.args());
    }
    fn flush(&self) {}
}

/// The thread reading the kernel's log ring buffer; stops when dropped.
pub struct KernelLogReader {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KernelLogReader {
    /// Reads the records of the object this agent loaded.
    pub fn from_loaded(ebpf: &mut aya::Ebpf) -> Result<KernelLogReader, aya_log::Error> {
        let logger = aya_log::EbpfLogger::init_with_logger(ebpf, ToTracing)?;
        Ok(Self::spawn(logger))
    }

    /// Reads the records of pinned programs (adopted state): the ring
    /// buffer is found through the program with id `program_id`.
    pub fn from_program(program_id: u32) -> Result<KernelLogReader, aya_log::Error> {
        let logger = aya_log::EbpfLogger::init_from_id_with_logger(program_id, ToTracing)?;
        Ok(Self::spawn(logger))
    }

    fn spawn(mut logger: aya_log::EbpfLogger<ToTracing>) -> KernelLogReader {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("wisp-kernel-log".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    let mut poll = libc::pollfd {
                        fd: logger.as_fd().as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd; a timeout so `stop` is seen.
                    let ready = unsafe { libc::poll(&mut poll, 1, 200) };
                    if ready > 0 {
                        logger.flush();
                    }
                }
                logger.flush();
            })
            .ok();
        KernelLogReader { stop, thread }
    }
}

impl Drop for KernelLogReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_round_trip() {
        for name in ["off", "error", "warn", "info", "debug", "trace"] {
            let level: KernelLogLevel = name.parse().unwrap();
            assert_eq!(level.to_string(), name);
            assert_eq!(KernelLogLevel::from_kernel(level.to_kernel()), level);
        }
        assert!(
            "loud"
                .parse::<KernelLogLevel>()
                .unwrap_err()
                .contains("expected off")
        );
    }
}
