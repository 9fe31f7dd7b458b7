//! `forwarding: fullnat` at packet level (BPF_PROG_TEST_RUN through `lb_xdp`,
//! which tail-calls `lb_nat` and `lb_nat_reply`): the client's packet leaves from
//! a SNAT address and port to the backend's address and port, the backend's
//! reply to that SNAT address and port leaves from the VIP to the client, to the
//! MAC the client's frame came from; TTL / hop limit decremented; every checksum
//! recomputed here from scratch and compared (IPv4 header, TCP and UDP with the
//! pseudo-header, odd-length payloads), an IPv4 UDP checksum of 0 stays 0; two
//! clients to one backend get different SNAT ports; a pool that is used up drops
//! new flows (counted) and never reuses a live port; a port whose entry is gone
//! is given out again.
//!
//! Needs root: `cargo test -p lb-tests --test packet_fullnat -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::maps::{HashMap, MapData};
use aya::programs::{TestRun, TestRunOptions};
use lb_agent::{config, dataplane::Dataplane, plan::Plan};
use lb_common::{map_names, stat, FlowKey, NatReverse, SnatFwd};
use lb_tests::frames::{addr16, ethernet, ipv4, ipv4_checksum, ipv6, tcp, udp, ETH_P_IP, ETH_P_IPV6, CLIENT_MAC, LB_MAC};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const IFACE_MAC: [u8; 6] = LB_MAC;
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 7);
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
const BACKEND4: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 11);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 0x11);
const SNAT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const SNAT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// The backend's next hop's MAC, as the reply's source.
const BACKEND_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x11];

fn mac_of(a: IpAddr) -> [u8; 6] {
    let o = addr16(a);
    [0x02, 0xbe, o[12], o[13], o[14], o[15]]
}

/// TCP on port 80 to backends on 8080; UDP on port 53 to the service's port; a
/// service on port 81 with a pool of two ports.
const YAML: &str = "snat_addresses: [198.18.0.2, \"2001:db8::2\"]
snat_ports: 20000-29999
services:
  - { name: tcp4, vip: 198.18.1.10, port: 80, forwarding: fullnat, backends: [{ address: 198.18.5.11, port: 8080 }] }
  - { name: udp4, vip: 198.18.1.10, port: 53, protocol: udp, forwarding: fullnat, backends: [{ address: 198.18.5.11 }] }
  - { name: tcp6, vip: \"2001:db8:1::10\", port: 80, forwarding: fullnat, backends: [{ address: \"2001:db8:5::11\", port: 8080 }] }
  - { name: udp6, vip: \"2001:db8:1::10\", port: 53, protocol: udp, forwarding: fullnat, backends: [{ address: \"2001:db8:5::11\" }] }
  - { name: tiny, vip: 198.18.1.10, port: 81, forwarding: fullnat, snat_ports: 2000-2001, backends: [{ address: 198.18.5.11 }] }
";

struct Lab {
    dp: Dataplane,
}

impl Lab {
    fn with(yaml: &str) -> Lab {
        // SAFETY: geteuid has no preconditions.
        assert!(unsafe { libc::geteuid() } == 0, "the packet tests load XDP programs and need root");
        let cfg = config::parse(yaml, "packet_fullnat.rs").expect("test config");
        let macs: BTreeMap<IpAddr, [u8; 6]> = Plan::backend_addresses(&cfg).into_iter().map(|a| (a, mac_of(a))).collect();
        let plan = Plan::build(&cfg, &macs);
        let mut dp = Dataplane::load(&plan).expect("load the XDP object");
        dp.write(&plan, IFACE_MAC).expect("fill the maps");
        Lab { dp }
    }

    fn new() -> Lab {
        Lab::with(YAML)
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

    fn count(&mut self, i: u32) -> u64 {
        self.dp.stats().expect("counters").get(i)
    }
}

/// The one's-complement sum of `bytes` (odd length padded), folded, not inverted.
fn sum(bytes: &[u8]) -> u32 {
    let mut s: u32 = bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s
}

/// The pseudo-header's sum for `proto` over a segment of `len` bytes.
fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("mixed families"),
    }
    sum(&p)
}

/// The TCP/UDP checksum of `segment` (its checksum field taken as 0).
fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    let at = if proto == 6 { 16 } else { 6 };
    let mut seg = segment.to_vec();
    seg[at..at + 2].fill(0);
    let s = pseudo(src, dst, proto, seg.len()) + sum(&seg);
    let c = !(((s & 0xffff) + (s >> 16)) as u16);
    if proto == 17 && c == 0 { 0xffff } else { c }
}

