//! What a listener is: an address, how the destination of each accepted
//! connection is found, and which protocol to speak on it.

use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4};

use serde::{Deserialize, Serialize};

use crate::config::Located;
use crate::tls::{ListenerTlsConfig, ServerTls, UpstreamTls, UpstreamTlsConfig};

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
    /// Originate TLS (or mTLS) to destinations on these ports, overriding
    /// `upstream_tls` (`outbound.upstream_tls`).
    pub port_upstream_tls: BTreeMap<u16, UpstreamTls>,
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

/// An extra listener of `wisp run` (`listeners:`): every connection goes to
/// one upstream, e.g. a gateway or ingress for a service of this node. Unlike
/// the steered `outbound` listener, whose connections keep their own TLS end
/// to end, it can terminate TLS (`tls`) and originate it (`upstream_tls`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// For logs and metrics (`listener` label); unique, not `outbound`.
    pub name: String,
    /// Address to accept connections on, e.g. `0.0.0.0:8443`.
    pub listen: Located<SocketAddr>,
    /// Where every connection goes.
    pub upstream: Located<SocketAddr>,
    /// `auto` (default), `http1`, `http2` or `tcp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Terminate TLS with these certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTlsConfig>,
    /// Originate TLS (mTLS with a client certificate) to `upstream`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_tls: Option<UpstreamTlsConfig>,
}

impl ListenerConfig {
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        if let Some(tls) = &mut self.tls {
            tls.resolve_paths(base);
        }
        if let Some(tls) = &mut self.upstream_tls {
            tls.resolve_paths(base);
        }
    }

    /// Checks `listeners[index]` against the listeners before it (and the
    /// outbound one): `(line, field, message)`, the field relative to the
    /// entry.
    pub fn check(
        &self,
        earlier: &[ListenerConfig],
        outbound: SocketAddr,
    ) -> Result<(), (u64, String, String)> {
        let line = self.listen.line;
        if self.name.is_empty() || self.name == "outbound" {
            return Err((
                line,
                "name".into(),
                format!(
                    "{:?}: give the listener a name of its own (not empty, not `outbound`)",
                    self.name
                ),
            ));
        }
        if earlier.iter().any(|l| l.name == self.name) {
            return Err((
                line,
                "name".into(),
                format!("duplicate listener name {:?}", self.name),
            ));
        }
        if self.listen.value.port() == 0 {
            return Err((line, "listen".into(), "needs a fixed port".into()));
        }
        // SO_REUSEPORT would let two listeners share an address silently.
        let clash = |other: SocketAddr| {
            other.port() == self.listen.value.port()
                && (other.ip() == self.listen.value.ip()
                    || other.ip().is_unspecified()
                    || self.listen.value.ip().is_unspecified())
        };
        if clash(outbound) {
            return Err((
                line,
                "listen".into(),
                format!(
                    "{} overlaps outbound.listen ({outbound})",
                    self.listen.value
                ),
            ));
        }
        if let Some(other) = earlier.iter().find(|l| clash(l.listen.value)) {
            return Err((
                line,
                "listen".into(),
                format!(
                    "{} overlaps the listen address of listener {:?}",
                    self.listen.value, other.name
                ),
            ));
        }
        if self.upstream.value.port() == 0 {
            return Err((self.upstream.line, "upstream".into(), "needs a port".into()));
        }
        if let Some(tls) = &self.tls {
            if self.protocol == Protocol::Tcp {
                return Err((
                    tls.cert.referenced.line(),
                    "tls".into(),
                    "a `tcp` listener passes bytes through untouched, TLS included; terminating TLS needs protocol auto, http1 or http2".into(),
                ));
            }
            tls.check()
                .map_err(|(line, field, message)| (line, format!("tls.{field}"), message))?;
        }
        if let Some(tls) = &self.upstream_tls {
            if self.protocol == Protocol::Tcp {
                return Err((
                    tls.ca.referenced.line(),
                    "upstream_tls".into(),
                    "TLS origination is for HTTP; a `tcp` listener passes bytes through untouched"
                        .into(),
                ));
            }
            tls.check().map_err(|(line, field, message)| {
                (line, format!("upstream_tls.{field}"), message)
            })?;
        }
        Ok(())
    }

    /// What the workers serve for this listener.
    pub fn spec(&self) -> ListenerSpec {
        ListenerSpec {
            name: self.name.clone(),
            addr: self.listen.value,
            destination: Destination::Fixed(self.upstream.value),
            protocol: self.protocol,
            port_protocols: BTreeMap::new(),
            tls: self.tls.as_ref().map(ListenerTlsConfig::server_tls),
            upstream_tls: self
                .upstream_tls
                .as_ref()
                .map(UpstreamTlsConfig::upstream_tls),
            port_upstream_tls: BTreeMap::new(),
        }
    }
}
