//! The agent's Prometheus metrics, served on the admin listener's `/metrics`.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

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

/// Labels of an accepted connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub listener: String,
    /// `http1`, `http2` or `tcp`: what the connection was served as.
    pub protocol: String,
}

/// Labels of a configuration reload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `applied` or `rejected`.
    pub result: String,
}

/// Metrics updated on the request path; cheap to share between workers.
pub struct Metrics {
    pub config_reloads: Family<ReloadLabels, Counter>,
    pub connections: Family<ConnectionLabels, Counter>,
    pub tcp_bytes_sent: Counter,
    pub tcp_bytes_received: Counter,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<PluginLabels, Histogram, fn() -> Histogram>,
    pub local_responses: Family<PluginLabels, Counter>,
    pub plugin_failures: Family<PluginLabels, Counter>,
    pub plugin_unavailable: Family<PluginLabels, Counter>,
    pub tcp_plugin_closes: Family<PluginLabels, Counter>,
    pub upstream_connect_errors: Counter,
    pub tls_handshake_errors: Counter,
    pub unsteered_connections: Counter,
}

fn duration_histogram() -> Histogram {
    // 50 µs … ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Metrics {
        let metrics = Metrics {
            config_reloads: Family::default(),
            connections: Family::default(),
            tcp_bytes_sent: Counter::default(),
            tcp_bytes_received: Counter::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            local_responses: Family::default(),
            plugin_failures: Family::default(),
            plugin_unavailable: Family::default(),
            tcp_plugin_closes: Family::default(),
            upstream_connect_errors: Counter::default(),
            tls_handshake_errors: Counter::default(),
            unsteered_connections: Counter::default(),
        };
        registry.register(
            "wisp_config_reloads",
            "Configuration reloads (SIGHUP or file change), by result",
            metrics.config_reloads.clone(),
        );
        registry.register(
            "wisp_downstream_connections",
            "Connections accepted, by listener and the protocol they were served as",
            metrics.connections.clone(),
        );
        registry.register(
            "wisp_tcp_sent_bytes",
            "Bytes passed through from downstream to upstream on TCP (non-HTTP) connections",
            metrics.tcp_bytes_sent.clone(),
        );
        registry.register(
            "wisp_tcp_received_bytes",
            "Bytes passed through from upstream to downstream on TCP (non-HTTP) connections",
            metrics.tcp_bytes_received.clone(),
        );
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
            "wisp_wasm_plugin_unavailable",
            "Requests that found no live instance of the plugin (failed, waiting to reload, or crash-looping) and got its failure policy",
            metrics.plugin_unavailable.clone(),
        );
        registry.register(
            "wisp_tcp_plugin_closes",
            "TCP connections a network filter closed: its failure policy (FAIL_CLOSED, FAIL_RELOAD) or its own proxy_close_stream",
            metrics.tcp_plugin_closes.clone(),
        );
        registry.register(
            "wisp_upstream_connect_errors",
            "Connections to an original destination that could not be opened",
            metrics.upstream_connect_errors.clone(),
        );
        registry.register(
            "wisp_tls_handshake_errors",
            "Downstream TLS handshakes that failed or timed out (bad certificate, no client certificate under mTLS, …)",
            metrics.tls_handshake_errors.clone(),
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
pub struct KernelCounters(pub crate::worker::SharedDataplane);

impl std::fmt::Debug for KernelCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCounters")
    }
}

impl Collector for KernelCounters {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Per workload, per program and per policy rule: see ebpf::metrics.
        let dataplane = self.0.read().unwrap_or_else(|e| e.into_inner());
        crate::ebpf::metrics::encode(&dataplane, encoder)
    }
}

/// The Proxy-Wasm host's per-plugin counters (instances, traps, deadlines,
/// capability refusals, FAIL_RELOAD reloads and crash-loop stops), read on
/// each scrape from the plugins in effect (a config reload swaps them).
pub struct PluginCounters(
    pub tokio::sync::watch::Receiver<Arc<Vec<crate::plugins::ConfiguredPlugin>>>,
);

impl std::fmt::Debug for PluginCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PluginCounters")
    }
}

impl Collector for PluginCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use wisp_wasm_host::PluginCounters as Host;
        let plugins = self.0.borrow().clone();
        type Pick = fn(&Host) -> u64;
        let series: [(&str, &str, Pick); 7] = [
            (
                "wisp_wasm_instances_created",
                "Plugin instances created (per worker, reloads and canaries included)",
                |c| Host::get(&c.instances_created),
            ),
            (
                "wisp_wasm_traps",
                "Plugin callbacks that trapped, ran past their deadline or exited",
                |c| Host::get(&c.runtime_failures),
            ),
            (
                "wisp_wasm_deadline_exceeded",
                "Plugin callbacks stopped at their wall-clock deadline",
                |c| Host::get(&c.deadline_exceeded),
            ),
            (
                "wisp_wasm_restricted_calls",
                "Host and WASI calls refused by the plugin's capability allow-list",
                |c| Host::get(&c.restricted_hostcalls) + Host::get(&c.restricted_wasi_calls),
            ),
            (
                "wisp_wasm_reloads",
                "FAIL_RELOAD: plugin instances re-created after a failure",
                |c| Host::get(&c.reloads),
            ),
            (
                "wisp_wasm_reload_failures",
                "FAIL_RELOAD: re-creations that failed",
                |c| Host::get(&c.reload_failures),
            ),
            (
                "wisp_wasm_crash_loop_stops",
                "FAIL_RELOAD: times the crash-loop limit stopped reloading a plugin",
                |c| Host::get(&c.crash_loop_stops),
            ),
        ];
        for (name, help, pick) in series {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for plugin in plugins.iter().map(|p| &p.plugin) {
                let labels = [("plugin", plugin.name())];
                ConstCounter::new(pick(plugin.counters()))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
