//! The Wasmtime backend (the default engine): [`HostContext`] over a
//! `Caller`, the hostcall linker macro, and [`WasmtimeVm`], one store plus
//! instance with typed handles to every callback.

use wasmtime::{
    AsContext, AsContextMut, Caller, Instance, Memory, Store, StoreLimits, StoreLimitsBuilder,
    Trap, TypedFunc, WasmParams, WasmResults,
};

use crate::embedder::Embedder;
use crate::engine;
use crate::error::Error;
use crate::guest::{Callback, GuestFailure, HostContext, Vm};
use crate::hostcalls::Restricted;
use crate::limits::ResourceLimits;
use crate::plugin::{Plugin, PluginCounters};
use crate::state::HostState;
use crate::wasi::ProcExit;

/// What a Wasmtime store holds: the engine-independent [`HostState`] plus the
/// handles only this backend needs.
pub(crate) struct WasmtimeState {
    pub host: HostState,
    /// Filled in right after instantiation.
    pub memory: Option<Memory>,
    pub allocator: Option<TypedFunc<i32, i32>>,
    /// Linear memory (and table) limits of this store.
    pub limits: StoreLimits,
}

fn memory_of(store: &impl AsContext<Data = WasmtimeState>) -> &[u8] {
    let store = store.as_context();
    match store.data().memory {
        Some(memory) => memory.data(store),
        None => &[],
    }
}

fn memory_of_mut(store: &mut impl AsContextMut<Data = WasmtimeState>) -> &mut [u8] {
    let store = store.as_context_mut();
    match store.data().memory {
        Some(memory) => memory.data_mut(store),
        None => &mut [],
    }
}

fn call_allocator_of(
    store: &mut impl AsContextMut<Data = WasmtimeState>,
    size: i32,
) -> Option<wasmtime::Result<i32>> {
    let mut store = store.as_context_mut();
    let allocator = store.data().allocator.clone()?;
    Some(allocator.call(&mut store, size))
}

/// Implements the engine seam for a Wasmtime context type.
macro_rules! wasmtime_context {
    ($($ty:ty),*) => {$(
        impl HostContext for $ty {
            type Trap = wasmtime::Error;

            #[inline]
            fn state(&self) -> &HostState {
                &self.data().host
            }
            #[inline]
            fn state_mut(&mut self) -> &mut HostState {
                &mut self.data_mut().host
            }
            #[inline]
            fn memory(&self) -> &[u8] {
                memory_of(self)
            }
            #[inline]
            fn memory_mut(&mut self) -> &mut [u8] {
                memory_of_mut(self)
            }
            #[inline]
            fn memory_and_state_mut(&mut self) -> (&[u8], &mut HostState) {
                match self.data().memory {
                    Some(memory) => {
                        let (memory, data) = memory.data_and_store_mut(self);
                        (memory, &mut data.host)
                    }
                    None => (&[], &mut self.data_mut().host),
                }
            }
            fn call_allocator(&mut self, size: i32) -> Option<wasmtime::Result<i32>> {
                call_allocator_of(self, size)
            }
        }

        impl Restricted for $ty {
            fn host_trap(&mut self, message: String) -> wasmtime::Error {
                wasmtime::Error::msg(message)
            }
            fn exit_trap(&mut self, code: i32) -> wasmtime::Error {
                wasmtime::Error::new(ProcExit(code))
            }
        }
    )*};
}

