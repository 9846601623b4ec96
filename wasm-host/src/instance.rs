//! [`PluginInstance`]: one VM (Wasmtime store + instance) of a plugin, its
//! contexts, and the host → guest callbacks.
//!
//! Lifecycle (as cpp-host's `WasmBase::startVm` and `ContextBase`):
//! `_initialize` (then `main` / `__main_void` if exported) or `_start` →
//! `proxy_on_context_create(root, 0)` → `proxy_on_vm_start(root, vm_config_size)`
//! → `proxy_on_configure(root, plugin_config_size)`; then per request
//! `proxy_on_context_create(id, root)` → header callbacks → `proxy_on_done` →
//! `proxy_on_log` → `proxy_on_delete`.
//!
//! A guest trap, `proc_exit`, or a callback running past its deadline fails
//! the whole instance (cpp-host's `FailState::RuntimeError`): the error names
//! the plugin and the callback, and every later call returns
//! [`Error::InstanceFailed`].
//!
//! The embedder's data (an [`HttpStream`], a [`TcpConnection`]) is lent to
//! the store for each callback and handed back afterwards, also on failure.

use std::mem;
use std::time::Duration;

use wasmtime::{Instance, Store, StoreLimitsBuilder, Trap, TypedFunc, WasmParams, WasmResults};

use crate::abi::AbiVersion;
use crate::embedder::{Embedder, HttpCallResponse};
use crate::engine;
use crate::error::Error;
use crate::headers::HeaderMap;
use crate::plugin::{Plugin, PluginCounters};
use crate::state::{CallScope, CalloutKind, ConfigPhase, ContextKind, HostState, Restriction};
use crate::stream::{Action, HttpStream, PeerType, StreamRequest, TcpConnection};
use crate::wasi::ProcExit;

/// cpp-host's `WasmResult::BrokenConnection`: the status of a failed http call.
const BROKEN_CONNECTION: u32 = 11;

/// One instance of a plugin, used by one worker thread at a time.
pub struct PluginInstance {
    plugin: Plugin,
    store: Store<HostState>,
    /// Only the hostcall tests look exports up after start-up.
    #[cfg(test)]
    instance: Instance,
    callbacks: Callbacks,
    next_context_id: u32,
    /// Why the instance stopped working, once it has.
    failed: Option<String>,
}

/// The guest's exported callbacks this host calls; absent ones are skipped.
struct Callbacks {
    on_context_create: Option<TypedFunc<(i32, i32), ()>>,
    on_vm_start: Option<TypedFunc<(i32, i32), i32>>,
    on_configure: Option<TypedFunc<(i32, i32), i32>>,
    on_request_headers: Option<HeaderCallback>,
    on_response_headers: Option<HeaderCallback>,
    on_request_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_response_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_request_trailers: Option<TypedFunc<(i32, i32), i32>>,
    on_response_trailers: Option<TypedFunc<(i32, i32), i32>>,
    on_new_connection: Option<TypedFunc<i32, i32>>,
    on_downstream_data: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_upstream_data: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_downstream_connection_close: Option<TypedFunc<(i32, i32), ()>>,
    on_upstream_connection_close: Option<TypedFunc<(i32, i32), ()>>,
    on_tick: Option<TypedFunc<i32, ()>>,
    on_http_call_response: Option<TypedFunc<FiveI32, ()>>,
    on_grpc_receive_initial_metadata: Option<TypedFunc<(i32, i32, i32), ()>>,
    on_grpc_receive: Option<TypedFunc<(i32, i32, i32), ()>>,
    on_grpc_receive_trailing_metadata: Option<TypedFunc<(i32, i32, i32), ()>>,
    on_grpc_close: Option<TypedFunc<(i32, i32, i32), ()>>,
    on_queue_ready: Option<TypedFunc<(i32, i32), ()>>,
    on_foreign_function: Option<TypedFunc<(i32, i32, i32), ()>>,
    on_done: Option<TypedFunc<i32, i32>>,
    on_log: Option<TypedFunc<i32, ()>>,
    on_delete: Option<TypedFunc<i32, ()>>,
}

/// `proxy_on_http_call_response(root, token, headers, body_size, trailers)`.
type FiveI32 = (i32, i32, i32, i32, i32);

/// Header callbacks take `end_of_stream` only since ABI 0.2.0.
#[derive(Clone)]
enum HeaderCallback {
    V0_1(TypedFunc<(i32, i32), i32>),
    V0_2(TypedFunc<(i32, i32, i32), i32>),
}

impl HeaderCallback {
    fn lookup(
        exports: &mut Exports<'_>,
        name: &str,
        abi: AbiVersion,
    ) -> Result<Option<Self>, Error> {
        Ok(if abi.header_callbacks_have_end_of_stream() {
            exports.func(name)?.map(HeaderCallback::V0_2)
        } else {
            exports.func(name)?.map(HeaderCallback::V0_1)
        })
    }

    fn call(
        &self,
        store: &mut Store<HostState>,
        id: u32,
        num_headers: usize,
        end_of_stream: bool,
    ) -> wasmtime::Result<i32> {
        let num_headers = i32::try_from(num_headers).unwrap_or(i32::MAX);
        match self {
            HeaderCallback::V0_1(f) => f.call(store, (id as i32, num_headers)),
            HeaderCallback::V0_2(f) => {
                f.call(store, (id as i32, num_headers, i32::from(end_of_stream)))
            }
        }
    }
}

/// Typed export lookups with errors that name the plugin.
struct Exports<'a> {
    instance: Instance,
    store: &'a mut Store<HostState>,
}

