//! Two-arm: the frame of a backend on another interface than the one it came in
//! on leaves through the `EGRESS` devmap (XDP_REDIRECT), from that interface's
//! MAC (`EGRESS_MAC`). The balancer only carries the backend's `egress` in its
//! verdict's action (`action`); the entry points send (`send`), after it, so the
//! one-arm path pays a shift and a comparison. `nat` and `fullnat` replies go
//! back by the interface their client's frames came in on (`reply_egress`).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{stat, EGRESS_BACKEND, EGRESS_CLIENT, EGRESS_SAME};

use super::bytes_mut;
use crate::{
    maps::{EGRESS, EGRESS_MAC},
    stats::count,
};

/// The verdict's action for a frame sent by egress `e`: XDP_TX for
/// `EGRESS_SAME` (0), above `MAX_ACTION` otherwise.
#[inline(always)]
pub fn action(e: u32) -> u32 {
    xdp_action::XDP_TX | (e << 8)
}

/// The egress of a `nat` or `fullnat` flow's replies, for its reverse entry
/// (`NatReverse::egress`), at the flow's first frame: `EGRESS_SAME` while its
/// backend is reached by the interface the frame came in on (the replies arrive
/// there too: XDP_TX), else the `EGRESS` index of that interface (two-arm: the
/// replies arrive on the backend's and are redirected back to the client's).
/// `EGRESS_SAME` as well for an interface that is in no `EGRESS` entry.
#[inline(always)]
pub fn reply_egress(ctx: &XdpContext, backend_egress: u8) -> u8 {
    if backend_egress == EGRESS_SAME {
        return EGRESS_SAME;
    }
    let at = ctx.ingress_ifindex() as u32;
    // An empty entry as ifindex 0 (no interface has it): compared as an
    // `Option`, LLVM reads the undefined result of the missing entry's
    // comparison, a register the verifier refuses to read.
    if EGRESS.get_ifindex(u32::from(EGRESS_CLIENT)).unwrap_or(0) == at {
        EGRESS_CLIENT
    } else if EGRESS.get_ifindex(u32::from(EGRESS_BACKEND)).unwrap_or(0) == at {
        EGRESS_BACKEND
    } else {
        EGRESS_SAME
    }
}

/// Largest action the kernel knows (XDP_REDIRECT); above it, `action`'s redirects.
const MAX_ACTION: u32 = 0xff;

/// The XDP action and counter of a verdict: a redirect (`action` above
/// `MAX_ACTION`) takes the egress interface's source MAC and goes to
/// `bpf_redirect_map` (counted `redirected` too); a missing `EGRESS` entry drops
/// the frame (`drop_no_egress`). Other verdicts as they are.
#[inline(always)]
pub fn send(ctx: &XdpContext, action: u32, counter: u32) -> (u32, u32) {
    if action <= MAX_ACTION {
        return (action, counter);
    }
    let v = redirect(ctx, action >> 8, counter);
    (v as u32, (v >> 32) as u32)
}

/// A call of its own: its frame stays off the callers' (`lb_rare_trace`'s
/// chain is near the 512-byte limit), and the one-arm path never makes it.
/// Returns the action and counter packed as in `main.rs`.
#[inline(never)]
fn redirect(ctx: &XdpContext, e: u32, counter: u32) -> u64 {
    let dropped = (u64::from(stat::DROP_NO_EGRESS) << 32) | u64::from(xdp_action::XDP_DROP);
    let (Some(m), Some(eth)) = (EGRESS_MAC.get(e), bytes_mut::<12>(ctx, 0)) else { return dropped };
    eth[6..12].copy_from_slice(&m.mac);
    match EGRESS.redirect(e, u64::from(xdp_action::XDP_DROP)) {
        Ok(a) => {
            count(stat::REDIRECTED);
            (u64::from(counter) << 32) | u64::from(a)
        }
        Err(_) => dropped,
    }
}
