//! Service lookup, connection table, Maglev, and the DR rewrite.

use aya_ebpf::{bindings::BPF_ANY, programs::XdpContext};
use lb_common::{
    flow_hash, maglev_slot, stat, Backend, FlowKey, FlowVal, Service, VipKey, BACKEND_ACTIVE,
    CONFIG_READY, PROTO_TCP, VIP_ANY_PORT_TCP, VIP_ANY_PORT_UDP,
};

use crate::{
    maps::{BACKENDS, CONFIG, CONNTRACK, MAGLEV, SERVICES},
    parse::Outcome,
    stats::{count, count_forward},
};

#[inline(always)]
fn find_service(flow: &FlowKey, vip_flags: u32) -> Option<Service> {
    let mut key = VipKey { addr: flow.dst, port: flow.dport, proto: flow.proto, _pad: 0 };
    // SAFETY: copied out at once; the agent replaces whole entries.
    if let Some(s) = unsafe { SERVICES.get(&key) } {
        return Some(*s);
    }
    let any = if flow.proto == PROTO_TCP { VIP_ANY_PORT_TCP } else { VIP_ANY_PORT_UDP };
    if vip_flags & any == 0 {
        return None;
    }
    key.port = 0;
    // SAFETY: as above.
    unsafe { SERVICES.get(&key) }.copied()
}

/// The backend of `id` if it is usable for `service_id`.
#[inline(always)]
fn live_backend(id: u32, service_id: u32) -> Option<Backend> {
    let b = BACKENDS.get(id)?;
    if b.flags & BACKEND_ACTIVE != 0 && b.service_id == service_id { Some(*b) } else { None }
}

/// Connection table first; Maglev for new flows and flows whose backend is gone.
#[inline(always)]
fn pick(flow: &FlowKey, svc: &Service) -> Option<(u32, Backend)> {
    // SAFETY: the value is copied out at once.
    if let Some(v) = unsafe { CONNTRACK.get(flow) } {
        let v = *v;
        if v.service_id == svc.id {
            if let Some(b) = live_backend(v.backend_id, svc.id) {
                count(stat::CONN_HIT);
                return Some((v.backend_id, b));
            }
        }
    }
    count(stat::CONN_MISS);
    if svc.table_size == 0 {
        return None;
    }
    let slot = svc.table_offset.wrapping_add(maglev_slot(flow_hash(flow), svc.table_size));
    let id = *MAGLEV.get(slot)?;
    let b = live_backend(id, svc.id)?;
    let val = FlowVal { backend_id: id, service_id: svc.id };
    if CONNTRACK.insert(flow, &val, BPF_ANY as u64).is_err() {
        count(stat::CONN_INSERT_FAILED);
    }
    Some((id, b))
}

#[inline(always)]
pub fn forward(ctx: &XdpContext, flow: &FlowKey, vip_flags: u32) -> Outcome {
    let Some(svc) = find_service(flow, vip_flags) else {
        return Outcome::Pass(stat::PASS_NO_SERVICE);
    };
    let cfg = match CONFIG.get(0) {
        Some(c) if c.flags & CONFIG_READY != 0 => *c,
        _ => return Outcome::Pass(stat::PASS_NOT_READY),
    };
    let Some((backend_id, backend)) = pick(flow, &svc) else {
        return Outcome::Drop(stat::DROP_NO_BACKEND);
    };
    let start = ctx.data();
    let end = ctx.data_end();
    if start + 12 > end {
        // Cannot happen after a successful parse; keeps the verifier informed.
        return Outcome::Pass(stat::PASS_MALFORMED_L2);
    }
    // SAFETY: 12 bytes (both MAC addresses) are within bounds.
    unsafe {
        let eth = &mut *(start as *mut [u8; 12]);
        eth[0..6].copy_from_slice(&backend.mac);
        eth[6..12].copy_from_slice(&cfg.iface_mac);
    }
    count_forward(svc.id, backend_id, (end - start) as u64);
    Outcome::Tx
}
