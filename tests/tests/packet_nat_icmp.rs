//! ICMP errors about `forwarding: nat` flows at packet level (BPF_PROG_TEST_RUN
//! through `lb_xdp`, which tail-calls `lb_rare` then `lb_nat`, or `lb_nat_reply`):
//!
//! - an error sent to the VIP about a reply (a router on the client's side) leaves
//!   for the flow's backend: outer destination, embedded source address and port
//!   translated;
//! - an error about a packet sent to a backend (a router on the backend's side,
//!   or the backend itself) leaves for the client: embedded destination address
//!   and port translated back to the VIP, the outer source too when it was the
//!   backend.
//!
//! Every checksum of the result is recomputed here from scratch (outer IPv4
//! header, ICMP, ICMPv6 with its pseudo-header, the embedded IPv4 header, the
//! embedded TCP/UDP checksum over the quoted segment), over both families and
//! both directions, and every byte not meant to change is compared.
//!
//! Needs root: `cargo test -p lb-tests --test packet_nat_icmp -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::programs::{TestRun, TestRunOptions};
use lb_agent::{config, dataplane::Dataplane, plan::Plan};
use lb_common::stat;
use lb_tests::frames::{addr16, ethernet, ipv4, ipv4_checksum, ipv6, tcp, udp, ETH_P_IP, ETH_P_IPV6, CLIENT_MAC, LB_MAC};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 7);
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
const BACKEND4: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 11);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 0x11);
/// A router on the clients' side, and one between the balancer and the backend.
const ROUTER_C4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const ROUTER_C6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 1);
const ROUTER_B4: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 1);
const ROUTER_B6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 1);
const BACKEND_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x11];

fn mac_of(a: IpAddr) -> [u8; 6] {
    let o = addr16(a);
    [0x02, 0xbe, o[12], o[13], o[14], o[15]]
}

/// TCP 80 to backends on 8080; UDP 53 to the service's port.
const SERVICES: &str = "services:
  - { name: tcp4, vip: 198.18.1.10, port: 80, forwarding: nat, backends: [{ address: 198.18.5.11, port: 8080 }] }
  - { name: udp4, vip: 198.18.1.10, port: 53, protocol: udp, forwarding: nat, backends: [{ address: 198.18.5.11 }] }
  - { name: tcp6, vip: \"2001:db8:1::10\", port: 80, forwarding: nat, backends: [{ address: \"2001:db8:5::11\", port: 8080 }] }
  - { name: udp6, vip: \"2001:db8:1::10\", port: 53, protocol: udp, forwarding: nat, backends: [{ address: \"2001:db8:5::11\" }] }
";

struct Lab {
    dp: Dataplane,
}

impl Lab {
    fn with(globals: &str) -> Lab {
        // SAFETY: geteuid has no preconditions.
        assert!(unsafe { libc::geteuid() } == 0, "the packet tests load XDP programs and need root");
        let cfg = config::parse(&format!("{globals}{SERVICES}"), "packet_nat_icmp.rs").expect("test config");
        let macs: BTreeMap<IpAddr, [u8; 6]> = Plan::backend_addresses(&cfg).into_iter().map(|a| (a, mac_of(a))).collect();
        let plan = Plan::build(&cfg, &macs);
        let mut dp = Dataplane::load(&plan).expect("load the XDP object");
        dp.write(&plan, LB_MAC).expect("fill the maps");
        Lab { dp }
    }

    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 128];
        let prog = self.dp.balancer().expect("balancer");
        let r = prog
            .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn counters(&mut self) -> Vec<u64> {
        self.dp.stats().expect("counters").global
    }

    /// Runs `f` and checks the counters moved are exactly `want` (in index order).
    fn run_counted(&mut self, f: &[u8], want: &[u32], what: &str) -> (u32, Vec<u8>) {
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
fn sum(bytes: &[u8]) -> u32 {
    bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// The pseudo-header's sum for `proto` over `len` bytes.
fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
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

fn ip_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The checksum `segment` should carry (its checksum field taken as 0); UDP 0 is
/// sent as 0xffff.
fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    let at = if proto == 6 { 16 } else { 6 };
    let mut seg = segment.to_vec();
    seg[at..at + 2].fill(0);
    let c = fold(pseudo(src, dst, proto, seg.len()) + sum(&seg));
    if proto == 17 && c == 0 { 0xffff } else { c }
}

/// An IP packet `src`:`sport` -> `dst`:`dport` with a correct L4 checksum.
fn packet(src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let body: Vec<u8> = (0..payload).map(|i| (i * 13 + 5) as u8).collect();
    let mut seg = if proto == 6 { tcp(sport, dport, &body) } else { udp(sport, dport, &body) };
    let at = if proto == 6 { 16 } else { 6 };
    let c = l4_checksum(src, dst, proto, &seg);
    seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    ip(src, dst, proto, &seg)
}

fn ip(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s, d, proto, payload),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, proto, payload),
        _ => panic!("mixed families"),
    }
}

