//! Tunnelled frames as the balancer sends them to real servers: IPIP / IP6IP6 (and
//! the cross forms) and GUE variant 1 (outer IP, UDP to the GUE port, inner IP).

use std::net::IpAddr;

use crate::frames::{ethernet, ipv4, ipv6, Vlan, ETH_P_IP, ETH_P_IPV6, UDP_HLEN};

pub const PROTO_IPIP: u8 = 4;
pub const PROTO_IPV6: u8 = 41;
pub const PROTO_UDP: u8 = 17;

/// Outer IP header from `src` to `dst` (same family) around `payload` with
/// protocol / next header `proto`, in an Ethernet frame.
pub fn outer(vlan: Option<Vlan>, src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ethernet(vlan, ETH_P_IP, &ipv4(s, d, proto, payload)),
        (IpAddr::V6(s), IpAddr::V6(d)) => ethernet(vlan, ETH_P_IPV6, &ipv6(s, d, proto, payload)),
        _ => panic!("outer: mixed address families {src} -> {dst}"),
    }
}

/// The protocol an outer header carries an inner IP packet with (4 or 41).
pub fn ip_proto_of(inner: &[u8]) -> u8 {
    match inner[0] >> 4 {
        4 => PROTO_IPIP,
        6 => PROTO_IPV6,
        v => panic!("inner packet of IP version {v}"),
    }
}

/// IPIP / IP6IP6 / cross forms: `inner` (an IP packet) in an outer header.
pub fn ipip(vlan: Option<Vlan>, src: IpAddr, dst: IpAddr, inner: &[u8]) -> Vec<u8> {
    outer(vlan, src, dst, ip_proto_of(inner), inner)
}

/// GUE variant 1: `inner` after a UDP header (checksum zero) to `port`.
pub fn gue(vlan: Option<Vlan>, src: IpAddr, dst: IpAddr, sport: u16, port: u16, inner: &[u8]) -> Vec<u8> {
    let len = u16::try_from(UDP_HLEN + inner.len()).expect("GUE datagram too long");
    let mut udp = Vec::with_capacity(UDP_HLEN + inner.len());
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(inner);
    outer(vlan, src, dst, PROTO_UDP, &udp)
}

/// What the decapsulated frame must be: the L2 header of `vlan` with the inner
/// family's ethertype, then `inner`.
pub fn decapsulated(vlan: Option<Vlan>, inner: &[u8]) -> Vec<u8> {
    let ethertype = if inner[0] >> 4 == 6 { ETH_P_IPV6 } else { ETH_P_IP };
    ethernet(vlan, ethertype, inner)
}

/// Internet checksum of a UDP datagram over IPv4 or IPv6 (pseudo-header included);
/// `udp` must have its checksum field zero.
pub fn udp_checksum(src: IpAddr, dst: IpAddr, udp: &[u8]) -> u16 {
    let mut data = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            data.extend_from_slice(&s.octets());
            data.extend_from_slice(&d.octets());
            data.extend_from_slice(&[0, PROTO_UDP]);
            data.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            data.extend_from_slice(&s.octets());
            data.extend_from_slice(&d.octets());
            data.extend_from_slice(&(udp.len() as u32).to_be_bytes());
            data.extend_from_slice(&[0, 0, 0, PROTO_UDP]);
        }
        _ => panic!("udp_checksum: mixed families"),
    }
    data.extend_from_slice(udp);
    let c = crate::frames::ipv4_checksum(&data);
    if c == 0 { 0xffff } else { c }
}

/// A complete inner IP packet carrying a UDP datagram with a valid checksum.
pub fn inner_udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut udp = crate::frames::udp(sport, dport, payload);
    let c = udp_checksum(src, dst, &udp);
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s, d, PROTO_UDP, &udp),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, PROTO_UDP, &udp),
        _ => panic!("inner_udp: mixed families"),
    }
}