wasmtime_context!(Caller<'_, WasmtimeState>, Store<WasmtimeState>);

/// Defines one host function in a [`crate::link::Imports`] from the
/// engine-independent tables ([`crate::hostcalls::for_each_hostcall!`],
/// [`crate::wasi::for_each_wasi!`]).
macro_rules! wasmtime_func {
    ($imports:expr, $module:expr, $name:literal, |$g:ident $(, $arg:ident : $ty:ty)*| -> $ret:ty $body:block) => {
        $imports.func(
            $module,
            $name,
            |mut caller: ::wasmtime::Caller<'_, $crate::wasmtime_vm::WasmtimeState>, $($arg: $ty),*|
                -> ::wasmtime::Result<$ret> {
                let $g = &mut caller;
                $body
            },
        )?
    };
}
pub(crate) use wasmtime_func;

/// A callback export, typed by its signature.
#[derive(Clone)]
enum Export {
    P0(TypedFunc<(), ()>),
    P0R(TypedFunc<(), i32>),
    P1(TypedFunc<i32, ()>),
    P1R(TypedFunc<i32, i32>),
    P2(TypedFunc<(i32, i32), ()>),
    P2R(TypedFunc<(i32, i32), i32>),
    P3(TypedFunc<(i32, i32, i32), ()>),
    P3R(TypedFunc<(i32, i32, i32), i32>),
    P5(TypedFunc<(i32, i32, i32, i32, i32), ()>),
}

/// One Wasmtime store and instance of a plugin.
pub(crate) struct WasmtimeVm {
    store: Store<WasmtimeState>,
    /// Only the hostcall tests look exports up after start-up.
    #[cfg(test)]
    instance: Instance,
    exports: [Option<Export>; Callback::ALL.len()],
    limits: ResourceLimits,
}

/// Typed export lookups with errors that name the plugin.
fn typed<P: WasmParams, R: WasmResults>(
    store: &mut Store<WasmtimeState>,
    instance: Instance,
    name: &str,
) -> Result<Option<TypedFunc<P, R>>, Error> {
    let Some(func) = instance.get_func(&mut *store, name) else {
        return Ok(None);
    };
    func.typed(&*store)
        .map(Some)
        .map_err(|e| Error::ExportType {
            plugin: store.data().host.plugin_name().to_owned(),
            export: name.to_owned(),
            reason: format!("{e:#}"),
        })
}

impl WasmtimeVm {
    /// Instantiates `plugin` (linked once, in [`Plugin::compile`]) in a new store.
    pub(crate) fn new(plugin: &Plugin, embedder: Embedder) -> Result<WasmtimeVm, Error> {
        let name = plugin.name().to_owned();
        let pre = plugin.instance_pre();
        let limits = plugin.config().limits.clone();
        // One memory and one instance, as cpp-host's Wasmtime limiter.
        let store_limits = StoreLimitsBuilder::new()
            .memory_size(limits.max_memory_bytes)
            .table_elements(crate::limits::PoolLimits::DEFAULT.table_elements)
            .instances(1)
            .memories(1)
            .tables(4)
            .build();
        let mut store = Store::new(
            pre.module().engine(),
            WasmtimeState {
                host: HostState::new(plugin.clone(), embedder),
                memory: None,
                allocator: None,
                limits: store_limits,
            },
        );
        store.limiter(|state| &mut state.limits);
        store.epoch_deadline_trap();
        arm(&mut store, &limits);
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
        // The spec prefers proxy_on_memory_allocate and calls malloc
        // deprecated; cpp-host tries malloc first. SDK-built modules export
        // only one of them, so the order matters only for hand-written ones.
        let allocator = match typed::<i32, i32>(&mut store, instance, "proxy_on_memory_allocate")? {
            Some(f) => Some(f),
            None => typed::<i32, i32>(&mut store, instance, "malloc")?,
        };
        let abi = plugin.abi_version();
        let mut exports: [Option<Export>; Callback::ALL.len()] = Default::default();
        for callback in Callback::ALL {
            // A 0.1.0 module has no foreign-function callback (cpp-host's getFunctions).
            if callback == Callback::OnForeignFunction && abi < crate::AbiVersion::V0_2_0 {
                continue;
            }
            let name = callback.name();
            let s = &mut store;
            let sig = callback.signature(abi);
            exports[callback as usize] = match (sig.0, sig.1) {
                (0, false) => typed(s, instance, name)?.map(Export::P0),
                (0, true) => typed(s, instance, name)?.map(Export::P0R),
                (1, false) => typed(s, instance, name)?.map(Export::P1),
                (1, true) => typed(s, instance, name)?.map(Export::P1R),
                (2, false) => typed(s, instance, name)?.map(Export::P2),
                (2, true) => typed(s, instance, name)?.map(Export::P2R),
                (3, false) => typed(s, instance, name)?.map(Export::P3),
                (3, true) => typed(s, instance, name)?.map(Export::P3R),
                _ => typed(s, instance, name)?.map(Export::P5),
            };
        }
        let state = store.data_mut();
        state.memory = Some(memory);
        state.allocator = allocator;
        Ok(WasmtimeVm {
            store,
            #[cfg(test)]
            instance,
            exports,
            limits,
        })
    }

    /// The store and instance, for the crate's hostcall tests.
    #[cfg(test)]
    pub(crate) fn parts(&mut self) -> (&mut Store<WasmtimeState>, Instance) {
        (&mut self.store, self.instance)
    }
}

impl Vm for WasmtimeVm {
    #[inline]
    fn state(&self) -> &HostState {
        &self.store.data().host
    }

    #[inline]
    fn state_mut(&mut self) -> &mut HostState {
        &mut self.store.data_mut().host
    }

    fn has(&self, callback: Callback) -> bool {
        self.exports[callback as usize].is_some()
    }

    #[inline]
    fn call(&mut self, callback: Callback, args: &[i32]) -> Result<i32, GuestFailure> {
        let Some(export) = &self.exports[callback as usize] else {
            return Ok(0);
        };
        let a = |i: usize| args.get(i).copied().unwrap_or(0);
        arm(&mut self.store, &self.limits);
        let store = &mut self.store;
        let result = match export {
            Export::P0(f) => f.call(store, ()).map(|()| 0),
            Export::P0R(f) => f.call(store, ()),
            Export::P1(f) => f.call(store, a(0)).map(|()| 0),
            Export::P1R(f) => f.call(store, a(0)),
            Export::P2(f) => f.call(store, (a(0), a(1))).map(|()| 0),
            Export::P2R(f) => f.call(store, (a(0), a(1))),
            Export::P3(f) => f.call(store, (a(0), a(1), a(2))).map(|()| 0),
            Export::P3R(f) => f.call(store, (a(0), a(1), a(2))),
            Export::P5(f) => f.call(store, (a(0), a(1), a(2), a(3), a(4))).map(|()| 0),
        };
        result.map_err(|error| failure(&self.store, callback, &error))
    }

    fn memory_bytes(&self) -> usize {
        self.store
            .data()
            .memory
            .map_or(0, |memory| memory.data_size(&self.store))
    }
}

/// Sets the deadline (and fuel) for the next guest call.
fn arm(store: &mut Store<WasmtimeState>, limits: &ResourceLimits) {
    store.set_epoch_deadline(engine::deadline_ticks(limits.callback_deadline));
    if let Some(fuel) = limits.fuel {
        // Only fails for an engine without fuel, which `fuel` rules out.
        let _ = store.set_fuel(fuel);
    }
}

fn failure(
    store: &Store<WasmtimeState>,
    callback: Callback,
    error: &wasmtime::Error,
) -> GuestFailure {
    if let Some(exit) = error.chain().find_map(|e| e.downcast_ref::<ProcExit>()) {
        return GuestFailure::Exit(exit.0);
    }
    tracing::debug!(
        plugin = %store.data().host.plugin_name(),
        callback = callback.name(),
        "guest trap: {error:?}"
    );
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => GuestFailure::Deadline,
        Some(Trap::OutOfFuel) => GuestFailure::OutOfFuel,
        _ => GuestFailure::Trap(trap_reason(error)),
    }
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
