//! Test harness for hostcalls: a WAT guest that re-exports every import as
//! `"<module>.<name>"`, so a test can call a hostcall with arbitrary raw
//! arguments and inspect guest memory and host state around it.
//!
//! Guest memory: 4 pages. `put`/`slots` hand out scratch space from 1024; the
//! guest allocator is a bump allocator from 64 KiB whose behaviour the test
//! can switch (see [`AllocMode`]).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};

use wasmtime::Val;

use crate::abi::AbiVersion;
use crate::instance::PluginInstance;
use crate::plugin::{Plugin, PluginConfig};
use crate::state::{ConfigPhase, HostState, LentStream};
use crate::stream::HttpStream;

/// A pointer far outside the guest's 256 KiB memory.
pub(crate) const OUT_OF_BOUNDS: i32 = 0x7fff_0000;
/// Where scratch data starts.
const SCRATCH: i32 = 1024;
/// Where the guest heap starts (scratch must stay below).
pub(crate) const HEAP: i32 = 65536;

/// One import the test guest declares: module, name, parameter types
/// (`i` = i32, `I` = i64), whether it returns an i32.
struct Import(&'static str, &'static str, &'static str, bool);

const IMPORTS: &[Import] = &[
    Import("env", "proxy_log", "iii", true),
    Import("env", "proxy_get_log_level", "i", true),
    Import("env", "proxy_set_effective_context", "i", true),
    Import("env", "proxy_done", "", true),
    Import("env", "proxy_get_current_time_nanoseconds", "i", true),
    Import("env", "proxy_set_tick_period_milliseconds", "i", true),
    Import("env", "proxy_get_buffer_bytes", "iiiii", true),
    Import("env", "proxy_get_buffer_status", "iii", true),
    Import("env", "proxy_get_header_map_pairs", "iii", true),
    Import("env", "proxy_set_header_map_pairs", "iii", true),
    Import("env", "proxy_get_header_map_size", "ii", true),
    Import("env", "proxy_get_header_map_value", "iiiii", true),
    Import("env", "proxy_add_header_map_value", "iiiii", true),
    Import("env", "proxy_replace_header_map_value", "iiiii", true),
    Import("env", "proxy_remove_header_map_value", "iii", true),
    Import("env", "proxy_get_property", "iiii", true),
    Import("env", "proxy_send_local_response", "iiiiiiii", true),
    Import("env", "proxy_continue_stream", "i", true),
    Import("env", "proxy_close_stream", "i", true),
    Import("env", "proxy_set_buffer_bytes", "iiiii", true),
    Import("env", "proxy_set_property", "iiii", true),
    Import("env", "proxy_get_status", "iii", true),
    Import("env", "proxy_http_call", "iiiiiiiiii", true),
    Import("env", "proxy_grpc_call", "iiiiiiiiiiii", true),
    Import("env", "proxy_grpc_stream", "iiiiiiiii", true),
    Import("env", "proxy_grpc_send", "iiii", true),
    Import("env", "proxy_grpc_cancel", "i", true),
    Import("env", "proxy_grpc_close", "i", true),
    Import("env", "proxy_set_shared_data", "iiiii", true),
    Import("env", "proxy_get_shared_data", "iiiii", true),
    Import("env", "proxy_register_shared_queue", "iii", true),
    Import("env", "proxy_resolve_shared_queue", "iiiii", true),
    Import("env", "proxy_enqueue_shared_queue", "iii", true),
    Import("env", "proxy_dequeue_shared_queue", "iii", true),
    Import("env", "proxy_define_metric", "iiii", true),
    Import("env", "proxy_increment_metric", "iI", true),
    Import("env", "proxy_record_metric", "iI", true),
    Import("env", "proxy_get_metric", "ii", true),
    Import("env", "proxy_call_foreign_function", "iiiiii", true),
    Import("env", "pthread_equal", "ii", true),
    Import("env", "proxy_get_configuration", "ii", true),
    Import("env", "proxy_continue_request", "", true),
    Import("env", "proxy_continue_response", "", true),
    Import("env", "proxy_clear_route_cache", "", true),
    Import("env", "emscripten_notify_memory_growth", "i", false),
    // Not part of any ABI version: linked as a stub.
    Import("env", "proxy_on_vnext_thing", "i", true),
    Import("wasi_snapshot_preview1", "fd_write", "iiii", true),
    Import("wasi_snapshot_preview1", "clock_time_get", "iIi", true),
    Import("wasi_snapshot_preview1", "random_get", "ii", true),
    Import("wasi_snapshot_preview1", "environ_sizes_get", "ii", true),
    Import("wasi_snapshot_preview1", "environ_get", "ii", true),
    Import("wasi_snapshot_preview1", "args_sizes_get", "ii", true),
    Import("wasi_snapshot_preview1", "args_get", "ii", true),
    Import("wasi_snapshot_preview1", "sched_yield", "", true),
    Import("wasi_snapshot_preview1", "proc_exit", "i", false),
    Import("wasi_snapshot_preview1", "fd_close", "i", true),
    Import("wasi_unstable", "fd_write", "iiii", true),
    Import("wasi_unstable", "random_get", "ii", true),
];

/// What the guest allocator does.
#[derive(Clone, Copy)]
#[repr(i32)]
pub(crate) enum AllocMode {
    Normal = 0,
    /// Returns 0 (out of memory).
    Null = 1,
    /// Traps.
    Trap = 2,
    /// Returns a pointer outside its memory.
    Bogus = 3,
}

fn wat(abi: AbiVersion) -> String {
    // Imports must precede definitions in the text format.
    let mut imports = String::new();
    let mut trampolines = String::new();
    for Import(module, name, params, result) in IMPORTS {
        let params: Vec<&str> = params
            .chars()
            .map(|c| if c == 'I' { "i64" } else { "i32" })
            .collect();
        let result = if *result { "(result i32)" } else { "" };
        let sig = format!("(param {}) {result}", params.join(" "));
        let gets: String = (0..params.len())
            .map(|i| format!("local.get {i} "))
            .collect();
        imports += &format!("(import \"{module}\" \"{name}\" (func ${module}.{name} {sig}))\n");
        trampolines +=
            &format!("(func (export \"{module}.{name}\") {sig} {gets} call ${module}.{name})\n");
    }
    let mut wat = format!("(module\n{imports}{trampolines}");
    wat += &format!(
        r#"
        (memory (export "memory") 4)
        (global $heap (mut i32) (i32.const {HEAP}))
        (global $mode (export "alloc_mode") (mut i32) (i32.const 0))
        (global $allocations (export "allocations") (mut i32) (i32.const 0))
        (func (export "proxy_on_memory_allocate") (param $size i32) (result i32) (local $ptr i32)
            (if (i32.eq (global.get $mode) (i32.const 1)) (then (return (i32.const 0))))
            (if (i32.eq (global.get $mode) (i32.const 2)) (then unreachable))
            (if (i32.eq (global.get $mode) (i32.const 3)) (then (return (i32.const {OUT_OF_BOUNDS}))))
            (global.set $allocations (i32.add (global.get $allocations) (i32.const 1)))
            (local.set $ptr (global.get $heap))
            (global.set $heap (i32.add (global.get $heap) (local.get $size)))
            (local.get $ptr))
        (func (export "{marker}"))
        )"#,
        marker = abi.marker(),
    );
    wat
}

