//! Tunnel forwarding at packet level (BPF_PROG_TEST_RUN): the outer headers the
//! balancer adds for `forwarding: ipip` and `gue`, byte for byte, and the ICMP
//! "too big" answers for packets that would not fit the MTU once encapsulated.
//!
//! Needs root: `cargo test -p lb-tests --test packet_tunnel -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::programs::{TestRun, TestRunOptions};
use lb_agent::{config, dataplane::Dataplane, plan::Plan};
use lb_common::stat;
use lb_tests::frames::{addr16, ethernet, ipv4_checksum, ipv6, tcp, Flow, ETH_P_IP, ETH_P_IPV6, Q_TAG};

const XDP_DROP: u32 = 1;
const XDP_TX: u32 = 3;
const IFACE_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0xee];
const SRC4: Ipv4Addr = Ipv4Addr::new(198, 18, 20, 2);
const SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 2);
const MTU: u32 = 1500;
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 7);

fn mac_of(a: IpAddr) -> [u8; 6] {
    let o = addr16(a);
    [0x02, 0xbe, o[12], o[13], o[14], o[15]]
}

/// ipip v4 (port 80), ipip v6 (port 80), gue v4 (port 81, GUE port 7777), and an
/// IPv6 vip served over GUE by IPv4 backends (port 82); one backend each, so the
/// expected backend is known.
const YAML: &str = "services:
  - { name: ipip4, vip: 198.18.1.10, port: 80, forwarding: ipip, backends: [{ address: 198.18.5.11 }] }
  - { name: ipip6, vip: \"2001:db8:1::10\", port: 80, forwarding: ipip, backends: [{ address: \"2001:db8:5::11\" }] }
  - { name: gue4, vip: 198.18.1.10, port: 81, forwarding: gue, gue_port: 7777, backends: [{ address: 198.18.6.11 }] }
  - { name: gue64, vip: \"2001:db8:1::10\", port: 82, forwarding: gue, backends: [{ address: 198.18.6.12 }] }
";

struct Lab {
    dp: Dataplane,
}

impl Lab {
    fn new() -> Lab {
        // SAFETY: geteuid has no preconditions.
        assert!(unsafe { libc::geteuid() } == 0, "the packet tests load XDP programs and need root");
        let cfg = config::parse(YAML, "packet_tunnel.rs").expect("test config");
        let macs: BTreeMap<IpAddr, [u8; 6]> = Plan::backend_addresses(&cfg).into_iter().map(|a| (a, mac_of(a))).collect();
        let plan = Plan::build(&cfg, &macs);
        let mut dp = Dataplane::load(&plan).expect("load the XDP object");
        dp.set_tunnel(SRC4.octets(), SRC6.octets(), MTU).expect("tunnel settings");
        dp.write(&plan, IFACE_MAC).expect("fill the maps");
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

    fn count(&mut self, i: u32) -> u64 {
        self.dp.stats().expect("counters").get(i)
    }
}

/// An IPv4 TCP frame with TOS `tos` and `payload` bytes, DF set.
fn v4_frame(dst_port: u16, sport: u16, tos: u8, payload: usize) -> Vec<u8> {
    let mut f = Flow::tcp(IpAddr::V4(CLIENT4), "198.18.1.10".parse().unwrap(), sport, dst_port).frame(None, payload);
    f[15] = tos;
    lb_tests::frames::fix_ipv4_checksum(&mut f, 14);
    f
}

fn v6_frame(dst_port: u16, sport: u16, tclass: u8, payload: usize) -> Vec<u8> {
    let body: Vec<u8> = (0..payload).map(|i| i as u8).collect();
    let mut f = ethernet(None, ETH_P_IPV6, &ipv6(CLIENT6, "2001:db8:1::10".parse().unwrap(), 6, &tcp(sport, dst_port, &body)));
    f[14] = 0x60 | (tclass >> 4);
    f[15] = tclass << 4;
    f
}

/// The expected outer IPv4 header (checksum computed here independently).
fn outer4(dst: Ipv4Addr, proto: u8, tos: u8, total: usize) -> Vec<u8> {
    let mut h = vec![0x45, tos, (total >> 8) as u8, total as u8, 0, 0, 0x40, 0, 64, proto, 0, 0];
    h.extend_from_slice(&SRC4.octets());
    h.extend_from_slice(&dst.octets());
    let c = ipv4_checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

#[test]
fn ipip_adds_an_outer_header_and_keeps_the_packet() {
    let mut lab = Lab::new();
    let frame = v4_frame(80, 40000, 0xb8, 100);
    let (rc, out) = lab.run(&frame);
    assert_eq!(rc, XDP_TX);
    let backend: Ipv4Addr = "198.18.5.11".parse().unwrap();
    let inner = &frame[14..];
    let mut want = mac_of(backend.into()).to_vec();
    want.extend_from_slice(&IFACE_MAC);
    want.extend_from_slice(&ETH_P_IP.to_be_bytes());
    want.extend(outer4(backend, 4, 0xb8, 20 + inner.len()));
    want.extend_from_slice(inner);
    assert_eq!(out, want, "IPIP frame");
    assert_eq!(ipv4_checksum(&out[14..34]), 0, "outer checksum valid");
    assert_eq!((lab.count(stat::ENCAP_IPIP), lab.count(stat::FORWARDED)), (1, 1));

    // IP6IP6: next header 41, traffic class copied, hop limit 64, the tunnel source.
    let frame = v6_frame(80, 40001, 0x28, 100);
    let (rc, out) = lab.run(&frame);
    assert_eq!(rc, XDP_TX);
    let backend: Ipv6Addr = "2001:db8:5::11".parse().unwrap();
    assert_eq!(&out[0..6], &mac_of(backend.into()));
    assert_eq!(&out[12..14], &ETH_P_IPV6.to_be_bytes());
    let h = &out[14..54];
    assert_eq!((h[0] >> 4, (h[0] << 4) | (h[1] >> 4)), (6, 0x28), "version and traffic class");
    assert_eq!(u16::from_be_bytes([h[4], h[5]]) as usize, frame.len() - 14, "payload length: the inner packet");
    assert_eq!((h[6], h[7]), (41, 64));
    assert_eq!((&h[8..24], &h[24..40]), (&SRC6.octets()[..], &backend.octets()[..]));
    assert_eq!(&out[54..], &frame[14..], "inner packet unchanged");

    // A tagged frame keeps its tag.
    let mut tagged = Flow::tcp(IpAddr::V4(CLIENT4), "198.18.1.10".parse().unwrap(), 40002, 80).frame(Some(Q_TAG), 10);
    let (rc, out) = lab.run(&tagged);
    assert_eq!(rc, XDP_TX);
    assert_eq!(&out[12..18], &[0x81, 0x00, 0x00, 100, 0x08, 0x00], "802.1Q tag and the outer EtherType");
    assert_eq!(&out[38..], &tagged.split_off(18)[..], "inner packet after the tag and outer header");
}

#[test]
fn gue_carries_the_packet_in_udp_with_a_per_flow_source_port() {
    let mut lab = Lab::new();
    let mut sports = Vec::new();
    for sport in [40000u16, 40001, 40002, 40003] {
        let frame = v4_frame(81, sport, 0, 50);
        let (rc, out) = lab.run(&frame);
        assert_eq!(rc, XDP_TX);
        let backend: Ipv4Addr = "198.18.6.11".parse().unwrap();
        let inner = &frame[14..];
        assert_eq!(&out[14..34], &outer4(backend, 17, 0, 28 + inner.len())[..], "outer IPv4 header");
        let u = &out[34..42];
        let src = u16::from_be_bytes([u[0], u[1]]);
        assert!(src >= 49152, "source port {src} in the ephemeral range");
        assert_eq!(u16::from_be_bytes([u[2], u[3]]), 7777, "the service's gue_port");
        assert_eq!(u16::from_be_bytes([u[4], u[5]]) as usize, 8 + inner.len(), "UDP length");
        assert_eq!(&u[6..8], &[0, 0], "no UDP checksum over IPv4");
        assert_eq!(&out[42..], inner);
        sports.push(src);
    }
    sports.dedup();
    assert!(sports.len() > 1, "the GUE source port follows the flow: {sports:?}");
    assert_eq!(lab.count(stat::ENCAP_GUE), 4);

    // An IPv6 vip over GUE to an IPv4 backend: outer IPv4 carrying the IPv6 packet,
    // DF set (routers never fragment IPv6).
    let frame = v6_frame(82, 40010, 0, 40);
    let (rc, out) = lab.run(&frame);
    assert_eq!(rc, XDP_TX);
    assert_eq!(&out[12..14], &ETH_P_IP.to_be_bytes());
    assert_eq!(&out[14..34], &outer4("198.18.6.12".parse().unwrap(), 17, 0, 28 + frame.len() - 14)[..]);
    assert_eq!(u16::from_be_bytes([out[36], out[37]]), lb_common::DEFAULT_GUE_PORT);
    assert_eq!(&out[42..], &frame[14..]);
}

#[test]
fn too_big_packets_get_icmp_or_are_dropped() {
    let mut lab = Lab::new();
    // 1,500 bytes of IPv4 with DF: 20 more do not fit a 1,500-byte MTU.
    let frame = v4_frame(80, 40000, 0, 1500 - 40);
    assert_eq!(frame.len() - 14, 1500);
    let (rc, out) = lab.run(&frame);
    assert_eq!(rc, XDP_TX, "answered");
    assert_eq!((&out[0..6], &out[6..12]), (&frame[6..12], &IFACE_MAC[..]), "back to the sender");
    let ip = &out[14..34];
    assert_eq!(ipv4_checksum(ip), 0, "IP checksum valid");
    assert_eq!((ip[9], &ip[12..16], &ip[16..20]), (1, &[198, 18, 1, 10][..], &CLIENT4.octets()[..]), "ICMP from the vip to the client");
    let icmp = &out[34..];
    assert_eq!(icmp.len(), 8 + 20 + 8, "header, the invoking IP header and 8 bytes");
    assert_eq!((icmp[0], icmp[1]), (3, 4), "fragmentation needed");
    assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1480, "next-hop MTU: 1500 less the IPIP header");
    assert_eq!(ipv4_checksum(icmp), 0, "ICMP checksum valid");
    assert_eq!(&icmp[8..36], &frame[14..42], "quoted header and 8 bytes");
    assert_eq!(lab.count(stat::ICMP_TOO_BIG), 1);

    // Without DF: dropped and counted.
    let mut no_df = frame.clone();
    no_df[20] = 0;
    lb_tests::frames::fix_ipv4_checksum(&mut no_df, 14);
    assert_eq!(lab.run(&no_df).0, XDP_DROP);
    assert_eq!(lab.count(stat::DROP_TOO_BIG), 1);

    // IPv6: ICMPv6 packet too big with the MTU, checksum over the pseudo-header.
    let frame = v6_frame(80, 40001, 0, 1500 - 60);
    let (rc, out) = lab.run(&frame);
    assert_eq!(rc, XDP_TX);
    let ip = &out[14..54];
    assert_eq!((ip[6], &ip[8..24], &ip[24..40]), (58, &frame[38..54], &frame[22..38]), "from the vip to the client");
    let msg = &out[54..];
    assert_eq!(msg.len(), 8 + 48);
    assert_eq!((msg[0], msg[1]), (2, 0), "packet too big");
    assert_eq!(u32::from_be_bytes([msg[4], msg[5], msg[6], msg[7]]), 1460, "MTU: 1500 less the IP6IP6 header");
    let mut pseudo = ip[8..40].to_vec();
    pseudo.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(msg);
    assert_eq!(ipv4_checksum(&pseudo), 0, "ICMPv6 checksum valid");
    assert_eq!(&msg[8..], &frame[14..62]);
}
