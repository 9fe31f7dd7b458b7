//! The metric families: a `prometheus-client` [`Collector`] over a copy of a
//! [`Status`] snapshot (see the parent module for the families).

use std::collections::HashSet;
use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

use crate::status::{ServiceStatus, Status};

/// Outcome counters that are not a packet's verdict, and the family each goes to.
const NOT_VERDICTS: [(&str, &str, &str); 16] = [
    (
        "conn_hit",
        "lb_conntrack_hits",
        "Packets of flows found in the connection table.",
    ),
    (
        "conn_miss",
        "lb_conntrack_misses",
        "Packets scheduled by Maglev: new flows, expired entries or backends gone.",
    ),
    (
        "conn_insert_failed",
        "lb_conntrack_insert_failures",
        "Failed connection table inserts (the packets were still forwarded).",
    ),
    (
        "persist_hit",
        "lb_persistence_hits",
        "New flows sent to their client's backend by persistence.",
    ),
    (
        "ct_promoted",
        "lb_conntrack_promotions",
        "Flows moved to the established table (their second packet); floods of new flows cannot evict them there.",
    ),
    (
        "ct_established_full",
        "lb_conntrack_established_full",
        "Packets of flows that could not move to the established table because it was full (they stay evictable).",
    ),
    (
        "encap_ipip",
        "lb_encap_ipip",
        "Packets forwarded in an IPIP or IP6IP6 tunnel (also counted as forwarded).",
    ),
    (
        "encap_gue",
        "lb_encap_gue",
        "Packets forwarded in GUE (also counted as forwarded).",
    ),
    (
        "nat_forwarded",
        "lb_nat_forwarded",
        "Packets forwarded to a nat backend, destination rewritten (also counted as forwarded).",
    ),
    (
        "fullnat_forwarded",
        "lb_fullnat_forwarded",
        "Packets forwarded to a fullnat backend, both addresses rewritten (also counted as forwarded).",
    ),
    (
        "ct_midflow_miss",
        "lb_conntrack_midflow_misses",
        "TCP packets without SYN whose flow was in no table (evicted, expired or started elsewhere): scheduled again.",
    ),
    (
        "ct_syn_unrecorded",
        "lb_conntrack_syn_unrecorded",
        "TCP SYNs forwarded without a connection table entry during a SYN flood (new flows per CPU and second above the threshold).",
    ),
    (
        "icmp_forwarded",
        "lb_icmp_errors_forwarded",
        "ICMP errors about a VIP flow's replies sent to the flow's backend (also counted as forwarded).",
    ),
    (
        "frag_first",
        "lb_fragments_first",
        "First fragments of datagrams scheduled and remembered (also counted as forwarded).",
    ),
    (
        "frag_followed",
        "lb_fragments_followed",
        "Fragments sent where their datagram's first fragment went (also counted as forwarded).",
    ),
    (
        "frag_insert_failed",
        "lb_fragments_insert_failures",
        "First fragments that could not be remembered (forwarded; their later fragments are dropped).",
    ),
];

/// Encodes a [`Status`] snapshot.
#[derive(Debug)]
pub(super) struct StatusCollector(pub(super) Status);

type Labels = Vec<(&'static str, String)>;

fn service_labels(service: &ServiceStatus) -> Labels {
    vec![
        ("service", service.name.clone()),
        (
            "vip",
            match (service.vip, service.vip_prefix) {
                (Some(ip), Some(len)) => format!("{ip}/{len}"),
                (Some(ip), None) => ip.to_string(),
                (None, _) => String::new(),
            },
        ),
        ("port", service.port.to_string()),
        ("protocol", service.protocol.clone()),
    ]
}

/// Writes one family (nothing if it has no series). Counter names go without their
/// `_total`, which the encoder appends.
fn family<'a, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: impl IntoIterator<Item = (&'a Labels, M)>,
) -> fmt::Result {
    let mut series = series.into_iter().peekable();
    let Some((_, first)) = series.peek() else {
        return Ok(());
    };
    let mut metric_encoder = encoder.encode_descriptor(name, help, unit, first.metric_type())?;
    for (labels, metric) in series {
        metric.encode(metric_encoder.encode_family(labels)?)?;
    }
    Ok(())
}

/// Writes one family of a single series without labels, if `metric` is some.
fn single<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric: Option<M>,
) -> fmt::Result {
    match metric {
        Some(metric) => {
            metric.encode(encoder.encode_descriptor(name, help, unit, metric.metric_type())?)
        }
        None => Ok(()),
    }
}

fn counter(value: u64) -> ConstCounter<u64> {
    ConstCounter::new(value)
}

