//! `proxy_{get,set}_header_map_pairs`, `proxy_get_header_map_size` and
//! `proxy_{get,add,replace,remove}_header_map_value`.
//!
//! Only HTTP request and response headers exist so far, and only while the
//! effective context's stream is lent to the running callback. Any other valid
//! map type (trailers, gRPC metadata, http-call maps), or a header map outside
//! a stream callback, is "not available": BAD_ARGUMENT, as Envoy answers when
//! it has no such map. A map type outside the enum is BAD_ARGUMENT too.

use wasmtime::Caller;

use super::{Fault, HostResult};
use crate::abi::{AbiVersion, MapType, Status};
use crate::headers::HeaderMap;
use crate::state::HostState;
use crate::{memory, pairs};

fn map_type(raw: i32) -> Result<MapType, Fault> {
    MapType::try_from(raw).map_err(|_| Status::BadArgument.into())
}

fn map(state: &mut HostState, ty: MapType) -> Result<&mut HeaderMap, Fault> {
    let stream = state.stream_mut().ok_or(Status::BadArgument)?;
    match ty {
        MapType::HttpRequestHeaders => Ok(&mut stream.request_headers),
        MapType::HttpResponseHeaders => Ok(&mut stream.response_headers),
        _ => Err(Status::BadArgument.into()),
    }
}

/// Reads a header name from the guest. Names are bytes on the wire; anything
/// that is not UTF-8 is converted lossily (HTTP names are ASCII tokens).
fn read_name(caller: &Caller<'_, HostState>, ptr: i32, len: i32) -> Result<String, Fault> {
    let bytes = memory::read(caller, ptr, len)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `proxy_get_header_map_pairs(type, return_data, return_size)`; an empty map
/// is returned as pointer 0, size 0.
pub(super) fn get_pairs(
    caller: &mut Caller<'_, HostState>,
    ty: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> HostResult {
    let ty = map_type(ty)?;
    let serialized = pairs::serialize(map(caller.data_mut(), ty)?.iter());
    memory::copy_out(caller, &serialized, ptr_ptr, size_ptr)?;
    Ok(())
}

/// `proxy_set_header_map_pairs(type, data, size)`: replaces the whole map.
///
/// Deviation from cpp-host: it parses a malformed buffer as an empty map and so
/// silently wipes every header; we leave the map alone and return BAD_ARGUMENT.
pub(super) fn set_pairs(
    caller: &mut Caller<'_, HostState>,
    ty: i32,
    ptr: i32,
    len: i32,
) -> HostResult {
    let ty = map_type(ty)?;
    let bytes = memory::read(caller, ptr, len)?;
    let target = map(caller.data_mut(), ty)?;
    let new_pairs = pairs::deserialize(&bytes).map_err(|error| {
        tracing::debug!(%error, "proxy_set_header_map_pairs: malformed map");
        Status::BadArgument
    })?;
    *target = new_pairs.into_iter().collect();
    Ok(())
}

/// `proxy_get_header_map_size(type, return_size)`: the serialized size, as
/// the spec defines it (Envoy reports the sum of name and value lengths).
pub(super) fn get_size(caller: &mut Caller<'_, HostState>, ty: i32, size_ptr: i32) -> HostResult {
    let ty = map_type(ty)?;
    let size = pairs::serialized_size(map(caller.data_mut(), ty)?.iter());
    memory::write_u32(caller, size_ptr, u32::try_from(size).unwrap_or(u32::MAX))?;
    Ok(())
}

/// `proxy_get_header_map_value(type, key, key_size, return_value, return_size)`:
/// the first value of `key`. A missing key is NOT_FOUND since ABI 0.2.0; 0.1.0
/// answered OK with an empty value. An empty value is pointer 0, size 0 (the
/// Rust SDK reads that as `Some("")`).
pub(super) fn get_value(
    caller: &mut Caller<'_, HostState>,
    ty: i32,
    key_ptr: i32,
    key_len: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> HostResult {
    let ty = map_type(ty)?;
    let key = read_name(caller, key_ptr, key_len)?;
    let value = map(caller.data_mut(), ty)?.get(&key).map(<[u8]>::to_vec);
    let value = match value {
        Some(value) => value,
        None if caller.data().abi() == AbiVersion::V0_1_0 => Vec::new(),
        None => return Err(Status::NotFound.into()),
    };
    memory::copy_out(caller, &value, ptr_ptr, size_ptr)?;
    Ok(())
}

/// `proxy_add_header_map_value(type, key, key_size, value, value_size)`: appends.
pub(super) fn add_value(
    caller: &mut Caller<'_, HostState>,
    ty: i32,
    key_ptr: i32,
    key_len: i32,
    ptr: i32,
    len: i32,
) -> HostResult {
    let ty = map_type(ty)?;
    let key = read_name(caller, key_ptr, key_len)?;
    let value = memory::read(caller, ptr, len)?;
    map(caller.data_mut(), ty)?.add(&key, &value);
    Ok(())
}

/// `proxy_replace_header_map_value(...)`: add-or-replace.
pub(super) fn replace_value(
    caller: &mut Caller<'_, HostState>,
    ty: i32,
    key_ptr: i32,
    key_len: i32,
    ptr: i32,
    len: i32,
) -> HostResult {
    let ty = map_type(ty)?;
    let key = read_name(caller, key_ptr, key_len)?;
    let value = memory::read(caller, ptr, len)?;
    map(caller.data_mut(), ty)?.replace(&key, &value);
    Ok(())
}

/// `proxy_remove_header_map_value(type, key, key_size)`: OK even if absent.
pub(super) fn remove_value(
    caller: &mut Caller<'_, HostState>,
    ty: i32,
    key_ptr: i32,
    key_len: i32,
) -> HostResult {
    let ty = map_type(ty)?;
    let key = read_name(caller, key_ptr, key_len)?;
    map(caller.data_mut(), ty)?.remove(&key);
    Ok(())
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
        // A valid but unavailable map (trailers are not modelled yet).
        assert_eq!(
            get_value(&mut guest, REQUEST_TRAILERS, "x-a").0,
            BAD_ARGUMENT
        );
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
            BAD_ARGUMENT
        );
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
