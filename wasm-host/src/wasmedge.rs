//! The WasmEdge backend, behind the `wasmedge` cargo feature: select it
//! with [`crate::PluginConfig::engine`] = [`crate::EngineKind::WasmEdge`].
//!
//! **Type-checked only on wisp's build machines.** libwasmedge cannot be
//! installed from the registries they reach, so CI checks this module with
//! `DOCS_RS=1 cargo check -p wisp-wasm-host --features wasmedge`
//! (wasmedge-sys then uses its pregenerated bindings and links nothing).
//! Where `WASMEDGE_DIR` points at an installed WasmEdge 0.14, the feature
//! build links it and the conformance suite (`tests/conformance.rs`) runs on
//! both engines; that has not been done here.
//!
//! What runs on WasmEdge is the same host as on Wasmtime: every hostcall and
//! WASI function comes from the engine-independent tables
//! ([`crate::hostcalls::for_each_hostcall!`], [`crate::wasi::for_each_wasi!`])
//! through [`HostContext`], and [`crate::PluginInstance`] drives a
//! [`WasmEdgeVm`] through [`Vm`] exactly as it drives Wasmtime. The module is
//! compiled and checked with Wasmtime too ([`crate::Plugin::compile`]), so
//! load errors are identical; [`WasmEdgeModule`] loads it a second time here.
//!
//! Per instance: one executor (its config caps linear memory at
//! [`crate::ResourceLimits::max_memory_bytes`]), one store, the `env` and
//! both WASI import modules with host functions bound to this instance's
//! state, then the plugin's module instance. Unknown imports get the same
//! stubs, and the capability allow-list the same restriction stubs, as on
//! Wasmtime ([`crate::link`]).
//!
//! Not yet on WasmEdge: the per-callback wall-clock deadline (wasmedge-sys
//! offers a timeout only through a signal and `siglongjmp`, which would
//! unwind through Rust hostcall frames; the async executor's cancellation is
//! the way, not done) and fuel (an instance with `limits.fuel` is refused
//! with an error saying so). The limits tests stay Wasmtime-only for that.

use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use wasmedge_sdk::error::{CoreCommonError, CoreError, WasmEdgeError};
use wasmedge_sdk::{ExternalInstanceType, FuncType, Module, ValType, WasmValue};
use wasmedge_sys::instance::function::AsFunc;
use wasmedge_sys::{
    AsInstance, CallingFrame, Config, Executor, Function, ImportModule, Instance, Loader, Store,
    Validator, ffi,
};

use crate::abi::AbiVersion;
use crate::embedder::Embedder;
use crate::error::Error;
use crate::guest::{Callback, GuestFailure, HostContext, Vm};
use crate::hostcalls::{self, Restricted};
use crate::link;
use crate::plugin::{Plugin, PluginCounters};
use crate::state::HostState;
use crate::wasi;

/// A module WasmEdge loaded and validated, with what the host needs to know.
#[derive(Debug)]
pub struct WasmEdgeModule {
    pub abi: AbiVersion,
    /// (module, name) of every function import.
    pub imports: Vec<(String, String)>,
    module: Module,
    /// The same module at the sys level, which instances are made from.
    runnable: Arc<wasmedge_sys::Module>,
}

