//! Shared data and shared queues: `proxy_{get,set}_shared_data`,
//! `proxy_{register,resolve}_shared_queue`, `proxy_{enqueue,dequeue}_shared_queue`.
//! The stores themselves are in [`crate::shared`].

use super::HostResult;
use crate::abi::Status;
use crate::guest::HostContext;
use crate::{memory, shared};

fn vm_id<G: HostContext>(caller: &G) -> String {
    caller.state().plugin.config().vm_id.clone()
}

/// `proxy_get_shared_data(key, key_size, return_value, return_size, return_cas)`.
pub(crate) fn get_data<G: HostContext>(
    caller: &mut G,
    k_ptr: i32,
    k_len: i32,
    ptr_ptr: i32,
    size_ptr: i32,
    cas_ptr: i32,
) -> HostResult<G::Trap> {
    let key = memory::read(caller, k_ptr, k_len)?;
    memory::check(caller, cas_ptr, 4)?;
    let (value, cas) = shared::get_data(&vm_id(caller), &key).ok_or(Status::NotFound)?;
    memory::copy_out(caller, &value, ptr_ptr, size_ptr)?;
    memory::write_u32(caller, cas_ptr, cas)?;
    Ok(())
}

/// `proxy_set_shared_data(key, key_size, value, value_size, cas)`.
pub(crate) fn set_data<G: HostContext>(
    caller: &mut G,
    k_ptr: i32,
    k_len: i32,
    v_ptr: i32,
    v_len: i32,
    cas: i32,
) -> HostResult<G::Trap> {
    let key = memory::read(caller, k_ptr, k_len)?;
    let value = memory::read(caller, v_ptr, v_len)?;
    let max = caller.state().plugin.config().limits.shared_data_max_bytes;
    shared::set_data(&vm_id(caller), &key, &value, cas as u32, max).map_err(|status| {
        if status == Status::InternalFailure {
            tracing::warn!(
                plugin = caller.state().plugin_name(),
                "shared data of vm_id {:?} would exceed its {max}-byte cap; write refused",
                vm_id(caller)
            );
        }
        status.into()
    })
}

/// `proxy_register_shared_queue(name, name_size, return_id)`: this
/// instance's root context gets `proxy_on_queue_ready` for it.
pub(crate) fn register_queue<G: HostContext>(
    caller: &mut G,
    n_ptr: i32,
    n_len: i32,
    id_ptr: i32,
) -> HostResult<G::Trap> {
    let name = memory::read(caller, n_ptr, n_len)?;
    memory::check(caller, id_ptr, 4)?;
    let owner = caller.state().queue_owner.clone();
    let id = shared::register_queue(&vm_id(caller), &name, &owner);
    memory::write_u32(caller, id_ptr, id)?;
    Ok(())
}

/// `proxy_resolve_shared_queue(vm_id, vm_id_size, name, name_size, return_id)`:
/// NOT_FOUND if nobody registered it. An empty vm_id means this plugin's own.
pub(crate) fn resolve_queue<G: HostContext>(
    caller: &mut G,
    vm_ptr: i32,
    vm_len: i32,
    n_ptr: i32,
    n_len: i32,
    id_ptr: i32,
) -> HostResult<G::Trap> {
    let vm = memory::read(caller, vm_ptr, vm_len)?;
    let name = memory::read(caller, n_ptr, n_len)?;
    let vm = if vm.is_empty() {
        vm_id(caller)
    } else {
        String::from_utf8_lossy(&vm).into_owned()
    };
    let id = shared::resolve_queue(&vm, &name).ok_or(Status::NotFound)?;
    memory::write_u32(caller, id_ptr, id)?;
    Ok(())
}

/// `proxy_enqueue_shared_queue(id, value, value_size)`.
pub(crate) fn enqueue<G: HostContext>(
    caller: &mut G,
    id: i32,
    ptr: i32,
    len: i32,
) -> HostResult<G::Trap> {
    let value = memory::read(caller, ptr, len)?;
    shared::enqueue(id as u32, value)?;
    Ok(())
}

