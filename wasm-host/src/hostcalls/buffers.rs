//! `proxy_get_buffer_bytes`, `proxy_get_buffer_status`, `proxy_set_buffer_bytes`.
//!
//! Which buffer exists when (spec §Buffers, Envoy's `Context::getBuffer`):
//! VM_CONFIGURATION always (Envoy returns it unconditionally);
//! PLUGIN_CONFIGURATION during `proxy_on_configure`; the HTTP bodies while
//! the effective context's stream is lent; DOWNSTREAM/UPSTREAM_DATA while
//! its TCP connection is lent; HTTP_CALL_RESPONSE_BODY in
//! `proxy_on_http_call_response`; GRPC_CALL_MESSAGE in `proxy_on_grpc_receive`;
//! FOREIGN_FUNCTION_ARGUMENTS in `proxy_on_foreign_function`. Any other valid
//! type is NOT_FOUND, as cpp-host returns for a missing buffer.

use super::HostResult;
use crate::abi::{BufferType, Status};
use crate::guest::HostContext;
use crate::memory;
use crate::state::{ConfigPhase, HostState};

/// The readable contents of buffer `ty` right now.
fn buffer(state: &HostState, ty: BufferType) -> Option<&[u8]> {
    let config = state.plugin.config();
    let call = &state.call;
    let tcp = match &call.tcp {
        Some((id, conn)) if *id == call.effective_context_id => Some(conn),
        _ => None,
    };
    match ty {
        BufferType::VmConfiguration => Some(&config.vm_configuration),
        BufferType::PluginConfiguration if call.phase == ConfigPhase::Configure => {
            Some(&config.configuration)
        }
        BufferType::PluginConfiguration => None,
        BufferType::HttpRequestBody => state.stream().map(|s| s.request_body.as_slice()),
        BufferType::HttpResponseBody => state.stream().map(|s| s.response_body.as_slice()),
        BufferType::DownstreamData => tcp.map(|c| c.downstream_data.as_slice()),
        BufferType::UpstreamData => tcp.map(|c| c.upstream_data.as_slice()),
        BufferType::HttpCallResponseBody => {
            call.http_call_response.as_ref().map(|r| r.body.as_slice())
        }
        BufferType::GrpcCallMessage => call.grpc_message.as_deref(),
        BufferType::ForeignFunctionArguments => call.foreign_arguments.as_deref(),
    }
}

/// The buffers a plugin may change: bodies and TCP data.
fn buffer_mut(state: &mut HostState, ty: BufferType) -> Result<&mut Vec<u8>, Status> {
    match ty {
        BufferType::HttpRequestBody => state.stream_mut().map(|s| &mut s.request_body),
        BufferType::HttpResponseBody => state.stream_mut().map(|s| &mut s.response_body),
        BufferType::DownstreamData => state.tcp_mut().map(|c| &mut c.downstream_data),
        BufferType::UpstreamData => state.tcp_mut().map(|c| &mut c.upstream_data),
        // Envoy's const buffers (configuration, callout answers): BAD_ARGUMENT.
        _ if buffer(state, ty).is_some() => return Err(Status::BadArgument),
        _ => None,
    }
    .ok_or(Status::NotFound)
}

