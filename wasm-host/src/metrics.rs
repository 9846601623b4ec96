//! Plugin-defined metrics (`proxy_define_metric` and friends), kept
//! process-wide like Envoy's stats store: the same name and kind from any
//! instance on any worker is the same metric.
//!
//! Ids follow cpp-host: the kind in the low 2 bits (Counter 0, Gauge 1,
//! Histogram 2), the index above. Semantics follow Envoy's
//! `Context::{defineMetric, incrementMetric, recordMetric, getMetric}`:
//! incrementing a counter by a negative delta, incrementing a histogram and
//! reading a histogram are BAD_ARGUMENT; recording on a counter adds.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use crate::abi::Status;
pub use crate::embedder::MetricKind;

/// One metric's current state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricValue {
    pub name: String,
    pub kind: MetricKind,
    /// Counter or gauge value; for a histogram, the sum of recorded values.
    pub value: i64,
    /// Histograms: how many values were recorded (0 for the others).
    pub count: u64,
}

#[derive(Default)]
struct Registry {
    metrics: Vec<MetricValue>,
    ids: HashMap<(String, u32), u32>,
}

fn registry() -> MutexGuard<'static, Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

fn kind_bits(kind: MetricKind) -> u32 {
    match kind {
        MetricKind::Counter => 0,
        MetricKind::Gauge => 1,
        MetricKind::Histogram => 2,
    }
}

impl MetricKind {
    /// `proxy_metric_type_t`.
    pub fn from_raw(raw: i32) -> Option<Self> {
        match raw {
            0 => Some(MetricKind::Counter),
            1 => Some(MetricKind::Gauge),
            2 => Some(MetricKind::Histogram),
            _ => None,
        }
    }
}

/// Defines (or finds) a metric and returns its id.
pub(crate) fn define(kind: MetricKind, name: &str) -> u32 {
    let mut registry = registry();
    let key = (name.to_owned(), kind_bits(kind));
    if let Some(&id) = registry.ids.get(&key) {
        return id;
    }
    let index = u32::try_from(registry.metrics.len()).unwrap_or(u32::MAX >> 2);
    let id = (index << 2) | kind_bits(kind);
    registry.metrics.push(MetricValue {
        name: name.to_owned(),
        kind,
        value: 0,
        count: 0,
    });
    registry.ids.insert(key, id);
    id
}

fn with_metric<R>(
    id: u32,
    f: impl FnOnce(&mut MetricValue) -> Result<R, Status>,
) -> Result<R, Status> {
    let mut registry = registry();
    let metric = registry
        .metrics
        .get_mut((id >> 2) as usize)
        .filter(|m| kind_bits(m.kind) == id & 3)
        .ok_or(Status::NotFound)?;
    f(metric)
}

/// `proxy_increment_metric`; returns the metric after the change.
pub(crate) fn increment(id: u32, delta: i64) -> Result<MetricValue, Status> {
    with_metric(id, |m| {
        match m.kind {
            MetricKind::Counter if delta < 0 => return Err(Status::BadArgument),
            MetricKind::Counter | MetricKind::Gauge => m.value = m.value.saturating_add(delta),
            MetricKind::Histogram => return Err(Status::BadArgument),
        }
        Ok(m.clone())
    })
}

/// `proxy_record_metric`: counters add, gauges set, histograms record.
pub(crate) fn record(id: u32, value: u64) -> Result<MetricValue, Status> {
    with_metric(id, |m| {
        let signed = i64::try_from(value).unwrap_or(i64::MAX);
        match m.kind {
            MetricKind::Counter => m.value = m.value.saturating_add(signed),
            MetricKind::Gauge => m.value = signed,
            MetricKind::Histogram => {
                m.value = m.value.saturating_add(signed);
                m.count += 1;
            }
        }
        Ok(m.clone())
    })
}

/// `proxy_get_metric`: counters and gauges only.
pub(crate) fn get(id: u32) -> Result<i64, Status> {
    with_metric(id, |m| match m.kind {
        MetricKind::Histogram => Err(Status::BadArgument),
        _ => Ok(m.value),
    })
}

/// Every metric plugins defined in this process, for the embedder's
/// `/metrics` endpoint.
pub fn snapshot() -> Vec<MetricValue> {
    registry().metrics.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_the_kind_and_repeat_for_the_same_name() {
        let c = define(MetricKind::Counter, "metrics_test_c");
        assert_eq!(c & 3, 0);
        assert_eq!(define(MetricKind::Counter, "metrics_test_c"), c);
        let g = define(MetricKind::Gauge, "metrics_test_c");
        assert_ne!(g, c);
        assert_eq!(g & 3, 1);
        assert_eq!(define(MetricKind::Histogram, "metrics_test_h") & 3, 2);
    }

    #[test]
    fn envoy_semantics() {
        let c = define(MetricKind::Counter, "metrics_test_sem_c");
        assert_eq!(increment(c, 2).unwrap().value, 2);
        assert_eq!(increment(c, -1), Err(Status::BadArgument));
        assert_eq!(record(c, 3).unwrap().value, 5);
        assert_eq!(get(c), Ok(5));

        let g = define(MetricKind::Gauge, "metrics_test_sem_g");
        assert_eq!(increment(g, -4).unwrap().value, -4);
        assert_eq!(record(g, 7).unwrap().value, 7);
        assert_eq!(get(g), Ok(7));

        let h = define(MetricKind::Histogram, "metrics_test_sem_h");
        assert_eq!(record(h, 10).unwrap().count, 1);
        assert_eq!(increment(h, 1), Err(Status::BadArgument));
        assert_eq!(get(h), Err(Status::BadArgument));

        assert_eq!(get(0xffff_fff0), Err(Status::NotFound));
        // The right index with the wrong kind bits is unknown too.
        assert_eq!(get(c | 1), Err(Status::NotFound));
        assert!(
            snapshot()
                .iter()
                .any(|m| m.name == "metrics_test_sem_g" && m.value == 7)
        );
    }
}
