//! `lb_decap`: the real servers' side of tunnel forwarding.
//!
//! The balancer's tunnelled packets arrive as Ethernet (at most one 802.1Q/802.1ad
//! tag) + outer IPv4/IPv6 + either the inner IP packet (IPIP, IP6IP6 and their
//! cross forms) or UDP to the GUE port and then the inner IP packet (GUE variant 1,
//! no GUE header). A packet whose outer destination is one of this host's addresses
//! (`DECAP_ADDRS`) loses its outer headers: the L2 header moves forward over them,
//! its ethertype becomes the inner family, `bpf_xdp_adjust_head` drops the gap, and
//! the stack gets the inner packet (XDP_PASS). Everything else passes untouched;
//! a tunnel packet to us that is not well formed (or whose outer IPv4 checksum is
//! wrong) is dropped. A congestion mark on the outer header is carried to the
//! inner one as RFC 6040 says (normal mode): outer CE makes an ECN-capable inner
//! packet CE, and drops one that is not ECN-capable. Every outcome is counted in
//! `DECAP_STATS` (`lb_common::decap_stat`).

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, HashMap, PerCpuArray},
    helpers::bpf_xdp_adjust_head,
    macros::btf_map,
    programs::XdpContext,
};
use lb_common::{
    decap::DECAP_MAX_ADDRS, decap_stat as ds, v4_mapped, DecapAddrKey, DecapAddrVal, DecapConfig,
};

use crate::parse::{ptr_at, read_be16};

/// This host's addresses: only packets to one of them are decapsulated.
#[btf_map]
pub static DECAP_ADDRS: HashMap<DecapAddrKey, DecapAddrVal, { DECAP_MAX_ADDRS as usize }> = HashMap::new();

/// The GUE port (0: GUE off), written by `lb-agent decap`.
#[btf_map]
pub static DECAP_CONFIG: Array<DecapConfig, 1> = Array::new();

/// One counter per outcome, indexed by `lb_common::decap_stat`.
#[btf_map]
pub static DECAP_STATS: PerCpuArray<u64, { ds::COUNT as usize }> = PerCpuArray::new();

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;
const PROTO_IPIP: u8 = 4;
const PROTO_IPV6: u8 = 41;
const PROTO_UDP: u8 = 17;
const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
/// IPv4 flags/fragment offset: More Fragments bit and the offset field.
const IP_MF_OFFSET: u16 = 0x3fff;
/// ECN codepoints (RFC 3168): Not-ECT and CE.
const ECN_NOT_ECT: u8 = 0;
const ECN_CE: u8 = 3;

/// What to do with a frame.
enum Verdict {
    Pass(u32),
    Drop(u32),
    Decap(Strip),
}

/// A well-formed tunnel packet to this host: how to take it apart.
struct Strip {
    /// Length of the L2 header (14, or 18 with a tag).
    l2: usize,
    /// Outer IP header (+ UDP header) length: what the frame loses.
    overhead: usize,
    inner_v6: bool,
    /// The outer header carried CE and the inner packet is ECT(0)/ECT(1): mark
    /// the inner header CE.
    mark_ce: bool,
    counter: u32,
}

/// What follows the outer IP header.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Carried {
    V4,
    V6,
    Gue,
}

/// The decapsulator. Every frame moves exactly one `DECAP_STATS` counter.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let (action, counter) = match classify(ctx) {
        Verdict::Pass(c) => (xdp_action::XDP_PASS, c),
        Verdict::Drop(c) => (xdp_action::XDP_DROP, c),
        Verdict::Decap(s) => match strip(ctx, &s) {
            Ok(()) => (xdp_action::XDP_PASS, s.counter),
            Err(()) => (xdp_action::XDP_DROP, ds::DROP_DECAP_FAILED),
        },
    };
    if let Some(c) = DECAP_STATS.get_ptr_mut(counter) {
        // SAFETY: per-CPU slot, only this CPU's program touches it now.
        unsafe { *c += 1 };
    }
    action
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> Verdict {
    let Ok(mut ethertype) = read_be16(ctx, 12) else { return Verdict::Pass(ds::PASS_NOT_IP) };
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let Ok(inner) = read_be16(ctx, ETH_HLEN + 2) else { return Verdict::Pass(ds::PASS_NOT_IP) };
        ethertype = inner;
        l3 += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IP => outer_v4(ctx, l3),
        ETH_P_IPV6 => outer_v6(ctx, l3),
        _ => Verdict::Pass(ds::PASS_NOT_IP),
    }
}