/// A frame from `src`:`sport` to `dst`:`dport` with a correct checksum (or, for
/// IPv4 UDP with `no_udp_checksum`, none), from `from_mac`.
fn frame(src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16, payload: usize, from_mac: [u8; 6]) -> Vec<u8> {
    let body: Vec<u8> = (0..payload).map(|i| (i * 7 + 3) as u8).collect();
    let mut seg = if proto == 6 { tcp(sport, dport, &body) } else { udp(sport, dport, &body) };
    let at = if proto == 6 { 16 } else { 6 };
    let c = l4_checksum(src, dst, proto, &seg);
    seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    let mut f = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ethernet(None, ETH_P_IP, &ipv4(s, d, proto, &seg)),
        (IpAddr::V6(s), IpAddr::V6(d)) => ethernet(None, ETH_P_IPV6, &ipv6(s, d, proto, &seg)),
        _ => panic!("mixed families"),
    };
    f[6..12].copy_from_slice(&from_mac);
    f
}

/// Checks `out` is `input` translated: MACs `to` from ours, addresses and ports
/// as given, TTL one less, and every checksum right; the payload unchanged.
#[allow(clippy::too_many_arguments)]
fn check(out: &[u8], input: &[u8], to: [u8; 6], src: IpAddr, dst: IpAddr, sport: u16, dport: u16, what: &str) {
    assert_eq!(out.len(), input.len(), "{what}: length kept");
    assert_eq!(&out[0..6], &to, "{what}: destination MAC");
    assert_eq!(&out[6..12], &IFACE_MAC, "{what}: source MAC ours");
    let (l4, proto) = if src.is_ipv4() {
        let h = &out[14..34];
        assert_eq!(ipv4_checksum(h), 0, "{what}: IPv4 header checksum valid");
        assert_eq!(h[8], input[22] - 1, "{what}: TTL decremented");
        assert_eq!((&h[12..16], &h[16..20]), (&addr16(src)[12..], &addr16(dst)[12..]), "{what}: addresses");
        assert_eq!(&h[0..8], &input[14..22], "{what}: rest of the IPv4 header kept");
        (34, h[9])
    } else {
        let h = &out[14..54];
        assert_eq!(h[7], input[21] - 1, "{what}: hop limit decremented");
        assert_eq!((&h[8..24], &h[24..40]), (&addr16(src)[..], &addr16(dst)[..]), "{what}: addresses");
        assert_eq!(&h[0..7], &input[14..21], "{what}: rest of the IPv6 header kept");
        (54, h[6])
    };
    let seg = &out[l4..];
    assert_eq!((u16::from_be_bytes([seg[0], seg[1]]), u16::from_be_bytes([seg[2], seg[3]])), (sport, dport), "{what}: ports");
    let at = if proto == 6 { 16 } else { 6 };
    let got = u16::from_be_bytes([seg[at], seg[at + 1]]);
    assert_eq!(got, l4_checksum(src, dst, proto, seg), "{what}: L4 checksum valid (recomputed)");
    assert_eq!(&seg[at + 2..], &input[l4 + at + 2..], "{what}: rest of the L4 header and payload kept");
}


/// The SNAT port of a frame that went to the backend (its source port).
fn sport_of(out: &[u8], v6: bool) -> u16 {
    let l4 = if v6 { 54 } else { 34 };
    u16::from_be_bytes([out[l4], out[l4 + 1]])
}

