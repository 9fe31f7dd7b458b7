//! Shared by the packet tests of `nat` and `fullnat` ICMP errors
//! (tests/tests/packet_nat_icmp.rs, packet_fullnat_icmp.rs): the data plane under
//! `BPF_PROG_TEST_RUN`, packets with correct checksums, ICMP errors quoting them,
//! and `check`, which recomputes every checksum of a translated error from
//! scratch and compares every byte not meant to change.

use std::{
    collections::BTreeMap,
    net::IpAddr,
};

use aya::programs::{TestRun, TestRunOptions};
use lb_agent::{config, dataplane::Dataplane, plan::Plan};
use lb_common::stat;

use crate::frames::{addr16, ethernet, ipv4, ipv4_checksum, ipv6, tcp, udp, ETH_P_IP, ETH_P_IPV6, CLIENT_MAC, LB_MAC};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// The MAC the tests give a backend's (or next hop's) address.
pub fn mac_of(a: IpAddr) -> [u8; 6] {
    let o = addr16(a);
    [0x02, 0xbe, o[12], o[13], o[14], o[15]]
}

/// The data plane loaded with a configuration (`BPF_PROG_TEST_RUN` through
/// `lb_xdp`).
pub struct Lab {
    pub dp: Dataplane,
}

impl Lab {
    /// Loads the object and fills its maps from `yaml` (`file`: the name errors
    /// give).
    pub fn with(yaml: &str, file: &str) -> Lab {
        // SAFETY: geteuid has no preconditions.
        assert!(unsafe { libc::geteuid() } == 0, "the packet tests load XDP programs and need root");
        let cfg = config::parse(yaml, file).expect("test config");
        let macs: BTreeMap<IpAddr, [u8; 6]> = Plan::backend_addresses(&cfg).into_iter().map(|a| (a, mac_of(a))).collect();
        let plan = Plan::build(&cfg, &macs);
        let mut dp = Dataplane::load(&plan).expect("load the XDP object");
        dp.write(&plan, LB_MAC).expect("fill the maps");
        Lab { dp }
    }

    pub fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 128];
        let prog = self.dp.balancer().expect("balancer");
        let r = prog
            .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    pub fn counters(&mut self) -> Vec<u64> {
        self.dp.stats().expect("counters").global
    }

    /// Runs `f` and checks the counters moved are exactly `want` (in index order).
    pub fn run_counted(&mut self, f: &[u8], want: &[u32], what: &str) -> (u32, Vec<u8>) {
        let before = self.counters();
        let r = self.run(f);
        let after = self.counters();
        let moved: Vec<&str> = (0..after.len()).filter(|&i| after[i] != before[i]).map(|i| stat::NAMES[i]).collect();
        let want: Vec<&str> = want.iter().map(|&i| stat::NAMES[i as usize]).collect();
        assert_eq!(moved, want, "{what}: counters moved");
        r
    }
}

/// The one's-complement sum of `bytes` (odd length padded), not folded.
pub fn sum(bytes: &[u8]) -> u32 {
    bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum()
}

pub fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// The pseudo-header's sum for `proto` over `len` bytes.
pub fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::new();
    p.extend_from_slice(&ip_bytes(src));
    p.extend_from_slice(&ip_bytes(dst));
    if src.is_ipv4() {
        p.extend_from_slice(&[0, proto]);
        p.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        p.extend_from_slice(&(len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, proto]);
    }
    sum(&p)
}

pub fn ip_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The checksum `segment` should carry (its checksum field taken as 0); UDP 0 is
/// sent as 0xffff.
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    let at = if proto == 6 { 16 } else { 6 };
    let mut seg = segment.to_vec();
    seg[at..at + 2].fill(0);
    let c = fold(pseudo(src, dst, proto, seg.len()) + sum(&seg));
    if proto == 17 && c == 0 { 0xffff } else { c }
}

/// An IP packet `src`:`sport` -> `dst`:`dport` with a correct L4 checksum.
pub fn packet(src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let body: Vec<u8> = (0..payload).map(|i| (i * 13 + 5) as u8).collect();
    let mut seg = if proto == 6 { tcp(sport, dport, &body) } else { udp(sport, dport, &body) };
    let at = if proto == 6 { 16 } else { 6 };
    let c = l4_checksum(src, dst, proto, &seg);
    seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    ip(src, dst, proto, &seg)
}