/// `proxy_get_buffer_bytes(type, start, max_size, return_data, return_size)`.
///
/// Reads at most `max_size` bytes from `start`. As in cpp-host, when nothing is
/// left to read the call succeeds without touching the out-parameters (the
/// SDKs pre-set them to null / 0).
pub(crate) fn get_bytes<G: HostContext>(
    caller: &mut G,
    ty: i32,
    start: i32,
    max_size: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> HostResult<G::Trap> {
    let ty = BufferType::try_from(ty).map_err(|_| Status::BadArgument)?;
    let data = buffer(caller.state(), ty).ok_or(Status::NotFound)?;
    let start = start as u32 as usize;
    let end = start
        .saturating_add(max_size as u32 as usize)
        .min(data.len());
    if start >= end {
        return Ok(());
    }
    let bytes = data[start..end].to_vec();
    memory::copy_out(caller, &bytes, ptr_ptr, size_ptr)?;
    Ok(())
}

/// `proxy_get_buffer_status(type, return_size, return_flags)`; flags are
/// always 0, as cpp-host writes them.
pub(crate) fn get_status<G: HostContext>(
    caller: &mut G,
    ty: i32,
    size_ptr: i32,
    flags_ptr: i32,
) -> HostResult<G::Trap> {
    let ty = BufferType::try_from(ty).map_err(|_| Status::BadArgument)?;
    let len = buffer(caller.state(), ty).ok_or(Status::NotFound)?.len();
    memory::write_u32(caller, size_ptr, u32::try_from(len).unwrap_or(u32::MAX))?;
    memory::write_u32(caller, flags_ptr, 0)?;
    Ok(())
}

/// `proxy_set_buffer_bytes(type, start, size, data, data_size)`.
///
/// Envoy's `Buffer::copyFrom`: `start == 0` drops the first `size` bytes and
/// prepends the data (so 0/0 prepends and 0/len replaces everything);
/// `start >= len` appends. For a range in the middle Envoy returns
/// BAD_ARGUMENT, which the Rust SDK turns into a panic; we replace
/// `[start, start + size)` instead, which is what the SDK documents.
pub(crate) fn set_bytes<G: HostContext>(
    caller: &mut G,
    ty: i32,
    start: i32,
    size: i32,
    ptr: i32,
    len: i32,
) -> HostResult<G::Trap> {
    let ty = BufferType::try_from(ty).map_err(|_| Status::BadArgument)?;
    let data = memory::read(caller, ptr, len)?;
    let buffer = buffer_mut(caller.state_mut(), ty)?;
    splice(buffer, start as u32 as usize, size as u32 as usize, &data);
    Ok(())
}

/// Replaces `buffer[start..start + size]` (clamped) with `data`; appends when
/// `start` is at or past the end.
pub(crate) fn splice(buffer: &mut Vec<u8>, start: usize, size: usize, data: &[u8]) {
    if start >= buffer.len() {
        buffer.extend_from_slice(data);
        return;
    }
    let end = start.saturating_add(size).min(buffer.len());
    buffer.splice(start..end, data.iter().copied());
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
        for ty in [1, 2, 3, 4, 5, 8] {
            assert_eq!(
                get(&mut guest, ty, 0, 10).0,
                Status::NotFound as i32,
                "{ty}"
            );
        }
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

    #[test]
    fn set_bytes_prepends_appends_and_replaces() {
        let mut guest = guest();
        let stream = crate::stream::HttpStream {
            request_body: b"hello".to_vec(),
            ..Default::default()
        };
        guest.lend(stream);
        let set = |guest: &mut Guest, start: i32, size: i32, data: &[u8]| {
            let (ptr, len) = guest.put(data);
            guest.env(
                "proxy_set_buffer_bytes",
                &[REQUEST_BODY, start, size, ptr, len],
            )
        };
        assert_eq!(set(&mut guest, 0, 0, b">"), 0);
        assert_eq!(guest.stream().request_body, b">hello");
        assert_eq!(set(&mut guest, 100, 0, b"<"), 0);
        assert_eq!(guest.stream().request_body, b">hello<");
        assert_eq!(set(&mut guest, 1, 5, b"HELLO"), 0);
        assert_eq!(guest.stream().request_body, b">HELLO<");
        assert_eq!(set(&mut guest, 0, 7, b"new"), 0);
        assert_eq!(guest.stream().request_body, b"new");
        assert_eq!(
            get(&mut guest, REQUEST_BODY, 1, 10),
            (0, Some(b"ew".to_vec()))
        );
        // Read-only and missing buffers, bad types and bad memory.
        assert_eq!(set(&mut guest, 0, 0, b"x"), 0);
        let (ptr, len) = guest.put(b"x");
        let status = |guest: &mut Guest, ty: i32, p: i32| {
            guest.env("proxy_set_buffer_bytes", &[ty, 0, 0, p, len])
        };
        assert_eq!(
            status(&mut guest, VM_CONFIGURATION, ptr),
            Status::BadArgument as i32
        );
        assert_eq!(status(&mut guest, 2, ptr), Status::NotFound as i32);
        assert_eq!(status(&mut guest, 9, ptr), Status::BadArgument as i32);
        assert_eq!(
            status(&mut guest, REQUEST_BODY, OUT_OF_BOUNDS),
            Status::InvalidMemoryAccess as i32
        );
    }

    #[test]
    fn splice_edges() {
        let mut b = b"abc".to_vec();
        super::splice(&mut b, 1, usize::MAX, b"Z");
        assert_eq!(b, b"aZ");
        super::splice(&mut b, 2, 0, b"!");
        assert_eq!(b, b"aZ!");
    }
}