/// A client's packet and the backend's reply, both checked; returns the SNAT port.
fn both_directions(lab: &mut Lab, client: IpAddr, vip: IpAddr, backend: IpAddr, proto: u8, ports: (u16, u16, u16), payload: usize) -> u16 {
    let (cport, vport, bport) = ports;
    let snat = if client.is_ipv4() { IpAddr::V4(SNAT4) } else { IpAddr::V6(SNAT6) };
    let what = format!("{client}:{cport} -> {vip}:{vport} proto {proto}, {payload} bytes");
    let f = frame(client, vip, proto, cport, vport, payload, CLIENT_MAC);
    let (rc, out) = lab.run(&f);
    assert_eq!(rc, XDP_TX, "{what}: forwarded");
    let sport = sport_of(&out, client.is_ipv6());
    assert!((20000..=29999).contains(&sport), "{what}: SNAT port {sport} from the pool");
    check(&out, &f, mac_of(backend), snat, backend, sport, bport, &format!("{what}, to the backend"));
    // The backend's reply, to the SNAT address (the balancer's own).
    let r = frame(backend, snat, proto, bport, sport, payload + 1, BACKEND_MAC);
    let (rc, out) = lab.run(&r);
    assert_eq!(rc, XDP_TX, "{what}: reply translated");
    check(&out, &r, CLIENT_MAC, vip, client, vport, cport, &format!("{what}, the reply"));
    sport
}

#[test]
fn tcp_and_udp_both_directions_ipv4_and_ipv6() {
    let mut lab = Lab::new();
    let (c4, v4, b4) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), IpAddr::V4(BACKEND4));
    let (c6, v6, b6) = (IpAddr::V6(CLIENT6), IpAddr::V6(VIP6), IpAddr::V6(BACKEND6));
    let first = both_directions(&mut lab, c4, v4, b4, 6, (40000, 80, 8080), 100);
    both_directions(&mut lab, c4, v4, b4, 6, (40001, 80, 8080), 33);
    both_directions(&mut lab, c4, v4, b4, 17, (40002, 53, 53), 51);
    both_directions(&mut lab, c6, v6, b6, 6, (40000, 80, 8080), 100);
    both_directions(&mut lab, c6, v6, b6, 6, (40003, 80, 8080), 7);
    both_directions(&mut lab, c6, v6, b6, 17, (40004, 53, 53), 0);
    both_directions(&mut lab, c6, v6, b6, 17, (40005, 53, 53), 1);
    assert_eq!(lab.count(stat::FULLNAT_FORWARDED), 7);
    assert_eq!(lab.count(stat::FULLNAT_REPLY), 7);
    assert_eq!(lab.count(stat::FORWARDED), 7);
    assert_eq!(lab.count(stat::NAT_FORWARDED) + lab.count(stat::NAT_REPLY), 0, "nat counters untouched");
    // A later packet of an established flow keeps its SNAT port.
    let f = frame(c4, v4, 6, 40000, 80, 10, CLIENT_MAC);
    let (rc, out) = lab.run(&f);
    assert_eq!(rc, XDP_TX);
    check(&out, &f, mac_of(b4), IpAddr::V4(SNAT4), b4, first, 8080, "second packet");
}

#[test]
fn two_clients_to_one_backend_get_different_snat_ports() {
    let mut lab = Lab::new();
    let (v4, b4) = (IpAddr::V4(VIP4), IpAddr::V4(BACKEND4));
    let mut seen = std::collections::BTreeSet::new();
    // Same source port from different clients, and different ports of one client.
    for (client, cport) in [([198, 18, 10, 7], 40000), ([198, 18, 10, 8], 40000), ([198, 18, 10, 7], 40001), ([198, 18, 10, 9], 40000)] {
        let c = IpAddr::V4(Ipv4Addr::from(client));
        let sport = both_directions(&mut lab, c, v4, b4, 6, (cport, 80, 8080), 10);
        assert!(seen.insert(sport), "SNAT port {sport} given to two live flows");
    }
}