pub fn ip(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s, d, proto, payload),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, proto, payload),
        _ => panic!("mixed families"),
    }
}

/// The ICMP / ICMPv6 checksum of `msg` (its field taken as 0) from `src` to `dst`.
pub fn icmp_checksum(src: IpAddr, dst: IpAddr, msg: &[u8]) -> u16 {
    let mut m = msg.to_vec();
    m[2..4].fill(0);
    if src.is_ipv4() { fold(sum(&m)) } else { fold(pseudo(src, dst, 58, m.len()) + sum(&m)) }
}

/// An ICMP error from `src` to `dst` quoting `quote` bytes of `inner`: "too big"
/// (IPv4 3/4, ICMPv6 2) unless `port_unreachable` (IPv4 3/3, ICMPv6 1/4), from
/// `mac`.
pub fn error(src: IpAddr, dst: IpAddr, inner: &[u8], quote: usize, port_unreachable: bool, mac: [u8; 6]) -> Vec<u8> {
    let (ty, code, rest) = match (src.is_ipv4(), port_unreachable) {
        (true, false) => (3, 4, [0, 0, 0x05, 0x78]),
        (true, true) => (3, 3, [0; 4]),
        (false, false) => (2, 0, 1400u32.to_be_bytes()),
        (false, true) => (1, 4, [0; 4]),
    };
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(&inner[..quote]);
    let c = icmp_checksum(src, dst, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    let proto = if src.is_ipv4() { 1 } else { 58 };
    let mut f = ethernet(None, if src.is_ipv4() { ETH_P_IP } else { ETH_P_IPV6 }, &ip(src, dst, proto, &m));
    f[6..12].copy_from_slice(&mac);
    f
}

/// What a translated error must be.
pub struct Want {
    pub mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub inner_src: IpAddr,
    pub inner_dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    /// The whole packet the error quotes (as it was sent), to check the
    /// embedded UDP checksum of a truncated quote against.
    pub full: Vec<u8>,
}

/// Checks `out` is the error `input` translated as `w` says, every checksum
/// recomputed; everything else (ICMP type, code and rest, the embedded header's
/// other fields, the quoted payload) unchanged.
pub fn check(out: &[u8], input: &[u8], w: &Want, what: &str) {
    assert_eq!(out.len(), input.len(), "{what}: length kept");
    assert_eq!((&out[0..6], &out[6..12]), (&w.mac[..], &LB_MAC[..]), "{what}: MACs");
    let v4 = w.src.is_ipv4();
    let (hl, addrs) = if v4 { (20, 12) } else { (40, 8) };
    let alen = if v4 { 4 } else { 16 };
    let o = &out[14..];
    let i = &input[14..];
    // The outer header.
    if v4 {
        assert_eq!(ipv4_checksum(&o[..20]), 0, "{what}: outer IPv4 header checksum");
        assert_eq!(o[8], i[8] - 1, "{what}: TTL decremented");
        assert_eq!((&o[..8], o[9]), (&i[..8], i[9]), "{what}: rest of the outer header");
    } else {
        assert_eq!(o[7], i[7] - 1, "{what}: hop limit decremented");
        assert_eq!(&o[..7], &i[..7], "{what}: rest of the outer header");
    }
    assert_eq!(&o[addrs..addrs + alen], &ip_bytes(w.src)[..], "{what}: outer source");
    assert_eq!(&o[addrs + alen..addrs + 2 * alen], &ip_bytes(w.dst)[..], "{what}: outer destination");
    // ICMP.
    let m = &o[hl..];
    assert_eq!(&m[..2], &i[hl..hl + 2], "{what}: type and code");
    assert_eq!(&m[4..8], &i[hl + 4..hl + 8], "{what}: rest of the ICMP header");
    assert_eq!(u16::from_be_bytes([m[2], m[3]]), icmp_checksum(w.src, w.dst, m), "{what}: ICMP checksum (recomputed)");
    // The embedded packet.
    let e = &m[8..];
    let ie = &i[hl + 8..];
    if v4 {
        assert_eq!(ipv4_checksum(&e[..20]), 0, "{what}: embedded IPv4 header checksum");
        assert_eq!(&e[..10], &ie[..10], "{what}: rest of the embedded header");
    } else {
        assert_eq!(&e[..8], &ie[..8], "{what}: rest of the embedded header");
    }
    assert_eq!(&e[addrs..addrs + alen], &ip_bytes(w.inner_src)[..], "{what}: embedded source");
    assert_eq!(&e[addrs + alen..addrs + 2 * alen], &ip_bytes(w.inner_dst)[..], "{what}: embedded destination");
    let seg = &e[hl..];
    let proto = if v4 { e[9] } else { e[6] };
    let ports = (u16::from_be_bytes([seg[0], seg[1]]), u16::from_be_bytes([seg[2], seg[3]]));
    assert_eq!(ports, (w.sport, w.dport), "{what}: embedded ports");
    // The whole segment quoted (IP length = what is there): its checksum checks.
    let ip_len = if v4 { usize::from(u16::from_be_bytes([e[2], e[3]])) } else { 40 + usize::from(u16::from_be_bytes([e[4], e[5]])) };
    let at = if proto == 6 { 16 } else { 6 };
    if ip_len == e.len() {
        let got = u16::from_be_bytes([seg[at], seg[at + 1]]);
        assert_eq!(got, l4_checksum(w.inner_src, w.inner_dst, proto, seg), "{what}: embedded L4 checksum (recomputed)");
        assert_eq!(&seg[at + 2..], &ie[hl + at + 2..], "{what}: the quoted segment's rest");
    } else {
        // Truncated: only the ports may change (TCP: the checksum, too, when the
        // whole header is there).
        let keep = if proto == 6 && seg.len() >= 20 { 18 } else if proto == 6 { 4 } else { 8 };
        assert_eq!(&seg[keep..], &ie[hl + keep..], "{what}: the quoted segment's rest");
        if proto == 17 {
            // The UDP checksum is quoted: it must be the translated datagram's.
            let mut whole = w.full[hl..].to_vec();
            whole[0..2].copy_from_slice(&w.sport.to_be_bytes());
            whole[2..4].copy_from_slice(&w.dport.to_be_bytes());
            let want = l4_checksum(w.inner_src, w.inner_dst, 17, &whole);
            assert_eq!(u16::from_be_bytes([seg[6], seg[7]]), want, "{what}: truncated UDP checksum (recomputed over the whole datagram)");
        }
    }
}

/// Sends the flow's first packet (so it is scheduled, with its reverse entry).
pub fn open(lab: &mut Lab, client: IpAddr, vip: IpAddr, proto: u8, cport: u16, vport: u16) {
    let mut f = ethernet(None, if client.is_ipv4() { ETH_P_IP } else { ETH_P_IPV6 }, &packet(client, vip, proto, cport, vport, 20));
    f[6..12].copy_from_slice(&CLIENT_MAC);
    assert_eq!(lab.run(&f).0, XDP_TX, "the flow's first packet");
}

/// A TCP/UDP datagram `src`:`sport` -> `dst`:`dport` with `payload` bytes and a
/// correct checksum (IPv4 UDP with `no_checksum`: 0), cut into fragments of at
/// most `step` bytes of L4 data each (a multiple of 8), IP identification `id`:
/// the frames (from `CLIENT_MAC`) and the whole L4 segment.
#[allow(clippy::too_many_arguments)]
pub fn fragments(
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    (sport, dport): (u16, u16),
    payload: usize,
    id: u32,
    step: usize,
    no_checksum: bool,
) -> (Vec<Vec<u8>>, Vec<u8>) {
    let body: Vec<u8> = (0..payload).map(|i| (i * 7 + 1) as u8).collect();
    let mut seg = if proto == 6 { tcp(sport, dport, &body) } else { udp(sport, dport, &body) };
    let at = if proto == 6 { 16 } else { 6 };
    if !no_checksum {
        let c = l4_checksum(src, dst, proto, &seg);
        seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    let mut frames = Vec::new();
    for (i, chunk) in seg.chunks(step).enumerate() {
        let more = (i + 1) * step < seg.len();
        let off = i * step;
        let mut f = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut ip = ipv4(s, d, proto, chunk);
                ip[4..6].copy_from_slice(&(id as u16).to_be_bytes());
                let fo = (off / 8) as u16 | if more { 0x2000 } else { 0 };
                ip[6..8].copy_from_slice(&fo.to_be_bytes());
                let mut f = ethernet(None, ETH_P_IP, &ip);
                crate::frames::fix_ipv4_checksum(&mut f, 14);
                f
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut fh = vec![proto, 0];
                fh.extend_from_slice(&((off as u16) | u16::from(more)).to_be_bytes());
                fh.extend_from_slice(&id.to_be_bytes());
                fh.extend_from_slice(chunk);
                ethernet(None, ETH_P_IPV6, &ipv6(s, d, crate::frames::PROTO_IPV6_FRAG, &fh))
            }
            _ => panic!("mixed families"),
        };
        f[6..12].copy_from_slice(&CLIENT_MAC);
        frames.push(f);
    }
    (frames, seg)
}

