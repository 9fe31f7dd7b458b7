//! From a validated configuration, the backends' MACs and their health to the exact
//! contents of every map: pure, so tests can compute what the kernel will be given.
//!
//! Ids are stable: a plan built from a previous one keeps every (service, backend)
//! on its id, so a reload or a health change never renumbers live backends. A
//! first plan numbers services in file order and a service's backends in address
//! order, so two agents given the same file (in any backend order) write identical
//! maps. An id given to a different backend gets a new generation, which the
//! connection table checks, so an old flow is never sent to a newcomer.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
    sync::Arc,
};

use lb_common::{
    Backend, Service, VipKey, BACKEND_ACCEPTS_NEW, BACKEND_ACTIVE, SERVICE_PASS_ON_EMPTY,
    SERVICE_PERSIST,
};

use crate::{
    config::{Config, Forwarding, OnAllDown, Protocol, Scheduler},
    maglev::{build_table, MaglevBackend},
    neigh::Mac,
};

mod adopt;
mod reuse;

pub use self::adopt::from_maps;

/// The 16-byte address form the maps use (IPv4 as `::ffff:a.b.c.d`).
pub fn addr_key(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => lb_common::v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

/// Hands out small integer ids, reusing released ones (oldest first) with a new
/// generation each time.
#[derive(Debug, Clone, Default)]
pub struct IdAlloc {
    next: u32,
    free: VecDeque<u32>,
    generation: Vec<u32>,
}

impl IdAlloc {
    fn take(&mut self) -> (u32, u32) {
        let id = self.free.pop_front().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        });
        if self.generation.len() <= id as usize {
            self.generation.resize(id as usize + 1, 0);
        }
        self.generation[id as usize] += 1;
        (id, self.generation[id as usize])
    }

    fn release(&mut self, id: u32) {
        self.free.push_back(id);
    }

    /// One more than the highest id ever handed out.
    pub fn high_water(&self) -> u32 {
        self.next
    }
}

/// A prefix length in the 16-byte address form (96 more for IPv4): what a
/// prefix service's `VipKey::_pad` holds in a plan and what `PREFIX_SERVICES`
/// matches. Never 0 (lengths start at 1).
pub fn key_prefix_len(vip: IpAddr, len: u8) -> u8 {
    if vip.is_ipv4() { 96 + len } else { len }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedService {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub key: VipKey,
    /// `table_offset` is 0 here: the dataplane places the table.
    pub value: Service,
    /// Ids of this service's backends (in address order).
    pub backend_ids: Vec<u32>,
    /// Maglev table: slot -> backend id (empty while no backend is usable).
    /// Shared: a plan built from a previous one reuses the table of every service
    /// whose `maglev_input` did not change, and clones of a plan share them too.
    pub table: Arc<[u32]>,
    /// Distinct backend ids in `table` (the list `MAGLEV` stores it with).
    pub table_ids: u32,
    /// What the table was built from: (address, weight given to Maglev, backend
    /// id) in address order. Equal inputs and size give an equal table.
    pub maglev_input: Vec<(IpAddr, u32, u32)>,
    /// The configured table size (what the table has whenever it is not empty).
    pub table_size: u32,
    /// No primary is usable and the table is built from backups.
    pub using_backups: bool,
    /// The configuration this entry was planned from (`None`: adopted from the
    /// maps), so that the next plan copies it while it is the same (`reuse.rs`).
    pub source: Option<Arc<crate::config::ServiceConfig>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedBackend {
    pub id: u32,
    pub generation: u32,
    /// Index into `Plan::services`.
    pub service: usize,
    pub address: IpAddr,
    pub weight: u32,
    pub backup: bool,
    /// `None`: not resolved, so never sent traffic.
    pub mac: Option<Mac>,
    /// Health from the probes (true when not probed).
    pub up: bool,
    /// `BACKEND_ACTIVE` / `BACKEND_ACCEPTS_NEW`.
    pub flags: u32,
    /// The service's forwarding mode (`lb_common::FORWARD_*`) and its port
    /// (`Backend::port`: the GUE port, or a `nat` backend's port).
    pub forward: u8,
    pub port: u16,
    /// The interface its frames leave by (`Backend::egress`): `EGRESS_SAME` unless
    /// two-arm puts its next hop on the backend interface (`Plan::set_egress`).
    pub egress: u8,
}

impl PlannedService {
    /// The prefix length in the 16-byte form for a prefix service.
    pub fn prefix_len(&self) -> Option<u8> {
        (self.key._pad != 0).then_some(self.key._pad)
    }
}

impl PlannedBackend {
    pub fn map_value(&self, service_id: u32) -> Backend {
        Backend {
            mac: self.mac.unwrap_or([0; 6]),
            forward: self.forward,
            egress: self.egress,
            flags: self.flags,
            service_id,
            generation: self.generation,
            addr: addr_key(self.address),
            port: self.port,
            weight: if self.flags & BACKEND_ACCEPTS_NEW != 0 { self.weight.min(u32::from(u16::MAX)) as u16 } else { 0 },
        }
    }
}

/// A plan's backends indexed by id (`Plan::backends_by_id`): ids are handed
/// out densely from 0, so a vector, not a hash map (at 80,000 backends the
/// status refresh spent most of its time hashing).
pub struct BackendsById<'a>(Vec<Option<&'a PlannedBackend>>);

impl<'a> BackendsById<'a> {
    /// The backend with id `id`, if the plan has one.
    pub fn get(&self, id: u32) -> Option<&'a PlannedBackend> {
        self.0.get(id as usize).copied().flatten()
    }
}

