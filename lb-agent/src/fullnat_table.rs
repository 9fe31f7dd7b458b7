//! The agent's side of `FULLNAT_FORWARD` and `FULLNAT_REVERSE` (`forwarding:
//! fullnat`; and `SNAT_POOLS`, written by `write_pools`): a flow's SNAT mapping lives as long as the flow's entry in the
//! connection table. Both maps are plain hashes (a SNAT port must never be taken
//! from a live flow), so nothing but this sweep returns a port to its pool. After
//! each sweep of the connection table (`conntrack::run`) it removes:
//!
//! - the mappings whose flow is gone: in neither `CT_ESTABLISHED` nor, fresh
//!   (within its timeout), `CONNTRACK` (the LRU keeps entries of flows long
//!   ended until it evicts them);
//! - reverse entries whose flow's mapping now names another port or backend (the
//!   flow was scheduled again), or has none.
//!
//! Entries written in the last `YOUNG_S` seconds are left alone: the program
//! writes the reverse entry just before the mapping, and a sweep between the two
//! must not take the port back.

use std::collections::BTreeSet;

use aya::maps::{Array, HashMap, MapData};
use lb_common::{map_names as names, FlowKey, FlowVal, NatReverse, SnatFwd, SnatPool, CT_STATE_NEW};

use crate::{
    config::Timeouts,
    conntrack::{expired, timeout_of},
    dataplane::{map_err, map_mut, Dataplane, DataplaneError},
    plan::Plan,
};

/// Seconds a new reverse entry is left alone.
pub const YOUNG_S: u32 = 2;

/// The client-to-VIP flow of a reverse entry.
pub fn forward_flow(key: &FlowKey, val: &NatReverse) -> FlowKey {
    FlowKey { src: val.client, dst: val.vip, sport: val.cport, dport: val.vport, proto: key.proto, _pad: [0; 3] }
}

/// The reverse key a mapping owns.
pub fn reverse_key(flow: &FlowKey, m: &SnatFwd) -> FlowKey {
    FlowKey { src: m.backend, dst: m.snat, sport: m.backend_port, dport: m.snat_port, proto: flow.proto, _pad: [0; 3] }
}

/// The maps one sweep works on.
pub struct Tables<'a> {
    pub forward: &'a mut HashMap<MapData, FlowKey, SnatFwd>,
    pub reverse: &'a mut HashMap<MapData, FlowKey, NatReverse>,
    pub established: &'a HashMap<MapData, FlowKey, FlowVal>,
    pub new: &'a HashMap<MapData, FlowKey, FlowVal>,
}

/// Whether `flow` is live at `now`: established, or fresh in `CONNTRACK`.
fn live(t: &Tables<'_>, flow: &FlowKey, now: u32, timeouts: &Timeouts) -> bool {
    if t.established.get(flow, 0).is_ok() {
        return true;
    }
    match t.new.get(flow, 0) {
        Ok(v) => {
            // A TCP flow seen once counts for the tcp_fin timeout (as `flows`).
            let once = flow.proto == lb_common::PROTO_TCP && v.state == CT_STATE_NEW;
            let timeout = if once { timeouts.tcp_fin } else { timeout_of(flow, &v, timeouts) };
            !expired(now, v.last_seen, timeout)
        }
        Err(_) => false,
    }
}

/// One sweep; returns (mappings removed, reverse entries removed).
pub fn sweep(t: &mut Tables<'_>, now: u32, timeouts: &Timeouts) -> (u64, u64) {
    // Collect first: deleting while walking makes the kernel restart the walk.
    let gone: Vec<(FlowKey, SnatFwd)> = t
        .forward
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| !live(t, k, now, timeouts))
        .collect();
    let (mut fwd_removed, mut rev_removed) = (0, 0);
    for (flow, m) in gone {
        // Its flow may have come back since the walk: keep it then.
        if live(t, &flow, now, timeouts) {
            continue;
        }
        let rk = reverse_key(&flow, &m);
        let young = t.reverse.get(&rk, 0).is_ok_and(|r| now.wrapping_sub(r.created) < YOUNG_S);
        if young || t.forward.get(&flow, 0).ok() != Some(m) {
            continue;
        }
        if t.reverse.remove(&rk).is_ok() {
            rev_removed += 1;
        }
        if t.forward.remove(&flow).is_ok() {
            fwd_removed += 1;
        }
    }
    // Reverse entries no mapping owns (rescheduled flows, or a mapping that
    // could not be written).
    let orphans: Vec<FlowKey> = t
        .reverse
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| {
            now.wrapping_sub(v.created) >= YOUNG_S
                && t.forward.get(&forward_flow(k, v), 0).ok().is_none_or(|m| reverse_key(&forward_flow(k, v), &m) != *k)
        })
        .map(|(k, _)| k)
        .collect();
    for k in orphans {
        if t.reverse.remove(&k).is_ok() {
            rev_removed += 1;
        }
    }
    (fwd_removed, rev_removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapping_owns_the_reverse_key_of_its_reply() {
        let flow = FlowKey { src: [1; 16], dst: [2; 16], sport: 40000, dport: 80, proto: 6, _pad: [0; 3] };
        let m = SnatFwd { snat: [3; 16], backend: [4; 16], snat_port: 2000, backend_port: 8080, ..Default::default() };
        let rk = reverse_key(&flow, &m);
        assert_eq!((rk.src, rk.dst, rk.sport, rk.dport, rk.proto), ([4; 16], [3; 16], 8080, 2000, 6));
        let val = NatReverse { vip: [2; 16], vport: 80, client: [1; 16], cport: 40000, ..Default::default() };
        assert_eq!(forward_flow(&rk, &val), flow);
    }
}

