//! `lb-agent trace`: what happened to chosen packets, decision by decision.
//!
//! The client sends a [`TraceRequest`] over the control socket; the agent turns it
//! into the program's `TRACE_FILTER` ([`filter`]), swaps `lb_xdp_trace` (the
//! balancer with the trace hook) into the XDP link, reads the program's aya-log
//! records ([`Sink`], fed by `aya_log::EbpfLogger`), puts names on their ids from
//! the running plan ([`describe`]) and streams one [`TraceLine`] per packet back,
//! until the client goes away or `--count` lines were sent; then `lb_xdp` goes
//! back into the link and the filter is cleared: no trace code runs while no trace
//! does. One trace runs at a time: a second one is refused with the first one's
//! filter named.

pub mod client;
mod record;

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
};

use lb_common::{mask_addr, trace::*, TraceFilter};
use serde::{Deserialize, Serialize};

pub use record::{describe, parse_record, render_text, RawRecord};

/// Records per second (and CPU) when the client does not say.
pub const DEFAULT_BUDGET: u32 = 1000;

/// What to trace, as the client asks for it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TraceRequest {
    /// Client address or prefix (`198.51.100.7`, `198.51.100.0/24`).
    pub client: Option<String>,
    /// Destination (VIP) address.
    pub vip: Option<IpAddr>,
    /// Destination port.
    pub port: Option<u16>,
    /// The chosen backend's address.
    pub backend: Option<IpAddr>,
    /// `tcp` or `udp`.
    pub proto: Option<String>,
    /// Stop after this many packets.
    pub count: Option<u64>,
    /// Records per second and CPU at most.
    pub budget: Option<u32>,
}

impl TraceRequest {
    /// The filter in words, for messages: `client 198.51.100.7/32, port 80`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(c) = &self.client {
            parts.push(format!("client {c}"));
        }
        if let Some(v) = self.vip {
            parts.push(format!("vip {v}"));
        }
        if let Some(p) = self.port {
            parts.push(format!("port {p}"));
        }
        if let Some(b) = self.backend {
            parts.push(format!("backend {b}"));
        }
        if let Some(p) = &self.proto {
            parts.push(format!("proto {p}"));
        }
        if parts.is_empty() { "every packet".into() } else { parts.join(", ") }
    }
}

fn addr16(a: IpAddr) -> [u8; 16] {
    match a.to_canonical() {
        IpAddr::V4(v) => lb_common::v4_mapped(v.octets()),
        IpAddr::V6(v) => v.octets(),
    }
}

/// `addr` or `addr/len` as (16-byte address masked, prefix in 16-byte terms).
pub fn parse_prefix(text: &str) -> Result<([u8; 16], u8), String> {
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| format!("--client {text}: not an address or prefix"))?;
    let addr = addr.to_canonical();
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u32 = match len {
        None => max,
        Some(l) => l.parse().ok().filter(|l| *l <= max).ok_or_else(|| format!("--client {text}: prefix length must be 0..={max}"))?,
    };
    let full = if addr.is_ipv4() { 96 + len } else { len };
    Ok((mask_addr(&addr16(addr), full), full as u8))
}

/// The program's filter for a request.
pub fn filter(req: &TraceRequest) -> Result<TraceFilter, String> {
    let mut f = TraceFilter { flags: TRACE_ON, budget_per_sec: req.budget.unwrap_or(DEFAULT_BUDGET), ..Default::default() };
    if f.budget_per_sec == 0 {
        return Err("--budget must be at least 1 record per second".into());
    }
    if let Some(c) = &req.client {
        (f.client, f.client_prefix) = parse_prefix(c)?;
        f.flags |= TRACE_MATCH_CLIENT;
    }
    if let Some(v) = req.vip {
        f.vip = addr16(v);
        f.flags |= TRACE_MATCH_VIP;
    }
    if let Some(p) = req.port {
        f.port = p;
        f.flags |= TRACE_MATCH_PORT;
    }
    if let Some(b) = req.backend {
        f.backend = addr16(b);
        f.flags |= TRACE_MATCH_BACKEND;
    }
    if let Some(p) = &req.proto {
        f.proto = match p.as_str() {
            "tcp" => lb_common::PROTO_TCP,
            "udp" => lb_common::PROTO_UDP,
            other => return Err(format!("--proto {other}: tcp or udp")),
        };
        f.flags |= TRACE_MATCH_PROTO;
    }
    Ok(f)
}

/// One traced packet, with names on its ids: what `lb-agent trace` prints (one
/// line, or one JSON object with `--json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TraceLine {
    /// Seconds since the Unix epoch, when the agent read the record.
    pub time: f64,
    /// `tcp`, `udp`, or the IP protocol number.
    pub proto: String,
    pub client: Option<IpAddr>,
    pub client_port: u16,
    pub vip: Option<IpAddr>,
    pub vip_port: u16,
    /// TCP flags as letters (`S`, `A`, `F`, `R`, `P`), empty for UDP.
    pub tcp_flags: String,
    /// The service's name, when one was found.
    pub service: Option<String>,
    /// The connection-table step: `conn_hit`, `conn_miss`, `ct_promoted`, ...
    pub conntrack: String,
    /// Maglev slot in the service's table, when Maglev chose.
    pub maglev_slot: Option<u32>,
    /// Persistence sent the flow to the client's earlier backend.
    pub persistence: bool,
    pub backend: Option<IpAddr>,
    pub backend_mac: Option<String>,
    /// `up`, `draining`, `down`, `unresolved`.
    pub backend_state: Option<String>,
    /// How the frame went to the backend: `dr`, `ipip`, `gue` (the MAC is then
    /// the next hop's).
    #[serde(default)]
    pub forwarding: Option<String>,
    /// `tx`, `pass`, `drop`.
    pub verdict: String,
    /// The counter the packet moved: the outcome names of `lb-agent status`.
    pub outcome: String,
    pub bytes: u32,
}

/// Receives the program's aya-log records (on the logger's task) and hands the
/// trace ones on to the agent; anything else goes to the agent's log.
#[derive(Clone)]
pub struct Sink {
    pub to_agent: Arc<Mutex<Option<tokio::sync::mpsc::Sender<RawRecord>>>>,
}

impl log::Log for Sink {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let text = record.args().to_string();
        match parse_record(&text) {
            Some(raw) => {
                if let Ok(guard) = self.to_agent.lock()
                    && let Some(tx) = guard.as_ref()
                {
                    // Full: the agent is behind; the record is lost (the budget is
                    // what bounds the volume).
                    let _ = tx.try_send(raw);
                }
            }
            None => tracing::info!(target: "lb_ebpf", "{text}"),
        }
    }

    fn flush(&self) {}
}
