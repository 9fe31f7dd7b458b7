//! Building the agent's `Status` from the plan, the counters and the probes, with
//! rates over the last sample and connection counts per backend.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_common::stat;

use crate::{
    config::Config,
    dataplane::Stats,
    health::{Checker, ProbeKind, TargetKey},
    neigh::format_mac,
    plan::Plan,
    status::{BackendStatus, ProbeStatus, ServiceStatus, Status},
};

/// Counter samples kept between refreshes.
#[derive(Default)]
pub struct Sampler {
    last: Option<(Instant, Stats)>,
}

/// What the status needs besides the plan and the counters.
pub struct Context<'a> {
    pub config: &'a Config,
    pub config_path: &'a str,
    pub iface: &'a str,
    pub attach_mode: &'a str,
    pub pin_dir: &'a str,
    pub uptime: Duration,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub drained: &'a BTreeSet<(String, IpAddr)>,
    pub checker: &'a Checker,
}

fn rate(now: u64, before: u64, secs: f64) -> f64 {
    if secs <= 0.0 { 0.0 } else { now.saturating_sub(before) as f64 / secs }
}

impl Sampler {
    /// A status for `stats` (read just now).
    pub fn status(&mut self, ctx: &Context<'_>, plan: &Plan, stats: Stats) -> Status {
        let now = Instant::now();
        let (secs, prev) = match &self.last {
            Some((t, s)) => (now.duration_since(*t).as_secs_f64(), Some(s)),
            None => (0.0, None),
        };
        let counter = |list: &[lb_common::Counters], id: u32| list.get(id as usize).copied().unwrap_or_default();
        let mut status = Status {
            iface: ctx.iface.into(),
            attach_mode: ctx.attach_mode.into(),
            pin_dir: ctx.pin_dir.into(),
            config_path: ctx.config_path.into(),
            uptime_secs: ctx.uptime.as_secs(),
            reloads_ok: ctx.reloads_ok,
            reloads_failed: ctx.reloads_failed,
            outcomes: stat::NAMES.iter().enumerate().map(|(i, n)| (n.to_string(), stats.get(i as u32))).collect(),
            conntrack: Default::default(),
            services: Vec::new(),
            announce: None,
        };
        // Indexes, not searches: thousands of services, tens of thousands of backends.
        let configs: BTreeMap<&str, &crate::config::ServiceConfig> =
            ctx.config.services.iter().map(|c| (c.name.as_str(), c)).collect();
        let by_id = plan.backends_by_id();
        for s in &plan.services {
            let cfg = configs.get(s.name.as_str()).copied();
            let c = counter(&stats.services, s.value.id);
            let p = prev.map(|p| counter(&p.services, s.value.id)).unwrap_or(c);
            let mut svc = ServiceStatus {
                name: s.name.clone(),
                vip: Some(s.vip),
                vip_prefix: cfg.and_then(|c| c.vip_prefix),
                port: s.port,
                protocol: s.protocol.as_str().into(),
                scheduler: cfg.map(|c| c.scheduler.as_str()).unwrap_or("maglev").into(),
                forwarding: cfg.map(|c| c.forwarding.as_str().to_string()).unwrap_or_default(),
                table_size: s.table_size,
                on_all_down: cfg.map(|c| c.on_all_down.as_str().to_string()).unwrap_or_default(),
                using_backups: s.using_backups,
                packets: c.packets,
                bytes: c.bytes,
                new_flows: c.new_flows,
                packets_per_sec: rate(c.packets, p.packets, secs),
                bytes_per_sec: rate(c.bytes, p.bytes, secs),
                backends: Vec::with_capacity(s.backend_ids.len()),
            };
            for b in s.backend_ids.iter().filter_map(|id| by_id.get(id).copied()) {
                let c = counter(&stats.backends, b.id);
                let p = prev.map(|p| counter(&p.backends, b.id)).unwrap_or(c);
                let (active_conns, inactive_conns) = stats.conns.get(b.id as usize).copied().unwrap_or_default();
                let bcfg = cfg.and_then(|c| c.backends.iter().find(|x| x.address == b.address));
                let probe = bcfg.filter(|x| x.probe.kind != ProbeKind::None).map(|x| {
                    let key = TargetKey { service: s.name.clone(), backend: b.address };
                    let st = ctx.checker.probe_stats(&key).unwrap_or_default();
                    ProbeStatus {
                        kind: x.probe.kind.name().into(),
                        last_latency_secs: st.last_latency.map(|d| d.as_secs_f64()),
                        successes: st.successes,
                        failures: st.failures,
                    }
                });
                svc.backends.push(BackendStatus {
                    address: Some(b.address),
                    weight: b.weight,
                    config_weight: bcfg.map(|x| x.weight).unwrap_or(b.weight),
                    backup: b.backup,
                    drained: !ctx.drained.is_empty() && ctx.drained.contains(&(s.name.clone(), b.address)),
                    health: if b.mac.is_none() {
                        "unresolved"
                    } else if b.up {
                        "up"
                    } else {
                        "down"
                    }
                    .into(),
                    mac: b.mac.as_ref().map(format_mac),
                    packets: c.packets,
                    bytes: c.bytes,
                    new_flows: c.new_flows,
                    packets_per_sec: rate(c.packets, p.packets, secs),
                    bytes_per_sec: rate(c.bytes, p.bytes, secs),
                    active_conns,
                    inactive_conns,
                    probe,
                });
            }
            status.services.push(svc);
        }
        self.last = Some((now, stats));
        status
    }
}
