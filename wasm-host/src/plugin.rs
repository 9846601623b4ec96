//! Plugin configuration and compilation: [`PluginConfig`] + module bytes → [`Plugin`].
//!
//! A [`Plugin`] is compiled once and shared by every worker (it is `Send +
//! Sync`, cloning is cheap); each worker calls [`Plugin::instantiate`] for its
//! own [`PluginInstance`]. Everything that can be checked without running the
//! guest — ABI marker, memory and allocator exports, import linking — is
//! checked here, so a bad module is rejected at configuration time.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasmtime::{ExternType, InstancePre, Module, ValType};

use crate::abi::AbiVersion;
use crate::embedder::Embedder;
use crate::engine::{self, EngineKey};
use crate::error::Error;
use crate::instance::PluginInstance;
use crate::limits::{PoolLimits, ResourceLimits};
use crate::link;
use crate::supervisor::ReloadConfig;
use crate::wasmtime_vm::WasmtimeState;

/// What happens to a request when its plugin fails (Envoy's `failure_policy`).
///
/// The host reports failures; the embedder applies the policy, e.g. with a
/// [`Supervisor`](crate::Supervisor).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailurePolicy {
    /// Answer the request with a 503 (Envoy's default).
    #[default]
    FailClosed,
    /// Skip the plugin and let the request through.
    FailOpen,
    /// Answer with a 503 and re-create the instance, with jittered exponential
    /// backoff and a crash-loop limit ([`ReloadConfig`]). Envoy: FAIL_RELOAD.
    FailReload,
}

impl FailurePolicy {
    /// Whether a failed instance is re-created (FAIL_RELOAD).
    pub fn reloads(self) -> bool {
        self == FailurePolicy::FailReload
    }

    /// Whether requests are answered with a 503 while the plugin is unusable
    /// (everything but FAIL_OPEN).
    pub fn rejects(self) -> bool {
        self != FailurePolicy::FailOpen
    }
}

/// How instances of a plugin are shared (the spec's VM isolation modes).
/// The embedder creates instances accordingly; the host makes each cheap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsolationMode {
    /// One instance per worker thread, shared by every plugin with the same
    /// VM key (Envoy's default; what the agent does today).
    #[default]
    PerWorker,
    /// One instance per worker per plugin (per `PluginConfig`).
    PerPlugin,
    /// One instance per configured use of the plugin (e.g. per listener/route).
    PerUse,
    /// A fresh instance for every request (strongest isolation; instantiation
    /// is cheap thanks to `InstancePre` and the compile cache).
    PerRequest,
}

/// The engine a plugin's instances run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// Wasmtime (Cranelift), the default and the only one built by default.
    #[default]
    Wasmtime,
    /// WasmEdge, with the `wasmedge` cargo feature and libwasmedge installed
    /// (see `wisp_wasm_host::wasmedge`). The module is still compiled and
    /// checked with Wasmtime in [`Plugin::compile`], so load errors are the
    /// same on both engines; instances and callbacks then run on WasmEdge.
    WasmEdge,
}

/// Why a WasmEdge plugin cannot run in a build without the feature.
#[cfg(not(feature = "wasmedge"))]
pub(crate) const WASMEDGE_MISSING: &str =
    "engine = WasmEdge needs wisp-wasm-host built with the `wasmedge` feature (and libwasmedge)";

/// Headers plugins do not see unless [`PluginConfig::allowed_sensitive_headers`]
/// lists them.
pub const SENSITIVE_HEADERS: [&str; 3] = ["authorization", "proxy-authorization", "cookie"];

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
    /// Backoff and crash-loop limit for FAIL_RELOAD (see [`FailurePolicy`]).
    pub reload: ReloadConfig,
    /// Memory, time and fuel limits of each instance, and the shared-data cap.
    pub limits: ResourceLimits,
    /// Envoy's `capability_restriction_config`: when set, only these `env`
    /// and WASI function names work; any other `proxy_*` call returns
    /// INTERNAL_FAILURE and any other WASI call errno 76 (ENOTCAPABLE), both
    /// counted in [`PluginCounters`].
    pub allowed_capabilities: Option<BTreeSet<String>>,
    /// Which of [`SENSITIVE_HEADERS`] this plugin may see and change
    /// (lower-case names). Empty: none.
    pub allowed_sensitive_headers: Vec<String>,
    pub isolation: IsolationMode,
    /// The engine instances run on (default Wasmtime).
    pub engine: EngineKind,
}

impl PluginConfig {
    /// Whether header `name` is hidden from this plugin.
    pub fn is_censored(&self, name: &str) -> bool {
        SENSITIVE_HEADERS
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
            && !self
                .allowed_sensitive_headers
                .iter()
                .any(|h| h.eq_ignore_ascii_case(name))
    }

