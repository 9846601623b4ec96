//! The engine seam: what hostcalls need from a running guest ([`HostContext`])
//! and what [`crate::PluginInstance`] needs from a VM ([`Vm`]).
//!
//! Everything Proxy-Wasm — status codes, the checks and their order, memory
//! handed over through the guest allocator, header maps, contexts — is written
//! once against these traits; an engine backend only moves bytes and calls
//! functions. Backends: Wasmtime (`crate::wasmtime_vm`, the default) and
//! WasmEdge (`crate::wasmedge`, feature `wasmedge`).
//!
//! Both traits are used through generics, never `dyn`: every hostcall is
//! monomorphised per backend, so the Wasmtime hot path is what it was before
//! the seam existed. [`crate::PluginInstance`] picks its VM with one `match`
//! per callback.

use std::fmt;

use crate::state::HostState;

/// What a hostcall sees while the guest that called it is suspended.
pub(crate) trait HostContext {
    /// How the engine unwinds a guest from inside a host function.
    type Trap: fmt::Debug;

    fn state(&self) -> &HostState;
    fn state_mut(&mut self) -> &mut HostState;
    /// The guest's linear memory (empty if it exports none).
    fn memory(&self) -> &[u8];
    fn memory_mut(&mut self) -> &mut [u8];
    /// Guest memory and host state at once, so a hostcall can read its
    /// arguments in place while it changes the state (no copies).
    fn memory_and_state_mut(&mut self) -> (&[u8], &mut HostState);
    /// Calls the guest allocator with `size`; `None` if the module has none.
    fn call_allocator(&mut self, size: i32) -> Option<Result<i32, Self::Trap>>;
}

/// A guest export the host calls: the WASI start functions and every
/// Proxy-Wasm callback. Arguments are all `i32`; the result is the
/// callback's `i32`, or 0 for those without one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Callback {
    Initialize,
    Start,
    Main,
    MainVoid,
    OnContextCreate,
    OnVmStart,
    OnConfigure,
    OnRequestHeaders,
    OnResponseHeaders,
    OnRequestBody,
    OnResponseBody,
    OnRequestTrailers,
    OnResponseTrailers,
    OnNewConnection,
    OnDownstreamData,
    OnUpstreamData,
    OnDownstreamConnectionClose,
    OnUpstreamConnectionClose,
    OnTick,
    OnHttpCallResponse,
    OnGrpcReceiveInitialMetadata,
    OnGrpcReceive,
    OnGrpcReceiveTrailingMetadata,
    OnGrpcClose,
    OnQueueReady,
    OnForeignFunction,
    OnDone,
    OnLog,
    OnDelete,
}

/// The signature of an export: `(params, returns an i32)`.
pub(crate) struct Signature(pub usize, pub bool);

impl Callback {
    pub(crate) const ALL: [Callback; 29] = [
        Callback::Initialize,
        Callback::Start,
        Callback::Main,
        Callback::MainVoid,
        Callback::OnContextCreate,
        Callback::OnVmStart,
        Callback::OnConfigure,
        Callback::OnRequestHeaders,
        Callback::OnResponseHeaders,
        Callback::OnRequestBody,
        Callback::OnResponseBody,
        Callback::OnRequestTrailers,
        Callback::OnResponseTrailers,
        Callback::OnNewConnection,
        Callback::OnDownstreamData,
        Callback::OnUpstreamData,
        Callback::OnDownstreamConnectionClose,
        Callback::OnUpstreamConnectionClose,
        Callback::OnTick,
        Callback::OnHttpCallResponse,
        Callback::OnGrpcReceiveInitialMetadata,
        Callback::OnGrpcReceive,
        Callback::OnGrpcReceiveTrailingMetadata,
        Callback::OnGrpcClose,
        Callback::OnQueueReady,
        Callback::OnForeignFunction,
        Callback::OnDone,
        Callback::OnLog,
        Callback::OnDelete,
    ];

