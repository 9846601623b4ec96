//! The kernel programs' counters on `/metrics`, read from their per-CPU maps
//! on each scrape: per workload, per program and per policy rule.

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

use super::Dataplane;

pub fn encode(
    dataplane: &Dataplane,
    mut encoder: DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let counters = dataplane.workload_counters();
    type Pick = fn(&wisp_common::WorkloadCounters) -> u64;
    let series: [(&str, &str, Pick); 4] = [
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
        (
            "wisp_kernel_connects_denied",
            "Connects of the workload the kernel's L4 policy refused (EPERM)",
            |c| c.connects_denied,
        ),
    ];
    for (name, help, pick) in series {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (workload, values) in &counters {
            let labels = [("workload", workload.name.as_str())];
            ConstCounter::new(pick(values)).encode(family.encode_family(&labels)?)?;
        }
    }

    let programs = dataplane.program_counters();
    type PickProgram = fn(&wisp_common::ProgramCounters) -> u64;
    let series: [(&str, &str, PickProgram); 3] = [
        (
            "wisp_kernel_program_runs",
            "Times each kernel program ran (sockops: established callbacks only)",
            |c| c.runs,
        ),
        (
            "wisp_kernel_program_actions",
            "Runs in which the program acted: a connect steered or denied, a record re-keyed",
            |c| c.acted,
        ),
        (
            "wisp_kernel_program_errors",
            "Runs that could not record a connection (a full map); the connect went direct",
            |c| c.errors,
        ),
    ];
    for (name, help, pick) in series {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for stats in &programs {
            let labels = [("program", stats.program)];
            ConstCounter::new(pick(&stats.counters)).encode(family.encode_family(&labels)?)?;
        }
    }

    let rules = dataplane.policy_counters();
    let mut family = encoder.encode_descriptor(
        "wisp_kernel_policy_matches",
        "Connects each L4 policy rule matched (and so allowed or denied)",
        None,
        MetricType::Counter,
    )?;
    for rule in &rules {
        let labels = [
            ("rule", rule.name.as_str()),
            ("action", rule.action.as_str()),
        ];
        ConstCounter::new(rule.matches).encode(family.encode_family(&labels)?)?;
    }

    let backends = dataplane.backend_counters();
    let mut family = encoder.encode_descriptor(
        "wisp_kernel_service_connects",
        "Connects to a service VIP the kernel sent to each backend",
        None,
        MetricType::Counter,
    )?;
    for stats in &backends {
        let backend = stats.backend.to_string();
        let labels = [
            ("service", stats.service.as_str()),
            ("backend", backend.as_str()),
        ];
        ConstCounter::new(stats.connects).encode(family.encode_family(&labels)?)?;
    }

    let family = encoder.encode_descriptor(
        "wisp_kernel_steered_sockets",
        "Sockets in the socket-steering sockhash now (ebpf.socket_steering; the kernel drops them as they close)",
        None,
        MetricType::Gauge,
    )?;
    prometheus_client::metrics::gauge::ConstGauge::new(dataplane.steered_sockets() as i64)
        .encode(family)?;

    let inbound = dataplane.inbound_counters();
    let mut family = encoder.encode_descriptor(
        "wisp_inbound_connections",
        "Connections arriving at an enrolled pod from outside it that the kernel handed to the agent",
        None,
        MetricType::Counter,
    )?;
    for (workload, count) in &inbound {
        let labels = [("workload", workload.as_str())];
        ConstCounter::new(*count).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}
