//! TCP pass-through for connections that are not HTTP: bytes go both ways
//! between the downstream connection and the original destination, through
//! the worker's network filters when there are any (see `network_chain`).

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use wisp_wasm_host::PeerType;

use crate::access_log::{AccessLog, ConnectionFields, TcpEntry};
use crate::http_proxy::ConnectionInfo;
use crate::metrics::Metrics;
use crate::network_chain::{NetworkChain, NetworkStream, Verdict};
use crate::plugins::Facts;

/// Read size per direction.
const CHUNK: usize = 16 * 1024;

/// Proxies `downstream` to the connection's destination until both
/// directions are closed, through `chain`'s network filters; logs the
/// connection to `access_log` when it closed.
pub async fn serve(
    downstream: TcpStream,
    conn: &ConnectionInfo,
    chain: Rc<RefCell<NetworkChain>>,
    metrics: &Metrics,
    access_log: Option<&AccessLog>,
) {
    let span = tracing::info_span!(
        "tcp",
        listener = %conn.listener,
        peer = %conn.peer,
        dst = %conn.destination,
        workload = %conn.source_workload
    );
    let start_time = std::time::SystemTime::now();
    let started = std::time::Instant::now();
    let transferred = if chain.borrow().is_empty() {
        copy(downstream, conn.destination, metrics)
            .instrument(span)
            .await
    } else {
        filtered(downstream, conn, &chain, metrics)
            .instrument(span)
            .await
    };
    if let Some(log) = access_log {
        log.record(&TcpEntry {
            connection: ConnectionFields::new(conn, start_time, started, "tcp"),
            bytes_sent: transferred.sent,
            bytes_received: transferred.received,
            upstream_connect_failed: transferred.connect_failed,
        });
    }
}

/// What went through one connection, for the access log.
#[derive(Debug, Default)]
struct Transferred {
    sent: u64,
    received: u64,
    connect_failed: bool,
}

/// No network filters: the kernel-to-kernel copy loop.
async fn copy(
    mut downstream: TcpStream,
    destination: SocketAddr,
    metrics: &Metrics,
) -> Transferred {
    let mut upstream = match connect(destination, metrics).await {
        Some(upstream) => upstream,
        None => {
            return Transferred {
                connect_failed: true,
                ..Default::default()
            };
        }
    };
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((sent, received)) => {
            metrics.tcp_bytes_sent.inc_by(sent);
            metrics.tcp_bytes_received.inc_by(received);
            tracing::debug!(sent, received, "tcp connection closed");
            Transferred {
                sent,
                received,
                connect_failed: false,
            }
        }
        Err(error) => {
            // copy_bidirectional does not say how much went through.
            tracing::debug!(%error, "tcp connection ended with an error");
            Transferred::default()
        }
    }
}

async fn connect(destination: SocketAddr, metrics: &Metrics) -> Option<TcpStream> {
    match tokio::time::timeout(
        crate::upstream::CONNECT_TIMEOUT,
        TcpStream::connect(destination),
    )
    .await
    {
        Ok(Ok(upstream)) => {
            let _ = upstream.set_nodelay(true);
            Some(upstream)
        }
        Ok(Err(error)) => {
            metrics.upstream_connect_errors.inc();
            tracing::warn!(%destination, %error, "tcp: cannot connect to the destination");
            None
        }
        Err(_) => {
            metrics.upstream_connect_errors.inc();
            tracing::warn!(%destination, "tcp: connecting to the destination timed out");
            None
        }
    }
}

/// One connection's shared state: both directions run in one task, so
/// `RefCell` borrows never cross an `.await`.
struct Pump<'a> {
    chain: &'a RefCell<NetworkChain>,
    stream: RefCell<NetworkStream>,
    metrics: &'a Metrics,
    /// Who closed each side first: set to `Remote` when that peer ended its
    /// side; anything wisp ends is `Local`.
    downstream_peer: Cell<Option<PeerType>>,
    upstream_peer: Cell<Option<PeerType>>,
    /// Bytes written to the upstream and to the client.
    sent: Cell<u64>,
    received: Cell<u64>,
    connect_failed: Cell<bool>,
    /// Fired when the connection must end now (a filter closed it, a side
    /// failed).
    abort: CancellationToken,
}

