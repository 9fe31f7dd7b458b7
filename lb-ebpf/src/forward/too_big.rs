//! A packet too large to encapsulate within the MTU is answered, from XDP, the way
//! a router on the path would: ICMP "fragmentation needed" (type 3, code 4, with
//! the next-hop MTU) for IPv4 with DF, ICMPv6 "packet too big" (type 2, with the
//! MTU) for IPv6. The message comes from the address the client sent to (the VIP)
//! and carries the invoking packet's IP header and its first 8 bytes of payload
//! (RFC 792; for IPv6 the 40-byte header and 8 bytes, within RFC 4443's "as much
//! as fits in 1280 bytes"), so the client's stack finds the connection and lowers
//! its path MTU. The frame is rewritten in place and sent back out (XDP_TX),
//! counted as `icmp_too_big`. An IPv4 packet with IP options is dropped instead
//! (`drop_too_big`): every size here stays fixed, as the verifier wants.

use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{stat, Config};

use super::bytes_mut;
use crate::parse::{Outcome, Packet};

const ICMP_HLEN: usize = 8;
/// Bytes of the invoking packet's payload quoted after its IP header.
const QUOTED: usize = 8;

#[inline(always)]
pub fn reply(ctx: &XdpContext, pkt: &Packet, cfg: &Config, mtu: u32) -> Outcome {
    if !pkt.v6 && pkt.l4 != pkt.l3 + 20 {
        // IPv4 options: not answered (see `v4`).
        return Outcome::Drop(stat::DROP_TOO_BIG);
    }
    let done = match (pkt.l3, pkt.v6) {
        (14, false) => v4::<14>(ctx, cfg, mtu),
        (18, false) => v4::<18>(ctx, cfg, mtu),
        (14, true) => v6::<14>(ctx, cfg, mtu),
        _ => v6::<18>(ctx, cfg, mtu),
    };
    match done {
        Some(()) => Outcome::TxAs(stat::ICMP_TOO_BIG),
        None => Outcome::Drop(stat::DROP_ENCAP_FAILED),
    }
}

/// Grows the frame by `grow` bytes in front (room for the new IP and ICMP headers)
/// and writes the reply's Ethernet header: back to the sender's MAC, from ours,
/// with the original tag. The old Ethernet header then sits at `grow` (`grow` is
/// at least the header's length, so the two do not overlap).
#[inline(always)]
fn turn_around<const L2: usize>(ctx: &XdpContext, cfg: &Config, grow: usize, ethertype: u16) -> Option<()> {
    // SAFETY: plain helper call on our context; bounds are re-checked below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return None;
    }
    let old = bytes_mut::<L2>(ctx, grow)? as *const [u8; L2];
    let eth = bytes_mut::<L2>(ctx, 0)?;
    // SAFETY: `old` points into the frame, bounds-checked, disjoint from `eth`.
    let old = unsafe { &*old };
    eth[0..6].copy_from_slice(&old[6..12]);
    eth[6..12].copy_from_slice(&cfg.iface_mac);
    if L2 == 18 {
        eth[12..16].copy_from_slice(&old[12..16]);
    }
    eth[L2 - 2..L2].copy_from_slice(&ethertype.to_be_bytes());
    Some(())
}

/// Cuts the frame to `len` bytes.
#[inline(always)]
fn truncate(ctx: &XdpContext, len: usize) -> Option<()> {
    let delta = len as i32 - (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: plain helper call; a shrink within the frame.
    (delta > 0 || unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } == 0).then_some(())
}

/// The Internet checksum of the `N` bytes at `offset` (N a multiple of 4) plus
/// `seed` (a partial sum in memory byte order), ready to store with `to_ne_bytes`.
/// Summed by the kernel's csum helper: fixed sizes, few registers, no loop.
#[inline(always)]
fn checksum<const N: usize>(ctx: &XdpContext, offset: usize, seed: u32) -> Option<u16> {
    let p = bytes_mut::<N>(ctx, offset)? as *mut [u8; N] as *mut u32;
    // SAFETY: a bounds-checked frame pointer; N is a multiple of 4.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p, N as u32, seed) };
    if sum < 0 {
        return None;
    }
    let s = sum as u32;
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    Some(!(s as u16))
}