/// The ICMP / ICMPv6 checksum of `msg` (its field taken as 0) from `src` to `dst`.
fn icmp_checksum(src: IpAddr, dst: IpAddr, msg: &[u8]) -> u16 {
    let mut m = msg.to_vec();
    m[2..4].fill(0);
    if src.is_ipv4() { fold(sum(&m)) } else { fold(pseudo(src, dst, 58, m.len()) + sum(&m)) }
}

/// An ICMP error from `src` to `dst` quoting `quote` bytes of `inner`: "too big"
/// (IPv4 3/4, ICMPv6 2) unless `port_unreachable` (IPv4 3/3, ICMPv6 1/4), from
/// `mac`.
fn error(src: IpAddr, dst: IpAddr, inner: &[u8], quote: usize, port_unreachable: bool, mac: [u8; 6]) -> Vec<u8> {
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
struct Want {
    mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    inner_src: IpAddr,
    inner_dst: IpAddr,
    sport: u16,
    dport: u16,
    /// The whole packet the error quotes (as it was sent), to check the
    /// embedded UDP checksum of a truncated quote against.
    full: Vec<u8>,
}

/// Checks `out` is the error `input` translated as `w` says, every checksum
/// recomputed; everything else (ICMP type, code and rest, the embedded header's
/// other fields, the quoted payload) unchanged.
fn check(out: &[u8], input: &[u8], w: &Want, what: &str) {
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
fn open(lab: &mut Lab, client: IpAddr, vip: IpAddr, proto: u8, cport: u16, vport: u16) {
    let mut f = ethernet(None, if client.is_ipv4() { ETH_P_IP } else { ETH_P_IPV6 }, &packet(client, vip, proto, cport, vport, 20));
    f[6..12].copy_from_slice(&CLIENT_MAC);
    assert_eq!(lab.run(&f).0, XDP_TX, "the flow's first packet");
}

/// Cases: (client, vip, backend, client-side router, backend-side router).
fn families() -> [(IpAddr, IpAddr, IpAddr, IpAddr, IpAddr); 2] {
    [
        (CLIENT4.into(), VIP4.into(), BACKEND4.into(), ROUTER_C4.into(), ROUTER_B4.into()),
        (CLIENT6.into(), VIP6.into(), BACKEND6.into(), ROUTER_C6.into(), ROUTER_B6.into()),
    ]
}

#[test]
fn an_error_about_a_reply_reaches_the_backend_translated() {
    let mut lab = Lab::with("");
    let mut cport = 41000;
    for (client, vip, backend, router, _) in families() {
        for (proto, vport, bport) in [(6u8, 80u16, 8080u16), (17, 53, 53)] {
            for quote in [usize::MAX, 8] {
                cport += 1;
                open(&mut lab, client, vip, proto, cport, vport);
                // The reply as it left the balancer (from the VIP), quoted whole or
                // only its first 8 bytes after the IP header.
                let reply = packet(vip, client, proto, vport, cport, 300);
                let hl = if client.is_ipv4() { 20 } else { 40 };
                let q = if quote == 8 { hl + 8 } else { reply.len() };
                let f = error(router, vip, &reply, q, false, CLIENT_MAC);
                let what = format!("{router} -> {vip} about {vip}:{vport} -> {client}:{cport} proto {proto}, {q} bytes quoted");
                let (rc, out) = lab.run_counted(&f, &[stat::FORWARDED, stat::CONN_HIT, stat::ICMP_FORWARDED], &what);
                assert_eq!(rc, XDP_TX, "{what}: sent on");
                let w = Want { mac: mac_of(backend), src: router, dst: backend, inner_src: backend, inner_dst: client, sport: bport, dport: cport, full: reply.clone() };
                check(&out, &f, &w, &what);
            }
        }
    }
}

#[test]
fn an_error_about_a_packet_to_the_backend_reaches_the_client_translated() {
    let mut lab = Lab::with("");
    let mut cport = 42000;
    for (client, vip, backend, _, router) in families() {
        for (proto, vport, bport) in [(6u8, 80u16, 8080u16), (17, 53, 53)] {
            // From a router on the way to the backend ("too big"), or from the
            // backend itself ("port unreachable"); quoted whole or 8 bytes.
            for (from, unreachable, quote) in [(router, false, usize::MAX), (router, false, 8), (backend, true, usize::MAX)] {
                cport += 1;
                open(&mut lab, client, vip, proto, cport, vport);
                let sent = packet(client, backend, proto, cport, bport, 99);
                let hl = if client.is_ipv4() { 20 } else { 40 };
                let q = if quote == 8 { hl + 8 } else { sent.len() };
                let f = error(from, client, &sent, q, unreachable, BACKEND_MAC);
                let what = format!("{from} -> {client} about {client}:{cport} -> {backend}:{bport} proto {proto}, {q} bytes quoted");
                let (rc, out) = lab.run_counted(&f, &[stat::NAT_ICMP_REPLY], &what);
                assert_eq!(rc, XDP_TX, "{what}: sent on");
                // The backend's own address becomes the VIP; a router keeps its own.
                let src = if from == backend { vip } else { router };
                let w = Want { mac: CLIENT_MAC, src, dst: client, inner_src: client, inner_dst: vip, sport: cport, dport: vport, full: sent.clone() };
                check(&out, &f, &w, &what);
            }
        }
    }
}

#[test]
fn errors_about_no_nat_flow_or_switched_off_pass_and_ttl_one_drops() {
    let mut lab = Lab::with("");
    let (c4, v4, b4) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), IpAddr::V4(BACKEND4));
    // About a packet to the backend of no flow: not ours, passed untouched.
    let sent = packet(c4, b4, 6, 43000, 8080, 10);
    let f = error(ROUTER_B4.into(), c4, &sent, sent.len(), false, BACKEND_MAC);
    let (rc, out) = lab.run_counted(&f, &[stat::PASS_NOT_VIP], "no such flow");
    assert_eq!((rc, &out[..]), (XDP_PASS, &f[..]), "no such flow: passed untouched");
    // With the flow, but TTL 1: dropped, both ways.
    open(&mut lab, c4, v4, 6, 43000, 80);
    let mut f1 = f.clone();
    f1[22] = 1;
    lb_tests::frames::fix_ipv4_checksum(&mut f1, 14);
    assert_eq!(lab.run_counted(&f1, &[stat::DROP_NAT_TTL], "TTL 1, to the client").0, XDP_DROP);
    let reply = packet(v4, c4, 6, 80, 43000, 10);
    let mut g = error(ROUTER_C4.into(), v4, &reply, reply.len(), false, CLIENT_MAC);
    g[22] = 1;
    lb_tests::frames::fix_ipv4_checksum(&mut g, 14);
    assert_eq!(lab.run_counted(&g, &[stat::CONN_HIT, stat::DROP_NAT_TTL], "TTL 1, to the backend").0, XDP_DROP);
    // `forward_icmp: false`: neither direction is translated.
    let mut off = Lab::with("forward_icmp: false\n");
    open(&mut off, c4, v4, 6, 43000, 80);
    let (rc, out) = off.run_counted(&f, &[stat::PASS_NOT_VIP], "switched off, to the client");
    assert_eq!((rc, &out[..]), (XDP_PASS, &f[..]));
    let g = error(ROUTER_C4.into(), v4, &reply, reply.len(), false, CLIENT_MAC);
    let (rc, out) = off.run_counted(&g, &[stat::PASS_ICMP], "switched off, to the backend");
    assert_eq!((rc, &out[..]), (XDP_PASS, &g[..]));
}

