//! `forwarding: nat` at packet level (BPF_PROG_TEST_RUN through `lb_xdp`, which
//! tail-calls `lb_nat` and `lb_nat_reply`): the client's packet leaves for the
//! backend's address and port, the backend's reply leaves from the VIP to the MAC
//! the client's frame came from; TTL / hop limit decremented; every checksum
//! recomputed here from scratch and compared (IPv4 header, TCP and UDP with the
//! pseudo-header, odd-length payloads), and an IPv4 UDP checksum of 0 stays 0.
//!
//! Needs root: `cargo test -p lb-tests --test packet_nat -- --test-threads=1`.

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
const IFACE_MAC: [u8; 6] = LB_MAC;
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 7);
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
const BACKEND4: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 11);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 0x11);
/// The backend's own MAC, as the reply's source.
const BACKEND_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x11];

fn mac_of(a: IpAddr) -> [u8; 6] {
    let o = addr16(a);
    [0x02, 0xbe, o[12], o[13], o[14], o[15]]
}

/// TCP on port 80 to backends on 8080; UDP on port 53 to the service's port.
const YAML: &str = "services:
  - { name: tcp4, vip: 198.18.1.10, port: 80, forwarding: nat, backends: [{ address: 198.18.5.11, port: 8080 }] }
  - { name: udp4, vip: 198.18.1.10, port: 53, protocol: udp, forwarding: nat, backends: [{ address: 198.18.5.11 }] }
  - { name: tcp6, vip: \"2001:db8:1::10\", port: 80, forwarding: nat, backends: [{ address: \"2001:db8:5::11\", port: 8080 }] }
  - { name: udp6, vip: \"2001:db8:1::10\", port: 53, protocol: udp, forwarding: nat, backends: [{ address: \"2001:db8:5::11\" }] }
";

struct Lab {
    dp: Dataplane,
}

impl Lab {
    fn with(yaml: &str) -> Lab {
        // SAFETY: geteuid has no preconditions.
        assert!(unsafe { libc::geteuid() } == 0, "the packet tests load XDP programs and need root");
        let cfg = config::parse(yaml, "packet_nat.rs").expect("test config");
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

fn both_directions(lab: &mut Lab, client: IpAddr, vip: IpAddr, backend: IpAddr, proto: u8, ports: (u16, u16, u16), payload: usize) {
    let (cport, vport, bport) = ports;
    let what = format!("{client}:{cport} -> {vip}:{vport} proto {proto}, {payload} bytes");
    let f = frame(client, vip, proto, cport, vport, payload, CLIENT_MAC);
    let (rc, out) = lab.run(&f);
    assert_eq!(rc, XDP_TX, "{what}: forwarded");
    check(&out, &f, mac_of(backend), client, backend, cport, bport, &format!("{what}, to the backend"));
    // The backend's reply, sent to the balancer (its gateway).
    let r = frame(backend, client, proto, bport, cport, payload + 1, BACKEND_MAC);
    let (rc, out) = lab.run(&r);
    assert_eq!(rc, XDP_TX, "{what}: reply translated");
    check(&out, &r, CLIENT_MAC, vip, client, vport, cport, &format!("{what}, the reply"));
}

#[test]
fn tcp_and_udp_both_directions_ipv4_and_ipv6() {
    let mut lab = Lab::new();
    let (c4, v4, b4) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), IpAddr::V4(BACKEND4));
    let (c6, v6, b6) = (IpAddr::V6(CLIENT6), IpAddr::V6(VIP6), IpAddr::V6(BACKEND6));
    both_directions(&mut lab, c4, v4, b4, 6, (40000, 80, 8080), 100);
    both_directions(&mut lab, c4, v4, b4, 6, (40001, 80, 8080), 33);
    both_directions(&mut lab, c4, v4, b4, 17, (40002, 53, 53), 51);
    both_directions(&mut lab, c6, v6, b6, 6, (40000, 80, 8080), 100);
    both_directions(&mut lab, c6, v6, b6, 6, (40003, 80, 8080), 7);
    both_directions(&mut lab, c6, v6, b6, 17, (40004, 53, 53), 0);
    both_directions(&mut lab, c6, v6, b6, 17, (40005, 53, 53), 1);
    assert_eq!(lab.count(stat::NAT_FORWARDED), 7);
    assert_eq!(lab.count(stat::NAT_REPLY), 7);
    assert_eq!(lab.count(stat::FORWARDED), 7);
    // A later packet of an established flow goes the same way.
    let f = frame(c4, v4, 6, 40000, 80, 10, CLIENT_MAC);
    let (rc, out) = lab.run(&f);
    assert_eq!(rc, XDP_TX);
    check(&out, &f, mac_of(b4), c4, b4, 40000, 8080, "second packet");
}

#[test]
fn ipv4_udp_without_checksum_stays_without() {
    let mut lab = Lab::new();
    let (c4, v4, b4) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), IpAddr::V4(BACKEND4));
    for (sport, payload) in [(41000, 10), (41001, 11)] {
        let mut f = frame(c4, v4, 17, sport, 53, payload, CLIENT_MAC);
        f[40..42].fill(0);
        let (rc, out) = lab.run(&f);
        assert_eq!(rc, XDP_TX);
        assert_eq!(&out[40..42], &[0, 0], "an IPv4 UDP checksum of 0 stays 0");
        assert_eq!(&out[30..34], &BACKEND4.octets(), "destination rewritten");
        assert_eq!(ipv4_checksum(&out[14..34]), 0, "IPv4 header checksum valid");
        let mut r = frame(b4, c4, 17, 53, sport, payload, BACKEND_MAC);
        r[40..42].fill(0);
        let (rc, out) = lab.run(&r);
        assert_eq!(rc, XDP_TX);
        assert_eq!(&out[40..42], &[0, 0], "the reply's UDP checksum of 0 stays 0");
        assert_eq!(&out[26..30], &VIP4.octets(), "the reply comes from the VIP");
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
    // A frame from a backend that matches no flow: passed, as any frame to no VIP.
    let r = frame(b4, c4, 6, 8080, 42999, 10, BACKEND_MAC);
    let (rc, out) = lab.run(&r);
    assert_eq!((rc, &out[..]), (XDP_PASS, &r[..]), "an unknown reply passes untouched");
    assert_eq!(lab.count(stat::NAT_REPLY), 0);
    assert_eq!(lab.count(stat::PASS_NOT_VIP), 1);
}

#[test]
fn without_a_nat_service_replies_are_not_looked_up() {
    // A dr service only: `CONFIG_NAT` is off, so even a frame shaped like a reply
    // of an earlier nat flow passes at once.
    let mut lab = Lab::with("services:\n  - { name: dr4, vip: 198.18.1.10, port: 80, backends: [{ address: 198.18.5.11 }] }\n");
    let r = frame(IpAddr::V4(BACKEND4), IpAddr::V4(CLIENT4), 6, 80, 40000, 10, BACKEND_MAC);
    let (rc, out) = lab.run(&r);
    assert_eq!((rc, &out[..]), (XDP_PASS, &r[..]));
    assert_eq!(lab.count(stat::PASS_NOT_VIP), 1);
}

#[test]
fn replies_keep_the_flow_fresh_and_a_backend_fin_closes_it() {
    use aya::maps::{HashMap, MapData};
    use lb_common::{map_names, FlowKey, FlowVal, CT_STATE_CLOSING, CT_STATE_ESTABLISHED};
    let mut lab = Lab::new();
    let (c4, v4, b4) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), IpAddr::V4(BACKEND4));
    let key = FlowKey { src: addr16(c4), dst: addr16(v4), sport: 43000, dport: 80, proto: 6, _pad: [0; 3] };
    let table = |lab: &mut Lab| -> HashMap<MapData, FlowKey, FlowVal> {
        HashMap::try_from(aya::maps::Map::HashMap(lab.dp.map_handle(map_names::CT_ESTABLISHED).expect("map"))).expect("hash map")
    };
    // Two client packets: the flow is established.
    for _ in 0..2 {
        assert_eq!(lab.run(&frame(c4, v4, 6, 43000, 80, 10, CLIENT_MAC)).0, XDP_TX);
    }
    let est = table(&mut lab).get(&key, 0).expect("established after two packets");
    assert_eq!(est.state, CT_STATE_ESTABLISHED);
    // Aged, then a reply: its last-seen time moves again.
    table(&mut lab).insert(key, FlowVal { last_seen: 0, ..est }, 0).expect("age the entry");
    assert_eq!(lab.run(&frame(b4, c4, 6, 8080, 43000, 10, BACKEND_MAC)).0, XDP_TX);
    let fresh = table(&mut lab).get(&key, 0).expect("entry");
    assert_eq!((fresh.last_seen, fresh.state), (est.last_seen, CT_STATE_ESTABLISHED), "a reply refreshes the flow");
    // The backend's FIN closes it.
    let mut fin = frame(b4, c4, 6, 8080, 43000, 0, BACKEND_MAC);
    fin[14 + 20 + 13] = 0x11;
    let c = l4_checksum(b4, c4, 6, &fin[34..]);
    fin[34 + 16..34 + 18].copy_from_slice(&c.to_be_bytes());
    let (rc, out) = lab.run(&fin);
    assert_eq!(rc, XDP_TX);
    check(&out, &fin, CLIENT_MAC, v4, c4, 80, 43000, "the backend's FIN");
    assert_eq!(table(&mut lab).get(&key, 0).expect("entry").state, CT_STATE_CLOSING, "a backend FIN closes the flow");
}