#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub services: Vec<PlannedService>,
    /// Indexed by backend id (ids are dense per plan only when built from scratch;
    /// use `backend(id)` to look one up).
    pub backends: Vec<PlannedBackend>,
    /// `VIP_ADDRS` contents: address -> any-port flags.
    pub vip_addrs: BTreeMap<[u8; 16], u32>,
    pub conntrack_size: u32,
    /// Size of `CT_ESTABLISHED`; 0: flows stay in `CONNTRACK` (no protection).
    pub established_size: u32,
    /// Some service forwards with `nat` (`CONFIG_NAT`: replies are looked for).
    pub nat: bool,
    /// Some service forwards with `fullnat` (`CONFIG_FULLNAT`).
    pub fullnat: bool,
    /// `SNAT_POOLS` contents: service id -> the pool of a `fullnat` service.
    pub snat_pools: BTreeMap<u32, lb_common::SnatPool>,
    /// `answer_ping`, `forward_icmp`.
    pub answer_ping: bool,
    pub forward_icmp: bool,
    /// `syn_flood_kps` (`CONFIG`): 0, as in `Plan::default`, records every SYN.
    pub syn_flood_kps: u16,
    /// Size of `FRAGS` and its entries' lifetime in seconds.
    pub frags_size: u32,
    pub frag_timeout_s: u32,
    pub service_ids: IdAlloc,
    pub backend_ids: IdAlloc,
}

/// Health of the backends: the (service name, address) pairs that are down.
pub type DownSet = BTreeSet<(String, IpAddr)>;

impl Plan {
    /// A first plan with every backend up.
    pub fn build(config: &Config, macs: &BTreeMap<IpAddr, Mac>) -> Plan {
        Plan::next(config, macs, &DownSet::new(), None)
    }

