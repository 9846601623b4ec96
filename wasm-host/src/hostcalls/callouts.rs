//! Callouts to named upstreams: `proxy_http_call`, `proxy_grpc_call`,
//! `proxy_grpc_stream`, `proxy_grpc_send`, `proxy_grpc_cancel`,
//! `proxy_grpc_close`.
//!
//! The host allocates the token (cpp-host: the kind in the low 2 bits) and
//! hands the request to the embedder's [`Callouts`](crate::Callouts); the
//! answer comes back through the `PluginInstance::on_http_call_response` /
//! `on_grpc_*` methods. Callouts belong to the root context (cpp-host uses
//! the root of the effective context), so answers go to the root context.

use crate::guest::HostContext;
use std::time::Duration;

use super::{Fault, HostResult};
use crate::abi::Status;
use crate::embedder::{CalloutError, Callouts, GrpcCallRequest, HttpCallRequest};
use crate::headers::HeaderMap;
use crate::state::{CalloutKind, HostState};
use crate::{memory, pairs};

fn read_string<G: HostContext>(caller: &G, ptr: i32, len: i32) -> Result<String, Fault<G::Trap>> {
    Ok(String::from_utf8_lossy(&memory::read(caller, ptr, len)?).into_owned())
}

/// A serialized map from the guest; malformed is parsed as empty, as cpp-host does.
fn read_map<G: HostContext>(caller: &G, ptr: i32, len: i32) -> Result<HeaderMap, Fault<G::Trap>> {
    let bytes = memory::read(caller, ptr, len)?;
    Ok(pairs::deserialize(&bytes)
        .unwrap_or_default()
        .into_iter()
        .collect())
}

fn status(error: &CalloutError, unknown_upstream: Status) -> Status {
    match error {
        CalloutError::UnknownUpstream(_) => unknown_upstream,
        CalloutError::UnknownToken(_) => Status::NotFound,
        CalloutError::Internal(_) => Status::InternalFailure,
    }
}

/// Allocates a token, runs `dispatch` with it and writes it to `token_ptr`;
/// without a [`Callouts`] every upstream is unknown.
fn start<G: HostContext>(
    caller: &mut G,
    kind: CalloutKind,
    token_ptr: i32,
    unknown_upstream: Status,
    dispatch: impl FnOnce(&dyn Callouts, u32, u32, u32) -> Result<(), CalloutError>,
) -> HostResult<G::Trap> {
    memory::check(caller, token_ptr, 4)?;
    let state = caller.state_mut();
    let Some(callouts) = state.embedder.callouts.clone() else {
        return Err(unknown_upstream.into());
    };
    let root = state.root_context_id;
    let origin = state.call.effective_context_id;
    let token = state.new_callout(kind);
    if let Err(error) = dispatch(&*callouts, token, root, origin) {
        tracing::debug!(plugin = state.plugin_name(), %error, "callout refused");
        state.callouts.remove(&token);
        return Err(status(&error, unknown_upstream).into());
    }
    memory::write_u32(caller, token_ptr, token)?;
    Ok(())
}

/// `proxy_http_call(upstream, headers, body, trailers, timeout_ms, return_token)`.
/// BAD_ARGUMENT for an unknown upstream or a request without `:method`,
/// `:path` or `:authority` (Envoy's checks).
#[expect(clippy::too_many_arguments, reason = "mirrors the ABI signature")]
pub(crate) fn http_call<G: HostContext>(
    caller: &mut G,
    up_ptr: i32,
    up_len: i32,
    h_ptr: i32,
    h_len: i32,
    b_ptr: i32,
    b_len: i32,
    t_ptr: i32,
    t_len: i32,
    timeout_ms: i32,
    token_ptr: i32,
) -> HostResult<G::Trap> {
    let upstream = read_string(caller, up_ptr, up_len)?;
    let headers = read_map(caller, h_ptr, h_len)?;
    let body = memory::read(caller, b_ptr, b_len)?;
    let trailers = read_map(caller, t_ptr, t_len)?;
    if [":method", ":path", ":authority"]
        .iter()
        .any(|name| headers.get(name).is_none_or(<[u8]>::is_empty))
    {
        return Err(Status::BadArgument.into());
    }
    start(
        caller,
        CalloutKind::Http,
        token_ptr,
        Status::BadArgument,
        |callouts, token, root, origin| {
            callouts.http_call(HttpCallRequest {
                token,
                root_context_id: root,
                context_id: origin,
                upstream,
                headers,
                body,
                trailers,
                timeout: Duration::from_millis(u64::from(timeout_ms as u32)),
            })
        },
    )
}

