//! The probe's segments on the wire: the SYN it sends, the answer it reads, and
//! the socket filter that lets only answers through.

use std::net::{IpAddr, Ipv4Addr};

use socket2::SockFilter;

use super::{Answer, Key};

/// What a segment answers: from `from`, to one of `ports`, a SYN-ACK or an RST
/// acknowledging a SYN; its 4-tuple and the sequence number of the SYN it
/// acknowledges. IPv4 segments come with their IP header, IPv6 ones without.
pub(super) fn parse(data: &[u8], v6: bool, from: IpAddr, ports: &[u16]) -> Option<(Key, u32, Answer)> {
    let tcp = if v6 {
        data
    } else {
        let ihl = usize::from(*data.first()? & 0x0f) * 4;
        data.get(ihl..)?
    };
    let tcp = tcp.get(..14)?;
    let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let flags = tcp[13];
    if !ports.contains(&dport) || flags & ACK == 0 {
        return None;
    }
    let answer = if flags & RST != 0 {
        Answer::Reset
    } else if flags & SYN != 0 {
        Answer::SynAck
    } else {
        return None;
    };
    Some(((from, sport, dport), ack.wrapping_sub(1), answer))
}

pub(super) const SYN: u8 = 0x02;
pub(super) const RST: u8 = 0x04;
pub(super) const ACK: u8 = 0x10;
/// TCP header with one option, the MSS.
pub(super) const TCP_LEN: usize = 24;

/// A SYN's TCP header; with `pseudo` (the IPv4 pseudo-header's sum), its checksum.
pub(super) fn tcp_syn(sport: u16, dport: u16, isn: u32, pseudo: Option<u32>) -> Vec<u8> {
    let mut h = vec![0u8; TCP_LEN];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..8].copy_from_slice(&isn.to_be_bytes());
    h[12] = ((TCP_LEN / 4) as u8) << 4;
    h[13] = SYN;
    h[14..16].copy_from_slice(&64240u16.to_be_bytes());
    // MSS 1460 (the backend's answer is never used for data).
    h[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]);
    if let Some(pseudo) = pseudo {
        let sum = checksum(&h, pseudo);
        h[16..18].copy_from_slice(&sum.to_be_bytes());
    }
    h
}

/// An IPv4 packet carrying a SYN (for `IP_HDRINCL`: the kernel fills in the total
/// length, the identification and the header checksum).
pub(super) fn syn_v4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, isn: u32) -> Vec<u8> {
    let mut pseudo = 0u32;
    for a in [src.octets(), dst.octets()] {
        pseudo += u32::from(u16::from_be_bytes([a[0], a[1]]))
            + u32::from(u16::from_be_bytes([a[2], a[3]]));
    }
    pseudo += 6 + TCP_LEN as u32;
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + TCP_LEN) as u16).to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64; // TTL
    p[9] = 6; // TCP
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p.extend_from_slice(&tcp_syn(sport, dport, isn, Some(pseudo)));
    p
}

/// The Internet checksum of `data`, starting from the partial sum `initial`.
pub(super) fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([
            pair[0],
            pair.get(1).copied().unwrap_or(0),
        ]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A classic BPF program passing TCP segments whose destination port is one of
/// `ports`. IPv4 raw sockets see the IP header (of variable length), IPv6 ones do not.
pub(super) fn filter(v6: bool, ports: &[u16]) -> Vec<SockFilter> {
    const LDX_B_MSH: u16 = 0xb1; // X = 4 * (packet[k] & 0xf)
    const LD_H_IND: u16 = 0x48; // A = u16 at X + k
    const LD_H_ABS: u16 = 0x28; // A = u16 at k
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let mut prog = if v6 {
        vec![SockFilter::new(LD_H_ABS, 0, 0, 2)]
    } else {
        vec![
            SockFilter::new(LDX_B_MSH, 0, 0, 0),
            SockFilter::new(LD_H_IND, 0, 0, 2),
        ]
    };
    let n = ports.len();
    for (i, &port) in ports.iter().enumerate() {
        // On a match jump over the remaining tests and the drop to the accept.
        prog.push(SockFilter::new(JEQ_K, (n - i) as u8, 0, u32::from(port)));
    }
    prog.push(SockFilter::new(RET_K, 0, 0, 0));
    prog.push(SockFilter::new(RET_K, 0, 0, 0xffff));
    prog
}
