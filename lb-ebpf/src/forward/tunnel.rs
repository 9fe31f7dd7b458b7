//! Tunnel modes: the client's IP packet is carried inside a new IP header (IPIP,
//! IP6IP6) or a new IP and UDP header (GUE variant 1) from the balancer's tunnel
//! source to the backend, which decapsulates it (`lb_decap` or the kernel) and
//! answers the client directly.
//!
//! Outer header: DSCP/ECN copied from the inner packet; IPv4 with DF when the inner
//! packet is IPv6 or IPv4 with DF, TTL 64, identification 0, checksum computed;
//! IPv6 with hop limit 64 and a flow label from the flow. GUE's UDP source port
//! comes from the flow (49152..65535), so real servers' RSS spreads flows; its
//! checksum is 0 (IPv4: no checksum; IPv6: RFC 6935's zero checksum for tunnels,
//! since the inner packet carries its own).

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{stat, Backend, Config, FlowKey};

use super::{bytes_mut, fold, too_big};
use crate::{
    parse::{Outcome, Packet},
    stats::count,
};

const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const IPPROTO_UDP: u8 = 17;
const TTL: u8 = 64;

/// Per-flow entropy for the GUE source port and the IPv6 flow label (cheap: the
/// established path pays it on every packet).
#[inline(always)]
pub fn flow_mix(f: &FlowKey) -> u32 {
    let w = |a: &[u8; 16], i: usize| u32::from_le_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    let mut h = w(&f.src, 12) ^ w(&f.src, 8).rotate_left(5) ^ w(&f.src, 4).rotate_left(11) ^ w(&f.src, 0).rotate_left(17);
    h ^= w(&f.dst, 12).rotate_left(23) ^ (((f.sport as u32) << 16) | f.dport as u32);
    h = h.wrapping_mul(0x9e37_79b1);
    h ^ (h >> 15)
}

#[inline(always)]
pub fn encapsulate(ctx: &XdpContext, pkt: &Packet, b: &Backend, cfg: &Config, flow: &FlowKey, gue: bool) -> Outcome {
    let addr = words(&b.addr);
    // One comparison, no branch per word (each branch is a path the verifier walks).
    let outer_v6 = (addr[0] | addr[1] | (addr[2] ^ V4_MAPPED_WORD)) != 0;
    let overhead = if outer_v6 { 40 } else { 20 } + if gue { 8 } else { 0 };
    if pkt.ip_len + overhead > cfg.mtu as usize {
        if pkt.v6 || pkt.df {
            return too_big::reply(ctx, pkt, cfg, cfg.mtu.saturating_sub(overhead as u32));
        }
        return Outcome::Drop(stat::DROP_TOO_BIG);
    }
    // The flow's entropy only where it is used (GUE's port, IPv6's flow label).
    let hash = if gue | outer_v6 { flow_mix(flow) } else { 0 };
    let written = if pkt.l3 == 14 {
        headers::<14>(ctx, pkt, b, cfg, hash, gue, outer_v6, overhead)
    } else {
        headers::<18>(ctx, pkt, b, cfg, hash, gue, outer_v6, overhead)
    };
    if written.is_none() {
        return Outcome::Drop(stat::DROP_ENCAP_FAILED);
    }
    count(if gue { stat::ENCAP_GUE } else { stat::ENCAP_IPIP });
    Outcome::Tx
}

/// `lb_common::v4_mapped`'s third 4-byte word (`::ffff:0:0/96`) as it lies in memory.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

// The address fields read as 4-byte words lie 4-aligned in 4-aligned map values.
const _: () = {
    assert!(core::mem::align_of::<Backend>() >= 4 && core::mem::align_of::<Config>() >= 4);
    assert!(core::mem::offset_of!(Backend, addr) % 4 == 0 && core::mem::offset_of!(Backend, mac) % 4 == 0);
    assert!(core::mem::offset_of!(Config, tunnel_source_v4) % 4 == 0);
    assert!(core::mem::offset_of!(Config, tunnel_source_v6) % 4 == 0);
    assert!(core::mem::offset_of!(Config, iface_mac) % 4 == 0);
};

/// A 16-byte address field of a map value as four words in memory order.
#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    // SAFETY: only called on the fields asserted 4-aligned above.
    unsafe { *(a.as_ptr() as *const [u32; 4]) }
}

/// One BPF store of the low `W` bytes of `v` at packet address `p` (LLVM splits
/// an unaligned Rust store into single bytes on this target; the kernel, and
/// x86's JIT, take unaligned packet stores as they are).
#[inline(always)]
fn store<const W: usize>(p: usize, v: u32) {
    // SAFETY: callers pass `p` inside a bounds-checked range of the frame, `W`
    // bytes before its end; the instruction writes only those bytes.
    unsafe {
        match W {
            4 => core::arch::asm!("*(u32 *)({p} + 0) = {v}", p = in(reg) p, v = in(reg) v as u64, options(nostack)),
            _ => core::arch::asm!("*(u16 *)({p} + 0) = {v}", p = in(reg) p, v = in(reg) v as u64, options(nostack)),
        }
    }
}

