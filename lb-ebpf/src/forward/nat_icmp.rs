//! ICMP errors about `nat` flows, translated both ways with the packet they
//! embed, as Linux's NAT does for a connection's "related" ICMP:
//!
//! - to the backend (`to_backend`, from `lb_nat`): an error sent to the VIP about
//!   a reply (embedded VIP:vport -> client), found by `icmp.rs` in `lb_rare` and
//!   handed over with the flow's backend (`ICMP_ERROR` in `NAT_STASH`). The outer
//!   destination becomes the backend and the embedded source backend:bport.
//! - to the client (`to_client`, from `lb_nat_reply`): an error about a packet we
//!   sent to a backend (embedded client -> backend:bport), from the backend or a
//!   router between, addressed to the client. Found in `NAT_REVERSE` by the
//!   embedded packet's reversed 5-tuple (the reply's); the embedded destination
//!   becomes VIP:vport, and the outer source the VIP when it is the backend (a
//!   router keeps its own address).
//!
//! Errors about `fullnat` flows take the same two ways, with both embedded ends
//! and both outer addresses translated (`fullnat_icmp.rs`: the flow's
//! `FULLNAT_FORWARD` entry towards the backend, its `FULLNAT_REVERSE` entry
//! towards the client).
//!
//! Both then fix every checksum incrementally (RFC 1624): the outer IPv4 header's,
//! the embedded IPv4 header's, the embedded TCP/UDP checksum when quoted (TCP: the
//! whole 20-byte header; IPv4 UDP 0 stays 0), and the ICMP checksum, which for
//! ICMPv6 covers the outer addresses through its pseudo-header. TTL / hop limit
//! are decremented (at 1: `drop_nat_ttl`), MACs set to the next hop's and ours.
//! The translation (`rewrite`) takes the addresses and ports the frame should
//! carry, whatever they are: FULLNAT's go through it unchanged.
//!
//! Limits, as in `icmp.rs`: outer and embedded IPv4 without options, ICMPv6 and
//! the embedded TCP/UDP header right after the fixed IPv6 headers, no embedded
//! later fragment; anything else is not translated.

use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map, programs::XdpContext};
use lb_common::{
    stat, FlowKey, NatReverse, CONFIG_FORWARD_ICMP, FORWARD_FULLNAT, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};

use super::{bytes_mut, fold};
use crate::{
    maps::{BACKENDS, CONFIG, FULLNAT_REVERSE, NAT_REVERSE},
    parse::{read_be16, Outcome},
    stats::{count, count_forward},
};

/// Bit of `Outcome::Nat`'s word (kept in `NatStash::backend_id`): the packet is
/// an ICMP error for the flow's backend, not one of the flow's packets. Backend
/// ids stay far below it.
pub const ICMP_ERROR: u32 = 1 << 30;

/// What an `_at` function returns for a frame sent (else a counter).
const SENT: u32 = u32::MAX;

/// What `to_client_at` returns for a frame sent: this bit with the flow's reply
/// `egress` in the low byte (two-arm: redirected to the client's interface).
const SENT_VIA: u32 = 1 << 31;

/// Per CPU: the addresses of the ICMP error at hand (`read` fills it, the
/// direction changes it, `rewrite` writes it): kept off the stack, where its
/// copies took 970 bytes. Never pinned.
#[btf_map]
static NAT_ICMP: PerCpuArray<Addresses, 1> = PerCpuArray::new();

/// An ICMP error's addresses and ports: as read from the frame, or as they
/// should become. IPv4 addresses v4-mapped.
#[repr(C)]
pub struct Addresses {
    /// The outer header's.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The embedded packet's, as it left its sender (host byte order ports).
    pub inner_src: [u8; 16],
    pub inner_dst: [u8; 16],
    pub inner_sport: u16,
    pub inner_dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
    /// The IP packet's length (IPv4 total length, IPv6 40 + payload length).
    pub ip_len: u32,
    /// A lookup's key (off the stack too): `to_client`'s `NAT_REVERSE` /
    /// `FULLNAT_REVERSE` key, `fullnat_icmp::to_backend`'s `FULLNAT_FORWARD` key.
    pub key: FlowKey,
}