    /// The export's name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Callback::Initialize => "_initialize",
            Callback::Start => "_start",
            Callback::Main => "main",
            Callback::MainVoid => "__main_void",
            Callback::OnContextCreate => "proxy_on_context_create",
            Callback::OnVmStart => "proxy_on_vm_start",
            Callback::OnConfigure => "proxy_on_configure",
            Callback::OnRequestHeaders => "proxy_on_request_headers",
            Callback::OnResponseHeaders => "proxy_on_response_headers",
            Callback::OnRequestBody => "proxy_on_request_body",
            Callback::OnResponseBody => "proxy_on_response_body",
            Callback::OnRequestTrailers => "proxy_on_request_trailers",
            Callback::OnResponseTrailers => "proxy_on_response_trailers",
            Callback::OnNewConnection => "proxy_on_new_connection",
            Callback::OnDownstreamData => "proxy_on_downstream_data",
            Callback::OnUpstreamData => "proxy_on_upstream_data",
            Callback::OnDownstreamConnectionClose => "proxy_on_downstream_connection_close",
            Callback::OnUpstreamConnectionClose => "proxy_on_upstream_connection_close",
            Callback::OnTick => "proxy_on_tick",
            Callback::OnHttpCallResponse => "proxy_on_http_call_response",
            Callback::OnGrpcReceiveInitialMetadata => "proxy_on_grpc_receive_initial_metadata",
            Callback::OnGrpcReceive => "proxy_on_grpc_receive",
            Callback::OnGrpcReceiveTrailingMetadata => "proxy_on_grpc_receive_trailing_metadata",
            Callback::OnGrpcClose => "proxy_on_grpc_close",
            Callback::OnQueueReady => "proxy_on_queue_ready",
            Callback::OnForeignFunction => "proxy_on_foreign_function",
            Callback::OnDone => "proxy_on_done",
            Callback::OnLog => "proxy_on_log",
            Callback::OnDelete => "proxy_on_delete",
        }
    }

    /// The signature the host expects under `abi`; header callbacks take
    /// `end_of_stream` only since ABI 0.2.0.
    pub(crate) fn signature(self, abi: crate::abi::AbiVersion) -> Signature {
        use Callback::*;
        match self {
            Initialize | Start => Signature(0, false),
            MainVoid => Signature(0, true),
            Main => Signature(2, true),
            OnContextCreate
            | OnDownstreamConnectionClose
            | OnUpstreamConnectionClose
            | OnQueueReady => Signature(2, false),
            OnVmStart | OnConfigure | OnRequestTrailers | OnResponseTrailers => Signature(2, true),
            OnRequestHeaders | OnResponseHeaders => Signature(
                if abi.header_callbacks_have_end_of_stream() {
                    3
                } else {
                    2
                },
                true,
            ),
            OnRequestBody | OnResponseBody | OnDownstreamData | OnUpstreamData => {
                Signature(3, true)
            }
            OnNewConnection | OnDone => Signature(1, true),
            OnTick | OnLog | OnDelete => Signature(1, false),
            OnHttpCallResponse => Signature(5, false),
            OnGrpcReceiveInitialMetadata
            | OnGrpcReceive
            | OnGrpcReceiveTrailingMetadata
            | OnGrpcClose
            | OnForeignFunction => Signature(3, false),
        }
    }
}

/// Why a guest call failed, in engine-independent terms.
#[derive(Debug)]
pub(crate) enum GuestFailure {
    /// WASI `proc_exit(code)`.
    Exit(i32),
    /// The callback ran past its wall-clock deadline.
    Deadline,
    /// The callback used up its fuel.
    OutOfFuel,
    /// Any other trap or host error: a one-line description.
    Trap(String),
}

/// One instantiated module on some engine, with its [`HostState`].
pub(crate) trait Vm {
    fn state(&self) -> &HostState;
    fn state_mut(&mut self) -> &mut HostState;
    /// Whether the module exports `callback` (with the expected signature).
    fn has(&self, callback: Callback) -> bool;
    /// Calls `callback` with `args` (as many as its signature has) under a
    /// fresh deadline and fuel; a missing export returns `Ok(0)`.
    fn call(&mut self, callback: Callback, args: &[i32]) -> Result<i32, GuestFailure>;
    /// The guest's linear memory size in bytes.
    fn memory_bytes(&self) -> usize;
}

#[cfg(test)]
mod tests {
    //! The seam is real: hostcalls run against a context that is no engine
    //! at all, a byte vector and a bump allocator.