impl WasmEdgeModule {
    /// Loads `wasm` (binary) with WasmEdge and checks it like [`crate::Plugin::compile`].
    pub fn load(plugin: &str, wasm: &[u8]) -> Result<Self, Error> {
        let module = Module::from_bytes(None, wasm).map_err(|e| Error::Compile {
            plugin: plugin.to_owned(),
            reason: format!("wasmedge: {e}"),
        })?;
        let mut functions = Vec::new();
        let mut has_memory = false;
        for export in module.exports() {
            match export.ty() {
                Ok(ExternalInstanceType::Func(_)) => functions.push(export.name().into_owned()),
                Ok(ExternalInstanceType::Memory(_)) if export.name() == "memory" => {
                    has_memory = true
                }
                _ => {}
            }
        }
        let abi = AbiVersion::from_function_exports(functions.iter().map(String::as_str))
            .ok_or_else(|| Error::UnknownAbiVersion {
                plugin: plugin.to_owned(),
            })?;
        if !has_memory {
            return Err(Error::MissingExport {
                plugin: plugin.to_owned(),
                export: "memory",
            });
        }
        if !functions
            .iter()
            .any(|f| f == "proxy_on_memory_allocate" || f == "malloc")
        {
            return Err(Error::MissingExport {
                plugin: plugin.to_owned(),
                export: "proxy_on_memory_allocate or malloc",
            });
        }
        let compile_error = |e: Box<WasmEdgeError>| Error::Compile {
            plugin: plugin.to_owned(),
            reason: format!("wasmedge: {e}"),
        };
        let runnable = Loader::create(None)
            .and_then(|loader| loader.from_bytes(wasm))
            .map_err(compile_error)?;
        Validator::create(None)
            .and_then(|validator| validator.validate(&runnable))
            .map_err(compile_error)?;
        let mut imports = Vec::new();
        for import in module.imports() {
            let (from, name) = (
                import.module_name().into_owned(),
                import.name().into_owned(),
            );
            if !matches!(
                from.as_str(),
                "env" | "wasi_snapshot_preview1" | "wasi_unstable"
            ) {
                return Err(Error::Link {
                    plugin: plugin.to_owned(),
                    reason: format!("unknown import module {from:?} (function {name:?})"),
                });
            }
            if let Ok(ExternalInstanceType::Func(_)) = import.ty() {
                imports.push((from, name));
            }
        }
        Ok(WasmEdgeModule {
            abi,
            imports,
            module,
            runnable,
        })
    }

    /// The loaded WasmEdge module.
    pub fn module(&self) -> &Module {
        &self.module
    }
}

/// Bytes per wasm page.
const PAGE: usize = 65536;

/// What every host function of one instance reaches through its data pointer.
pub(crate) struct EdgeState {
    host: HostState,
    /// The instance's executor (owned by its [`WasmEdgeVm`]), to call the
    /// guest allocator from inside a hostcall.
    executor: *mut Executor,
    allocator: Option<*mut ffi::WasmEdge_FunctionInstanceContext>,
    /// Why a host function unwound the guest, for the VM to report: WasmEdge
    /// host functions can only return an error code.
    trap: Option<EdgeTrap>,
}

/// How a hostcall unwinds the guest on WasmEdge.
#[derive(Debug)]
pub(crate) enum EdgeTrap {
    /// WASI `proc_exit(code)`.
    Exit(i32),
    /// A host error, e.g. a hostcall forbidden in the allocator.
    Host(String),
    /// The guest allocator trapped.
    Guest(String),
}

/// A hostcall parameter type.
pub(crate) trait EdgeParam: Sized {
    const TYPE: ValType;
    fn from_value(value: Option<&WasmValue>) -> Self;
}

impl EdgeParam for i32 {
    const TYPE: ValType = ValType::I32;
    fn from_value(value: Option<&WasmValue>) -> Self {
        value.map_or(0, WasmValue::to_i32)
    }
}

impl EdgeParam for i64 {
    const TYPE: ValType = ValType::I64;
    fn from_value(value: Option<&WasmValue>) -> Self {
        value.map_or(0, WasmValue::to_i64)
    }
}

/// A hostcall result type.
pub(crate) trait EdgeResult {
    const TYPES: &'static [ValType];
    fn into_values(self) -> Vec<WasmValue>;
}

impl EdgeResult for i32 {
    const TYPES: &'static [ValType] = &[ValType::I32];
    fn into_values(self) -> Vec<WasmValue> {
        vec![WasmValue::from_i32(self)]
    }
}