/// Whether a reload moves an address of a `fullnat` pool: an index that held
/// one address now holds another. An established flow's `FlowVal::snat` names
/// its SNAT address by index and a 5-bit check of it; one flow in 32 on a moved
/// index would pass the check with the new address (`forget_moved_slots`).
pub fn addresses_moved(old: &SnatPool, new: &SnatPool) -> bool {
    let (o4, n4) = (usize::from(old.n_v4).min(old.v4.len()), usize::from(new.n_v4).min(new.v4.len()));
    let (o6, n6) = (usize::from(old.n_v6).min(old.v6.len()), usize::from(new.n_v6).min(new.v6.len()));
    (0..o4).any(|i| i < n4 && old.v4[i] != new.v4[i]) || (0..o6).any(|i| i < n6 && old.v6[i] != new.v6[i])
}

/// Clears the SNAT slot (`FlowVal::snat`) of every `CT_ESTABLISHED` entry of the
/// services in `services` (pools whose addresses moved, written just before):
/// their next packets look their mapping up in `FULLNAT_FORWARD` (which names the
/// address itself) and note the slot again against the new pool. Entries are
/// rewritten only while they exist (`BPF_EXIST`); a packet updating one between
/// the read and the write has its `last_seen` set back by that instant. Returns
/// the entries cleared.
fn forget_moved_slots(established: &mut HashMap<&mut MapData, FlowKey, FlowVal>, services: &BTreeSet<u32>) -> u64 {
    const BPF_EXIST: u64 = 2;
    let keys: Vec<FlowKey> = established.keys().filter_map(Result::ok).collect();
    let mut cleared = 0;
    for k in keys {
        let Ok(v) = established.get(&k, 0) else { continue };
        if v.snat != [0; 3] && services.contains(&v.service_id) && established.insert(k, FlowVal { snat: [0; 3], ..v }, BPF_EXIST).is_ok() {
            cleared += 1;
        }
    }
    cleared
}

/// Writes the SNAT pools of `fullnat` services that changed since `prev` (a
/// pool that did not change is not written: that would reset its cursor).
/// Established flows name their SNAT address by its index in the pool: where a
/// pool's addresses moved (against what the map held: the last write, or a
/// previous agent's before a restart), their slots are cleared, after the
/// write (before it, their next packets would note the old pool again).
pub fn write_pools(dp: &mut Dataplane, prev: &Plan, plan: &Plan) -> Result<(), DataplaneError> {
    if plan.snat_pools.is_empty() {
        return Ok(());
    }
    let mut m: Array<_, SnatPool> =
        Array::try_from(map_mut(dp.ebpf_mut(), names::SNAT_POOLS)?).map_err(map_err(names::SNAT_POOLS))?;
    let mut moved = BTreeSet::new();
    for (id, pool) in &plan.snat_pools {
        if prev.snat_pools.get(id) != Some(pool) {
            if m.get(id, 0).is_ok_and(|held| addresses_moved(&held, pool)) {
                moved.insert(*id);
            }
            m.set(*id, *pool, 0).map_err(map_err(names::SNAT_POOLS))?;
        }
    }
    if !moved.is_empty() && plan.established_size > 0 {
        let mut est =
            HashMap::try_from(map_mut(dp.ebpf_mut(), names::CT_ESTABLISHED)?).map_err(map_err(names::CT_ESTABLISHED))?;
        let n = forget_moved_slots(&mut est, &moved);
        tracing::info!(services = moved.len(), flows = n, "SNAT addresses moved in their pools: the flows' slots cleared");
    }
    Ok(())
}