impl Exports<'_> {
    /// `Ok(None)` if the function is not exported, an error if its type is wrong.
    fn func<P: WasmParams, R: WasmResults>(
        &mut self,
        name: &str,
    ) -> Result<Option<TypedFunc<P, R>>, Error> {
        let Some(func) = self.instance.get_func(&mut *self.store, name) else {
            return Ok(None);
        };
        func.typed(&*self.store)
            .map(Some)
            .map_err(|e| Error::ExportType {
                plugin: self.store.data().plugin_name().to_owned(),
                export: name.to_owned(),
                reason: format!("{e:#}"),
            })
    }
}

impl PluginInstance {
    pub(crate) fn new(plugin: Plugin, embedder: Embedder) -> Result<PluginInstance, Error> {
        let name = plugin.name().to_owned();
        let pre = plugin.instance_pre();
        let limits = &plugin.config().limits;
        // One memory and one instance, as cpp-host's Wasmtime limiter.
        let store_limits = StoreLimitsBuilder::new()
            .memory_size(limits.max_memory_bytes)
            .table_elements(10_000)
            .instances(1)
            .memories(1)
            .tables(4)
            .build();
        let mut store = Store::new(
            pre.module().engine(),
            HostState::new(plugin.clone(), embedder, store_limits),
        );
        store.limiter(|state| &mut state.limits);
        store.epoch_deadline_trap();
        arm(&mut store, &plugin);
        PluginCounters::bump(&plugin.counters().instances_created);
        let instance = pre
            .instantiate(&mut store)
            .map_err(|e| Error::Instantiate {
                plugin: name.clone(),
                reason: format!("{e:#}"),
            })?;

        let memory =
            instance
                .get_memory(&mut store, "memory")
                .ok_or_else(|| Error::MissingExport {
                    plugin: name.clone(),
                    export: "memory",
                })?;
        let abi = plugin.abi_version();
        let mut exports = Exports {
            instance,
            store: &mut store,
        };
        // The spec prefers proxy_on_memory_allocate and calls malloc
        // deprecated; cpp-host tries malloc first. SDK-built modules export
        // only one of them, so the order matters only for hand-written ones.
        let allocator = match exports.func::<i32, i32>("proxy_on_memory_allocate")? {
            Some(f) => Some(f),
            None => exports.func::<i32, i32>("malloc")?,
        };
        let initialize = exports.func::<(), ()>("_initialize")?;
        let start = exports.func::<(), ()>("_start")?;
        let main = exports.func::<(i32, i32), i32>("main")?;
        let main_void = exports.func::<(), i32>("__main_void")?;
        let callbacks = Callbacks {
            on_context_create: exports.func("proxy_on_context_create")?,
            on_vm_start: exports.func("proxy_on_vm_start")?,
            on_configure: exports.func("proxy_on_configure")?,
            on_request_headers: HeaderCallback::lookup(
                &mut exports,
                "proxy_on_request_headers",
                abi,
            )?,
            on_response_headers: HeaderCallback::lookup(
                &mut exports,
                "proxy_on_response_headers",
                abi,
            )?,
            on_request_body: exports.func("proxy_on_request_body")?,
            on_response_body: exports.func("proxy_on_response_body")?,
            on_request_trailers: exports.func("proxy_on_request_trailers")?,
            on_response_trailers: exports.func("proxy_on_response_trailers")?,
            on_new_connection: exports.func("proxy_on_new_connection")?,
            on_downstream_data: exports.func("proxy_on_downstream_data")?,
            on_upstream_data: exports.func("proxy_on_upstream_data")?,
            on_downstream_connection_close: exports.func("proxy_on_downstream_connection_close")?,
            on_upstream_connection_close: exports.func("proxy_on_upstream_connection_close")?,
            on_tick: exports.func("proxy_on_tick")?,
            on_http_call_response: exports.func("proxy_on_http_call_response")?,
            on_grpc_receive_initial_metadata: exports
                .func("proxy_on_grpc_receive_initial_metadata")?,
            on_grpc_receive: exports.func("proxy_on_grpc_receive")?,
            on_grpc_receive_trailing_metadata: exports
                .func("proxy_on_grpc_receive_trailing_metadata")?,
            on_grpc_close: exports.func("proxy_on_grpc_close")?,
            on_queue_ready: exports.func("proxy_on_queue_ready")?,
            // A 0.1.0 module has no foreign-function callback (cpp-host's getFunctions).
            on_foreign_function: if abi >= AbiVersion::V0_2_0 {
                exports.func("proxy_on_foreign_function")?
            } else {
                None
            },
            on_done: exports.func("proxy_on_done")?,
            on_log: exports.func("proxy_on_log")?,
            on_delete: exports.func("proxy_on_delete")?,
        };

        let state = store.data_mut();
        state.memory = Some(memory);
        state.allocator = allocator;

        let mut this = PluginInstance {
            plugin,
            store,
            #[cfg(test)]
            instance,
            callbacks,
            next_context_id: 1,
            failed: None,
        };
        this.start(initialize, start, main, main_void)?;
        this.create_root_context()?;
        tracing::debug!(plugin = %name, root_context_id = this.root_context_id(), "plugin instance ready");
        Ok(this)
    }

