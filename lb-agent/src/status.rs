//! A snapshot of the running agent: what `lb-agent status` prints and what the
//! Prometheus endpoint exports. The agent's event loop refreshes it every second.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub iface: String,
    /// "native" or "generic".
    pub attach_mode: String,
    pub pin_dir: String,
    pub config_path: String,
    pub uptime_secs: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Global outcome counters by name (`lb_common::stat::NAMES`), in that order.
    pub outcomes: Vec<(String, u64)>,
    /// The connection table: sizes, established entries, expiries.
    #[serde(default)]
    pub conntrack: crate::conntrack::TableStatus,
    pub services: Vec<ServiceStatus>,
    /// VIP announcements (`--announce-table`), if on.
    #[serde(default)]
    pub announce: Option<Box<AnnounceStatus>>,
}

/// What the agent announces to the BGP speaker (`announce.rs`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AnnounceStatus {
    pub table: u32,
    /// The VIPs announced (a route each in `table`).
    pub vips: Vec<IpAddr>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: Option<IpAddr>,
    pub port: u16,
    /// "tcp" or "udp".
    pub protocol: String,
    /// "maglev", "rr", "wrr", "lc", "wlc".
    pub scheduler: String,
    pub table_size: u32,
    /// "drop", "pass" or "backup".
    pub on_all_down: String,
    /// No primary is up and the backups serve.
    pub using_backups: bool,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Rates over the last sampling interval.
    pub packets_per_sec: f64,
    pub bytes_per_sec: f64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BackendStatus {
    pub address: Option<IpAddr>,
    /// Weight in force (0 while drained at run time).
    pub weight: u32,
    /// Weight in the configuration file.
    pub config_weight: u32,
    pub backup: bool,
    /// Drained with `lb-agent drain` (the file still holds `config_weight`).
    pub drained: bool,
    /// "up", "down" or "unresolved" (no MAC).
    pub health: String,
    pub mac: Option<String>,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub packets_per_sec: f64,
    pub bytes_per_sec: f64,
    /// Established TCP connections (`ipvsadm -Ln`'s ActiveConn), from the
    /// connection table: exact within one sweep (2 s).
    #[serde(default)]
    pub active_conns: u32,
    /// Other live flows: TCP SYN seen or closing, UDP (`InActConn`).
    #[serde(default)]
    pub inactive_conns: u32,
    pub probe: Option<ProbeStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProbeStatus {
    /// "tcp", "http", "https", "udp", "exec".
    pub kind: String,
    /// Latency of the last successful probe.
    pub last_latency_secs: Option<f64>,
    pub successes: u64,
    pub failures: u64,
}