/// Not inlined (nor is `v6`): a rare path, kept out of the balancer's stack frame
/// (the two share the verifier's 512 bytes).
#[inline(never)]
fn v4<const L2: usize>(ctx: &XdpContext, cfg: &Config, mtu: u32) -> Option<()> {
    // The quoted header is 20 bytes: a packet with IP options is not answered
    // (`reply` drops it), which keeps every size here fixed for the verifier.
    turn_around::<L2>(ctx, cfg, 20 + ICMP_HLEN, 0x0800)?;
    truncate(ctx, L2 + 20 + ICMP_HLEN + 20 + QUOTED)?;
    let total = (20 + ICMP_HLEN + 20 + QUOTED) as u16;
    // The invoking packet's header now follows the new headers.
    let orig = bytes_mut::<20>(ctx, L2 + 20 + ICMP_HLEN)? as *const [u8; 20];
    let h = bytes_mut::<20>(ctx, L2)?;
    // SAFETY: bounds-checked pointer into the frame, disjoint from `h`.
    let orig = unsafe { &*orig };
    h[0..12].copy_from_slice(&[0x45, 0xc0, (total >> 8) as u8, total as u8, 0, 0, 0, 0, 64, 1, 0, 0]);
    h[12..16].copy_from_slice(&orig[16..20]);
    h[16..20].copy_from_slice(&orig[12..16]);
    let ip_sum = checksum::<20>(ctx, L2, 0)?;
    bytes_mut::<2>(ctx, L2 + 10)?.copy_from_slice(&ip_sum.to_ne_bytes());
    let icmp = bytes_mut::<ICMP_HLEN>(ctx, L2 + 20)?;
    let mtu = mtu.min(0xffff) as u16;
    icmp.copy_from_slice(&[3, 4, 0, 0, 0, 0, (mtu >> 8) as u8, mtu as u8]);
    let sum = checksum::<{ ICMP_HLEN + 20 + QUOTED }>(ctx, L2 + 20, 0)?;
    bytes_mut::<2>(ctx, L2 + 22)?.copy_from_slice(&sum.to_ne_bytes());
    Some(())
}

#[inline(never)]
fn v6<const L2: usize>(ctx: &XdpContext, cfg: &Config, mtu: u32) -> Option<()> {
    let quoted = 40 + QUOTED;
    turn_around::<L2>(ctx, cfg, 40 + ICMP_HLEN, 0x86dd)?;
    truncate(ctx, L2 + 40 + ICMP_HLEN + quoted)?;
    let plen = (ICMP_HLEN + quoted) as u16;
    let orig = bytes_mut::<40>(ctx, L2 + 40 + ICMP_HLEN)? as *const [u8; 40];
    let h = bytes_mut::<40>(ctx, L2)?;
    // SAFETY: bounds-checked pointer into the frame, disjoint from `h`.
    let orig = unsafe { &*orig };
    h[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
    h[4..6].copy_from_slice(&plen.to_be_bytes());
    h[6] = 58;
    h[7] = 64;
    h[8..24].copy_from_slice(&orig[24..40]);
    h[24..40].copy_from_slice(&orig[8..24]);
    let icmp = bytes_mut::<ICMP_HLEN>(ctx, L2 + 40)?;
    *icmp = [2, 0, 0, 0, (mtu >> 24) as u8, (mtu >> 16) as u8, (mtu >> 8) as u8, mtu as u8];
    // Pseudo-header: both addresses, the upper-layer length and next header 58
    // (as one 32-bit word in memory order); then the message.
    let pseudo = checksum::<32>(ctx, L2 + 8, (u32::from(plen) + 58).to_be())?;
    let csum = checksum::<{ ICMP_HLEN + 48 }>(ctx, L2 + 40, u32::from(!pseudo))?;
    bytes_mut::<2>(ctx, L2 + 42)?.copy_from_slice(&csum.to_ne_bytes());
    Some(())
}
