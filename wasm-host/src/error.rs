//! The crate's error type.

/// Everything that can go wrong loading or running a plugin.
///
/// Every message starts with the plugin's name. Hostcall-level problems (a bad
/// pointer, an unknown map type) are not errors here: the guest gets a
/// Proxy-Wasm status code for those, as in cpp-host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The process-wide Wasmtime engine could not be created.
    #[error("plugin {plugin}: cannot create the wasm engine: {reason}")]
    Engine { plugin: String, reason: String },

    /// The module could not be loaded from its [`ModuleSource`](crate::ModuleSource)
    /// (unreadable file, SHA-256 mismatch).
    #[error("plugin {plugin}: cannot load the module: {reason}")]
    Source { plugin: String, reason: String },

    /// The bytes are not a valid WebAssembly module (binary or text).
    #[error("plugin {plugin}: invalid wasm module: {reason}")]
    Compile { plugin: String, reason: String },

    /// No `proxy_abi_version_*` marker export (cpp-host: "Missing or unknown
    /// Proxy-Wasm ABI version").
    #[error(
        "plugin {plugin}: missing or unknown Proxy-Wasm ABI version: the module exports none of \
         proxy_abi_version_0_1_0, proxy_abi_version_0_2_0, proxy_abi_version_0_2_1"
    )]
    UnknownAbiVersion { plugin: String },

    /// A required export (memory, allocator) is missing.
    #[error("plugin {plugin}: the module does not export {export}")]
    MissingExport {
        plugin: String,
        export: &'static str,
    },

    /// An export the host calls has the wrong type.
    #[error("plugin {plugin}: export {export} has the wrong type: {reason}")]
    ExportType {
        plugin: String,
        export: String,
        reason: String,
    },

    /// The module's imports cannot be satisfied (wrong signature of a known
    /// hostcall, an import from an unknown module, a non-function import).
    #[error("plugin {plugin}: cannot link the module: {reason}")]
    Link { plugin: String, reason: String },

    /// Creating the instance failed (e.g. its start function trapped).
    #[error("plugin {plugin}: cannot instantiate the module: {reason}")]
    Instantiate { plugin: String, reason: String },

    /// The guest trapped (panic, `unreachable`, out-of-bounds access, or a
    /// hostcall that had to abort it) while running `callback`.
    #[error("plugin {plugin}: {callback} trapped: {reason}")]
    Trap {
        plugin: String,
        callback: &'static str,
        reason: String,
    },

    /// The guest called WASI `proc_exit` while running `callback`.
    #[error("plugin {plugin}: {callback} called proc_exit({code})")]
    Exit {
        plugin: String,
        callback: &'static str,
        code: i32,
    },

    /// `proxy_on_vm_start` returned false.
    #[error("plugin {plugin}: proxy_on_vm_start returned false (VM start failed)")]
    VmStartFailed { plugin: String },

    /// `proxy_on_configure` returned false: the plugin rejected its configuration.
    #[error("plugin {plugin}: proxy_on_configure returned false (plugin configuration rejected)")]
    ConfigureFailed { plugin: String },

    /// The embedder used a context id (or callout token) this instance does
    /// not know for that kind of call.
    #[error("plugin {plugin}: no such context or callout: {context_id}")]
    UnknownContext { plugin: String, context_id: u32 },

    /// The instance failed earlier (trap or `proc_exit`) and cannot be used
    /// again; the embedder should create a new one.
    #[error("plugin {plugin}: the instance failed earlier and must be replaced ({reason})")]
    InstanceFailed { plugin: String, reason: String },
}

impl Error {
    /// The name of the plugin the error is about.
    pub fn plugin(&self) -> &str {
        match self {
            Error::Engine { plugin, .. }
            | Error::Source { plugin, .. }
            | Error::Compile { plugin, .. }
            | Error::UnknownAbiVersion { plugin }
            | Error::MissingExport { plugin, .. }
            | Error::ExportType { plugin, .. }
            | Error::Link { plugin, .. }
            | Error::Instantiate { plugin, .. }
            | Error::Trap { plugin, .. }
            | Error::Exit { plugin, .. }
            | Error::VmStartFailed { plugin }
            | Error::ConfigureFailed { plugin }
            | Error::UnknownContext { plugin, .. }
            | Error::InstanceFailed { plugin, .. } => plugin,
        }
    }

    /// Whether the instance is unusable after this error (Envoy's
    /// `FailState::RuntimeError`): the embedder should drop it and apply the
    /// plugin's failure policy.
    pub fn is_runtime_failure(&self) -> bool {
        matches!(
            self,
            Error::Trap { .. } | Error::Exit { .. } | Error::InstanceFailed { .. }
        )
    }
}
