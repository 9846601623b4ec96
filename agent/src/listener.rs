//! What a listener is: an address, how the destination of each accepted
//! connection is found, and which protocol to speak on it.

use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4};

use serde::{Deserialize, Serialize};

use crate::tls::{ServerTls, UpstreamTls};

/// How a listener learns where an accepted connection was going.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Destination {
    /// The kernel steered it here; its record holds the original destination
    /// and the workload it came from (`wisp run`).
    Steered,
    /// Every connection goes to one upstream (`wisp proxy --upstream ADDR`).
    Fixed(SocketAddr),
    /// iptables REDIRECT captured it; `SO_ORIGINAL_DST` tells where it was
    /// going (`wisp proxy --upstream original-dst`, sidecar mode).
    OriginalDst,
    /// Inbound: `wisp_sk_lookup` handed a connection arriving at an enrolled
    /// pod to the agent's listener inside that pod's namespace; the accepted
    /// socket's local address is the pod IP:port the client asked for. The
    /// listeners come from the dataplane (`inbound.enabled`), not from `addr`.
    Inbound,
}

/// The protocol spoken on a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Look at the first bytes: the HTTP/2 preface → HTTP/2, an HTTP/1
    /// request line → HTTP/1.1, anything else (or silence) → TCP.
    #[default]
    Auto,
    Http1,
    Http2,
    /// Pass bytes through unchanged.
    Tcp,
}

#[derive(Clone, Debug, Serialize)]
pub struct ListenerSpec {
    /// For logs and metrics: `outbound`, `inbound`, `proxy`.
    pub name: String,
    pub addr: SocketAddr,
    pub destination: Destination,
    /// Protocol for destination ports not listed in `port_protocols`.
    pub protocol: Protocol,
    /// Per destination port.
    pub port_protocols: BTreeMap<u16, Protocol>,
    /// Terminate TLS on this listener with these certificates.
    pub tls: Option<ServerTls>,
    /// Originate TLS (or mTLS) to the upstream.
    pub upstream_tls: Option<UpstreamTls>,
}

impl ListenerSpec {
    /// The protocol configured for connections to `destination`.
    pub fn protocol_for(&self, destination: SocketAddr) -> Protocol {
        self.port_protocols
            .get(&destination.port())
            .copied()
            .unwrap_or(self.protocol)
    }
}

/// The destination iptables' REDIRECT/DNAT recorded for `stream`
/// (`SO_ORIGINAL_DST`, IPv4).
pub fn original_dst(stream: &tokio::net::TcpStream) -> std::io::Result<SocketAddr> {
    use std::os::fd::AsRawFd;
    // SAFETY: sockaddr_in is plain data; zero is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `addr`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&raw mut addr).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let ip = std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
    Ok(SocketAddr::V4(SocketAddrV4::new(
        ip,
        u16::from_be(addr.sin_port),
    )))
}