impl EdgeResult for () {
    const TYPES: &'static [ValType] = &[];
    fn into_values(self) -> Vec<WasmValue> {
        Vec::new()
    }
}

/// [`HostContext`] inside a WasmEdge host function.
pub(crate) struct EdgeCtx<'a> {
    /// Raw, not `&mut`: the guest allocator may re-enter another hostcall
    /// of this instance, which reaches the same state through its own pointer.
    state: *mut EdgeState,
    frame: &'a mut CallingFrame,
}

impl<'a> EdgeCtx<'a> {
    pub(crate) fn new(state: &mut EdgeState, frame: &'a mut CallingFrame) -> Self {
        EdgeCtx {
            state: state as *mut EdgeState,
            frame,
        }
    }

    /// A host function's answer to WasmEdge; a trap is recorded for the VM
    /// (the first one wins: an inner hostcall's reason is the real one).
    pub(crate) fn finish<R: EdgeResult>(
        self,
        result: Result<R, EdgeTrap>,
    ) -> Result<Vec<WasmValue>, CoreError> {
        match result {
            Ok(values) => Ok(values.into_values()),
            Err(trap) => {
                let exit = matches!(trap, EdgeTrap::Exit(_));
                // SAFETY: the VM keeps the state alive while the guest runs,
                // and no other reference to it is live during this call.
                unsafe { (*self.state).trap.get_or_insert(trap) };
                Err(CoreError::Common(if exit {
                    CoreCommonError::Terminated
                } else {
                    CoreCommonError::RuntimeError
                }))
            }
        }
    }
}

impl HostContext for EdgeCtx<'_> {
    type Trap = EdgeTrap;

    fn state(&self) -> &HostState {
        // SAFETY: see `finish`; the borrow is tied to `self`.
        unsafe { &(*self.state).host }
    }

    fn state_mut(&mut self) -> &mut HostState {
        // SAFETY: see `finish`.
        unsafe { &mut (*self.state).host }
    }

    fn memory(&self) -> &[u8] {
        let Some(memory) = self.frame.memory_ref(0) else {
            return &[];
        };
        let len = memory.size() as usize * PAGE;
        if len == 0 {
            return &[];
        }
        // SAFETY: the guest is suspended in this hostcall, so its memory
        // neither moves nor grows while `self` is borrowed (growing needs a
        // guest call, which needs `&mut self`).
        match unsafe { memory.data_pointer(0, 1) } {
            Ok(base) => unsafe { std::slice::from_raw_parts(base, len) },
            Err(_) => &[],
        }
    }

    fn memory_mut(&mut self) -> &mut [u8] {
        let Some(mut memory) = self.frame.memory_mut(0) else {
            return &mut [];
        };
        let len = memory.size() as usize * PAGE;
        if len == 0 {
            return &mut [];
        }
        // SAFETY: as in `memory`, and `&mut self` makes the slice unique.
        match unsafe { memory.data_pointer_mut(0, 1) } {
            Ok(base) => unsafe { std::slice::from_raw_parts_mut(base, len) },
            Err(_) => &mut [],
        }
    }

    fn memory_and_state_mut(&mut self) -> (&[u8], &mut HostState) {
        // SAFETY: see `finish`; the state lives outside the guest's memory,
        // so the two borrows never alias.
        let state = unsafe { &mut (*self.state).host };
        (self.memory(), state)
    }

    fn call_allocator(&mut self, size: i32) -> Option<Result<i32, EdgeTrap>> {
        // SAFETY: see `finish`; the executor outlives the instance.
        let (executor, allocator) = unsafe { ((*self.state).executor, (*self.state).allocator?) };
        // SAFETY: the function belongs to the live instance; ManuallyDrop
        // because the instance owns it.
        let mut func = ManuallyDrop::new(unsafe { Function::from_raw(allocator) });
        // WasmEdge invokes re-entrantly (a new stack per invoke).
        let result = unsafe { (*executor).call_func(&mut func, [WasmValue::from_i32(size)]) };
        // A trap recorded meanwhile (proc_exit, a forbidden hostcall) ends
        // the outer call too, whatever the invoke returned.
        if unsafe { (*self.state).trap.is_some() } {
            return Some(Err(EdgeTrap::Host("the guest allocator failed".into())));
        }
        Some(match result {
            Ok(values) => Ok(values.first().map_or(0, WasmValue::to_i32)),
            Err(error) => Err(EdgeTrap::Guest(format!("guest allocator: {error}"))),
        })
    }
}