#[test]
fn a_tagged_error_keeps_its_tag() {
    let mut lab = Lab::with("");
    let (c6, v6, b6) = (IpAddr::V6(CLIENT6), IpAddr::V6(VIP6), IpAddr::V6(BACKEND6));
    let tag = |f: &[u8]| {
        let mut t = f[..12].to_vec();
        t.extend_from_slice(&[0x81, 0x00, 0x00, 100]);
        t.extend_from_slice(&f[12..]);
        t
    };
    let untag = |f: &[u8]| {
        assert_eq!(&f[12..16], &[0x81, 0x00, 0x00, 100], "the 802.1Q tag kept");
        let mut u = f[..12].to_vec();
        u.extend_from_slice(&f[16..]);
        u
    };
    open(&mut lab, c6, v6, 6, 44000, 80);
    let sent = packet(c6, b6, 6, 44000, 8080, 50);
    let f = error(ROUTER_B6.into(), c6, &sent, sent.len(), false, BACKEND_MAC);
    let (rc, out) = lab.run(&tag(&f));
    assert_eq!(rc, XDP_TX);
    let w = Want { mac: CLIENT_MAC, src: ROUTER_B6.into(), dst: c6, inner_src: c6, inner_dst: v6, sport: 44000, dport: 80, full: sent };
    check(&untag(&out), &f, &w, "tagged, to the client");
    let reply = packet(v6, c6, 6, 80, 44000, 50);
    let g = error(ROUTER_C6.into(), v6, &reply, reply.len(), false, CLIENT_MAC);
    let (rc, out) = lab.run(&tag(&g));
    assert_eq!(rc, XDP_TX);
    let w = Want { mac: mac_of(b6), src: ROUTER_C6.into(), dst: b6, inner_src: b6, inner_dst: c6, sport: 8080, dport: 44000, full: reply };
    check(&untag(&out), &g, &w, "tagged, to the backend");
}