/// The start of the frame when it holds at least `len` bytes.
#[inline(always)]
fn room(ctx: &XdpContext, len: usize) -> Option<usize> {
    let start = ctx.data();
    if start + len > ctx.data_end() {
        return None;
    }
    Some(start)
}

/// Makes room for the outer headers in front of the IP packet and writes them;
/// `L2` is the Ethernet header's length (with its tag, if any), kept as it was
/// but for the MACs and the EtherType. The headers are built in registers and
/// written as 4-byte words (native order: each word's bytes land in memory
/// order); the IPv4 checksum is the one's-complement sum of those words' halves,
/// which RFC 1071 allows in either byte order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn headers<const L2: usize>(
    ctx: &XdpContext,
    pkt: &Packet,
    b: &Backend,
    cfg: &Config,
    hash: u32,
    gue: bool,
    outer_v6: bool,
    overhead: usize,
) -> Option<()> {
    // SAFETY: plain helper call on our context; bounds are re-checked below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        return None;
    }
    if L2 == 18 {
        // The old header's tag, now `overhead` (at least 20) bytes further on.
        let tag = *bytes_mut::<4>(ctx, overhead + 12)?;
        bytes_mut::<4>(ctx, 12)?.copy_from_slice(&tag);
    }
    let proto = if gue { IPPROTO_UDP } else if pkt.v6 { IPPROTO_IPV6 } else { IPPROTO_IPIP };
    let ip_hlen = if outer_v6 { 40 } else { 20 };
    let tos = pkt.tos as u32;
    let p = if outer_v6 {
        let p = room(ctx, L2 + 40)?;
        let label = hash & 0x000f_ffff;
        let plen = ((overhead - ip_hlen + pkt.ip_len) as u16).swap_bytes() as u32;
        store::<4>(p + L2, (0x60 | tos >> 4) | ((tos << 4) & 0xf0 | label >> 16) << 8 | (label >> 8 & 0xff) << 16 | (label & 0xff) << 24);
        store::<4>(p + L2 + 4, plen | (proto as u32) << 16 | (TTL as u32) << 24);
        let (src, dst) = (words(&cfg.tunnel_source_v6), words(&b.addr));
        for i in 0..4 {
            store::<4>(p + L2 + 8 + 4 * i, src[i]);
            store::<4>(p + L2 + 24 + 4 * i, dst[i]);
        }
        p
    } else {
        let p = room(ctx, L2 + 20)?;
        let total = ((overhead + pkt.ip_len) as u16).swap_bytes() as u32;
        let df: u32 = if pkt.v6 | pkt.df { 0x40 } else { 0 };
        // SAFETY: a field asserted 4-aligned above.
        let src = unsafe { *(cfg.tunnel_source_v4.as_ptr() as *const u32) };
        let w = [0x45 | tos << 8 | total << 16, df << 16, TTL as u32 | (proto as u32) << 8, src, words(&b.addr)[3]];
        let mut sum = 0u32;
        for x in w {
            sum += (x & 0xffff) + (x >> 16);
        }
        let csum = fold(sum) as u32;
        store::<4>(p + L2, w[0]);
        store::<4>(p + L2 + 4, w[1]);
        store::<4>(p + L2 + 8, w[2] | csum << 16);
        store::<4>(p + L2 + 12, w[3]);
        store::<4>(p + L2 + 16, w[4]);
        p
    };
    if gue {
        let p = room(ctx, L2 + ip_hlen + 8)?;
        let sport = (0xc000 | (hash as u16 & 0x3fff)).swap_bytes() as u32;
        let len = ((8 + pkt.ip_len) as u16).swap_bytes() as u32;
        store::<4>(p + L2 + ip_hlen, sport | (b.gue_port.swap_bytes() as u32) << 16);
        store::<4>(p + L2 + ip_hlen + 4, len);
    }
    // The MACs (the backend's or its next hop's, ours) and the EtherType.
    // SAFETY: fields asserted 4-aligned above; 6-byte arrays read as 4 + 2 and
    // 2 + 2 + 2 bytes.
    let (mac, ours) = unsafe {
        let m = b.mac.as_ptr();
        let o = cfg.iface_mac.as_ptr() as *const u16;
        ((*(m as *const u32), *(m.add(4) as *const u16)), [*o, *o.add(1), *o.add(2)])
    };
    let ethertype: u16 = if outer_v6 { 0x86dd } else { 0x0800 };
    store::<4>(p, mac.0);
    store::<2>(p + 4, mac.1 as u32);
    store::<2>(p + 6, ours[0] as u32);
    store::<2>(p + 8, ours[1] as u32);
    store::<2>(p + 10, ours[2] as u32);
    store::<2>(p + L2 - 2, ethertype.swap_bytes() as u32);
    Some(())
}
