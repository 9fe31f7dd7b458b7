//! Header parsing with an explicit bounds check before every read.
//!
//! Only what the balancer needs is parsed: Ethernet with at most one 802.1Q tag,
//! IPv4 (any IHL) or IPv6 (fixed header, optionally followed directly by a
//! Fragment header; any other extension header counts as "not L4"), then the TCP
//! or UDP ports. ICMP and ICMPv6 go to `icmp.rs`, which reads the packet an error
//! embeds (or answers an echo request). A fragment's ports are read when it is the
//! first one (offset 0); later fragments carry none (`frag.rs` follows the first). The VIP Bloom filter runs as soon as the destination
//! address is known, so most traffic that is not ours costs one array read.

use core::mem::{size_of, MaybeUninit};

use aya_ebpf::programs::XdpContext;
use lb_common::{stat, v4_mapped, vip_filter_bit, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

use crate::{icmp, maps::VIP_FILTER};

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
/// IPv4 flags/fragment offset: More Fragments bit and the offset field.
const IP_MF_OFFSET: u16 = 0x3fff;
const IP_OFFSET: u16 = 0x1fff;
/// IPv6 Fragment extension header: next header 44, 8 bytes.
const IPV6_FRAG: u8 = 44;
const IPV6_FRAG_HLEN: usize = 8;

/// The `no-rare` feature (benchmarks only): the parser as before the ICMP and
/// fragment path, fragments to a VIP passed (`PASS_FRAGMENT`), ICMP too
/// (`PASS_NOT_L4`), never `Outcome::Rare`.
pub const NO_RARE: bool = cfg!(feature = "no-rare");

/// `Packet::kind`: an ordinary TCP/UDP packet (or an unfragmented "atomic" one).
pub const KIND_L4: u8 = 0;
/// An ICMP error about a VIP flow's reply: `src`..`proto` are that flow's, in the
/// client-to-VIP direction (read from the embedded packet, swapped).
pub const KIND_ICMP_ERROR: u8 = 1;
/// The first fragment of a datagram (offset 0, more to come): has the ports.
pub const KIND_FRAG_FIRST: u8 = 2;
/// A later fragment: no ports (0 in the flow).
pub const KIND_FRAG_LATER: u8 = 3;

/// What happens to a frame.
pub enum Outcome {
    /// XDP_PASS, counted under the given `stat` index.
    Pass(u32),
    /// XDP_DROP, counted under the given `stat` index.
    Drop(u32),
    /// Rewritten for a backend and sent out by its `Backend::egress`: XDP_TX for
    /// `EGRESS_SAME`, else XDP_REDIRECT through `EGRESS` (`forward/egress.rs`):
    /// `forwarded`.
    Out(u32),
    /// Sent back out (XDP_TX) as something else (an ICMP error to the client),
    /// counted under the given `stat` index.
    TxAs(u32),
    /// ICMP or a fragment to a VIP address: for the rare path (`main.rs`).
    Rare,
    /// To no exact VIP while prefix services exist: for `lb_prefix` (`main.rs`).
    Prefix,
    /// A `nat` service's packet, scheduled: for `lb_nat` (`forward/nat.rs`); the
    /// backend id and whether the flow is new (`nat::hand_over`), and the flow's
    /// `FlowVal::snat` as a word (24 bits).
    Nat(u32, u32),
}

/// The outcome of a frame to no exact VIP: `Prefix` while prefix services
/// exist (`CONFIG_PREFIX`), else passed. Decided where the miss is found, so
/// the balancer's many exits carry no extra test.
#[inline(always)]
pub fn not_vip() -> Outcome {
    match crate::maps::CONFIG.get(0) {
        Some(c) if c.flags & lb_common::CONFIG_PREFIX != 0 => Outcome::Prefix,
        _ => Outcome::Pass(stat::PASS_NOT_VIP),
    }
}

/// The parts of a frame to a VIP address that scheduling needs.
#[repr(C)]
pub struct Packet {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host byte order.
    pub sport: u16,
    /// Host byte order.
    pub dport: u16,
    pub proto: u8,
    /// A TCP SYN without ACK: the first packet of a new connection.
    pub syn: bool,
    /// A TCP FIN or RST: the client is closing the connection.
    pub fin: bool,
    /// Offset of the IP header (after Ethernet and any tag).
    pub l3: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    pub v6: bool,
    /// The IP packet's length (IPv4 total length, IPv6 40 + payload length).
    pub ip_len: usize,
    /// DSCP/ECN (IPv4 TOS, IPv6 traffic class).
    pub tos: u8,
    /// IPv4 "don't fragment" (always true for IPv6: routers never fragment it).
    pub df: bool,
    /// `KIND_*`.
    pub kind: u8,
    /// Fragment identification (host order), for `KIND_FRAG_*`.
    pub frag_id: u32,
}

#[inline(always)]
pub(crate) fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *const T)
}

