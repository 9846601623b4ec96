//! Worker threads, as in Envoy's threading model: each worker has its own
//! single-threaded tokio runtime, its own `SO_REUSEPORT` listener on the
//! outbound address (the kernel spreads new connections across them), and its
//! own instance of every plugin, so the request path shares nothing mutable
//! between threads.

use std::cell::RefCell;
use std::net::{SocketAddr, SocketAddrV4};
use std::rc::Rc;
use std::sync::Arc;

use tokio::sync::watch;
use wisp_wasm_host::Plugin;

use crate::ebpf::Dataplane;
use crate::filter_chain::FilterChain;
use crate::http_proxy::{ConnectionProxy, SteeredConnection};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("worker {index}: cannot start plugin: {source}")]
    Plugin {
        index: usize,
        source: wisp_wasm_host::Error,
    },
    #[error("worker {index}: cannot build its runtime: {source}")]
    Runtime {
        index: usize,
        source: std::io::Error,
    },
    #[error("worker {0} exited before it was ready")]
    Exited(usize),
}

/// Where workers find the original destination of what they accept. Set once
/// the kernel programs are attached (workers start before that, so steered
/// connections never meet a closed port).
pub type DataplaneCell = Arc<std::sync::OnceLock<Arc<Dataplane>>>;

/// Everything a worker needs; cloned into each thread.
#[derive(Clone)]
pub struct WorkerContext {
    pub listen: SocketAddr,
    pub plugins: Arc<Vec<Plugin>>,
    pub dataplane: DataplaneCell,
    pub metrics: Arc<Metrics>,
    pub shutdown: watch::Receiver<bool>,
}

pub struct Workers {
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` workers and waits until each one listens and has
    /// instantiated its plugins.
    pub fn start(count: usize, context: WorkerContext) -> Result<Workers, WorkerError> {
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let context = context.clone();
            let thread = std::thread::Builder::new()
                .name(format!("wisp-worker-{index}"))
                .spawn(move || run_worker(index, context, ready_tx))
                .map_err(|source| WorkerError::Runtime { index, source })?;
            threads.push(thread);
            ready_rx.recv().map_err(|_| WorkerError::Exited(index))??;
        }
        Ok(Workers { threads })
    }

    /// Waits for every worker to finish (after shutdown was signalled).
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

fn run_worker(
    index: usize,
    context: WorkerContext,
    ready: std::sync::mpsc::Sender<Result<(), WorkerError>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(source) => {
            let _ = ready.send(Err(WorkerError::Runtime { index, source }));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let setup = listen(context.listen).and_then(|listener| {
            let chain = FilterChain::new(&context.plugins)
                .map_err(|source| WorkerError::Plugin { index, source })?;
            Ok((listener, chain))
        });
        let (listener, chain) = match setup {
            Ok(ok) => ok,
            Err(error) => {
                let _ = ready.send(Err(error));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        accept_loop(listener, Rc::new(RefCell::new(chain)), context).await;
    });
}

fn listen(addr: SocketAddr) -> Result<tokio::net::TcpListener, WorkerError> {
    let err = |source| WorkerError::Listen { addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_reuse_port(true).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(1024).map_err(err)?;
    tokio::net::TcpListener::from_std(socket.into()).map_err(err)
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    chain: Rc<RefCell<FilterChain>>,
    mut context: WorkerContext,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = context.shutdown.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(conn) = steered_connection(&stream, peer, &context) else {
            context.metrics.unsteered_connections.inc();
            tracing::warn!(%peer, "closing a connection the kernel did not steer: its original destination is unknown");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let proxy = ConnectionProxy::new(conn, chain.clone(), context.metrics.clone());
        tokio::task::spawn_local(proxy.serve(stream));
    }
}

/// Recovers where an accepted connection was going, from the record the
/// kernel programs made when they steered it.
fn steered_connection(
    stream: &tokio::net::TcpStream,
    peer: SocketAddr,
    context: &WorkerContext,
) -> Option<SteeredConnection> {
    let dataplane = context.dataplane.get()?;
    let (SocketAddr::V4(peer_v4), Ok(SocketAddr::V4(local))) = (peer, stream.local_addr()) else {
        return None;
    };
    let (original_dst, slot): (SocketAddrV4, u32) = dataplane.take_original_dst(peer_v4, local)?;
    let source_workload = dataplane
        .workloads()
        .get(slot as usize)
        .map_or_else(|| format!("slot-{slot}"), |w| w.name.clone());
    Some(SteeredConnection {
        peer,
        original_dst: SocketAddr::V4(original_dst),
        source_workload,
    })
}
