//! The loop's events on the agent: health changes, neighbour changes, the
//! backends still unresolved, and the status refresh; each ends in a new plan
//! applied (`replan`) when something changed.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use super::Agent;
use crate::{
    config::Config,
    health::{Health, HealthEvent},
    neigh::{format_mac, NeighUpdate},
    observe::Context as StatusContext,
    plan::Plan,
};

impl Agent {
    /// The configuration with run-time drains applied (weight 0).
    pub(super) fn effective<'a>(&self, config: &'a Config) -> std::borrow::Cow<'a, Config> {
        if self.drained.is_empty() {
            return std::borrow::Cow::Borrowed(config);
        }
        let mut c = config.clone();
        for s in &mut c.services {
            // Only the services with a drained backend are copied.
            if !s.backends.iter().any(|b| self.drained.contains(&(s.name.clone(), b.address))) {
                continue;
            }
            let s = std::sync::Arc::make_mut(s);
            for b in &mut s.backends {
                if self.drained.contains(&(s.name.clone(), b.address)) {
                    b.weight = 0;
                }
            }
        }
        std::borrow::Cow::Owned(c)
    }

    /// Once a second: reloads the file if its content changed. Its length and
    /// modification time are looked at first (reading a large file every second
    /// on the loop costs about a millisecond per megabyte); a file modified in
    /// the last two seconds is read anyway (a second write within the clock's
    /// granularity keeps the time and maybe the length).
    pub(super) fn file_tick(&mut self) {
        let meta = std::fs::metadata(&self.args.config).ok().map(|m| (m.len(), m.modified().ok()));
        let recent = meta.and_then(|(_, t)| t?.elapsed().ok()).is_none_or(|age| age < std::time::Duration::from_secs(2));
        if meta.is_some() && meta == self.seen_meta && !recent {
            return;
        }
        self.seen_meta = meta;
        if let Ok(bytes) = std::fs::read(&self.args.config)
            && *bytes != *self.seen
        {
            self.reload_bytes(bytes, "the file changed", None);
        }
    }

    /// Refreshes the shared status in place (see `Sampler::refresh`), the
    /// counters read now.
    pub(super) fn refresh_status(&mut self) {
        let (services, backends) = (self.plan.service_ids.high_water(), self.plan.backend_ids.high_water());
        let stats = {
            let bases = self.conn_bases.read().unwrap_or_else(|e| e.into_inner());
            match self.dp.stats_of(services, backends, &bases) {
                Ok(s) => s,
                Err(e) => return tracing::warn!(error = %e, "reading the counters"),
            }
        };
        self.refresh_with(stats);
    }

    /// The periodic refresh: the counters are read on the reader's thread
    /// (`stats_reader.rs`), the status built when they arrive (`on_stats`).
    pub(super) fn request_stats(&mut self) {
        let (services, backends) = (self.plan.service_ids.high_water(), self.plan.backend_ids.high_water());
        self.stats_reader.request(services, backends);
    }

    /// The counters the reader's thread read (`None`: it failed, logged there).
    pub(super) fn on_stats(&mut self, stats: Option<crate::dataplane::Stats>) {
        self.stats_reader.answered();
        if let Some(stats) = stats {
            self.refresh_with(stats);
        }
    }

    /// Refreshes the shared status from `stats`.
    fn refresh_with(&mut self, stats: crate::dataplane::Stats) {
        let ctx = StatusContext {
            config: &self.config,
            config_path: &self.args.config.display().to_string(),
            iface: &self.arms.client.name,
            attach_mode: &self.mode.to_string(),
            pin_dir: &self.args.pin_dir.display().to_string(),
            uptime: self.started.elapsed(),
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            drained: &self.drained,
            checker: &self.checker,
        };
        let conntrack = self.conntrack.lock().map(|c| c.clone()).unwrap_or_default();
        let announce = self.announce.status();
        let mut status = self.status.write().unwrap_or_else(|e| e.into_inner());
        self.sampler.refresh(&ctx, &self.plan, stats, &mut status);
        status.conntrack = conntrack;
        (status.conntrack.new_capacity, status.conntrack.established_capacity) = self.ct_capacity;
        status.announce = announce;
    }

    /// Recomputes the plan from the current inputs and applies it; false (logged)
    /// when the maps could not take it.
    pub(super) fn replan(&mut self, why: &str) -> bool {
        let config = self.effective(&self.config);
        let plan = Plan::next(&config, &self.backend_macs(&config), &self.down, Some(&self.plan)).set_egress(|a| self.nexthops.egress(a));
        match self.dp.apply(&plan) {
            Ok(summary) => {
                tracing::debug!(why, %summary, "maps updated");
                let old: BTreeMap<_, _> = self.plan.services.iter().map(|o| (o.key, o)).collect();
                for s in &plan.services {
                    let before = old.get(&s.key);
                    let was_empty = before.is_none_or(|o| o.table.is_empty());
                    if s.table.is_empty() && !was_empty {
                        tracing::error!(service = %s.name, "all backends down: on_all_down applies");
                    }
                    if s.using_backups && before.is_none_or(|o| !o.using_backups) {
                        tracing::warn!(service = %s.name, "no primary backend is up: serving from backups");
                    }
                }
                self.plan = plan;
                true
            }
            Err(e) => {
                tracing::error!(why, error = %e, "could not update the maps; the previous state stays");
                false
            }
        }
    }

    pub(super) fn on_health(&mut self, ev: HealthEvent) {
        let key = (ev.key.service.clone(), ev.key.backend);
        let changed = match ev.health {
            Health::Down => self.down.insert(key),
            Health::Up => self.down.remove(&key),
        };
        if changed {
            // Logged once the maps say so, so the line means "in effect".
            let state = if ev.health == Health::Up { "up" } else { "down" };
            if self.replan("health") {
                tracing::warn!(service = %ev.key.service, backend = %ev.key.backend, reason = %ev.reason, "backend {state}");
            } else {
                tracing::error!(service = %ev.key.service, backend = %ev.key.backend, reason = %ev.reason,
                    "backend {state}, but the maps could not be updated; retried on the next change");
            }
        }
    }

    /// A neighbour entry changed: a backend's MAC changed, or an unresolved backend
    /// answered (usually to `resolve_missing`'s probe) and goes into the tables.
    pub(super) fn on_neighbour(&mut self, ev: NeighUpdate) {
        let backends = self.plan.backends.iter().map(|b| b.address);
        if !self.arms.has(ev.ifindex) || !self.nexthops.is_neighbour_of(ev.addr, backends) {
            return;
        }
        let iface = self.arms.of(self.nexthops.egress_of_neighbour(ev.addr));
        if ev.ifindex != iface.index {
            return;
        }
        if ev.failed {
            tracing::warn!(backend = %ev.addr, iface = %iface.name, "backend unreachable: no ARP/ND answer");
        }
        let Some(mac) = ev.mac else { return };
        let old = self.macs.insert(ev.addr, mac);
        if old != Some(mac) && self.replan("neighbour") {
            let what = if old.is_none() { "backend MAC resolved" } else { "backend MAC changed" };
            tracing::info!(backend = %ev.addr, mac = %format_mac(&mac), "{what}");
        }
    }

    /// Re-reads the neighbour table for the backends still unresolved and probes
    /// them again, each on its backoff (`resolve`: 1 s doubling to 4 s).
    pub(super) async fn resolve_missing(&mut self) {
        self.refresh_routes().await;
        let unresolved: Vec<IpAddr> = self.plan.unresolved().iter().map(|(_, a)| *a).collect();
        let missing = self.nexthops.neighbours(&unresolved);
        let due = self.backoff.due(&missing, std::time::Instant::now());
        if due.is_empty() {
            return;
        }
        match self.nexthops.resolve(&self.nl, &self.arms, &due, Duration::ZERO).await {
            Ok(found) => {
                for addr in due.iter().filter(|a| !found.contains_key(a)) {
                    let iface = &self.arms.of(self.nexthops.egress_of_neighbour(*addr)).name;
                    tracing::debug!(backend = %addr, iface = %iface, "probing an unresolved backend again");
                    crate::neigh::probe(iface, *addr);
                }
                if found.is_empty() {
                    return;
                }
                for (addr, mac) in found {
                    tracing::info!(backend = %addr, mac = %format_mac(&mac), "backend MAC resolved");
                    self.macs.insert(addr, mac);
                }
                let _ = self.replan("resolved");
            }
            Err(e) => tracing::warn!(error = %e, "reading the neighbour table"),
        }
    }
}
