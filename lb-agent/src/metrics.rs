//! Prometheus metrics: [`render`] turns a [`Status`] snapshot into the Prometheus text
//! exposition format (version 0.0.4), and [`serve`] answers `GET /metrics` with it over
//! HTTP/1.1.
//!
//! The agent listens on [`DEFAULT_LISTEN`] (`127.0.0.1:9642`) unless told otherwise.
//!
//! The metric families are built with the `prometheus-client` crate (a
//! [`Collector`] over a copy of the snapshot, encoded into a fresh [`Registry`] per
//! call). That crate writes OpenMetrics text only, which `promtool check metrics`
//! and the classic text parsers do not accept as is (a counter's `# TYPE` names the
//! family without `_total` while its samples carry it); [`render`] therefore rewrites
//! the descriptors into the 0.0.4 form: counters' `# HELP`/`# TYPE` name the
//! `_total` series, `# UNIT` and `# EOF` are dropped. Samples are unchanged.
//!
//! Families (every name starts with `lb_`):
//!
//! | family | type | labels |
//! |---|---|---|
//! | `lb_service_packets_total`, `lb_service_bytes_total`, `lb_service_new_flows_total` | counter | `service`, `vip`, `port`, `protocol` |
//! | `lb_backend_packets_total`, `lb_backend_bytes_total`, `lb_backend_new_flows_total` | counter | the service's and `backend` |
//! | `lb_backend_up` (1 up, 0 down or unresolved), `lb_backend_weight` (in force) | gauge | the service's and `backend` |
//! | `lb_backend_active_connections`, `lb_backend_inactive_connections` (ipvsadm's ActiveConn, InActConn) | gauge | the service's and `backend` |
//! | `lb_backend_probe_latency_seconds` (last successful probe) | gauge | the service's and `backend` |
//! | `lb_backend_probe_successes_total`, `lb_backend_probe_failures_total` | counter | the service's and `backend` |
//! | `lb_packets_total` (one series per verdict: `forwarded`, `pass_*`, `drop_*`) | counter | `outcome` |
//! | `lb_conntrack_hits_total`, `lb_conntrack_misses_total`, `lb_conntrack_insert_failures_total` | counter | |
//! | `lb_conntrack_promotions_total`, `lb_conntrack_established_full_total`, `lb_conntrack_midflow_misses_total`, `lb_conntrack_expired_total` | counter | |
//! | `lb_conntrack_established_entries` | gauge | `state` (`established`, `closing`) |
//! | `lb_encap_ipip_total`, `lb_encap_gue_total`, `lb_nat_forwarded_total` | counter | |
//! | `lb_conntrack_established_capacity`, `lb_conntrack_new_capacity` | gauge | |
//! | `lb_persistence_hits_total` | counter | |
//! | `lb_icmp_errors_forwarded_total`, `lb_fragments_first_total`, `lb_fragments_followed_total`, `lb_fragments_insert_failures_total` | counter | |
//! | `lb_reloads_total` | counter | `result` (`ok`, `failed`) |
//! | `lb_xdp_attach_mode` (1 for the mode in use) | gauge | `mode` (`native`, `generic`) |
//! | `lb_uptime_seconds` | gauge | |
//!
//! Every packet the XDP program sees ends in exactly one verdict, so
//! `sum(rate(lb_packets_total[1m]))` is the packet rate on the interface. The
//! outcome counters that are not verdicts (`conn_hit`, `conn_miss`,
//! `conn_insert_failed`, `persist_hit`, `ct_*`: a forwarded packet also counts
//! them)
//! have their own families instead. Backends without a probe have no probe series;
//! a service without a VIP or a backend without an address gets an empty label, and
//! of several backends of a service with the same labels only the first is exported.

use std::collections::HashSet;
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::status::{ServiceStatus, Status};

/// Where the agent serves metrics unless configured otherwise.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9642));

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long a client may take to send a request's head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Outcome counters that are not a packet's verdict, and the family each goes to.
const NOT_VERDICTS: [(&str, &str, &str); 14] = [
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
        "ct_midflow_miss",
        "lb_conntrack_midflow_misses",
        "TCP packets without SYN whose flow was in no table (evicted, expired or started elsewhere): scheduled again.",
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

/// The metrics of `status` in the Prometheus text exposition format 0.0.4 (see the
/// module documentation for the families).
pub fn render(status: &Status) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StatusCollector(status.clone())));
    let mut openmetrics = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut openmetrics, &registry) {
        // Only a value that does not fit its type can fail; write what was encoded.
        tracing::error!("metrics: encoding failed: {e}");
    }
    openmetrics_to_text(&openmetrics)
}