/// `proxy_dequeue_shared_queue(id, return_value, return_size)`: EMPTY when
/// nothing is queued.
pub(crate) fn dequeue<G: HostContext>(
    caller: &mut G,
    id: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> HostResult<G::Trap> {
    memory::check(caller, ptr_ptr, 4)?;
    memory::check(caller, size_ptr, 4)?;
    let value = shared::dequeue(id as u32)?;
    memory::copy_out(caller, &value, ptr_ptr, size_ptr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::abi::{AbiVersion, Status};
    use crate::limits::ResourceLimits;
    use crate::plugin::PluginConfig;
    use crate::test_guest::{Guest, OUT_OF_BOUNDS};

    fn guest(vm_id: &str) -> Guest {
        let config = PluginConfig {
            vm_id: vm_id.into(),
            limits: ResourceLimits {
                shared_data_max_bytes: 64,
                ..Default::default()
            },
            ..Default::default()
        };
        Guest::with(AbiVersion::V0_2_1, config)
    }

    #[test]
    fn shared_data_statuses() {
        let mut guest = guest("hostcall-shared");
        let (k, kl) = guest.put(b"key");
        let (v, vl) = guest.put(b"value");
        let out = guest.slots();
        let (cas, _) = guest.slots();
        let get =
            |guest: &mut Guest| guest.env("proxy_get_shared_data", &[k, kl, out.0, out.1, cas]);
        assert_eq!(get(&mut guest), Status::NotFound as i32);
        assert_eq!(guest.env("proxy_set_shared_data", &[k, kl, v, vl, 0]), 0);
        assert_eq!(get(&mut guest), 0);
        assert_eq!(guest.returned(out), Some(b"value".to_vec()));
        let current = guest.read_u32(cas) as i32;
        assert_ne!(current, 0);
        assert_eq!(
            guest.env(
                "proxy_set_shared_data",
                &[k, kl, v, vl, current.wrapping_add(1)]
            ),
            Status::CasMismatch as i32
        );
        assert_eq!(
            guest.env("proxy_set_shared_data", &[k, kl, v, vl, current]),
            0
        );
        // Past the 64-byte cap.
        let (big, bigl) = guest.put(&[b'x'; 100]);
        assert_eq!(
            guest.env("proxy_set_shared_data", &[k, kl, big, bigl, 0]),
            Status::InternalFailure as i32
        );
        // An empty value deletes.
        assert_eq!(guest.env("proxy_set_shared_data", &[k, kl, 0, 0, 0]), 0);
        assert_eq!(get(&mut guest), Status::NotFound as i32);
        assert_eq!(
            guest.env(
                "proxy_get_shared_data",
                &[k, kl, out.0, out.1, OUT_OF_BOUNDS]
            ),
            Status::InvalidMemoryAccess as i32
        );
    }

    #[test]
    fn queue_statuses() {
        let mut guest = guest("hostcall-queue");
        let (n, nl) = guest.put(b"q");
        let (vm, vml) = guest.put(b"hostcall-queue");
        let (id_ptr, _) = guest.slots();
        let resolve = |guest: &mut Guest, vm: i32, vml: i32| {
            guest.env("proxy_resolve_shared_queue", &[vm, vml, n, nl, id_ptr])
        };
        assert_eq!(resolve(&mut guest, vm, vml), Status::NotFound as i32);
        assert_eq!(
            guest.env("proxy_register_shared_queue", &[n, nl, id_ptr]),
            0
        );
        let id = guest.read_u32(id_ptr) as i32;
        assert_eq!(resolve(&mut guest, vm, vml), 0);
        assert_eq!(guest.read_u32(id_ptr) as i32, id);
        assert_eq!(resolve(&mut guest, 0, 0), 0, "empty vm_id = this plugin's");

        let out = guest.slots();
        let dequeue = |guest: &mut Guest, id: i32| {
            guest.env("proxy_dequeue_shared_queue", &[id, out.0, out.1])
        };
        assert_eq!(dequeue(&mut guest, id), Status::Empty as i32);
        let (v, vl) = guest.put(b"item");
        assert_eq!(guest.env("proxy_enqueue_shared_queue", &[id, v, vl]), 0);
        assert!(guest.instance.has_pending_queue_ready());
        assert_eq!(dequeue(&mut guest, id), 0);
        assert_eq!(guest.returned(out), Some(b"item".to_vec()));
        assert_eq!(dequeue(&mut guest, 0x7fff_0000), Status::NotFound as i32);
        assert_eq!(
            guest.env("proxy_enqueue_shared_queue", &[0x7fff_0000, v, vl]),
            Status::NotFound as i32
        );
    }
}