    /// The plan for `config`, keeping the ids of `prev` for what both share.
    pub fn next(config: &Config, macs: &BTreeMap<IpAddr, Mac>, down: &DownSet, prev: Option<&Plan>) -> Plan {
        let mut service_ids = prev.map(|p| p.service_ids.clone()).unwrap_or_default();
        let mut backend_ids = prev.map(|p| p.backend_ids.clone()).unwrap_or_default();
        let prev_services: BTreeMap<VipKey, &PlannedService> =
            prev.map(|p| p.services.iter().map(|s| (s.key, s)).collect()).unwrap_or_default();
        // Backends of the previous plan by id (ids are small and dense).
        let mut prev_by_id: Vec<Option<&PlannedBackend>> = Vec::new();
        for b in prev.map(|p| p.backends.as_slice()).unwrap_or_default() {
            if prev_by_id.len() <= b.id as usize {
                prev_by_id.resize(b.id as usize + 1, None);
            }
            prev_by_id[b.id as usize] = Some(b);
        }

        let mut plan = Plan {
            services: Vec::with_capacity(config.services.len()),
            backends: Vec::with_capacity(config.services.iter().map(|s| s.backends.len()).sum()),
            conntrack_size: config.conntrack_size,
            established_size: config.established_size,
            nat: config.services.iter().any(|s| s.forwarding == Forwarding::Nat),
            fullnat: config.services.iter().any(|s| s.forwarding == Forwarding::Fullnat),
            answer_ping: config.answer_ping,
            forward_icmp: config.forward_icmp,
            syn_flood_kps: config.syn_flood_kps,
            frags_size: config.fragments.size,
            frag_timeout_s: config.fragments.timeout.as_secs() as u32,
            ..Plan::default()
        };
        // By id (small and dense), as `prev_by_id`: a reload of thousands of
        // services looks up every backend here.
        let mut kept_services: Vec<bool> = Vec::new();
        let mut snat_pools = BTreeMap::new();
        let mut kept_backends = vec![false; prev_by_id.len()];
        let keep = |kept: &mut Vec<bool>, id: u32| {
            if kept.len() <= id as usize {
                kept.resize(id as usize + 1, false);
            }
            kept[id as usize] = true;
        };
        let macs: std::collections::HashMap<IpAddr, Mac> = macs.iter().map(|(a, m)| (*a, *m)).collect();
        for (index, svc) in config.services.iter().enumerate() {
            let key = VipKey {
                addr: addr_key(svc.vip),
                port: svc.port,
                proto: svc.protocol.number(),
                _pad: svc.vip_prefix.map_or(0, |len| key_prefix_len(svc.vip, len)),
            };
            let old = prev_services.get(&key).copied();
            let id = match old {
                Some(o) => {
                    keep(&mut kept_services, o.value.id);
                    o.value.id
                }
                None => service_ids.take().0,
            };
            if let Some(snat) = &svc.snat {
                snat_pools.insert(id, snat_pool(snat));
            }
            // This service's backends that are down (one name clone per service).
            let down_here: Vec<IpAddr> = if down.is_empty() {
                Vec::new()
            } else {
                let from = (svc.name.clone(), IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
                down.range(from..).take_while(|(name, _)| *name == svc.name).map(|(_, a)| *a).collect()
            };
            if let Some(o) = old
                && let Some(members) = reuse::unchanged(o, svc, &prev_by_id, &macs, &down_here)
            {
                for b in members {
                    keep(&mut kept_backends, b.id);
                    plan.backends.push(PlannedBackend { service: index, ..b.clone() });
                }
                reuse::vip_flags(&mut plan.vip_addrs, svc, &key);
                plan.services.push(o.clone());
                continue;
            }
            // The service's backends in address order (the file's order among
            // equal keys), each key computed once.
            let mut sorted: Vec<([u8; 16], usize)> = svc.backends.iter().enumerate().map(|(i, b)| (addr_key(b.address), i)).collect();
            sorted.sort_unstable();
            // The previous backends of this service: (address key, address, id, generation), sorted.
            let mut before: Vec<([u8; 16], IpAddr, (u32, u32))> = match old {
                Some(o) => o
                    .backend_ids
                    .iter()
                    .filter_map(|id| prev_by_id.get(*id as usize).copied().flatten())
                    .map(|b| (addr_key(b.address), b.address, (b.id, b.generation)))
                    .collect(),
                None => Vec::new(),
            };
            before.sort_unstable_by_key(|e| e.0);
            let first = plan.backends.len();
            // Both in key order: one walk finds each backend's previous ids.
            let mut at = 0;
            for &(k, i) in &sorted {
                let b = &svc.backends[i];
                while at < before.len() && before[at].0 < k {
                    at += 1;
                }
                let known = before[at..].iter().take_while(|e| e.0 == k).find(|e| e.1 == b.address).map(|e| e.2);
                let (bid, generation) = match known {
                    Some(ids) => {
                        keep(&mut kept_backends, ids.0);
                        ids
                    }
                    None => backend_ids.take(),
                };
                let mac = macs.get(&b.address).copied();
                let up = !down_here.contains(&b.address);
                plan.backends.push(PlannedBackend {
                    id: bid,
                    generation,
                    service: index,
                    address: b.address,
                    weight: b.weight,
                    backup: b.backup,
                    mac,
                    up,
                    flags: if mac.is_some() && up { BACKEND_ACTIVE } else { 0 },
                    forward: svc.forwarding.number(),
                    port: match svc.forwarding {
                        Forwarding::Gue => svc.gue_port,
                        Forwarding::Nat | Forwarding::Fullnat => b.port.unwrap_or(svc.port),
                        _ => 0,
                    },
                    egress: lb_common::EGRESS_SAME,
                });
            }
            let members = &mut plan.backends[first..];
            let usable = |b: &PlannedBackend| b.flags & BACKEND_ACTIVE != 0 && b.weight > 0;
            let primaries_up = members.iter().any(|b| !b.backup && usable(b));
            let using_backups = !primaries_up && svc.on_all_down == OnAllDown::Backup;
            for b in members.iter_mut() {
                if usable(b) && (b.backup == using_backups) {
                    b.flags |= BACKEND_ACCEPTS_NEW;
                }
            }
            let maglev_input: Vec<(IpAddr, u32, u32)> = members
                .iter()
                .map(|b| (b.address, if b.flags & BACKEND_ACCEPTS_NEW != 0 { b.weight } else { 0 }, b.id))
                .collect();
            // Only the tables whose inputs changed are built again.
            let (table, table_ids) = match old {
                Some(o)
                    if o.table_size == svc.table_size
                        && o.maglev_input == maglev_input
                        && o.value.scheduler == svc.scheduler.number() =>
                {
                    (o.table.clone(), o.table_ids)
                }
                _ => {
                    let input: Vec<MaglevBackend> =
                        maglev_input.iter().map(|&(address, weight, _)| MaglevBackend { address, weight }).collect();
                    let indices = match svc.scheduler {
                        Scheduler::Maglev | Scheduler::Sh { .. } | Scheduler::Dh => build_table(&input, svc.table_size),
                        other => {
                            let weights: Vec<u32> = input.iter().map(|b| b.weight).collect();
                            crate::sched_tables::build(other, &weights, svc.table_size)
                        }
                    };
                    let table: Arc<[u32]> = indices.iter().map(|&i| members[i as usize].id).collect();
                    let ids = crate::maglev_map::distinct(&table);
                    (table, ids)
                }
            };

            reuse::vip_flags(&mut plan.vip_addrs, svc, &key);
            let mut value =
                Service { id, table_size: table.len() as u32, scheduler: svc.scheduler.number(), ..Service::default() };
            if svc.on_all_down == OnAllDown::Pass {
                value.flags |= SERVICE_PASS_ON_EMPTY;
            }
            if let Scheduler::Sh { prefix_v4, prefix_v6 } = svc.scheduler {
                // The client prefixes sh hashes (the fields persistence uses;
                // the two never come together).
                value.persist_prefix_v4 = prefix_v4;
                value.persist_prefix_v6 = prefix_v6;
            }
            if let Some(p) = &svc.persistence {
                value.flags |= SERVICE_PERSIST;
                value.persist_timeout_s = p.timeout.as_secs().clamp(1, u32::MAX as u64) as u32;
                value.persist_prefix_v4 = p.prefix_v4;
                value.persist_prefix_v6 = p.prefix_v6;
            }
            plan.services.push(PlannedService {
                name: svc.name.clone(),
                vip: svc.vip,
                port: svc.port,
                protocol: svc.protocol,
                key,
                value,
                backend_ids: members.iter().map(|b| b.id).collect(),
                table,
                table_ids,
                maglev_input,
                table_size: svc.table_size,
                using_backups,
                source: Some(svc.clone()),
            });
        }
        // Ids the new configuration no longer uses become reusable.
        if let Some(p) = prev {
            for s in &p.services {
                if !kept_services.get(s.value.id as usize).copied().unwrap_or(false) {
                    service_ids.release(s.value.id);
                }
            }
            for b in &p.backends {
                if !kept_backends.get(b.id as usize).copied().unwrap_or(false) {
                    backend_ids.release(b.id);
                }
            }
        }
        plan.service_ids = service_ids;
        plan.snat_pools = snat_pools;
        plan.backend_ids = backend_ids;
        plan
    }

    /// Whether the plan has prefix services (`CONFIG_PREFIX`, `lb_prefix`).
    pub fn has_prefix(&self) -> bool {
        self.services.iter().any(|s| s.key._pad != 0)
    }

    /// Every backend address of every service, once, in order.
    pub fn backend_addresses(config: &Config) -> Vec<IpAddr> {
        // Sorted and deduplicated as a vector: tens of thousands of backends
        // sharing a few hundred addresses cost a B-tree insert each otherwise.
        let mut all: Vec<IpAddr> = config.services.iter().flat_map(|s| s.backends.iter().map(|b| b.address)).collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Slots of all services' Maglev tables together.
    pub fn maglev_slots(&self) -> usize {
        self.services.iter().map(|s| s.table.len()).sum()
    }

    /// Every backend by id, for callers that look many up (a status of thousands
    /// of services).
    pub fn backends_by_id(&self) -> BackendsById<'_> {
        let mut by_id = vec![None; self.backends.iter().map(|b| b.id as usize + 1).max().unwrap_or(0)];
        for b in &self.backends {
            by_id[b.id as usize] = Some(b);
        }
        BackendsById(by_id)
    }

    /// The backend with id `id` (a linear search: see `backends_by_id`).
    pub fn backend(&self, id: u32) -> Option<&PlannedBackend> {
        self.backends.iter().find(|b| b.id == id)
    }

    /// Sets every backend's egress interface (`Backend::egress`, two-arm) from
    /// its address: the next hops' (`NextHops::egress`). Plans start with
    /// `EGRESS_SAME` everywhere (one-arm).
    pub fn set_egress(mut self, egress: impl Fn(IpAddr) -> u8) -> Plan {
        for b in &mut self.backends {
            b.egress = egress(b.address);
        }
        self
    }

    /// Backends that could not be resolved, as (service name, address).
    pub fn unresolved(&self) -> Vec<(&str, IpAddr)> {
        self.backends
            .iter()
            .filter(|b| b.mac.is_none())
            .map(|b| (self.services[b.service].name.as_str(), b.address))
            .collect()
    }

    /// The backend id a new flow of a service without persistence is sent to
    /// (what the kernel computes on a connection-table miss), or `None` when the
    /// service has no usable backend.
    pub fn backend_for(&self, service: usize, flow: &lb_common::FlowKey) -> Option<u32> {
        let t = &self.services[service].table;
        if t.is_empty() {
            return None;
        }
        let slot = lb_common::maglev_slot(lb_common::flow_hash(flow), t.len() as u32);
        t.get(slot as usize).copied()
    }
}

#[cfg(test)]
mod tests;

/// The `SNAT_POOLS` value of a service's pool (addresses past
/// `lb_common::MAX_SNAT_ADDRS` per family are refused by the configuration).
pub fn snat_pool(snat: &crate::config::Snat) -> lb_common::SnatPool {
    let mut pool = lb_common::SnatPool { port_lo: snat.ports.0, port_hi: snat.ports.1, ..Default::default() };
    for a in &snat.addresses {
        match a {
            IpAddr::V4(v4) if (pool.n_v4 as usize) < lb_common::MAX_SNAT_ADDRS => {
                pool.v4[pool.n_v4 as usize] = v4.octets();
                pool.n_v4 += 1;
            }
            IpAddr::V6(v6) if (pool.n_v6 as usize) < lb_common::MAX_SNAT_ADDRS => {
                pool.v6[pool.n_v6 as usize] = v6.octets();
                pool.n_v6 += 1;
            }
            _ => {}
        }
    }
    pool
}