fn carried(proto: u8) -> Option<Carried> {
    match proto {
        PROTO_IPIP => Some(Carried::V4),
        PROTO_IPV6 => Some(Carried::V6),
        PROTO_UDP => Some(Carried::Gue),
        _ => None,
    }
}

/// For UDP: whether the datagram at `l4` goes to the GUE port, and its length.
/// `None`: not GUE (or too short to tell), so not a tunnel packet.
#[inline(always)]
fn gue_udp_len(ctx: &XdpContext, l4: usize) -> Option<usize> {
    let udp = ptr_at::<[u8; UDP_HLEN]>(ctx, l4).ok()?;
    // SAFETY: bounds checked.
    let udp = unsafe { &*udp };
    let port = DECAP_CONFIG.get(0).map_or(0, |c| c.gue_port);
    if port == 0 || u16::from_be_bytes([udp[2], udp[3]]) != port {
        return None;
    }
    Some(u16::from_be_bytes([udp[4], udp[5]]) as usize)
}

#[inline(always)]
fn local(addr: [u8; 16]) -> bool {
    // SAFETY: the value is only tested for presence.
    unsafe { DECAP_ADDRS.get(DecapAddrKey { addr }) }.is_some()
}

#[inline(always)]
fn outer_v4(ctx: &XdpContext, l3: usize) -> Verdict {
    let Ok(hdr) = ptr_at::<[u8; IPV4_HLEN]>(ctx, l3) else { return Verdict::Pass(ds::PASS_NOT_IP) };
    // SAFETY: bounds checked.
    let hdr = unsafe { &*hdr };
    if hdr[0] >> 4 != 4 {
        return Verdict::Pass(ds::PASS_NOT_IP);
    }
    let Some(what) = carried(hdr[9]) else { return Verdict::Pass(ds::PASS_NOT_TUNNEL) };
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    let mut udp_len = 0;
    if what == Carried::Gue {
        if ihl < IPV4_HLEN {
            return Verdict::Pass(ds::PASS_NOT_TUNNEL);
        }
        match gue_udp_len(ctx, l3 + ihl) {
            Some(len) => udp_len = len,
            None => return Verdict::Pass(ds::PASS_NOT_TUNNEL),
        }
    }
    if !local(v4_mapped([hdr[16], hdr[17], hdr[18], hdr[19]])) {
        return Verdict::Pass(ds::PASS_NOT_LOCAL);
    }
    let malformed = Verdict::Drop(ds::DROP_MALFORMED);
    let tot_len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    if ihl < IPV4_HLEN
        || tot_len < ihl
        || ctx.data() + l3 + tot_len > ctx.data_end()
        || u16::from_be_bytes([hdr[6], hdr[7]]) & IP_MF_OFFSET != 0
    {
        return malformed;
    }
    if !ipv4_checksum_ok(ctx, l3, ihl) {
        return Verdict::Drop(ds::DROP_BAD_CHECKSUM);
    }
    let counter = match what {
        Carried::V4 => ds::DECAP_IPIP,
        Carried::V6 => ds::DECAP_IP6_IN_IP4,
        Carried::Gue => ds::DECAP_GUE,
    };
    let outer_ecn = hdr[1] & 3;
    inner(ctx, l3, ihl, tot_len - ihl, what, udp_len, outer_ecn, counter)
}

