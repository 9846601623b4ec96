//! `proxy_define_metric`, `proxy_increment_metric`, `proxy_record_metric`,
//! `proxy_get_metric`; the registry is [`crate::metrics`], and the embedder's
//! [`MetricsSink`](crate::MetricsSink) hears about every change.

use super::HostResult;
use crate::abi::Status;
use crate::embedder::MetricKind;
use crate::guest::HostContext;
use crate::memory;
use crate::metrics::{self, MetricValue};
use crate::state::HostState;

/// `proxy_define_metric(type, name, name_size, return_id)`.
pub(crate) fn define<G: HostContext>(
    caller: &mut G,
    kind: i32,
    n_ptr: i32,
    n_len: i32,
    id_ptr: i32,
) -> HostResult<G::Trap> {
    let kind = MetricKind::from_raw(kind).ok_or(Status::BadArgument)?;
    let name = String::from_utf8_lossy(&memory::read(caller, n_ptr, n_len)?).into_owned();
    memory::check(caller, id_ptr, 4)?;
    let id = metrics::define(kind, &name);
    if let Some(sink) = &caller.state().embedder.metrics {
        sink.defined(&name, kind);
    }
    memory::write_u32(caller, id_ptr, id)?;
    Ok(())
}

fn notify(state: &HostState, metric: &MetricValue, recorded: Option<u64>) {
    let Some(sink) = &state.embedder.metrics else {
        return;
    };
    match (metric.kind, recorded) {
        (MetricKind::Histogram, Some(value)) => sink.recorded(&metric.name, value),
        _ => sink.updated(&metric.name, metric.kind, metric.value),
    }
}

/// `proxy_increment_metric(id, delta)`: BAD_ARGUMENT for a negative delta on
/// a counter or any histogram.
pub(crate) fn increment<G: HostContext>(
    caller: &mut G,
    id: i32,
    delta: i64,
) -> HostResult<G::Trap> {
    let metric = metrics::increment(id as u32, delta)?;
    notify(caller.state(), &metric, None);
    Ok(())
}

/// `proxy_record_metric(id, value)`.
pub(crate) fn record<G: HostContext>(caller: &mut G, id: i32, value: i64) -> HostResult<G::Trap> {
    let metric = metrics::record(id as u32, value as u64)?;
    notify(caller.state(), &metric, Some(value as u64));
    Ok(())
}

/// `proxy_get_metric(id, return_value)`.
pub(crate) fn get<G: HostContext>(caller: &mut G, id: i32, value_ptr: i32) -> HostResult<G::Trap> {
    memory::check(caller, value_ptr, 8)?;
    let value = metrics::get(id as u32)?;
    memory::write_u64(caller, value_ptr, value as u64)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use wasmtime::Val;

    use crate::abi::Status;
    use crate::test_guest::{Guest, OUT_OF_BOUNDS};

    fn call64(guest: &mut Guest, name: &str, id: i32, value: i64) -> i32 {
        guest
            .try_call("env", name, &[Val::I32(id), Val::I64(value)])
            .unwrap()
            .unwrap()
    }

    #[test]
    fn metric_statuses() {
        let mut guest = Guest::new();
        let (n, nl) = guest.put(b"hostcall_metric");
        let (id_ptr, value_ptr) = guest.slots();
        guest.put(&[0; 8]);
        assert_eq!(
            guest.env("proxy_define_metric", &[3, n, nl, id_ptr]),
            Status::BadArgument as i32
        );
        assert_eq!(guest.env("proxy_define_metric", &[0, n, nl, id_ptr]), 0);
        let counter = guest.read_u32(id_ptr) as i32;
        assert_eq!(call64(&mut guest, "proxy_increment_metric", counter, 3), 0);
        assert_eq!(
            call64(&mut guest, "proxy_increment_metric", counter, -1),
            Status::BadArgument as i32,
            "a counter never goes down"
        );
        assert_eq!(guest.env("proxy_get_metric", &[counter, value_ptr]), 0);
        assert_eq!(guest.read_u64(value_ptr), 3);
        assert_eq!(
            guest.env("proxy_get_metric", &[counter, OUT_OF_BOUNDS]),
            Status::InvalidMemoryAccess as i32
        );
        assert_eq!(
            guest.env("proxy_get_metric", &[0x7fff_fff0, value_ptr]),
            Status::NotFound as i32
        );

        assert_eq!(guest.env("proxy_define_metric", &[2, n, nl, id_ptr]), 0);
        let histogram = guest.read_u32(id_ptr) as i32;
        assert_eq!(call64(&mut guest, "proxy_record_metric", histogram, 9), 0);
        assert_eq!(
            call64(&mut guest, "proxy_increment_metric", histogram, 1),
            Status::BadArgument as i32
        );
        assert_eq!(
            guest.env("proxy_get_metric", &[histogram, value_ptr]),
            Status::BadArgument as i32
        );
    }
}