/// Serves `GET /metrics` (and `HEAD`) on `listen` with [`render`] of the current
/// `status` until `shutdown` becomes true or its sender is dropped; other paths get
/// 404, other methods on `/metrics` 405. Connections still open at shutdown are
/// closed. Fails only if `listen` cannot be bound.
pub async fn serve(
    listen: SocketAddr,
    status: Arc<RwLock<Status>>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    serve_listener(listener, status, shutdown).await
}

/// [`serve`] on a listener already bound (e.g. to port 0, to learn the port from
/// [`TcpListener::local_addr`] before serving).
pub async fn serve_listener(
    listener: TcpListener,
    status: Arc<RwLock<Status>>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut connections = JoinSet::new();
    loop {
        if *shutdown.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(connection(stream, status.clone()));
                }
                Err(e) => {
                    // Out of descriptors, a connection reset before accept: wait a
                    // little instead of spinning, and go on.
                    tracing::warn!("metrics: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
    Ok(())
}

/// Serves the requests of one connection.
async fn connection(stream: tokio::net::TcpStream, status: Arc<RwLock<Status>>) {
    let service = service_fn(move |request: Request<Incoming>| {
        let response = respond(&request, &status);
        async move { Ok::<_, Infallible>(response) }
    });
    let result = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = result {
        tracing::debug!("metrics: connection: {e}");
    }
}

fn respond<B>(request: &Request<B>, status: &RwLock<Status>) -> Response<Full<Bytes>> {
    let plain = |code: StatusCode, body: &'static str| {
        let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *response.status_mut() = code;
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    };
    if request.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics\n",
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let body = render(&status.read().unwrap_or_else(PoisonError::into_inner));
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_TEXT));
    response
}

