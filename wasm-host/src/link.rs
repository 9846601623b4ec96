//! Builds the [`Linker`] for one plugin module: our `env` hostcalls, WASI under
//! both module names, and "not implemented" stubs for whatever else the module
//! imports from those modules.
//!
//! Stubs keep modules loadable that import functions they may never call
//! (e.g. vNEXT or Envoy-specific names). A stub logs a warning the first
//! time it is called and returns `UNIMPLEMENTED` (12) for `env` or errno
//! `NOTSUP` (58) for WASI. Imports from any other module fail linking.
//!
//! Capability restriction (Envoy's `capability_restriction_config`): with an
//! allow-list, every imported `proxy_*` or WASI function not on it is
//! replaced by a stub that logs "Attempted call to restricted capability",
//! counts the call and returns INTERNAL_FAILURE (10) or errno 76
//! (ENOTCAPABLE), as cpp-host does.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use wasmtime::{Engine, ExternType, IntoFunc, Linker, Module, Val, ValType};

use crate::abi::{AbiVersion, Status};
use crate::plugin::{PluginConfig, PluginCounters};
use crate::wasmtime_vm::{WasmtimeState, wasmtime_func};
use crate::{hostcalls, wasi};

/// A [`Linker`] that remembers which functions it defines, so the leftovers
/// of a module's import list can be stubbed.
pub(crate) struct Imports {
    linker: Linker<WasmtimeState>,
    defined: HashSet<(&'static str, &'static str)>,
}

impl Imports {
    pub(crate) fn func<Params, Results>(
        &mut self,
        module: &'static str,
        name: &'static str,
        func: impl IntoFunc<WasmtimeState, Params, Results>,
    ) -> wasmtime::Result<()> {
        self.linker.func_wrap(module, name, func)?;
        self.defined.insert((module, name));
        Ok(())
    }

    fn is_defined(&self, module: &str, name: &str) -> bool {
        self.defined.contains(&(module, name))
    }
}

/// The linker for `module`, which declared `abi`.
pub(crate) fn linker(
    engine: &Engine,
    module: &Module,
    abi: AbiVersion,
    config: &PluginConfig,
    counters: &Arc<PluginCounters>,
) -> wasmtime::Result<Linker<WasmtimeState>> {
    let plugin = config.name.as_str();
    let mut imports = Imports {
        linker: Linker::new(engine),
        defined: HashSet::new(),
    };
    hostcalls::for_each_hostcall!(wasmtime_func!(imports), abi);
    for wasi_module in wasi::MODULES {
        wasi::for_each_wasi!(wasmtime_func!(imports), wasi_module);
    }

    for import in module.imports() {
        let ExternType::Func(ty) = import.ty() else {
            continue;
        };
        let (module_name, name) = (import.module(), import.name());
        let Some((unimplemented, label)) = stub_answer(module_name) else {
            continue;
        };
        if imports.is_defined(module_name, name) {
            continue;
        }
        tracing::debug!(
            plugin,
            "{module_name}.{name} is not implemented; linking a stub"
        );
        let warned = AtomicBool::new(false);
        let what = format!("{module_name}.{name}");
        let plugin = plugin.to_owned();
        let result_types: Vec<ValType> = ty.results().collect();
        imports
            .linker
            .func_new(module_name, name, ty, move |_caller, _params, results| {
                warn_stub_once(&warned, &plugin, &what, label, unimplemented);
                for (slot, ty) in results.iter_mut().zip(&result_types) {
                    *slot = match ty {
                        ValType::I32 => Val::I32(unimplemented),
                        other => Val::default_for_ty(other).unwrap_or(Val::I32(0)),
                    };
                }
                Ok(())
            })?;
    }
    restrict(&mut imports.linker, module, config, counters)?;
    Ok(imports.linker)
}

/// What a stub for an unimplemented import of `module` returns: the code and
/// its name, or `None` for a module that is neither `env` nor WASI.
pub(crate) fn stub_answer(module: &str) -> Option<(i32, &'static str)> {
    if module == hostcalls::MODULE {
        Some((Status::Unimplemented.code(), "UNIMPLEMENTED"))
    } else if wasi::MODULES.contains(&module) {
        Some((wasi::ERRNO_NOTSUP, "errno NOTSUP"))
    } else {
        None
    }
}