fn gauge(value: i64) -> ConstGauge<i64> {
    ConstGauge::new(value)
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let status = &self.0;
        let e = &mut encoder;

        let services: Vec<(Labels, &ServiceStatus)> = status
            .services
            .iter()
            .map(|s| (service_labels(s), s))
            .collect();
        let each_service =
            |f: fn(&ServiceStatus) -> u64| services.iter().map(move |(l, s)| (l, counter(f(s))));
        family(
            e,
            "lb_service_packets",
            "Packets sent to the backends of a service.",
            None,
            each_service(|s| s.packets),
        )?;
        family(
            e,
            "lb_service_bytes",
            "Bytes sent to the backends of a service (layer 2 frames).",
            None,
            each_service(|s| s.bytes),
        )?;
        family(
            e,
            "lb_service_new_flows",
            "Flows of a service scheduled by Maglev.",
            None,
            each_service(|s| s.new_flows),
        )?;

        let mut seen = HashSet::new();
        let mut backends = Vec::new();
        for (labels, service) in &services {
            for backend in &service.backends {
                let mut labels = labels.clone();
                let address = backend.address.map(|ip| ip.to_string());
                labels.push(("backend", address.unwrap_or_default()));
                if seen.insert(labels.clone()) {
                    backends.push((labels, backend));
                }
            }
        }
        let backends = &backends;
        family(
            e,
            "lb_backend_packets",
            "Packets sent to a backend.",
            None,
            backends.iter().map(|(l, b)| (l, counter(b.packets))),
        )?;
        family(
            e,
            "lb_backend_bytes",
            "Bytes sent to a backend (layer 2 frames).",
            None,
            backends.iter().map(|(l, b)| (l, counter(b.bytes))),
        )?;
        family(
            e,
            "lb_backend_new_flows",
            "Flows scheduled to a backend (by its service's scheduler or persistence).",
            None,
            backends.iter().map(|(l, b)| (l, counter(b.new_flows))),
        )?;
        family(
            e,
            "lb_backend_active_connections",
            "Established TCP connections on a backend (ipvsadm's ActiveConn), exact within one connection-table sweep.",
            None,
            backends.iter().map(|(l, b)| (l, gauge(i64::from(b.active_conns)))),
        )?;
        family(
            e,
            "lb_backend_inactive_connections",
            "Other live flows on a backend: TCP half-open or closing, UDP (ipvsadm's InActConn).",
            None,
            backends.iter().map(|(l, b)| (l, gauge(i64::from(b.inactive_conns)))),
        )?;
        family(
            e,
            "lb_backend_up",
            "Whether a backend may receive traffic: 1 up, 0 down or unresolved (no MAC).",
            None,
            backends
                .iter()
                .map(|(l, b)| (l, gauge(i64::from(b.health == "up")))),
        )?;
        family(
            e,
            "lb_backend_weight",
            "Weight of a backend in force (0 while drained).",
            None,
            backends
                .iter()
                .map(|(l, b)| (l, gauge(i64::from(b.weight)))),
        )?;
        family(
            e,
            "lb_backend_probe_latency",
            "Duration of the last successful liveness probe of a backend.",
            Some(&Unit::Seconds),
            backends.iter().filter_map(|(l, b)| {
                let latency = b.probe.as_ref()?.last_latency_secs?;
                Some((l, ConstGauge::new(latency)))
            }),
        )?;
        family(
            e,
            "lb_backend_probe_successes",
            "Liveness probes of a backend that succeeded.",
            None,
            backends
                .iter()
                .filter_map(|(l, b)| Some((l, counter(b.probe.as_ref()?.successes)))),
        )?;
        family(
            e,
            "lb_backend_probe_failures",
            "Liveness probes of a backend that failed.",
            None,
            backends
                .iter()
                .filter_map(|(l, b)| Some((l, counter(b.probe.as_ref()?.failures)))),
        )?;

        let outcomes: Vec<(Labels, u64)> = status
            .outcomes
            .iter()
            .filter(|(name, _)| !NOT_VERDICTS.iter().any(|(n, _, _)| n == name))
            .map(|(name, n)| (vec![("outcome", name.clone())], *n))
            .collect();
        family(
            e,
            "lb_packets",
            "Packets seen by the XDP program, by verdict: forwarded, or why passed or dropped.",
            None,
            outcomes.iter().map(|(l, n)| (l, counter(*n))),
        )?;
        for (outcome, name, help) in NOT_VERDICTS {
            let value = status.outcomes.iter().find(|(n, _)| n == outcome);
            single(e, name, help, None, value.map(|(_, n)| counter(*n)))?;
        }

        let ct = &status.conntrack;
        let entries = [
            (vec![("state", "established".to_string())], ct.established),
            (vec![("state", "closing".to_string())], ct.closing),
        ];
        family(
            e,
            "lb_conntrack_established_entries",
            "Entries of the established-flow table at the last sweep, by TCP state (UDP counts as established).",
            None,
            entries.iter().map(|(l, n)| (l, gauge(i64::try_from(*n).unwrap_or(i64::MAX)))),
        )?;
        single(
            e,
            "lb_conntrack_established_capacity",
            "Entries the established-flow table can hold (0: protection off).",
            None,
            Some(gauge(i64::from(ct.established_capacity))),
        )?;
        single(
            e,
            "lb_conntrack_syn_filter",
            "1 while TCP SYNs of new 5-tuples skip the established-table lookup (the SYN filter is on), else 0.",
            None,
            Some(gauge(i64::from(ct.syn_filter))),
        )?;
        single(
            e,
            "lb_conntrack_new_capacity",
            "Entries of the LRU table that holds flows until their second packet.",
            None,
            Some(gauge(i64::from(ct.new_capacity))),
        )?;
        single(
            e,
            "lb_conntrack_expired",
            "Established-table entries the agent removed after their idle timeout.",
            None,
            Some(counter(ct.expired_total)),
        )?;

        let reloads = [
            (vec![("result", "ok".to_string())], status.reloads_ok),
            (
                vec![("result", "failed".to_string())],
                status.reloads_failed,
            ),
        ];
        family(
            e,
            "lb_reloads",
            "Configuration reloads, by result.",
            None,
            reloads.iter().map(|(l, n)| (l, counter(*n))),
        )?;
        let mode: Option<Labels> =
            (!status.attach_mode.is_empty()).then(|| vec![("mode", status.attach_mode.clone())]);
        family(
            e,
            "lb_xdp_attach_mode",
            "How the XDP program is attached (native or generic): 1 for the mode in use.",
            None,
            mode.iter().map(|l| (l, gauge(1))),
        )?;
        single(
            e,
            "lb_uptime",
            "Time since the agent started.",
            Some(&Unit::Seconds),
            Some(gauge(i64::try_from(status.uptime_secs).unwrap_or(i64::MAX))),
        )?;
        Ok(())
    }
}
