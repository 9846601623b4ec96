//! `proxy_log`, `proxy_get_log_level`.
//!
//! Plugin logs go to `tracing` at target `"wasm"` with the plugin's name in
//! field `plugin`, so operators filter them like any other target
//! (`RUST_LOG=wasm=debug`).

use super::HostResult;
use crate::abi::{LogLevel, Status};
use crate::guest::HostContext;
use crate::memory;

/// `proxy_log(level, message_ptr, message_size)`.
pub(crate) fn log<G: HostContext>(
    caller: &mut G,
    level: i32,
    ptr: i32,
    len: i32,
) -> HostResult<G::Trap> {
    let level = LogLevel::try_from(level).map_err(|_| Status::BadArgument)?;
    // Borrowed, not copied: most messages are below the level anyone records.
    let message = memory::borrow(caller, ptr, len)?;
    // Checked after the memory, as Envoy does, so a bad pointer is reported
    // at every level; a dropped message is then neither decoded nor formatted.
    if !recorded(level) {
        return Ok(());
    }
    let state = caller.state();
    emit(
        state.plugin_name(),
        state.call.effective_context_id,
        level,
        &String::from_utf8_lossy(message),
    );
    Ok(())
}

/// Logs one plugin message. `Critical` has no tracing level and maps to `ERROR`.
pub(crate) fn emit(plugin: &str, context_id: u32, level: LogLevel, message: &str) {
    match level {
        LogLevel::Trace => tracing::trace!(target: "wasm", plugin, context_id, "{message}"),
        LogLevel::Debug => tracing::debug!(target: "wasm", plugin, context_id, "{message}"),
        LogLevel::Info => tracing::info!(target: "wasm", plugin, context_id, "{message}"),
        LogLevel::Warn => tracing::warn!(target: "wasm", plugin, context_id, "{message}"),
        LogLevel::Error => tracing::error!(target: "wasm", plugin, context_id, "{message}"),
        LogLevel::Critical => {
            tracing::error!(target: "wasm", plugin, context_id, critical = true, "{message}")
        }
    }
}

/// `proxy_get_log_level(return_level)`: the most verbose level the subscriber
/// would record for target `"wasm"` right now, so plugins can skip building
/// messages nobody will see.
pub(crate) fn get_log_level<G: HostContext>(caller: &mut G, level_ptr: i32) -> HostResult<G::Trap> {
    memory::write_u32(caller, level_ptr, current_level() as u32)?;
    Ok(())
}

/// Whether the subscriber records `level` for target `"wasm"`.
fn recorded(level: LogLevel) -> bool {
    match level {
        LogLevel::Trace => tracing::enabled!(target: "wasm", tracing::Level::TRACE),
        LogLevel::Debug => tracing::enabled!(target: "wasm", tracing::Level::DEBUG),
        LogLevel::Info => tracing::enabled!(target: "wasm", tracing::Level::INFO),
        LogLevel::Warn => tracing::enabled!(target: "wasm", tracing::Level::WARN),
        LogLevel::Error | LogLevel::Critical => {
            tracing::enabled!(target: "wasm", tracing::Level::ERROR)
        }
    }
}

fn current_level() -> LogLevel {
    if tracing::enabled!(target: "wasm", tracing::Level::TRACE) {
        LogLevel::Trace
    } else if tracing::enabled!(target: "wasm", tracing::Level::DEBUG) {
        LogLevel::Debug
    } else if tracing::enabled!(target: "wasm", tracing::Level::INFO) {
        LogLevel::Info
    } else if tracing::enabled!(target: "wasm", tracing::Level::WARN) {
        LogLevel::Warn
    } else if tracing::enabled!(target: "wasm", tracing::Level::ERROR) {
        LogLevel::Error
    } else {
        LogLevel::Critical
    }
}

#[cfg(test)]
mod tests {
    use crate::abi::{AbiVersion, Status};
    use crate::plugin::PluginConfig;
    use crate::test_guest::{Guest, OUT_OF_BOUNDS};

    #[test]
    fn log_checks_level_then_memory() {
        let mut guest = Guest::new();
        let (ptr, len) = guest.put("héllo".as_bytes());
        for level in 0..=5 {
            assert_eq!(
                guest.env("proxy_log", &[level, ptr, len]),
                0,
                "level {level}"
            );
        }
        assert_eq!(
            guest.env("proxy_log", &[6, ptr, len]),
            Status::BadArgument as i32
        );
        assert_eq!(
            guest.env("proxy_log", &[-1, OUT_OF_BOUNDS, len]),
            Status::BadArgument as i32
        );
        assert_eq!(
            guest.env("proxy_log", &[2, OUT_OF_BOUNDS, len]),
            Status::InvalidMemoryAccess as i32
        );
        assert_eq!(guest.env("proxy_log", &[2, 0, 0]), 0, "empty message");
    }

    #[test]
    fn get_log_level_writes_a_level() {
        let mut guest = Guest::new();
        let (ptr, _) = guest.slots();
        assert_eq!(guest.env("proxy_get_log_level", &[ptr]), 0);
        assert!(guest.read_u32(ptr) <= 5);
        assert_eq!(
            guest.env("proxy_get_log_level", &[OUT_OF_BOUNDS]),
            Status::InvalidMemoryAccess as i32
        );
    }

    #[test]
    fn get_log_level_is_unimplemented_before_0_2_1() {
        // cpp-host links it only for 0.2.1 modules; older ones get our stub.
        let mut guest = Guest::with(AbiVersion::V0_2_0, PluginConfig::default());
        let (ptr, _) = guest.slots();
        assert_eq!(
            guest.env("proxy_get_log_level", &[ptr]),
            Status::Unimplemented as i32
        );
    }
}
