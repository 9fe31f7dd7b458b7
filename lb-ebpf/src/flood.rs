//! SYN floods: this CPU's rate of new TCP flows, and whether a SYN may skip its
//! `CONNTRACK` insert (see docs/connection-table.md, "SYN floods").

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;

use crate::maps::SYN_RATE;

const SECOND_NS: u64 = 1_000_000_000;

/// Counts a SYN that could skip its insert on this CPU; true once this CPU has
/// counted more than `kps` thousand of them in the current second (`kps` 0:
/// never). Per-CPU plain stores, the coarse clock (a jiffy's resolution is
/// enough for a one-second window): no atomics, no shared cache line.
///
/// The clock is read only past the threshold: below it a SYN is recorded
/// whatever the time, so the count runs on until it passes `kps` thousand, and
/// only then does the window's age decide. A window a second old or more starts
/// again there (count 1: recorded); a younger one means a flood (not recorded,
/// and the clock is read again at every such SYN, so the window ends on time).
/// A recorded SYN thus pays no clock helper (measured about 27 ns a SYN, most
/// of the check); the price is that the first window after a quiet spell can
/// record up to twice `kps` thousand SYNs (those counted before it, then its own).
#[inline(always)]
pub fn over(kps: u32) -> bool {
    if kps == 0 {
        return false;
    }
    let Some(r) = SYN_RATE.get_ptr_mut(0) else { return false };
    // SAFETY: this CPU's entry, used by this program run only.
    unsafe {
        (*r).count += 1;
        if (*r).count <= u64::from(kps) * 1000 {
            return false;
        }
        // SAFETY: a helper without arguments.
        let now = bpf_ktime_get_coarse_ns();
        if now.wrapping_sub((*r).start_ns) >= SECOND_NS {
            (*r).start_ns = now;
            (*r).count = 1;
            return false;
        }
        true
    }
}
