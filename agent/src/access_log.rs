//! The optional access log: one JSON line per HTTP request, written when its
//! response headers go out. Every worker appends to the same file through
//! its own descriptor; appends of a whole line are not interleaved.

use std::cell::RefCell;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

/// One request, as logged.
#[derive(Debug, serde::Serialize)]
pub struct Entry<'a> {
    pub start_time_unix_ms: u128,
    pub duration_ms: f64,
    pub listener: &'a str,
    pub source_workload: &'a str,
    pub peer: SocketAddr,
    pub destination: SocketAddr,
    pub protocol: &'a str,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub response_code: u16,
}

/// A worker's handle on the access log file.
pub struct AccessLog {
    file: RefCell<std::fs::File>,
}

impl AccessLog {
    /// Opens (creating, appending) the shared file once, on the main thread.
    pub fn open(path: &Path) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    }

    /// A worker's own descriptor for the shared file.
    pub fn for_worker(shared: &std::fs::File) -> std::io::Result<AccessLog> {
        Ok(AccessLog {
            file: RefCell::new(shared.try_clone()?),
        })
    }

    pub fn record(&self, entry: &Entry<'_>) {
        let Ok(mut line) = serde_json::to_vec(entry) else {
            return;
        };
        line.push(b'\n');
        if let Err(error) = self.file.borrow_mut().write_all(&line) {
            tracing::warn!(%error, "cannot write the access log");
        }
    }
}
