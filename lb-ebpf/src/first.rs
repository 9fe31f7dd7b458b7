//! The first record (`FIRST_RECORD`, `lb_common::first`): a TCP SYN of a
//! `maglev` or `sh` service (no persistence, DR or tunnel forwarding) is recorded
//! with one store into a direct-mapped array instead of an insert into the
//! `CONNTRACK` LRU hash; the flow's next packet takes the record and records the
//! flow properly (see docs/connection-table.md, "Where a new flow's time goes").

use core::ptr::read_volatile;

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use lb_common::{
    first_record_check, first_record_slot, flow_hash_by, stat, trace::ct_step, FlowKey, BACKEND_ACTIVE,
    CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW, FORWARD_NAT, PROTO_TCP,
};

use crate::{
    conns,
    maps::{BACKENDS, CONFIG, CONNTRACK, CT_ESTABLISHED, FIRST_RECORD},
    stats::count,
    syn_filter,
};

/// `take`'s answer when there is no record to take.
pub const NONE: u64 = 0;
/// Set in `take`'s answer when a record was taken.
const FOUND: u64 = 1 << 40;
const EEXIST: i32 = 17;

/// The `FIRST_RECORD` mask (`Config::first_record_mask`) when the SYN of a flow
/// scheduled to `backend_id` may be recorded there: 0 (no) while the record is
/// off, or when the backend is a `nat` or `fullnat` one (the agent's sweep keeps
/// their translation entries only while the flow is in a connection table).
#[inline(always)]
pub fn mask_for(backend_id: u32) -> u32 {
    let mask = CONFIG.get(0).map_or(0, |c| c.first_record_mask);
    match BACKENDS.get(backend_id) {
        Some(b) if b.forward < FORWARD_NAT => mask,
        _ => 0,
    }
}

/// Writes a SYN's record: plain stores into the flow's slot, over whatever was
/// there (another flow's record is lost, as an LRU evicts). The check covers
/// the tag and every value field, so a reader that sees a mix of two writes (or
/// of one write and the entry before it) finds it does not match.
/// `hash`: the flow's `hash_of` (the slot); `tag`: its `syn_filter::hash_of`,
/// computed by `syn_filter::absent` for the SYN (not hashed again here).
#[inline(always)]
pub fn store(hash: u32, tag: u32, mask: u32, backend_id: u32, generation: u32, now: u32) {
    let Some(e) = FIRST_RECORD.get_ptr_mut(first_record_slot(hash, mask)) else { return };
    let (generation, now) = (generation as u16, now as u16);
    let check = first_record_check(tag, backend_id, generation, now);
    // SAFETY: a live array element; readers verify it (`take`).
    unsafe {
        (*e).tag = tag;
        (*e).backend_id = backend_id;
        (*e).generation = generation;
        (*e).first_seen = now;
        (*e).check = check;
    }
}

/// A TCP packet without SYN whose flow is in neither connection table: if its
/// flow's record is in `FIRST_RECORD` (same tag, check matching) and names a
/// backend still active in the same incarnation, takes it (the record is
/// emptied) and records the flow as `CONNTRACK` would have on this packet:
/// moved to `CT_ESTABLISHED` (closing if `fin`), or kept in `CONNTRACK` when
/// that is full. Returns the backend id, the `ct_step` (bits 32..40) and
/// `FOUND`, or `NONE`; the caller sets the SYN filter's bit after a `PROMOTED`
/// one. `hash`: the flow's `hash_of`. A call of its own: its branches stay in here.
#[inline(never)]
pub fn take(flow: &FlowKey, hash: u32, fin: bool, now: u32) -> u64 {
    let mask = CONFIG.get(0).map_or(0, |c| c.first_record_mask);
    if mask == 0 || flow.proto != PROTO_TCP {
        return NONE;
    }
    let Some(e) = FIRST_RECORD.get_ptr_mut(first_record_slot(hash, mask)) else { return NONE };
    // SAFETY: a live array element, read field by field (no copy on the stack,
    // which the verifier limits to 512 bytes per call chain): the tag is
    // compared, then each value field and the check are read once, and the
    // check is recomputed from the values read. A SYN writing the slot
    // meanwhile leaves values and check that do not match it.
    let tag = syn_filter::hash_of(flow);
    let (backend_id, generation, first_seen, check) = unsafe {
        if read_volatile(&raw const (*e).tag) != tag {
            return NONE;
        }
        (
            read_volatile(&raw const (*e).backend_id),
            read_volatile(&raw const (*e).generation),
            read_volatile(&raw const (*e).first_seen),
            read_volatile(&raw const (*e).check),
        )
    };
    if check != first_record_check(tag, backend_id, generation, first_seen) {
        return NONE;
    }
    // The record's service is its backend's (an id names one backend of one
    // service in an incarnation: the generation's low bits tell them apart).
    let Some(b) = BACKENDS.get(backend_id) else { return NONE };
    if b.flags & BACKEND_ACTIVE == 0 || b.generation as u16 != generation {
        return NONE;
    }
    let (service_id, generation) = (b.service_id, b.generation);
    // SAFETY: as above; emptied only if no other SYN has written the slot since.
    unsafe {
        if read_volatile(&raw const (*e).check) == check {
            (*e).check = !check;
        }
    }
    let state = if fin { CT_STATE_CLOSING } else { CT_STATE_ESTABLISHED };
    let mut val = crate::conntrack::flow_val(backend_id, service_id, generation, now, state);
    let step = match CT_ESTABLISHED.insert(flow, &val, BPF_NOEXIST as u64) {
        Ok(()) => {
            count(stat::CT_PROMOTED);
            // Active from now; the record's SYN was never counted inactive by
            // the program (`conntrack::insert_new`), only by a sweep.
            if state == CT_STATE_ESTABLISHED {
                conns::add(backend_id, 1, 0);
            }
            ct_step::PROMOTED
        }
        // Another CPU took it first.
        Err(e) if e == -EEXIST => ct_step::HIT_ESTABLISHED,
        Err(_) => {
            count(stat::CT_ESTABLISHED_FULL);
            val.state = CT_STATE_NEW;
            // The SYN's second, from its low 16 bits (within 65,535 s of now).
            val.last_seen = now.wrapping_sub(u32::from((now as u16).wrapping_sub(first_seen)));
            if CONNTRACK.insert(flow, &val, BPF_ANY as u64).is_err() {
                count(stat::CONN_INSERT_FAILED);
            }
            ct_step::ESTABLISHED_FULL
        }
    };
    FOUND | (u64::from(step) << 32) | u64::from(backend_id)
}

/// `flow_hash`, a call of its own, made before `take` (a sibling call) and in
/// `conntrack::insert_new` before `store`. The flow's words are read in order
/// with volatile loads, each as it is mixed: with plain loads the compiler read
/// them all first and spilled them (32 bytes of stack here, 80 more in `take`),
/// and the call chain under `lb_xdp_trace` passed the verifier's 512 bytes.
#[inline(never)]
pub fn hash_of(flow: &FlowKey) -> u32 {
    let p = (flow as *const FlowKey).cast::<u16>();
    // SAFETY: within the key (16 u16 words of addresses), 2-byte aligned
    // (`FlowKey`'s alignment); little-endian halves of each 32-bit word.
    let w = |i: usize| unsafe { u32::from(read_volatile(p.add(2 * i))) | (u32::from(read_volatile(p.add(2 * i + 1))) << 16) };
    flow_hash_by(w, (u32::from(flow.sport) << 16) | u32::from(flow.dport), u32::from(flow.proto))
}
