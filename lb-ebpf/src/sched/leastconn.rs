//! `lc` and `wlc`, as IPVS: the backend with the least connection overhead
//! (`active * 256 + inactive`, `lb_common::conn_overhead`), divided by its weight
//! for `wlc`. The service's table lists the backends taking new flows, each
//! once, so its list of backend ids is in slot order (`lb_common::table`). Up to
//! `LC_EXACT_MAX` of them are all compared (a bounded loop); above that, the
//! best of `LC_EXACT_MAX` consecutive ones from a slot drawn from the flow hash
//! (weighted best of k choices). The scan starts at a slot drawn from the flow
//! hash, so ties do not all go to the first backend.
//!
//! The bound is the verifier's work, not run time: it walks the loop round by
//! round for every distinct state the balancer reaches the call with (hundreds),
//! and that grows faster than linearly: measured (before the retransmitted-SYN
//! check, which added ~200,000), `lb_xdp` verified 342,157 instructions with 4
//! rounds and 871,523 with 8, of the kernel's 1,000,000. See
//! `tests/tests/packet_conntrack.rs`, `verifier_work_stays_well_under_the_limit`. Counts are `conns::of`: exact as of the agent's last sweep plus every
//! change the program made since, so a new flow counts at once.

use lb_common::{BACKEND_ACCEPTS_NEW, LC_EXACT_MAX};

use crate::{conns, maps::BACKENDS};

/// The slot of the least loaded backend (per weight for `wlc`): all of them
/// when there are at most `LC_EXACT_MAX`, else the best of `LC_EXACT_MAX`
/// consecutive slots from one drawn from the flow hash (weighted best of k
/// choices, k = `LC_EXACT_MAX`).
#[inline(always)]
pub fn slot(h: u32, service_id: u32, offset: u32, n: u32, weighted: bool) -> u32 {
    // The candidates are distinct, so slot `s` indexes list entry `s`
    // (`lb_common::table`): the scan reads the list, one read a candidate.
    scan(offset.wrapping_add(lb_common::table::slot_words(n)), n, h % n, service_id, weighted)
}

/// Overhead and weight of the backend in `slot`; weight 0 if it takes no new
/// flows (the agent is swapping tables). Plain scalars on every path, never an
/// `Option`: LLVM otherwise hoists the caller's multiplication above the check,
/// onto a register that holds a map pointer on the empty path, which the
/// verifier rejects.
#[inline(always)]
fn load(list: u32, slot: u32, service_id: u32, weighted: bool) -> (u64, u64) {
    let Some(id) = super::word(list.wrapping_add(slot)) else { return (0, 0) };
    let Some(b) = BACKENDS.get(id) else { return (0, 0) };
    if b.flags & BACKEND_ACCEPTS_NEW == 0 || b.service_id != service_id {
        return (0, 0);
    }
    let w = if weighted { b.weight as u64 } else { 1 };
    (conns::overhead(id), w)
}

/// Above any overhead (`active * 256 + inactive` < 2^41): the starting "best",
/// so the first candidate always wins and no product overflows (2^41 * 2^16).
const NONE_OH: u64 = 1 << 41;

/// Up to `LC_EXACT_MAX` slots from `start` (all of them when `n` is not larger):
/// the least overhead per weight (`oh / w < best_oh / best_w`, compared multiplied out).
/// The loop index is the only thing the verifier sees change between rounds
/// (the slot is computed from it, never stepped and wrapped), so it walks the
/// loop once per round, not once per wrap point.
#[inline(always)]
fn scan(list: u32, n: u32, start: u32, service_id: u32, weighted: bool) -> u32 {
    let (mut best, mut best_oh, mut best_w) = (start, NONE_OH, 1u64);
    for i in 0..LC_EXACT_MAX {
        if i >= n {
            break;
        }
        let slot = (start + i) % n;
        let (oh, w) = load(list, slot, service_id, weighted);
        if w != 0 && oh * best_w < best_oh * w {
            (best, best_oh, best_w) = (slot, oh, w);
        }
    }
    best
}
