//! The `env.proxy_*` functions a plugin imports, one file per area.
//!
//! Each hostcall is a plain function, generic over the engine
//! ([`HostContext`]), returning [`HostResult`]: `Ok(())` is `OK`,
//! `Err(Fault::Status(s))` hands status `s` to the guest, and
//! `Err(Fault::Trap(e))` (only from a trapping guest allocator) unwinds the
//! guest. [`for_each_hostcall!`] lists them once for every backend's linker. Status codes follow cpp-host's `src/exports.cc`; the checks run in
//! its order (argument enum → guest memory → availability) so a guest sees the
//! same code for the same mistake.
//!
//! Which functions exist depends on the ABI version, as in cpp-host's
//! `registerCallbacks`: `proxy_continue_stream` / `proxy_close_stream` from
//! 0.2.0, `proxy_get_log_level` from 0.2.1. Anything else gets a stub from
//! [`crate::link`].

pub(crate) mod buffers;
pub(crate) mod callouts;
pub(crate) mod context;
pub(crate) mod foreign;
pub(crate) mod header_maps;
pub(crate) mod http;
pub(crate) mod legacy;
pub(crate) mod logging;
pub(crate) mod metrics;
pub(crate) mod properties;
pub(crate) mod shared;

use crate::abi::Status;
use crate::guest::HostContext;
use crate::memory::GuestError;
use crate::state::Restriction;

/// The import module of every Proxy-Wasm hostcall.
pub(crate) const MODULE: &str = "env";

/// How a hostcall ends short of `OK`; `T` is the engine's trap.
#[derive(Debug)]
pub(crate) enum Fault<T> {
    /// Return this status to the guest.
    Status(Status),
    /// Unwind the guest with this error (it becomes a trap).
    Trap(T),
}

impl<T> From<Status> for Fault<T> {
    fn from(status: Status) -> Self {
        Fault::Status(status)
    }
}

impl<T> From<GuestError<T>> for Fault<T> {
    fn from(error: GuestError<T>) -> Self {
        match error {
            // cpp-host reports a failed `allocMemory` the same way as a bad pointer.
            GuestError::OutOfBounds | GuestError::AllocationFailed => {
                Fault::Status(Status::InvalidMemoryAccess)
            }
            GuestError::Trap(e) => Fault::Trap(e),
        }
    }
}

pub(crate) type HostResult<T> = Result<(), Fault<T>>;

/// Runs hostcall `name` for a backend: the restriction check, then `func`;
/// the result is the status code for the guest, or the trap to unwind it.
#[inline]
pub(crate) fn dispatch<G: Restricted>(
    g: &mut G,
    name: &str,
    func: impl FnOnce(&mut G) -> HostResult<G::Trap>,
) -> Result<i32, G::Trap> {
    check_restriction(g, name)?;
    match func(g) {
        Ok(()) => Ok(Status::Ok.code()),
        Err(Fault::Status(status)) => Ok(status.code()),
        Err(Fault::Trap(error)) => Err(error),
    }
}

/// How a backend turns a forbidden call (or `proc_exit`) into a trap.
pub(crate) trait Restricted: HostContext {
    /// A trap carrying `message` (a host error, not a guest fault).
    fn host_trap(&mut self, message: String) -> Self::Trap;
    /// The trap that ends the guest with WASI `proc_exit(code)`.
    fn exit_trap(&mut self, code: i32) -> Self::Trap;
}

/// Traps unless `name` may run in the current call (inside the guest
/// allocator or `_initialize`, cpp-host allows only logging and a few WASI
/// calls and fails the VM otherwise).
pub(crate) fn check_restriction<G: Restricted>(g: &mut G, name: &str) -> Result<(), G::Trap> {
    let restriction = g.state().call.restriction;
    if restriction.allows(name) {
        Ok(())
    } else {
        let message = format!(
            "hostcall {name} is forbidden while {}",
            match restriction {
                Restriction::Allocator => "the guest allocator runs",
                _ => "the module starts (_initialize/_start)",
            }
        );
        Err(g.host_trap(message))
    }
}

