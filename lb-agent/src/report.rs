//! Human-readable counters: the `stats` command and the totals logged at exit.

use std::path::Path;

use anyhow::{Context, Result};
use lb_common::{stat, BACKEND_ACTIVE};

use crate::{
    config::{self, Config},
    dataplane::{self, Stats},
    plan::{addr_key, Plan},
};

/// Rows of (service, backend address, packets, bytes) for every backend.
pub fn backend_rows(plan: &Plan, stats: &Stats) -> Vec<(String, String, u64, u64)> {
    plan.backends
        .iter()
        .map(|b| {
            let c = stats.backends.get(b.id as usize).copied().unwrap_or_default();
            (plan.services[b.service].name.clone(), b.address.to_string(), c.packets, c.bytes)
        })
        .collect()
}

/// One line per service (its name, if it has one, protocol and vip:port) followed by
/// one per backend (`inactive` when it takes no traffic: down, unresolved or removed),
/// then the non-zero outcome counters.
pub fn format_stats(plan: &Plan, stats: &Stats) -> String {
    let mut out = String::new();
    let by_id = plan.backends_by_id();
    for s in &plan.services {
        let c = stats.services.get(s.value.id as usize).copied().unwrap_or_default();
        let name = if s.name.is_empty() { String::new() } else { format!("{} ", s.name) };
        out += &format!(
            "{name}{} {}  packets {}  bytes {}  new_flows {}\n",
            s.protocol,
            std::net::SocketAddr::new(s.vip, s.port),
            c.packets,
            c.bytes,
            c.new_flows
        );
        for b in s.backend_ids.iter().filter_map(|&id| by_id.get(id)) {
            let c = stats.backends.get(b.id as usize).copied().unwrap_or_default();
            let state = if b.flags & BACKEND_ACTIVE == 0 { "  inactive" } else { "" };
            out += &format!(
                "  -> {:<40} packets {:<10} bytes {:<12} new_flows {}{state}\n",
                b.address, c.packets, c.bytes, c.new_flows
            );
        }
    }
    out += "outcomes:";
    for (i, name) in stat::NAMES.iter().enumerate() {
        let v = stats.get(i as u32);
        if v != 0 {
            out += &format!(" {name}={v}");
        }
    }
    out.push('\n');
    out
}

/// Prints the counters of the agent whose maps are pinned under `pin_dir`. Which id is
/// which service and backend is read from those maps (ids are handed out by the
/// running agent, stable across reloads, so they cannot be derived from a file); the
/// configuration file, if given, only names the services.
pub fn print_stats(config_path: Option<&Path>, pin_dir: &Path) -> Result<()> {
    let reading = || format!("reading the maps pinned under {} (is the agent running?)", pin_dir.display());
    let mut plan = dataplane::read_pinned_plan(pin_dir).with_context(reading)?;
    let stats = Stats::read_pinned(pin_dir).with_context(reading)?;
    let cfg = config_path.and_then(|path| match config::load(path) {
        Ok(cfg) => Some(cfg),
        Err(e) => {
            eprintln!("warning: services are shown unnamed: invalid configuration:\n{e}");
            None
        }
    });
    name_services(&mut plan, cfg.as_ref());
    print!("{}", format_stats(&plan, &stats));
    Ok(())
}

/// Names the services of `plan` after the services of `cfg` with the same vip, port
/// and protocol, and orders them as in `cfg` (the others after them, by id).
pub fn name_services(plan: &mut Plan, cfg: Option<&Config>) {
    let place = |s: &crate::plan::PlannedService| {
        cfg.and_then(|cfg| {
            cfg.services.iter().enumerate().find(|(_, c)| {
                addr_key(c.vip) == s.key.addr && c.port == s.key.port && c.protocol.number() == s.key.proto
            })
        })
    };
    let mut order: Vec<(usize, u32, usize)> = plan
        .services
        .iter()
        .enumerate()
        .map(|(index, s)| (place(s).map_or(usize::MAX, |(i, _)| i), s.value.id, index))
        .collect();
    order.sort_unstable();
    let mut new_index = vec![0; plan.services.len()];
    let mut old: Vec<Option<crate::plan::PlannedService>> = plan.services.drain(..).map(Some).collect();
    for (new, &(_, _, index)) in order.iter().enumerate() {
        new_index[index] = new;
        let mut s = old[index].take().expect("each service once");
        if let Some((_, c)) = place(&s) {
            s.name = c.name.clone();
        }
        plan.services.push(s);
    }
    for b in &mut plan.backends {
        b.service = new_index[b.service];
    }
}

