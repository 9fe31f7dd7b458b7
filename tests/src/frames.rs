//! Hand-built Ethernet frames for the packet tests: Ethernet (optionally with one
//! 802.1Q / 802.1ad tag), IPv4 (any IHL), IPv6, TCP, UDP, ICMP and ARP.
//!
//! Builders nest: `ethernet(.., &ipv4(.., &tcp(..)))`, or `Flow::frame` for the
//! usual TCP/UDP case. The IPv4 header checksum is filled in (the XDP program
//! ignores it); L4 checksums are left at zero.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{FlowKey, PROTO_TCP, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_HOPOPT: u8 = 0;
pub const PROTO_IPV6_FRAG: u8 = 44;

/// Source MAC of every test frame (the client's router).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0x00, 0x00, 0x00, 0x01];
/// Destination MAC of every test frame (the balancer's interface).
pub const LB_MAC: [u8; 6] = [0x02, 0x1b, 0x00, 0x00, 0x00, 0x01];

/// An 802.1Q (or 802.1ad) tag: TPID and TCI.
#[derive(Clone, Copy, Debug)]
pub struct Vlan {
    pub tpid: u16,
    pub tci: u16,
}

pub const Q_TAG: Vlan = Vlan {
    tpid: ETH_P_8021Q,
    tci: 100,
};
pub const AD_TAG: Vlan = Vlan {
    tpid: ETH_P_8021AD,
    tci: 200,
};

/// Ethernet header (plus an optional tag) followed by `payload`.
pub fn ethernet(vlan: Option<Vlan>, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + VLAN_HLEN + payload.len());
    f.extend_from_slice(&LB_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    if let Some(v) = vlan {
        f.extend_from_slice(&v.tpid.to_be_bytes());
        f.extend_from_slice(&v.tci.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// RFC 1071 checksum of an IPv4 header (its checksum field must be zero).
pub fn ipv4_checksum(hdr: &[u8]) -> u16 {
    let mut sum: u32 = hdr
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// IPv4 header with `options` (a multiple of 4 bytes, at most 40) and the payload.
/// DF is set, as on most real traffic.
pub fn ipv4_opts(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, opts: &[u8], payload: &[u8]) -> Vec<u8> {
    assert!(
        opts.len().is_multiple_of(4) && opts.len() <= 40,
        "bad IPv4 options length"
    );
    let hlen = IPV4_HLEN + opts.len();
    let tot_len = u16::try_from(hlen + payload.len()).expect("IPv4 packet too long");
    let mut p = Vec::with_capacity(hlen + payload.len());
    p.push(0x40 | (hlen / 4) as u8);
    p.push(0); // DSCP/ECN
    p.extend_from_slice(&tot_len.to_be_bytes());
    p.extend_from_slice(&0x1234u16.to_be_bytes()); // identification
    p.extend_from_slice(&0x4000u16.to_be_bytes()); // DF, offset 0
    p.push(64); // TTL
    p.push(proto);
    p.extend_from_slice(&[0, 0]); // checksum, below
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(opts);
    let csum = ipv4_checksum(&p[..hlen]);
    p[10..12].copy_from_slice(&csum.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    ipv4_opts(src, dst, proto, &[], payload)
}

/// Recomputes the checksum of the IPv4 header at `l3` in `frame` after a test
/// edited it (over the IHL in the frame, clamped to 20..what is there).
pub fn fix_ipv4_checksum(frame: &mut [u8], l3: usize) {
    let ihl = (usize::from(frame[l3] & 0x0f) * 4).clamp(IPV4_HLEN, frame.len() - l3);
    frame[l3 + 10..l3 + 12].fill(0);
    let csum = ipv4_checksum(&frame[l3..l3 + ihl]);
    frame[l3 + 10..l3 + 12].copy_from_slice(&csum.to_be_bytes());
}

/// Fixed IPv6 header and the payload; `next` is the Next Header field.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let plen = u16::try_from(payload.len()).expect("IPv6 payload too long");
    let mut p = Vec::with_capacity(IPV6_HLEN + payload.len());
    p.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, traffic class 0, flow label 0
    p.extend_from_slice(&plen.to_be_bytes());
    p.push(next);
    p.push(64); // hop limit
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// Ethernet + IPv4 or IPv6 (by the addresses' family) carrying `l4` as `proto`.
pub fn ip_frame(vlan: Option<Vlan>, src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ethernet(vlan, ETH_P_IP, &ipv4(s, d, proto, l4)),
        (IpAddr::V6(s), IpAddr::V6(d)) => ethernet(vlan, ETH_P_IPV6, &ipv6(s, d, proto, l4)),
        _ => panic!("ip_frame: mixed address families {src} -> {dst}"),
    }
}

/// A 20-byte TCP header (a plain ACK, no options) and the payload.
pub fn tcp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(TCP_HLEN + payload.len());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&1u32.to_be_bytes()); // seq
    p.extend_from_slice(&1u32.to_be_bytes()); // ack
    p.push(5 << 4); // data offset 5 words
    p.push(0x10); // ACK
    p.extend_from_slice(&65535u16.to_be_bytes()); // window
    p.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    p.extend_from_slice(payload);
    p
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(UDP_HLEN + payload.len()).expect("UDP datagram too long");
    let mut p = Vec::with_capacity(UDP_HLEN + payload.len());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[0, 0]); // checksum
    p.extend_from_slice(payload);
    p
}

/// A complete ICMP (or ICMPv6, by family) echo request frame.
pub fn icmp_echo(src: IpAddr, dst: IpAddr) -> Vec<u8> {
    let (proto, kind) = if dst.is_ipv4() {
        (PROTO_ICMP, 8)
    } else {
        (PROTO_ICMPV6, 128)
    };
    let msg = [kind, 0, 0, 0, 0, 1, 0, 1, b'p', b'i', b'n', b'g'];
    ip_frame(None, src, dst, proto, &msg)
}

/// A complete broadcast ARP request frame: "who has `target`? tell `sender`".
pub fn arp_request(vlan: Option<Vlan>, sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut p = Vec::with_capacity(28);
    p.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]); // Ethernet/IPv4, request
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&sender.octets());
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&target.octets());
    let mut f = ethernet(vlan, ETH_P_ARP, &p);
    f[0..6].fill(0xff);
    f
}