/// `proxy_grpc_call(upstream, service, method, initial_metadata, message,
/// timeout_ms, return_token)`: PARSE_FAILURE for an unknown upstream (Envoy
/// fails to parse the service config).
#[expect(clippy::too_many_arguments, reason = "mirrors the ABI signature")]
pub(crate) fn grpc_call<G: HostContext>(
    caller: &mut G,
    up_ptr: i32,
    up_len: i32,
    s_ptr: i32,
    s_len: i32,
    m_ptr: i32,
    m_len: i32,
    md_ptr: i32,
    md_len: i32,
    msg_ptr: i32,
    msg_len: i32,
    timeout_ms: i32,
    token_ptr: i32,
) -> HostResult<G::Trap> {
    let upstream = read_string(caller, up_ptr, up_len)?;
    let service = read_string(caller, s_ptr, s_len)?;
    let method = read_string(caller, m_ptr, m_len)?;
    let initial_metadata = read_map(caller, md_ptr, md_len)?;
    let message = memory::read(caller, msg_ptr, msg_len)?;
    start(
        caller,
        CalloutKind::GrpcCall,
        token_ptr,
        Status::ParseFailure,
        |callouts, token, root, origin| {
            callouts.grpc_call(GrpcCallRequest {
                token,
                root_context_id: root,
                context_id: origin,
                upstream,
                service,
                method,
                initial_metadata,
                message,
                timeout: Some(Duration::from_millis(u64::from(timeout_ms as u32))),
                streaming: false,
            })
        },
    )
}

/// `proxy_grpc_stream(upstream, service, method, initial_metadata, return_token)`.
#[expect(clippy::too_many_arguments, reason = "mirrors the ABI signature")]
pub(crate) fn grpc_stream<G: HostContext>(
    caller: &mut G,
    up_ptr: i32,
    up_len: i32,
    s_ptr: i32,
    s_len: i32,
    m_ptr: i32,
    m_len: i32,
    md_ptr: i32,
    md_len: i32,
    token_ptr: i32,
) -> HostResult<G::Trap> {
    let upstream = read_string(caller, up_ptr, up_len)?;
    let service = read_string(caller, s_ptr, s_len)?;
    let method = read_string(caller, m_ptr, m_len)?;
    let initial_metadata = read_map(caller, md_ptr, md_len)?;
    start(
        caller,
        CalloutKind::GrpcStream,
        token_ptr,
        Status::ParseFailure,
        |callouts, token, root, origin| {
            callouts.grpc_call(GrpcCallRequest {
                token,
                root_context_id: root,
                context_id: origin,
                upstream,
                service,
                method,
                initial_metadata,
                message: Vec::new(),
                timeout: None,
                streaming: true,
            })
        },
    )
}

/// The kind of a live gRPC token; BAD_ARGUMENT for an HTTP-call token,
/// NOT_FOUND for one that is not live (Envoy's checks).
fn grpc_token(state: &HostState, token: u32) -> Result<(CalloutKind, &dyn Callouts), Status> {
    if token & 3 == CalloutKind::Http.bits() || token & 3 == 3 {
        return Err(Status::BadArgument);
    }
    let (kind, _) = *state.callouts.get(&token).ok_or(Status::NotFound)?;
    let callouts = state.embedder.callouts.as_deref().ok_or(Status::NotFound)?;
    Ok((kind, callouts))
}

/// `proxy_grpc_send(token, message, message_size, end_of_stream)`: streams only.
pub(crate) fn grpc_send<G: HostContext>(
    caller: &mut G,
    token: i32,
    ptr: i32,
    len: i32,
    end_stream: i32,
) -> HostResult<G::Trap> {
    let message = memory::read(caller, ptr, len)?;
    let token = token as u32;
    let (kind, callouts) = grpc_token(caller.state(), token)?;
    if kind != CalloutKind::GrpcStream {
        return Err(Status::BadArgument.into());
    }
    callouts
        .grpc_send(token, message, end_stream != 0)
        .map_err(|e| status(&e, Status::NotFound).into())
}

