//! Sockets opened from the test process itself inside a pod's network
//! namespace — for what curl cannot do: choose the source port, open a
//! hundred connections at once, see the exact errno of a refused connect, or
//! read `getpeername`.
//!
//! `setns` only moves the calling thread, so each call runs on a thread of its
//! own; a socket keeps the namespace it was created in, whichever thread uses
//! it afterwards. The connect hooks find the pod by that namespace (its
//! cookie), exactly as for the pod's own processes.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use crate::http::Reply;

/// Runs `f` on a thread that has joined the network namespace at `netns`.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    let file = std::fs::File::open(netns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the thread in the netns panicked")))
    })
}

/// A TCP socket connected to `target` from the calling thread's namespace,
/// bound first to `bind` when given (an explicit source port, with
/// SO_REUSEADDR). `v6only: Some(false)` makes an IPv6 socket dual-stack, to
/// connect to an IPv4-mapped address.
pub fn connect(
    bind: Option<SocketAddr>,
    target: SocketAddr,
    timeout: Duration,
) -> std::io::Result<std::net::TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(bind.unwrap_or(target)),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if let Some(bind) = bind {
        socket.set_reuse_address(true)?;
        socket.bind(&bind.into())?;
    }
    socket.connect_timeout(&target.into(), timeout)?;
    let stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(stream)
}

/// Sends `GET path` with `Connection: close` on a connected stream and reads
/// the whole reply.
pub fn get_on(mut stream: std::net::TcpStream, host: &str, path: &str) -> std::io::Result<Reply> {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    Ok(crate::http::parse(&String::from_utf8_lossy(&raw)))
}

/// `GET http://target/path` from inside the namespace at `netns`.
pub fn http_get(netns: &Path, target: SocketAddr, path: &str) -> std::io::Result<Reply> {
    in_netns(netns, || {
        let stream = connect(None, target, Duration::from_secs(5))?;
        get_on(stream, &target.to_string(), path)
    })?
}

/// `GET` over a dual-stack IPv6 socket to the IPv4 address `target`, as a JVM
/// or any `AF_INET6` socket with `IPV6_V6ONLY=0` does: the connect goes to
/// `::ffff:a.b.c.d`.
pub fn http_get_v4_mapped(
    netns: &Path,
    target: std::net::SocketAddrV4,
    path: &str,
) -> std::io::Result<Reply> {
    in_netns(netns, || {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_only_v6(false)?;
        let mapped = SocketAddr::new(target.ip().to_ipv6_mapped().into(), target.port());
        socket.connect_timeout(&mapped.into(), Duration::from_secs(5))?;
        let stream: std::net::TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        get_on(stream, &target.to_string(), path)
    })?
}

/// The error of a connect from inside `netns` to `target` (`Ok(())` when it
/// connected), e.g. to see the `EPERM` of a policy deny.
pub fn connect_result(netns: &Path, target: SocketAddr) -> std::io::Result<std::io::Result<()>> {
    in_netns(netns, || {
        connect(None, target, Duration::from_secs(5)).map(|_| ())
    })
}

/// The address an echo server reported as its peer, with IPv4-mapped
/// addresses (a dual-stack listener) turned back into IPv4.
pub fn unmap(peer: &str) -> String {
    match peer.parse::<std::net::Ipv6Addr>() {
        Ok(v6) => v6
            .to_ipv4_mapped()
            .map_or_else(|| v6.to_string(), |v4| v4.to_string()),
        Err(_) => peer.to_owned(),
    }
}

/// Connects from inside `netns` to `target` and returns what `getpeername`
/// says the socket is connected to.
pub fn peer_of(netns: &Path, target: SocketAddr) -> std::io::Result<SocketAddr> {
    in_netns(netns, || {
        connect(None, target, Duration::from_secs(5))?.peer_addr()
    })?
}
