//! `proxy_{get,set}_header_map_pairs`, `proxy_get_header_map_size` and
//! `proxy_{get,add,replace,remove}_header_map_value`.
//!
//! Which map exists when: HTTP request/response headers and trailers while
//! the effective context's stream is lent; gRPC initial/trailing metadata in
//! the gRPC receive callbacks; http-call response headers/trailers in
//! `proxy_on_http_call_response`. The callout maps are read-only (spec §HTTP
//! fields). A map that does not exist right now, a write to a read-only map,
//! or a type outside the enum is BAD_ARGUMENT, as Envoy answers.
//!
//! Censoring (a wisp addition): the stream's sensitive headers
//! ([`crate::PluginConfig::is_censored`], `authorization` and `cookie` by
//! default) are invisible to the plugin: reads skip them, writes to them are
//! ignored, and `proxy_set_header_map_pairs` keeps them.

use std::borrow::Cow;

use super::{Fault, HostResult};
use crate::abi::{AbiVersion, MapType, Status};
use crate::guest::HostContext;
use crate::headers::HeaderMap;
use crate::state::HostState;
use crate::{memory, pairs};

fn map_type(raw: i32) -> Result<MapType, Status> {
    MapType::try_from(raw).map_err(|_| Status::BadArgument)
}

/// Whether a header callback's write is allowed: callout maps are read-only.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

/// The map of type `ty`, and whether censoring applies to it.
fn map(
    state: &mut HostState,
    ty: MapType,
    access: Access,
) -> Result<(&mut HeaderMap, bool), Status> {
    fn read_only(
        map: Option<&mut HeaderMap>,
        access: Access,
    ) -> Result<(&mut HeaderMap, bool), Status> {
        match (map, access) {
            (Some(map), Access::Read) => Ok((map, false)),
            _ => Err(Status::BadArgument),
        }
    }
    match ty {
        MapType::GrpcCallInitialMetadata => {
            read_only(state.call.grpc_initial_metadata.as_mut(), access)
        }
        MapType::GrpcCallTrailingMetadata => {
            read_only(state.call.grpc_trailing_metadata.as_mut(), access)
        }
        MapType::HttpCallResponseHeaders => read_only(
            state
                .call
                .http_call_response
                .as_mut()
                .map(|r| &mut r.headers),
            access,
        ),
        MapType::HttpCallResponseTrailers => read_only(
            state
                .call
                .http_call_response
                .as_mut()
                .map(|r| &mut r.trailers),
            access,
        ),
        _ => {
            let stream = state.stream_mut().ok_or(Status::BadArgument)?;
            let map = match ty {
                MapType::HttpRequestHeaders => &mut stream.request_headers,
                MapType::HttpResponseHeaders => &mut stream.response_headers,
                MapType::HttpRequestTrailers => &mut stream.request_trailers,
                _ => &mut stream.response_trailers,
            };
            Ok((map, true))
        }
    }
}

