//! `lblc` and `lblcr`, IPVS's locality-based least connections, for prefix
//! services: each destination address keeps a backend (`lblc`) or a set of up
//! to `LOCALITY_SET_MAX` (`lblcr`) in `LOCALITY`, an LRU map shared by all CPUs.
//!
//! - `lblc`: the destination's backend while it is usable and not overloaded;
//!   otherwise the least loaded backend (as `wlc`), which becomes the
//!   destination's backend.
//! - `lblcr`: the least loaded member of the destination's set (overhead per
//!   weight); when there is none or it is overloaded, the least loaded backend
//!   of the service joins the set (replacing its most loaded member when the set
//!   is full). A set unchanged for `LOCALITY_EXPIRE_S` loses its most loaded
//!   member, as IPVS's `lblcr_expiration`.
//!
//! Overloaded is IPVS's test: the backend has more active connections than its
//! weight while another has fewer than half its weight. "Another" is the
//! least loaded one the `wlc` scan finds (`leastconn.rs`: exact up to
//! `LC_EXACT_MAX` backends, a weighted best of k above). Entries are read and
//! written in place without locks: two CPUs scheduling the same destination at
//! once may both rewrite it; the last write stays.

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    LocalityKey, LocalityVal, Service, BACKEND_ACCEPTS_NEW, BACKEND_ACTIVE, SCHED_LBLCR,
    prefix::{LOCALITY_EXPIRE_S, LOCALITY_SET_MAX},
};

use super::leastconn;
use crate::{
    backend::backend,
    conns,
    maps::{CT_CLOCK, LOCALITY, LOCALITY_SCRATCH},
};

/// No backend (the table is being swapped).
pub const NONE: u32 = u32::MAX;

/// The backend id for a new flow of `svc` to `dst`, or `NONE`. A call of its
/// own with pointer arguments only, so its frame is not the balancer's; its key
/// and new entries are built in this CPU's `LOCALITY_SCRATCH` entry (the call
/// chain's stack is 512 bytes and the balancer's frame takes most of it).
#[inline(never)]
pub fn pick(hash: u32, svc: &Service, dst: &[u8; 16]) -> u32 {
    let Some(scratch) = LOCALITY_SCRATCH.get_ptr_mut(0) else { return NONE };
    // SAFETY: this CPU's entry, used by this program run only.
    let scratch = unsafe { &mut *scratch };
    // Field by field: a whole struct would be built on the stack first.
    scratch.key.service_id = svc.id;
    scratch.key.addr = *dst;
    let now = CT_CLOCK.get(0).copied().unwrap_or(0);
    let Some(p) = LOCALITY.get_ptr_mut(&scratch.key) else {
        return fresh(scratch, hash, svc, now);
    };
    // SAFETY: a live entry of the LRU map, written field by field.
    let e = unsafe { &mut *p };
    if now.wrapping_sub(e.used) > LOCALITY_EXPIRE_S || e.len == 0 {
        return fresh(scratch, hash, svc, now);
    }
    e.used = now;
    if svc.scheduler == SCHED_LBLCR {
        return set_pick(e, scratch, hash, svc, now);
    }
    let id = e.ids[0];
    let usable = usable(id, svc.id, e.generations[0]);
    if usable != 0 && !too_loaded(id, usable) {
        return id;
    }
    let best = least(hash, svc);
    if usable != 0 && !moves(best) {
        return id;
    }
    if let Some(b) = backend(best, svc.id, None, BACKEND_ACTIVE | BACKEND_ACCEPTS_NEW) {
        e.ids[0] = best;
        e.generations[0] = b.generation;
        e.modified = now;
    }
    best
}

/// A destination seen for the first time (or forgotten): the least loaded
/// backend, recorded as its only one.
#[inline(always)]
fn fresh(scratch: &mut LocalityScratch, hash: u32, svc: &Service, now: u32) -> u32 {
    let id = least(hash, svc);
    let Some(b) = backend(id, svc.id, None, BACKEND_ACTIVE | BACKEND_ACCEPTS_NEW) else { return NONE };
    let v = &mut scratch.val;
    (v.ids, v.generations) = ([id, 0, 0, 0], [b.generation, 0, 0, 0]);
    (v.len, v.modified, v.used, v._pad) = (1, now, now, 0);
    let _ = LOCALITY.insert(&scratch.key, &scratch.val, BPF_ANY as u64);
    id
}

/// Value of `LOCALITY_SCRATCH` (never pinned, never read by the agent).
#[repr(C)]
pub struct LocalityScratch {
    pub key: LocalityKey,
    pub val: LocalityVal,
    /// `set_pick`'s scan: least and most loaded member so far.
    pub min: u32,
    pub max_i: u32,
    pub min_oh: u64,
    pub min_w: u64,
    pub max_oh: u64,
    pub max_w: u64,
}

