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
fn add(c: Option<*mut Counters>, bytes: u64, new_flow: bool) {
    if let Some(c) = c {
        // SAFETY: as above.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += new_flow as u64;
        }
    }
}

#[inline(always)]
pub fn count_forward(service_id: u32, backend_id: u32, bytes: u64, new_flow: bool) {
    add(SERVICE_STATS.get_ptr_mut(service_id), bytes, new_flow);
    add(BACKEND_STATS.get_ptr_mut(backend_id), bytes, new_flow);
}
