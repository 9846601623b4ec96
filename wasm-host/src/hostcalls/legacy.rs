//! The ABI 0.1.0-only hostcalls: `proxy_get_configuration`,
//! `proxy_continue_request`, `proxy_continue_response`,
//! `proxy_clear_route_cache` (replaced in 0.2.0 by buffer type 7 and
//! `proxy_continue_stream`; linked only for 0.1.0 modules, as cpp-host does).

use super::HostResult;
use super::http::record;
use crate::abi::StreamType;
use crate::guest::HostContext;
use crate::memory;
use crate::stream::StreamRequestKind;

/// `proxy_get_configuration(return_data, return_size)`: the plugin configuration.
pub(crate) fn get_configuration<G: HostContext>(
    caller: &mut G,
    ptr_ptr: i32,
    size_ptr: i32,
) -> HostResult<G::Trap> {
    let config = caller.state().plugin.config().configuration.clone();
    memory::copy_out(caller, &config, ptr_ptr, size_ptr)?;
    Ok(())
}

pub(crate) fn continue_request<G: HostContext>(caller: &mut G) -> HostResult<G::Trap> {
    record(
        caller.state_mut(),
        StreamType::HttpRequest,
        StreamRequestKind::Continue,
    );
    Ok(())
}

pub(crate) fn continue_response<G: HostContext>(caller: &mut G) -> HostResult<G::Trap> {
    record(
        caller.state_mut(),
        StreamType::HttpResponse,
        StreamRequestKind::Continue,
    );
    Ok(())
}

/// Envoy recomputes the route after header changes by itself; nothing to do.
pub(crate) fn clear_route_cache<G: HostContext>(_caller: &mut G) -> HostResult<G::Trap> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::abi::{AbiVersion, StreamType};
    use crate::plugin::PluginConfig;
    use crate::stream::{HttpStream, StreamRequestKind};
    use crate::test_guest::Guest;

    #[test]
    fn abi_0_1_0_configuration_and_continue() {
        let config = PluginConfig {
            configuration: b"legacy".to_vec(),
            ..Default::default()
        };
        let mut guest = Guest::with(AbiVersion::V0_1_0, config);
        let out = guest.slots();
        assert_eq!(guest.env("proxy_get_configuration", &[out.0, out.1]), 0);
        assert_eq!(guest.returned(out), Some(b"legacy".to_vec()));
        guest.lend(HttpStream::default());
        assert_eq!(guest.env("proxy_continue_request", &[]), 0);
        assert_eq!(guest.env("proxy_continue_response", &[]), 0);
        assert_eq!(guest.env("proxy_clear_route_cache", &[]), 0);
        let requests = guest.instance.take_stream_requests();
        let kinds: Vec<_> = requests.iter().map(|r| (r.stream, r.kind)).collect();
        assert_eq!(
            kinds,
            [
                (StreamType::HttpRequest, StreamRequestKind::Continue),
                (StreamType::HttpResponse, StreamRequestKind::Continue)
            ]
        );
    }

    #[test]
    fn legacy_calls_are_stubs_after_0_1_0() {
        let mut guest = Guest::new();
        let out = guest.slots();
        assert_eq!(
            guest.env("proxy_get_configuration", &[out.0, out.1]),
            crate::abi::Status::Unimplemented as i32
        );
    }
}