/// The 16-byte form the maps use (IPv4 as `::ffff:a.b.c.d`).
pub fn addr16(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => lb_common::v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

/// A TCP or UDP 5-tuple, as frames carry it and as the program keys it.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl Flow {
    pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Flow {
        let proto = PROTO_TCP;
        Flow {
            src,
            dst,
            sport,
            dport,
            proto,
        }
    }

    pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Flow {
        let proto = PROTO_UDP;
        Flow {
            src,
            dst,
            sport,
            dport,
            proto,
        }
    }

    /// The same flow from another source port.
    pub fn sport(self, sport: u16) -> Flow {
        Flow { sport, ..self }
    }

    /// The connection-table key / flow-hash input the program builds for this flow.
    pub fn key(&self) -> FlowKey {
        FlowKey {
            src: addr16(self.src),
            dst: addr16(self.dst),
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    /// The L4 segment (TCP or UDP header) carrying `payload`.
    pub fn l4(&self, payload: &[u8]) -> Vec<u8> {
        match self.proto {
            PROTO_TCP => tcp(self.sport, self.dport, payload),
            PROTO_UDP => udp(self.sport, self.dport, payload),
            p => panic!("Flow::l4: protocol {p} is neither TCP nor UDP"),
        }
    }

    /// A complete frame of this flow with `payload_len` bytes of payload.
    pub fn frame(&self, vlan: Option<Vlan>, payload_len: usize) -> Vec<u8> {
        let payload: Vec<u8> = (0..payload_len).map(|i| i as u8).collect();
        ip_frame(vlan, self.src, self.dst, self.proto, &self.l4(&payload))
    }
}