#[inline(always)]
fn outer_v6(ctx: &XdpContext, l3: usize) -> Verdict {
    let Ok(hdr) = ptr_at::<[u8; IPV6_HLEN]>(ctx, l3) else { return Verdict::Pass(ds::PASS_NOT_IP) };
    // SAFETY: bounds checked.
    let hdr = unsafe { &*hdr };
    if hdr[0] >> 4 != 6 {
        return Verdict::Pass(ds::PASS_NOT_IP);
    }
    // Extension headers are not followed: such a packet is no tunnel packet of ours.
    let Some(what) = carried(hdr[6]) else { return Verdict::Pass(ds::PASS_NOT_TUNNEL) };
    let mut udp_len = 0;
    if what == Carried::Gue {
        match gue_udp_len(ctx, l3 + IPV6_HLEN) {
            Some(len) => udp_len = len,
            None => return Verdict::Pass(ds::PASS_NOT_TUNNEL),
        }
    }
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&hdr[24..40]);
    // IPv4-mapped destinations never appear on the wire; in DECAP_ADDRS they are
    // this host's IPv4 addresses, so they must not match.
    if dst[..12] == V4_MAPPED_PREFIX || !local(dst) {
        return Verdict::Pass(ds::PASS_NOT_LOCAL);
    }
    let payload_len = u16::from_be_bytes([hdr[4], hdr[5]]) as usize;
    if ctx.data() + l3 + IPV6_HLEN + payload_len > ctx.data_end() {
        return Verdict::Drop(ds::DROP_MALFORMED);
    }
    let counter = match what {
        Carried::V4 => ds::DECAP_IP4_IN_IP6,
        Carried::V6 => ds::DECAP_IP6IP6,
        Carried::Gue => ds::DECAP_GUE,
    };
    let outer_ecn = (hdr[1] >> 4) & 3;
    inner(ctx, l3, IPV6_HLEN, payload_len, what, udp_len, outer_ecn, counter)
}

/// Checks what follows the outer IP header (`outer_len` bytes at `l3`, leaving
/// `rest` bytes, all within the frame): the UDP length for GUE, then the inner
/// header's version and length against what the outer headers leave, and the
/// outer ECN codepoint against the inner one (RFC 6040).
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "the outer header's facts, each a register")]
fn inner(
    ctx: &XdpContext,
    l3: usize,
    outer_len: usize,
    rest: usize,
    what: Carried,
    udp_len: usize,
    outer_ecn: u8,
    counter: u32,
) -> Verdict {
    let malformed = Verdict::Drop(ds::DROP_MALFORMED);
    let (overhead, len) = if what == Carried::Gue {
        if udp_len != rest || rest < UDP_HLEN {
            return malformed;
        }
        (outer_len + UDP_HLEN, rest - UDP_HLEN)
    } else {
        (outer_len, rest)
    };
    let at = l3 + overhead;
    let Ok(first) = ptr_at::<u8>(ctx, at) else { return malformed };
    // SAFETY: bounds checked.
    let version = unsafe { *first } >> 4;
    let (inner_v6, inner_ecn) = match (what, version) {
        (Carried::V4 | Carried::Gue, 4) => {
            let Ok(h) = ptr_at::<[u8; IPV4_HLEN]>(ctx, at) else { return malformed };
            // SAFETY: bounds checked.
            let h = unsafe { &*h };
            let tot_len = u16::from_be_bytes([h[2], h[3]]) as usize;
            if ((h[0] & 0x0f) as usize) * 4 < IPV4_HLEN || tot_len != len {
                return malformed;
            }
            (false, h[1] & 3)
        }
        (Carried::V6 | Carried::Gue, 6) => {
            let Ok(h) = ptr_at::<[u8; IPV6_HLEN]>(ctx, at) else { return malformed };
            // SAFETY: bounds checked.
            let h = unsafe { &*h };
            if u16::from_be_bytes([h[4], h[5]]) as usize + IPV6_HLEN != len {
                return malformed;
            }
            (true, (h[1] >> 4) & 3)
        }
        _ => return malformed,
    };
    let outer_ce = outer_ecn == ECN_CE;
    if outer_ce && inner_ecn == ECN_NOT_ECT {
        return Verdict::Drop(ds::DROP_CE_NOT_ECT);
    }
    let mark_ce = outer_ce && inner_ecn != ECN_CE;
    Verdict::Decap(Strip { l2: l3, overhead, inner_v6, mark_ce, counter })
}

