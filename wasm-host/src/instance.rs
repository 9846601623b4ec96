//! [`PluginInstance`]: one VM of a plugin (on the engine it chose, see
//! [`crate::guest`]), its contexts, and the host → guest callbacks.
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

use crate::embedder::{Embedder, HttpCallResponse};
use crate::error::Error;
use crate::guest::{Callback, GuestFailure, Vm};
use crate::headers::HeaderMap;
#[cfg(not(feature = "wasmedge"))]
use crate::plugin::WASMEDGE_MISSING;
use crate::plugin::{EngineKind, Plugin, PluginCounters};
use crate::state::{
    CallEnd, CallScope, CalloutKind, ConfigPhase, ContextKind, HostState, LentStream, Restriction,
};
use crate::stream::{Action, HttpStream, PeerType, StreamRequest, TcpConnection};
use crate::wasmtime_vm::WasmtimeVm;

/// cpp-host's `WasmResult::BrokenConnection`: the status of a failed http call.
const BROKEN_CONNECTION: u32 = 11;

/// One instance of a plugin, used by one worker thread at a time.
pub struct PluginInstance {
    plugin: Plugin,
    vm: Backend,
    next_context_id: u32,
    /// Why the instance stopped working, once it has.
    failed: Option<String>,
}

/// The VM of the engine the plugin chose ([`crate::PluginConfig::engine`]).
/// One `match` per guest call; behind it everything is monomorphic.
#[cfg_attr(
    feature = "wasmedge",
    expect(
        clippy::large_enum_variant,
        reason = "Wasmtime is the common case; boxing it would add an indirection per call"
    )
)]
enum Backend {
    Wasmtime(WasmtimeVm),
    #[cfg(feature = "wasmedge")]
    WasmEdge(crate::wasmedge::WasmEdgeVm),
}

macro_rules! on_backend {
    ($self:expr, $vm:ident => $e:expr) => {
        match $self {
            Backend::Wasmtime($vm) => $e,
            #[cfg(feature = "wasmedge")]
            Backend::WasmEdge($vm) => $e,
        }
    };
}

impl Backend {
    #[inline]
    fn state(&self) -> &HostState {
        on_backend!(self, vm => vm.state())
    }
    #[inline]
    fn state_mut(&mut self) -> &mut HostState {
        on_backend!(self, vm => vm.state_mut())
    }
    #[inline]
    fn has(&self, callback: Callback) -> bool {
        on_backend!(self, vm => vm.has(callback))
    }
    #[inline]
    fn call(&mut self, callback: Callback, args: &[i32]) -> Result<i32, GuestFailure> {
        on_backend!(self, vm => vm.call(callback, args))
    }
    fn memory_bytes(&self) -> usize {
        on_backend!(self, vm => vm.memory_bytes())
    }
}

impl PluginInstance {
    pub(crate) fn new(plugin: Plugin, embedder: Embedder) -> Result<PluginInstance, Error> {
        let name = plugin.name().to_owned();
        let vm = match plugin.config().engine {
            EngineKind::Wasmtime => Backend::Wasmtime(WasmtimeVm::new(&plugin, embedder)?),
            #[cfg(feature = "wasmedge")]
            EngineKind::WasmEdge => {
                Backend::WasmEdge(crate::wasmedge::WasmEdgeVm::new(&plugin, embedder)?)
            }
            // Plugin::compile refuses this already; kept for exhaustiveness.
            #[cfg(not(feature = "wasmedge"))]
            EngineKind::WasmEdge => {
                return Err(Error::Engine {
                    plugin: name,
                    reason: WASMEDGE_MISSING.into(),
                });
            }
        };
        let mut this = PluginInstance {
            plugin,
            vm,
            next_context_id: 1,
            failed: None,
        };
        this.start()?;
        this.create_root_context()?;
        tracing::debug!(plugin = %name, root_context_id = this.root_context_id(), "plugin instance ready");
        Ok(this)
    }

