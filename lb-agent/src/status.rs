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
    /// A prefix service's prefix length (`vip` is its first address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip_prefix: Option<u8>,
    pub port: u16,
    /// "tcp" or "udp".
    pub protocol: String,
    /// "maglev", "rr", "wrr", "lc", "wlc", "sh", "dh", "lblc", "lblcr".
    pub scheduler: String,
    /// "dr", "ipip" or "gue".
    #[serde(default)]
    pub forwarding: String,
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

/// The part of the status a client asks for (`lb-agent status --service NAME
/// --vip ADDR --no-backends`), chosen by the agent so that a script watching one
/// service of ten thousand is not sent all of them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StatusFilter {
    /// Only these services (by name); all when empty.
    #[serde(default)]
    pub services: Vec<String>,
    /// Only the services of this VIP.
    #[serde(default)]
    pub vip: Option<IpAddr>,
    /// Leave out the backends (service lines only).
    #[serde(default)]
    pub no_backends: bool,
}

impl StatusFilter {
    /// Whether `service` is wanted.
    pub fn wants(&self, service: &ServiceStatus) -> bool {
        let by_name = self.services.is_empty() || self.services.contains(&service.name);
        let by_vip = self.vip.is_none_or(|v| service.vip == Some(v) || service.vip == Some(v.to_canonical()));
        by_name && by_vip
    }

    /// The part of `status` this filter selects: everything but the services
    /// as is, the services filtered (copied one by one, the rest never cloned).
    pub fn select(&self, status: &Status) -> Status {
        let services = status
            .services
            .iter()
            .filter(|s| self.wants(s))
            .map(|s| {
                if self.no_backends {
                    ServiceStatus {
                        name: s.name.clone(),
                        vip: s.vip,
                        vip_prefix: s.vip_prefix,
                        port: s.port,
                        protocol: s.protocol.clone(),
                        scheduler: s.scheduler.clone(),
                        forwarding: s.forwarding.clone(),
                        table_size: s.table_size,
                        on_all_down: s.on_all_down.clone(),
                        using_backups: s.using_backups,
                        packets: s.packets,
                        bytes: s.bytes,
                        new_flows: s.new_flows,
                        packets_per_sec: s.packets_per_sec,
                        bytes_per_sec: s.bytes_per_sec,
                        backends: Vec::new(),
                    }
                } else {
                    s.clone()
                }
            })
            .collect();
        Status {
            iface: status.iface.clone(),
            attach_mode: status.attach_mode.clone(),
            pin_dir: status.pin_dir.clone(),
            config_path: status.config_path.clone(),
            uptime_secs: status.uptime_secs,
            reloads_ok: status.reloads_ok,
            reloads_failed: status.reloads_failed,
            outcomes: status.outcomes.clone(),
            conntrack: status.conntrack.clone(),
            announce: status.announce.clone(),
            services,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, vip: &str) -> ServiceStatus {
        let backend = BackendStatus { address: Some("198.18.0.11".parse().unwrap()), ..Default::default() };
        ServiceStatus { name: name.into(), vip: Some(vip.parse().unwrap()), backends: vec![backend], ..Default::default() }
    }

    #[test]
    fn a_filter_selects_services_by_name_and_vip_and_can_drop_backends() {
        let status = Status {
            iface: "eth0".into(),
            services: vec![service("web", "198.18.1.10"), service("dns", "198.18.1.10"), service("v6", "2001:db8::1")],
            ..Default::default()
        };
        assert_eq!(StatusFilter::default().select(&status), status);
        let names = |f: StatusFilter| f.select(&status).services.into_iter().map(|s| s.name).collect::<Vec<_>>();
        assert_eq!(names(StatusFilter { services: vec!["dns".into()], ..Default::default() }), ["dns"]);
        assert_eq!(names(StatusFilter { vip: Some("198.18.1.10".parse().unwrap()), ..Default::default() }), ["web", "dns"]);
        let mapped = "::ffff:198.18.1.10".parse().ok();
        assert_eq!(names(StatusFilter { vip: mapped, services: vec!["web".into()], ..Default::default() }), ["web"]);
        let bare = StatusFilter { no_backends: true, ..Default::default() }.select(&status);
        assert!(bare.services.iter().all(|s| s.backends.is_empty()) && bare.iface == "eth0");
    }
}