/// Expands `$m!($imports, module, name, |g, args..| -> ret { body })` for
/// every `env` hostcall of ABI `$abi` (version-specific ones only for their
/// versions, as cpp-host's `registerCallbacks`); each body evaluates to
/// `Result<ret, Trap>`. A backend's `$m` turns that into its host function.
macro_rules! for_each_hostcall {
    ($m:ident!($imports:expr), $abi:expr) => {{
        use $crate::hostcalls::{
            buffers, callouts, context, foreign, header_maps, http, legacy, logging, metrics,
            properties, shared, MODULE,
        };
        let abi: $crate::abi::AbiVersion = $abi;
        $crate::hostcalls::for_each_hostcall!(@table $m, $imports, abi);
    }};
    (@list $m:ident, $imports:expr; $($name:literal => $func:path => ($($arg:ident $(: $ty:ty)?),*);)*) => {
        $(
            $m!($imports, MODULE, $name, |g $(, $arg: $crate::hostcalls::for_each_hostcall!(@ty $($ty)?))*| -> i32 {
                $crate::hostcalls::dispatch(g, $name, |g| $func(g, $($arg),*))
            });
        )*
    };
    (@ty) => { i32 };
    (@ty $ty:ty) => { $ty };
    // One line per hostcall: a table.
    (@table $m:ident, $imports:expr, $abi:expr) => {
    $crate::hostcalls::for_each_hostcall!(@list $m, $imports;
        "proxy_log" => logging::log => (level, ptr, len);
        "proxy_set_effective_context" => context::set_effective_context => (id);
        "proxy_done" => context::done => ();
        "proxy_get_current_time_nanoseconds" => context::current_time => (ptr);
        "proxy_set_tick_period_milliseconds" => context::set_tick_period => (ms);
        "proxy_get_buffer_bytes" => buffers::get_bytes => (ty, start, len, ptr_ptr, size_ptr);
        "proxy_get_buffer_status" => buffers::get_status => (ty, len_ptr, flags_ptr);
        "proxy_set_buffer_bytes" => buffers::set_bytes => (ty, start, len, ptr, size);
        "proxy_get_header_map_pairs" => header_maps::get_pairs => (ty, ptr_ptr, size_ptr);
        "proxy_set_header_map_pairs" => header_maps::set_pairs => (ty, ptr, len);
        "proxy_get_header_map_size" => header_maps::get_size => (ty, size_ptr);
        "proxy_get_header_map_value" => header_maps::get_value => (ty, key_ptr, key_len, ptr_ptr, size_ptr);
        "proxy_add_header_map_value" => header_maps::add_value => (ty, key_ptr, key_len, ptr, len);
        "proxy_replace_header_map_value" => header_maps::replace_value => (ty, key_ptr, key_len, ptr, len);
        "proxy_remove_header_map_value" => header_maps::remove_value => (ty, key_ptr, key_len);
        "proxy_get_property" => properties::get => (path_ptr, path_len, ptr_ptr, size_ptr);
        "proxy_set_property" => properties::set => (path_ptr, path_len, ptr, len);
        "proxy_get_status" => http::get_status => (code_ptr, ptr_ptr, size_ptr);
        "proxy_http_call" => callouts::http_call => (up_ptr, up_len, h_ptr, h_len, b_ptr, b_len, t_ptr, t_len, timeout, token_ptr);
        "proxy_grpc_call" => callouts::grpc_call => (up_ptr, up_len, s_ptr, s_len, m_ptr, m_len, md_ptr, md_len, msg_ptr, msg_len, timeout, token_ptr);
        "proxy_grpc_stream" => callouts::grpc_stream => (up_ptr, up_len, s_ptr, s_len, m_ptr, m_len, md_ptr, md_len, token_ptr);
        "proxy_grpc_send" => callouts::grpc_send => (token, ptr, len, end_stream);
        "proxy_grpc_cancel" => callouts::grpc_cancel => (token);
        "proxy_grpc_close" => callouts::grpc_close => (token);
        "proxy_set_shared_data" => shared::set_data => (k_ptr, k_len, v_ptr, v_len, cas);
        "proxy_get_shared_data" => shared::get_data => (k_ptr, k_len, ptr_ptr, size_ptr, cas_ptr);
        "proxy_register_shared_queue" => shared::register_queue => (n_ptr, n_len, id_ptr);
        "proxy_resolve_shared_queue" => shared::resolve_queue => (vm_ptr, vm_len, n_ptr, n_len, id_ptr);
        "proxy_enqueue_shared_queue" => shared::enqueue => (id, ptr, len);
        "proxy_dequeue_shared_queue" => shared::dequeue => (id, ptr_ptr, size_ptr);
        "proxy_define_metric" => metrics::define => (kind, n_ptr, n_len, id_ptr);
        "proxy_increment_metric" => metrics::increment => (id, delta: i64);
        "proxy_record_metric" => metrics::record => (id, value: i64);
        "proxy_get_metric" => metrics::get => (id, value_ptr);
        "proxy_call_foreign_function" => foreign::call => (n_ptr, n_len, a_ptr, a_len, ptr_ptr, size_ptr);
    );
    // cpp-host always provides these two for Emscripten-built modules.
    $m!($imports, MODULE, "emscripten_notify_memory_growth", |g, _pages: i32| -> () {
        let _ = g;
        Ok(())
    });
    $m!($imports, MODULE, "pthread_equal", |g, a: i32, b: i32| -> i32 {
        let _ = g;
        Ok(i32::from(a == b))
    });
    if $abi == $crate::abi::AbiVersion::V0_1_0 {
        $crate::hostcalls::for_each_hostcall!(@list $m, $imports;
            "proxy_get_configuration" => legacy::get_configuration => (ptr_ptr, size_ptr);
            "proxy_continue_request" => legacy::continue_request => ();
            "proxy_continue_response" => legacy::continue_response => ();
            "proxy_clear_route_cache" => legacy::clear_route_cache => ();
        );
    }
    $crate::hostcalls::for_each_hostcall!(@list $m, $imports;
        "proxy_send_local_response" => http::send_local_response => (status, details_ptr, details_len, body_ptr, body_len, headers_ptr, headers_len, grpc_status);
    );
    if $abi >= $crate::abi::AbiVersion::V0_2_0 {
        $crate::hostcalls::for_each_hostcall!(@list $m, $imports;
            "proxy_continue_stream" => http::continue_stream => (ty);
            "proxy_close_stream" => http::close_stream => (ty);
        );
    }
    if $abi >= $crate::abi::AbiVersion::V0_2_1 {
        $crate::hostcalls::for_each_hostcall!(@list $m, $imports;
            "proxy_get_log_level" => logging::get_log_level => (ptr);
        );
    }
        };
}
pub(crate) use for_each_hostcall;