pub fn log_totals(plan: &Plan, stats: &Stats) {
    for line in format_stats(plan, stats).lines() {
        tracing::info!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{Backend, Counters, Service, VipKey};

    use super::*;
    use crate::plan::from_maps;

    fn key(vip: &str, port: u16, proto: u8) -> VipKey {
        VipKey { addr: addr_key(vip.parse().unwrap()), port, proto, _pad: 0 }
    }

    fn backend(service_id: u32, addr: &str) -> Backend {
        let addr = addr_key(addr.parse().unwrap());
        Backend { flags: BACKEND_ACTIVE, service_id, generation: 1, addr, ..Backend::default() }
    }

    #[test]
    fn counters_follow_the_maps_and_the_file_only_names_services() {
        // As after a reload: `dns` (id 0) and `web` (id 1, whose 198.18.0.12 was added
        // last and got id 3), listed in the other order in the file.
        let services = [
            (key("198.18.1.10", 53, 17), Service { id: 0, ..Service::default() }, Vec::new()),
            (key("198.18.1.10", 80, 6), Service { id: 1, ..Service::default() }, Vec::new()),
            (key("2001:db8:1::10", 80, 6), Service { id: 2, ..Service::default() }, Vec::new()),
        ];
        let backends = [
            (0, backend(0, "198.18.0.11")),
            (1, backend(1, "198.18.0.11")),
            (2, backend(1, "198.18.0.13")),
            (3, backend(1, "198.18.0.12")),
            (4, Backend { flags: 0, ..backend(2, "2001:db8::11") }),
        ];
        let mut plan = from_maps(&services, &backends, Default::default(), &Plan::default());
        let cfg = config::parse(
            "services:
  - {name: web, vip: 198.18.1.10, port: 80, backends: [{address: 198.18.0.11}, {address: 198.18.0.12}, {address: 198.18.0.13}]}
  - {name: dns, vip: 198.18.1.10, port: 53, protocol: udp, backends: [{address: 198.18.0.11}]}
",
            "lb.yaml",
        )
        .unwrap();
        name_services(&mut plan, Some(&cfg));
        let counters = |n: u64| Counters { packets: 10 * n, bytes: 100 * n, new_flows: n };
        let stats = Stats {
            global: Vec::new(),
            services: (0..3).map(counters).collect(),
            backends: (0..5).map(counters).collect(),
            conns: Vec::new(),
        };
        assert_eq!(
            format_stats(&plan, &stats),
            "web tcp 198.18.1.10:80  packets 10  bytes 100  new_flows 1
  -> 198.18.0.11                              packets 10         bytes 100          new_flows 1
  -> 198.18.0.12                              packets 30         bytes 300          new_flows 3
  -> 198.18.0.13                              packets 20         bytes 200          new_flows 2
dns udp 198.18.1.10:53  packets 0  bytes 0  new_flows 0
  -> 198.18.0.11                              packets 0          bytes 0            new_flows 0
tcp [2001:db8:1::10]:80  packets 20  bytes 200  new_flows 2
  -> 2001:db8::11                             packets 40         bytes 400          new_flows 4  inactive
outcomes:
"
        );
        let rows = backend_rows(&plan, &stats);
        assert_eq!(rows[0].0, "dns", "backends point at their renumbered service");
        assert_eq!(rows[0].1, "198.18.0.11");
    }
}