impl Restricted for EdgeCtx<'_> {
    fn host_trap(&mut self, message: String) -> EdgeTrap {
        EdgeTrap::Host(message)
    }

    fn exit_trap(&mut self, code: i32) -> EdgeTrap {
        EdgeTrap::Exit(code)
    }
}

/// Defines one host function in an [`EdgeImports`] from the engine-independent
/// tables, as `crate::wasmtime_vm::wasmtime_func!` does for Wasmtime.
macro_rules! wasmedge_func {
    ($imports:expr, $module:expr, $name:literal, |$g:ident $(, $arg:ident : $ty:ty)*| -> $ret:ty $body:block) => {{
        fn host(
            data: &mut $crate::wasmedge::EdgeState,
            _instance: &mut ::wasmedge_sys::Instance,
            frame: &mut ::wasmedge_sys::CallingFrame,
            args: Vec<::wasmedge_sdk::WasmValue>,
        ) -> Result<Vec<::wasmedge_sdk::WasmValue>, ::wasmedge_sdk::error::CoreError> {
            let mut _args = args.iter();
            $(let $arg = <$ty as $crate::wasmedge::EdgeParam>::from_value(_args.next());)*
            let mut ctx = $crate::wasmedge::EdgeCtx::new(data, frame);
            // The closure gives `?` in the body a function to return from.
            #[allow(clippy::redundant_closure_call)]
            let result = {
                let $g = &mut ctx;
                (move || -> Result<$ret, $crate::wasmedge::EdgeTrap> { $body })()
            };
            ctx.finish(result)
        }
        $imports.func(
            $module,
            $name,
            &[$(<$ty as $crate::wasmedge::EdgeParam>::TYPE),*],
            <$ret as $crate::wasmedge::EdgeResult>::TYPES,
            host,
        )?;
    }};
}

/// A stub's own data: what it answers and how it reports calls.
struct StubData {
    plugin: Plugin,
    what: String,
    label: &'static str,
    code: i32,
    returns: Vec<ValType>,
    warned: AtomicBool,
    /// `Some(is_wasi)` for a capability the allow-list forbids.
    restricted: Option<bool>,
}

fn stub(
    data: &mut StubData,
    _instance: &mut Instance,
    _frame: &mut CallingFrame,
    _args: Vec<WasmValue>,
) -> Result<Vec<WasmValue>, CoreError> {
    let plugin = data.plugin.name();
    match data.restricted {
        Some(is_wasi) => link::note_restricted_call(
            data.plugin.counters(),
            plugin,
            &data.what,
            is_wasi,
            data.code,
        ),
        None => link::warn_stub_once(&data.warned, plugin, &data.what, data.label, data.code),
    }
    Ok(data
        .returns
        .iter()
        .map(|ty| match ty {
            ValType::I64 => WasmValue::from_i64(0),
            _ => WasmValue::from_i32(data.code),
        })
        .collect())
}

/// The import modules of one instance while they are built.
pub(crate) struct EdgeImports {
    state: *mut EdgeState,
    modules: Vec<(&'static str, ImportModule<()>)>,
    defined: std::collections::HashSet<(&'static str, &'static str)>,
    /// Imports the allow-list forbids: not defined, stubbed instead.
    restricted: std::collections::HashSet<(String, String)>,
    #[expect(
        clippy::vec_box,
        reason = "stable addresses: each stub function points at its entry"
    )]
    stubs: Vec<Box<StubData>>,
}

