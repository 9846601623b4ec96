//! TCP pass-through for connections that are not HTTP: bytes are copied both
//! ways between the downstream connection and the original destination.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use crate::metrics::Metrics;

/// Proxies `downstream` to `destination` until both directions are closed.
pub async fn serve(mut downstream: TcpStream, destination: SocketAddr, metrics: &Metrics) {
    let mut upstream = match TcpStream::connect(destination).await {
        Ok(upstream) => upstream,
        Err(error) => {
            metrics.upstream_connect_errors.inc();
            tracing::warn!(%destination, %error, "tcp: cannot connect to the destination");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((sent, received)) => {
            metrics.tcp_bytes_sent.inc_by(sent);
            metrics.tcp_bytes_received.inc_by(received);
            tracing::debug!(sent, received, "tcp connection closed");
        }
        Err(error) => tracing::debug!(%error, "tcp connection ended with an error"),
    }
}
