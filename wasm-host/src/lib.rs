//! A Proxy-Wasm host on Wasmtime (and, with the `wasmedge` feature,
//! WasmEdge): runs HTTP filter plugins built with the Proxy-Wasm SDKs (ABI
//! 0.1.0, 0.2.0, 0.2.1) for the wisp agent.
//!
//! "Correct" means "behaves like Envoy's proxy-wasm-cpp-host": the same status
//! codes for the same guest mistakes, memory handed to the guest through its
//! own allocator, empty maps as pointer 0 / size 0.
//!
//! # Using it
//!
//! ```no_run
//! # fn main() -> Result<(), wisp_wasm_host::Error> {
//! use wisp_wasm_host::{Action, HttpStream, Plugin, PluginConfig};
//! # let wasm: Vec<u8> = Vec::new();
//! let plugin = Plugin::compile(PluginConfig { name: "auth".into(), ..Default::default() }, &wasm)?;
//! let mut instance = plugin.instantiate()?; // one per worker thread
//! let id = instance.create_http_context()?;
//! let mut stream = HttpStream::default();
//! stream.request_headers.add(":path", b"/");
//! if instance.on_request_headers(id, &mut stream, true)? == Action::Pause {
//!     let _reply = stream.local_response.take(); // the plugin answered itself
//! }
//! instance.finish_http_context(id, &mut stream)?;
//! # Ok(()) }
//! ```
//!
//! # Map of the crate
//!
//! * [`abi`] — ABI versions, status codes and enums.
//! * [`pairs`] — the map ("header pairs") wire format.
//! * [`headers`] — [`HeaderMap`].
//! * `stream` — what the embedder lends a plugin: [`HttpStream`] (headers,
//!   bodies, trailers, properties), [`TcpConnection`], [`LocalResponse`], [`Action`].
//! * `embedder` — what the embedder plugs in: [`Embedder`] with [`Callouts`]
//!   (http_call / gRPC to named upstreams), [`MetricsSink`], foreign
//!   functions and a [`QueueWaker`].
//! * `plugin` — [`PluginConfig`] (policies, limits, capabilities, censoring,
//!   isolation mode), compiling a [`Plugin`] (compile cache), canaries.
//! * `source` — [`ModuleSource`]: file, bytes or fetched code with SHA-256.
//! * `limits` — [`ResourceLimits`], [`PoolLimits`]; `engine` — the Wasmtime
//!   engines (on-demand and pooling) and the epoch ticker.
//! * `guest` — the engine seam: `HostContext` (what hostcalls need: state,
//!   guest memory, the guest allocator) and `Vm` (what an instance needs:
//!   call a callback, report a failure).
//! * `wasmtime_vm` — the Wasmtime backend of both traits.
//! * `instance` — [`PluginInstance`]: contexts and every host → guest
//!   callback, on any `Vm`.
//! * `supervisor` — [`Supervisor`]: FAIL_CLOSED / FAIL_OPEN / FAIL_RELOAD per worker.
//! * [`shared`] — process-wide shared data (CAS, size cap) and shared queues.
//! * [`metrics`] — process-wide plugin metrics.
//! * `state` — what the store holds, i.e. what hostcalls can see.
//! * `memory` — bounds-checked guest memory and the guest allocator.
//! * `link` — the per-module Wasmtime linker: stubs for unknown imports,
//!   capability restriction (the policy is shared with WasmEdge).
//! * `hostcalls` — the `env.proxy_*` functions, one file per area, generic
//!   over the engine and listed once (`for_each_hostcall!`) for every backend.
//! * `wasi` — the WASI preview 1 subset, likewise (`for_each_wasi!`).
//! * `wasmedge` (feature `wasmedge`) — the WasmEdge backend; type-checked
//!   only on wisp's machines (no libwasmedge there).
//! * `error` — [`Error`].
//!
//! # Implemented
//!
//! Every `env` hostcall of ABI 0.1.0, 0.2.0 and 0.2.1 (version-specific ones
//! linked per detected marker, as cpp-host's `registerCallbacks`), plus
//! cpp-host's `emscripten_notify_memory_growth` and `pthread_equal`; every
//! callback (context lifecycle, VM start / configure, tick, HTTP headers /
//! body / trailers, TCP connection / data / close, http-call response, gRPC
//! receive / close, queue ready, foreign function, root shutdown with
//! `proxy_done`). WASI (`wasi_snapshot_preview1` and `wasi_unstable`):
//! `fd_write` (stdout/stderr → plugin log), `clock_time_get`, `random_get`,
//! `environ_*` (the plugin's own environment), `args_*` (empty), `proc_exit`,
//! `sched_yield`; any other WASI function returns `NOTSUP` (58), and an `env`
//! name outside every ABI version returns `UNIMPLEMENTED` (12).
//!
//! Safety: linear memory cap (`StoreLimits`), a wall-clock deadline per
//! callback (epoch interruption), optional fuel, a capability allow-list,
//! sensitive-header censoring, cpp-host's hostcall restrictions inside the
//! allocator and during `_initialize`; no host panic on guest input.
//!
//! Engines: the hostcall logic is engine-independent (`guest`); Wasmtime is
//! the default backend, monomorphic on the hot path. Per-request plugins
//! ([`IsolationMode::PerRequest`]) get instances from Wasmtime's pooling
//! allocator ([`PoolLimits`]); one that does not fit falls back to
//! on-demand allocation and [`Plugin::pool_refusal`] names the limit.
//! [`EngineKind::WasmEdge`] (feature `wasmedge`) runs the same hostcalls and
//! callbacks on WasmEdge; the conformance suite runs on it where
//! `WASMEDGE_DIR` is set.
//!
//! # Not yet
//!
//! * WasmEdge is type-checked only here (`DOCS_RS=1 cargo check -p
//!   wisp-wasm-host --features wasmedge`); on it the per-callback deadline
//!   and fuel are not implemented (fuel is refused), so the limits tests
//!   stay Wasmtime-only;
//! * the rest of cpp-host's WASI set (for Go `wasip1` plugins);
//! * shared data is never dropped when the last instance of a vm_id goes.

pub mod abi;
mod embedder;
mod engine;
mod error;
mod guest;
pub mod headers;
mod hostcalls;
mod instance;
mod limits;
mod link;
mod memory;
pub mod metrics;
pub mod pairs;
mod plugin;
pub mod shared;
mod source;
mod state;
mod stream;
mod supervisor;
#[cfg(test)]
mod test_guest;
mod wasi;
#[cfg(feature = "wasmedge")]
pub mod wasmedge;
mod wasmtime_vm;

pub use abi::AbiVersion;
pub use embedder::{
    CalloutError, Callouts, Embedder, ForeignFunction, GrpcCallRequest, HttpCallRequest,
    HttpCallResponse, MetricKind, MetricsSink, QueueWaker,
};
pub use engine::EPOCH_TICK;
pub use error::Error;
pub use headers::HeaderMap;
pub use instance::PluginInstance;
pub use limits::{PoolLimits, ResourceLimits};
pub use plugin::{
    EngineKind, FailurePolicy, IsolationMode, Plugin, PluginConfig, PluginCounters,
    SENSITIVE_HEADERS, sha256_hex,
};
pub use source::ModuleSource;
pub use stream::{
    Action, HttpStream, LocalResponse, PeerType, StreamRequest, StreamRequestKind, TcpConnection,
};
pub use supervisor::{FailureAction, ReloadConfig, Supervisor};
pub use wasi::RANDOM_GET_MAX_BYTES;
