//! The `env.proxy_*` functions a plugin imports, one file per area.
//!
//! Each hostcall is a plain function returning [`HostResult`]: `Ok(())` is
//! `OK`, `Err(Fault::Status(s))` hands status `s` to the guest, and
//! `Err(Fault::Trap(e))` (only from a trapping guest allocator) unwinds the
//! guest. Status codes follow cpp-host's `src/exports.cc`; the checks run in
//! its order (argument enum → guest memory → availability) so a guest sees the
//! same code for the same mistake.
//!
//! Which functions exist depends on the ABI version, as in cpp-host's
//! `registerCallbacks`: `proxy_continue_stream` / `proxy_close_stream` from
//! 0.2.0, `proxy_get_log_level` from 0.2.1. Anything else gets a stub from
//! [`crate::link`].

mod buffers;
pub(crate) mod context;
mod header_maps;
mod http;
pub(crate) mod logging;
mod properties;

use wasmtime::Caller;

use crate::abi::{AbiVersion, Status};
use crate::link::Imports;
use crate::memory::GuestError;
use crate::state::HostState;

/// The import module of every Proxy-Wasm hostcall.
pub(crate) const MODULE: &str = "env";

/// How a hostcall ends short of `OK`.
#[derive(Debug)]
pub(crate) enum Fault {
    /// Return this status to the guest.
    Status(Status),
    /// Unwind the guest with this error (it becomes a trap).
    Trap(wasmtime::Error),
}

impl From<Status> for Fault {
    fn from(status: Status) -> Self {
        Fault::Status(status)
    }
}

impl From<GuestError> for Fault {
    fn from(error: GuestError) -> Self {
        match error {
            // cpp-host reports a failed `allocMemory` the same way as a bad pointer.
            GuestError::OutOfBounds | GuestError::AllocationFailed => {
                Fault::Status(Status::InvalidMemoryAccess)
            }
            GuestError::Trap(e) => Fault::Trap(e),
        }
    }
}

pub(crate) type HostResult = Result<(), Fault>;

/// Turns a hostcall's result into what wasmtime expects: the status code, or
/// an error that traps the guest.
fn finish(result: HostResult) -> wasmtime::Result<i32> {
    match result {
        Ok(()) => Ok(Status::Ok.code()),
        Err(Fault::Status(status)) => Ok(status.code()),
        Err(Fault::Trap(error)) => Err(error),
    }
}

/// Defines `env.$name` as a closure over `$func` taking `$arg: i32`s.
macro_rules! hostcall {
    ($imports:expr, $name:literal, $func:path, ($($arg:ident),*)) => {
        $imports.func(
            MODULE,
            $name,
            |mut caller: Caller<'_, HostState>, $($arg: i32),*| finish($func(&mut caller, $($arg),*)),
        )?
    };
}

// One line per hostcall reads as a table; rustfmt would spread it over 100 lines.
#[rustfmt::skip]
pub(crate) fn add_to_linker(imports: &mut Imports, abi: AbiVersion) -> wasmtime::Result<()> {
    hostcall!(imports, "proxy_log", logging::log, (level, ptr, len));
    hostcall!(imports, "proxy_set_effective_context", context::set_effective_context, (id));
    hostcall!(imports, "proxy_done", context::done, ());
    hostcall!(imports, "proxy_get_current_time_nanoseconds", context::current_time, (ptr));
    hostcall!(imports, "proxy_set_tick_period_milliseconds", context::set_tick_period, (ms));
    hostcall!(imports, "proxy_get_buffer_bytes", buffers::get_bytes, (ty, start, len, ptr_ptr, size_ptr));
    hostcall!(imports, "proxy_get_buffer_status", buffers::get_status, (ty, len_ptr, flags_ptr));
    hostcall!(imports, "proxy_get_header_map_pairs", header_maps::get_pairs, (ty, ptr_ptr, size_ptr));
    hostcall!(imports, "proxy_set_header_map_pairs", header_maps::set_pairs, (ty, ptr, len));
    hostcall!(imports, "proxy_get_header_map_size", header_maps::get_size, (ty, size_ptr));
    hostcall!(imports, "proxy_get_header_map_value", header_maps::get_value, (ty, key_ptr, key_len, ptr_ptr, size_ptr));
    hostcall!(imports, "proxy_add_header_map_value", header_maps::add_value, (ty, key_ptr, key_len, ptr, len));
    hostcall!(imports, "proxy_replace_header_map_value", header_maps::replace_value, (ty, key_ptr, key_len, ptr, len));
    hostcall!(imports, "proxy_remove_header_map_value", header_maps::remove_value, (ty, key_ptr, key_len));
    hostcall!(imports, "proxy_get_property", properties::get, (path_ptr, path_len, ptr_ptr, size_ptr));
    hostcall!(imports, "proxy_send_local_response", http::send_local_response,
        (status, details_ptr, details_len, body_ptr, body_len, headers_ptr, headers_len, grpc_status));
    if abi >= AbiVersion::V0_2_0 {
        hostcall!(imports, "proxy_continue_stream", http::continue_stream, (ty));
        hostcall!(imports, "proxy_close_stream", http::close_stream, (ty));
    }
    if abi >= AbiVersion::V0_2_1 {
        hostcall!(imports, "proxy_get_log_level", logging::get_log_level, (ptr));
    }
    Ok(())
}
