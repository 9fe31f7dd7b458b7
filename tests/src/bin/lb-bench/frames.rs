//! Frames and configurations the benchmarks feed the program.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use lb_agent::{config::Config, neigh::Mac, plan::Plan};

pub const IFACE_MAC: Mac = [0x02, 0x1b, 0, 0, 0, 1];
const CLIENT_MAC: Mac = [0x02, 0xc1, 0, 0, 0, 1];

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&IFACE_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// TCP flags: SYN (a new flow: the program always schedules it again) and ACK
/// (an established flow: looked up in the connection table).
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

fn l4(tcp: bool, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    if tcp {
        p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]); // seq, ack
        p.extend_from_slice(&[5 << 4, flags]); // data offset 5, flags
        p.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, checksum, urgent
    } else {
        p.extend_from_slice(&8u16.to_be_bytes());
        p.extend_from_slice(&[0, 0]);
    }
    p
}

/// An IPv4 TCP (ACK, an established flow) or UDP frame.
pub fn ipv4_frame(src: Ipv4Addr, dst: Ipv4Addr, tcp: bool, sport: u16, dport: u16) -> Vec<u8> {
    ipv4_flags(src, dst, tcp, sport, dport, ACK)
}

/// An IPv4 TCP SYN: a new flow every time the program sees it.
pub fn ipv4_syn(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    ipv4_flags(src, dst, true, sport, dport, SYN)
}

fn ipv4_flags(src: Ipv4Addr, dst: Ipv4Addr, tcp: bool, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let seg = l4(tcp, sport, dport, flags);
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((20 + seg.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 1, 0x40, 0, 64, if tcp { 6 } else { 17 }, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let sum = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(&seg);
    ethernet(0x0800, &h)
}

/// An IPv6 TCP ACK (an established flow).
pub fn ipv6_frame(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
    let seg = l4(true, sport, dport, ACK);
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    h.extend_from_slice(&[6, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&seg);
    ethernet(0x86dd, &h)
}

// ---- configurations -------------------------------------------------------

/// `services` services with `backends` backends each. With `mixed`, the last two
/// services are a UDP one (on the first IPv4 VIP, port 53) and an IPv6 TCP one.
pub fn config_yaml(
    services: u32,
    backends: u32,
    table_size: u32,
    conntrack: u32,
    mixed: bool,
) -> String {
    let mut y = format!("conntrack_size: {conntrack}\nservices:\n");
    for s in 0..services {
        let (vip, port, proto, v6) = if mixed && s == services - 2 {
            ("198.18.0.1".to_string(), 53, "udp", false)
        } else if mixed && s == services - 1 {
            ("2001:db8:1::1".to_string(), 80, "tcp", true)
        } else {
            (
                format!("198.18.{}.{}", s / 250, s % 250 + 1),
                80,
                "tcp",
                false,
            )
        };
        let _ = writeln!(
            y,
            "  - name: svc{s}\n    vip: {vip}\n    port: {port}\n    protocol: {proto}\n    table_size: {table_size}\n    backends:"
        );
        for b in 0..backends {
            let addr = if v6 {
                format!("2001:db8:{s:x}::{:x}", b + 1)
            } else {
                format!("10.{}.{}.{}", s / 250, s % 250, b + 1)
            };
            let _ = writeln!(y, "      - address: \"{addr}\"");
        }
    }
    y
}

/// A made-up MAC for every backend, derived from its address alone (so a second
/// configuration that adds backends keeps every other backend's MAC).
pub fn fake_macs(cfg: &Config) -> BTreeMap<IpAddr, Mac> {
    Plan::backend_addresses(cfg)
        .into_iter()
        .map(|a| (a, fake_mac(a)))
        .collect()
}

pub fn fake_mac(a: IpAddr) -> Mac {
    let (tag, b) = match a {
        IpAddr::V4(v) => (0xbe, v.octets()),
        IpAddr::V6(v) => {
            let o = v.octets();
            // The benchmark's IPv6 backends differ in bytes 4..6 (service) and the last two.
            (0xbf, [o[4], o[5], o[14], o[15]])
        }
    };
    [0x02, tag, b[0], b[1], b[2], b[3]]
}
