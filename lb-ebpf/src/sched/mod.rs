//! Choosing a backend for a new flow (one file per scheduler family, see
//! docs/architecture.md, "Schedulers"). Every scheduler reads the service's
//! region of `MAGLEV`, which the agent fills with what that scheduler needs:
//! a Maglev lookup table, one period of a rotation, or the list of candidates,
//! each as 16-bit slots indexing a list of backend ids (`table_id`).
//! Each returns a reference into `BACKENDS`, never a copy (the stack is 512 bytes
//! for the whole call chain).

mod leastconn;
mod locality;
mod maglev;
mod rotation;

pub use locality::LocalityScratch;

use lb_common::{
    Backend, Service, BACKEND_ACCEPTS_NEW, BACKEND_ACTIVE, SCHED_DH, SCHED_LBLC, SCHED_LBLCR, SCHED_LC, SCHED_MAGLEV, SCHED_RR,
    SCHED_SH, SCHED_WLC, SCHED_WRR, table,
};

use crate::{backend::backend, maps::MAGLEV, trace::Decision};

/// Why no backend was chosen.
pub enum NoBackend {
    /// The service's table is empty (all backends down or drained).
    Empty,
    /// The slot's backend is gone (the agent is swapping tables).
    Gone,
}

/// A scheduler's choice: backend id and its entry.
pub type Pick = Result<(u32, &'static Backend), NoBackend>;

/// Word `word` of `MAGLEV` (`lb_common::table::element_of`).
#[inline(always)]
pub fn word(word: u32) -> Option<u32> {
    let (element, _) = table::element_of(word);
    let e = MAGLEV.get_ptr(element)?.cast::<u32>();
    // SAFETY: the low (even word) or high (odd word) half of a live element;
    // little-endian, as `table::element_of` says.
    Some(unsafe { *e.add((word & 1) as usize) })
}

/// The backend id in slot `slot` (below `size`) of the table of `size` slots
/// at word `offset` (`lb_common::table`): its 16-bit index, then the list entry
/// it names; `u32::MAX` (no backend) past the map, which cannot happen while
/// the agent sizes the map for its tables.
#[inline(always)]
pub fn table_id(offset: u32, size: u32, slot: u32) -> u32 {
    let (w, shift) = table::slot_at(slot);
    let Some(index) = word(offset.wrapping_add(w)) else { return u32::MAX };
    word(offset.wrapping_add(table::list_word(size, (index >> shift) & 0xffff))).unwrap_or(u32::MAX)
}

/// The backend in slot `in_table` of the service's table, if it takes new flows.
#[inline(always)]
fn slot_backend(svc: &Service, in_table: u32) -> Pick {
    // `u32::MAX` is no backend: `backend` finds none.
    let id = table_id(svc.table_offset, svc.table_size, in_table);
    let b = backend(id, svc.id, None, BACKEND_ACTIVE | BACKEND_ACCEPTS_NEW).ok_or(NoBackend::Gone)?;
    Ok((id, b))
}

/// The service's scheduler's choice for a new flow whose hash is `hash` (the
/// flow hash; with persistence, the hash of the masked client address alone).
/// Maglev, the hot path, is inline; the other schedulers are one call away
/// (`other_slot`), so their frames never add to the balancer's.
/// `PREFIX` (`lb_prefix`): also the schedulers of prefix services only (`dh`
/// is Maglev with the destination's hash; `lblc`, `lblcr` look up `dst` in
/// `LOCALITY`, `locality.rs`), compiled out of `lb_xdp`.
#[inline(always)]
pub fn pick<const PREFIX: bool>(hash: u32, svc: &Service, dst: &[u8; 16], d: &mut Decision) -> Pick {
    if svc.table_size == 0 {
        return Err(NoBackend::Empty);
    }
    if PREFIX && (svc.scheduler == SCHED_LBLC || svc.scheduler == SCHED_LBLCR) {
        let id = locality::pick(hash, svc, dst);
        let b = backend(id, svc.id, None, BACKEND_ACTIVE | BACKEND_ACCEPTS_NEW).ok_or(NoBackend::Gone)?;
        return Ok((id, b));
    }
    let hashed = svc.scheduler == SCHED_MAGLEV || svc.scheduler == SCHED_SH || (PREFIX && svc.scheduler == SCHED_DH);
    let in_table = if hashed { maglev::slot(hash, svc) } else { other_slot(hash, svc.id, svc.table_offset, svc.table_size, svc.scheduler) };
    d.slot = in_table;
    slot_backend(svc, in_table)
}

/// The table slot chosen by a scheduler other than Maglev. Scalars only (a BPF
/// call takes five registers), so the caller keeps nothing on the stack for it.
#[inline(never)]
fn other_slot(hash: u32, service_id: u32, offset: u32, size: u32, scheduler: u8) -> u32 {
    match scheduler {
        SCHED_RR | SCHED_WRR => rotation::slot(service_id, size),
        SCHED_LC | SCHED_WLC => leastconn::slot(hash, service_id, offset, size, scheduler == SCHED_WLC),
        _ => lb_common::maglev_slot(hash, size),
    }
}
