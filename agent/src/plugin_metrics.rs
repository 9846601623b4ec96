//! Metrics plugins define themselves (`proxy_define_metric`), exported on
//! `/metrics` with the plugin's name:
//!
//! * `wisp_wasm_plugin_counter_total{plugin, name}`
//! * `wisp_wasm_plugin_gauge{plugin, name}`
//! * `wisp_wasm_plugin_histogram{plugin, name}` (buckets, sum, count)
//!
//! As in Envoy's stats store, a metric's value is process-wide (the host
//! keeps it: the same name and kind from any worker is one metric); this
//! module remembers which plugin defined each name, and feeds histogram
//! recordings into Prometheus buckets as they happen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use wisp_wasm_host::{MetricKind, MetricsSink};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginMetricLabels {
    pub plugin: String,
    pub name: String,
}

fn value_histogram() -> Histogram {
    // 1 … ~16 M: plugins record sizes, counts and microseconds alike.
    Histogram::new(exponential_buckets(1.0, 4.0, 13))
}

/// Which plugin defined each metric name, and the histogram buckets.
#[derive(Debug)]
pub struct PluginMetrics {
    owners: Mutex<HashMap<(String, u8), String>>,
    histograms: Family<PluginMetricLabels, Histogram, fn() -> Histogram>,
}

fn kind_key(kind: MetricKind) -> u8 {
    match kind {
        MetricKind::Counter => 0,
        MetricKind::Gauge => 1,
        MetricKind::Histogram => 2,
    }
}

impl Default for PluginMetrics {
    fn default() -> Self {
        PluginMetrics {
            owners: Mutex::default(),
            histograms: Family::new_with_constructor(value_histogram),
        }
    }
}

impl PluginMetrics {
    /// The sink one plugin's instances report to.
    pub fn sink(self: &Arc<Self>, plugin: &str) -> Arc<dyn MetricsSink> {
        Arc::new(Sink {
            plugin: plugin.to_owned(),
            metrics: self.clone(),
        })
    }

    fn owner(&self, name: &str, kind: MetricKind) -> Option<String> {
        self.owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(name.to_owned(), kind_key(kind)))
            .cloned()
    }
}

struct Sink {
    plugin: String,
    metrics: Arc<PluginMetrics>,
}

impl MetricsSink for Sink {
    fn defined(&self, name: &str, kind: MetricKind) {
        self.metrics
            .owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((name.to_owned(), kind_key(kind)))
            .or_insert_with(|| self.plugin.clone());
    }

    fn updated(&self, _: &str, _: MetricKind, _: i64) {
        // Counters and gauges are read from the host at scrape time.
    }

    fn recorded(&self, name: &str, value: u64) {
        let plugin = self
            .metrics
            .owner(name, MetricKind::Histogram)
            .unwrap_or_else(|| self.plugin.clone());
        self.metrics
            .histograms
            .get_or_create(&PluginMetricLabels {
                plugin,
                name: name.to_owned(),
            })
            .observe(value as f64);
    }
}

/// Encodes the plugin metrics on each scrape.
#[derive(Debug)]
pub struct PluginMetricsCollector(pub Arc<PluginMetrics>);

impl Collector for PluginMetricsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let values = wisp_wasm_host::metrics::snapshot();
        let labels = |name: &str, kind| PluginMetricLabels {
            plugin: self.0.owner(name, kind).unwrap_or_default(),
            name: name.to_owned(),
        };
        let mut counters = encoder.encode_descriptor(
            "wisp_wasm_plugin_counter",
            "Counters defined by plugins (proxy_define_metric), by plugin and metric name",
            None,
            MetricType::Counter,
        )?;
        for metric in values.iter().filter(|m| m.kind == MetricKind::Counter) {
            ConstCounter::new(metric.value.max(0) as u64)
                .encode(counters.encode_family(&labels(&metric.name, metric.kind))?)?;
        }
        let mut gauges = encoder.encode_descriptor(
            "wisp_wasm_plugin_gauge",
            "Gauges defined by plugins (proxy_define_metric), by plugin and metric name",
            None,
            MetricType::Gauge,
        )?;
        for metric in values.iter().filter(|m| m.kind == MetricKind::Gauge) {
            ConstGauge::new(metric.value)
                .encode(gauges.encode_family(&labels(&metric.name, metric.kind))?)?;
        }
        let histograms = encoder.encode_descriptor(
            "wisp_wasm_plugin_histogram",
            "Histograms defined by plugins (proxy_define_metric), by plugin and metric name",
            None,
            MetricType::Histogram,
        )?;
        self.0.histograms.encode(histograms)?;
        Ok(())
    }
}
