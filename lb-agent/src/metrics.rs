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
//! | `lb_conntrack_promotions_total`, `lb_conntrack_established_full_total`, `lb_conntrack_midflow_misses_total`, `lb_conntrack_syn_unrecorded_total`, `lb_conntrack_expired_total` | counter | |
//! | `lb_conntrack_established_entries` | gauge | `state` (`established`, `closing`) |
//! | `lb_encap_ipip_total`, `lb_encap_gue_total`, `lb_nat_forwarded_total` | counter | |
//! | `lb_conntrack_established_capacity`, `lb_conntrack_new_capacity` | gauge | |
//! | `lb_conntrack_syn_filter` | gauge | (1: the SYN filter is on) |
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

use std::convert::Infallible;
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
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::status::Status;

/// Where the agent serves metrics unless configured otherwise.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9642));

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long a client may take to send a request's head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);


/// The metrics of `status` in the Prometheus text exposition format 0.0.4 (see the
/// module documentation for the families).
pub fn render(status: &Status) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector::StatusCollector(status.clone())));
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

mod collector;
#[cfg(test)]
mod tests;