impl Pump<'_> {
    fn close_now(&self) {
        self.abort.cancel();
    }
}

async fn filtered(
    downstream: TcpStream,
    conn: &ConnectionInfo,
    chain: &RefCell<NetworkChain>,
    metrics: &Metrics,
) -> Transferred {
    let facts = Facts {
        listener: &conn.listener,
        destination_port: conn.destination.port(),
        destination_service: conn.destination_service.as_deref(),
        source_workload: &conn.source_workload,
        authority: None,
        path: None,
    };
    let stream = chain.borrow().open(conn.properties(), &facts);
    let abort = stream.abort.clone();
    let pump = Pump {
        chain,
        stream: RefCell::new(stream),
        metrics,
        downstream_peer: Cell::new(None),
        upstream_peer: Cell::new(None),
        sent: Cell::new(0),
        received: Cell::new(0),
        connect_failed: Cell::new(false),
        abort,
    };
    let started = {
        let mut stream = pump.stream.borrow_mut();
        chain.borrow_mut().start(&mut stream, metrics)
    };
    let (down_read, down_write) = downstream.into_split();
    let (upstream_tx, upstream_rx) = tokio::sync::oneshot::channel();
    match started {
        Ok(started) => {
            tokio::join!(
                downstream_to_upstream(&pump, down_read, conn.destination, started, upstream_tx),
                upstream_to_downstream(&pump, upstream_rx, down_write),
            );
        }
        Err(_closed) => drop((down_read, down_write)),
    }
    let Pump {
        stream,
        downstream_peer,
        upstream_peer,
        sent,
        received,
        connect_failed,
        ..
    } = pump;
    chain.borrow_mut().close(
        stream.into_inner(),
        downstream_peer.get().unwrap_or(PeerType::Local),
        upstream_peer.get().unwrap_or(PeerType::Local),
        metrics,
    );
    tracing::debug!("tcp connection closed");
    Transferred {
        sent: sent.get(),
        received: received.get(),
        connect_failed: connect_failed.get(),
    }
}

/// Reads the client, runs its bytes through the filters and writes them to
/// the upstream, which it connects once every filter let the connection
/// through (handing its read half to the other direction).
async fn downstream_to_upstream(
    pump: &Pump<'_>,
    mut down_read: OwnedReadHalf,
    destination: SocketAddr,
    mut started: bool,
    upstream_tx: tokio::sync::oneshot::Sender<OwnedReadHalf>,
) {
    let mut upstream_tx = Some(upstream_tx);
    let mut up_write: Option<OwnedWriteHalf> = None;
    let mut buf = vec![0u8; CHUNK];
    loop {
        if started && up_write.is_none() {
            let Some(write) = open_upstream(pump, destination, &mut upstream_tx).await else {
                return pump.close_now();
            };
            up_write = Some(write);
        }
        let read = tokio::select! {
            read = down_read.read(&mut buf) => read,
            () = pump.abort.cancelled() => return,
        };
        let (data, end_of_stream) = match read {
            Ok(0) => (&[][..], true),
            Ok(n) => (&buf[..n], false),
            Err(error) => {
                tracing::debug!(%error, "reading downstream");
                pump.downstream_peer.set(Some(PeerType::Remote));
                return pump.close_now();
            }
        };
        if end_of_stream {
            pump.downstream_peer.set(Some(PeerType::Remote));
        }
        let verdict = {
            let mut stream = pump.stream.borrow_mut();
            pump.chain
                .borrow_mut()
                .on_downstream(&mut stream, data, end_of_stream, pump.metrics)
        };
        let Ok((verdict, all_started)) = verdict else {
            return pump.close_now();
        };
        started = all_started;
        if let Verdict::Forward(bytes) = verdict
            && !bytes.is_empty()
        {
            if up_write.is_none() {
                let Some(write) = open_upstream(pump, destination, &mut upstream_tx).await else {
                    return pump.close_now();
                };
                up_write = Some(write);
            }
            let writer = up_write.as_mut().expect("connected above");
            if let Err(error) = writer.write_all(&bytes).await {
                tracing::debug!(%error, "writing upstream");
                pump.upstream_peer.set(Some(PeerType::Remote));
                return pump.close_now();
            }
            pump.metrics.tcp_bytes_sent.inc_by(bytes.len() as u64);
            pump.sent.set(pump.sent.get() + bytes.len() as u64);
        }
        if end_of_stream {
            match up_write.as_mut() {
                // Half-close: the upstream sees the client's FIN.
                Some(writer) => {
                    let _ = writer.shutdown().await;
                }
                // Never got through the filters: nothing to wait for.
                None => pump.close_now(),
            }
            return;
        }
    }
}

