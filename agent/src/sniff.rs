//! Protocol detection from a connection's first bytes, for listeners whose
//! protocol is `auto` (the default, as Istio's protocol sniffing).
//!
//! Only client-first protocols can be detected: a server-first protocol
//! (SMTP, MySQL) sends nothing until the server speaks, so detection gives up
//! after [`SNIFF_TIMEOUT`] and treats the connection as TCP. Set the port's
//! protocol to `tcp` in the config to skip the wait.

use std::time::Duration;

use crate::listener::Protocol;

/// How long to wait for the client's first bytes.
pub const SNIFF_TIMEOUT: Duration = Duration::from_millis(200);

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const HTTP1_METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// What the bytes seen so far say.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Known(Protocol),
    /// Consistent with HTTP so far; more bytes are needed.
    NeedMore,
}

/// Classifies the first bytes of a connection.
pub fn classify(bytes: &[u8]) -> Verdict {
    if bytes.is_empty() {
        return Verdict::NeedMore;
    }
    let could_be = |prefix: &[u8]| {
        let n = bytes.len().min(prefix.len());
        bytes[..n] == prefix[..n]
    };
    if bytes.len() >= H2_PREFACE.len() && bytes.starts_with(H2_PREFACE) {
        return Verdict::Known(Protocol::Http2);
    }
    if HTTP1_METHODS.iter().any(|m| bytes.starts_with(m)) {
        return Verdict::Known(Protocol::Http1);
    }
    if could_be(H2_PREFACE) || HTTP1_METHODS.iter().any(|m| could_be(m)) {
        return Verdict::NeedMore;
    }
    Verdict::Known(Protocol::Tcp)
}

/// Peeks at `stream` until [`classify`] decides, the client goes quiet for
/// [`SNIFF_TIMEOUT`], or the peer closes; the bytes stay in the socket.
pub async fn detect(stream: &tokio::net::TcpStream) -> Protocol {
    let mut buf = [0u8; H2_PREFACE.len()];
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    let mut last_len = 0;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Ok(Ok(n)) if n > 0 => n,
            // Closed, failed or silent: nothing HTTP can happen here.
            _ => return Protocol::Tcp,
        };
        match classify(&buf[..n]) {
            Verdict::Known(protocol) => return protocol,
            Verdict::NeedMore if n == buf.len() => return Protocol::Tcp,
            Verdict::NeedMore => {
                if n == last_len {
                    // peek returns at once while bytes are buffered; wait a
                    // little for more instead of spinning.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                last_len = n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_http1_http2_and_other_bytes() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\n"),
            Verdict::Known(Protocol::Http1)
        );
        assert_eq!(
            classify(b"DELETE /x HTTP/1.1"),
            Verdict::Known(Protocol::Http1)
        );
        assert_eq!(classify(H2_PREFACE), Verdict::Known(Protocol::Http2));
        assert_eq!(classify(b"PRI * HTT"), Verdict::NeedMore);
        assert_eq!(classify(b"GE"), Verdict::NeedMore);
        assert_eq!(
            classify(b"\x16\x03\x01"),
            Verdict::Known(Protocol::Tcp),
            "TLS ClientHello"
        );
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Verdict::Known(Protocol::Tcp));
        assert_eq!(
            classify(b"get / HTTP/1.1"),
            Verdict::Known(Protocol::Tcp),
            "methods are case-sensitive"
        );
    }
}