/// `lblcr`: the least loaded member; a new member when it is overloaded.
#[inline(always)]
fn set_pick(e: &mut LocalityVal, sc: &mut LocalityScratch, hash: u32, svc: &Service, now: u32) -> u32 {
    scan(e, sc, svc.id);
    let len = (e.len as usize).min(LOCALITY_SET_MAX);
    if len > 1 && now.wrapping_sub(e.modified) > LOCALITY_EXPIRE_S {
        // As IPVS: the flow still goes to `min` when it was the one removed
        // (all members equally loaded).
        remove(e, sc.max_i as usize, len);
        e.modified = now;
    }
    let min = sc.min;
    if min != NONE && !too_loaded(min, sc.min_w as u32) {
        return min;
    }
    let best = least(hash, svc);
    if min != NONE && !moves(best) {
        return min;
    }
    let Some(b) = backend(best, svc.id, None, BACKEND_ACTIVE | BACKEND_ACCEPTS_NEW) else { return min };
    let len = (e.len as usize).min(LOCALITY_SET_MAX);
    for i in 0..LOCALITY_SET_MAX {
        if i < len && e.ids[i] == best {
            return best;
        }
    }
    let at = if len < LOCALITY_SET_MAX { len } else { sc.max_i as usize };
    if at < LOCALITY_SET_MAX {
        e.ids[at] = best;
        e.generations[at] = b.generation;
    }
    e.len = (len + 1).min(LOCALITY_SET_MAX) as u32;
    e.modified = now;
    best
}

/// The least and the most loaded member of `e`'s set, into `sc` (per-CPU map
/// memory, so nothing spills onto the stack: the call chain's 512 bytes are
/// nearly all the balancer's).
#[inline(always)]
fn scan(e: &LocalityVal, sc: &mut LocalityScratch, service_id: u32) {
    (sc.min, sc.min_oh, sc.min_w) = (NONE, 0, 0);
    (sc.max_i, sc.max_oh, sc.max_w) = (0, 0, 0);
    for i in 0..LOCALITY_SET_MAX as u32 {
        if i >= e.len {
            break;
        }
        member(e, sc, service_id, i);
    }
}

/// One round of `scan`: member `i`. A call of its own, so the unrolled loop
/// keeps nothing live across rounds.
#[inline(never)]
fn member(e: &LocalityVal, sc: &mut LocalityScratch, service_id: u32, i: u32) {
    let i = i as usize;
    if i >= LOCALITY_SET_MAX {
        return;
    }
    let id = e.ids[i];
    let w = usable(id, service_id, e.generations[i]) as u64;
    let oh = conns::overhead(id);
    // Most loaded: an unusable member first, then the highest overhead per weight.
    if i == 0 || (sc.max_w != 0 && (w == 0 || oh * sc.max_w > sc.max_oh * w)) {
        (sc.max_i, sc.max_oh, sc.max_w) = (i as u32, oh, w);
    }
    if w != 0 && (sc.min == NONE || oh * sc.min_w < sc.min_oh * w) {
        (sc.min, sc.min_oh, sc.min_w) = (id, oh, w);
    }
}

/// Removes member `i` of the `len` first (the last one takes its place).
#[inline(always)]
fn remove(e: &mut LocalityVal, i: usize, len: usize) {
    let last = len - 1;
    if i < LOCALITY_SET_MAX && last < LOCALITY_SET_MAX {
        e.ids[i] = e.ids[last];
        e.generations[i] = e.generations[last];
    }
    e.len = last as u32;
}

/// The weight of backend `id` if it takes new flows of the service and is the
/// incarnation recorded; else 0.
#[inline(always)]
fn usable(id: u32, service_id: u32, generation: u32) -> u32 {
    match backend(id, service_id, Some(generation), BACKEND_ACTIVE | BACKEND_ACCEPTS_NEW) {
        Some(b) => b.weight as u32,
        None => 0,
    }
}

/// IPVS's first half of "overloaded": more active connections than its weight.
#[inline(always)]
fn too_loaded(id: u32, weight: u32) -> bool {
    conns::active(id) > weight as u64
}

/// IPVS's second half: another backend (`best`, the least loaded) has fewer
/// active connections than half its weight, so moving is worth it.
#[inline(always)]
fn moves(best: u32) -> bool {
    let Some(b) = crate::maps::BACKENDS.get(best) else { return false };
    conns::active(best) * 2 < b.weight as u64
}

/// The least loaded backend of the service (`wlc` over the table), or `NONE`.
#[inline(never)]
fn least(hash: u32, svc: &Service) -> u32 {
    if svc.table_size == 0 {
        return NONE;
    }
    let slot = leastconn::slot(hash, svc.id, svc.table_offset, svc.table_size, true);
    // The candidates are distinct: slot `slot` is list entry `slot`
    // (`lb_common::table`), one read.
    super::word(svc.table_offset.wrapping_add(lb_common::table::list_word(svc.table_size, slot))).unwrap_or(NONE)
}
