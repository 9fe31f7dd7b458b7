//! SYN floods: this CPU's rate of new TCP flows, and whether a SYN may skip its
//! `CONNTRACK` insert (see docs/architecture.md, "SYN floods").

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;

use crate::maps::SYN_RATE;

const SECOND_NS: u64 = 1_000_000_000;

/// Counts a SYN that could skip its insert on this CPU; true once this CPU has
/// counted more than `kps` thousand of them in the current second (`kps` 0:
/// never). Per-CPU plain stores, the coarse clock (a jiffy's resolution is
/// enough for a one-second window): no atomics, no shared cache line.
#[inline(always)]
pub fn over(kps: u32) -> bool {
    if kps == 0 {
        return false;
    }
    let Some(r) = SYN_RATE.get_ptr_mut(0) else { return false };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: this CPU's entry, used by this program run only.
    unsafe {
        if now.wrapping_sub((*r).start_ns) >= SECOND_NS {
            (*r).start_ns = now;
            (*r).count = 1;
            return false;
        }
        (*r).count += 1;
        (*r).count > u64::from(kps) * 1000
    }
}