pub(crate) struct Guest {
    pub instance: PluginInstance,
    cursor: i32,
    /// The stream [`Guest::lend`] lends, kept in place here (the store only
    /// points at it, as it points at the embedder's stream during a call).
    lent: Option<Box<HttpStream>>,
}

impl Guest {
    /// A 0.2.1 guest named "test".
    pub fn new() -> Self {
        Self::with(
            AbiVersion::V0_2_1,
            PluginConfig {
                name: "test".into(),
                ..Default::default()
            },
        )
    }

    pub fn with(abi: AbiVersion, config: PluginConfig) -> Self {
        Self::with_embedder(abi, config, crate::Embedder::default())
    }

    pub fn with_embedder(abi: AbiVersion, config: PluginConfig, embedder: crate::Embedder) -> Self {
        // Compiling is the slow part in debug builds: once per ABI version.
        static COMPILED: OnceLock<Mutex<HashMap<AbiVersion, Plugin>>> = OnceLock::new();
        let compiled = {
            let mut cache = COMPILED
                .get_or_init(Default::default)
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            cache
                .entry(abi)
                .or_insert_with(|| {
                    Plugin::compile(PluginConfig::default(), wat(abi).as_bytes()).unwrap()
                })
                .clone()
        };
        let instance = compiled
            .with_config(config)
            .unwrap()
            .instantiate_with(embedder)
            .unwrap();
        Guest {
            instance,
            cursor: SCRATCH,
            lent: None,
        }
    }

    pub fn state(&mut self) -> &mut HostState {
        &mut self.instance.parts().0.data_mut().host
    }