    /// Runs the module's WASI initialisation: a reactor's `_initialize` (plus
    /// `main` or `__main_void`, which reactor-style SDKs use as their entry,
    /// as cpp-host does), or else a command's `_start`.
    fn start(
        &mut self,
        initialize: Option<TypedFunc<(), ()>>,
        start: Option<TypedFunc<(), ()>>,
        main: Option<TypedFunc<(i32, i32), i32>>,
        main_void: Option<TypedFunc<(), i32>>,
    ) -> Result<(), Error> {
        // cpp-host's startVm allows only logging and WASI here.
        self.store.data_mut().call.restriction = Restriction::Start;
        let result = self.start_inner(initialize, start, main, main_void);
        self.store.data_mut().call = CallScope::default();
        result
    }

    fn start_inner(
        &mut self,
        initialize: Option<TypedFunc<(), ()>>,
        start: Option<TypedFunc<(), ()>>,
        main: Option<TypedFunc<(i32, i32), i32>>,
        main_void: Option<TypedFunc<(), i32>>,
    ) -> Result<(), Error> {
        if let Some(initialize) = initialize {
            self.run("_initialize", |store| initialize.call(store, ()))?;
            if let Some(main) = main {
                self.run("main", |store| main.call(store, (0, 0)))?;
            } else if let Some(main_void) = main_void {
                self.run("__main_void", |store| main_void.call(store, ()))?;
            }
        } else if let Some(start) = start {
            // A WASI command may end `_start` with proc_exit(0): that is a
            // normal return, not a failure.
            arm(&mut self.store, &self.plugin);
            match start.call(&mut self.store, ()) {
                Ok(()) => {}
                Err(e) if proc_exit_code(&e) == Some(0) => {}
                Err(e) => return Err(self.fail("_start", e)),
            }
        }
        Ok(())
    }

