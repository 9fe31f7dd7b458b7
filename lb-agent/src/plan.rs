//! From a validated configuration and the backends' MACs to the exact contents of
//! every map: pure, so tests can compute what the kernel will be given.
//!
//! Ids are a function of the configuration alone: services are numbered in file
//! order, and a service's backends in address order, so two agents given the same
//! file (in any backend order) write identical maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{Backend, Service, VipKey, BACKEND_ACTIVE, VIP_ANY_PORT_TCP, VIP_ANY_PORT_UDP};

use crate::{
    config::{Config, Protocol},
    maglev::{build_table, MaglevBackend},
    neigh::Mac,
};

/// The 16-byte address form the maps use (IPv4 as `::ffff:a.b.c.d`).
pub fn addr_key(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => lb_common::v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

#[derive(Debug, Clone)]
pub struct PlannedService {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub key: VipKey,
    pub value: Service,
    /// Ids of this service's backends (in address order).
    pub backend_ids: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct PlannedBackend {
    pub id: u32,
    /// Index into `Plan::services`.
    pub service: usize,
    pub address: IpAddr,
    pub weight: u32,
    /// `None`: not resolved, so left out of the Maglev table.
    pub mac: Option<Mac>,
}

impl PlannedBackend {
    pub fn map_value(&self, service_id: u32) -> Backend {
        match self.mac {
            Some(mac) => Backend { mac, _pad: [0; 2], flags: BACKEND_ACTIVE, service_id },
            None => Backend { mac: [0; 6], _pad: [0; 2], flags: 0, service_id },
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub services: Vec<PlannedService>,
    pub backends: Vec<PlannedBackend>,
    /// `VIP_ADDRS` contents: address -> any-port flags.
    pub vip_addrs: BTreeMap<[u8; 16], u32>,
    /// `MAGLEV` contents: every service's table back to back.
    pub maglev: Vec<u32>,
    pub conntrack_size: u32,
}

impl Plan {
    /// Builds the plan. `macs` holds the resolved backends; the others are kept
    /// (with ids and counters) but own no Maglev slot.
    pub fn build(config: &Config, macs: &BTreeMap<IpAddr, Mac>) -> Plan {
        let mut plan = Plan { conntrack_size: config.conntrack_size, ..Plan::default() };
        for (index, svc) in config.services.iter().enumerate() {
            let id = index as u32;
            let mut sorted: Vec<_> = svc.backends.iter().collect();
            sorted.sort_by_key(|b| addr_key(b.address));
            let first_id = plan.backends.len() as u32;
            let mut ids = Vec::with_capacity(sorted.len());
            for b in &sorted {
                let bid = plan.backends.len() as u32;
                ids.push(bid);
                plan.backends.push(PlannedBackend {
                    id: bid,
                    service: index,
                    address: b.address,
                    weight: b.weight,
                    mac: macs.get(&b.address).copied(),
                });
            }
            // Unresolved backends take part with weight 0: present, but no slots.
            let input: Vec<MaglevBackend> = plan.backends[first_id as usize..]
                .iter()
                .map(|b| MaglevBackend { address: b.address, weight: if b.mac.is_some() { b.weight } else { 0 } })
                .collect();
            let table = build_table(&input, svc.table_size);
            let offset = plan.maglev.len() as u32;
            plan.maglev.extend(table.iter().map(|&i| first_id + i));
            let key = VipKey {
                addr: addr_key(svc.vip),
                port: svc.port,
                proto: svc.protocol.number(),
                _pad: 0,
            };
            let flags = plan.vip_addrs.entry(key.addr).or_insert(0);
            if svc.port == 0 {
                *flags |= match svc.protocol {
                    Protocol::Tcp => VIP_ANY_PORT_TCP,
                    Protocol::Udp => VIP_ANY_PORT_UDP,
                };
            }
            plan.services.push(PlannedService {
                name: svc.name.clone(),
                vip: svc.vip,
                port: svc.port,
                protocol: svc.protocol,
                key,
                value: Service { id, table_offset: offset, table_size: table.len() as u32, flags: 0 },
                backend_ids: ids,
            });
        }
        plan
    }

    /// Every backend address of every service, once.
    pub fn backend_addresses(config: &Config) -> Vec<IpAddr> {
        let set: BTreeSet<IpAddr> =
            config.services.iter().flat_map(|s| s.backends.iter().map(|b| b.address)).collect();
        set.into_iter().collect()
    }

    /// Backends that could not be resolved, as (service name, address).
    pub fn unresolved(&self) -> Vec<(&str, IpAddr)> {
        self.backends
            .iter()
            .filter(|b| b.mac.is_none())
            .map(|b| (self.services[b.service].name.as_str(), b.address))
            .collect()
    }

    /// The backend id a flow is sent to when it is new (what the kernel computes on
    /// a connection-table miss), or `None` when the service has no usable backend.
    pub fn backend_for(&self, service: usize, flow: &lb_common::FlowKey) -> Option<u32> {
        let s = &self.services[service].value;
        if s.table_size == 0 {
            return None;
        }
        let slot = lb_common::maglev_slot(lb_common::flow_hash(flow), s.table_size);
        self.maglev.get((s.table_offset + slot) as usize).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    const CFG: &str = "services:
  - name: web
    vip: 198.18.1.10
    port: 80
    table_size: 101
    backends:
      - address: 198.18.0.13
        weight: 2
      - address: 198.18.0.11
      - address: 198.18.0.12
  - name: any
    vip: 198.18.1.10
    port: 0
    protocol: udp
    table_size: 13
    backends:
      - address: 198.18.0.11
";

    fn macs(addrs: &[&str]) -> BTreeMap<IpAddr, Mac> {
        addrs.iter().enumerate().map(|(i, a)| (a.parse().unwrap(), [2, 0, 0, 0, 0, i as u8 + 1])).collect()
    }

    #[test]
    fn ids_and_tables_do_not_depend_on_backend_order() {
        let a = config::parse(CFG, "a.yaml").unwrap();
        let reordered = CFG.replace(
            "      - address: 198.18.0.13\n        weight: 2\n      - address: 198.18.0.11\n      - address: 198.18.0.12\n",
            "      - address: 198.18.0.12\n      - address: 198.18.0.11\n      - address: 198.18.0.13\n        weight: 2\n",
        );
        assert_ne!(reordered, CFG, "the test must reorder something");
        let b = config::parse(&reordered, "b.yaml").unwrap();
        let m = macs(&["198.18.0.11", "198.18.0.12", "198.18.0.13"]);
        let (pa, pb) = (Plan::build(&a, &m), Plan::build(&b, &m));
        assert_eq!(pa.maglev, pb.maglev);
        let addrs = |p: &Plan| p.backends.iter().map(|b| b.address).collect::<Vec<_>>();
        assert_eq!(addrs(&pa), addrs(&pb));
        // Backend ids follow address order within a service.
        assert_eq!(pa.backends[0].address, "198.18.0.11".parse::<IpAddr>().unwrap());
        assert_eq!(pa.services[1].value.table_offset, 101);
        assert_eq!(pa.maglev.len(), 101 + 13);
    }

    #[test]
    fn unresolved_backends_own_no_slots_and_any_port_sets_the_flag() {
        let cfg = config::parse(CFG, "a.yaml").unwrap();
        let plan = Plan::build(&cfg, &macs(&["198.18.0.11"]));
        let web = &plan.services[0];
        let resolved = web.backend_ids[0];
        assert!(plan.maglev[..101].iter().all(|&id| id == resolved), "only the resolved backend owns slots");
        assert_eq!(plan.unresolved().len(), 2);
        assert_eq!(plan.backends[1].map_value(0).flags, 0, "unresolved backends are not active");
        let flags = plan.vip_addrs[&addr_key("198.18.1.10".parse().unwrap())];
        assert_eq!(flags, lb_common::VIP_ANY_PORT_UDP);
    }

    #[test]
    fn a_service_with_no_resolved_backend_has_an_empty_table() {
        let cfg = config::parse(CFG, "a.yaml").unwrap();
        let plan = Plan::build(&cfg, &BTreeMap::new());
        assert!(plan.services.iter().all(|s| s.value.table_size == 0));
        let flow = lb_common::FlowKey::default();
        assert_eq!(plan.backend_for(0, &flow), None);
    }
}