    /// Runs the module's WASI initialisation: a reactor's `_initialize` (plus
    /// `main` or `__main_void`, which reactor-style SDKs use as their entry,
    /// as cpp-host does), or else a command's `_start`.
    fn start(&mut self) -> Result<(), Error> {
        // cpp-host's startVm allows only logging and WASI here.
        self.vm.state_mut().call.restriction = Restriction::Start;
        let result = self.start_inner();
        self.vm.state_mut().call = CallScope::default();
        result
    }

    fn start_inner(&mut self) -> Result<(), Error> {
        if self.vm.has(Callback::Initialize) {
            self.run(Callback::Initialize, &[])?;
            if self.vm.has(Callback::Main) {
                self.run(Callback::Main, &[0, 0])?;
            } else if self.vm.has(Callback::MainVoid) {
                self.run(Callback::MainVoid, &[])?;
            }
        } else if self.vm.has(Callback::Start) {
            // A WASI command may end `_start` with proc_exit(0): that is a
            // normal return, not a failure.
            match self.vm.call(Callback::Start, &[]) {
                Ok(_) | Err(GuestFailure::Exit(0)) => {}
                Err(e) => return Err(self.fail(Callback::Start, e)),
            }
        }
        Ok(())
    }

    fn create_root_context(&mut self) -> Result<(), Error> {
        let root = self.alloc_context_id();
        let state = self.vm.state_mut();
        state.contexts.insert(root, ContextKind::Root);
        state.root_context_id = root;
        let config = self.plugin.config();
        let vm_config_size = guest_len(config.vm_configuration.len());
        let plugin_config_size = guest_len(config.configuration.len());

        if self.vm.has(Callback::OnContextCreate) {
            self.scoped(
                root,
                ConfigPhase::None,
                Callback::OnContextCreate,
                &[root as i32, 0],
            )?;
        }
        // cpp-host passes the root context id as the "unused" first argument;
        // the Rust SDK panics if it is not a known root context.
        if self.vm.has(Callback::OnVmStart) {
            let ok = self.scoped(
                root,
                ConfigPhase::None,
                Callback::OnVmStart,
                &[root as i32, vm_config_size],
            )?;
            if ok == 0 {
                return Err(Error::VmStartFailed {
                    plugin: self.plugin.name().to_owned(),
                });
            }
        }
        if self.vm.has(Callback::OnConfigure) {
            let ok = self.scoped(
                root,
                ConfigPhase::Configure,
                Callback::OnConfigure,
                &[root as i32, plugin_config_size],
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
        self.vm.state_mut().contexts.insert(id, kind);
        if self.vm.has(Callback::OnContextCreate) {
            self.scoped(
                id,
                ConfigPhase::None,
                Callback::OnContextCreate,
                &[id as i32, root as i32],
            )?;
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
        // ABI 0.1.0 modules take no `end_of_stream`; the VM passes what the
        // export's signature has.
        let args = [
            context_id as i32,
            guest_len(stream.request_headers.len()),
            i32::from(end_of_stream),
        ];
        self.stream_callback(Callback::OnRequestHeaders, context_id, stream, &args)
    }

    /// `proxy_on_response_headers` for `context_id`, with `stream` lent to the plugin.
    pub fn on_response_headers(
        &mut self,
        context_id: u32,
        stream: &mut HttpStream,
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        let args = [
            context_id as i32,
            guest_len(stream.response_headers.len()),
            i32::from(end_of_stream),
        ];
        self.stream_callback(Callback::OnResponseHeaders, context_id, stream, &args)
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
        let args = [
            context_id as i32,
            guest_len(stream.request_body.len()),
            i32::from(end_of_stream),
        ];
        self.stream_callback(Callback::OnRequestBody, context_id, stream, &args)
    }

    /// `proxy_on_response_body`, like [`PluginInstance::on_request_body`].
    pub fn on_response_body(
        &mut self,
        context_id: u32,
        stream: &mut HttpStream,
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        let args = [
            context_id as i32,
            guest_len(stream.response_body.len()),
            i32::from(end_of_stream),
        ];
        self.stream_callback(Callback::OnResponseBody, context_id, stream, &args)
    }

    /// `proxy_on_request_trailers(id, num_trailers)` with `stream.request_trailers`.
    pub fn on_request_trailers(
        &mut self,
        context_id: u32,
        stream: &mut HttpStream,
    ) -> Result<Action, Error> {
        let args = [context_id as i32, guest_len(stream.request_trailers.len())];
        self.stream_callback(Callback::OnRequestTrailers, context_id, stream, &args)
    }

    /// `proxy_on_response_trailers(id, num_trailers)` with `stream.response_trailers`.
    pub fn on_response_trailers(
        &mut self,
        context_id: u32,
        stream: &mut HttpStream,
    ) -> Result<Action, Error> {
        let args = [context_id as i32, guest_len(stream.response_trailers.len())];
        self.stream_callback(Callback::OnResponseTrailers, context_id, stream, &args)
    }

    fn stream_callback(
        &mut self,
        callback: Callback,
        context_id: u32,
        stream: &mut HttpStream,
        args: &[i32],
    ) -> Result<Action, Error> {
        self.check_context(context_id, ContextKind::Http)?;
        if !self.vm.has(callback) {
            return Ok(Action::Continue);
        }
        let (raw, local_response_sent) =
            self.with_stream(context_id, stream, |this| this.run(callback, args))?;
        // 0 is Continue. Everything else stops the stream: 1 (Rust/Go `Pause`)
        // is StopAllIterationAndWatermark in cpp-host; the C++ SDK's other
        // stop values are treated alike. A local response stops it regardless
        // of what the plugin returned (cpp-host's `stopNextIteration`).
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
        // A stream context's on_done answer does not delay its end: Envoy
        // only waits for `proxy_done` from root contexts.
        for callback in [Callback::OnDone, Callback::OnLog, Callback::OnDelete] {
            if self.vm.has(callback) {
                self.run(callback, &[context_id as i32])?;
            }
        }
        Ok(())
    }

    fn forget_context(&mut self, context_id: u32) {
        let state = self.vm.state_mut();
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
        self.tcp_callback(
            Callback::OnNewConnection,
            context_id,
            conn,
            &[context_id as i32],
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
        let args = [
            context_id as i32,
            guest_len(conn.downstream_data.len()),
            i32::from(end_of_stream),
        ];
        self.tcp_callback(Callback::OnDownstreamData, context_id, conn, &args)
    }

    /// `proxy_on_upstream_data(id, size, end_of_stream)` over `conn.upstream_data`.
    pub fn on_upstream_data(
        &mut self,
        context_id: u32,
        conn: &mut TcpConnection,
        end_of_stream: bool,
    ) -> Result<Action, Error> {
        let args = [
            context_id as i32,
            guest_len(conn.upstream_data.len()),
            i32::from(end_of_stream),
        ];
        self.tcp_callback(Callback::OnUpstreamData, context_id, conn, &args)
    }

    /// `proxy_on_downstream_connection_close(id, peer_type)`.
    pub fn on_downstream_connection_close(
        &mut self,
        context_id: u32,
        conn: &mut TcpConnection,
        peer: PeerType,
    ) -> Result<(), Error> {
        let args = [context_id as i32, peer as i32];
        self.tcp_callback(
            Callback::OnDownstreamConnectionClose,
            context_id,
            conn,
            &args,
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
        let args = [context_id as i32, peer as i32];
        self.tcp_callback(Callback::OnUpstreamConnectionClose, context_id, conn, &args)
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

    fn tcp_callback(
        &mut self,
        callback: Callback,
        context_id: u32,
        conn: &mut TcpConnection,
        args: &[i32],
    ) -> Result<Action, Error> {
        self.check_context(context_id, ContextKind::Tcp)?;
        if !self.vm.has(callback) {
            return Ok(Action::Continue);
        }
        let raw = self.with_tcp(context_id, conn, |this| this.run(callback, args))?;
        Ok(action(raw, false))
    }

    // === root-context events ===

    /// `proxy_on_tick(root)`: call it every [`PluginInstance::tick_period`].
    pub fn on_tick(&mut self) -> Result<(), Error> {
        self.check_usable()?;
        let root = self.root_context_id();
        if self.vm.has(Callback::OnTick) {
            self.scoped(root, ConfigPhase::None, Callback::OnTick, &[root as i32])?;
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
        if !self.vm.has(Callback::OnHttpCallResponse) {
            return Ok(());
        }
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
            Callback::OnHttpCallResponse,
            &[
                root as i32,
                token as i32,
                num_headers,
                body_size,
                num_trailers,
            ],
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
        if !self.vm.has(Callback::OnGrpcReceiveInitialMetadata) {
            return Ok(());
        }
        let (root, count) = (self.root_context_id(), guest_len(metadata.len()));
        let scope = CallScope {
            grpc_initial_metadata: Some(metadata),
            ..CallScope::default()
        };
        self.root_event(
            scope,
            origin,
            stream,
            Callback::OnGrpcReceiveInitialMetadata,
            &[root as i32, token as i32, count],
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
            self.vm.state_mut().callouts.remove(&token);
        }
        if !self.vm.has(Callback::OnGrpcReceive) {
            return Ok(());
        }
        let (root, size) = (self.root_context_id(), guest_len(message.len()));
        let scope = CallScope {
            grpc_message: Some(message),
            ..CallScope::default()
        };
        self.root_event(
            scope,
            origin,
            stream,
            Callback::OnGrpcReceive,
            &[root as i32, token as i32, size],
        )
    }

    /// gRPC trailing metadata for call or stream `token`.
    pub fn on_grpc_receive_trailing_metadata(
        &mut self,
        token: u32,
        metadata: HeaderMap,
        stream: Option<&mut HttpStream>,
    ) -> Result<(), Error> {
        let origin = self.grpc_origin(token)?;
        if !self.vm.has(Callback::OnGrpcReceiveTrailingMetadata) {
            return Ok(());
        }
        let (root, count) = (self.root_context_id(), guest_len(metadata.len()));
        let scope = CallScope {
            grpc_trailing_metadata: Some(metadata),
            ..CallScope::default()
        };
        self.root_event(
            scope,
            origin,
            stream,
            Callback::OnGrpcReceiveTrailingMetadata,
            &[root as i32, token as i32, count],
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
        self.vm.state_mut().callouts.remove(&token);
        if !self.vm.has(Callback::OnGrpcClose) {
            return Ok(());
        }
        let root = self.root_context_id();
        let scope = CallScope {
            status: Some((status as u32, message.as_bytes().to_vec())),
            ..CallScope::default()
        };
        self.root_event(
            scope,
            origin,
            stream,
            Callback::OnGrpcClose,
            &[root as i32, token as i32, status],
        )
    }

    /// `proxy_on_foreign_function(root, function_id, args_size)` with `arguments`
    /// as FOREIGN_FUNCTION_ARGUMENTS (ABI 0.2.0+).
    pub fn on_foreign_function(
        &mut self,
        function_id: u32,
        arguments: Vec<u8>,
    ) -> Result<(), Error> {
        self.check_usable()?;
        if !self.vm.has(Callback::OnForeignFunction) {
            return Ok(());
        }
        let (root, size) = (self.root_context_id(), guest_len(arguments.len()));
        let scope = CallScope {
            foreign_arguments: Some(arguments),
            ..CallScope::default()
        };
        self.root_event(
            scope,
            root,
            None,
            Callback::OnForeignFunction,
            &[root as i32, function_id as i32, size],
        )
    }

    /// Whether a shared queue this instance registered got items since the
    /// last [`PluginInstance::deliver_queue_ready`] (the queue waker of the
    /// [`Embedder`] fires at the same moment, from the enqueuing thread).
    pub fn has_pending_queue_ready(&self) -> bool {
        self.vm.state().queue_owner.has_pending()
    }

    /// Calls `proxy_on_queue_ready(root, queue_id)` once per queue that got
    /// items; returns how many. Run it on the instance's own worker.
    pub fn deliver_queue_ready(&mut self) -> Result<usize, Error> {
        self.check_usable()?;
        let pending = self.vm.state().queue_owner.take_pending();
        if !self.vm.has(Callback::OnQueueReady) {
            return Ok(0);
        }
        let root = self.root_context_id();
        for &queue_id in &pending {
            self.scoped(
                root,
                ConfigPhase::None,
                Callback::OnQueueReady,
                &[root as i32, queue_id as i32],
            )?;
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
        let done = !self.vm.has(Callback::OnDone)
            || self.scoped(root, ConfigPhase::None, Callback::OnDone, &[root as i32])? != 0;
        if done {
            self.delete_root()?;
        } else {
            self.vm.state_mut().pending_done.push(root);
        }
        Ok(done)
    }

    /// Whether the root context finished shutting down (after
    /// [`PluginInstance::shutdown`], directly or through `proxy_done`).
    pub fn is_done(&mut self) -> Result<bool, Error> {
        let root = self.root_context_id();
        let state = self.vm.state_mut();
        if let Some(index) = state.done.iter().position(|&id| id == root) {
            state.done.remove(index);
            self.delete_root()?;
        }
        Ok(!self.vm.state().contexts.contains_key(&root))
    }

    fn delete_root(&mut self) -> Result<(), Error> {
        let root = self.root_context_id();
        if self.vm.has(Callback::OnDelete) {
            self.scoped(root, ConfigPhase::None, Callback::OnDelete, &[root as i32])?;
        }
        self.vm.state_mut().contexts.remove(&root);
        Ok(())
    }

    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    /// The root context's id (the first id handed out, 1).
    pub fn root_context_id(&self) -> u32 {
        self.vm.state().root_context_id
    }

    /// The tick period the plugin asked for, if any: call
    /// [`PluginInstance::on_tick`] that often.
    pub fn tick_period(&self) -> Option<Duration> {
        self.vm.state().tick_period
    }

    /// `proxy_continue_stream` / `proxy_close_stream` calls since the last take.
    pub fn take_stream_requests(&mut self) -> Vec<StreamRequest> {
        mem::take(&mut self.vm.state_mut().stream_requests)
    }

    /// Sets an instance-wide property (seen by `proxy_get_property` in every
    /// context, after the stream's own properties).
    pub fn set_property(&mut self, path: &str, value: Vec<u8>) {
        self.vm
            .state_mut()
            .properties
            .insert(path.to_owned(), value);
    }

    /// An instance-wide property, e.g. one the plugin set outside a stream.
    pub fn property(&self, path: &str) -> Option<&[u8]> {
        self.vm.state().properties.get(path).map(Vec::as_slice)
    }

    /// Callout tokens still waiting for an answer.
    pub fn pending_callouts(&self) -> Vec<u32> {
        let mut tokens: Vec<u32> = self.vm.state().callouts.keys().copied().collect();
        tokens.sort_unstable();
        tokens
    }

    /// The guest's linear memory size in bytes (what an idle instance costs).
    pub fn memory_bytes(&self) -> usize {
        self.vm.memory_bytes()
    }

    /// Whether an earlier trap or `proc_exit` made this instance unusable.
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// The Wasmtime store and instance, for the crate's hostcall tests.
    #[cfg(test)]
    pub(crate) fn parts(
        &mut self,
    ) -> (
        &mut wasmtime::Store<crate::wasmtime_vm::WasmtimeState>,
        wasmtime::Instance,
    ) {
        match &mut self.vm {
            Backend::Wasmtime(vm) => vm.parts(),
            #[cfg(feature = "wasmedge")]
            Backend::WasmEdge(_) => unreachable!("the hostcall unit tests run on Wasmtime"),
        }
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
        match self.vm.state().contexts.get(&context_id) {
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
        let state = self.vm.state_mut();
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
        match self.vm.state().callouts.get(&token) {
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
        callback: Callback,
        args: &[i32],
    ) -> Result<(), Error> {
        scope.effective_context_id = self.root_context_id();
        if let Some(stream) = stream.filter(|_| self.vm.state().contexts.contains_key(&origin)) {
            // SAFETY: `stream` stays borrowed until `end_call` below clears it.
            scope.stream = Some((origin, unsafe { LentStream::lend(stream) }));
        }
        self.vm.state_mut().call = scope;
        let result = self.run(callback, args).map(drop);
        self.end_call();
        result
    }

    /// Sets up the scope hostcalls see for the next guest call.
    /// The scope is clear here: every call ends with [`Self::end_call`]. The
    /// stream is set either way, so a call that unwound through a panic
    /// cannot leave a stale [`LentStream`] for the next one.
    fn begin_call(&mut self, context_id: u32, stream: Option<LentStream>, phase: ConfigPhase) {
        let call = &mut self.vm.state_mut().call;
        call.effective_context_id = context_id;
        call.stream = stream.map(|s| (context_id, s));
        call.phase = phase;
    }

    fn end_call(&mut self) -> CallEnd {
        self.vm.state_mut().call.finish()
    }

    /// One guest call for `context_id` without a stream.
    fn scoped(
        &mut self,
        context_id: u32,
        phase: ConfigPhase,
        callback: Callback,
        args: &[i32],
    ) -> Result<i32, Error> {
        self.begin_call(context_id, None, phase);
        let result = self.run(callback, args);
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
        // SAFETY: `stream` stays borrowed until `end_call` below clears it.
        let lent = unsafe { LentStream::lend(stream) };
        self.begin_call(context_id, Some(lent), ConfigPhase::None);
        let result = f(self);
        let scope = self.end_call();
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
        self.vm.state_mut().call.tcp = Some((context_id, mem::take(conn)));
        let result = f(self);
        let scope = self.end_call();
        if let Some((_, lent)) = scope.tcp {
            *conn = lent;
        }
        result
    }

    /// Calls into the guest with a fresh deadline (and fuel); a trap, an
    /// interrupt or `proc_exit` fails the instance.
    #[inline]
    fn run(&mut self, callback: Callback, args: &[i32]) -> Result<i32, Error> {
        self.check_usable()?;
        self.vm
            .call(callback, args)
            .map_err(|failure| self.fail(callback, failure))
    }

    fn fail(&mut self, callback: Callback, failure: GuestFailure) -> Error {
        let plugin = self.plugin.name().to_owned();
        let callback = callback.name();
        let counters = self.plugin.counters();
        PluginCounters::bump(&counters.runtime_failures);
        let reason = match failure {
            GuestFailure::Exit(code) => {
                let error = Error::Exit {
                    plugin,
                    callback,
                    code,
                };
                self.failed = Some(error.to_string());
                return error;
            }
            GuestFailure::Deadline => {
                PluginCounters::bump(&counters.deadline_exceeded);
                format!(
                    "deadline exceeded: the callback ran longer than {} ms",
                    self.plugin.config().limits.callback_deadline.as_millis()
                )
            }
            GuestFailure::OutOfFuel => {
                "fuel exhausted: the callback used more than its fuel limit".to_owned()
            }
            GuestFailure::Trap(reason) => reason,
        };
        let error = Error::Trap {
            plugin,
            callback,
            reason,
        };
        self.failed = Some(error.to_string());
        error
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