    fn create_root_context(&mut self) -> Result<(), Error> {
        let root = self.alloc_context_id();
        let state = self.store.data_mut();
        state.contexts.insert(root, ContextKind::Root);
        state.root_context_id = root;
        let config = self.plugin.config();
        let vm_config_size = guest_len(config.vm_configuration.len());
        let plugin_config_size = guest_len(config.configuration.len());

        if let Some(f) = self.callbacks.on_context_create.clone() {
            self.scoped(
                root,
                ConfigPhase::None,
                "proxy_on_context_create",
                |store| f.call(store, (root as i32, 0)),
            )?;
        }
        // cpp-host passes the root context id as the "unused" first argument;
        // the Rust SDK panics if it is not a known root context.
        if let Some(f) = self.callbacks.on_vm_start.clone() {
            let ok = self.scoped(root, ConfigPhase::None, "proxy_on_vm_start", |store| {
                f.call(store, (root as i32, vm_config_size))
            })?;
            if ok == 0 {
                return Err(Error::VmStartFailed {
                    plugin: self.plugin.name().to_owned(),
                });
            }
        }
        if let Some(f) = self.callbacks.on_configure.clone() {
            let ok = self.scoped(
                root,
                ConfigPhase::Configure,
                "proxy_on_configure",
                |store| f.call(store, (root as i32, plugin_config_size)),
            )?;
            if ok == 0 {
                return Err(Error::ConfigureFailed {
                    plugin: self.plugin.name().to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Creates an HTTP context under the root context
    /// (`proxy_on_context_create(id, root_id)`) and returns its id.
    pub fn create_http_context(&mut self) -> Result<u32, Error> {
        self.create_context(ContextKind::Http)
    }

    /// Creates a TCP (network filter) context under the root context.
    pub fn create_tcp_context(&mut self) -> Result<u32, Error> {
        self.create_context(ContextKind::Tcp)
    }

    fn create_context(&mut self, kind: ContextKind) -> Result<u32, Error> {
        self.check_usable()?;
        let id = self.alloc_context_id();
        let root = self.root_context_id();
        self.store.data_mut().contexts.insert(id, kind);
        if let Some(f) = self.callbacks.on_context_create.clone() {
            self.scoped(id, ConfigPhase::None, "proxy_on_context_create", |store| {
                f.call(store, (id as i32, root as i32))
            })?;
        }
        Ok(id)
    }

    // === HTTP ===

    /// `proxy_on_request_headers` for `context_id`, with `stream` lent to the plugin.
    pub fn on_request_headers(
        &mut self,
        context_id: u32,
        stream: &mut HttpStream,
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        let num_headers = stream.request_headers.len();
        let callback = self.callbacks.on_request_headers.clone();
        self.headers_callback(
            "proxy_on_request_headers",
            callback,
            context_id,
            stream,
            num_headers,
            end_of_stream,
        )
    }

    /// `proxy_on_response_headers` for `context_id`, with `stream` lent to the plugin.
    pub fn on_response_headers(
        &mut self,
        context_id: u32,
        stream: &mut HttpStream,
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        let num_headers = stream.response_headers.len();
        let callback = self.callbacks.on_response_headers.clone();
        self.headers_callback(
            "proxy_on_response_headers",
            callback,
            context_id,
            stream,
            num_headers,
            end_of_stream,
        )
    }

    fn headers_callback(
        &mut self,
        name: &'static str,
        callback: Option<HeaderCallback>,
        context_id: u32,
        stream: &mut HttpStream,
        num_headers: usize,
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        self.check_context(context_id, ContextKind::Http)?;
        let Some(callback) = callback else {
            return Ok(Action::Continue);
        };
        let (raw, local_response_sent) = self.with_stream(context_id, stream, |this| {
            this.run(name, |store| {
                callback.call(store, context_id, num_headers, end_of_stream)
            })
        })?;
        // 0 is Continue. Everything else stops the stream: 1 (Rust/Go `Pause`)
        // is StopAllIterationAndWatermark in cpp-host; the C++ SDK's other
        // stop values are treated alike. A local response stops it regardless
        // of what the plugin returned (cpp-host's `stopNextIteration`).
        Ok(action(raw, local_response_sent))
    }

    /// `proxy_on_request_body(id, body_size, end_of_stream)`: the plugin sees
    /// `stream.request_body` (everything buffered so far) and may change it.
    /// `Pause` means "keep buffering" (StopIterationAndBuffer): append the next
    /// chunk and call again; `Continue` means "send what is buffered".
    pub fn on_request_body(
        &mut self,
        context_id: u32,
        stream: &mut HttpStream,
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        let size = guest_len(stream.request_body.len());
        let callback = self.callbacks.on_request_body.clone();
        self.stream_callback(
            "proxy_on_request_body",
            context_id,
            stream,
            callback,
            |store, f| f.call(store, (context_id as i32, size, i32::from(end_of_stream))),
        )
    }

    /// `proxy_on_response_body`, like [`PluginInstance::on_request_body`].
    pub fn on_response_body(
        &mut self,
        context_id: u32,
        stream: &mut HttpStream,
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        let size = guest_len(stream.response_body.len());
        let callback = self.callbacks.on_response_body.clone();
        self.stream_callback(
            "proxy_on_response_body",
            context_id,
            stream,
            callback,
            |store, f| f.call(store, (context_id as i32, size, i32::from(end_of_stream))),
        )
    }

    /// `proxy_on_request_trailers(id, num_trailers)` with `stream.request_trailers`.
    pub fn on_request_trailers(
        &mut self,
        context_id: u32,
        stream: &mut HttpStream,
    ) -> Result<Action, Error> {
        let count = guest_len(stream.request_trailers.len());
        let callback = self.callbacks.on_request_trailers.clone();
        self.stream_callback(
            "proxy_on_request_trailers",
            context_id,
            stream,
            callback,
            |store, f| f.call(store, (context_id as i32, count)),
        )
    }

    /// `proxy_on_response_trailers(id, num_trailers)` with `stream.response_trailers`.
    pub fn on_response_trailers(
        &mut self,
        context_id: u32,
        stream: &mut HttpStream,
    ) -> Result<Action, Error> {
        let count = guest_len(stream.response_trailers.len());
        let callback = self.callbacks.on_response_trailers.clone();
        self.stream_callback(
            "proxy_on_response_trailers",
            context_id,
            stream,
            callback,
            |store, f| f.call(store, (context_id as i32, count)),
        )
    }

    fn stream_callback<F: Clone>(
        &mut self,
        name: &'static str,
        context_id: u32,
        stream: &mut HttpStream,
        callback: Option<F>,
        call: impl FnOnce(&mut Store<HostState>, F) -> wasmtime::Result<i32>,
    ) -> Result<Action, Error> {
        self.check_context(context_id, ContextKind::Http)?;
        let Some(callback) = callback else {
            return Ok(Action::Continue);
        };
        let (raw, local_response_sent) = self.with_stream(context_id, stream, |this| {
            this.run(name, |store| call(store, callback))
        })?;
        Ok(action(raw, local_response_sent))
    }

    /// Ends an HTTP context: `proxy_on_done`, `proxy_on_log`, `proxy_on_delete`
    /// (the stream is readable in all three). The context is gone afterwards,
    /// even if a callback fails.
    pub fn finish_http_context(
        &mut self,
        context_id: u32,
        stream: &mut HttpStream,
    ) -> Result<(), Error> {
        self.check_context(context_id, ContextKind::Http)?;
        let result = self.with_stream(context_id, stream, |this| this.finish_calls(context_id));
        self.forget_context(context_id);
        result.map(|((), _)| ())
    }

    /// `proxy_on_done`, `proxy_on_log`, `proxy_on_delete` for a stream context.
    fn finish_calls(&mut self, context_id: u32) -> Result<(), Error> {
        let callbacks = (
            self.callbacks.on_done.clone(),
            self.callbacks.on_log.clone(),
            self.callbacks.on_delete.clone(),
        );
        // A stream context's on_done answer does not delay its end: Envoy
        // only waits for `proxy_done` from root contexts.
        if let Some(f) = callbacks.0 {
            self.run("proxy_on_done", |store| f.call(store, context_id as i32))?;
        }
        if let Some(f) = callbacks.1 {
            self.run("proxy_on_log", |store| f.call(store, context_id as i32))?;
        }
        if let Some(f) = callbacks.2 {
            self.run("proxy_on_delete", |store| f.call(store, context_id as i32))?;
        }
        Ok(())
    }

    fn forget_context(&mut self, context_id: u32) {
        let state = self.store.data_mut();
        state.contexts.remove(&context_id);
        // Answers to its callouts are still delivered to the root context,
        // but without a stream to lend.
    }

    // === TCP ===

    /// `proxy_on_new_connection(id)`.
    pub fn on_new_connection(
        &mut self,
        context_id: u32,
        conn: &mut TcpConnection,
    ) -> Result<Action, Error> {
        let callback = self.callbacks.on_new_connection.clone();
        self.tcp_callback(
            "proxy_on_new_connection",
            context_id,
            conn,
            callback,
            |store, f| f.call(store, context_id as i32),
        )
    }

    /// `proxy_on_downstream_data(id, size, end_of_stream)` over
    /// `conn.downstream_data` (DOWNSTREAM_DATA). `Pause` = StopIteration:
    /// keep the data and call again when more arrives.
    pub fn on_downstream_data(
        &mut self,
        context_id: u32,
        conn: &mut TcpConnection,
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        let size = guest_len(conn.downstream_data.len());
        let callback = self.callbacks.on_downstream_data.clone();
        self.tcp_callback(
            "proxy_on_downstream_data",
            context_id,
            conn,
            callback,
            |store, f| f.call(store, (context_id as i32, size, i32::from(end_of_stream))),
        )
    }

    /// `proxy_on_upstream_data(id, size, end_of_stream)` over `conn.upstream_data`.
    pub fn on_upstream_data(
        &mut self,
        context_id: u32,
        conn: &mut TcpConnection,
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        let size = guest_len(conn.upstream_data.len());
        let callback = self.callbacks.on_upstream_data.clone();
        self.tcp_callback(
            "proxy_on_upstream_data",
            context_id,
            conn,
            callback,
            |store, f| f.call(store, (context_id as i32, size, i32::from(end_of_stream))),
        )
    }

    /// `proxy_on_downstream_connection_close(id, peer_type)`.
    pub fn on_downstream_connection_close(
        &mut self,
        context_id: u32,
        conn: &mut TcpConnection,
        peer: PeerType,
    ) -> Result<(), Error> {
        let callback = self.callbacks.on_downstream_connection_close.clone();
        self.tcp_callback(
            "proxy_on_downstream_connection_close",
            context_id,
            conn,
            callback,
            |store, f| f.call(store, (context_id as i32, peer as i32)).map(|()| 0),
        )
        .map(drop)
    }

    /// `proxy_on_upstream_connection_close(id, peer_type)`.
    pub fn on_upstream_connection_close(
        &mut self,
        context_id: u32,
        conn: &mut TcpConnection,
        peer: PeerType,
    ) -> Result<(), Error> {
        let callback = self.callbacks.on_upstream_connection_close.clone();
        self.tcp_callback(
            "proxy_on_upstream_connection_close",
            context_id,
            conn,
            callback,
            |store, f| f.call(store, (context_id as i32, peer as i32)).map(|()| 0),
        )
        .map(drop)
    }

    /// Ends a TCP context (`proxy_on_done`, `proxy_on_log`, `proxy_on_delete`).
    pub fn finish_tcp_context(
        &mut self,
        context_id: u32,
        conn: &mut TcpConnection,
    ) -> Result<(), Error> {
        self.check_context(context_id, ContextKind::Tcp)?;
        let result = self.with_tcp(context_id, conn, |this| this.finish_calls(context_id));
        self.forget_context(context_id);
        result
    }

    fn tcp_callback<F: Clone>(
        &mut self,
        name: &'static str,
        context_id: u32,
        conn: &mut TcpConnection,
        callback: Option<F>,
        call: impl FnOnce(&mut Store<HostState>, F) -> wasmtime::Result<i32>,
    ) -> Result<Action, Error> {
        self.check_context(context_id, ContextKind::Tcp)?;
        let Some(callback) = callback else {
            return Ok(Action::Continue);
        };
        let raw = self.with_tcp(context_id, conn, |this| {
            this.run(name, |store| call(store, callback))
        })?;
        Ok(action(raw, false))
    }

    // === root-context events ===

    /// `proxy_on_tick(root)`: call it every [`PluginInstance::tick_period`].
    pub fn on_tick(&mut self) -> Result<(), Error> {
        self.check_usable()?;
        let root = self.root_context_id();
        if let Some(f) = self.callbacks.on_tick.clone() {
            self.scoped(root, ConfigPhase::None, "proxy_on_tick", |store| {
                f.call(store, root as i32)
            })?;
        }
        Ok(())
    }

    /// Delivers the answer to the http call `token`: `Some(response)`, or
    /// `None` if it failed (the plugin then sees zero headers and status
    /// BrokenConnection, as in Envoy). `stream` is the stream of the context
    /// that made the call ([`HttpCallRequest::context_id`](crate::HttpCallRequest)),
    /// if it is still alive: the plugin usually switches to it with
    /// `proxy_set_effective_context` to change headers and resume it.
    pub fn on_http_call_response(
        &mut self,
        token: u32,
        response: Option<HttpCallResponse>,
        stream: Option<&mut HttpStream>,
    ) -> Result<(), Error> {
        let origin = self.take_callout(token, CalloutKind::Http)?;
        let (num_headers, body_size, num_trailers) = match &response {
            Some(r) => (
                guest_len(r.headers.len()),
                guest_len(r.body.len()),
                guest_len(r.trailers.len()),
            ),
            None => (0, 0, 0),
        };
        let status = match &response {
            Some(_) => (0, Vec::new()),
            None => (BROKEN_CONNECTION, b"callout failed".to_vec()),
        };
        let Some(f) = self.callbacks.on_http_call_response.clone() else {
            return Ok(());
        };
        let root = self.root_context_id();
        let scope = CallScope {
            http_call_response: response,
            status: Some(status),
            ..CallScope::default()
        };
        self.root_event(
            scope,
            origin,
            stream,
            "proxy_on_http_call_response",
            |store| {
                f.call(
                    store,
                    (
                        root as i32,
                        token as i32,
                        num_headers,
                        body_size,
                        num_trailers,
                    ),
                )
            },
        )
    }

    /// gRPC initial metadata for call or stream `token`. For every gRPC
    /// delivery, `stream` is the stream of the context that made the call
    /// ([`GrpcCallRequest::context_id`](crate::GrpcCallRequest)), if alive.
    pub fn on_grpc_receive_initial_metadata(
        &mut self,
        token: u32,
        metadata: HeaderMap,
        stream: Option<&mut HttpStream>,
    ) -> Result<(), Error> {
        let origin = self.grpc_origin(token)?;
        let Some(f) = self.callbacks.on_grpc_receive_initial_metadata.clone() else {
            return Ok(());
        };
        let (root, count) = (self.root_context_id(), guest_len(metadata.len()));
        let scope = CallScope {
            grpc_initial_metadata: Some(metadata),
            ..CallScope::default()
        };
        self.root_event(
            scope,
            origin,
            stream,
            "proxy_on_grpc_receive_initial_metadata",
            |store| f.call(store, (root as i32, token as i32, count)),
        )
    }

    /// A gRPC response message for call or stream `token` (GRPC_CALL_MESSAGE).
    ///
    /// As in Envoy, a unary call ends with either this (success) or
    /// [`PluginInstance::on_grpc_close`] (failure), never both: its token is
    /// dead after either. Streams get any number of messages, then a close.
    pub fn on_grpc_receive(
        &mut self,
        token: u32,
        message: Vec<u8>,
        stream: Option<&mut HttpStream>,
    ) -> Result<(), Error> {
        let origin = self.grpc_origin(token)?;
        if token & 3 == CalloutKind::GrpcCall.bits() {
            self.store.data_mut().callouts.remove(&token);
        }
        let Some(f) = self.callbacks.on_grpc_receive.clone() else {
            return Ok(());
        };
        let (root, size) = (self.root_context_id(), guest_len(message.len()));
        let scope = CallScope {
            grpc_message: Some(message),
            ..CallScope::default()
        };
        self.root_event(scope, origin, stream, "proxy_on_grpc_receive", |store| {
            f.call(store, (root as i32, token as i32, size))
        })
    }

    /// gRPC trailing metadata for call or stream `token`.
    pub fn on_grpc_receive_trailing_metadata(
        &mut self,
        token: u32,
        metadata: HeaderMap,
        stream: Option<&mut HttpStream>,
    ) -> Result<(), Error> {
        let origin = self.grpc_origin(token)?;
        let Some(f) = self.callbacks.on_grpc_receive_trailing_metadata.clone() else {
            return Ok(());
        };
        let (root, count) = (self.root_context_id(), guest_len(metadata.len()));
        let scope = CallScope {
            grpc_trailing_metadata: Some(metadata),
            ..CallScope::default()
        };
        self.root_event(
            scope,
            origin,
            stream,
            "proxy_on_grpc_receive_trailing_metadata",
            |store| f.call(store, (root as i32, token as i32, count)),
        )
    }

    /// The end of gRPC call or stream `token` with its gRPC status; the token
    /// is dead afterwards. `proxy_get_status` reports `status` and `message`.
    pub fn on_grpc_close(
        &mut self,
        token: u32,
        status: i32,
        message: &str,
        stream: Option<&mut HttpStream>,
    ) -> Result<(), Error> {
        let origin = self.grpc_origin(token)?;
        self.store.data_mut().callouts.remove(&token);
        let Some(f) = self.callbacks.on_grpc_close.clone() else {
            return Ok(());
        };
        let root = self.root_context_id();
        let scope = CallScope {
            status: Some((status as u32, message.as_bytes().to_vec())),
            ..CallScope::default()
        };
        self.root_event(scope, origin, stream, "proxy_on_grpc_close", |store| {
            f.call(store, (root as i32, token as i32, status))
        })
    }

    /// `proxy_on_foreign_function(root, function_id, args_size)` with `arguments`
    /// as FOREIGN_FUNCTION_ARGUMENTS (ABI 0.2.0+).
    pub fn on_foreign_function(
        &mut self,
        function_id: u32,
        arguments: Vec<u8>,
    ) -> Result<(), Error> {
        self.check_usable()?;
        let Some(f) = self.callbacks.on_foreign_function.clone() else {
            return Ok(());
        };
        let (root, size) = (self.root_context_id(), guest_len(arguments.len()));
        let scope = CallScope {
            foreign_arguments: Some(arguments),
            ..CallScope::default()
        };
        self.root_event(scope, root, None, "proxy_on_foreign_function", |store| {
            f.call(store, (root as i32, function_id as i32, size))
        })
    }

    /// Whether a shared queue this instance registered got items since the
    /// last [`PluginInstance::deliver_queue_ready`] (the queue waker of the
    /// [`Embedder`] fires at the same moment, from the enqueuing thread).
    pub fn has_pending_queue_ready(&self) -> bool {
        self.store.data().queue_owner.has_pending()
    }

    /// Calls `proxy_on_queue_ready(root, queue_id)` once per queue that got
    /// items; returns how many. Run it on the instance's own worker.
    pub fn deliver_queue_ready(&mut self) -> Result<usize, Error> {
        self.check_usable()?;
        let pending = self.store.data().queue_owner.take_pending();
        let Some(f) = self.callbacks.on_queue_ready.clone() else {
            return Ok(0);
        };
        let root = self.root_context_id();
        for &queue_id in &pending {
            self.scoped(root, ConfigPhase::None, "proxy_on_queue_ready", |store| {
                f.call(store, (root as i32, queue_id as i32))
            })?;
        }
        Ok(pending.len())
    }

    /// Stops the root context (cpp-host `startShutdown`): `proxy_on_done(root)`;
    /// true ⇒ `proxy_on_delete` and `Ok(true)`. False ⇒ `Ok(false)`: the
    /// plugin still has work (e.g. callouts) and calls `proxy_done` later;
    /// check [`PluginInstance::is_done`] after each delivery.
    pub fn shutdown(&mut self) -> Result<bool, Error> {
        self.check_usable()?;
        let root = self.root_context_id();
        let done = match self.callbacks.on_done.clone() {
            Some(f) => {
                self.scoped(root, ConfigPhase::None, "proxy_on_done", |store| {
                    f.call(store, root as i32)
                })? != 0
            }
            None => true,
        };
        if done {
            self.delete_root()?;
        } else {
            self.store.data_mut().pending_done.push(root);
        }
        Ok(done)
    }

    /// Whether the root context finished shutting down (after
    /// [`PluginInstance::shutdown`], directly or through `proxy_done`).
    pub fn is_done(&mut self) -> Result<bool, Error> {
        let root = self.root_context_id();
        let state = self.store.data_mut();
        if let Some(index) = state.done.iter().position(|&id| id == root) {
            state.done.remove(index);
            self.delete_root()?;
        }
        Ok(!self.store.data().contexts.contains_key(&root))
    }

    fn delete_root(&mut self) -> Result<(), Error> {
        let root = self.root_context_id();
        if let Some(f) = self.callbacks.on_delete.clone() {
            self.scoped(root, ConfigPhase::None, "proxy_on_delete", |store| {
                f.call(store, root as i32)
            })?;
        }
        self.store.data_mut().contexts.remove(&root);
        Ok(())
    }

    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    /// The root context's id (the first id handed out, 1).
    pub fn root_context_id(&self) -> u32 {
        self.store.data().root_context_id
    }

    /// The tick period the plugin asked for, if any: call
    /// [`PluginInstance::on_tick`] that often.
    pub fn tick_period(&self) -> Option<Duration> {
        self.store.data().tick_period
    }

    /// `proxy_continue_stream` / `proxy_close_stream` calls since the last take.
    pub fn take_stream_requests(&mut self) -> Vec<StreamRequest> {
        mem::take(&mut self.store.data_mut().stream_requests)
    }

    /// Sets an instance-wide property (seen by `proxy_get_property` in every
    /// context, after the stream's own properties).
    pub fn set_property(&mut self, path: &str, value: Vec<u8>) {
        self.store
            .data_mut()
            .properties
            .insert(path.to_owned(), value);
    }

    /// An instance-wide property, e.g. one the plugin set outside a stream.
    pub fn property(&self, path: &str) -> Option<&[u8]> {
        self.store.data().properties.get(path).map(Vec::as_slice)
    }

    /// Callout tokens still waiting for an answer.
    pub fn pending_callouts(&self) -> Vec<u32> {
        let mut tokens: Vec<u32> = self.store.data().callouts.keys().copied().collect();
        tokens.sort_unstable();
        tokens
    }

    /// The guest's linear memory size in bytes (what an idle instance costs).
    pub fn memory_bytes(&self) -> usize {
        self.store
            .data()
            .memory
            .map_or(0, |memory| memory.data_size(&self.store))
    }

    /// Whether an earlier trap or `proc_exit` made this instance unusable.
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// The store and instance, for the crate's hostcall tests.
    #[cfg(test)]
    pub(crate) fn parts(&mut self) -> (&mut Store<HostState>, Instance) {
        (&mut self.store, self.instance)
    }

    fn alloc_context_id(&mut self) -> u32 {
        let id = self.next_context_id;
        // Ids are never reused; 2^32 contexts on one instance is not a concern.
        self.next_context_id = self.next_context_id.wrapping_add(1).max(1);
        id
    }

    fn check_usable(&self) -> Result<(), Error> {
        match &self.failed {
            Some(reason) => Err(Error::InstanceFailed {
                plugin: self.plugin.name().to_owned(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn check_context(&self, context_id: u32, kind: ContextKind) -> Result<(), Error> {
        self.check_usable()?;
        match self.store.data().contexts.get(&context_id) {
            Some(k) if *k == kind => Ok(()),
            _ => Err(Error::UnknownContext {
                plugin: self.plugin.name().to_owned(),
                context_id,
            }),
        }
    }

    /// Removes a live callout of `kind` and returns the context that made it.
    fn take_callout(&mut self, token: u32, kind: CalloutKind) -> Result<u32, Error> {
        self.check_usable()?;
        let state = self.store.data_mut();
        match state.callouts.get(&token) {
            Some(&(k, origin)) if k == kind => {
                state.callouts.remove(&token);
                Ok(origin)
            }
            _ => Err(Error::UnknownContext {
                plugin: self.plugin.name().to_owned(),
                context_id: token,
            }),
        }
    }

    /// The origin of a live gRPC call or stream.
    fn grpc_origin(&self, token: u32) -> Result<u32, Error> {
        self.check_usable()?;
        match self.store.data().callouts.get(&token) {
            Some(&(CalloutKind::GrpcCall | CalloutKind::GrpcStream, origin)) => Ok(origin),
            _ => Err(Error::UnknownContext {
                plugin: self.plugin.name().to_owned(),
                context_id: token,
            }),
        }
    }

    /// A callback on the root context with `scope` prepared, optionally
    /// lending the stream of context `origin`.
    fn root_event(
        &mut self,
        mut scope: CallScope,
        origin: u32,
        stream: Option<&mut HttpStream>,
        callback: &'static str,
        f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<()>,
    ) -> Result<(), Error> {
        scope.effective_context_id = self.root_context_id();
        let lend = stream.filter(|_| self.store.data().contexts.contains_key(&origin));
        let lent = lend.is_some();
        let mut slot = None;
        if let Some(stream) = lend {
            scope.stream = Some((origin, mem::take(stream)));
            slot = Some(stream);
        }
        self.store.data_mut().call = scope;
        let result = self.run(callback, f);
        let scope = self.end_call();
        if let (true, Some(stream), Some((_, back))) = (lent, slot, scope.stream) {
            *stream = back;
        }
        result
    }

    /// Sets up the scope hostcalls see for the next guest call.
    fn begin_call(&mut self, context_id: u32, stream: Option<HttpStream>, phase: ConfigPhase) {
        self.store.data_mut().call = CallScope {
            effective_context_id: context_id,
            stream: stream.map(|s| (context_id, s)),
            phase,
            ..CallScope::default()
        };
    }

    fn end_call(&mut self) -> CallScope {
        mem::take(&mut self.store.data_mut().call)
    }

    /// One guest call for `context_id` without a stream.
    fn scoped<R>(
        &mut self,
        context_id: u32,
        phase: ConfigPhase,
        callback: &'static str,
        f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, Error> {
        self.begin_call(context_id, None, phase);
        let result = self.run(callback, f);
        self.end_call();
        result
    }

    /// Lends `stream` to the store for `f` and always takes it back; also
    /// reports whether the plugin sent a local response meanwhile.
    fn with_stream<R>(
        &mut self,
        context_id: u32,
        stream: &mut HttpStream,
        f: impl FnOnce(&mut Self) -> Result<R, Error>,
    ) -> Result<(R, bool), Error> {
        self.begin_call(context_id, Some(mem::take(stream)), ConfigPhase::None);
        let result = f(self);
        let scope = self.end_call();
        if let Some((_, lent)) = scope.stream {
            *stream = lent;
        }
        result.map(|r| (r, scope.local_response_sent))
    }

    /// Lends `conn` to the store for `f` and always takes it back.
    fn with_tcp<R>(
        &mut self,
        context_id: u32,
        conn: &mut TcpConnection,
        f: impl FnOnce(&mut Self) -> Result<R, Error>,
    ) -> Result<R, Error> {
        self.begin_call(context_id, None, ConfigPhase::None);
        self.store.data_mut().call.tcp = Some((context_id, mem::take(conn)));
        let result = f(self);
        let scope = self.end_call();
        if let Some((_, lent)) = scope.tcp {
            *conn = lent;
        }
        result
    }

    /// Calls into the guest with a fresh deadline (and fuel); a trap, an
    /// interrupt or `proc_exit` fails the instance.
    fn run<R>(
        &mut self,
        callback: &'static str,
        f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, Error> {
        self.check_usable()?;
        arm(&mut self.store, &self.plugin);
        f(&mut self.store).map_err(|e| self.fail(callback, e))
    }

    fn fail(&mut self, callback: &'static str, error: wasmtime::Error) -> Error {
        let plugin = self.plugin.name().to_owned();
        let counters = self.plugin.counters();
        PluginCounters::bump(&counters.runtime_failures);
        let error = match proc_exit_code(&error) {
            Some(code) => Error::Exit {
                plugin,
                callback,
                code,
            },
            None => {
                tracing::debug!(plugin = %plugin, callback, "guest trap: {error:?}");
                let interrupted = error.downcast_ref::<Trap>() == Some(&Trap::Interrupt);
                let reason = if interrupted {
                    PluginCounters::bump(&counters.deadline_exceeded);
                    format!(
                        "deadline exceeded: the callback ran longer than {} ms",
                        self.plugin.config().limits.callback_deadline.as_millis()
                    )
                } else if error.downcast_ref::<Trap>() == Some(&Trap::OutOfFuel) {
                    "fuel exhausted: the callback used more than its fuel limit".to_owned()
                } else {
                    trap_reason(&error)
                };
                Error::Trap {
                    plugin,
                    callback,
                    reason,
                }
            }
        };
        self.failed = Some(error.to_string());
        error
    }
}

/// Sets the deadline (and fuel) for the next guest call.
fn arm(store: &mut Store<HostState>, plugin: &Plugin) {
    let limits = &plugin.config().limits;
    store.set_epoch_deadline(engine::deadline_ticks(limits.callback_deadline));
    if let Some(fuel) = limits.fuel {
        // Only fails for an engine without fuel, which `fuel` rules out.
        let _ = store.set_fuel(fuel);
    }
}

/// A callback's raw result as an [`Action`]: 0 is Continue; any stop value,
/// or a local response sent meanwhile, is Pause.
fn action(raw: i32, local_response_sent: bool) -> Action {
    if raw == 0 && !local_response_sent {
        Action::Continue
    } else {
        Action::Pause
    }
}

/// Sizes passed to the guest are `i32` (wasm32 `usize`).
fn guest_len(len: usize) -> i32 {
    i32::try_from(len).unwrap_or(i32::MAX)
}

fn proc_exit_code(error: &wasmtime::Error) -> Option<i32> {
    error
        .chain()
        .find_map(|e| e.downcast_ref::<ProcExit>())
        .map(|exit| exit.0)
}

/// A one-line description: the trap (or host error) plus the innermost wasm
/// frame, without the full backtrace (that goes to the debug log).
fn trap_reason(error: &wasmtime::Error) -> String {
    let root = error.root_cause().to_string();
    match error
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .and_then(|bt| bt.frames().first())
    {
        Some(frame) => match frame.func_name() {
            Some(func) => format!("{root} (in {func})"),
            None => format!("{root} (in wasm function {})", frame.func_index()),
        },
        None => root,
    }
}
