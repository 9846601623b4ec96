//! [`ResourceLimits`]: what one plugin instance may consume.

use std::time::Duration;

/// Per-instance limits, enforced by the host (cpp-host enforces only the
/// memory limit, and only on Wasmtime; a per-callback CPU limit is an open
/// gap in Envoy, envoy#14126).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceLimits {
    /// Linear memory per instance, in bytes: `memory.grow` past it fails
    /// (the guest's allocator then reports out of memory).
    pub max_memory_bytes: usize,
    /// Wall-clock time one callback may run; past it the guest traps with
    /// "deadline exceeded" and the instance fails.
    pub callback_deadline: Duration,
    /// Fuel (roughly, wasm instructions) per callback; `None` = unmetered.
    /// Metered modules are compiled with another engine and run a little slower.
    pub fuel: Option<u64>,
    /// Total bytes (keys + values) of shared data per vm_id; writes past it
    /// return INTERNAL_FAILURE.
    pub shared_data_max_bytes: usize,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        ResourceLimits {
            // Far below cpp-host's 1 GiB: an idle SDK filter needs ~1 MiB.
            max_memory_bytes: 128 << 20,
            callback_deadline: Duration::from_secs(1),
            fuel: None,
            shared_data_max_bytes: 16 << 20,
        }
    }
}
