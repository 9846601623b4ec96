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
//! A guest trap or `proc_exit` fails the whole instance (cpp-host's
//! `FailState::RuntimeError`): the error names the plugin and the callback,
//! and every later call returns [`Error::InstanceFailed`].

use std::mem;
use std::time::Duration;

use wasmtime::{Instance, Store, TypedFunc, WasmParams, WasmResults};

use crate::abi::AbiVersion;
use crate::error::Error;
use crate::plugin::Plugin;
use crate::state::{CallScope, ConfigPhase, ContextKind, HostState};
use crate::stream::{Action, HttpStream, StreamRequest};
use crate::wasi::ProcExit;

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
    on_done: Option<TypedFunc<i32, i32>>,
    on_log: Option<TypedFunc<i32, ()>>,
    on_delete: Option<TypedFunc<i32, ()>>,
}

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
    pub(crate) fn new(plugin: Plugin) -> Result<PluginInstance, Error> {
        let name = plugin.name().to_owned();
        let pre = plugin.instance_pre();
        let mut store = Store::new(pre.module().engine(), HostState::new(plugin.clone()));
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
        if let Some(initialize) = initialize {
            self.scoped(0, ConfigPhase::None, "_initialize", |store| {
                initialize.call(store, ())
            })?;
            if let Some(main) = main {
                self.scoped(0, ConfigPhase::None, "main", |store| {
                    main.call(store, (0, 0))
                })?;
            } else if let Some(main_void) = main_void {
                self.scoped(0, ConfigPhase::None, "__main_void", |store| {
                    main_void.call(store, ())
                })?;
            }
        } else if let Some(start) = start {
            // A WASI command may end `_start` with proc_exit(0): that is a
            // normal return, not a failure.
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
        self.check_usable()?;
        let id = self.alloc_context_id();
        let root = self.root_context_id();
        self.store.data_mut().contexts.insert(id, ContextKind::Http);
        if let Some(f) = self.callbacks.on_context_create.clone() {
            self.scoped(id, ConfigPhase::None, "proxy_on_context_create", |store| {
                f.call(store, (id as i32, root as i32))
            })?;
        }
        Ok(id)
    }

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
        self.check_http_context(context_id)?;
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
        Ok(if raw == 0 && !local_response_sent {
            Action::Continue
        } else {
            Action::Pause
        })
    }

    /// Ends an HTTP context: `proxy_on_done`, `proxy_on_log`, `proxy_on_delete`
    /// (the stream is readable in all three). The context is gone afterwards,
    /// even if a callback fails.
    pub fn finish_http_context(
        &mut self,
        context_id: u32,
        stream: &mut HttpStream,
    ) -> Result<(), Error> {
        self.check_http_context(context_id)?;
        let callbacks = (
            self.callbacks.on_done.clone(),
            self.callbacks.on_log.clone(),
            self.callbacks.on_delete.clone(),
        );
        let result = self.with_stream(context_id, stream, |this| {
            // A stream context's on_done answer does not delay its end: Envoy
            // only waits for `proxy_done` from root contexts.
            if let Some(f) = callbacks.0 {
                this.run("proxy_on_done", |store| f.call(store, context_id as i32))?;
            }
            if let Some(f) = callbacks.1 {
                this.run("proxy_on_log", |store| f.call(store, context_id as i32))?;
            }
            if let Some(f) = callbacks.2 {
                this.run("proxy_on_delete", |store| f.call(store, context_id as i32))?;
            }
            Ok(())
        });
        self.store.data_mut().contexts.remove(&context_id);
        result.map(|((), _)| ())
    }

    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    /// The root context's id (the first id handed out, 1).
    pub fn root_context_id(&self) -> u32 {
        self.store.data().root_context_id
    }

    /// The tick period the plugin asked for, if any (ticks are not delivered yet).
    pub fn tick_period(&self) -> Option<Duration> {
        self.store.data().tick_period
    }

    /// `proxy_continue_stream` / `proxy_close_stream` calls since the last take.
    pub fn take_stream_requests(&mut self) -> Vec<StreamRequest> {
        mem::take(&mut self.store.data_mut().stream_requests)
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

    fn check_http_context(&self, context_id: u32) -> Result<(), Error> {
        self.check_usable()?;
        match self.store.data().contexts.get(&context_id) {
            Some(ContextKind::Http) => Ok(()),
            _ => Err(Error::UnknownContext {
                plugin: self.plugin.name().to_owned(),
                context_id,
            }),
        }
    }

    /// Sets up the scope hostcalls see for the next guest call.
    fn begin_call(&mut self, context_id: u32, stream: Option<HttpStream>, phase: ConfigPhase) {
        self.store.data_mut().call = CallScope {
            effective_context_id: context_id,
            stream: stream.map(|s| (context_id, s)),
            phase,
            local_response_sent: false,
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

    /// Calls into the guest; a trap or `proc_exit` fails the instance.
    fn run<R>(
        &mut self,
        callback: &'static str,
        f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, Error> {
        self.check_usable()?;
        f(&mut self.store).map_err(|e| self.fail(callback, e))
    }

    fn fail(&mut self, callback: &'static str, error: wasmtime::Error) -> Error {
        let plugin = self.plugin.name().to_owned();
        let error = match proc_exit_code(&error) {
            Some(code) => Error::Exit {
                plugin,
                callback,
                code,
            },
            None => {
                tracing::debug!(plugin = %plugin, callback, "guest trap: {error:?}");
                Error::Trap {
                    plugin,
                    callback,
                    reason: trap_reason(&error),
                }
            }
        };
        self.failed = Some(error.to_string());
        error
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