/// Logs the first call of stub `what`.
pub(crate) fn warn_stub_once(
    warned: &AtomicBool,
    plugin: &str,
    what: &str,
    label: &str,
    code: i32,
) {
    if !warned.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            plugin,
            "plugin called {what}, which wisp does not implement yet; returning {label} ({code})"
        );
    }
}

/// If the allow-list forbids import `module.name`: the code the stub
/// returns and whether it is a WASI function.
pub(crate) fn restriction(config: &PluginConfig, module: &str, name: &str) -> Option<(i32, bool)> {
    config.allowed_capabilities.as_ref()?;
    let is_wasi = wasi::MODULES.contains(&module);
    let is_proxy = module == hostcalls::MODULE && name.starts_with("proxy_");
    if !(is_wasi || is_proxy) || config.allows_capability(name) {
        return None;
    }
    let code = if is_wasi {
        ERRNO_NOTCAPABLE
    } else {
        Status::InternalFailure.code()
    };
    Some((code, is_wasi))
}

/// Counts and logs one call of a restricted capability.
pub(crate) fn note_restricted_call(
    counters: &PluginCounters,
    plugin: &str,
    what: &str,
    is_wasi: bool,
    code: i32,
) {
    let counter = if is_wasi {
        &counters.restricted_wasi_calls
    } else {
        &counters.restricted_hostcalls
    };
    PluginCounters::bump(counter);
    tracing::warn!(
        plugin,
        "Attempted call to restricted capability {what}; returning {code}"
    );
}

/// cpp-host's errno for a WASI call outside the allow-list.
pub(crate) const ERRNO_NOTCAPABLE: i32 = 76;

/// Shadows every import outside the capability allow-list with a stub.
fn restrict(
    linker: &mut Linker<WasmtimeState>,
    module: &Module,
    config: &PluginConfig,
    counters: &Arc<PluginCounters>,
) -> wasmtime::Result<()> {
    if config.allowed_capabilities.is_none() {
        return Ok(());
    }
    linker.allow_shadowing(true);
    for import in module.imports() {
        let ExternType::Func(ty) = import.ty() else {
            continue;
        };
        let (module_name, name) = (import.module(), import.name());
        let Some((code, is_wasi)) = restriction(config, module_name, name) else {
            continue;
        };
        let counters = Arc::clone(counters);
        let what = format!("{module_name}.{name}");
        let result_types: Vec<ValType> = ty.results().collect();
        linker.func_new(module_name, name, ty, move |caller, _params, results| {
            let plugin = caller.data().host.plugin_name();
            note_restricted_call(&counters, plugin, &what, is_wasi, code);
            for (slot, ty) in results.iter_mut().zip(&result_types) {
                *slot = match ty {
                    ValType::I32 => Val::I32(code),
                    other => Val::default_for_ty(other).unwrap_or(Val::I32(0)),
                };
            }
            Ok(())
        })?;
    }
    linker.allow_shadowing(false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use wasmtime::Val;

    use crate::abi::Status;
    use crate::test_guest::Guest;

    #[test]
    fn unknown_env_imports_return_unimplemented() {
        let mut guest = Guest::new();
        let status = guest.env("proxy_on_vnext_thing", &[0]);
        assert_eq!(status, Status::Unimplemented as i32);
        // Again: still answered (the warning is only logged once).
        assert_eq!(
            guest.env("proxy_on_vnext_thing", &[0]),
            Status::Unimplemented as i32
        );
        // A stub without results just returns.
        assert_eq!(
            guest
                .try_call("env", "emscripten_notify_memory_growth", &[Val::I32(0)])
                .unwrap(),
            None
        );
    }

    #[test]
    fn unknown_wasi_imports_return_notsup() {
        let mut guest = Guest::new();
        assert_eq!(guest.wasi("fd_close", &[3]), super::wasi::ERRNO_NOTSUP);
    }
}
