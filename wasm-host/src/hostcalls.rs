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
mod callouts;
pub(crate) mod context;
mod foreign;
mod header_maps;
mod http;
mod legacy;
pub(crate) mod logging;
mod metrics;
mod properties;
mod shared;

use wasmtime::Caller;

use crate::abi::{AbiVersion, Status};
use crate::link::Imports;
use crate::memory::GuestError;
use crate::state::{HostState, Restriction};

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

/// Traps unless `name` may run in the current call (inside the guest
/// allocator or `_initialize`, cpp-host allows only logging and a few WASI
/// calls and fails the VM otherwise).
pub(crate) fn check_restriction(
    caller: &Caller<'_, HostState>,
    name: &str,
) -> wasmtime::Result<()> {
    let restriction = caller.data().call.restriction;
    if restriction.allows(name) {
        Ok(())
    } else {
        Err(wasmtime::Error::msg(format!(
            "hostcall {name} is forbidden while {}",
            match restriction {
                Restriction::Allocator => "the guest allocator runs",
                _ => "the module starts (_initialize/_start)",
            }
        )))
    }
}

/// Defines `env.$name` as a closure over `$func` taking `$arg: $ty` (i32 by default).
macro_rules! hostcall {
    ($imports:expr, $name:literal, $func:path, ($($arg:ident $(: $ty:ty)?),*)) => {
        $imports.func(
            MODULE,
            $name,
            |mut caller: Caller<'_, HostState>, $($arg: hostcall!(@ty $($ty)?)),*| {
                check_restriction(&caller, $name)?;
                finish($func(&mut caller, $($arg),*))
            },
        )?
    };
    (@ty) => { i32 };
    (@ty $ty:ty) => { $ty };
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
    hostcall!(imports, "proxy_set_buffer_bytes", buffers::set_bytes, (ty, start, len, ptr, size));
    hostcall!(imports, "proxy_get_header_map_pairs", header_maps::get_pairs, (ty, ptr_ptr, size_ptr));
    hostcall!(imports, "proxy_set_header_map_pairs", header_maps::set_pairs, (ty, ptr, len));
    hostcall!(imports, "proxy_get_header_map_size", header_maps::get_size, (ty, size_ptr));
    hostcall!(imports, "proxy_get_header_map_value", header_maps::get_value, (ty, key_ptr, key_len, ptr_ptr, size_ptr));
    hostcall!(imports, "proxy_add_header_map_value", header_maps::add_value, (ty, key_ptr, key_len, ptr, len));
    hostcall!(imports, "proxy_replace_header_map_value", header_maps::replace_value, (ty, key_ptr, key_len, ptr, len));
    hostcall!(imports, "proxy_remove_header_map_value", header_maps::remove_value, (ty, key_ptr, key_len));
    hostcall!(imports, "proxy_get_property", properties::get, (path_ptr, path_len, ptr_ptr, size_ptr));
    hostcall!(imports, "proxy_set_property", properties::set, (path_ptr, path_len, ptr, len));
    hostcall!(imports, "proxy_get_status", http::get_status, (code_ptr, ptr_ptr, size_ptr));
    hostcall!(imports, "proxy_http_call", callouts::http_call,
        (up_ptr, up_len, h_ptr, h_len, b_ptr, b_len, t_ptr, t_len, timeout, token_ptr));
    hostcall!(imports, "proxy_grpc_call", callouts::grpc_call,
        (up_ptr, up_len, s_ptr, s_len, m_ptr, m_len, md_ptr, md_len, msg_ptr, msg_len, timeout, token_ptr));
    hostcall!(imports, "proxy_grpc_stream", callouts::grpc_stream,
        (up_ptr, up_len, s_ptr, s_len, m_ptr, m_len, md_ptr, md_len, token_ptr));
    hostcall!(imports, "proxy_grpc_send", callouts::grpc_send, (token, ptr, len, end_stream));
    hostcall!(imports, "proxy_grpc_cancel", callouts::grpc_cancel, (token));
    hostcall!(imports, "proxy_grpc_close", callouts::grpc_close, (token));
    hostcall!(imports, "proxy_set_shared_data", shared::set_data, (k_ptr, k_len, v_ptr, v_len, cas));
    hostcall!(imports, "proxy_get_shared_data", shared::get_data, (k_ptr, k_len, ptr_ptr, size_ptr, cas_ptr));
    hostcall!(imports, "proxy_register_shared_queue", shared::register_queue, (n_ptr, n_len, id_ptr));
    hostcall!(imports, "proxy_resolve_shared_queue", shared::resolve_queue, (vm_ptr, vm_len, n_ptr, n_len, id_ptr));
    hostcall!(imports, "proxy_enqueue_shared_queue", shared::enqueue, (id, ptr, len));
    hostcall!(imports, "proxy_dequeue_shared_queue", shared::dequeue, (id, ptr_ptr, size_ptr));
    hostcall!(imports, "proxy_define_metric", metrics::define, (kind, n_ptr, n_len, id_ptr));
    hostcall!(imports, "proxy_increment_metric", metrics::increment, (id, delta: i64));
    hostcall!(imports, "proxy_record_metric", metrics::record, (id, value: i64));
    hostcall!(imports, "proxy_get_metric", metrics::get, (id, value_ptr));
    hostcall!(imports, "proxy_call_foreign_function", foreign::call, (n_ptr, n_len, a_ptr, a_len, ptr_ptr, size_ptr));
    // cpp-host always provides these two for Emscripten-built modules.
    imports.func(MODULE, "emscripten_notify_memory_growth", |_: Caller<'_, HostState>, _pages: i32| {})?;
    imports.func(MODULE, "pthread_equal", |_: Caller<'_, HostState>, a: i32, b: i32| i32::from(a == b))?;
    if abi == AbiVersion::V0_1_0 {
        hostcall!(imports, "proxy_get_configuration", legacy::get_configuration, (ptr_ptr, size_ptr));
        hostcall!(imports, "proxy_continue_request", legacy::continue_request, ());
        hostcall!(imports, "proxy_continue_response", legacy::continue_response, ());
        hostcall!(imports, "proxy_clear_route_cache", legacy::clear_route_cache, ());
    }
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