/// A header name as the guest passed it, borrowed from guest memory. Names
/// are bytes on the wire; anything that is not UTF-8 is converted lossily
/// (HTTP names are ASCII tokens).
fn name_of(bytes: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

/// The serialized visible entries of a map.
fn visible_pairs<G: HostContext>(caller: &mut G, ty: MapType) -> Result<Vec<u8>, Fault<G::Trap>> {
    let state = caller.state_mut();
    let plugin = state.plugin.clone();
    let (map, censored) = map(state, ty, Access::Read)?;
    let hide = |name: &str| censored && plugin.config().is_censored(name);
    Ok(pairs::serialize(map.iter().filter(|(n, _)| !hide(n))))
}

/// `proxy_get_header_map_pairs(type, return_data, return_size)`; an empty map
/// is returned as pointer 0, size 0.
pub(crate) fn get_pairs<G: HostContext>(
    caller: &mut G,
    ty: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> HostResult<G::Trap> {
    let ty = map_type(ty)?;
    let serialized = visible_pairs(caller, ty)?;
    memory::copy_out(caller, &serialized, ptr_ptr, size_ptr)?;
    Ok(())
}

/// `proxy_set_header_map_pairs(type, data, size)`: replaces the whole map
/// (censored entries stay).
///
/// Deviation from cpp-host: it parses a malformed buffer as an empty map and so
/// silently wipes every header; we leave the map alone and return BAD_ARGUMENT.
pub(crate) fn set_pairs<G: HostContext>(
    caller: &mut G,
    ty: i32,
    ptr: i32,
    len: i32,
) -> HostResult<G::Trap> {
    let ty = map_type(ty)?;
    let bytes = memory::read(caller, ptr, len)?;
    let state = caller.state_mut();
    let plugin = state.plugin.clone();
    let (target, censored) = map(state, ty, Access::Write)?;
    let hide = |name: &str| censored && plugin.config().is_censored(name);
    let new_pairs = pairs::deserialize(&bytes).map_err(|error| {
        tracing::debug!(%error, "proxy_set_header_map_pairs: malformed map");
        Status::BadArgument
    })?;
    let kept: Vec<(String, Vec<u8>)> = target
        .iter()
        .filter(|(n, _)| hide(n))
        .map(|(n, v)| (n.to_owned(), v.to_vec()))
        .collect();
    *target = new_pairs
        .into_iter()
        .filter(|(n, _)| !hide(n))
        .chain(kept)
        .collect();
    Ok(())
}

/// `proxy_get_header_map_size(type, return_size)`: the serialized size, as
/// the spec defines it (Envoy reports the sum of name and value lengths).
pub(crate) fn get_size<G: HostContext>(
    caller: &mut G,
    ty: i32,
    size_ptr: i32,
) -> HostResult<G::Trap> {
    let ty = map_type(ty)?;
    let size = visible_pairs(caller, ty)?.len();
    memory::write_u32(caller, size_ptr, u32::try_from(size).unwrap_or(u32::MAX))?;
    Ok(())
}

/// `proxy_get_header_map_value(type, key, key_size, return_value, return_size)`:
/// the first value of `key`. A missing key is NOT_FOUND since ABI 0.2.0; 0.1.0
/// answered OK with an empty value. An empty value is pointer 0, size 0 (the
/// Rust SDK reads that as `Some("")`).
pub(crate) fn get_value<G: HostContext>(
    caller: &mut G,
    ty: i32,
    key_ptr: i32,
    key_len: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> HostResult<G::Trap> {
    let ty = map_type(ty)?;
    let (memory, state) = caller.memory_and_state_mut();
    let key = name_of(memory::slice(memory, key_ptr, key_len)?);
    let hidden = state.plugin.config().is_censored(&key);
    let (map, censored) = map(state, ty, Access::Read)?;
    // Copied out of the map: handing it over calls the guest's allocator.
    let value = map
        .get(&key)
        .filter(|_| !(censored && hidden))
        .map(<[u8]>::to_vec);
    let value = match value {
        Some(value) => value,
        None if caller.state().abi() == AbiVersion::V0_1_0 => Vec::new(),
        None => return Err(Status::NotFound.into()),
    };
    memory::copy_out(caller, &value, ptr_ptr, size_ptr)?;
    Ok(())
}

/// Where a write's value is: nowhere for a removal.
type ValueArg = Option<(i32, i32)>;

/// Applies `change(map, key, value)` to map `ty` unless the key is censored
/// there. Key and value are read in place from guest memory.
fn modify<G: HostContext>(
    caller: &mut G,
    ty: MapType,
    (key_ptr, key_len): (i32, i32),
    value: ValueArg,
    change: impl FnOnce(&mut HeaderMap, &str, &[u8]),
) -> HostResult<G::Trap> {
    let (memory, state) = caller.memory_and_state_mut();
    let key = name_of(memory::slice(memory, key_ptr, key_len)?);
    let value = match value {
        Some((ptr, len)) => memory::slice(memory, ptr, len)?,
        None => &[],
    };
    let hidden = state.plugin.config().is_censored(&key);
    if hidden && map(state, ty, Access::Write)?.1 {
        tracing::debug!(
            plugin = state.plugin.name(),
            key = &*key,
            "write to a censored header ignored"
        );
        return Ok(());
    }
    let (map, _) = map(state, ty, Access::Write)?;
    change(map, &key, value);
    Ok(())
}

/// `proxy_add_header_map_value(type, key, key_size, value, value_size)`: appends.
pub(crate) fn add_value<G: HostContext>(
    caller: &mut G,
    ty: i32,
    key_ptr: i32,
    key_len: i32,
    ptr: i32,
    len: i32,
) -> HostResult<G::Trap> {
    let ty = map_type(ty)?;
    modify(
        caller,
        ty,
        (key_ptr, key_len),
        Some((ptr, len)),
        HeaderMap::add,
    )
}

/// `proxy_replace_header_map_value(...)`: add-or-replace.
pub(crate) fn replace_value<G: HostContext>(
    caller: &mut G,
    ty: i32,
    key_ptr: i32,
    key_len: i32,
    ptr: i32,
    len: i32,
) -> HostResult<G::Trap> {
    let ty = map_type(ty)?;
    modify(
        caller,
        ty,
        (key_ptr, key_len),
        Some((ptr, len)),
        HeaderMap::replace,
    )
}

/// `proxy_remove_header_map_value(type, key, key_size)`: OK even if absent.
pub(crate) fn remove_value<G: HostContext>(
    caller: &mut G,
    ty: i32,
    key_ptr: i32,
    key_len: i32,
) -> HostResult<G::Trap> {
    let ty = map_type(ty)?;
    modify(caller, ty, (key_ptr, key_len), None, |map, key, _| {
        map.remove(key)
    })
}

#[cfg(test)]
mod tests {
    use crate::abi::{AbiVersion, Status};
    use crate::headers::HeaderMap;
    use crate::pairs;
    use crate::plugin::PluginConfig;
    use crate::stream::HttpStream;
    use crate::test_guest::{AllocMode, Guest, OUT_OF_BOUNDS};

    const REQUEST: i32 = 0;
    const REQUEST_TRAILERS: i32 = 1;
    const RESPONSE: i32 = 2;
    const OK: i32 = Status::Ok as i32;
    const NOT_FOUND: i32 = Status::NotFound as i32;
    const BAD_ARGUMENT: i32 = Status::BadArgument as i32;
    const INVALID_MEMORY: i32 = Status::InvalidMemoryAccess as i32;

    fn guest_with_headers(abi: AbiVersion) -> Guest {
        let config = PluginConfig {
            name: "maps".into(),
            ..Default::default()
        };
        let mut guest = Guest::with(abi, config);
        guest.lend(HttpStream {
            request_headers: [(":path", "/"), ("x-a", "1"), ("x-empty", ""), ("x-a", "2")]
                .into_iter()
                .collect(),
            ..Default::default()
        });
        guest
    }

    fn get_value(guest: &mut Guest, map: i32, key: &str) -> (i32, Option<Vec<u8>>) {
        let (key_ptr, key_len) = guest.put(key.as_bytes());
        let out = guest.slots();
        let status = guest.env(
            "proxy_get_header_map_value",
            &[map, key_ptr, key_len, out.0, out.1],
        );
        (status, guest.returned(out))
    }

    #[test]
    fn get_value_returns_the_first_value() {
        let mut guest = guest_with_headers(AbiVersion::V0_2_1);
        assert_eq!(
            get_value(&mut guest, REQUEST, "X-A"),
            (OK, Some(b"1".to_vec()))
        );
    }

    #[test]
    fn missing_header_is_not_found_since_0_2_0_and_empty_before() {
        let mut guest = guest_with_headers(AbiVersion::V0_2_1);
        assert_eq!(
            get_value(&mut guest, REQUEST, "x-missing"),
            (NOT_FOUND, None)
        );
        let mut guest = guest_with_headers(AbiVersion::V0_2_0);
        assert_eq!(
            get_value(&mut guest, REQUEST, "x-missing"),
            (NOT_FOUND, None)
        );
        let mut guest = guest_with_headers(AbiVersion::V0_1_0);
        assert_eq!(get_value(&mut guest, REQUEST, "x-missing"), (OK, None));
    }

    #[test]
    fn empty_value_is_pointer_zero_without_allocating() {
        let mut guest = guest_with_headers(AbiVersion::V0_2_1);
        assert_eq!(get_value(&mut guest, REQUEST, "x-empty"), (OK, None));
        assert_eq!(guest.allocations(), 0);
    }

    #[test]
    fn get_value_checks_type_then_memory_then_availability() {
        let mut guest = guest_with_headers(AbiVersion::V0_2_1);
        let out = guest.slots();
        // Unknown map type wins over a bad key pointer, as in cpp-host.
        assert_eq!(
            guest.env(
                "proxy_get_header_map_value",
                &[8, OUT_OF_BOUNDS, 4, out.0, out.1]
            ),
            BAD_ARGUMENT
        );
        assert_eq!(
            guest.env("proxy_get_header_map_value", &[-1, 0, 0, out.0, out.1]),
            BAD_ARGUMENT
        );
        assert_eq!(
            guest.env(
                "proxy_get_header_map_value",
                &[REQUEST, OUT_OF_BOUNDS, 4, out.0, out.1]
            ),
            INVALID_MEMORY
        );
        assert_eq!(
            guest.env(
                "proxy_get_header_map_value",
                &[REQUEST, -4, 8, out.0, out.1]
            ),
            INVALID_MEMORY
        );
        // Trailers exist (empty here); callout maps do not outside their callbacks.
        assert_eq!(get_value(&mut guest, REQUEST_TRAILERS, "x-a").0, NOT_FOUND);
        for map in [4, 5, 6, 7] {
            assert_eq!(get_value(&mut guest, map, "x-a").0, BAD_ARGUMENT, "{map}");
        }
    }

    #[test]
    fn bad_out_pointers_fail_before_allocating() {
        let mut guest = guest_with_headers(AbiVersion::V0_2_1);
        let (key_ptr, key_len) = guest.put(b"x-a");
        let (_, size_ptr) = guest.slots();
        let status = guest.env(
            "proxy_get_header_map_value",
            &[REQUEST, key_ptr, key_len, OUT_OF_BOUNDS, size_ptr],
        );
        assert_eq!(status, INVALID_MEMORY);
        assert_eq!(guest.allocations(), 0);
    }

    #[test]
    fn allocator_failures_are_invalid_memory_access_and_traps_propagate() {
        let mut guest = guest_with_headers(AbiVersion::V0_2_1);
        guest.set_alloc_mode(AllocMode::Null);
        assert_eq!(get_value(&mut guest, REQUEST, "x-a").0, INVALID_MEMORY);
        guest.set_alloc_mode(AllocMode::Bogus);
        assert_eq!(get_value(&mut guest, REQUEST, "x-a").0, INVALID_MEMORY);
        guest.set_alloc_mode(AllocMode::Trap);
        let (key_ptr, key_len) = guest.put(b"x-a");
        let out = guest.slots();
        let args = [REQUEST, key_ptr, key_len, out.0, out.1].map(wasmtime::Val::I32);
        let error = guest
            .try_call("env", "proxy_get_header_map_value", &args)
            .unwrap_err();
        assert!(format!("{error:?}").contains("unreachable"), "{error:?}");
        guest.set_alloc_mode(AllocMode::Normal);
        assert_eq!(
            get_value(&mut guest, REQUEST, "x-a"),
            (OK, Some(b"1".to_vec()))
        );
    }

    #[test]
    fn no_stream_means_no_header_maps() {
        let mut guest = Guest::new();
        assert_eq!(get_value(&mut guest, REQUEST, "x-a").0, BAD_ARGUMENT);
        let out = guest.slots();
        assert_eq!(
            guest.env("proxy_get_header_map_pairs", &[RESPONSE, out.0, out.1]),
            BAD_ARGUMENT
        );
    }

    #[test]
    fn add_replace_remove() {
        let mut guest = guest_with_headers(AbiVersion::V0_2_1);
        let (k, kl) = guest.put(b"X-New");
        let (v, vl) = guest.put(b"v1");
        assert_eq!(
            guest.env("proxy_add_header_map_value", &[REQUEST, k, kl, v, vl]),
            OK
        );
        assert_eq!(
            guest.env("proxy_add_header_map_value", &[REQUEST, k, kl, v, vl]),
            OK
        );
        assert_eq!(guest.stream().request_headers.get_all("x-new").count(), 2);

        // replace = add-or-replace: collapses duplicates, adds a missing name.
        let (a, al) = guest.put(b"x-a");
        let (r, rl) = guest.put(b"replaced");
        assert_eq!(
            guest.env("proxy_replace_header_map_value", &[REQUEST, a, al, r, rl]),
            OK
        );
        assert_eq!(
            guest
                .stream()
                .request_headers
                .get_all("x-a")
                .collect::<Vec<_>>(),
            [b"replaced"]
        );
        let (m, ml) = guest.put(b"x-made");
        assert_eq!(
            guest.env("proxy_replace_header_map_value", &[REQUEST, m, ml, r, rl]),
            OK
        );
        assert_eq!(
            guest.stream().request_headers.get("x-made"),
            Some(&b"replaced"[..])
        );

        // remove: OK even if absent.
        assert_eq!(
            guest.env("proxy_remove_header_map_value", &[REQUEST, a, al]),
            OK
        );
        assert_eq!(
            guest.env("proxy_remove_header_map_value", &[REQUEST, a, al]),
            OK
        );
        assert!(!guest.stream().request_headers.contains("x-a"));

        // Response headers are a separate map.
        assert_eq!(
            guest.env("proxy_add_header_map_value", &[RESPONSE, k, kl, v, vl]),
            OK
        );
        assert_eq!(
            guest.stream().response_headers.get("x-new"),
            Some(&b"v1"[..])
        );

        assert_eq!(
            guest.env(
                "proxy_add_header_map_value",
                &[REQUEST, k, kl, OUT_OF_BOUNDS, 1]
            ),
            INVALID_MEMORY
        );
        assert_eq!(
            guest.env("proxy_add_header_map_value", &[9, k, kl, v, vl]),
            BAD_ARGUMENT
        );
        assert_eq!(
            guest.env(
                "proxy_remove_header_map_value",
                &[REQUEST, OUT_OF_BOUNDS, 1]
            ),
            INVALID_MEMORY
        );
        assert_eq!(
            guest.env("proxy_remove_header_map_value", &[REQUEST_TRAILERS, k, kl]),
            OK
        );
        assert_eq!(
            guest.env("proxy_remove_header_map_value", &[6, k, kl]),
            BAD_ARGUMENT
        );
    }

    #[test]
    fn trailers_are_maps_of_the_stream() {
        let mut guest = guest_with_headers(AbiVersion::V0_2_1);
        let (k, kl) = guest.put(b"grpc-status");
        let (v, vl) = guest.put(b"0");
        assert_eq!(
            guest.env(
                "proxy_add_header_map_value",
                &[REQUEST_TRAILERS, k, kl, v, vl]
            ),
            OK
        );
        assert_eq!(
            guest.env("proxy_add_header_map_value", &[3, k, kl, v, vl]),
            OK
        );
        assert_eq!(
            guest.stream().request_trailers.get("grpc-status"),
            Some(&b"0"[..])
        );
        assert_eq!(guest.stream().response_trailers.len(), 1);
    }

    #[test]
    fn sensitive_headers_are_censored_unless_allowed() {
        let stream = || HttpStream {
            request_headers: [
                ("authorization", "Bearer x"),
                ("cookie", "a=b"),
                ("x-a", "1"),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        let mut guest = Guest::with(AbiVersion::V0_2_1, PluginConfig::default());
        guest.lend(stream());
        assert_eq!(
            get_value(&mut guest, REQUEST, "Authorization"),
            (NOT_FOUND, None)
        );
        assert_eq!(get_value(&mut guest, REQUEST, "cookie"), (NOT_FOUND, None));
        let out = guest.slots();
        assert_eq!(
            guest.env("proxy_get_header_map_pairs", &[REQUEST, out.0, out.1]),
            OK
        );
        let pairs = pairs::deserialize(&guest.returned(out).unwrap()).unwrap();
        assert_eq!(pairs, vec![("x-a".to_owned(), b"1".to_vec())]);
        let (size, _) = guest.slots();
        assert_eq!(guest.env("proxy_get_header_map_size", &[REQUEST, size]), OK);
        assert_eq!(
            guest.read_u32(size) as usize,
            pairs::serialize([("x-a", &b"1"[..])]).len()
        );
        // Writes to censored names are ignored; replacing the map keeps them.
        let (k, kl) = guest.put(b"authorization");
        assert_eq!(
            guest.env("proxy_remove_header_map_value", &[REQUEST, k, kl]),
            OK
        );
        let new = pairs::serialize([("x-b", &b"2"[..]), ("cookie", b"evil")]);
        let (p, pl) = guest.put(&new);
        assert_eq!(
            guest.env("proxy_set_header_map_pairs", &[REQUEST, p, pl]),
            OK
        );
        let map: Vec<(String, String)> = guest
            .stream()
            .request_headers
            .iter()
            .map(|(n, v)| (n.to_owned(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        let expected = [
            ("x-b", "2"),
            ("authorization", "Bearer x"),
            ("cookie", "a=b"),
        ];
        assert_eq!(map, expected.map(|(n, v)| (n.to_owned(), v.to_owned())));

        let allowed = PluginConfig {
            allowed_sensitive_headers: vec!["authorization".into()],
            ..Default::default()
        };
        let mut guest = Guest::with(AbiVersion::V0_2_1, allowed);
        guest.lend(stream());
        assert_eq!(
            get_value(&mut guest, REQUEST, "authorization"),
            (OK, Some(b"Bearer x".to_vec()))
        );
        assert_eq!(get_value(&mut guest, REQUEST, "cookie"), (NOT_FOUND, None));
    }

    #[test]
    fn get_pairs_serializes_the_map_and_size_matches() {
        let mut guest = guest_with_headers(AbiVersion::V0_2_1);
        let out = guest.slots();
        assert_eq!(
            guest.env("proxy_get_header_map_pairs", &[REQUEST, out.0, out.1]),
            OK
        );
        let bytes = guest.returned(out).expect("a non-empty map");
        let expected = guest.stream().request_headers.clone();
        let back: HeaderMap = pairs::deserialize(&bytes).unwrap().into_iter().collect();
        assert_eq!(back, expected);

        let (size_ptr, _) = guest.slots();
        assert_eq!(
            guest.env("proxy_get_header_map_size", &[REQUEST, size_ptr]),
            OK
        );
        assert_eq!(guest.read_u32(size_ptr) as usize, bytes.len());
        assert_eq!(
            guest.env("proxy_get_header_map_size", &[REQUEST, OUT_OF_BOUNDS]),
            INVALID_MEMORY
        );
        assert_eq!(
            guest.env("proxy_get_header_map_size", &[8, size_ptr]),
            BAD_ARGUMENT
        );
    }

    #[test]
    fn empty_map_is_pointer_zero_size_zero() {
        let mut guest = guest_with_headers(AbiVersion::V0_2_1);
        let out = guest.slots();
        assert_eq!(
            guest.env("proxy_get_header_map_pairs", &[RESPONSE, out.0, out.1]),
            OK
        );
        assert_eq!(guest.returned(out), None);
        assert_eq!(guest.allocations(), 0);
        let (size_ptr, _) = guest.slots();
        assert_eq!(
            guest.env("proxy_get_header_map_size", &[RESPONSE, size_ptr]),
            OK
        );
        assert_eq!(guest.read_u32(size_ptr), 0);
    }

    #[test]
    fn set_pairs_replaces_the_map() {
        let mut guest = guest_with_headers(AbiVersion::V0_2_1);
        let new = pairs::serialize([("X-One", &b"1"[..]), ("x-two", b"2")]);
        let (ptr, len) = guest.put(&new);
        assert_eq!(
            guest.env("proxy_set_header_map_pairs", &[REQUEST, ptr, len]),
            OK
        );
        let expected: HeaderMap = [("x-one", "1"), ("x-two", "2")].into_iter().collect();
        assert_eq!(guest.stream().request_headers, expected);

        // The Rust SDK sends an empty map as a zero count.
        let (ptr, len) = guest.put(&[0, 0, 0, 0]);
        assert_eq!(
            guest.env("proxy_set_header_map_pairs", &[REQUEST, ptr, len]),
            OK
        );
        assert!(guest.stream().request_headers.is_empty());
    }

    #[test]
    fn set_pairs_refuses_malformed_maps_and_keeps_the_headers() {
        let mut guest = guest_with_headers(AbiVersion::V0_2_1);
        let before = guest.stream().request_headers.clone();
        let mut bad = pairs::serialize([("k", &b"v"[..])]);
        bad.pop();
        let (ptr, len) = guest.put(&bad);
        assert_eq!(
            guest.env("proxy_set_header_map_pairs", &[REQUEST, ptr, len]),
            BAD_ARGUMENT
        );
        assert_eq!(guest.stream().request_headers, before);
        assert_eq!(
            guest.env("proxy_set_header_map_pairs", &[REQUEST, OUT_OF_BOUNDS, 8]),
            INVALID_MEMORY
        );
    }
}
