//! Worker threads, as in Envoy's threading model: each worker has its own
//! single-threaded tokio runtime, its own `SO_REUSEPORT` socket on every
//! listener (the kernel spreads new connections across them), and its own
//! instance of every plugin, so the request path shares nothing mutable
//! between threads.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLog;
use crate::ebpf::Dataplane;
use crate::filter_chain::{ChainEnv, FilterChain, SharedChain};
use crate::http_proxy::{ConnectionInfo, HttpWorker};
use crate::listener::{Destination, ListenerSpec, Protocol};
use crate::metrics::{ConnectionLabels, Metrics};
use crate::network_chain::{NetworkChain, NetworkFilters};
use crate::plugins::{ConfiguredPlugin, PluginKind};
use crate::tls::TlsInfo;
use crate::upstream::Upstreams;
use tokio_rustls::TlsAcceptor;

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
    #[error("worker {index}: {source}")]
    Tls {
        index: usize,
        source: crate::tls::TlsError,
    },
    #[error("worker {0} exited before it was ready")]
    Exited(usize),
}

/// Where workers find the original destination of steered connections. Set
/// once the kernel programs are attached (workers start before that, so
/// steered connections never meet a closed port).
pub type DataplaneCell = Arc<std::sync::OnceLock<SharedDataplane>>;

/// The kernel side, shared by the workers (read: original destinations) and
/// the main thread (write: a reload or the Kubernetes controller changes
/// the enrolled workloads, policy and services).
pub type SharedDataplane = Arc<std::sync::RwLock<Dataplane>>;

/// Everything a worker needs; cloned into each thread.
#[derive(Clone)]
pub struct WorkerContext {
    pub listeners: Arc<Vec<ListenerSpec>>,
    /// The plugins, HTTP and network filters; a config reload sends new ones.
    pub plugins: watch::Receiver<Arc<Vec<ConfiguredPlugin>>>,
    pub dataplane: DataplaneCell,
    pub metrics: Arc<Metrics>,
    /// Becomes `true` on shutdown: stop accepting, finish what is in flight.
    pub shutdown: watch::Receiver<bool>,
    /// How long in-flight connections may take to finish after shutdown.
    pub drain_timeout: Duration,
    /// The shared access log file, if one is configured.
    pub access_log: Option<Arc<std::fs::File>>,
    /// What the request path needs beyond listeners and plugins.
    pub http: HttpContext,
}

/// The request path's settings: clusters plugins call out to, the body
/// buffer limit, where plugin-defined metrics go.
#[derive(Clone, Default)]
pub struct HttpContext {
    pub clusters: crate::callout::Clusters,
    pub settings: crate::body::HttpSettings,
    pub plugin_metrics: Option<Arc<crate::plugin_metrics::PluginMetrics>>,
}

