//! Stream control: `proxy_send_local_response`, `proxy_continue_stream`,
//! `proxy_close_stream`, and `proxy_get_status` (the outcome of the callout
//! whose callback is running).

use super::HostResult;
use crate::abi::{Status, StreamType};
use crate::guest::HostContext;
use crate::state::HostState;
use crate::stream::{LocalResponse, StreamRequest, StreamRequestKind};
use crate::{memory, pairs};

/// `proxy_send_local_response(status, details, details_size, body, body_size,
/// headers, headers_size, grpc_status)`: records the reply on the stream.
///
/// As in Envoy: always OK once the memory is readable; the first reply of a
/// stream wins; malformed header pairs are dropped (cpp-host parses them as an
/// empty map); outside a stream callback nothing happens. The header callback
/// that sent it then reports [`Action::Pause`](crate::Action::Pause)
/// whatever the plugin returns.
#[expect(clippy::too_many_arguments, reason = "mirrors the ABI signature")]
pub(crate) fn send_local_response<G: HostContext>(
    caller: &mut G,
    status: i32,
    details_ptr: i32,
    details_len: i32,
    body_ptr: i32,
    body_len: i32,
    headers_ptr: i32,
    headers_len: i32,
    grpc_status: i32,
) -> HostResult<G::Trap> {
    let details = memory::read(caller, details_ptr, details_len)?;
    let body = memory::read(caller, body_ptr, body_len)?;
    let raw_headers = memory::read(caller, headers_ptr, headers_len)?;
    // Deviation: Envoy casts any u32 to its status enum; one that does not fit
    // an HTTP status line is refused here.
    let status = u16::try_from(status as u32).map_err(|_| Status::BadArgument)?;

    let state = caller.state_mut();
    let plugin = state.plugin.clone();
    let Some(stream) = state.stream_mut() else {
        tracing::debug!(
            plugin = plugin.name(),
            "proxy_send_local_response outside an HTTP stream; ignored"
        );
        return Ok(());
    };
    if stream.local_response.is_some() {
        tracing::debug!(
            plugin = plugin.name(),
            "second proxy_send_local_response on a stream; ignored"
        );
        return Ok(());
    }
    let headers = pairs::deserialize(&raw_headers).unwrap_or_else(|error| {
        tracing::warn!(plugin = plugin.name(), %error, "local response headers are malformed; dropping them");
        Vec::new()
    });
    stream.local_response = Some(LocalResponse {
        status,
        details: String::from_utf8_lossy(&details).into_owned(),
        body,
        headers: headers
            .into_iter()
            .map(|(mut name, value)| {
                name.make_ascii_lowercase();
                (name, value)
            })
            .collect(),
        grpc_status,
    });
    state.call.local_response_sent = true;
    Ok(())
}

/// `proxy_continue_stream(type)`: recorded for the embedder. Resuming TCP
/// streams is unimplemented.
pub(crate) fn continue_stream<G: HostContext>(caller: &mut G, ty: i32) -> HostResult<G::Trap> {
    let stream = StreamType::try_from(ty).map_err(|_| Status::BadArgument)?;
    if matches!(stream, StreamType::Downstream | StreamType::Upstream) {
        return Err(Status::Unimplemented.into());
    }
    record(caller.state_mut(), stream, StreamRequestKind::Continue);
    Ok(())
}

/// `proxy_close_stream(type)`: recorded for the embedder.
pub(crate) fn close_stream<G: HostContext>(caller: &mut G, ty: i32) -> HostResult<G::Trap> {
    let stream = StreamType::try_from(ty).map_err(|_| Status::BadArgument)?;
    record(caller.state_mut(), stream, StreamRequestKind::Close);
    Ok(())
}

