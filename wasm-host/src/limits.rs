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

/// The slots of the pooling allocator that per-request instances
/// ([`crate::IsolationMode::PerRequest`]) come from: process-wide, reserved
/// (as address space, not memory) when the first per-request plugin compiles.
///
/// A plugin uses the pool only if its [`ResourceLimits::max_memory_bytes`]
/// fits a memory slot and its module's initial memory and tables fit too;
/// otherwise its per-request instances use on-demand allocation and
/// [`crate::Plugin::pool_refusal`] names the limit that did not fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLimits {
    /// Instances (and memories) alive at once across all pooled plugins;
    /// past it instantiation fails with an error naming this limit.
    pub instances: u32,
    /// The linear memory slot: the default [`ResourceLimits::max_memory_bytes`].
    pub memory_bytes: usize,
    pub tables_per_instance: u32,
    /// Table elements per table, as the on-demand store limits allow.
    pub table_elements: usize,
}

impl PoolLimits {
    /// What the pooling engines are built with.
    pub const DEFAULT: PoolLimits = PoolLimits {
        instances: 1000,
        memory_bytes: 128 << 20,
        tables_per_instance: 4,
        table_elements: 10_000,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_fits_the_default_limits() {
        assert_eq!(
            PoolLimits::DEFAULT.memory_bytes,
            ResourceLimits::default().max_memory_bytes
        );
    }
}