    use super::HostContext;
    use crate::abi::Status;
    use crate::hostcalls::{self, Restricted, header_maps};
    use crate::state::{HostState, Restriction};
    use crate::stream::HttpStream;
    use crate::{Embedder, Plugin, PluginConfig, pairs};

    struct Bytes {
        state: HostState,
        /// The stream `state` points at (see `LentStream`).
        _stream: Box<HttpStream>,
        memory: Vec<u8>,
        heap: i32,
        allocator_traps: bool,
    }

    impl HostContext for Bytes {
        type Trap = String;
        fn state(&self) -> &HostState {
            &self.state
        }
        fn state_mut(&mut self) -> &mut HostState {
            &mut self.state
        }
        fn memory(&self) -> &[u8] {
            &self.memory
        }
        fn memory_mut(&mut self) -> &mut [u8] {
            &mut self.memory
        }
        fn memory_and_state_mut(&mut self) -> (&[u8], &mut HostState) {
            (&self.memory, &mut self.state)
        }
        fn call_allocator(&mut self, size: i32) -> Option<Result<i32, String>> {
            if self.allocator_traps {
                return Some(Err("allocator trapped".into()));
            }
            let ptr = self.heap;
            self.heap += size;
            Some(Ok(ptr))
        }
    }

    impl Restricted for Bytes {
        fn host_trap(&mut self, message: String) -> String {
            message
        }
        fn exit_trap(&mut self, code: i32) -> String {
            format!("exit {code}")
        }
    }

    fn bytes() -> Bytes {
        let wat = r#"(module (memory (export "memory") 1)
            (func (export "malloc") (param i32) (result i32) (i32.const 0))
            (func (export "proxy_abi_version_0_2_1")))"#;
        let plugin = Plugin::compile(PluginConfig::default(), wat.as_bytes()).unwrap();
        let mut state = HostState::new(plugin, Embedder::default());
        let mut stream = HttpStream::default();
        stream.request_headers.add(":path", b"/seam");
        stream.request_headers.add("x-a", b"1");
        let mut stream = Box::new(stream);
        state.call.effective_context_id = 2;
        // SAFETY: the box lives in `Bytes::_stream`, dropped after `state`.
        state.call.stream = Some((2, unsafe { crate::state::LentStream::lend(&mut stream) }));
        Bytes {
            state,
            _stream: stream,
            memory: vec![0; 4096],
            heap: 1024,
            allocator_traps: false,
        }
    }

    fn get_pairs(g: &mut Bytes, ptr_ptr: i32, size_ptr: i32) -> Result<i32, String> {
        hostcalls::dispatch(g, "proxy_get_header_map_pairs", |g| {
            header_maps::get_pairs(g, 0, ptr_ptr, size_ptr)
        })
    }

    fn u32_at(g: &Bytes, at: usize) -> usize {
        u32::from_le_bytes(g.memory[at..at + 4].try_into().unwrap()) as usize
    }

    #[test]
    fn hostcalls_run_without_an_engine() {
        let mut g = bytes();
        assert_eq!(get_pairs(&mut g, 16, 20), Ok(Status::Ok.code()));
        let (ptr, size) = (u32_at(&g, 16), u32_at(&g, 20));
        assert_eq!(ptr, 1024, "handed over through the guest allocator");
        let map = pairs::deserialize(&g.memory[ptr..ptr + size]).unwrap();
        assert_eq!(map[0], (":path".to_owned(), b"/seam".to_vec()));
        assert_eq!(map[1], ("x-a".to_owned(), b"1".to_vec()));

        // The same checks as on a real engine: a bad pointer is a status,
        assert_eq!(
            get_pairs(&mut g, 1 << 20, 20),
            Ok(Status::InvalidMemoryAccess.code())
        );
        // a forbidden call inside the allocator and a trapping allocator unwind.
        g.state.call.restriction = Restriction::Allocator;
        assert!(get_pairs(&mut g, 16, 20).unwrap_err().contains("forbidden"));
        g.state.call.restriction = Restriction::None;
        g.allocator_traps = true;
        assert_eq!(get_pairs(&mut g, 16, 20), Err("allocator trapped".into()));
    }
}