/// Connects to the destination and hands the read half to the other
/// direction; `None` (the upstream counted as the closing peer) when the
/// connect fails.
async fn open_upstream(
    pump: &Pump<'_>,
    destination: SocketAddr,
    upstream_tx: &mut Option<tokio::sync::oneshot::Sender<OwnedReadHalf>>,
) -> Option<OwnedWriteHalf> {
    let Some(upstream) = connect(destination, pump.metrics).await else {
        pump.upstream_peer.set(Some(PeerType::Remote));
        pump.connect_failed.set(true);
        return None;
    };
    let (read, write) = upstream.into_split();
    if let Some(tx) = upstream_tx.take() {
        let _ = tx.send(read);
    }
    Some(write)
}

/// Reads the upstream, runs its bytes through the filters (last first) and
/// writes them to the client.
async fn upstream_to_downstream(
    pump: &Pump<'_>,
    upstream_rx: tokio::sync::oneshot::Receiver<OwnedReadHalf>,
    mut down_write: OwnedWriteHalf,
) {
    let mut up_read = tokio::select! {
        read = upstream_rx => match read {
            Ok(read) => read,
            // The other direction ended before connecting.
            Err(_) => return,
        },
        () = pump.abort.cancelled() => return,
    };
    let mut buf = vec![0u8; CHUNK];
    loop {
        let read = tokio::select! {
            read = up_read.read(&mut buf) => read,
            () = pump.abort.cancelled() => return,
        };
        let (data, end_of_stream) = match read {
            Ok(0) => (&[][..], true),
            Ok(n) => (&buf[..n], false),
            Err(error) => {
                tracing::debug!(%error, "reading upstream");
                pump.upstream_peer.set(Some(PeerType::Remote));
                return pump.close_now();
            }
        };
        if end_of_stream {
            pump.upstream_peer.set(Some(PeerType::Remote));
        }
        let verdict = {
            let mut stream = pump.stream.borrow_mut();
            pump.chain
                .borrow_mut()
                .on_upstream(&mut stream, data, end_of_stream, pump.metrics)
        };
        let Ok(verdict) = verdict else {
            return pump.close_now();
        };
        if let Verdict::Forward(bytes) = verdict
            && !bytes.is_empty()
        {
            if let Err(error) = down_write.write_all(&bytes).await {
                tracing::debug!(%error, "writing downstream");
                pump.downstream_peer.set(Some(PeerType::Remote));
                return pump.close_now();
            }
            pump.metrics.tcp_bytes_received.inc_by(bytes.len() as u64);
            pump.received.set(pump.received.get() + bytes.len() as u64);
        }
        if end_of_stream {
            let _ = down_write.shutdown().await;
            return;
        }
    }
}
