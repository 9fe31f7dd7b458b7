//! Per-CPU counters: no atomics needed, each CPU owns its copy.

use lb_common::Counters;

use crate::maps::{BACKEND_STATS, SERVICE_STATS, STATS};

#[inline(always)]
pub fn count(reason: u32) {
    if let Some(c) = STATS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, only this CPU's program touches it now.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn add(c: Option<*mut Counters>, bytes: u64) {
    if let Some(c) = c {
        // SAFETY: as above.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count_forward(service_id: u32, backend_id: u32, bytes: u64) {
    add(SERVICE_STATS.get_ptr_mut(service_id), bytes);
    add(BACKEND_STATS.get_ptr_mut(backend_id), bytes);
}
