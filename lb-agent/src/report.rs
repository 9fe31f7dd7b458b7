//! Human-readable counters: the `stats` command and the totals logged at exit.

use std::path::Path;

use anyhow::{Context, Result};
use lb_common::stat;

use crate::{config, dataplane::Stats, plan::Plan};

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

pub fn format_stats(plan: &Plan, stats: &Stats) -> String {
    let mut out = String::new();
    for s in &plan.services {
        let c = stats.services.get(s.value.id as usize).copied().unwrap_or_default();
        out += &format!(
            "{} {} {}  packets {}  bytes {}\n",
            s.name,
            s.protocol,
            std::net::SocketAddr::new(s.vip, s.port),
            c.packets,
            c.bytes
        );
        for b in s.backend_ids.iter().filter_map(|id| plan.backend(*id)) {
            let id = &b.id;
            let c = stats.backends.get(*id as usize).copied().unwrap_or_default();
            out += &format!("  -> {:<40} weight {:<5} packets {:<10} bytes {}\n", b.address, b.weight, c.packets, c.bytes);
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

pub fn print_stats(config_path: &Path, pin_dir: &Path) -> Result<()> {
    let cfg = config::load(config_path).map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
    // Ids depend on the configuration alone, not on MACs.
    let plan = Plan::build(&cfg, &Default::default());
    let stats = Stats::read_pinned(pin_dir)
        .with_context(|| format!("reading the maps pinned under {} (is the agent running?)", pin_dir.display()))?;
    print!("{}", format_stats(&plan, &stats));
    Ok(())
}

pub fn log_totals(plan: &Plan, stats: &Stats) {
    for line in format_stats(plan, stats).lines() {
        tracing::info!("{line}");
    }
}
