//! Context plumbing and time: `proxy_set_effective_context`, `proxy_done`,
//! `proxy_get_current_time_nanoseconds`, `proxy_set_tick_period_milliseconds`.

use crate::guest::HostContext;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::HostResult;
use crate::abi::Status;
use crate::memory;

/// `proxy_set_effective_context(context_id)`: later hostcalls of this callback
/// act on `context_id`. BAD_ARGUMENT for an unknown id, as in cpp-host.
pub(crate) fn set_effective_context<G: HostContext>(
    caller: &mut G,
    id: i32,
) -> HostResult<G::Trap> {
    let id = id as u32;
    let state = caller.state_mut();
    if !state.contexts.contains_key(&id) {
        return Err(Status::BadArgument.into());
    }
    state.call.effective_context_id = id;
    Ok(())
}

/// `proxy_done()`: a root context whose `proxy_on_done` returned false (see
/// [`PluginInstance::shutdown`](crate::PluginInstance::shutdown)) says it
/// has finished; it is deleted once the current callback returns. NOT_FOUND
/// for a context the host is not waiting for, as cpp-host.
pub(crate) fn done<G: HostContext>(caller: &mut G) -> HostResult<G::Trap> {
    let state = caller.state_mut();
    let id = state.call.effective_context_id;
    match state.pending_done.iter().position(|&p| p == id) {
        Some(index) => {
            state.pending_done.remove(index);
            state.done.push(id);
            Ok(())
        }
        None => Err(Status::NotFound.into()),
    }
}

/// `proxy_get_current_time_nanoseconds(return_time)`: wall-clock time.
pub(crate) fn current_time<G: HostContext>(caller: &mut G, time_ptr: i32) -> HostResult<G::Trap> {
    memory::write_u64(caller, time_ptr, unix_time_nanos())?;
    Ok(())
}

pub(crate) fn unix_time_nanos() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since_epoch.as_nanos()).unwrap_or(u64::MAX)
}

/// `proxy_set_tick_period_milliseconds(period)`: recorded for the root
/// context; 0 turns ticks off. The embedder reads it with
/// [`PluginInstance::tick_period`](crate::PluginInstance::tick_period) and
/// calls [`PluginInstance::on_tick`](crate::PluginInstance::on_tick).
pub(crate) fn set_tick_period<G: HostContext>(caller: &mut G, millis: i32) -> HostResult<G::Trap> {
    let millis = millis as u32;
    caller.state_mut().tick_period = (millis != 0).then(|| Duration::from_millis(millis.into()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::abi::Status;
    use crate::stream::HttpStream;
    use crate::test_guest::{Guest, OUT_OF_BOUNDS};

    #[test]
    fn effective_context_must_exist_and_selects_the_stream() {
        let mut guest = Guest::new();
        let root = guest.instance.root_context_id();
        let id = guest.lend(HttpStream::default());
        let (key, key_len) = guest.put(b"x");
        let add = |guest: &mut Guest| {
            guest.env(
                "proxy_add_header_map_value",
                &[0, key, key_len, key, key_len],
            )
        };
        assert_eq!(add(&mut guest), 0);

        assert_eq!(
            guest.env("proxy_set_effective_context", &[999]),
            Status::BadArgument as i32
        );
        assert_eq!(guest.state().call.effective_context_id, id);
        // On the root context the stream is out of reach.
        assert_eq!(guest.env("proxy_set_effective_context", &[root as i32]), 0);
        assert_eq!(add(&mut guest), Status::BadArgument as i32);
        assert_eq!(guest.env("proxy_set_effective_context", &[id as i32]), 0);
        assert_eq!(add(&mut guest), 0);
    }

    #[test]
    fn done_without_pending_shutdown_is_not_found() {
        let mut guest = Guest::new();
        assert_eq!(guest.env("proxy_done", &[]), Status::NotFound as i32);
    }

    #[test]
    fn current_time_is_wall_clock_nanoseconds() {
        let mut guest = Guest::new();
        let (ptr, _) = guest.slots();
        let before = super::unix_time_nanos();
        assert_eq!(guest.env("proxy_get_current_time_nanoseconds", &[ptr]), 0);
        let now = guest.read_u64(ptr);
        assert!(now >= before && now <= super::unix_time_nanos());
        assert_eq!(
            guest.env("proxy_get_current_time_nanoseconds", &[OUT_OF_BOUNDS]),
            Status::InvalidMemoryAccess as i32
        );
    }

    #[test]
    fn tick_period_is_recorded() {
        let mut guest = Guest::new();
        assert_eq!(guest.instance.tick_period(), None);
        assert_eq!(guest.env("proxy_set_tick_period_milliseconds", &[1500]), 0);
        assert_eq!(
            guest.instance.tick_period(),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(guest.env("proxy_set_tick_period_milliseconds", &[0]), 0);
        assert_eq!(guest.instance.tick_period(), None);
    }
}