#[test]
fn ipv4_udp_without_checksum_stays_without() {
    let mut lab = Lab::new();
    let (c4, v4, b4) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), IpAddr::V4(BACKEND4));
    for (cport, payload) in [(41000, 10), (41001, 11)] {
        let mut f = frame(c4, v4, 17, cport, 53, payload, CLIENT_MAC);
        f[40..42].fill(0);
        let (rc, out) = lab.run(&f);
        assert_eq!(rc, XDP_TX);
        assert_eq!(&out[40..42], &[0, 0], "an IPv4 UDP checksum of 0 stays 0");
        assert_eq!((&out[26..30], &out[30..34]), (&SNAT4.octets()[..], &BACKEND4.octets()[..]), "both addresses rewritten");
        assert_eq!(ipv4_checksum(&out[14..34]), 0, "IPv4 header checksum valid");
        let sport = sport_of(&out, false);
        let mut r = frame(b4, IpAddr::V4(SNAT4), 17, 53, sport, payload, BACKEND_MAC);
        r[40..42].fill(0);
        let (rc, out) = lab.run(&r);
        assert_eq!(rc, XDP_TX);
        assert_eq!(&out[40..42], &[0, 0], "the reply's UDP checksum of 0 stays 0");
        assert_eq!((&out[26..30], &out[30..34]), (&VIP4.octets()[..], &CLIENT4.octets()[..]), "VIP to client");
        assert_eq!(ipv4_checksum(&out[14..34]), 0, "the reply's IPv4 header checksum valid");
    }
}

#[test]
fn ttl_one_is_dropped_and_unknown_replies_pass() {
    let mut lab = Lab::new();
    let (c4, v4, b4) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), IpAddr::V4(BACKEND4));
    let mut f = frame(c4, v4, 6, 42000, 80, 10, CLIENT_MAC);
    f[22] = 1;
    lb_tests::frames::fix_ipv4_checksum(&mut f, 14);
    assert_eq!(lab.run(&f).0, XDP_DROP, "TTL 1: not forwarded");
    assert_eq!(lab.count(stat::DROP_NAT_TTL), 1);
    let mut f6 = frame(IpAddr::V6(CLIENT6), IpAddr::V6(VIP6), 6, 42000, 80, 10, CLIENT_MAC);
    f6[21] = 1;
    assert_eq!(lab.run(&f6).0, XDP_DROP, "hop limit 1: not forwarded");
    assert_eq!(lab.count(stat::DROP_NAT_TTL), 2);
    // A frame to the SNAT address on a port no flow holds: the balancer's own.
    let r = frame(b4, IpAddr::V4(SNAT4), 6, 8080, 29999, 10, BACKEND_MAC);
    let (rc, out) = lab.run(&r);
    assert_eq!((rc, &out[..]), (XDP_PASS, &r[..]), "an unknown reply passes untouched");
    assert_eq!(lab.count(stat::FULLNAT_REPLY), 0);
}

fn reverse(lab: &mut Lab) -> HashMap<MapData, FlowKey, NatReverse> {
    HashMap::try_from(aya::maps::Map::HashMap(lab.dp.map_handle(map_names::FULLNAT_REVERSE).expect("map"))).expect("hash map")
}

fn forward(lab: &mut Lab) -> HashMap<MapData, FlowKey, SnatFwd> {
    HashMap::try_from(aya::maps::Map::HashMap(lab.dp.map_handle(map_names::FULLNAT_FORWARD).expect("map"))).expect("hash map")
}