/// Whether the IPv4 header of `ihl` bytes at `l3` (within the frame) sums to
/// 0xffff in ones' complement, its checksum included.
#[inline(always)]
fn ipv4_checksum_ok(ctx: &XdpContext, l3: usize, ihl: usize) -> bool {
    let mut sum: u32 = 0;
    // At most 60 bytes: 30 words.
    for i in 0..30 {
        if i * 2 >= ihl {
            break;
        }
        let Ok(w) = read_be16(ctx, l3 + i * 2) else { return false };
        sum += u32::from(w);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum == 0xffff
}

/// Sets the inner header's ECN field to CE (RFC 6040 decapsulation of an outer
/// CE mark); for IPv4 the header checksum follows (RFC 1624 update).
#[inline(always)]
fn mark_inner_ce(ctx: &XdpContext, at: usize, v6: bool) -> Result<(), ()> {
    let h = ptr_at::<[u8; IPV4_HLEN]>(ctx, at)? as *mut [u8; IPV4_HLEN];
    // SAFETY: bounds checked by ptr_at (an IPv6 header is longer still).
    let h = unsafe { &mut *h };
    if v6 {
        h[1] |= ECN_CE << 4;
        return Ok(());
    }
    let old = u16::from_be_bytes([h[0], h[1]]);
    h[1] |= ECN_CE;
    let new = u16::from_be_bytes([h[0], h[1]]);
    let check = u16::from_be_bytes([h[10], h[11]]);
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    h[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    Ok(())
}

/// Moves the L2 header forward over the outer headers, sets its ethertype to the
/// inner family and drops the gap in front. The frame was checked to hold the
/// outer headers and the inner header after them.
#[inline(always)]
fn strip(ctx: &XdpContext, s: &Strip) -> Result<(), ()> {
    if s.mark_ce {
        mark_inner_ce(ctx, s.l2 + s.overhead, s.inner_v6)?;
    }
    // SAFETY (all reads and writes below): each pointer comes from ptr_at, which
    // checked that the bytes are within the frame.
    let macs = unsafe { *ptr_at::<[u8; 12]>(ctx, 0)? };
    let mut ethertype_at = s.overhead + 12;
    unsafe { *(ptr_at::<[u8; 12]>(ctx, s.overhead)? as *mut [u8; 12]) = macs };
    if s.l2 == ETH_HLEN + VLAN_HLEN {
        let tag = unsafe { *ptr_at::<[u8; VLAN_HLEN]>(ctx, 12)? };
        unsafe { *(ptr_at::<[u8; VLAN_HLEN]>(ctx, ethertype_at)? as *mut [u8; VLAN_HLEN]) = tag };
        ethertype_at += VLAN_HLEN;
    }
    let ethertype = if s.inner_v6 { ETH_P_IPV6 } else { ETH_P_IP };
    unsafe { *(ptr_at::<[u8; 2]>(ctx, ethertype_at)? as *mut [u8; 2]) = ethertype.to_be_bytes() };
    // SAFETY: ctx.ctx is the program's own xdp_md.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, s.overhead as i32) } != 0 {
        return Err(());
    }
    // The helper invalidated every packet pointer: nothing more is read here, but
    // the new start must still hold the L2 header.
    if ctx.data() + s.l2 > ctx.data_end() {
        return Err(());
    }
    Ok(())
}