impl EdgeImports {
    fn module(&mut self, name: &'static str) -> Result<&mut ImportModule<()>, Box<WasmEdgeError>> {
        let index = match self.modules.iter().position(|(n, _)| *n == name) {
            Some(index) => index,
            None => {
                self.modules
                    .push((name, ImportModule::create(name, Box::new(()))?));
                self.modules.len() - 1
            }
        };
        Ok(&mut self.modules[index].1)
    }

    pub(crate) fn func(
        &mut self,
        module: &'static str,
        name: &'static str,
        params: &[ValType],
        results: &[ValType],
        host: wasmedge_sys::SyncFn<EdgeState>,
    ) -> Result<(), Box<WasmEdgeError>> {
        if self
            .restricted
            .contains(&(module.to_owned(), name.to_owned()))
        {
            return Ok(());
        }
        let ty = FuncType::new(params.to_vec(), results.to_vec());
        // SAFETY: the state outlives every function of the instance (the VM
        // drops it last).
        let func = unsafe { Function::create_sync_func(&ty, host, self.state, 0) }?;
        self.module(module)?.add_func(name, func);
        self.defined.insert((module, name));
        Ok(())
    }

    /// Stubs for the module's `env`/WASI imports nobody defined (or that
    /// the allow-list forbids), as [`crate::link`] does on Wasmtime.
    fn stub_leftovers(
        &mut self,
        plugin: &Plugin,
        module: &wasmedge_sys::Module,
    ) -> Result<(), Box<WasmEdgeError>> {
        for import in module.imports() {
            let Ok(ExternalInstanceType::Func(ty)) = import.ty() else {
                continue;
            };
            let (from, name) = (
                import.module_name().into_owned(),
                import.name().into_owned(),
            );
            let Some(module_name) = [hostcalls::MODULE, wasi::MODULES[0], wasi::MODULES[1]]
                .into_iter()
                .find(|m| *m == from)
            else {
                continue;
            };
            let restriction = link::restriction(plugin.config(), &from, &name);
            if restriction.is_none() && self.defined.iter().any(|&(m, n)| m == from && n == name) {
                continue;
            }
            let Some((unimplemented, label)) = link::stub_answer(&from) else {
                continue;
            };
            if let Some(bad) = ty
                .returns()
                .iter()
                .find(|t| !matches!(t, ValType::I32 | ValType::I64))
            {
                return Err(Box::new(WasmEdgeError::Operation(format!(
                    "cannot stub {from}.{name}: result type {bad:?}"
                ))));
            }
            let mut data = Box::new(StubData {
                plugin: plugin.clone(),
                what: format!("{from}.{name}"),
                label,
                code: restriction.map_or(unimplemented, |(code, _)| code),
                returns: ty.returns().to_vec(),
                warned: AtomicBool::new(false),
                restricted: restriction.map(|(_, is_wasi)| is_wasi),
            });
            // SAFETY: the box lives in the VM as long as the function.
            let func =
                unsafe { Function::create_sync_func(&ty, stub, &mut *data as *mut StubData, 0) }?;
            self.module(module_name)?.add_func(&name, func);
            self.stubs.push(data);
        }
        Ok(())
    }
}

/// A callback export: the function and its signature.
struct Export {
    func: *mut ffi::WasmEdge_FunctionInstanceContext,
    params: usize,
    returns: bool,
}

/// Owns the [`EdgeState`]; declared last in [`WasmEdgeVm`] so it is freed
/// after every function that points at it.
struct StateBox(*mut EdgeState);

impl Drop for StateBox {
    fn drop(&mut self) {
        // SAFETY: made by Box::into_raw in WasmEdgeVm::new, freed once.
        drop(unsafe { Box::from_raw(self.0) });
    }
}