/// What translated fragments must carry.
pub struct FragWant {
    pub mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

/// Checks `out` (the translated fragments, in order) against `input`: MACs,
/// addresses, TTL / hop limit, the IPv4 header checksum, every fragment field
/// and byte of data unchanged but the first fragment's ports and checksum; and
/// the reassembled segment's checksum recomputed from scratch over the new
/// addresses (an IPv4 UDP checksum of 0 stays 0).
pub fn check_fragments(out: &[Vec<u8>], input: &[Vec<u8>], w: &FragWant, what: &str) {
    assert_eq!(out.len(), input.len(), "{what}: every fragment sent");
    let v4 = w.src.is_ipv4();
    let (hl, addrs, alen) = if v4 { (20, 12, 4) } else { (48, 8, 16) };
    let mut seg = Vec::new();
    let mut proto = 0;
    for (n, (o, i)) in out.iter().zip(input).enumerate() {
        let what = format!("{what}, fragment {n}");
        assert_eq!(o.len(), i.len(), "{what}: length kept");
        assert_eq!((&o[0..6], &o[6..12]), (&w.mac[..], &LB_MAC[..]), "{what}: MACs");
        let (o, i) = (&o[14..], &i[14..]);
        if v4 {
            assert_eq!(ipv4_checksum(&o[..20]), 0, "{what}: IPv4 header checksum");
            assert_eq!(o[8], i[8] - 1, "{what}: TTL decremented");
            assert_eq!((&o[..8], o[9]), (&i[..8], i[9]), "{what}: id, fragment offset and flags kept");
            proto = o[9];
        } else {
            assert_eq!(o[7], i[7] - 1, "{what}: hop limit decremented");
            assert_eq!((&o[..7], &o[40..48]), (&i[..7], &i[40..48]), "{what}: the Fragment header kept");
            proto = o[40];
        }
        assert_eq!(&o[addrs..addrs + alen], &ip_bytes(w.src)[..], "{what}: source");
        assert_eq!(&o[addrs + alen..addrs + 2 * alen], &ip_bytes(w.dst)[..], "{what}: destination");
        let at = if proto == 6 { 16 } else { 6 };
        let keep = if n == 0 { at + 2 } else { 0 };
        assert_eq!(&o[hl + keep..], &i[hl + keep..], "{what}: data kept");
        if n == 0 {
            assert_eq!(&o[hl + 4..hl + at], &i[hl + 4..hl + at], "{what}: the L4 header kept but ports and checksum");
        }
        seg.extend_from_slice(&o[hl..]);
    }
    let ports = (u16::from_be_bytes([seg[0], seg[1]]), u16::from_be_bytes([seg[2], seg[3]]));
    assert_eq!(ports, (w.sport, w.dport), "{what}: ports");
    let at = if proto == 6 { 16 } else { 6 };
    let got = u16::from_be_bytes([seg[at], seg[at + 1]]);
    if v4 && proto == 17 && got == 0 {
        let first_in = &input[0][14 + hl..];
        assert_eq!(&first_in[6..8], &[0, 0], "{what}: a UDP checksum of 0 only where there was none");
        return;
    }
    assert_eq!(got, l4_checksum(w.src, w.dst, proto, &seg), "{what}: reassembled L4 checksum (recomputed)");
}
