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
pub fn encapsulate(ctx: &XdpContext, pkt: &Packet, b: &Backend, cfg: &Config, hash: u32, gue: bool) -> Outcome {
    let addr = words(&b.addr);
    // One comparison of three words: no memset/memcmp call, no branch per word.
    let outer_v6 = (addr[0] | addr[1] | (addr[2] ^ V4_MAPPED_WORD)) != 0;
    let overhead = if outer_v6 { 40 } else { 20 } + if gue { 8 } else { 0 };
    if pkt.ip_len + overhead > cfg.mtu as usize {
        if pkt.v6 || pkt.df {
            return too_big::reply(ctx, pkt, cfg, cfg.mtu.saturating_sub(overhead as u32));
        }
        return Outcome::Drop(stat::DROP_TOO_BIG);
    }
    let written = if pkt.l3 == 14 {
        headers::<14>(ctx, pkt, b, cfg, hash, gue, outer_v6, overhead)
    } else {
        headers::<18>(ctx, pkt, b, cfg, hash, gue, outer_v6, overhead)
    };
    if written.is_none() {
        return Outcome::Drop(stat::DROP_ENCAP_FAILED);
    }
    count(if gue { stat::ENCAP_GUE } else { stat::ENCAP_IPIP });
    Outcome::Out(u32::from(b.egress))
}

/// `lb_common::v4_mapped`'s third 4-byte word (`::ffff:0:0/96`) as it lies in memory.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

const _: () = {
    assert!(core::mem::align_of::<Backend>() >= 4 && core::mem::offset_of!(Backend, addr) % 4 == 0);
};

/// A 16-byte address field of a map value as four words in memory order.
#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    // SAFETY: only called on `Backend::addr`, asserted 4-aligned above.
    unsafe { *(a.as_ptr() as *const [u32; 4]) }
}

/// Makes room for the outer headers in front of the IP packet and writes them;
/// `L2` is the Ethernet header's length (with its tag, if any), kept as it was
/// but for the MACs and the EtherType.
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
    let eth = bytes_mut::<L2>(ctx, 0)?;
    eth[0..6].copy_from_slice(&b.mac);
    eth[6..12].copy_from_slice(&cfg.iface_mac);
    if L2 == 18 {
        // The old header's tag, now `overhead` (at least 20) bytes further on.
        let tag = *bytes_mut::<4>(ctx, overhead + 12)?;
        bytes_mut::<4>(ctx, 12)?.copy_from_slice(&tag);
    }
    let ethertype: u16 = if outer_v6 { 0x86dd } else { 0x0800 };
    eth[L2 - 2..L2].copy_from_slice(&ethertype.to_be_bytes());
    let proto = if gue { IPPROTO_UDP } else if pkt.v6 { IPPROTO_IPV6 } else { IPPROTO_IPIP };
    let ip_hlen = if outer_v6 { 40 } else { 20 };
    if outer_v6 {
        let h = bytes_mut::<40>(ctx, L2)?;
        let label = hash & 0x000f_ffff;
        h[0] = 0x60 | (pkt.tos >> 4);
        h[1] = (pkt.tos << 4) | (label >> 16) as u8;
        h[2] = (label >> 8) as u8;
        h[3] = label as u8;
        let plen = (overhead - ip_hlen + pkt.ip_len) as u16;
        h[4..6].copy_from_slice(&plen.to_be_bytes());
        h[6] = proto;
        h[7] = TTL;
        h[8..24].copy_from_slice(&cfg.tunnel_source_v6);
        h[24..40].copy_from_slice(&b.addr);
    } else {
        let h = bytes_mut::<20>(ctx, L2)?;
        let total = (overhead + pkt.ip_len) as u16;
        let df = if pkt.v6 || pkt.df { 0x40 } else { 0 };
        let mut hdr = [
            0x45, pkt.tos, (total >> 8) as u8, total as u8, 0, 0, df, 0, TTL, proto, 0, 0,
            cfg.tunnel_source_v4[0], cfg.tunnel_source_v4[1], cfg.tunnel_source_v4[2], cfg.tunnel_source_v4[3],
            b.addr[12], b.addr[13], b.addr[14], b.addr[15],
        ];
        // The checksum from the values, not read back from the frame.
        let mut sum = 0u32;
        let mut i = 0;
        while i < 20 {
            sum += u32::from(u16::from_be_bytes([hdr[i], hdr[i + 1]]));
            i += 2;
        }
        hdr[10..12].copy_from_slice(&fold(sum).to_be_bytes());
        *h = hdr;
    }
    if gue {
        let u = bytes_mut::<8>(ctx, L2 + ip_hlen)?;
        let sport = 0xc000 | (hash as u16 & 0x3fff);
        let len = (8 + pkt.ip_len) as u16;
        u[0..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&b.port.to_be_bytes());
        u[4..6].copy_from_slice(&len.to_be_bytes());
        u[6..8].copy_from_slice(&[0, 0]);
    }
    Some(())
}