/// `lb_nat` for an ICMP error about a reply of `backend_id`'s flow (see above).
#[inline(always)]
pub fn to_backend(ctx: &XdpContext, backend_id: u32) -> Outcome {
    let c = match layout(ctx) {
        Some((14, false)) => to_backend_at::<14, false>(ctx, backend_id),
        Some((18, false)) => to_backend_at::<18, false>(ctx, backend_id),
        Some((14, true)) => to_backend_at::<14, true>(ctx, backend_id),
        Some(_) => to_backend_at::<18, true>(ctx, backend_id),
        None => stat::PASS_ICMP,
    };
    match c {
        // Out by the backend's interface (two-arm: `Backend::egress`).
        SENT => Outcome::Out(BACKENDS.get(backend_id).map_or(0, |b| u32::from(b.egress))),
        c => outcome(c),
    }
}

/// `lb_nat_reply` for a frame that is no `nat` or `fullnat` reply: an ICMP
/// error about a packet sent to a `nat` or `fullnat` backend is translated for
/// its client; anything else passes (`pass_not_vip`, as before).
#[inline(always)]
pub fn to_client(ctx: &XdpContext) -> u64 {
    if CONFIG.get(0).map_or(0, |c| c.flags) & CONFIG_FORWARD_ICMP == 0 {
        return crate::packed(Outcome::Pass(stat::PASS_NOT_VIP));
    }
    let c = match layout(ctx) {
        Some((14, false)) => to_client_at::<14, false>(ctx),
        Some((18, false)) => to_client_at::<18, false>(ctx),
        Some((14, true)) => to_client_at::<14, true>(ctx),
        Some(_) => to_client_at::<18, true>(ctx),
        None => stat::PASS_NOT_VIP,
    };
    // By the interface the flow's first frame came in on, as its replies.
    if c & SENT_VIA != 0 {
        return super::nat_reply::sent_back(c as u8, stat::NAT_ICMP_REPLY);
    }
    crate::packed(outcome(c))
}

#[inline(always)]
fn outcome(counter: u32) -> Outcome {
    if counter == stat::DROP_NAT_TTL || counter == stat::DROP_NAT_UNSUPPORTED {
        Outcome::Drop(counter)
    } else {
        Outcome::Pass(counter)
    }
}

/// The Ethernet header's length (one 802.1Q / 802.1ad tag at most) and the
/// family, for IPv4 and IPv6 frames.
#[inline(always)]
fn layout(ctx: &XdpContext) -> Option<(usize, bool)> {
    let mut l2 = 14;
    let mut ethertype = read_be16(ctx, 12).ok()?;
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        ethertype = read_be16(ctx, 16).ok()?;
        l2 = 18;
    }
    match ethertype {
        0x0800 => Some((l2, false)),
        0x86dd => Some((l2, true)),
        _ => None,
    }
}