/// `proxy_get_status(return_code, return_message, return_message_size)`:
/// in `proxy_on_http_call_response` 0 (success) or 11 (BrokenConnection,
/// with the reason) as Envoy reports; in `proxy_on_grpc_close` the gRPC
/// status and message. Elsewhere Envoy's defaults: 0 and an empty message.
pub(crate) fn get_status<G: HostContext>(
    caller: &mut G,
    code_ptr: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> HostResult<G::Trap> {
    let (code, message) = caller.state().call.status.clone().unwrap_or_default();
    memory::check(caller, code_ptr, 4)?;
    memory::copy_out(caller, &message, ptr_ptr, size_ptr)?;
    memory::write_u32(caller, code_ptr, code)?;
    Ok(())
}

pub(crate) fn record(state: &mut HostState, stream: StreamType, kind: StreamRequestKind) {
    let context_id = state.call.effective_context_id;
    tracing::debug!(
        plugin = state.plugin_name(),
        context_id,
        ?stream,
        ?kind,
        "stream request recorded"
    );
    state.stream_requests.push(StreamRequest {
        context_id,
        stream,
        kind,
    });
}

#[cfg(test)]
mod tests {
    use crate::abi::{Status, StreamType};
    use crate::pairs;
    use crate::stream::{HttpStream, LocalResponse, StreamRequest, StreamRequestKind};
    use crate::test_guest::{Guest, OUT_OF_BOUNDS};

    /// Sends a local response with the given raw header bytes.
    fn send(guest: &mut Guest, status: i32, headers: &[u8]) -> i32 {
        let (d, dl) = guest.put(b"my_details");
        let (b, bl) = guest.put(b"go away\n");
        let (h, hl) = guest.put(headers);
        guest.env(
            "proxy_send_local_response",
            &[status, d, dl, b, bl, h, hl, -1],
        )
    }

    #[test]
    fn local_response_is_recorded_on_the_stream() {
        let mut guest = Guest::new();
        guest.lend(HttpStream::default());
        let headers = pairs::serialize([("X-Reason", &b"test"[..])]);
        assert_eq!(send(&mut guest, 403, &headers), 0);
        assert_eq!(
            guest.stream().local_response,
            Some(LocalResponse {
                status: 403,
                details: "my_details".into(),
                body: b"go away\n".to_vec(),
                headers: vec![("x-reason".into(), b"test".to_vec())],
                grpc_status: -1,
            })
        );
        assert!(guest.state().call.local_response_sent);

        // The first reply wins; later ones are accepted and ignored.
        assert_eq!(send(&mut guest, 500, &[]), 0);
        assert_eq!(
            guest.stream().local_response.as_ref().map(|r| r.status),
            Some(403)
        );
    }

    #[test]
    fn local_response_edge_cases() {
        let mut guest = Guest::new();
        // Outside a stream: OK and nothing happens (Envoy's root context).
        assert_eq!(send(&mut guest, 403, &[]), 0);
        assert!(!guest.state().call.local_response_sent);

        guest.lend(HttpStream::default());
        // Null pointers with zero sizes are fine (the SDK passes null details).
        assert_eq!(
            guest.env("proxy_send_local_response", &[200, 0, 0, 0, 0, 0, 0, -1]),
            0
        );
        assert_eq!(
            guest.stream().local_response.take().map(|r| r.body),
            Some(Vec::new())
        );

        assert_eq!(send(&mut guest, 70_000, &[]), Status::BadArgument as i32);
        let status = guest.env(
            "proxy_send_local_response",
            &[403, 0, 0, OUT_OF_BOUNDS, 5, 0, 0, -1],
        );
        assert_eq!(status, Status::InvalidMemoryAccess as i32);
        assert_eq!(guest.stream().local_response, None);

        // Malformed header pairs are dropped, the reply still goes out.
        assert_eq!(send(&mut guest, 401, &[1, 0, 0]), 0);
        let reply = guest.stream().local_response.clone().unwrap();
        assert_eq!((reply.status, reply.headers), (401, vec![]));
    }

    #[test]
    fn continue_and_close_are_recorded() {
        let mut guest = Guest::new();
        let id = guest.lend(HttpStream::default());
        assert_eq!(guest.env("proxy_continue_stream", &[0]), 0);
        assert_eq!(guest.env("proxy_close_stream", &[1]), 0);
        assert_eq!(guest.env("proxy_close_stream", &[2]), 0);
        assert_eq!(
            guest.env("proxy_continue_stream", &[2]),
            Status::Unimplemented as i32
        );
        assert_eq!(
            guest.env("proxy_continue_stream", &[4]),
            Status::BadArgument as i32
        );
        assert_eq!(
            guest.env("proxy_close_stream", &[-1]),
            Status::BadArgument as i32
        );
        let request = |stream, kind| StreamRequest {
            context_id: id,
            stream,
            kind,
        };
        assert_eq!(
            guest.instance.take_stream_requests(),
            [
                request(StreamType::HttpRequest, StreamRequestKind::Continue),
                request(StreamType::HttpResponse, StreamRequestKind::Close),
                request(StreamType::Downstream, StreamRequestKind::Close),
            ]
        );
        assert!(guest.instance.take_stream_requests().is_empty());
    }
}