impl WorkerContext {
    /// The environment of this worker's filter chains.
    fn chain_env(&self, cluster_client: &Rc<crate::callout::ClusterClients>) -> ChainEnv {
        ChainEnv {
            clusters: self.http.clusters.clone(),
            cluster_client: Some(cluster_client.clone()),
            plugin_metrics: self.http.plugin_metrics.clone(),
            metrics: Some(self.metrics.clone()),
        }
    }
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
        let setup = (|| {
            // Inbound listeners come from the dataplane (see `accept_inbound`).
            let sockets = context
                .listeners
                .iter()
                .map(|spec| match spec.destination {
                    Destination::Inbound => Ok(None),
                    _ => listen(spec.addr).map(Some),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let tls_err = |source| WorkerError::Tls { index, source };
            let acceptors = context
                .listeners
                .iter()
                .map(|spec| {
                    spec.tls
                        .as_ref()
                        .map(|tls| tls.acceptor())
                        .transpose()
                        .map_err(tls_err)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut upstreams = context
                .listeners
                .iter()
                .map(|spec| Upstreams::new(spec.upstream_tls.as_ref()).map_err(tls_err))
                .collect::<Result<Vec<_>, _>>()?;
            // Destination ports with TLS origination get pools of their own,
            // after the listeners' (see `Listener::port_upstreams`).
            let mut port_upstreams = Vec::with_capacity(context.listeners.len());
            for spec in context.listeners.iter() {
                let mut by_port = std::collections::BTreeMap::new();
                for (port, tls) in &spec.port_upstream_tls {
                    by_port.insert(*port, upstreams.len());
                    upstreams.push(Upstreams::new(Some(tls)).map_err(tls_err)?);
                }
                port_upstreams.push(by_port);
            }
            let access_log = context
                .access_log
                .as_deref()
                .map(AccessLog::for_worker)
                .transpose()
                .map_err(|source| WorkerError::Runtime { index, source })?;
            // Callouts to clusters, pooled per cluster address.
            let cluster_client = Rc::new(
                crate::callout::ClusterClients::new(&context.http.clusters).map_err(tls_err)?,
            );
            let plugins = context.plugins.borrow().clone();
            let (chain, network) = build_chains(&plugins, context.chain_env(&cluster_client))
                .map_err(|source| WorkerError::Plugin { index, source })?;
            Ok((
                sockets,
                acceptors,
                upstreams,
                port_upstreams,
                access_log,
                chain,
                network,
                cluster_client,
            ))
        })();
        let (
            sockets,
            acceptors,
            upstreams,
            port_upstreams,
            access_log,
            chain,
            network,
            cluster_client,
        ) = match setup {
            Ok(ok) => ok,
            Err(error) => {
                let _ = ready.send(Err(error));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let http = Rc::new(HttpWorker::new(
            chain,
            context.metrics.clone(),
            upstreams,
            access_log,
            context.http.settings.buffer_limit_bytes,
        ));
        let network = Rc::new(NetworkFilters::new(network));
        tokio::task::spawn_local(follow_plugin_updates(
            index,
            http.clone(),
            network.clone(),
            context.clone(),
            cluster_client,
        ));
        let connections = TaskTracker::new();
        let accepting: Vec<_> = context
            .listeners
            .iter()
            .cloned()
            .zip(sockets)
            .zip(acceptors)
            .zip(port_upstreams)
            .enumerate()
            .map(
                |(listener_index, (((spec, socket), tls), port_upstreams))| {
                    let Some(socket) = socket else {
                        return tokio::task::spawn_local(accept_inbound(
                            listener_index,
                            spec,
                            http.clone(),
                            network.clone(),
                            connections.clone(),
                            context.clone(),
                        ));
                    };
                    let listener = Listener {
                        index: listener_index,
                        spec,
                        socket,
                        tls,
                        port_upstreams,
                    };
                    tokio::task::spawn_local(accept_loop(
                        listener,
                        http.clone(),
                        network.clone(),
                        connections.clone(),
                        context.clone(),
                    ))
                },
            )
            .collect();
        for task in accepting {
            let _ = task.await;
        }
        drain(connections, context.drain_timeout).await;
    });
}

/// A worker's HTTP filter chain and network filter chain, each with its
/// own instances of the plugins of its kind, in configuration order.
pub fn build_chains(
    plugins: &[ConfiguredPlugin],
    env: ChainEnv,
) -> Result<(SharedChain, NetworkChain), wisp_wasm_host::Error> {
    let network = NetworkChain::new(&crate::plugins::of_kind(plugins, PluginKind::Network), &env)?;
    let http = crate::plugins::of_kind(plugins, PluginKind::Http);
    let compiled: Vec<_> = http.iter().map(|p| p.plugin.clone()).collect();
    let chain = FilterChain::new(&compiled, env)?;
    chain
        .borrow_mut()
        .set_matches(http.iter().map(|p| p.matcher.clone()).collect());
    Ok((chain, network))
}

/// Swaps in new filter chains whenever the plugins change (config reload).
/// Requests and connections already running finish on the chains they
/// started with.
async fn follow_plugin_updates(
    index: usize,
    http: Rc<HttpWorker>,
    network: Rc<NetworkFilters>,
    mut context: WorkerContext,
    cluster_client: Rc<crate::callout::ClusterClients>,
) {
    loop {
        tokio::select! {
            changed = context.plugins.changed() => if changed.is_err() { return },
            _ = context.shutdown.wait_for(|stop| *stop) => return,
        }
        let plugins = context.plugins.borrow_and_update().clone();
        match build_chains(&plugins, context.chain_env(&cluster_client)) {
            Ok((chain, network_chain)) => {
                http.replace_chain(chain);
                network.replace(network_chain);
                crate::heap::release_free_memory();
                tracing::info!(
                    worker = index,
                    plugins = plugins.len(),
                    "new filter chain in use"
                );
            }
            // The main thread validated these plugins on a canary instance,
            // so this is rare (e.g. out of memory); keep serving on the old.
            Err(error) => {
                tracing::error!(worker = index, %error, "cannot instantiate the new plugins; keeping the old chain")
            }
        }
    }
}

/// Waits for in-flight connections after shutdown, up to `timeout`.
async fn drain(connections: TaskTracker, timeout: Duration) {
    connections.close();
    let waiting = connections.len();
    if waiting == 0 {
        return;
    }
    match tokio::time::timeout(timeout, connections.wait()).await {
        Ok(()) => tracing::info!(connections = waiting, "drained in-flight connections"),
        Err(_) => tracing::warn!(
            remaining = connections.len(),
            ?timeout,
            "drain deadline passed; closing the remaining connections"
        ),
    }
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

/// One of a worker's listening sockets and what it serves.
struct Listener {
    index: usize,
    spec: ListenerSpec,
    socket: tokio::net::TcpListener,
    tls: Option<TlsAcceptor>,
    /// Destination port → index of its TLS-originating upstream pools in
    /// the worker's list (`outbound.upstream_tls`); other ports use the
    /// listener's own, at `index`.
    port_upstreams: std::collections::BTreeMap<u16, usize>,
}

/// An inbound listener spec: once the kernel side is up, accepts on the
/// agent's listener in every enrolled pod (each worker on its own duplicate
/// descriptor; the kernel wakes them and one wins each connection).
async fn accept_inbound(
    index: usize,
    spec: ListenerSpec,
    http: Rc<HttpWorker>,
    network: Rc<NetworkFilters>,
    connections: TaskTracker,
    mut context: WorkerContext,
) {
    // The dataplane is set right after the workers are ready (they start
    // first so steered connects never meet a closed port); until then an
    // inbound connection simply waits in its listener's backlog.
    let dataplane = loop {
        if let Some(dataplane) = context.dataplane.get() {
            break dataplane.clone();
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = context.shutdown.wait_for(|stop| *stop) => return,
        }
    };
    // Duplicate the descriptors under the lock, then accept without it.
    let inbound_sockets: Vec<(String, std::io::Result<std::net::TcpListener>)> = {
        let dataplane = dataplane.read().unwrap_or_else(|e| e.into_inner());
        dataplane
            .inbound_listeners()
            .iter()
            .map(|inbound| (inbound.workload.clone(), inbound.listener.try_clone()))
            .collect()
    };
    let mut tasks = Vec::new();
    for (workload, socket) in inbound_sockets {
        let socket = socket.and_then(tokio::net::TcpListener::from_std);
        let socket = match socket {
            Ok(socket) => socket,
            Err(error) => {
                tracing::error!(%workload, %error, "inbound listener");
                continue;
            }
        };
        let listener = Listener {
            index,
            spec: spec.clone(),
            socket,
            tls: None,
            port_upstreams: Default::default(),
        };
        tasks.push(tokio::task::spawn_local(accept_loop(
            listener,
            http.clone(),
            network.clone(),
            connections.clone(),
            context.clone(),
        )));
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// Accepts until shutdown; connections run as local tasks tracked by
/// `connections` so the worker can drain them.
async fn accept_loop(
    listener: Listener,
    http: Rc<HttpWorker>,
    network: Rc<NetworkFilters>,
    connections: TaskTracker,
    mut context: WorkerContext,
) {
    let listener = Rc::new(listener);
    loop {
        let accepted = tokio::select! {
            accepted = listener.socket.accept() => accepted,
            _ = context.shutdown.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(mut conn) =
            connection_info(&listener.spec, listener.index, &stream, peer, &context)
        else {
            continue;
        };
        // `listener_index` picks the upstream pools a request uses.
        if let Some(&pools) = listener.port_upstreams.get(&conn.destination.port()) {
            conn.listener_index = pools;
        }
        let _ = stream.set_nodelay(true);
        connections.spawn_local(serve_connection(
            listener.clone(),
            conn,
            stream,
            http.clone(),
            network.clone(),
            context.clone(),
        ));
    }
}

async fn serve_connection(
    listener: Rc<Listener>,
    mut conn: ConnectionInfo,
    stream: tokio::net::TcpStream,
    http: Rc<HttpWorker>,
    network: Rc<NetworkFilters>,
    context: WorkerContext,
) {
    let spec = &listener.spec;
    let configured = spec.protocol_for(conn.destination);
    // A TLS listener terminates TLS for everything but ports set to `tcp`,
    // whose bytes pass through untouched.
    if let (Some(acceptor), false) = (&listener.tls, configured == Protocol::Tcp) {
        let handshake =
            tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
        let tls_stream = match handshake {
            Ok(Ok(tls_stream)) => tls_stream,
            Ok(Err(error)) => {
                context.metrics.tls_handshake_errors.inc();
                tracing::info!(peer = %conn.peer, %error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                context.metrics.tls_handshake_errors.inc();
                tracing::info!(peer = %conn.peer, "TLS handshake timed out");
                return;
            }
        };
        let info = TlsInfo::from_connection(tls_stream.get_ref().1);
        let served_as = if info.alpn.as_deref() == Some(b"h2") {
            "https2"
        } else {
            "https"
        };
        count_connection(&context, spec, served_as);
        conn.tls = Some(info);
        return crate::http_proxy::serve(http, conn, tls_stream, context.shutdown.clone()).await;
    }
    let protocol = match configured {
        Protocol::Auto => crate::sniff::detect(&stream).await,
        configured => configured,
    };
    if protocol == Protocol::Tcp
        && listener
            .port_upstreams
            .contains_key(&conn.destination.port())
    {
        // TLS origination is configured for this port, and HTTP is what it
        // wraps: never send these bytes on in plaintext.
        tracing::warn!(peer = %conn.peer, destination = %conn.destination, "closing a non-HTTP connection to a port with upstream TLS");
        return;
    }
    let served_as = match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Http2 => "http2",
        Protocol::Http1 | Protocol::Auto => "http1",
    };
    count_connection(&context, spec, served_as);
    match protocol {
        Protocol::Tcp => {
            crate::tcp_proxy::serve(
                stream,
                &conn,
                network.current(),
                &context.metrics,
                http.access_log(),
            )
            .await
        }
        _ => crate::http_proxy::serve(http, conn, stream, context.shutdown.clone()).await,
    }
}

fn count_connection(context: &WorkerContext, spec: &ListenerSpec, served_as: &str) {
    context
        .metrics
        .connections
        .get_or_create(&ConnectionLabels {
            listener: spec.name.clone(),
            protocol: served_as.to_owned(),
        })
        .inc();
}

/// Where an accepted connection is going and who sent it; `None` (after
/// logging and counting) when that cannot be known.
fn connection_info(
    spec: &ListenerSpec,
    listener_index: usize,
    stream: &tokio::net::TcpStream,
    peer: SocketAddr,
    context: &WorkerContext,
) -> Option<ConnectionInfo> {
    let info = |destination, source_workload| ConnectionInfo {
        listener: spec.name.clone(),
        listener_index,
        tls: None,
        peer,
        destination,
        destination_service: None,
        source_workload,
    };
    match &spec.destination {
        Destination::Fixed(upstream) => Some(info(*upstream, "unknown".to_owned())),
        Destination::OriginalDst => match crate::listener::original_dst(stream) {
            Ok(destination) => Some(info(destination, "unknown".to_owned())),
            Err(error) => {
                context.metrics.unsteered_connections.inc();
                tracing::warn!(%peer, %error, "closing a connection without SO_ORIGINAL_DST (was it redirected by iptables?)");
                None
            }
        },
        Destination::Inbound => {
            // Not NATed: the local address is where the client was going.
            let destination = stream.local_addr().ok()?;
            if let Some(dataplane) = context.dataplane.get() {
                let dataplane = dataplane.read().unwrap_or_else(|e| e.into_inner());
                let workload = dataplane.inbound_accepted(destination.ip());
                tracing::debug!(%peer, %destination, ?workload, "inbound connection");
            }
            Some(info(destination, "unknown".to_owned()))
        }
        Destination::Steered => {
            let steered = context.dataplane.get().and_then(|dataplane| {
                let local = stream.local_addr().ok()?;
                let dataplane = dataplane.read().unwrap_or_else(|e| e.into_inner());
                let (destination, slot) = dataplane.take_original_dst(peer, local)?;
                let workload = dataplane
                    .workload_in_slot(slot)
                    .map_or_else(|| format!("slot-{slot}"), |w| w.name.clone());
                // An L7 service keeps its VIP for enrolled pods (see
                // `ebpf::services`), so the destination names the service.
                let service = dataplane.service_at(destination).map(str::to_owned);
                Some((destination, workload, service))
            });
            match steered {
                Some((destination, workload, service)) => Some(ConnectionInfo {
                    destination_service: service,
                    ..info(destination, workload)
                }),
                None => {
                    context.metrics.unsteered_connections.inc();
                    tracing::warn!(%peer, "closing a connection the kernel did not steer: its original destination is unknown");
                    None
                }
            }
        }
    }
}
