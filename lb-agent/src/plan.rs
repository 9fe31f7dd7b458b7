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
