//! `proxy_get_buffer_bytes`, `proxy_get_buffer_status`.
//!
//! Only the configuration buffers exist so far: VM_CONFIGURATION at any time
//! (Envoy returns it unconditionally) and PLUGIN_CONFIGURATION during
//! `proxy_on_configure` (Envoy's `temp_plugin_`). Every other buffer type is
//! valid but not available: NOT_FOUND, as cpp-host returns for a missing buffer.

use wasmtime::Caller;

use super::HostResult;
use crate::abi::{BufferType, Status};
use crate::memory;
use crate::plugin::Plugin;
use crate::state::{ConfigPhase, HostState};

fn buffer(plugin: &Plugin, phase: ConfigPhase, ty: BufferType) -> Option<&[u8]> {
    match ty {
        BufferType::VmConfiguration => Some(&plugin.config().vm_configuration),
        BufferType::PluginConfiguration if phase == ConfigPhase::Configure => {
            Some(&plugin.config().configuration)
        }
        _ => None,
    }
}

/// `proxy_get_buffer_bytes(type, start, max_size, return_data, return_size)`.
///
/// Reads at most `max_size` bytes from `start`. As in cpp-host, when nothing is
/// left to read the call succeeds without touching the out-parameters (the
/// SDKs pre-set them to null / 0).
pub(super) fn get_bytes(
    caller: &mut Caller<'_, HostState>,
    ty: i32,
    start: i32,
    max_size: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> HostResult {
    let ty = BufferType::try_from(ty).map_err(|_| Status::BadArgument)?;
    let plugin = caller.data().plugin.clone();
    let data = buffer(&plugin, caller.data().call.phase, ty).ok_or(Status::NotFound)?;
    let start = start as u32 as usize;
    let end = start
        .saturating_add(max_size as u32 as usize)
        .min(data.len());
    if start >= end {
        return Ok(());
    }
    memory::copy_out(caller, &data[start..end], ptr_ptr, size_ptr)?;
    Ok(())
}

/// `proxy_get_buffer_status(type, return_size, return_flags)`; flags are
/// always 0, as cpp-host writes them.
pub(super) fn get_status(
    caller: &mut Caller<'_, HostState>,
    ty: i32,
    size_ptr: i32,
    flags_ptr: i32,
) -> HostResult {
    let ty = BufferType::try_from(ty).map_err(|_| Status::BadArgument)?;
    let plugin = caller.data().plugin.clone();
    let len = buffer(&plugin, caller.data().call.phase, ty)
        .ok_or(Status::NotFound)?
        .len();
    memory::write_u32(caller, size_ptr, u32::try_from(len).unwrap_or(u32::MAX))?;
    memory::write_u32(caller, flags_ptr, 0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::abi::{AbiVersion, Status};
    use crate::plugin::PluginConfig;
    use crate::state::ConfigPhase;
    use crate::test_guest::{Guest, OUT_OF_BOUNDS};

    const REQUEST_BODY: i32 = 0;
    const VM_CONFIGURATION: i32 = 6;
    const PLUGIN_CONFIGURATION: i32 = 7;

    fn guest() -> Guest {
        Guest::with(
            AbiVersion::V0_2_1,
            PluginConfig {
                name: "buffers".into(),
                configuration: b"plugin-config".to_vec(),
                vm_configuration: b"vm-config".to_vec(),
                ..Default::default()
            },
        )
    }

    fn get(guest: &mut Guest, ty: i32, start: i32, max: i32) -> (i32, Option<Vec<u8>>) {
        let out = guest.slots();
        let status = guest.env("proxy_get_buffer_bytes", &[ty, start, max, out.0, out.1]);
        (status, guest.returned(out))
    }

    #[test]
    fn plugin_configuration_is_readable_only_while_configuring() {
        let mut guest = guest();
        assert_eq!(
            get(&mut guest, PLUGIN_CONFIGURATION, 0, -1),
            (Status::NotFound as i32, None)
        );
        guest.set_phase(ConfigPhase::Configure);
        assert_eq!(
            get(&mut guest, PLUGIN_CONFIGURATION, 0, -1),
            (0, Some(b"plugin-config".to_vec()))
        );
    }

    #[test]
    fn vm_configuration_is_always_readable_and_ranges_are_clamped() {
        let mut guest = guest();
        assert_eq!(
            get(&mut guest, VM_CONFIGURATION, 0, 1000),
            (0, Some(b"vm-config".to_vec()))
        );
        assert_eq!(
            get(&mut guest, VM_CONFIGURATION, 3, 3),
            (0, Some(b"con".to_vec()))
        );
        // Nothing left to read: OK, out-parameters untouched (still 0).
        assert_eq!(get(&mut guest, VM_CONFIGURATION, 9, 10), (0, None));
        assert_eq!(get(&mut guest, VM_CONFIGURATION, 100, 10), (0, None));
        assert_eq!(get(&mut guest, VM_CONFIGURATION, 0, 0), (0, None));
    }

    #[test]
    fn unknown_and_unavailable_buffers() {
        let mut guest = guest();
        assert_eq!(get(&mut guest, 9, 0, 10).0, Status::BadArgument as i32);
        assert_eq!(get(&mut guest, -1, 0, 10).0, Status::BadArgument as i32);
        assert_eq!(
            get(&mut guest, REQUEST_BODY, 0, 10).0,
            Status::NotFound as i32
        );
        let status = guest.env(
            "proxy_get_buffer_bytes",
            &[VM_CONFIGURATION, 0, 10, OUT_OF_BOUNDS, OUT_OF_BOUNDS],
        );
        assert_eq!(status, Status::InvalidMemoryAccess as i32);
        assert_eq!(guest.allocations(), 0);
    }

    #[test]
    fn status_reports_size_and_zero_flags() {
        let mut guest = guest();
        let (size_ptr, flags_ptr) = guest.slots();
        guest.put(&[0xff; 4]); // make sure flags are really written
        assert_eq!(
            guest.env(
                "proxy_get_buffer_status",
                &[VM_CONFIGURATION, size_ptr, flags_ptr]
            ),
            0
        );
        assert_eq!(guest.read_u32(size_ptr), 9);
        assert_eq!(guest.read_u32(flags_ptr), 0);
        assert_eq!(
            guest.env(
                "proxy_get_buffer_status",
                &[PLUGIN_CONFIGURATION, size_ptr, flags_ptr]
            ),
            Status::NotFound as i32
        );
        assert_eq!(
            guest.env("proxy_get_buffer_status", &[42, size_ptr, flags_ptr]),
            Status::BadArgument as i32
        );
        assert_eq!(
            guest.env(
                "proxy_get_buffer_status",
                &[VM_CONFIGURATION, OUT_OF_BOUNDS, flags_ptr]
            ),
            Status::InvalidMemoryAccess as i32
        );
    }
}