#[test]
fn an_exhausted_pool_drops_new_flows_and_a_freed_port_is_reused() {
    let mut lab = Lab::new();
    let (v4, b4) = (IpAddr::V4(VIP4), IpAddr::V4(BACKEND4));
    let snat = IpAddr::V4(SNAT4);
    let client = |i: u8| IpAddr::V4(Ipv4Addr::new(198, 18, 10, i));
    // Two ports (2000-2001): two flows get them, the third is dropped and counted.
    let mut ports = Vec::new();
    for i in 1..=2 {
        let f = frame(client(i), v4, 6, 40000, 81, 10, CLIENT_MAC);
        let (rc, out) = lab.run(&f);
        assert_eq!(rc, XDP_TX, "flow {i} forwarded");
        let sport = sport_of(&out, false);
        check(&out, &f, mac_of(b4), snat, b4, sport, 81, &format!("flow {i}"));
        ports.push(sport);
    }
    ports.sort();
    assert_eq!(ports, [2000, 2001], "both ports of the pool used, once each");
    for attempt in 0..3 {
        let f = frame(client(3), v4, 6, 40000, 81, 10, CLIENT_MAC);
        assert_eq!(lab.run(&f).0, XDP_DROP, "a third flow finds no port (attempt {attempt})");
    }
    assert_eq!(lab.count(stat::DROP_SNAT_EXHAUSTED), 3);
    // The live flows keep their ports and still get their replies.
    for (i, port) in [(1u8, 2000u16), (2, 2001)] {
        let owner = if ports[0] == port { 1 } else { 2 };
        let _ = i;
        let r = frame(b4, snat, 6, 81, port, 5, BACKEND_MAC);
        let (rc, out) = lab.run(&r);
        assert_eq!(rc, XDP_TX);
        let dst = &out[30..34];
        assert!(dst == &addr16(client(1))[12..] || dst == &addr16(client(2))[12..], "reply to a live flow's client ({owner})");
    }
    // Flow 1 ends: its entries go (as the agent's sweep removes them); its port
    // is then given to the next new flow.
    let k1 = FlowKey { src: addr16(client(1)), dst: addr16(v4), sport: 40000, dport: 81, proto: 6, _pad: [0; 3] };
    let m = forward(&mut lab).get(&k1, 0).expect("flow 1's mapping");
    let rk = FlowKey { src: m.backend, dst: m.snat, sport: m.backend_port, dport: m.snat_port, proto: 6, _pad: [0; 3] };
    reverse(&mut lab).remove(&rk).expect("remove flow 1's reverse entry");
    forward(&mut lab).remove(&k1).expect("remove flow 1's mapping");
    let f = frame(client(3), v4, 6, 40000, 81, 10, CLIENT_MAC);
    let (rc, out) = lab.run(&f);
    assert_eq!(rc, XDP_TX, "the freed port serves a new flow");
    assert_eq!(sport_of(&out, false), m.snat_port, "the freed port reused");
    let r = frame(b4, snat, 6, 81, m.snat_port, 5, BACKEND_MAC);
    let (rc, out) = lab.run(&r);
    assert_eq!(rc, XDP_TX);
    assert_eq!(&out[30..34], &addr16(client(3))[12..], "the reused port's replies go to its new flow");
    assert_eq!(lab.count(stat::DROP_SNAT_EXHAUSTED), 3, "no more drops");
}

#[test]
fn a_tagged_frame_keeps_its_tag_both_ways() {
    let mut lab = Lab::new();
    let (c6, v6, b6) = (IpAddr::V6(CLIENT6), IpAddr::V6(VIP6), IpAddr::V6(BACKEND6));
    let tag = |f: Vec<u8>| {
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
    let f = frame(c6, v6, 6, 44000, 80, 21, CLIENT_MAC);
    let (rc, out) = lab.run(&tag(f.clone()));
    assert_eq!(rc, XDP_TX);
    let out = untag(&out);
    let sport = sport_of(&out, true);
    check(&out, &f, mac_of(b6), IpAddr::V6(SNAT6), b6, sport, 8080, "tagged, to the backend");
    let r = frame(b6, IpAddr::V6(SNAT6), 6, 8080, sport, 22, BACKEND_MAC);
    let (rc, out) = lab.run(&tag(r.clone()));
    assert_eq!(rc, XDP_TX);
    check(&untag(&out), &r, CLIENT_MAC, v6, c6, 80, 44000, "tagged reply");
}
