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
    neigh::write_mac,
    plan::Plan,
    status::{BackendStatus, Status},
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

/// `dst = src`, keeping `dst`'s buffer (no allocation once the text is there).
fn set(dst: &mut String, src: &str) {
    if dst != src {
        dst.clear();
        dst.push_str(src);
    }
}

fn set_opt(dst: &mut Option<String>, src: Option<&str>) {
    match (dst.as_mut(), src) {
        (Some(d), Some(s)) => set(d, s),
        (_, s) => *dst = s.map(str::to_string),
    }
}

impl Sampler {
    /// A status for `stats` (read just now).
    pub fn status(&mut self, ctx: &Context<'_>, plan: &Plan, stats: Stats) -> Status {
        let mut status = Status::default();
        self.refresh(ctx, plan, stats, &mut status);
        status
    }

    /// Brings `status` up to date with `stats` (read just now) and `plan`, in
    /// place: every field is rewritten, but text that did not change keeps its
    /// buffer, so a refresh of ten thousand services allocates next to nothing.
    pub fn refresh(&mut self, ctx: &Context<'_>, plan: &Plan, stats: Stats, status: &mut Status) {
        let now = Instant::now();
        let (secs, prev) = match &self.last {
            Some((t, s)) => (now.duration_since(*t).as_secs_f64(), Some(s)),
            None => (0.0, None),
        };
        let counter = |list: &[lb_common::Counters], id: u32| list.get(id as usize).copied().unwrap_or_default();
        set(&mut status.iface, ctx.iface);
        set(&mut status.attach_mode, ctx.attach_mode);
        set(&mut status.pin_dir, ctx.pin_dir);
        set(&mut status.config_path, ctx.config_path);
        status.uptime_secs = ctx.uptime.as_secs();
        status.reloads_ok = ctx.reloads_ok;
        status.reloads_failed = ctx.reloads_failed;
        status.outcomes.resize_with(stat::NAMES.len(), Default::default);
        for (i, (o, n)) in status.outcomes.iter_mut().zip(stat::NAMES).enumerate() {
            set(&mut o.0, n);
            o.1 = stats.get(i as u32);
        }
        // Indexes, not searches: thousands of services, tens of thousands of
        // backends. A service's configuration by position when the plan lists
        // the file's services in the file's order (it does: `Plan::next`), else
        // by name; a backend by an id-indexed vector. With a map of the names
        // and a hash map of the ids this refresh took 25 ms at 10,000 services
        // x 8, with these 7 to 12.
        let services = &ctx.config.services;
        let in_order =
            services.len() == plan.services.len() && services.iter().zip(&plan.services).all(|(c, s)| c.name == s.name);
        let configs: BTreeMap<&str, &crate::config::ServiceConfig> = match in_order {
            true => BTreeMap::new(),
            false => services.iter().map(|c| (c.name.as_str(), &**c)).collect(),
        };
        let by_id = plan.backends_by_id();
        let mut mac = String::with_capacity(17);
        status.services.truncate(plan.services.len());
        status.services.resize_with(plan.services.len(), Default::default);
        for (i, (s, svc)) in plan.services.iter().zip(&mut status.services).enumerate() {
            let cfg = if in_order { Some(&*services[i]) } else { configs.get(s.name.as_str()).copied() };
            let c = counter(&stats.services, s.value.id);
            let p = prev.map(|p| counter(&p.services, s.value.id)).unwrap_or(c);
            set(&mut svc.name, &s.name);
            svc.vip = Some(s.vip);
            svc.vip_prefix = cfg.and_then(|c| c.vip_prefix);
            svc.port = s.port;
            set(&mut svc.protocol, s.protocol.as_str());
            set(&mut svc.scheduler, cfg.map(|c| c.scheduler.as_str()).unwrap_or("maglev"));
            set(&mut svc.forwarding, cfg.map(|c| c.forwarding.as_str()).unwrap_or_default());
            svc.table_size = s.table_size;
            set(&mut svc.on_all_down, cfg.map(|c| c.on_all_down.as_str()).unwrap_or_default());
            svc.using_backups = s.using_backups;
            svc.packets = c.packets;
            svc.bytes = c.bytes;
            svc.new_flows = c.new_flows;
            svc.packets_per_sec = rate(c.packets, p.packets, secs);
            svc.bytes_per_sec = rate(c.bytes, p.bytes, secs);
            let backends = s.backend_ids.iter().filter_map(|&id| by_id.get(id));
            let mut n = 0;
            for b in backends {
                if n == svc.backends.len() {
                    svc.backends.push(BackendStatus::default());
                }
                let out = &mut svc.backends[n];
                n += 1;
                let c = counter(&stats.backends, b.id);
                let p = prev.map(|p| counter(&p.backends, b.id)).unwrap_or(c);
                let (active_conns, inactive_conns) = stats.conns.get(b.id as usize).copied().unwrap_or_default();
                let bcfg = cfg.and_then(|c| c.backends.iter().find(|x| x.address == b.address));
                let probe = bcfg.filter(|x| x.probe.kind != ProbeKind::None).map(|x| {
                    let key = TargetKey { service: s.name.clone(), backend: b.address };
                    let st = ctx.checker.probe_stats(&key).unwrap_or_default();
                    (x.probe.kind.name(), st)
                });
                match (&mut out.probe, probe) {
                    (_, None) => out.probe = None,
                    (slot, Some((kind, st))) => {
                        let p = slot.get_or_insert_with(Default::default);
                        set(&mut p.kind, kind);
                        p.last_latency_secs = st.last_latency.map(|d| d.as_secs_f64());
                        p.successes = st.successes;
                        p.failures = st.failures;
                    }
                }
                out.address = Some(b.address);
                out.weight = b.weight;
                out.config_weight = bcfg.map(|x| x.weight).unwrap_or(b.weight);
                out.backup = b.backup;
                out.drained = !ctx.drained.is_empty() && ctx.drained.contains(&(s.name.clone(), b.address));
                set(&mut out.health, if b.mac.is_none() {
                    "unresolved"
                } else if b.up {
                    "up"
                } else {
                    "down"
                });
                set_opt(&mut out.mac, b.mac.as_ref().map(|m| {
                    mac.clear();
                    write_mac(&mut mac, m);
                    mac.as_str()
                }));
                out.packets = c.packets;
                out.bytes = c.bytes;
                out.new_flows = c.new_flows;
                out.packets_per_sec = rate(c.packets, p.packets, secs);
                out.bytes_per_sec = rate(c.bytes, p.bytes, secs);
                out.active_conns = active_conns;
                out.inactive_conns = inactive_conns;
            }
            svc.backends.truncate(n);
        }
        self.last = Some((now, stats));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::DownSet;

    const CFG: &str = "services:
  - name: web
    vip: 198.18.0.1
    port: 80
    scheduler: rr
    backends:
      - address: 198.18.0.11
        weight: 3
  - name: dns
    vip: 198.18.0.2
    port: 53
    protocol: udp
    backends:
      - address: 198.18.0.12
";

    fn status_of(config: &Config, plan: &Plan) -> Status {
        let (events, _) = tokio::sync::mpsc::unbounded_channel();
        let (checker, drained) = (Checker::new(1, events), BTreeSet::new());
        let ctx = Context {
            config,
            config_path: "lb.yaml",
            iface: "eth0",
            attach_mode: "native",
            pin_dir: "/sys/fs/bpf/lb",
            uptime: Duration::ZERO,
            reloads_ok: 0,
            reloads_failed: 0,
            drained: &drained,
            checker: &checker,
        };
        Sampler::default().status(&ctx, plan, Stats::default())
    }

    /// A service's configuration is found by position when the plan lists the
    /// file's services in its order, by name otherwise: both show each service
    /// and backend with its own.
    #[test]
    fn each_service_shows_its_own_configuration_in_the_files_order_or_not() {
        let config = crate::config::parse(CFG, "lb.yaml").expect("valid config");
        let macs = Plan::backend_addresses(&config).into_iter().map(|a| (a, [2, 0, 0, 0, 0, 1])).collect();
        let plan = Plan::next(&config, &macs, &DownSet::new(), None);
        let mut reordered = plan.clone();
        reordered.services.reverse();
        for plan in [&plan, &reordered] {
            let status = status_of(&config, plan);
            let service = |name: &str| status.services.iter().find(|s| s.name == name).expect("service listed");
            let (web, dns) = (service("web"), service("dns"));
            assert_eq!((web.scheduler.as_str(), web.protocol.as_str(), web.port), ("rr", "tcp", 80));
            assert_eq!((dns.scheduler.as_str(), dns.protocol.as_str(), dns.port), ("maglev", "udp", 53));
            assert_eq!(web.backends.len(), 1);
            assert_eq!((web.backends[0].address, web.backends[0].config_weight), (Some("198.18.0.11".parse().unwrap()), 3));
            assert_eq!(dns.backends[0].address, Some("198.18.0.12".parse().unwrap()));
            assert_eq!(dns.backends[0].health, "up");
        }
    }
}