/// One WasmEdge executor, store and module instance of a plugin.
pub(crate) struct WasmEdgeVm {
    // Field order is drop order: the instance before the modules it links
    // to, the executor and stub data after them, the state last.
    instance: Instance,
    _store: Store,
    _imports: Vec<(&'static str, ImportModule<()>)>,
    executor: Box<Executor>,
    #[expect(
        clippy::vec_box,
        reason = "stable addresses: each stub function points at its entry"
    )]
    _stubs: Vec<Box<StubData>>,
    exports: [Option<Export>; Callback::ALL.len()],
    state: StateBox,
}

// SAFETY: every handle is owned by this VM and used only through `&mut self`
// (or `&self` for reads) on one thread at a time; WasmEdge contexts are not
// tied to the thread that made them.
unsafe impl Send for WasmEdgeVm {}

/// Whether `ty` is `(i32 × params) -> (i32 if returns)`.
fn has_signature(ty: &FuncType, params: usize, returns: bool) -> bool {
    ty.args().len() == params
        && ty.args().iter().all(|t| matches!(t, ValType::I32))
        && ty.returns() == if returns { &[ValType::I32][..] } else { &[] }
}

impl WasmEdgeVm {
    pub(crate) fn new(plugin: &Plugin, embedder: Embedder) -> Result<WasmEdgeVm, Error> {
        let name = plugin.name().to_owned();
        let edge = plugin.wasmedge_module().ok_or_else(|| Error::Engine {
            plugin: name.clone(),
            reason: "the module was not loaded for WasmEdge (PluginConfig::engine)".into(),
        })?;
        let limits = &plugin.config().limits;
        if limits.fuel.is_some() {
            return Err(Error::Engine {
                plugin: name,
                reason: "limits.fuel: fuel metering is not implemented on the WasmEdge backend"
                    .into(),
            });
        }
        let fail = |e: Box<WasmEdgeError>| Error::Instantiate {
            plugin: name.clone(),
            reason: format!("wasmedge: {e}"),
        };
        let mut config = Config::create().map_err(fail)?;
        config.set_max_memory_pages(
            u32::try_from(limits.max_memory_bytes / PAGE).unwrap_or(u32::MAX),
        );
        let mut executor = Box::new(Executor::create(Some(&config), None).map_err(fail)?);
        let state = StateBox(Box::into_raw(Box::new(EdgeState {
            host: HostState::new(plugin.clone(), embedder),
            executor: &mut *executor,
            allocator: None,
            trap: None,
        })));
        PluginCounters::bump(&plugin.counters().instances_created);

        let mut imports = EdgeImports {
            state: state.0,
            modules: Vec::new(),
            defined: Default::default(),
            restricted: Default::default(),
            stubs: Vec::new(),
        };
        for import in edge.runnable.imports() {
            let (from, import_name) = (import.module_name(), import.name());
            if link::restriction(plugin.config(), &from, &import_name).is_some() {
                imports
                    .restricted
                    .insert((from.into_owned(), import_name.into_owned()));
            }
        }
        let link = |imports: &mut EdgeImports| -> Result<(), Box<WasmEdgeError>> {
            hostcalls::for_each_hostcall!(wasmedge_func!(imports), plugin.abi_version());
            for module in wasi::MODULES {
                wasi::for_each_wasi!(wasmedge_func!(imports), module);
            }
            imports.stub_leftovers(plugin, &edge.runnable)
        };
        link(&mut imports).map_err(|e| Error::Link {
            plugin: name.clone(),
            reason: format!("wasmedge: {e}"),
        })?;

        let mut store = Store::create().map_err(fail)?;
        for (_, module) in &imports.modules {
            executor
                .register_import_module(&mut store, module)
                .map_err(fail)?;
        }
        let instance = executor
            .register_active_module(&mut store, &edge.runnable)
            .map_err(fail)?;
        if instance.get_memory_ref("memory").is_err() {
            return Err(Error::MissingExport {
                plugin: name,
                export: "memory",
            });
        }
        let lookup =
            |export: &str, params: usize, returns: bool| -> Result<Option<Export>, Error> {
                let Ok(func) = instance.get_func(export) else {
                    return Ok(None);
                };
                let ty = AsFunc::ty(&*func);
                match ty {
                    Some(ty) if has_signature(&ty, params, returns) => Ok(Some(Export {
                        // SAFETY: the pointer stays valid while `instance` lives.
                        func: unsafe { func.as_ptr() },
                        params,
                        returns,
                    })),
                    other => Err(Error::ExportType {
                        plugin: name.clone(),
                        export: export.to_owned(),
                        reason: format!(
                            "expected {params} i32 parameter(s){}, found {other:?}",
                            if returns { " and an i32 result" } else { "" }
                        ),
                    }),
                }
            };
        let allocator = match lookup("proxy_on_memory_allocate", 1, true)? {
            Some(f) => Some(f),
            None => lookup("malloc", 1, true)?,
        };
        let abi = plugin.abi_version();
        let mut exports: [Option<Export>; Callback::ALL.len()] = Default::default();
        for callback in Callback::ALL {
            // A 0.1.0 module has no foreign-function callback (cpp-host's getFunctions).
            if callback == Callback::OnForeignFunction && abi < AbiVersion::V0_2_0 {
                continue;
            }
            let sig = callback.signature(abi);
            exports[callback as usize] = lookup(callback.name(), sig.0, sig.1)?;
        }
        // SAFETY: no host function runs yet; nothing else references the state.
        unsafe { (*state.0).allocator = allocator.map(|a| a.func) };
        Ok(WasmEdgeVm {
            instance,
            _store: store,
            _imports: imports.modules,
            executor,
            _stubs: imports.stubs,
            exports,
            state,
        })
    }
}