#[inline(never)]
fn to_backend_at<const L2: usize, const V6: bool>(ctx: &XdpContext, backend_id: u32) -> u32 {
    let Some(a) = read::<L2, V6>(ctx) else { return stat::PASS_ICMP };
    let (Some(b), Some(cfg)) = (BACKENDS.get(backend_id), CONFIG.get(0)) else { return stat::PASS_NOT_READY };
    if b.forward == FORWARD_FULLNAT {
        if !super::fullnat_icmp::to_backend(a, backend_id) {
            return stat::PASS_ICMP;
        }
    } else {
        a.dst = b.addr;
        a.inner_src = b.addr;
        if b.port != 0 {
            a.inner_sport = b.port;
        }
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    match rewrite::<L2, V6>(ctx, a, &b.mac, &cfg.iface_mac) {
        Ok(()) => {
            count(stat::ICMP_FORWARDED);
            count_forward(b.service_id, backend_id, bytes, false);
            SENT
        }
        Err(c) => c,
    }
}

#[inline(always)]
fn to_client_at<const L2: usize, const V6: bool>(ctx: &XdpContext) -> u32 {
    let Some(a) = read::<L2, V6>(ctx) else { return stat::PASS_NOT_VIP };
    // The embedded packet went client -> backend; its reply's key is the reverse.
    a.key = FlowKey {
        src: a.inner_dst,
        dst: a.inner_src,
        sport: a.inner_dport,
        dport: a.inner_sport,
        proto: a.proto,
        _pad: [0; 3],
    };
    let Some(cfg) = CONFIG.get(0) else { return stat::PASS_NOT_VIP };
    // SAFETY: live entries, read in place (the kernel frees them only after
    // this run).
    let r: &NatReverse = if let Some(r) = unsafe { NAT_REVERSE.get(&a.key) } {
        if a.src == a.inner_dst {
            a.src = r.vip;
        }
        a.inner_dst = r.vip;
        a.inner_dport = r.vport;
        r
    } else if let Some(r) = unsafe { FULLNAT_REVERSE.get(&a.key) } {
        super::fullnat_icmp::to_client(a, r);
        r
    } else {
        return stat::PASS_NOT_VIP;
    };
    match rewrite::<L2, V6>(ctx, a, &r.mac, &cfg.iface_mac) {
        Ok(()) => SENT_VIA | u32::from(r.egress),
        Err(c) => c,
    }
}

#[inline(always)]
fn word(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

/// One's-complement sum of a 16-bit word's replacement (RFC 1624, eqn. 3).
#[inline(always)]
fn acc(sum: u32, old: u16, new: u16) -> u32 {
    sum + u32::from(!old) + u32::from(new)
}

/// Reads an ICMP error (IPv4 3 or 11, ICMPv6 1, 2 or 3) embedding a TCP or UDP
/// packet (not a later fragment) with its ports into this CPU's `NAT_ICMP`
/// entry: the addresses and ports, and the IP packet's length.
#[inline(always)]
fn read<const L2: usize, const V6: bool>(ctx: &XdpContext) -> Option<&'static mut Addresses> {
    // SAFETY: this CPU's entry, used by this program run only.
    let a = unsafe { &mut *NAT_ICMP.get_ptr_mut(0)? };
    let ip_len;
    if V6 {
        // Outer header, ICMPv6 header, embedded header, 8 bytes of TCP/UDP.
        let h = bytes_mut::<{ 40 + 8 + 40 + 8 }>(ctx, L2)?;
        let inner_next = h[48 + 6];
        if h[0] >> 4 != 6 || h[6] != PROTO_ICMPV6 || !(1..=3).contains(&h[40]) || h[48] >> 4 != 6 {
            return None;
        }
        if inner_next != PROTO_TCP && inner_next != PROTO_UDP {
            return None;
        }
        ip_len = 40 + word(h, 4) as usize;
        a.src.copy_from_slice(&h[8..24]);
        a.dst.copy_from_slice(&h[24..40]);
        a.inner_src.copy_from_slice(&h[56..72]);
        a.inner_dst.copy_from_slice(&h[72..88]);
        a.inner_sport = word(h, 88);
        a.inner_dport = word(h, 90);
        a.proto = inner_next;
    } else {
        let h = bytes_mut::<{ 20 + 8 + 20 + 8 }>(ctx, L2)?;
        let outer_frag = word(h, 6) & 0x3fff;
        let inner_offset = word(h, 28 + 6) & 0x1fff;
        if h[0] != 0x45 || h[9] != PROTO_ICMP || outer_frag != 0 || (h[20] != 3 && h[20] != 11) || h[28] != 0x45 {
            return None;
        }
        if inner_offset != 0 || (h[28 + 9] != PROTO_TCP && h[28 + 9] != PROTO_UDP) {
            return None;
        }
        ip_len = word(h, 2) as usize;
        a.src = lb_common::v4_mapped([h[12], h[13], h[14], h[15]]);
        a.dst = lb_common::v4_mapped([h[16], h[17], h[18], h[19]]);
        a.inner_src = lb_common::v4_mapped([h[40], h[41], h[42], h[43]]);
        a.inner_dst = lb_common::v4_mapped([h[44], h[45], h[46], h[47]]);
        a.inner_sport = word(h, 48);
        a.inner_dport = word(h, 50);
        a.proto = h[28 + 9];
    }
    let hl = if V6 { 40 } else { 20 };
    if ip_len < 2 * hl + 8 + 8 {
        return None;
    }
    a.ip_len = ip_len as u32;
    Some(a)
}

/// An IPv4 address (v4-mapped `new`) written at `at` of `h`: the sum's change.
#[inline(always)]
fn addr4(sum: u32, h: &mut [u8], at: usize, new: &[u8; 16]) -> u32 {
    let sum = acc(acc(sum, word(h, at), word(new, 12)), word(h, at + 2), word(new, 14));
    h[at..at + 4].copy_from_slice(&new[12..16]);
    sum
}

/// An IPv6 address written at `at` of `h`: the sum's change.
#[inline(always)]
fn addr6(mut sum: u32, h: &mut [u8], at: usize, new: &[u8; 16]) -> u32 {
    // Word by word, the sum made at once: left to itself LLVM kept every old
    // and new byte for the sums at the end and spilled them (a 1 KiB frame).
    let mut i = 0;
    while i < 16 {
        let n = word(new, i);
        let mut s = u64::from(acc(sum, word(h, at + i), n));
        // SAFETY: a register moved to itself: the sum must exist here (an empty
        // `asm!` leaves two BTF line records on one instruction, which the kernel refuses).
        unsafe { core::arch::asm!("{0} = {0}", inout(reg) s, options(nomem, nostack, preserves_flags)) };
        sum = s as u32;
        h[at + i..at + i + 2].copy_from_slice(&n.to_be_bytes());
        i += 2;
    }
    sum
}

/// Writes `new`'s addresses and ports into the ICMP error `read` found (the
/// frame's own bytes are the old values), fixes the checksums, decrements the
/// TTL / hop limit and sets the MACs. `Err`: the counter of the drop.
#[inline(always)]
fn rewrite<const L2: usize, const V6: bool>(
    ctx: &XdpContext,
    new: &Addresses,
    to: &[u8; 6],
    from: &[u8; 6],
) -> Result<(), u32> {
    let short = stat::DROP_NAT_UNSUPPORTED;
    let hl = if V6 { 40 } else { 20 };
    let icmp = L2 + hl;
    let inner = icmp + 8;
    let l4 = inner + hl;
    // `d`: the ICMP checksum's change; `p`: the embedded TCP/UDP checksum's.
    let mut d = 0u32;
    if V6 {
        let h = bytes_mut::<40>(ctx, L2).ok_or(short)?;
        if h[7] <= 1 {
            return Err(stat::DROP_NAT_TTL);
        }
        h[7] -= 1;
        // The outer addresses are in ICMPv6's pseudo-header.
        d = addr6(d, h, 8, &new.src);
        d = addr6(d, h, 24, &new.dst);
    } else {
        let h = bytes_mut::<20>(ctx, L2).ok_or(short)?;
        if h[8] <= 1 {
            return Err(stat::DROP_NAT_TTL);
        }
        let old_ttl = word(h, 8);
        h[8] -= 1;
        let mut ip = acc(u32::from(!word(h, 10)), old_ttl, word(h, 8));
        ip = addr4(ip, h, 12, &new.src);
        ip = addr4(ip, h, 16, &new.dst);
        h[10..12].copy_from_slice(&fold(ip).to_be_bytes());
    }
    let mut p = 0u32;
    if V6 {
        let h = bytes_mut::<40>(ctx, inner).ok_or(short)?;
        p = addr6(p, h, 8, &new.inner_src);
        p = addr6(p, h, 24, &new.inner_dst);
        d += p;
    } else {
        let h = bytes_mut::<20>(ctx, inner).ok_or(short)?;
        p = addr4(p, h, 12, &new.inner_src);
        p = addr4(p, h, 16, &new.inner_dst);
        let old_sum = word(h, 10);
        let new_sum = fold(u32::from(!old_sum) + p);
        h[10..12].copy_from_slice(&new_sum.to_be_bytes());
        d = acc(d + p, old_sum, new_sum);
    }
    let h = bytes_mut::<8>(ctx, l4).ok_or(short)?;
    let ports = acc(acc(0, word(h, 0), new.inner_sport), word(h, 2), new.inner_dport);
    h[0..2].copy_from_slice(&new.inner_sport.to_be_bytes());
    h[2..4].copy_from_slice(&new.inner_dport.to_be_bytes());
    d += ports;
    p += ports;
    if new.proto == PROTO_UDP {
        let old_sum = word(h, 6);
        // IPv4 UDP 0: no checksum, kept.
        if V6 || old_sum != 0 {
            let mut new_sum = fold(u32::from(!old_sum) + p);
            if new_sum == 0 {
                new_sum = 0xffff;
            }
            h[6..8].copy_from_slice(&new_sum.to_be_bytes());
            d = acc(d, old_sum, new_sum);
        }
    } else if L2 + new.ip_len as usize >= l4 + 20 {
        // The whole TCP header is quoted: its checksum follows (Linux does the
        // same; a shorter quote has only the ports changed).
        let h = bytes_mut::<20>(ctx, l4).ok_or(short)?;
        let old_sum = word(h, 16);
        let new_sum = fold(u32::from(!old_sum) + p);
        h[16..18].copy_from_slice(&new_sum.to_be_bytes());
        d = acc(d, old_sum, new_sum);
    }
    let m = bytes_mut::<4>(ctx, icmp).ok_or(short)?;
    let old_sum = word(m, 2);
    m[2..4].copy_from_slice(&fold(u32::from(!old_sum) + d).to_be_bytes());
    let eth = bytes_mut::<12>(ctx, 0).ok_or(short)?;
    eth[0..6].copy_from_slice(to);
    eth[6..12].copy_from_slice(from);
    Ok(())
}
