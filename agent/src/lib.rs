//! The wisp node agent: accepts the TCP connections that wisp's eBPF programs
//! steer to it, runs each HTTP request through a Proxy-Wasm filter chain, and
//! forwards it to where it was originally going.
//!
//! Modules, in the order a connection meets them: [`config`] (the YAML file),
//! [`app`] (start-up and shutdown), [`ebpf`] (kernel programs, enrollment,
//! original destinations), [`worker`] (threads and listeners),
//! [`http_proxy`] (one connection's requests), [`filter_chain`] (the HTTP
//! filters), [`body`] (bodies and their buffer limit), [`callout`] (plugins'
//! calls to clusters), [`tcp_proxy`] and [`network_chain`] (TCP pass-through
//! and the network filters), [`plugins`] (HTTP or network filter, `match:`),
//! [`metrics`], [`plugin_metrics`] and [`admin`].
pub mod access_log;
pub mod admin;
pub mod app;
pub mod body;
pub mod callout;
pub mod callout_runner;
pub mod config;
pub mod ebpf;
pub mod filter_chain;
pub mod header_conversion;
pub mod header_pool;
pub mod heap;
pub mod http_proxy;
pub mod kube;
pub mod listener;
pub mod metrics;
pub mod module_fetch;
pub mod network_chain;
pub mod plugin_metrics;
pub mod plugin_timers;
pub mod plugins;
pub mod pod_resolver;
pub mod reload;
pub mod singletons;
pub mod sniff;
pub mod tcp_proxy;
pub mod tls;
pub mod upstream;
pub mod worker;

/// A hash map for per-worker tables looked up on every request (upstream
/// pools, stream states): foldhash is several times cheaper than std's
/// SipHash on small keys and keeps a per-process random seed.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
