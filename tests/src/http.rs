//! HTTP requests made from inside a pod with curl, as a workload would make
//! them, and their parsed replies.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::node::{NodeError, Pod};

/// A response as the client in the pod received it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// Lower-case header names; repeated headers keep the last value.
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The body parsed as the JSON the echo server sends.
    pub fn echo(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.body).ok()
    }
}

/// `GET http://<target><path>` from inside `pod`, with extra request headers.
pub fn get(
    pod: &Pod,
    target: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, NodeError> {
    let mut command = pod.command("curl")?;
    command.args(["--silent", "--show-error", "--include", "--max-time", "10"]);
    for (name, value) in headers {
        command.args(["--header", &format!("{name}: {value}")]);
    }
    command.arg(format!("http://{target}{path}"));
    let out = crate::cmd::output(&mut command)?;
    Ok(parse(&out))
}

/// Parses curl's `--include` output: status line, headers, blank line, body.
pub fn parse(raw: &str) -> Reply {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// curl from the host namespace (`--include`, 10 s limit) with `args`; the
/// parsed reply, or curl's error text when it could not get one (refused
/// handshake, closed connection, …).
pub fn curl(args: &[&str]) -> Result<Reply, String> {
    let out = std::process::Command::new("curl")
        .args(["--silent", "--show-error", "--include", "--max-time", "10"])
        .args(args)
        .output()
        .map_err(|e| format!("cannot run curl ({e}); `cargo xtask setup` installs it"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(parse(&String::from_utf8_lossy(&out.stdout)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_curl_include_output() {
        let reply = super::parse(
            "HTTP/1.1 403 Forbidden\r\nX-Wisp-Filter: demo\r\ncontent-length: 5\r\n\r\nnope\n",
        );
        assert_eq!(reply.status, 403);
        assert_eq!(reply.header("x-wisp-filter"), Some("demo"));
        assert_eq!(reply.body, "nope\n");
    }
}