#[inline(always)]
pub(crate) fn read_be16(ctx: &XdpContext, offset: usize) -> Result<u16, ()> {
    let p = ptr_at::<[u8; 2]>(ctx, offset)?;
    // SAFETY: bounds checked by ptr_at.
    Ok(u16::from_be_bytes(unsafe { *p }))
}

/// The VIP_FILTER test: a clear bit means the destination is no VIP (the exact
/// `VIP_ADDRS` lookup runs later, only for frames that miss the connection table).
/// `PREFIX` (`lb_prefix`): no filter; the prefix services are looked up instead.
#[inline(always)]
fn vip_filter<const PREFIX: bool>(dst: &[u8; 16]) -> Result<(), Outcome> {
    if PREFIX {
        return Ok(());
    }
    let bit = vip_filter_bit(dst);
    match VIP_FILTER.get(bit >> 6) {
        Some(word) if *word & (1u64 << (bit & 63)) != 0 => Ok(()),
        _ => Err(not_vip()),
    }
}

/// Parses a frame into `pkt`. `Err` carries the outcome for frames that are not
/// balanced. Without `FULL` (the balancer's fast path), ICMP and fragments to a
/// VIP end in `Outcome::Rare`: the caller runs the full parse (`FULL`) in a call
/// of its own, so that their handling costs the fast path no stack.
#[inline(always)]
pub fn parse<const FULL: bool, const PREFIX: bool>(ctx: &XdpContext, out: &mut MaybeUninit<Packet>) -> Result<(), Outcome> {
    let malformed_l2 = Outcome::Pass(stat::PASS_MALFORMED_L2);
    let mut l3 = ETH_HLEN;
    let mut ethertype = read_be16(ctx, 12).map_err(|_| malformed_l2)?;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype =
            read_be16(ctx, ETH_HLEN + 2).map_err(|_| Outcome::Pass(stat::PASS_MALFORMED_L2))?;
        l3 += VLAN_HLEN;
    }
    let (src, dst, proto, l4, ip_len, tos, df, kind, frag_id) = match ethertype {
        ETH_P_IP => parse_v4::<PREFIX>(ctx, l3)?,
        ETH_P_IPV6 => parse_v6::<PREFIX>(ctx, l3)?,
        _ => return Err(Outcome::Pass(stat::PASS_NOT_IP)),
    };
    let v6 = ethertype == ETH_P_IPV6;
    // Written whole once the headers are known: no zeroing beforehand (a 40-byte
    // memset is a byte loop in BPF, paid by every frame).
    let pkt = out.write(Packet {
        src,
        dst,
        sport: 0,
        dport: 0,
        proto,
        syn: false,
        fin: false,
        l3,
        l4,
        v6,
        ip_len,
        tos,
        df,
        kind,
        frag_id,
    });
    let icmp = if v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
    // `no-rare` (a benchmark's "before"): ICMP ends in `PASS_NOT_L4` below.
    if !FULL && !NO_RARE && (proto == icmp || kind != KIND_L4) {
        return Err(Outcome::Rare);
    }
    if !NO_RARE && proto == icmp {
        if kind != KIND_L4 {
            // A fragmented ICMP message (a large echo request): not ours to follow.
            return Err(Outcome::Pass(stat::PASS_FRAGMENT));
        }
        return icmp::inspect(ctx, pkt);
    }
    if kind == KIND_FRAG_LATER {
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return Err(Outcome::Pass(stat::PASS_FRAGMENT));
        }
        return Ok(());
    }
    let malformed_l4 = Outcome::Pass(stat::PASS_MALFORMED_L4);
    let ports_ptr = match proto {
        PROTO_TCP => ptr_at::<[u8; TCP_HLEN]>(ctx, l4).map(|p| p as *const [u8; 4]),
        PROTO_UDP => ptr_at::<[u8; UDP_HLEN]>(ctx, l4).map(|p| p as *const [u8; 4]),
        _ => return Err(Outcome::Pass(stat::PASS_NOT_L4)),
    }
    .map_err(|_| malformed_l4)?;
    // SAFETY: at least the full L4 header is within bounds (20 bytes for TCP).
    let ports = unsafe { *ports_ptr };
    let flags = if proto == PROTO_TCP {
        // SAFETY: the TCP header (20 bytes) was bounds-checked above; flags are byte 13.
        unsafe { *((ports_ptr as *const u8).add(13)) }
    } else {
        0
    };
    pkt.sport = u16::from_be_bytes([ports[0], ports[1]]);
    pkt.dport = u16::from_be_bytes([ports[2], ports[3]]);
    pkt.syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    pkt.fin = flags & (TCP_FIN | TCP_RST) != 0;
    Ok(())
}

