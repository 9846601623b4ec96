//! A WasmEdge backend, behind the `wasmedge` cargo feature — type-checked
//! only on wisp's build machines.
//!
//! libwasmedge cannot be installed from the registries those machines reach,
//! so CI checks this module with
//! `DOCS_RS=1 cargo check -p wisp-wasm-host --features wasmedge`
//! (wasmedge-sys then uses its pregenerated bindings and links nothing).
//!
//! Scope, honestly: the Wasmtime backend is not behind an engine trait yet,
//! so this backend only does the load-time half of [`crate::Plugin::compile`]
//! on WasmEdge — load and validate the module, detect the ABI marker, check
//! the memory and allocator exports and that every import comes from `env`
//! or WASI — giving the same errors as the Wasmtime path. Running callbacks
//! on WasmEdge needs the hostcalls to be written against an engine trait
//! instead of `wasmtime::Caller`; that is the next step.

use wasmedge_sdk::{ExternalInstanceType, Module};

use crate::abi::AbiVersion;
use crate::error::Error;

/// A module WasmEdge loaded and validated, with what the host needs to know.
#[derive(Debug)]
pub struct WasmEdgeModule {
    pub abi: AbiVersion,
    /// (module, name) of every function import.
    pub imports: Vec<(String, String)>,
    module: Module,
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
        })
    }

    /// The loaded WasmEdge module (for instantiation by the next step).
    pub fn module(&self) -> &Module {
        &self.module
    }
}