/// While a trace runs the balancer is `lb_xdp_trace`, whose rare path is
/// `lb_rare_trace`: an error about a `nat` flow goes on from there into `lb_nat`
/// as from `lb_rare` (counted, not recorded, as `nat` packets are).
#[test]
fn errors_are_translated_on_the_traced_path_too() {
    use aya::programs::Xdp;
    let mut lab = Lab::with("");
    let ebpf = lab.dp.ebpf_mut();
    for name in [lb_common::PROG_RARE_TRACE, lb_common::PROG_BALANCER_TRACE] {
        let p: &mut Xdp = ebpf.program_mut(name).expect("program").try_into().expect("XDP");
        if p.fd().is_err() {
            p.load().expect("load a traced program");
        }
    }
    let p: &mut Xdp = ebpf.program_mut(lb_common::PROG_RARE_TRACE).expect("program").try_into().expect("XDP");
    let fd = p.fd().expect("fd").try_clone().expect("fd");
    let mut slots: aya::maps::ProgramArray<_> =
        aya::maps::ProgramArray::try_from(ebpf.map_mut(lb_common::map_names::RARE_PROGS).expect("RARE_PROGS")).expect("program array");
    slots.set(lb_common::RARE_TRACE_SLOT, &fd, 0).expect("fill the traced rare slot");
    let (c4, v4, b4) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), IpAddr::V4(BACKEND4));
    open(&mut lab, c4, v4, 17, 45000, 53);
    let reply = packet(v4, c4, 17, 53, 45000, 40);
    let g = error(ROUTER_C4.into(), v4, &reply, reply.len(), true, CLIENT_MAC);
    let mut out = vec![0u8; g.len() + 128];
    let before = lab.counters();
    let p: &mut Xdp = lab.dp.ebpf_mut().program_mut(lb_common::PROG_BALANCER_TRACE).expect("program").try_into().expect("XDP");
    let r = p.test_run(TestRunOptions { data_in: Some(&g), data_out: Some(&mut out), ..Default::default() }).expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    assert_eq!(r.return_value, XDP_TX, "traced: sent on");
    let w = Want { mac: mac_of(b4), src: ROUTER_C4.into(), dst: b4, inner_src: b4, inner_dst: c4, sport: 53, dport: 45000, full: reply };
    check(&out, &g, &w, "traced, to the backend");
    let after = lab.counters();
    assert_eq!(after[stat::ICMP_FORWARDED as usize] - before[stat::ICMP_FORWARDED as usize], 1, "icmp_forwarded");
}