/// `proxy_grpc_cancel(token)`: no further callbacks for it.
pub(crate) fn grpc_cancel<G: HostContext>(caller: &mut G, token: i32) -> HostResult<G::Trap> {
    let token = token as u32;
    let (_, callouts) = grpc_token(caller.state(), token)?;
    let result = callouts.grpc_cancel(token);
    caller.state_mut().callouts.remove(&token);
    result.map_err(|e| status(&e, Status::NotFound).into())
}

/// `proxy_grpc_close(token)`: a unary call is cancelled (Envoy); a stream is
/// half-closed and stays live until the embedder delivers its close.
pub(crate) fn grpc_close<G: HostContext>(caller: &mut G, token: i32) -> HostResult<G::Trap> {
    let token = token as u32;
    let (kind, callouts) = grpc_token(caller.state(), token)?;
    if kind == CalloutKind::GrpcCall {
        let result = callouts.grpc_cancel(token);
        caller.state_mut().callouts.remove(&token);
        return result.map_err(|e| status(&e, Status::NotFound).into());
    }
    callouts
        .grpc_close(token)
        .map_err(|e| status(&e, Status::NotFound).into())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use crate::abi::{AbiVersion, Status};
    use crate::embedder::{CalloutError, Callouts, Embedder, GrpcCallRequest, HttpCallRequest};
    use crate::pairs;
    use crate::plugin::PluginConfig;
    use crate::test_guest::{Guest, OUT_OF_BOUNDS};

    /// Knows upstream "up"; records grpc sends.
    #[derive(Default)]
    struct Upstreams {
        sent: Mutex<Vec<u32>>,
    }

    impl Callouts for Upstreams {
        fn http_call(&self, r: HttpCallRequest) -> Result<(), CalloutError> {
            match r.upstream.as_str() {
                "up" => Ok(()),
                "broken" => Err(CalloutError::Internal("down".into())),
                other => Err(CalloutError::UnknownUpstream(other.into())),
            }
        }
        fn grpc_call(&self, r: GrpcCallRequest) -> Result<(), CalloutError> {
            match r.upstream.as_str() {
                "up" => Ok(()),
                other => Err(CalloutError::UnknownUpstream(other.into())),
            }
        }
        fn grpc_send(&self, token: u32, _: Vec<u8>, _: bool) -> Result<(), CalloutError> {
            self.sent.lock().unwrap().push(token);
            Ok(())
        }
        fn grpc_cancel(&self, _: u32) -> Result<(), CalloutError> {
            Ok(())
        }
        fn grpc_close(&self, _: u32) -> Result<(), CalloutError> {
            Ok(())
        }
    }

    fn guest() -> (Guest, Arc<Upstreams>) {
        let upstreams = Arc::new(Upstreams::default());
        let embedder = Embedder {
            callouts: Some(upstreams.clone()),
            ..Default::default()
        };
        let guest = Guest::with_embedder(AbiVersion::V0_2_1, PluginConfig::default(), embedder);
        (guest, upstreams)
    }

    fn http_call(guest: &mut Guest, upstream: &str, headers: &[(&str, &str)]) -> (i32, u32) {
        let (u, ul) = guest.put(upstream.as_bytes());
        let map = pairs::serialize(headers.iter().map(|(k, v)| (*k, v.as_bytes())));
        let (h, hl) = guest.put(&map);
        let (token, _) = guest.slots();
        let status = guest.env("proxy_http_call", &[u, ul, h, hl, 0, 0, 0, 0, 1000, token]);
        (status, guest.read_u32(token))
    }

    const GOOD: &[(&str, &str)] = &[(":method", "GET"), (":path", "/"), (":authority", "a")];

    #[test]
    fn http_call_statuses() {
        let (mut guest, _) = guest();
        let (status, token) = http_call(&mut guest, "up", GOOD);
        assert_eq!(status, 0);
        assert_eq!(token & 3, 0);
        assert_ne!(token, 0);
        let (status, second) = http_call(&mut guest, "up", GOOD);
        assert_eq!(status, 0);
        assert_ne!(second, token, "tokens are never reused");
        assert_eq!(
            http_call(&mut guest, "nowhere", GOOD).0,
            Status::BadArgument as i32
        );
        assert_eq!(
            http_call(&mut guest, "broken", GOOD).0,
            Status::InternalFailure as i32
        );
        // Envoy requires :method, :path and :authority.
        let no_authority = &GOOD[..2];
        assert_eq!(
            http_call(&mut guest, "up", no_authority).0,
            Status::BadArgument as i32
        );
        // A bad token pointer is caught before dispatching (cpp-host would
        // dispatch, then fail to write the token and orphan the call).
        let (u, ul) = guest.put(b"up");
        let map = pairs::serialize(GOOD.iter().map(|(k, v)| (*k, v.as_bytes())));
        let (h, hl) = guest.put(&map);
        let status = guest.env(
            "proxy_http_call",
            &[u, ul, h, hl, 0, 0, 0, 0, 10, OUT_OF_BOUNDS],
        );
        assert_eq!(status, Status::InvalidMemoryAccess as i32);
        // Refused calls leave nothing pending.
        assert_eq!(guest.instance.pending_callouts().len(), 2);

        // Without callouts every upstream is unknown.
        let mut bare = Guest::new();
        assert_eq!(
            http_call(&mut bare, "up", GOOD).0,
            Status::BadArgument as i32
        );
    }

    #[test]
    fn grpc_statuses() {
        let (mut guest, upstreams) = guest();
        let (u, ul) = guest.put(b"up");
        let (bad, badl) = guest.put(b"nowhere");
        let (s, sl) = guest.put(b"svc");
        let (token_ptr, _) = guest.slots();
        let call = |guest: &mut Guest, u: i32, ul: i32| {
            guest.env(
                "proxy_grpc_call",
                &[u, ul, s, sl, s, sl, 0, 0, s, sl, 100, token_ptr],
            )
        };
        assert_eq!(call(&mut guest, bad, badl), Status::ParseFailure as i32);
        assert_eq!(call(&mut guest, u, ul), 0);
        let unary = guest.read_u32(token_ptr) as i32;
        assert_eq!(unary & 3, 1);
        let stream = |guest: &mut Guest| {
            guest.env("proxy_grpc_stream", &[u, ul, s, sl, s, sl, 0, 0, token_ptr])
        };
        assert_eq!(stream(&mut guest), 0);
        let streaming = guest.read_u32(token_ptr) as i32;
        assert_eq!(streaming & 3, 2);

        let send = |guest: &mut Guest, token: i32| guest.env("proxy_grpc_send", &[token, s, sl, 0]);
        assert_eq!(send(&mut guest, streaming), 0);
        assert_eq!(*upstreams.sent.lock().unwrap(), [streaming as u32]);
        assert_eq!(
            send(&mut guest, unary),
            Status::BadArgument as i32,
            "not a stream"
        );
        assert_eq!(
            send(&mut guest, 4),
            Status::BadArgument as i32,
            "an http-call token"
        );
        assert_eq!(send(&mut guest, 0x7fff_fff2), Status::NotFound as i32);

        assert_eq!(guest.env("proxy_grpc_close", &[streaming]), 0);
        assert_eq!(guest.env("proxy_grpc_cancel", &[streaming]), 0);
        assert_eq!(
            guest.env("proxy_grpc_cancel", &[streaming]),
            Status::NotFound as i32
        );
        assert_eq!(
            guest.env("proxy_grpc_close", &[unary]),
            0,
            "closing a call cancels it"
        );
        assert_eq!(
            guest.env("proxy_grpc_close", &[unary]),
            Status::NotFound as i32
        );
        assert!(guest.instance.pending_callouts().is_empty());
    }

    #[test]
    fn get_status_defaults_to_ok_and_empty() {
        let (mut guest, _) = guest();
        let (code, _) = guest.slots();
        let out = guest.slots();
        guest.put(&[0xff; 4]);
        assert_eq!(guest.env("proxy_get_status", &[code, out.0, out.1]), 0);
        assert_eq!(guest.read_u32(code), 0);
        assert_eq!(guest.returned(out), None);
        guest.state().call.status = Some((14, b"unavailable".to_vec()));
        assert_eq!(guest.env("proxy_get_status", &[code, out.0, out.1]), 0);
        assert_eq!(guest.read_u32(code), 14);
        assert_eq!(guest.returned(out), Some(b"unavailable".to_vec()));
        assert_eq!(
            guest.env("proxy_get_status", &[OUT_OF_BOUNDS, out.0, out.1]),
            Status::InvalidMemoryAccess as i32
        );
    }
}
