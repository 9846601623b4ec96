//! The optional access log: one JSON line per HTTP request, written when its
//! response headers go out, and one per TCP connection, written when it
//! closes (`"protocol": "tcp"`, with the bytes each way). Every worker
//! appends to the same file through its own descriptor; appends of a whole
//! line are not interleaved.

use std::cell::RefCell;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Instant, SystemTime};

use crate::http_proxy::ConnectionInfo;

/// What every line says: when, how long, and which connection.
#[derive(Debug, serde::Serialize)]
pub struct ConnectionFields<'a> {
    pub start_time_unix_ms: u128,
    pub duration_ms: f64,
    pub listener: &'a str,
    pub source_workload: &'a str,
    pub peer: SocketAddr,
    pub destination: SocketAddr,
    /// The service whose VIP:port the workload connected to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_service: Option<&'a str>,
    /// `HTTP/1.1`, `HTTP/2` or `tcp`.
    pub protocol: &'a str,
}

impl<'a> ConnectionFields<'a> {
    /// The fields of `conn` for something that started at `start` (wall
    /// clock) / `started` (monotonic) and ends now.
    pub fn new(
        conn: &'a ConnectionInfo,
        start: SystemTime,
        started: Instant,
        protocol: &'a str,
    ) -> ConnectionFields<'a> {
        ConnectionFields {
            start_time_unix_ms: start
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            listener: &conn.listener,
            source_workload: &conn.source_workload,
            peer: conn.peer,
            destination: conn.destination,
            destination_service: conn.destination_service.as_deref(),
            protocol,
        }
    }
}

/// One request, as logged.
#[derive(Debug, serde::Serialize)]
pub struct Entry<'a> {
    #[serde(flatten)]
    pub connection: ConnectionFields<'a>,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub response_code: u16,
}

/// One TCP connection (not HTTP), as logged when it closed.
#[derive(Debug, serde::Serialize)]
pub struct TcpEntry<'a> {
    #[serde(flatten)]
    pub connection: ConnectionFields<'a>,
    /// From the client to the upstream, after the network filters.
    pub bytes_sent: u64,
    /// From the upstream to the client, after the network filters.
    pub bytes_received: u64,
    /// The upstream could not be reached.
    pub upstream_connect_failed: bool,
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

    /// Appends `entry` ([`Entry`] or [`TcpEntry`]) as one line.
    pub fn record(&self, entry: &impl serde::Serialize) {
        let Ok(mut line) = serde_json::to_vec(entry) else {
            return;
        };
        line.push(b'\n');
        if let Err(error) = self.file.borrow_mut().write_all(&line) {
            tracing::warn!(%error, "cannot write the access log");
        }
    }
}