    /// Whether the capability allow-list lets the plugin call `name`.
    pub fn allows_capability(&self, name: &str) -> bool {
        self.allowed_capabilities
            .as_ref()
            .is_none_or(|allowed| allowed.contains(name))
    }
}

/// Failure and restriction counters of a plugin, shared by all its instances
/// on all workers; the embedder exports them as metrics.
#[derive(Debug, Default)]
pub struct PluginCounters {
    /// Instances created (including reloads and canaries).
    pub instances_created: AtomicU64,
    /// Callbacks that trapped, ran past their deadline or called `proc_exit`.
    pub runtime_failures: AtomicU64,
    /// Of those, deadline (epoch) interruptions.
    pub deadline_exceeded: AtomicU64,
    /// Calls to `env` functions outside the capability allow-list.
    pub restricted_hostcalls: AtomicU64,
    /// Calls to WASI functions outside the capability allow-list.
    pub restricted_wasi_calls: AtomicU64,
    /// FAIL_RELOAD: instances re-created successfully / unsuccessfully.
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    /// FAIL_RELOAD: requests failed because the backoff had not elapsed.
    pub reload_backoffs: AtomicU64,
    /// FAIL_RELOAD: times the crash-loop limit stopped reloading.
    pub crash_loop_stops: AtomicU64,
}

impl PluginCounters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads one counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A compiled, linked plugin module plus its configuration.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<Inner>,
}

struct Inner {
    config: PluginConfig,
    abi: AbiVersion,
    module: Arc<Module>,
    /// Imports resolved and type-checked once; instantiation is then cheap.
    pre: InstancePre<WasmtimeState>,
    counters: Arc<PluginCounters>,
    code_sha256: [u8; 32],
    /// Whether `module` was compiled on a pooling engine.
    pooled: bool,
    /// The module loaded for WasmEdge, when the config chose that engine.
    #[cfg(feature = "wasmedge")]
    wasmedge: Option<Arc<crate::wasmedge::WasmEdgeModule>>,
    /// Why a per-request plugin does not use the pooling allocator.
    pool_refusal: Option<String>,
}

/// Compiled modules by code hash, so plugins sharing code compile once.
/// Weak: a module no plugin uses any more is freed.
///
/// cpp-host keys its base VMs by `vm_key` = (vm_id, VM configuration, code)
/// because its base VM is an *instance*; compiled code depends only on the
/// bytes (and on fuel metering), so the wider key shares more and is still
/// exact. Instance sharing per VM key is the embedder's [`IsolationMode`].
type CompileCache = Mutex<HashMap<CodeKey, Weak<Module>>>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CodeKey {
    code_sha256: [u8; 32],
    /// Fuel metering changes the generated code (another engine).
    fuel: bool,
    /// Pooling allocation is another engine, too.
    pooled: bool,
}