/// Source, destination, protocol, L4 offset, IP length, TOS, DF, kind, fragment id.
type L3 = ([u8; 16], [u8; 16], u8, usize, usize, u8, bool, u8, u32);

#[inline(always)]
fn parse_v4<const PREFIX: bool>(ctx: &XdpContext, l3: usize) -> Result<L3, Outcome> {
    let hdr = ptr_at::<[u8; IPV4_HLEN]>(ctx, l3).map_err(|_| Outcome::Pass(stat::PASS_MALFORMED_L3))?;
    // SAFETY: bounds checked.
    let hdr = unsafe { &*hdr };
    let version = hdr[0] >> 4;
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    if version != 4 || ihl < IPV4_HLEN {
        return Err(Outcome::Pass(stat::PASS_MALFORMED_L3));
    }
    let dst = v4_mapped([hdr[16], hdr[17], hdr[18], hdr[19]]);
    vip_filter::<PREFIX>(&dst)?;
    let tot_len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    if tot_len < ihl || ctx.data() + l3 + tot_len > ctx.data_end() {
        return Err(Outcome::Pass(stat::PASS_MALFORMED_L3));
    }
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    if NO_RARE && frag & IP_MF_OFFSET != 0 {
        return Err(Outcome::Pass(stat::PASS_FRAGMENT));
    }
    let kind = if NO_RARE {
        KIND_L4
    } else if frag & IP_OFFSET != 0 {
        KIND_FRAG_LATER
    } else if frag & IP_MF_OFFSET != 0 {
        KIND_FRAG_FIRST
    } else {
        KIND_L4
    };
    let id = u32::from(u16::from_be_bytes([hdr[4], hdr[5]]));
    let src = v4_mapped([hdr[12], hdr[13], hdr[14], hdr[15]]);
    let df = hdr[6] & 0x40 != 0;
    Ok((src, dst, hdr[9], l3 + ihl, tot_len, hdr[1], df, kind, id))
}

#[inline(always)]
fn parse_v6<const PREFIX: bool>(ctx: &XdpContext, l3: usize) -> Result<L3, Outcome> {
    let hdr = ptr_at::<[u8; IPV6_HLEN]>(ctx, l3).map_err(|_| Outcome::Pass(stat::PASS_MALFORMED_L3))?;
    // SAFETY: bounds checked.
    let hdr = unsafe { &*hdr };
    if hdr[0] >> 4 != 6 {
        return Err(Outcome::Pass(stat::PASS_MALFORMED_L3));
    }
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&hdr[24..40]);
    // IPv4-mapped destinations never appear on the wire; in our keys they mean an
    // IPv4 VIP, so they must not match one.
    if dst[..12] == V4_MAPPED_PREFIX {
        return Err(Outcome::Pass(stat::PASS_NOT_VIP));
    }
    vip_filter::<PREFIX>(&dst)?;
    let payload_len = u16::from_be_bytes([hdr[4], hdr[5]]) as usize;
    if ctx.data() + l3 + IPV6_HLEN + payload_len > ctx.data_end() {
        return Err(Outcome::Pass(stat::PASS_MALFORMED_L3));
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&hdr[8..24]);
    let tclass = (hdr[0] << 4) | (hdr[1] >> 4);
    if NO_RARE || hdr[6] != IPV6_FRAG {
        return Ok((src, dst, hdr[6], l3 + IPV6_HLEN, IPV6_HLEN + payload_len, tclass, true, KIND_L4, 0));
    }
    // A Fragment header directly after the fixed header (the only place it is
    // looked for): next header, reserved, offset (13 bits) and M, identification.
    let fh = ptr_at::<[u8; IPV6_FRAG_HLEN]>(ctx, l3 + IPV6_HLEN).map_err(|_| Outcome::Pass(stat::PASS_MALFORMED_L3))?;
    // SAFETY: bounds checked.
    let fh = unsafe { &*fh };
    let off_m = u16::from_be_bytes([fh[2], fh[3]]);
    let kind = if off_m & 0xfff8 != 0 {
        KIND_FRAG_LATER
    } else if off_m & 1 != 0 {
        KIND_FRAG_FIRST
    } else {
        // An atomic fragment (RFC 6946): a whole datagram.
        KIND_L4
    };
    let id = u32::from_be_bytes([fh[4], fh[5], fh[6], fh[7]]);
    let l4 = l3 + IPV6_HLEN + IPV6_FRAG_HLEN;
    Ok((src, dst, fh[0], l4, IPV6_HLEN + payload_len, tclass, true, kind, id))
}