#[test]
fn a_tagged_frame_keeps_its_tag_both_ways() {
    let mut lab = Lab::new();
    let (c4, v4, b4) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), IpAddr::V4(BACKEND4));
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
    let f = frame(c4, v4, 6, 44000, 80, 21, CLIENT_MAC);
    let (rc, out) = lab.run(&tag(f.clone()));
    assert_eq!(rc, XDP_TX);
    check(&untag(&out), &f, mac_of(b4), c4, b4, 44000, 8080, "tagged, to the backend");
    let r = frame(b4, c4, 6, 8080, 44000, 22, BACKEND_MAC);
    let (rc, out) = lab.run(&tag(r.clone()));
    assert_eq!(rc, XDP_TX);
    check(&untag(&out), &r, CLIENT_MAC, v4, c4, 80, 44000, "tagged reply");
}

/// A data plane created for a configuration without `nat` or `fullnat` services
/// creates the NAT tables with one entry each: a plan that adds the first `nat`
/// service is refused (before `lb_nat` is verified), saying a restart sizes them;
/// the DR service keeps its maps.
#[test]
fn the_first_nat_service_after_a_start_without_one_is_refused_until_a_restart() {
    // SAFETY: geteuid has no preconditions.
    assert!(unsafe { libc::geteuid() } == 0, "the packet tests load XDP programs and need root");
    let plan_of = |yaml: &str, prev: Option<&Plan>| {
        let cfg = config::parse(yaml, "t.yaml").expect("test config");
        let macs = Plan::backend_addresses(&cfg).into_iter().map(|a| (a, [0x02, 0xbe, 0, 0, 0, 1])).collect();
        Plan::next(&cfg, &macs, &Default::default(), prev)
    };
    let dr = plan_of("services:\n  - { name: a, vip: 198.18.1.1, port: 80, backends: [{address: 198.18.0.11}] }\n", None);
    let mut dp = Dataplane::load(&dr).expect("load the XDP object");
    dp.write(&dr, LB_MAC).expect("fill the maps");
    let nat = plan_of(
        "services:\n  - { name: a, vip: 198.18.1.1, port: 80, backends: [{address: 198.18.0.11}] }
  - { name: b, vip: 198.18.1.2, port: 80, forwarding: nat, backends: [{address: 198.18.0.12, port: 8080}] }\n",
        Some(&dr),
    );
    let err = dp.check_fits(&nat).expect_err("the NAT tables are unsized");
    assert!(err.to_string().contains("restart the agent"), "{err}");
    let err = dp.apply(&nat).expect_err("the NAT tables are unsized");
    assert!(err.to_string().contains("NAT_REVERSE"), "{err}");
    let lb_nat: &mut aya::programs::Xdp =
        dp.ebpf_mut().program_mut(lb_common::PROG_NAT).expect("lb_nat").try_into().expect("XDP");
    assert!(lb_nat.fd().is_err(), "lb_nat was verified for a plan that was refused");
    let nat_reverse = dp.map_handle(lb_common::map_names::NAT_REVERSE).expect("NAT_REVERSE");
    assert_eq!(nat_reverse.info().expect("info").max_entries(), lb_agent::pinning::NAT_UNSIZED);
    // Started with it, the same plan is sized.
    let mut sized = Dataplane::load(&nat).expect("load the XDP object");
    sized.write(&nat, LB_MAC).expect("a start with a nat service sizes the NAT tables");
}
