//! `proxy_get_property`, `proxy_set_property`.
//!
//! A path arrives as segments separated by NUL (the Rust SDK turns
//! `["source", "address"]` into `source\0address`); we look it up by the
//! segments joined with `.`. Known: `plugin_name`, `plugin_root_id`,
//! `plugin_vm_id`, plus whatever the embedder put in
//! [`HttpStream::properties`](crate::HttpStream::properties) and
//! [`HttpStream::connection_properties`](crate::HttpStream::connection_properties)
//! for the stream (or [`TcpConnection::properties`](crate::TcpConnection::properties)) for
//! the stream of the effective context, then what `proxy_set_property` or
//! [`PluginInstance::set_property`](crate::PluginInstance::set_property)
//! stored on the instance. Anything else is NOT_FOUND.
//!
//! `proxy_set_property` writes to the lent stream's properties during a
//! stream callback (Envoy's filter state lives per stream) and to the
//! instance otherwise. The `plugin_*` properties are read-only: BAD_ARGUMENT.

use super::HostResult;
use crate::abi::Status;
use crate::guest::HostContext;
use crate::memory;
use crate::state::HostState;

/// `proxy_get_property(path, path_size, return_value, return_size)`.
pub(crate) fn get<G: HostContext>(
    caller: &mut G,
    path_ptr: i32,
    path_len: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> HostResult<G::Trap> {
    let raw_path = memory::read(caller, path_ptr, path_len)?;
    let path = String::from_utf8_lossy(&raw_path).replace('\0', ".");
    let value = lookup(caller.state(), &path).ok_or(Status::NotFound)?;
    memory::copy_out(caller, &value, ptr_ptr, size_ptr)?;
    Ok(())
}

fn lookup(state: &HostState, path: &str) -> Option<Vec<u8>> {
    let config = state.plugin.config();
    let plugin_value = match path {
        "plugin_name" => Some(&config.name),
        "plugin_root_id" => Some(&config.root_id),
        "plugin_vm_id" => Some(&config.vm_id),
        _ => None,
    };
    if let Some(value) = plugin_value {
        return Some(value.as_bytes().to_vec());
    }
    if let Some(value) = state.stream().and_then(|s| s.property(path)) {
        return Some(value.to_vec());
    }
    let tcp = match &state.call.tcp {
        Some((id, conn)) if *id == state.call.effective_context_id => Some(conn),
        _ => None,
    };
    if let Some(value) = tcp.and_then(|c| c.properties.get(path)) {
        return Some(value.clone());
    }
    state.properties.get(path).cloned()
}

/// `proxy_set_property(path, path_size, value, value_size)`.
pub(crate) fn set<G: HostContext>(
    caller: &mut G,
    path_ptr: i32,
    path_len: i32,
    ptr: i32,
    len: i32,
) -> HostResult<G::Trap> {
    let raw_path = memory::read(caller, path_ptr, path_len)?;
    let value = memory::read(caller, ptr, len)?;
    let path = String::from_utf8_lossy(&raw_path).replace('\0', ".");
    if path.is_empty()
        || matches!(
            path.as_str(),
            "plugin_name" | "plugin_root_id" | "plugin_vm_id"
        )
    {
        return Err(Status::BadArgument.into());
    }
    let state = caller.state_mut();
    if let Some(stream) = state.stream_mut() {
        stream.properties.insert(path, value);
    } else if let Some(conn) = state.tcp_mut() {
        conn.properties.insert(path, value);
    } else {
        state.properties.insert(path, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::abi::{AbiVersion, Status};
    use crate::plugin::PluginConfig;
    use crate::stream::HttpStream;
    use crate::test_guest::{Guest, OUT_OF_BOUNDS};

    fn get(guest: &mut Guest, path: &[u8]) -> (i32, Option<Vec<u8>>) {
        let (ptr, len) = guest.put(path);
        let out = guest.slots();
        let status = guest.env("proxy_get_property", &[ptr, len, out.0, out.1]);
        (status, guest.returned(out))
    }

    #[test]
    fn plugin_and_stream_properties() {
        let mut guest = Guest::with(
            AbiVersion::V0_2_1,
            PluginConfig {
                name: "props".into(),
                root_id: "root".into(),
                vm_id: "vm".into(),
                ..Default::default()
            },
        );
        assert_eq!(
            get(&mut guest, b"plugin_name"),
            (0, Some(b"props".to_vec()))
        );
        assert_eq!(
            get(&mut guest, b"plugin_root_id"),
            (0, Some(b"root".to_vec()))
        );
        assert_eq!(get(&mut guest, b"plugin_vm_id"), (0, Some(b"vm".to_vec())));
        // No stream yet: stream properties are unknown.
        assert_eq!(
            get(&mut guest, b"source\0address"),
            (Status::NotFound as i32, None)
        );

        let mut stream = HttpStream::default();
        stream
            .properties
            .insert("source.address".into(), b"10.0.0.1:1234".to_vec());
        guest.lend(stream);
        assert_eq!(
            get(&mut guest, b"source\0address"),
            (0, Some(b"10.0.0.1:1234".to_vec()))
        );
        assert_eq!(
            get(&mut guest, b"source\0port"),
            (Status::NotFound as i32, None)
        );
        assert_eq!(get(&mut guest, b""), (Status::NotFound as i32, None));

        let out = guest.slots();
        let status = guest.env("proxy_get_property", &[OUT_OF_BOUNDS, 4, out.0, out.1]);
        assert_eq!(status, Status::InvalidMemoryAccess as i32);
    }

    #[test]
    fn set_property_targets_the_stream_or_the_instance() {
        let mut guest = Guest::new();
        let set = |guest: &mut Guest, path: &[u8], value: &[u8]| {
            let (p, pl) = guest.put(path);
            let (v, vl) = guest.put(value);
            guest.env("proxy_set_property", &[p, pl, v, vl])
        };
        assert_eq!(set(&mut guest, b"wisp\0root", b"r"), 0);
        assert_eq!(guest.instance.property("wisp.root"), Some(&b"r"[..]));
        assert_eq!(
            set(&mut guest, b"plugin_name", b"x"),
            Status::BadArgument as i32
        );
        assert_eq!(set(&mut guest, b"", b"x"), Status::BadArgument as i32);
        guest.lend(HttpStream::default());
        assert_eq!(set(&mut guest, b"wisp\0stream", b"s"), 0);
        assert_eq!(guest.stream().properties["wisp.stream"], b"s");
        // Instance properties stay visible from the stream.
        assert_eq!(get(&mut guest, b"wisp\0root"), (0, Some(b"r".to_vec())));
    }

    #[test]
    fn connection_properties_are_shared_and_the_stream_overrides_them() {
        let mut guest = Guest::new();
        let shared: std::collections::HashMap<String, Vec<u8>> = [
            ("source.address".to_owned(), b"10.0.0.1:1234".to_vec()),
            ("request.protocol".to_owned(), b"HTTP/1.1".to_vec()),
        ]
        .into_iter()
        .collect();
        let mut stream = HttpStream {
            connection_properties: Some(std::sync::Arc::new(shared)),
            ..Default::default()
        };
        stream
            .properties
            .insert("request.protocol".into(), b"HTTP/1.0".to_vec());
        guest.lend(stream);
        assert_eq!(
            get(&mut guest, b"source\0address"),
            (0, Some(b"10.0.0.1:1234".to_vec()))
        );
        assert_eq!(
            get(&mut guest, b"request\0protocol"),
            (0, Some(b"HTTP/1.0".to_vec()))
        );
        assert_eq!(
            get(&mut guest, b"source\0port"),
            (Status::NotFound as i32, None)
        );
    }
}