fn compile_cache() -> &'static CompileCache {
    static CACHE: std::sync::OnceLock<CompileCache> = std::sync::OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Plugin {
    /// Compiles `wasm` (binary, or text with the `wat` feature of wasmtime) and
    /// checks that it is a Proxy-Wasm module this host can run.
    ///
    /// Compiled modules are cached by code SHA-256: a second plugin with the
    /// same code (any vm_id or configuration) reuses the compiled code.
    pub fn compile(config: PluginConfig, wasm: &[u8]) -> Result<Plugin, Error> {
        let fuel = config.limits.fuel.is_some();
        let code_sha256: [u8; 32] = Sha256::digest(wasm).into();
        // Per-request instances come from the pooling allocator when the
        // plugin fits it; otherwise from on-demand allocation, saying why.
        let mut pool_refusal = None;
        let mut module = None;
        if config.isolation == IsolationMode::PerRequest {
            match pool_fit(&config.limits) {
                Err(reason) => pool_refusal = Some(reason),
                Ok(()) => match compile_cached(&config.name, wasm, code_sha256, fuel, true) {
                    Ok(pooled) => module = Some(pooled),
                    // The pool refuses modules whose initial memory or tables
                    // exceed its slots; if on-demand compiles it, that was why.
                    Err(error) => pool_refusal = Some(error.to_string()),
                },
            }
        }
        let pooled = module.is_some();
        let module = match module {
            Some(module) => module,
            None => compile_cached(&config.name, wasm, code_sha256, fuel, false)?,
        };
        if let Some(reason) = &pool_refusal {
            tracing::warn!(
                plugin = %config.name,
                "per-request instances use on-demand allocation, not the pool: {reason}"
            );
        }

        let function_exports = module
            .exports()
            .filter(|e| matches!(e.ty(), ExternType::Func(_)))
            .map(|e| e.name());
        let abi = AbiVersion::from_function_exports(function_exports).ok_or_else(|| {
            Error::UnknownAbiVersion {
                plugin: config.name.clone(),
            }
        })?;
        check_required_exports(&module, &config.name)?;
        #[cfg(feature = "wasmedge")]
        let wasmedge = match config.engine {
            EngineKind::WasmEdge => Some(Arc::new(crate::wasmedge::WasmEdgeModule::load(
                &config.name,
                wasm,
            )?)),
            EngineKind::Wasmtime => None,
        };
        #[cfg(not(feature = "wasmedge"))]
        if config.engine == EngineKind::WasmEdge {
            return Err(Error::Engine {
                plugin: config.name.clone(),
                reason: WASMEDGE_MISSING.into(),
            });
        }
        let mut plugin = Self::link(config, module, abi, code_sha256, pooled)?;
        if let Some(inner) = Arc::get_mut(&mut plugin.inner) {
            inner.pool_refusal = pool_refusal;
            #[cfg(feature = "wasmedge")]
            {
                inner.wasmedge = wasmedge;
            }
        }
        Ok(plugin)
    }

    /// Loads the module from `source` (checking its SHA-256 when one is
    /// given, and always for fetched code) and compiles it.
    pub fn from_source(
        config: PluginConfig,
        source: &crate::ModuleSource,
    ) -> Result<Plugin, Error> {
        let wasm = source.load(&config.name)?;
        Self::compile(config, &wasm)
    }

    /// The same module under another configuration, without compiling it
    /// again (the way Envoy shares one compiled VM between plugins). A
    /// configuration that needs other compiled code (fuel on/off) compiles anew.
    pub fn with_config(&self, config: PluginConfig) -> Result<Plugin, Error> {
        let fuel = config.limits.fuel.is_some();
        // The module keeps its allocator: a pooled one must still fit the pool.
        if self.inner.pooled {
            pool_fit(&config.limits).map_err(|reason| Error::Compile {
                plugin: config.name.clone(),
                reason: format!("{reason}; use Plugin::compile to leave the pool"),
            })?;
        }
        let pool_refusal = (config.isolation == IsolationMode::PerRequest && !self.inner.pooled)
            .then(|| {
                "the module was compiled without the pool (Plugin::with_config from a plugin \
                 that is not per_request); use Plugin::compile"
                    .to_owned()
            });
        if config.engine == EngineKind::WasmEdge && !self.has_wasmedge_module() {
            return Err(Error::Compile {
                plugin: config.name.clone(),
                reason:
                    "switching to the WasmEdge engine needs the module bytes: use Plugin::compile"
                        .into(),
            });
        }
        if fuel != self.inner.config.limits.fuel.is_some() {
            // Fuel metering is compiled into the code (another engine).
            return Err(Error::Compile {
                plugin: config.name.clone(),
                reason:
                    "switching fuel metering on or off needs the module bytes: use Plugin::compile"
                        .into(),
            });
        }
        let mut plugin = Self::link(
            config,
            Arc::clone(&self.inner.module),
            self.inner.abi,
            self.inner.code_sha256,
            self.inner.pooled,
        )?;
        if let Some(inner) = Arc::get_mut(&mut plugin.inner) {
            inner.pool_refusal = pool_refusal;
            #[cfg(feature = "wasmedge")]
            {
                inner.wasmedge = self.inner.wasmedge.clone();
            }
        }
        Ok(plugin)
    }

    fn link(
        config: PluginConfig,
        module: Arc<Module>,
        abi: AbiVersion,
        code_sha256: [u8; 32],
        pooled: bool,
    ) -> Result<Plugin, Error> {
        let link_error = |e: wasmtime::Error| Error::Link {
            plugin: config.name.clone(),
            reason: format!("{e:#}"),
        };
        let counters = Arc::<PluginCounters>::default();
        let linker =
            link::linker(module.engine(), &module, abi, &config, &counters).map_err(link_error)?;
        let pre = linker.instantiate_pre(&module).map_err(link_error)?;
        tracing::debug!(plugin = %config.name, %abi, "plugin linked");
        Ok(Plugin {
            inner: Arc::new(Inner {
                config,
                abi,
                module,
                pre,
                counters,
                code_sha256,
                pooled,
                pool_refusal: None,
                #[cfg(feature = "wasmedge")]
                wasmedge: None,
            }),
        })
    }

    /// Validates the configuration by starting a throw-away instance
    /// (`_initialize`, `proxy_on_vm_start`, `proxy_on_configure`), as Envoy's
    /// canary does before it accepts a new plugin configuration. Call it on
    /// the new `Plugin` before swapping it in for the old one.
    pub fn canary(&self) -> Result<(), Error> {
        let instance = self.instantiate()?;
        drop(instance);
        Ok(())
    }

    /// Failure and restriction counters, shared by every instance.
    pub fn counters(&self) -> &PluginCounters {
        &self.inner.counters
    }

    /// Lowercase hex SHA-256 of the module bytes.
    pub fn code_sha256(&self) -> String {
        hex(&self.inner.code_sha256)
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
        PluginInstance::new(self.clone(), Embedder::default())
    }

    /// Like [`Plugin::instantiate`], with the embedder's callouts, metrics
    /// sink, foreign functions and queue waker.
    pub fn instantiate_with(&self, embedder: Embedder) -> Result<PluginInstance, Error> {
        PluginInstance::new(self.clone(), embedder)
    }

    /// Whether instances come from the pooling allocator (per-request
    /// plugins that fit it, see [`PoolLimits`]).
    pub fn uses_pool(&self) -> bool {
        self.inner.pooled
    }

    /// For a per-request plugin that does not use the pool: which limit did
    /// not fit (its instances then use on-demand allocation).
    pub fn pool_refusal(&self) -> Option<&str> {
        self.inner.pool_refusal.as_deref()
    }

    /// The module as loaded for WasmEdge (engine = WasmEdge only).
    #[cfg(feature = "wasmedge")]
    pub(crate) fn wasmedge_module(&self) -> Option<&crate::wasmedge::WasmEdgeModule> {
        self.inner.wasmedge.as_deref()
    }

    fn has_wasmedge_module(&self) -> bool {
        #[cfg(feature = "wasmedge")]
        return self.inner.wasmedge.is_some();
        #[cfg(not(feature = "wasmedge"))]
        return false;
    }

    pub(crate) fn instance_pre(&self) -> &InstancePre<WasmtimeState> {
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

/// Whether `limits` fit a slot of the pooling allocator.
fn pool_fit(limits: &ResourceLimits) -> Result<(), String> {
    let slot = PoolLimits::DEFAULT.memory_bytes;
    if limits.max_memory_bytes > slot {
        return Err(format!(
            "limits.max_memory_bytes ({} bytes) exceeds the pool's memory slot \
             (PoolLimits::memory_bytes, {slot} bytes)",
            limits.max_memory_bytes
        ));
    }
    Ok(())
}

/// Compiles `wasm` on the engine for (`fuel`, `pooled`), or reuses the module
/// a plugin with the same code compiled there.
fn compile_cached(
    plugin: &str,
    wasm: &[u8],
    code_sha256: [u8; 32],
    fuel: bool,
    pooled: bool,
) -> Result<Arc<Module>, Error> {
    let engine = engine::get(EngineKey { fuel, pooled }).map_err(|reason| Error::Engine {
        plugin: plugin.to_owned(),
        reason: reason.to_owned(),
    })?;
    let key = CodeKey {
        code_sha256,
        fuel,
        pooled,
    };
    let cached = compile_cache()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&key)
        .and_then(Weak::upgrade);
    if let Some(module) = cached {
        return Ok(module);
    }
    let module = Arc::new(Module::new(engine, wasm).map_err(|e| Error::Compile {
        plugin: plugin.to_owned(),
        reason: format!("{e:#}"),
    })?);
    let mut cache = compile_cache()
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    cache.retain(|_, weak| weak.strong_count() > 0);
    cache.insert(key, Arc::downgrade(&module));
    Ok(module)
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
        assert_eq!(parse("FAIL_RELOAD").unwrap(), FailurePolicy::FailReload);
        assert!(parse("fail_open").is_err());
        assert_eq!(FailurePolicy::default(), FailurePolicy::FailClosed);
    }

    #[test]
    fn censoring_and_capabilities() {
        let mut config = super::PluginConfig::default();
        assert!(config.is_censored("Authorization"));
        assert!(config.is_censored("cookie"));
        assert!(!config.is_censored("x-user"));
        config.allowed_sensitive_headers = vec!["cookie".into()];
        assert!(!config.is_censored("Cookie"));
        assert!(config.is_censored("authorization"));

        assert!(config.allows_capability("proxy_http_call"));
        config.allowed_capabilities = Some(["proxy_log".to_owned()].into());
        assert!(config.allows_capability("proxy_log"));
        assert!(!config.allows_capability("proxy_http_call"));
    }

    #[test]
    fn sha256_is_lowercase_hex() {
        assert_eq!(
            super::sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
