//! `proxy_call_foreign_function(name, args, return_results)`: runs a function
//! the embedder registered in [`Embedder::foreign_functions`](crate::Embedder);
//! NOT_FOUND for any other name, as cpp-host.

use super::HostResult;
use crate::abi::Status;
use crate::guest::HostContext;
use crate::memory;

pub(crate) fn call<G: HostContext>(
    caller: &mut G,
    n_ptr: i32,
    n_len: i32,
    a_ptr: i32,
    a_len: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> HostResult<G::Trap> {
    let name = String::from_utf8_lossy(&memory::read(caller, n_ptr, n_len)?).into_owned();
    let args = memory::read(caller, a_ptr, a_len)?;
    memory::check(caller, ptr_ptr, 4)?;
    memory::check(caller, size_ptr, 4)?;
    let function = caller
        .state()
        .embedder
        .foreign_functions
        .get(&name)
        .cloned()
        .ok_or(Status::NotFound)?;
    let result = function(&args)?;
    memory::copy_out(caller, &result, ptr_ptr, size_ptr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::abi::{AbiVersion, Status};
    use crate::embedder::Embedder;
    use crate::plugin::PluginConfig;
    use crate::test_guest::Guest;

    #[test]
    fn foreign_functions() {
        let mut embedder = Embedder::default();
        embedder.foreign_functions.insert(
            "reverse".into(),
            Arc::new(|args: &[u8]| Ok(args.iter().rev().copied().collect())),
        );
        embedder.foreign_functions.insert(
            "fails".into(),
            Arc::new(|_: &[u8]| Err(Status::SerializationFailure)),
        );
        let mut guest = Guest::with_embedder(AbiVersion::V0_2_1, PluginConfig::default(), embedder);
        let (a, al) = guest.put(b"abc");
        let out = guest.slots();
        let call = |guest: &mut Guest, name: &[u8]| {
            let (n, nl) = guest.put(name);
            guest.env("proxy_call_foreign_function", &[n, nl, a, al, out.0, out.1])
        };
        assert_eq!(call(&mut guest, b"reverse"), 0);
        assert_eq!(guest.returned(out), Some(b"cba".to_vec()));
        assert_eq!(
            call(&mut guest, b"fails"),
            Status::SerializationFailure as i32
        );
        assert_eq!(call(&mut guest, b"missing"), Status::NotFound as i32);
    }
}
