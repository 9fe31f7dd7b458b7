//! Following the kernel's routes for tunnel backends: their next hops are looked up
//! again every `EVERY`, and a change re-plans (frames go to the new next hop's MAC
//! once it is resolved).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use super::Agent;
use crate::{
    config::Config,
    neigh::{Interface, Mac},
    nexthop::{NextHops, TunnelParams},
    plan::Plan,
};

/// How often tunnel backends' routes are looked up again.
const EVERY: Duration = Duration::from_secs(2);

impl Agent {
    /// Each backend's MAC for a plan of `config`: its next hop's.
    pub(super) fn backend_macs(&self, config: &Config) -> BTreeMap<IpAddr, Mac> {
        self.nexthops.backend_macs(&Plan::backend_addresses(config), &self.macs)
    }

    /// The tunnel settings for `config` on this interface.
    pub(super) fn tunnel_params(&self, config: &Config) -> Result<TunnelParams, String> {
        TunnelParams::resolve(config, self.arms.tunnel_iface(), &self.addresses)
    }

    /// Looks the tunnel backends' routes up again when due; re-plans on a change.
    pub(super) async fn refresh_routes(&mut self) {
        if !NextHops::needed(&self.config, &self.arms) || self.routes_checked.elapsed() < EVERY {
            return;
        }
        self.routes_checked = Instant::now();
        if let Ok(addresses) = super::arms::tunnel_addresses(&self.nl, &self.arms).await {
            self.addresses = addresses;
        }
        let fresh = NextHops::lookup(&self.nl, &self.arms, &self.config).await;
        if fresh == self.nexthops {
            return;
        }
        tracing::info!("a backend's route changed: following it");
        self.nexthops = fresh;
        for (addr, why) in self.nexthops.unroutable() {
            tracing::error!(backend = %addr, "tunnel backend unreachable: {why}; left out of the tables");
        }
        let _ = self.replan("route");
    }
}

/// Logs what keeps backends or services out of `plan`: unroutable tunnel
/// backends, unresolved MACs, services with no usable backend or on backups.
pub(super) fn report_unusable(plan: &Plan, iface: &Interface, nexthops: &NextHops) {
    for (addr, why) in nexthops.unroutable() {
        tracing::error!(backend = %addr, iface = %iface.name, "tunnel backend unreachable: {why}; left out of the tables");
    }
    for (service, addr) in plan.unresolved() {
        if nexthops.neighbour(addr).is_none() {
            continue;
        }
        tracing::error!(service, backend = %addr, iface = %iface.name,
            "backend MAC not resolved (no ARP/ND answer on the interface): left out of the table");
    }
    for s in &plan.services {
        if s.table.is_empty() {
            tracing::error!(service = %s.name, "service has no usable backend");
        } else if s.using_backups {
            tracing::warn!(service = %s.name, "no primary backend is up: serving from backups");
        }
    }
}
