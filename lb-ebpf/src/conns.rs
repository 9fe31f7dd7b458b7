//! Per-backend connection counts, the program's half (`lb_common::BackendConns`):
//! atomic adds to `BACKEND_CONN_DELTA` when a flow is scheduled, promoted, closes
//! or moves. The agent's sweep supplies the exact base (`BACKEND_CONNS`) and so
//! corrects whatever these adds miss (LRU evictions, expiry, races). A SYN left
//! in `FIRST_RECORD` is not added: the sweep counts half-open records (so a
//! recorded SYN, the whole of a SYN flood, makes no locked instruction), and
//! its ACK adds it as active.

use core::intrinsics::{atomic_xadd, AtomicOrdering::Relaxed};

use lb_common::{CT_STATE_ESTABLISHED, PROTO_TCP};

use crate::maps::{BACKEND_CONNS, BACKEND_CONN_DELTA};

/// Adds to a backend's counts (one locked add per non-zero field; the target has
/// no compare-and-swap, so `AtomicI64::fetch_add` is unavailable and the
/// intrinsic, whose result is unused, becomes BPF's atomic add).
#[inline(always)]
pub fn add(id: u32, active: i64, inactive: i64) {
    let Some(p) = BACKEND_CONN_DELTA.get_ptr_mut(id) else { return };
    // SAFETY: a live array element; i64 fields of a repr(C) struct are aligned, and
    // every writer uses atomic adds.
    unsafe {
        if active != 0 {
            atomic_xadd::<i64, i64, { Relaxed }>(&raw mut (*p).active, active);
        }
        if inactive != 0 {
            atomic_xadd::<i64, i64, { Relaxed }>(&raw mut (*p).inactive, inactive);
        }
    }
}

/// A flow newly scheduled to `id` (SYN seen, or a first datagram): inactive.
#[inline(always)]
pub fn opened(id: u32) {
    add(id, 0, 1);
}

/// Whether a flow in `state` counts as active: TCP established.
#[inline(always)]
pub fn is_active(proto: u8, state: u8) -> bool {
    proto == PROTO_TCP && state == CT_STATE_ESTABLISHED
}

/// `lb_common::conn_overhead` of backend `id` without clamping (one branch per
/// lookup, none per field: the least-connection scan runs it up to
/// `LC_EXACT_MAX` times and the verifier walks every round). A transiently
/// negative field (see `BackendConns::count`) counts as 0 through the mask.
#[inline(always)]
pub fn overhead(id: u32) -> u64 {
    let (Some(b), Some(d)) = (BACKEND_CONNS.get(id), BACKEND_CONN_DELTA.get(id)) else { return 0 };
    let a = b.active.wrapping_add(d.active);
    let i = b.inactive.wrapping_add(d.inactive);
    // Branch-free max(0, x) for x within ±2^62: x & !(x >> 63).
    let (a, i) = ((a & !(a >> 63)) as u64, (i & !(i >> 63)) as u64);
    (a << 8) + i
}

/// Active (established) connections of backend `id`, as `overhead` counts them.
#[inline(always)]
pub fn active(id: u32) -> u64 {
    let (Some(b), Some(d)) = (BACKEND_CONNS.get(id), BACKEND_CONN_DELTA.get(id)) else { return 0 };
    let a = b.active.wrapping_add(d.active);
    (a & !(a >> 63)) as u64
}
