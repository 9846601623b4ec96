//! Plugin configuration and compilation: [`PluginConfig`] + module bytes → [`Plugin`].
//!
//! A [`Plugin`] is compiled once and shared by every worker (it is `Send +
//! Sync`, cloning is cheap); each worker calls [`Plugin::instantiate`] for its
//! own [`PluginInstance`]. Everything that can be checked without running the
//! guest — ABI marker, memory and allocator exports, import linking — is
//! checked here, so a bad module is rejected at configuration time.

use std::fmt;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use wasmtime::{Engine, ExternType, InstancePre, Module, ValType};

use crate::abi::AbiVersion;
use crate::error::Error;
use crate::instance::PluginInstance;
use crate::link;
use crate::state::HostState;

/// What happens to a request when its plugin fails (Envoy's `failure_policy`).
///
/// The host only reports failures; the embedder applies the policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailurePolicy {
    /// Answer the request with a 503 (Envoy's default).
    #[default]
    FailClosed,
    /// Skip the plugin and let the request through.
    FailOpen,
}

/// How to load and run one plugin (Envoy's `PluginConfig` + `VmConfig`).
#[derive(Clone, Debug, Default)]
pub struct PluginConfig {
    /// Names the plugin in logs and errors; `plugin_name` property.
    pub name: String,
    /// Selects the root context in multi-root modules; `plugin_root_id` property.
    pub root_id: String,
    /// `plugin_vm_id` property.
    pub vm_id: String,
    /// PLUGIN_CONFIGURATION, read by the plugin in `proxy_on_configure`.
    pub configuration: Vec<u8>,
    /// VM_CONFIGURATION, read by the plugin in `proxy_on_vm_start`.
    pub vm_configuration: Vec<u8>,
    /// What WASI `environ_get` shows the plugin (never the host's environment).
    pub environment: Vec<(String, String)>,
    pub failure_policy: FailurePolicy,
}

/// A compiled, linked plugin module plus its configuration.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<Inner>,
}

struct Inner {
    config: PluginConfig,
    abi: AbiVersion,
    module: Module,
    /// Imports resolved and type-checked once; instantiation is then cheap.
    pre: InstancePre<HostState>,
}

impl Plugin {
    /// Compiles `wasm` (binary, or text with the `wat` feature of wasmtime) and
    /// checks that it is a Proxy-Wasm module this host can run.
    pub fn compile(config: PluginConfig, wasm: &[u8]) -> Result<Plugin, Error> {
        let plugin = || config.name.clone();
        let engine = engine().map_err(|reason| Error::Engine {
            plugin: plugin(),
            reason: reason.to_owned(),
        })?;
        let module = Module::new(engine, wasm).map_err(|e| Error::Compile {
            plugin: plugin(),
            reason: format!("{e:#}"),
        })?;

        let function_exports = module
            .exports()
            .filter(|e| matches!(e.ty(), ExternType::Func(_)))
            .map(|e| e.name());
        let abi = AbiVersion::from_function_exports(function_exports)
            .ok_or_else(|| Error::UnknownAbiVersion { plugin: plugin() })?;
        check_required_exports(&module, &config.name)?;
        Self::link(config, module, abi)
    }

    /// The same module under another configuration, without compiling it
    /// again (the way Envoy shares one compiled VM between plugins).
    pub fn with_config(&self, config: PluginConfig) -> Result<Plugin, Error> {
        Self::link(config, self.inner.module.clone(), self.inner.abi)
    }

    fn link(config: PluginConfig, module: Module, abi: AbiVersion) -> Result<Plugin, Error> {
        let link_error = |e: wasmtime::Error| Error::Link {
            plugin: config.name.clone(),
            reason: format!("{e:#}"),
        };
        let linker =
            link::linker(module.engine(), &module, abi, &config.name).map_err(link_error)?;
        let pre = linker.instantiate_pre(&module).map_err(link_error)?;
        tracing::debug!(plugin = %config.name, %abi, "plugin linked");
        Ok(Plugin {
            inner: Arc::new(Inner {
                config,
                abi,
                module,
                pre,
            }),
        })
    }

    pub fn config(&self) -> &PluginConfig {
        &self.inner.config
    }

    pub fn name(&self) -> &str {
        &self.inner.config.name
    }

    pub fn abi_version(&self) -> AbiVersion {
        self.inner.abi
    }

    /// The compiled module (for inspection, e.g. listing its imports).
    pub fn module(&self) -> &Module {
        &self.inner.module
    }

    /// Creates a new VM instance: runs `_initialize` (or `_start`), creates the
    /// root context and calls `proxy_on_vm_start` and `proxy_on_configure`.
    pub fn instantiate(&self) -> Result<PluginInstance, Error> {
        PluginInstance::new(self.clone())
    }

    pub(crate) fn instance_pre(&self) -> &InstancePre<HostState> {
        &self.inner.pre
    }
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.inner.config.name)
            .field("abi", &self.inner.abi)
            .finish_non_exhaustive()
    }
}

/// The guest must export its linear memory and an allocator we can hand data
/// to it with (cpp-host fails the load without one, too).
fn check_required_exports(module: &Module, plugin: &str) -> Result<(), Error> {
    if !matches!(module.get_export("memory"), Some(ExternType::Memory(_))) {
        return Err(Error::MissingExport {
            plugin: plugin.to_owned(),
            export: "memory",
        });
    }
    let mut allocators = ["proxy_on_memory_allocate", "malloc"]
        .into_iter()
        .filter_map(|name| Some((name, module.get_export(name)?)))
        .peekable();
    if allocators.peek().is_none() {
        return Err(Error::MissingExport {
            plugin: plugin.to_owned(),
            export: "proxy_on_memory_allocate or malloc",
        });
    }
    for (name, ty) in allocators {
        let ok = match &ty {
            ExternType::Func(f) => {
                f.params().map(|p| matches!(p, ValType::I32)).eq([true])
                    && f.results().map(|r| matches!(r, ValType::I32)).eq([true])
            }
            _ => false,
        };
        if !ok {
            return Err(Error::ExportType {
                plugin: plugin.to_owned(),
                export: name.to_owned(),
                reason: format!("expected a function (i32) -> i32, found {ty:?}"),
            });
        }
    }
    Ok(())
}

/// The one process-wide engine: compiled code is only valid with the engine
/// (and its settings) that produced it, and sharing it shares the code cache.
fn engine() -> Result<&'static Engine, &'static str> {
    static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let config = wasmtime::Config::new();
            Engine::new(&config).map_err(|e| format!("{e:#}"))
        })
        .as_ref()
        .map_err(String::as_str)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde::de::IntoDeserializer;
    use serde::de::value::{Error as DeError, StrDeserializer};

    use super::FailurePolicy;

    fn parse(name: &str) -> Result<FailurePolicy, DeError> {
        let deserializer: StrDeserializer<'_, DeError> = name.into_deserializer();
        FailurePolicy::deserialize(deserializer)
    }

    #[test]
    fn failure_policy_uses_envoy_names_and_defaults_to_fail_closed() {
        assert_eq!(parse("FAIL_CLOSED").unwrap(), FailurePolicy::FailClosed);
        assert_eq!(parse("FAIL_OPEN").unwrap(), FailurePolicy::FailOpen);
        assert!(parse("FAIL_RELOAD").is_err(), "not supported yet");
        assert!(parse("fail_open").is_err());
        assert_eq!(FailurePolicy::default(), FailurePolicy::FailClosed);
    }
}