impl Vm for WasmEdgeVm {
    fn state(&self) -> &HostState {
        // SAFETY: no host function runs while the VM is borrowed.
        unsafe { &(*self.state.0).host }
    }

    fn state_mut(&mut self) -> &mut HostState {
        // SAFETY: as in `state`.
        unsafe { &mut (*self.state.0).host }
    }

    fn has(&self, callback: Callback) -> bool {
        self.exports[callback as usize].is_some()
    }

    fn call(&mut self, callback: Callback, args: &[i32]) -> Result<i32, GuestFailure> {
        let Some(export) = &self.exports[callback as usize] else {
            return Ok(0);
        };
        let params =
            (0..export.params).map(|i| WasmValue::from_i32(args.get(i).copied().unwrap_or(0)));
        // SAFETY: the function belongs to `self.instance`, which owns it.
        let mut func = ManuallyDrop::new(unsafe { Function::from_raw(export.func) });
        let result = self.executor.call_func(&mut func, params);
        // SAFETY: the guest returned; no host function runs.
        let trap = unsafe { (*self.state.0).trap.take() };
        match (trap, result) {
            (Some(EdgeTrap::Exit(code)), _) => Err(GuestFailure::Exit(code)),
            (Some(EdgeTrap::Host(reason) | EdgeTrap::Guest(reason)), _) => {
                Err(GuestFailure::Trap(reason))
            }
            (None, Ok(values)) if export.returns => Ok(values.first().map_or(0, WasmValue::to_i32)),
            (None, Ok(_)) => Ok(0),
            (None, Err(error)) => {
                tracing::debug!(
                    plugin = %self.state().plugin_name(),
                    callback = callback.name(),
                    "guest trap: {error:?}"
                );
                Err(GuestFailure::Trap(format!("wasmedge: {error}")))
            }
        }
    }

    fn memory_bytes(&self) -> usize {
        self.instance
            .get_memory_ref("memory")
            .map_or(0, |memory| memory.size() as usize * PAGE)
    }
}
