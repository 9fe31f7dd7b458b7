//! A plan from the maps an earlier agent filled (a restart that adopts them).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{Backend, Service, VipKey};

use super::{Plan, PlannedBackend, PlannedService};
use crate::config::Protocol;

/// The state an earlier agent left in the maps, as a plan, so the next plan keeps
/// its ids: services from `SERVICES` (with their current tables), backends from
/// `BACKENDS` (every id ever handed out keeps its generation); table sizes from
/// `sizes`.
pub fn from_maps(
    services: &[(VipKey, Service, Vec<u32>)],
    backends: &[(u32, Backend)],
    vip_addrs: BTreeMap<[u8; 16], u32>,
    sizes: &Plan,
) -> Plan {
    let mut plan = Plan {
        conntrack_size: sizes.conntrack_size,
        established_size: sizes.established_size,
        answer_ping: sizes.answer_ping,
        forward_icmp: sizes.forward_icmp,
        syn_flood_kps: sizes.syn_flood_kps,
        frags_size: sizes.frags_size,
        frag_timeout_s: sizes.frag_timeout_s,
        vip_addrs,
        ..Plan::default()
    };
    let mut index_of = BTreeMap::new();
    for (key, value, table) in services {
        index_of.insert(value.id, plan.services.len());
        let vip = if key.addr[..12] == lb_common::v4_mapped([0; 4])[..12] {
            IpAddr::from([key.addr[12], key.addr[13], key.addr[14], key.addr[15]])
        } else {
            IpAddr::from(key.addr)
        };
        plan.services.push(PlannedService {
            name: String::new(),
            vip,
            port: key.port,
            protocol: if key.proto == lb_common::PROTO_UDP { Protocol::Udp } else { Protocol::Tcp },
            key: *key,
            value: Service { table_offset: 0, region: 0, ..*value },
            backend_ids: Vec::new(),
            table: table.as_slice().into(),
            table_ids: crate::maglev_map::distinct(table),
            maglev_input: Vec::new(),
            table_size: value.table_size,
            using_backups: false,
            source: None,
        });
    }
    let high = |ids: &mut dyn Iterator<Item = u32>| ids.max().map_or(0, |m| m + 1);
    plan.service_ids.next = high(&mut services.iter().map(|(_, v, _)| v.id));
    plan.backend_ids.next = high(&mut backends.iter().map(|(id, _)| *id));
    plan.backend_ids.generation = vec![0; plan.backend_ids.next as usize];
    // One entry per (service, address): the active one, else the newest.
    let mut chosen: BTreeMap<(u32, [u8; 16]), (u32, Backend)> = BTreeMap::new();
    for (id, b) in backends {
        plan.backend_ids.generation[*id as usize] = b.generation;
        if !index_of.contains_key(&b.service_id) {
            continue;
        }
        let slot = chosen.entry((b.service_id, b.addr)).or_insert((*id, *b));
        if (b.flags != 0, *id) > (slot.1.flags != 0, slot.0) {
            *slot = (*id, *b);
        }
    }
    for ((service_id, addr), (id, b)) in chosen {
        let service = index_of[&service_id];
        plan.services[service].backend_ids.push(id);
        let address = if addr[..12] == lb_common::v4_mapped([0; 4])[..12] {
            IpAddr::from([addr[12], addr[13], addr[14], addr[15]])
        } else {
            IpAddr::from(addr)
        };
        plan.backends.push(PlannedBackend {
            id,
            generation: b.generation,
            service,
            address,
            weight: 0,
            backup: false,
            mac: (b.flags != 0).then_some(b.mac),
            up: b.flags != 0,
            flags: b.flags,
            forward: b.forward,
            port: b.port,
            egress: b.egress,
        });
    }
    let used_backends: BTreeSet<u32> = plan.backends.iter().map(|b| b.id).collect();
    plan.backend_ids.free = (0..plan.backend_ids.next).filter(|id| !used_backends.contains(id)).collect();
    let used_services: BTreeSet<u32> = services.iter().map(|(_, v, _)| v.id).collect();
    plan.service_ids.free = (0..plan.service_ids.next).filter(|id| !used_services.contains(id)).collect();
    plan
}
