//! The agent's Prometheus metrics, served on the admin listener's `/metrics`.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::ebpf::Dataplane;

/// Labels of a proxied HTTP request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The enrolled workload the request came from.
    pub source_workload: String,
    /// The response code sent downstream.
    pub response_code: u16,
}

/// Labels of something a plugin did.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    pub plugin: String,
}

/// Metrics updated on the request path; cheap to share between workers.
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<PluginLabels, Histogram, fn() -> Histogram>,
    pub local_responses: Family<PluginLabels, Counter>,
    pub plugin_failures: Family<PluginLabels, Counter>,
    pub upstream_connect_errors: Counter,
    pub unsteered_connections: Counter,
}

fn duration_histogram() -> Histogram {
    // 50 µs … ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Metrics {
        let metrics = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            local_responses: Family::default(),
            plugin_failures: Family::default(),
            upstream_connect_errors: Counter::default(),
            unsteered_connections: Counter::default(),
        };
        registry.register(
            "wisp_http_requests",
            "HTTP requests proxied, by source workload and response code",
            metrics.requests.clone(),
        );
        registry.register_with_unit(
            "wisp_http_request_duration",
            "Time from request headers to response headers, through the whole filter chain (label plugin=\"chain\")",
            Unit::Seconds,
            metrics.request_duration.clone(),
        );
        registry.register(
            "wisp_wasm_local_responses",
            "Requests answered by a plugin's local response",
            metrics.local_responses.clone(),
        );
        registry.register(
            "wisp_wasm_plugin_failures",
            "Plugin callbacks that failed (trapped or errored); the request got the plugin's failure policy",
            metrics.plugin_failures.clone(),
        );
        registry.register(
            "wisp_upstream_connect_errors",
            "Connections to an original destination that could not be opened",
            metrics.upstream_connect_errors.clone(),
        );
        registry.register(
            "wisp_unsteered_connections",
            "Connections accepted on the outbound listener that the kernel had not steered (no original destination); closed",
            metrics.unsteered_connections.clone(),
        );
        metrics
    }
}

/// Reads the kernel programs' per-workload counters on each scrape.
pub struct KernelCounters(pub Arc<Dataplane>);

impl std::fmt::Debug for KernelCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCounters")
    }
}

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = self.0.workload_counters();
        type Pick = fn(&wisp_common::WorkloadCounters) -> u64;
        let series: [(&str, &str, Pick); 3] = [
            (
                "wisp_kernel_connects_redirected",
                "TCP connects of the workload that the kernel steered to the agent",
                |c| c.connects_redirected,
            ),
            (
                "wisp_kernel_connects_passed",
                "Connects of the workload the kernel left alone (not TCP, loopback, or already to the agent)",
                |c| c.connects_passed,
            ),
            (
                "wisp_kernel_connections_established",
                "Steered connections whose original destination was recorded for the agent",
                |c| c.connections_established,
            ),
        ];
        for (name, help, pick) in series {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (workload, values) in &counters {
                let labels = [("workload", workload.name.as_str())];
                ConstCounter::new(pick(values)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
