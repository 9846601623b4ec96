//! A Proxy-Wasm host on Wasmtime: runs HTTP filter plugins built with the
//! Proxy-Wasm SDKs (ABI 0.1.0, 0.2.0, 0.2.1) for the wisp agent.
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
//! * `stream` — per-request data: [`HttpStream`], [`LocalResponse`], [`Action`].
//! * `plugin` — [`PluginConfig`], compiling a [`Plugin`]; one process-wide engine.
//! * `instance` — [`PluginInstance`]: store, contexts, host → guest callbacks.
//! * `state` — what the store holds, i.e. what hostcalls can see.
//! * `memory` — bounds-checked guest memory and the guest allocator.
//! * `link` — the per-module linker, including stubs for unimplemented imports.
//! * `hostcalls` — the `env.proxy_*` functions, one file per area.
//! * `wasi` — the WASI preview 1 subset.
//! * `error` — [`Error`].
//!
//! # Implemented
//!
//! Hostcalls: `proxy_log`, `proxy_get_log_level` (0.2.1), `proxy_set_effective_context`,
//! `proxy_done`, `proxy_get_current_time_nanoseconds`, `proxy_set_tick_period_milliseconds`
//! (recorded), `proxy_get_buffer_bytes` / `proxy_get_buffer_status` (VM and plugin
//! configuration), `proxy_get_header_map_{pairs,size,value}`,
//! `proxy_{set_header_map_pairs,add_header_map_value,replace_header_map_value,remove_header_map_value}`
//! (request and response headers), `proxy_get_property` (`plugin_name`, `plugin_root_id`,
//! `plugin_vm_id`, embedder-supplied stream properties), `proxy_send_local_response`,
//! `proxy_continue_stream` / `proxy_close_stream` (0.2.x, recorded).
//!
//! WASI (`wasi_snapshot_preview1` and `wasi_unstable`): `fd_write` (stdout/stderr →
//! plugin log), `clock_time_get`, `random_get`, `environ_sizes_get`, `environ_get`,
//! `args_sizes_get`, `args_get`, `proc_exit`, `sched_yield`.
//!
//! # Next issue
//!
//! Any other `env` function a module imports is linked as a stub that warns once
//! and returns `UNIMPLEMENTED` (12); any other WASI function returns errno `NOTSUP`
//! (58). Still to do:
//!
//! * hostcalls: `proxy_set_property`, `proxy_set_buffer_bytes`, `proxy_get_status`,
//!   `proxy_http_call`, the gRPC calls, shared data and shared queues, metrics,
//!   `proxy_call_foreign_function`; the 0.1.0-only `proxy_get_configuration`,
//!   `proxy_continue_request` / `proxy_continue_response`, `proxy_clear_route_cache`;
//!   cpp-host's extra `emscripten_notify_memory_growth` and `pthread_equal`;
//! * body, trailer, TCP, tick, http-call, gRPC and queue callbacks; resuming
//!   paused streams; root-context shutdown (`proxy_on_done` on the root,
//!   pending `proxy_done`);
//! * read-only request headers in `proxy_on_log`; other header maps (trailers,
//!   http-call and gRPC metadata);
//! * limits: memory (`StoreLimits`), per-call CPU deadlines (epochs), the
//!   restricted hostcalls inside the allocator and `_initialize`, capability
//!   restriction;
//! * failure policies beyond reporting (the embedder applies FAIL_CLOSED /
//!   FAIL_OPEN today), FAIL_RELOAD with backoff, metrics;
//! * the rest of cpp-host's WASI set (for Go `wasip1` plugins).

pub mod abi;
mod error;
pub mod headers;
mod hostcalls;
mod instance;
mod link;
mod memory;
pub mod pairs;
mod plugin;
mod state;
mod stream;
#[cfg(test)]
mod test_guest;
mod wasi;

pub use abi::AbiVersion;
pub use error::Error;
pub use headers::HeaderMap;
pub use instance::PluginInstance;
pub use plugin::{FailurePolicy, Plugin, PluginConfig};
pub use stream::{Action, HttpStream, LocalResponse, StreamRequest, StreamRequestKind};
pub use wasi::RANDOM_GET_MAX_BYTES;
