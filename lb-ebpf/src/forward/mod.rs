//! Sending a frame to its backend, by the service's forwarding mode (carried in
//! the backend's entry): `dr` rewrites the MACs, `ipip` and `gue` encapsulate,
//! `nat` and `fullnat` continue in a program of their own (`nat.rs`,
//! `fullnat.rs`). The frame leaves by the backend's egress interface
//! (`egress.rs`).

mod dr;
pub mod egress;
pub mod fullnat;
mod fullnat_icmp;
mod fullnat_reply;
pub mod nat;
pub mod nat_frag;
pub mod nat_est;
pub mod nat_icmp;
pub use fullnat::Scratch as FullnatScratch;
pub mod nat_reply;
mod too_big;
mod tunnel;

use aya_ebpf::programs::XdpContext;
use lb_common::{Backend, Config, FlowKey, FORWARD_DR, FORWARD_FULLNAT, FORWARD_GUE, FORWARD_NAT};

use crate::parse::{Outcome, Packet};

/// Mutable access to `N` bytes at `offset` of the frame, bounds-checked.
#[inline(always)]
pub(crate) fn bytes_mut<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<&mut [u8; N]> {
    let start = ctx.data();
    if start + offset + N > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked just above; XDP frames are writable.
    Some(unsafe { &mut *((start + offset) as *mut [u8; N]) })
}

/// The big-endian 16-bit word at byte `i` of `b`, in one load (not two byte
/// loads, as `u16::from_be_bytes` of two bytes compiles to). For the rewrite's header fields and
/// addresses only: each sits at an even offset of a 2-aligned frame (the IP
/// header at 14 or 18, the TCP/UDP header a multiple of 4 bytes further) or of
/// a 4-aligned map value (`Backend::addr`, `SnatPool`, `NatReverse`), as
/// `nat::ip6` has always assumed.
#[inline(always)]
pub(crate) fn be16(b: &[u8], i: usize) -> u16 {
    let w = &b[i..i + 2];
    // SAFETY: two bytes in bounds, 2-aligned as said above.
    u16::from_be(unsafe { *(w.as_ptr() as *const u16) })
}

/// Stores `v` big-endian at byte `i` of `b` in one store (as `be16`).
#[inline(always)]
pub(crate) fn set_be16(b: &mut [u8], i: usize, v: u16) {
    let w = &mut b[i..i + 2];
    // SAFETY: as in `be16`.
    unsafe { *(w.as_mut_ptr() as *mut u16) = v.to_be() };
}

/// RFC 1071 one's-complement sum folded to 16 bits and inverted.
#[inline(always)]
pub(crate) fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Forwards the frame of `flow` to `b` (a `nat` backend: leaves it to `lb_nat`).
#[inline(always)]
pub fn deliver(ctx: &XdpContext, pkt: &Packet, flow: &FlowKey, b: &Backend, cfg: &Config, nat: (u8, u32, bool, u32)) -> Outcome {
    match b.forward {
        FORWARD_DR => dr::rewrite(ctx, b, cfg),
        // `lb_nat` takes over (`nat.rs`); `kind`, backend id, new flow, the
        // flow's `FlowVal::snat`.
        // `nat` and `fullnat` (the modes from FORWARD_NAT on): one comparison,
        // as before `fullnat` (two cost lb_xdp ~10,000 verified instructions).
        mode if mode >= FORWARD_NAT => nat::hand_over(nat.0, nat.1, nat.2, nat.3, mode == FORWARD_FULLNAT),
        mode => tunnel::encapsulate(ctx, pkt, b, cfg, tunnel::flow_mix(flow), mode == FORWARD_GUE),
    }
}