    /// Calls the re-exported import `module.name`.
    pub fn try_call(
        &mut self,
        module: &str,
        name: &str,
        args: &[Val],
    ) -> wasmtime::Result<Option<i32>> {
        let (store, instance) = self.instance.parts();
        let func = instance
            .get_func(&mut *store, &format!("{module}.{name}"))
            .unwrap_or_else(|| panic!("the test guest does not import {module}.{name}"));
        let mut results = vec![Val::I32(0); func.ty(&*store).results().len()];
        func.call(&mut *store, args, &mut results)?;
        Ok(results.first().and_then(Val::i32))
    }

    /// Calls `env.name` with i32 arguments and returns the status.
    pub fn env(&mut self, name: &str, args: &[i32]) -> i32 {
        let args: Vec<Val> = args.iter().copied().map(Val::I32).collect();
        self.try_call("env", name, &args).unwrap().unwrap()
    }

    /// Calls `wasi_snapshot_preview1.name` with i32 arguments and returns the errno.
    pub fn wasi(&mut self, name: &str, args: &[i32]) -> i32 {
        let args: Vec<Val> = args.iter().copied().map(Val::I32).collect();
        self.try_call("wasi_snapshot_preview1", name, &args)
            .unwrap()
            .unwrap()
    }

    /// Copies `bytes` into scratch memory; returns (ptr, len).
    pub fn put(&mut self, bytes: &[u8]) -> (i32, i32) {
        let ptr = self.cursor;
        self.cursor += i32::try_from(bytes.len()).unwrap() + 1;
        assert!(self.cursor < HEAP, "test scratch space exhausted");
        let (store, _) = self.instance.parts();
        crate::memory::write(store, ptr, bytes).unwrap();
        (ptr, bytes.len() as i32)
    }

    /// Two zeroed u32 out-parameter slots (e.g. return_data, return_size).
    pub fn slots(&mut self) -> (i32, i32) {
        let (ptr, _) = self.put(&[0; 8]);
        (ptr, ptr + 4)
    }

    pub fn read(&mut self, ptr: i32, len: i32) -> Vec<u8> {
        let (store, _) = self.instance.parts();
        crate::memory::read(store, ptr, len).unwrap()
    }

    pub fn read_u32(&mut self, ptr: i32) -> u32 {
        let (store, _) = self.instance.parts();
        crate::memory::read_u32(store, ptr).unwrap()
    }

    pub fn read_u64(&mut self, ptr: i32) -> u64 {
        let bytes = self.read(ptr, 8);
        u64::from_le_bytes(bytes.try_into().unwrap())
    }

    /// What a hostcall handed over through (return_data, return_size):
    /// `None` for pointer 0 (then the size must be 0 too).
    pub fn returned(&mut self, (ptr_ptr, size_ptr): (i32, i32)) -> Option<Vec<u8>> {
        let ptr = self.read_u32(ptr_ptr) as i32;
        let size = self.read_u32(size_ptr) as i32;
        if ptr == 0 {
            assert_eq!(size, 0, "null data with a size");
            None
        } else {
            assert!(ptr >= HEAP, "data not from the guest allocator: {ptr:#x}");
            Some(self.read(ptr, size))
        }
    }

    /// Creates an HTTP context and lends `stream` to it, as during a callback.
    pub fn lend(&mut self, stream: HttpStream) -> u32 {
        let id = self.instance.create_http_context().unwrap();
        let lent = self.lent.insert(Box::new(stream));
        // SAFETY: the box lives in `self.lent` until the guest is dropped
        // (after the instance) and is only reached through the store.
        let lent = unsafe { LentStream::lend(lent) };
        let call = &mut self.state().call;
        call.effective_context_id = id;
        call.stream = Some((id, lent));
        id
    }

    pub fn stream(&mut self) -> &mut HttpStream {
        self.state()
            .call
            .stream
            .as_mut()
            .expect("no stream lent")
            .1
            .get_mut()
    }

    pub fn set_phase(&mut self, phase: ConfigPhase) {
        self.state().call.phase = phase;
    }

    pub fn set_alloc_mode(&mut self, mode: AllocMode) {
        let (store, instance) = self.instance.parts();
        let global = instance.get_global(&mut *store, "alloc_mode").unwrap();
        global.set(&mut *store, Val::I32(mode as i32)).unwrap();
    }

    pub fn allocations(&mut self) -> i32 {
        let (store, instance) = self.instance.parts();
        let global = instance.get_global(&mut *store, "allocations").unwrap();
        global.get(&mut *store).unwrap_i32()
    }
}