/// Rewrites `prometheus-client`'s OpenMetrics text into the 0.0.4 text format: a
/// counter family's `# HELP` and `# TYPE` name its `_total` series, `unknown` becomes
/// `untyped`, `# UNIT` and `# EOF` go. Only what [`StatusCollector`] produces
/// (counters and gauges, no exemplars or `_created` series) needs to be handled.
fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len() + 1024);
    // The text of the last `# HELP` line, written once its `# TYPE` is known.
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').map_or("", |(_, text)| text));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.rsplit_once(' ').unwrap_or((rest, "untyped"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", kind),
                "unknown" => ("", "untyped"),
                _ => ("", kind),
            };
            if let Some(help) = help.take() {
                out.push_str(&format!("# HELP {name}{suffix} {help}\n"));
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Encodes a [`Status`] snapshot.
#[derive(Debug)]
struct StatusCollector(Status);

type Labels = Vec<(&'static str, String)>;

fn service_labels(service: &ServiceStatus) -> Labels {
    vec![
        ("service", service.name.clone()),
        (
            "vip",
            service.vip.map(|ip| ip.to_string()).unwrap_or_default(),
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::process::{Command, Stdio};

    use super::*;
    use crate::status::{BackendStatus, ProbeStatus};

    fn backend(address: &str, health: &str, packets: u64) -> BackendStatus {
        BackendStatus {
            address: Some(address.parse().unwrap()),
            weight: 100,
            config_weight: 100,
            health: health.to_string(),
            packets,
            bytes: packets * 100,
            new_flows: packets / 10,
            ..BackendStatus::default()
        }
    }

    /// Two services, three backends: probed up, probed down with no success yet, and
    /// unprobed unresolved.
    fn status() -> Status {
        let mut up = backend("198.18.0.11", "up", 42);
        up.active_conns = 12;
        up.inactive_conns = 3;
        up.probe = Some(ProbeStatus {
            kind: "http".to_string(),
            last_latency_secs: Some(0.0015),
            successes: 17,
            failures: 2,
        });
        let mut down = backend("198.18.0.12", "down", 0);
        down.weight = 0;
        down.probe = Some(ProbeStatus {
            kind: "tcp".to_string(),
            last_latency_secs: None,
            successes: 0,
            failures: 5,
        });
        let unresolved = backend("2001:db8::11", "unresolved", 0);
        let names = lb_common::stat::NAMES;
        Status {
            iface: "eth0".to_string(),
            attach_mode: "native".to_string(),
            pin_dir: "/sys/fs/bpf/lb".to_string(),
            config_path: "/etc/lb/lb.yaml".to_string(),
            uptime_secs: 3600,
            reloads_ok: 3,
            reloads_failed: 1,
            outcomes: names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.to_string(), 1000 + i as u64))
                .collect(),
            conntrack: crate::conntrack::TableStatus {
                new_capacity: 1024,
                established_capacity: 2048,
                established: 30,
                closing: 4,
                expired_total: 7,
                sweep_secs: 0.001,
            },
            services: vec![
                ServiceStatus {
                    name: "web".to_string(),
                    vip: Some("198.18.1.10".parse().unwrap()),
                    port: 80,
                    protocol: "tcp".to_string(),
                    packets: 42,
                    bytes: 4200,
                    new_flows: 4,
                    backends: vec![up, down],
                    ..ServiceStatus::default()
                },
                ServiceStatus {
                    name: "dns \"v6\"".to_string(),
                    vip: Some("2001:db8::53".parse().unwrap()),
                    port: 53,
                    protocol: "udp".to_string(),
                    backends: vec![unresolved],
                    ..ServiceStatus::default()
                },
            ],
            announce: None,
        }
    }

    const WEB: &str = r#"service="web",vip="198.18.1.10",port="80",protocol="tcp""#;
    const DNS: &str = r#"service="dns \"v6\"",vip="2001:db8::53",port="53",protocol="udp""#;

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn metrics_render_lines() {
        let text = render(&status());
        let lines = lines(&text);
        let b11 = format!(r#"{WEB},backend="198.18.0.11""#);
        let b12 = format!(r#"{WEB},backend="198.18.0.12""#);
        let b6 = format!(r#"{DNS},backend="2001:db8::11""#);
        let expected = [
            "# HELP lb_service_packets_total Packets sent to the backends of a service.".to_string(),
            "# TYPE lb_service_packets_total counter".to_string(),
            format!("lb_service_packets_total{{{WEB}}} 42"),
            format!("lb_service_packets_total{{{DNS}}} 0"),
            format!("lb_service_bytes_total{{{WEB}}} 4200"),
            format!("lb_service_new_flows_total{{{WEB}}} 4"),
            format!("lb_backend_packets_total{{{b11}}} 42"),
            r#"lb_backend_packets_total{service="web",vip="198.18.1.10",port="80",protocol="tcp",backend="198.18.0.11"} 42"#.to_string(),
            format!("lb_backend_bytes_total{{{b11}}} 4200"),
            format!("lb_backend_new_flows_total{{{b11}}} 4"),
            format!("lb_backend_up{{{b11}}} 1"),
            format!("lb_backend_up{{{b12}}} 0"),
            format!("lb_backend_up{{{b6}}} 0"),
            format!("lb_backend_weight{{{b11}}} 100"),
            "# TYPE lb_backend_active_connections gauge".to_string(),
            format!("lb_backend_active_connections{{{b11}}} 12"),
            format!("lb_backend_inactive_connections{{{b11}}} 3"),
            format!("lb_backend_active_connections{{{b12}}} 0"),
            format!("lb_backend_weight{{{b12}}} 0"),
            "# TYPE lb_backend_probe_latency_seconds gauge".to_string(),
            format!("lb_backend_probe_latency_seconds{{{b11}}} 0.0015"),
            format!("lb_backend_probe_successes_total{{{b11}}} 17"),
            format!("lb_backend_probe_successes_total{{{b12}}} 0"),
            format!("lb_backend_probe_failures_total{{{b11}}} 2"),
            format!("lb_backend_probe_failures_total{{{b12}}} 5"),
            "# TYPE lb_packets_total counter".to_string(),
            r#"lb_packets_total{outcome="pass_not_ip"} 1000"#.to_string(),
            r#"lb_packets_total{outcome="pass_not_vip"} 1001"#.to_string(),
            r#"lb_packets_total{outcome="forwarded"} 1008"#.to_string(),
            r#"lb_packets_total{outcome="drop_no_backend"} 1009"#.to_string(),
            r#"lb_packets_total{outcome="pass_all_down"} 1014"#.to_string(),
            "lb_conntrack_hits_total 1011".to_string(),
            "lb_conntrack_misses_total 1012".to_string(),
            "lb_conntrack_insert_failures_total 1013".to_string(),
            "lb_conntrack_promotions_total 1016".to_string(),
            "lb_conntrack_established_full_total 1017".to_string(),
            "lb_conntrack_midflow_misses_total 1018".to_string(),
            r#"lb_conntrack_established_entries{state="established"} 30"#.to_string(),
            r#"lb_conntrack_established_entries{state="closing"} 4"#.to_string(),
            "lb_conntrack_established_capacity 2048".to_string(),
            "lb_conntrack_new_capacity 1024".to_string(),
            "lb_conntrack_expired_total 7".to_string(),
            "lb_persistence_hits_total 1015".to_string(),
            r#"lb_reloads_total{result="ok"} 3"#.to_string(),
            r#"lb_reloads_total{result="failed"} 1"#.to_string(),
            r#"lb_xdp_attach_mode{mode="native"} 1"#.to_string(),
            "# TYPE lb_uptime_seconds gauge".to_string(),
            "lb_uptime_seconds 3600".to_string(),
        ];
        for line in &expected {
            assert!(
                lines.contains(&line.as_str()),
                "no line {line:?} in:\n{text}"
            );
        }
        // Backends without a probe (or a success) have no probe series.
        assert!(!text.contains(&format!("lb_backend_probe_latency_seconds{{{b12}}}")));
        assert!(!text.contains(&format!("lb_backend_probe_failures_total{{{b6}}}")));
        // Non-verdicts are not packet verdicts; nothing of OpenMetrics is left.
        for absent in [
            "outcome=\"conn_hit\"",
            "outcome=\"persist_hit\"",
            "outcome=\"ct_promoted\"",
            "# EOF",
            "# UNIT",
        ] {
            assert!(!text.contains(absent), "{absent:?} in:\n{text}");
        }
        // Every family has one HELP and one TYPE line, and each series one family.
        let helps = lines.iter().filter(|l| l.starts_with("# HELP ")).count();
        let types = lines.iter().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!((helps, types), (35, 35), "{text}");
    }

    #[test]
    fn metrics_render_edge_cases() {
        // An empty snapshot still has the reloads and the uptime.
        let text = render(&Status::default());
        assert!(
            text.contains("lb_reloads_total{result=\"ok\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("lb_uptime_seconds 0\n"), "{text}");
        assert!(!text.contains("lb_xdp_attach_mode"), "{text}");
        assert!(!text.contains("lb_backend_"), "{text}");

        // Two backends of a service with the same labels: only the first is exported.
        let mut status = status();
        let mut twin = status.services[0].backends[0].clone();
        twin.packets = 7;
        status.services[0].backends.push(twin);
        let text = render(&status);
        let b11 = format!(r#"lb_backend_packets_total{{{WEB},backend="198.18.0.11"}}"#);
        assert_eq!(text.matches(&b11).count(), 1, "{text}");
        assert!(text.contains(&format!("{b11} 42\n")), "{text}");
    }

    /// Runs `promtool check metrics` on `text`; fails if promtool is missing.
    fn promtool_check(text: &str) {
        let mut child = match Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => panic!(
                "cannot run `promtool` ({e}): it is in the Debian package `prometheus` \
                 (`apt-get install -y prometheus`, or `cargo xtask setup`)"
            ),
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics failed ({}):\n{}{}\n--- input:\n{text}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
    }

    #[test]
    fn metrics_pass_promtool() {
        promtool_check(&render(&status()));
        promtool_check(&render(&Status::default()));
    }

    #[tokio::test]
    async fn metrics_served_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(RwLock::new(status()));
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(serve_listener(listener, status.clone(), shutdown));

        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let response = client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        assert_eq!(
            response.headers()[reqwest::header::CONTENT_TYPE],
            CONTENT_TYPE_TEXT
        );
        let body = response.text().await.unwrap();
        assert_eq!(body, render(&status.read().unwrap()));
        assert!(body.contains(r#"lb_backend_packets_total{service="web",vip="198.18.1.10",port="80",protocol="tcp",backend="198.18.0.11"} 42"#));

        // The next scrape sees the snapshot as it is then.
        status.write().unwrap().uptime_secs = 7200;
        let body = client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(body.contains("lb_uptime_seconds 7200\n"), "{body}");

        let response = client
            .get(format!("http://{addr}/other"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::NOT_FOUND);
        let response = client
            .post(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::METHOD_NOT_ALLOWED);

        // The client keeps its connection open; shutdown closes it.
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("serve did not stop within 10 s")
            .unwrap()
            .unwrap();
        let refused = tokio::net::TcpStream::connect(addr).await;
        assert!(refused.is_err(), "still listening after shutdown");
    }

    #[tokio::test]
    async fn metrics_serve_binds_and_stops() {
        // Bound by `serve` itself; a dropped sender stops it too.
        let status = Arc::new(RwLock::new(Status::default()));
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(serve("127.0.0.1:0".parse().unwrap(), status, shutdown));
        drop(stop);
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("serve did not stop within 10 s")
            .unwrap()
            .unwrap();

        // A listen address in use is an error.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (_stop, shutdown) = watch::channel(false);
        let status = Arc::new(RwLock::new(Status::default()));
        assert!(
            serve(taken.local_addr().unwrap(), status, shutdown)
                .await
                .is_err()
        );
    }
}
