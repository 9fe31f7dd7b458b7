//! Header parsing with an explicit bounds check before every read.
//!
//! Only what the balancer needs is parsed: Ethernet with at most one 802.1Q tag,
//! IPv4 (any IHL) or IPv6 (fixed header; an extension header counts as "not L4"),
//! then the TCP or UDP ports. The VIP Bloom filter runs as soon as the destination
//! address is known, so most traffic that is not ours costs one array read.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::{stat, v4_mapped, vip_filter_bit, PROTO_TCP, PROTO_UDP};

use crate::maps::VIP_FILTER;

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

/// What happens to a frame.
pub enum Outcome {
    /// XDP_PASS, counted under the given `stat` index.
    Pass(u32),
    /// XDP_DROP, counted under the given `stat` index.
    Drop(u32),
    /// Rewritten and sent back out (XDP_TX) to a backend: `forwarded`.
    Tx,
    /// Sent back out (XDP_TX) as something else (an ICMP error to the client),
    /// counted under the given `stat` index.
    TxAs(u32),
}

/// The parts of a frame to a VIP address that scheduling needs.
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
#[inline(always)]
fn vip_filter(dst: &[u8; 16]) -> Result<(), Outcome> {
    let bit = vip_filter_bit(dst);
    match VIP_FILTER.get(bit >> 6) {
        Some(word) if *word & (1u64 << (bit & 63)) != 0 => Ok(()),
        _ => Err(Outcome::Pass(stat::PASS_NOT_VIP)),
    }
}

/// Parses a frame. `Err` carries the outcome for frames that are not balanced.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Outcome> {
    let malformed_l2 = Outcome::Pass(stat::PASS_MALFORMED_L2);
    let mut l3 = ETH_HLEN;
    let mut ethertype = read_be16(ctx, 12).map_err(|_| malformed_l2)?;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype =
            read_be16(ctx, ETH_HLEN + 2).map_err(|_| Outcome::Pass(stat::PASS_MALFORMED_L2))?;
        l3 += VLAN_HLEN;
    }
    let (src, dst, proto, l4, ip_len, tos, df) = match ethertype {
        ETH_P_IP => parse_v4(ctx, l3)?,
        ETH_P_IPV6 => parse_v6(ctx, l3)?,
        _ => return Err(Outcome::Pass(stat::PASS_NOT_IP)),
    };
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
    Ok(Packet {
        src,
        dst,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        proto,
        syn: flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        fin: flags & (TCP_FIN | TCP_RST) != 0,
        l3,
        l4,
        v6: ethertype == ETH_P_IPV6,
        ip_len,
        tos,
        df,
    })
}

/// Source, destination, protocol, L4 offset, IP length, TOS, DF.
type L3 = ([u8; 16], [u8; 16], u8, usize, usize, u8, bool);

#[inline(always)]
fn parse_v4(ctx: &XdpContext, l3: usize) -> Result<L3, Outcome> {
    let hdr = ptr_at::<[u8; IPV4_HLEN]>(ctx, l3).map_err(|_| Outcome::Pass(stat::PASS_MALFORMED_L3))?;
    // SAFETY: bounds checked.
    let hdr = unsafe { &*hdr };
    let version = hdr[0] >> 4;
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    if version != 4 || ihl < IPV4_HLEN {
        return Err(Outcome::Pass(stat::PASS_MALFORMED_L3));
    }
    let dst = v4_mapped([hdr[16], hdr[17], hdr[18], hdr[19]]);
    vip_filter(&dst)?;
    let tot_len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    if tot_len < ihl || ctx.data() + l3 + tot_len > ctx.data_end() {
        return Err(Outcome::Pass(stat::PASS_MALFORMED_L3));
    }
    if u16::from_be_bytes([hdr[6], hdr[7]]) & IP_MF_OFFSET != 0 {
        return Err(Outcome::Pass(stat::PASS_FRAGMENT));
    }
    let src = v4_mapped([hdr[12], hdr[13], hdr[14], hdr[15]]);
    let df = hdr[6] & 0x40 != 0;
    Ok((src, dst, hdr[9], l3 + ihl, tot_len, hdr[1], df))
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, l3: usize) -> Result<L3, Outcome> {
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
    vip_filter(&dst)?;
    let payload_len = u16::from_be_bytes([hdr[4], hdr[5]]) as usize;
    if ctx.data() + l3 + IPV6_HLEN + payload_len > ctx.data_end() {
        return Err(Outcome::Pass(stat::PASS_MALFORMED_L3));
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&hdr[8..24]);
    let tclass = (hdr[0] << 4) | (hdr[1] >> 4);
    Ok((src, dst, hdr[6], l3 + IPV6_HLEN, IPV6_HLEN + payload_len, tclass, true))
}
