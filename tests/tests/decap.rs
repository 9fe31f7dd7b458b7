//! The real servers' decapsulator (`lb_decap`) through BPF_PROG_TEST_RUN: every
//! tunnel form the balancer sends, with and without a VLAN tag, comes out as the
//! L2 header plus the inner packet; what is not a tunnel packet to this host passes
//! untouched; malformed tunnel packets are dropped. Plus, in a namespace lab,
//! `lb-agent decap` on a real server answering GUE and IPIP requests to its VIP.
//!
//! Needs root: `cargo test -p lb-tests --test decap -- --test-threads=1`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun, TestRunOptions};
use lb_agent::decap::{key_of, Decap};
use lb_common::decap_stat::{self as ds, NAMES};
use lb_tests::{
    frames::{ethernet, udp, Vlan, ETH_P_IP, Q_TAG, AD_TAG},
    tunnel::{gue, inner_udp, ipip, outer, decapsulated, PROTO_IPIP, PROTO_UDP},
};

#[path = "decap/lab.rs"]
mod lab;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const GUE_PORT: u16 = 6080;
/// The balancer (outer source) and this real server (outer destination).
const LB4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
const LB6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
const RS4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11));
const RS6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11));
/// Another host's addresses.
const OTHER4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 12));
const OTHER6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x12));
/// Client and VIP of the inner packets.
const C4: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
const C6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7));
const VIP4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 10));
const VIP6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10));

struct Prog {
    dp: Decap,
}

impl Prog {
    fn new() -> Prog {
        lb_tests::netns::require_root();
        let mut dp = Decap::load(lb_agent::object::OBJECT).expect("loading lb_decap (verifier)");
        dp.set_gue_port(GUE_PORT).expect("setting the GUE port");
        let addrs = [RS4, RS6].into_iter().map(|a| (key_of(a), 1)).collect();
        dp.sync_addrs(&addrs).expect("filling DECAP_ADDRS");
        Prog { dp }
    }

    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let prog = self.dp.program().expect("lb_decap");
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() };
        let r = prog.test_run(opts).unwrap_or_else(|e| panic!("test run of {} bytes: {e:?}", frame.len()));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// Runs `frame` and checks the verdict, the output and that exactly `counter`
    /// moved, by one.
    fn expect(&mut self, what: &str, frame: &[u8], action: u32, out: &[u8], counter: u32) {
        let before = self.dp.stats().expect("DECAP_STATS");
        let (got, data) = self.run(frame);
        let after = self.dp.stats().expect("DECAP_STATS");
        assert_eq!(got, action, "{what}: verdict (counters {:?})", moved(&before, &after));
        if action == XDP_PASS {
            assert_eq!(hex(&data), hex(out), "{what}: output frame");
        }
        let mut want = vec![0u64; before.len()];
        want[counter as usize] = 1;
        let diff: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        assert_eq!(diff, want, "{what}: expected {} to move, moved {:?}", NAMES[counter as usize], moved(&before, &after));
    }

    fn decaps(&mut self, what: &str, frame: &[u8], vlan: Option<Vlan>, inner: &[u8], counter: u32) {
        self.expect(what, frame, XDP_PASS, &decapsulated(vlan, inner), counter);
    }

    fn untouched(&mut self, what: &str, frame: &[u8], counter: u32) {
        self.expect(what, frame, XDP_PASS, frame, counter);
    }

    fn dropped(&mut self, what: &str, frame: &[u8]) {
        self.expect(what, frame, XDP_DROP, &[], ds::DROP_MALFORMED);
    }
}

fn moved(before: &[u64], after: &[u64]) -> Vec<(&'static str, u64)> {
    after.iter().zip(before).enumerate().filter(|(_, (a, b))| a != b).map(|(i, (a, b))| (NAMES[i], a - b)).collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn inner_to(vip: IpAddr) -> Vec<u8> {
    let client = if vip.is_ipv4() { C4 } else { C6 };
    inner_udp(client, vip, 40000, 53, b"request")
}

#[test]
fn every_tunnel_form_is_decapsulated_with_and_without_a_tag() {
    let mut p = Prog::new();
    for vlan in [None, Some(Q_TAG), Some(AD_TAG)] {
        let tag = format!("{vlan:?}");
        // (outer source, outer destination, inner VIP, counter of the IPIP form)
        for (src, dst, vip, counter) in [
            (LB4, RS4, VIP4, ds::DECAP_IPIP),
            (LB6, RS6, VIP6, ds::DECAP_IP6IP6),
            (LB4, RS4, VIP6, ds::DECAP_IP6_IN_IP4),
            (LB6, RS6, VIP4, ds::DECAP_IP4_IN_IP6),
        ] {
            let inner = inner_to(vip);
            let what = format!("{} {src}->{dst} inner {vip} {tag}", NAMES[counter as usize]);
            p.decaps(&what, &ipip(vlan, src, dst, &inner), vlan, &inner, counter);
            let what = format!("gue {src}->{dst} inner {vip} {tag}");
            p.decaps(&what, &gue(vlan, src, dst, 51000, GUE_PORT, &inner), vlan, &inner, ds::DECAP_GUE);
        }
    }
}

#[test]
fn outer_ipv4_with_options_is_decapsulated() {
    let mut p = Prog::new();
    let inner = inner_to(VIP4);
    let (IpAddr::V4(s), IpAddr::V4(d)) = (LB4, RS4) else { unreachable!() };
    let frame = ethernet(None, ETH_P_IP, &lb_tests::frames::ipv4_opts(s, d, PROTO_IPIP, &[1, 1, 1, 0], &inner));
    p.decaps("ipip, outer IHL 6", &frame, None, &inner, ds::DECAP_IPIP);
    let mut udp_in = udp(51000, GUE_PORT, &inner);
    udp_in[4..6].copy_from_slice(&((8 + inner.len()) as u16).to_be_bytes());
    let frame = ethernet(Some(Q_TAG), ETH_P_IP, &lb_tests::frames::ipv4_opts(s, d, PROTO_UDP, &[1, 1, 1, 0], &udp_in));
    p.decaps("gue, outer IHL 6, tagged", &frame, Some(Q_TAG), &inner, ds::DECAP_GUE);
}

/// Sets the ECN field of the IP header at `l3` of `frame` (IPv4: and its checksum).
fn set_ecn(frame: &mut [u8], l3: usize, ecn: u8) {
    if frame[l3] >> 4 == 4 {
        frame[l3 + 1] = (frame[l3 + 1] & !3) | ecn;
        lb_tests::frames::fix_ipv4_checksum(frame, l3);
    } else {
        frame[l3 + 1] = (frame[l3 + 1] & !0x30) | (ecn << 4);
    }
}

#[test]
fn outer_congestion_marks_reach_the_inner_packet() {
    const NOT_ECT: u8 = 0;
    const ECT0: u8 = 2;
    const ECT1: u8 = 1;
    const CE: u8 = 3;
    let mut p = Prog::new();
    // (inner ECN, outer ECN, inner ECN after decapsulation; None: dropped)
    let cases = [
        (ECT0, CE, Some(CE)),
        (ECT1, CE, Some(CE)),
        (CE, CE, Some(CE)),
        (ECT0, ECT0, Some(ECT0)),
        (ECT1, NOT_ECT, Some(ECT1)),
        (NOT_ECT, ECT0, Some(NOT_ECT)),
        (NOT_ECT, CE, None),
    ];
    for (src, dst, vip) in [(LB4, RS4, VIP4), (LB6, RS6, VIP6), (LB4, RS4, VIP6), (LB6, RS6, VIP4)] {
        for (inner_ecn, outer_ecn, out_ecn) in cases {
            let mut inner = inner_to(vip);
            set_ecn(&mut inner, 0, inner_ecn);
            for gue_form in [false, true] {
                let mut f = if gue_form { gue(None, src, dst, 1, GUE_PORT, &inner) } else { ipip(None, src, dst, &inner) };
                set_ecn(&mut f, 14, outer_ecn);
                let what = format!("{src}->{dst} inner {vip} gue {gue_form}: inner ECN {inner_ecn}, outer {outer_ecn}");
                let counter = match (gue_form, src.is_ipv4(), vip.is_ipv4()) {
                    (true, ..) => ds::DECAP_GUE,
                    (false, true, true) => ds::DECAP_IPIP,
                    (false, false, false) => ds::DECAP_IP6IP6,
                    (false, true, false) => ds::DECAP_IP6_IN_IP4,
                    (false, false, true) => ds::DECAP_IP4_IN_IP6,
                };
                match out_ecn {
                    Some(ecn) => {
                        let mut want = inner.clone();
                        set_ecn(&mut want, 0, ecn);
                        p.decaps(&what, &f, None, &want, counter);
                    }
                    None => p.expect(&what, &f, XDP_DROP, &[], ds::DROP_CE_NOT_ECT),
                }
            }
        }
    }
}

#[test]
fn a_wrong_outer_ipv4_checksum_is_dropped() {
    let mut p = Prog::new();
    let inner = inner_to(VIP4);
    for (what, mut f) in [("ipip", ipip(None, LB4, RS4, &inner)), ("gue", gue(None, LB4, RS4, 1, GUE_PORT, &inner))] {
        f[14 + 10] ^= 0x01;
        p.expect(&format!("{what} with a wrong outer checksum"), &f, XDP_DROP, &[], ds::DROP_BAD_CHECKSUM);
    }
    // Options are part of the sum.
    let (IpAddr::V4(s), IpAddr::V4(d)) = (LB4, RS4) else { unreachable!() };
    let mut f = ethernet(None, ETH_P_IP, &lb_tests::frames::ipv4_opts(s, d, PROTO_IPIP, &[1, 1, 1, 0], &inner));
    f[14 + 21] = 2;
    p.expect("ipip with an option byte changed after the checksum", &f, XDP_DROP, &[], ds::DROP_BAD_CHECKSUM);
}

#[test]
fn what_is_not_a_tunnel_packet_to_this_host_passes_untouched() {
    let mut p = Prog::new();
    let inner = inner_to(VIP4);
    let inner6 = inner_to(VIP6);
    p.untouched("ipip to another host", &ipip(None, LB4, OTHER4, &inner), ds::PASS_NOT_LOCAL);
    p.untouched("ip6ip6 to another host", &ipip(None, LB6, OTHER6, &inner6), ds::PASS_NOT_LOCAL);
    p.untouched("gue to another host", &gue(None, LB4, OTHER4, 1, GUE_PORT, &inner), ds::PASS_NOT_LOCAL);
    p.untouched("gue6 to another host", &gue(None, LB6, OTHER6, 1, GUE_PORT, &inner6), ds::PASS_NOT_LOCAL);
    p.untouched("gue to another port", &gue(None, LB4, RS4, 1, GUE_PORT + 1, &inner), ds::PASS_NOT_TUNNEL);
    p.untouched("gue6 to another port", &gue(Some(Q_TAG), LB6, RS6, 1, 53, &inner6), ds::PASS_NOT_TUNNEL);
    // Plain traffic to this host: UDP, TCP, ICMP.
    let plain = lb_tests::frames::Flow::udp(C4, RS4, 1234, 53).frame(None, 8);
    p.untouched("plain udp", &plain, ds::PASS_NOT_TUNNEL);
    let plain = lb_tests::frames::Flow::tcp(C6, RS6, 1234, 80).frame(Some(Q_TAG), 8);
    p.untouched("plain tcp6, tagged", &plain, ds::PASS_NOT_TUNNEL);
    p.untouched("icmp", &lb_tests::frames::icmp_echo(C4, RS4), ds::PASS_NOT_TUNNEL);
    // IPv6 with an extension header before the tunnel: not ours.
    let mut hop = vec![PROTO_IPIP, 0, 1, 4, 0, 0, 0, 0];
    hop.extend_from_slice(&inner);
    p.untouched("ipv6 hop-by-hop then ipip", &outer(None, LB6, RS6, 0, &hop), ds::PASS_NOT_TUNNEL);
    let arp = lb_tests::frames::arp_request(None, Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 11));
    p.untouched("arp", &arp, ds::PASS_NOT_IP);
    // A tag and no ethertype after it (test runs need 14 bytes at least).
    let runt = ethernet(None, lb_tests::frames::ETH_P_8021Q, &[0, 100]);
    p.untouched("tag cut short", &runt, ds::PASS_NOT_IP);
    let (IpAddr::V4(s), IpAddr::V4(d)) = (LB4, RS4) else { unreachable!() };
    let cut = ethernet(None, ETH_P_IP, &lb_tests::frames::ipv4(s, d, PROTO_IPIP, &inner)[..16]);
    p.untouched("ipv4 header cut short", &cut, ds::PASS_NOT_IP);
}

#[test]
fn a_real_server_allocates_none_of_the_balancers_tables() {
    let mut p = Prog::new();
    for (name, ..) in lb_agent::pinning::layout() {
        assert_eq!(p.dp.max_entries(name).expect(name), 1, "balancer map {name} in the decapsulator's load");
    }
    let addrs = lb_common::map_names::DECAP_ADDRS;
    assert_eq!(p.dp.max_entries(addrs).expect(addrs), lb_common::decap::DECAP_MAX_ADDRS);
}

#[test]
fn gue_port_zero_turns_gue_off() {
    let mut p = Prog::new();
    p.dp.set_gue_port(0).expect("GUE off");
    let inner = inner_to(VIP4);
    p.untouched("gue while off", &gue(None, LB4, RS4, 1, GUE_PORT, &inner), ds::PASS_NOT_TUNNEL);
    p.decaps("ipip while gue off", &ipip(None, LB4, RS4, &inner), None, &inner, ds::DECAP_IPIP);
}

#[test]
fn malformed_tunnel_packets_are_dropped() {
    let mut p = Prog::new();
    let inner = inner_to(VIP4);
    let inner6 = inner_to(VIP6);
    for vlan in [None, Some(Q_TAG)] {
        let l3 = if vlan.is_some() { 18 } else { 14 };
        let v = format!("{vlan:?}");
        // Truncated outer: the frame ends before the outer total length.
        let f = ipip(vlan, LB4, RS4, &inner);
        p.dropped(&format!("ipip cut short {v}"), &f[..f.len() - 3]);
        let f = gue(vlan, LB6, RS6, 1, GUE_PORT, &inner6);
        p.dropped(&format!("gue6 cut short {v}"), &f[..f.len() - 1]);
        // Truncated inner: outer lengths agree with the frame, the inner header is short.
        let f = ipip(vlan, LB4, RS4, &inner[..12]);
        p.dropped(&format!("ipip with a 12-byte inner {v}"), &f);
        let f = ipip(vlan, LB6, RS6, &inner6[..30]);
        p.dropped(&format!("ip6ip6 with a 30-byte inner {v}"), &f);
        let f = gue(vlan, LB4, RS4, 1, GUE_PORT, &inner6[..39]);
        p.dropped(&format!("gue with a 39-byte inner {v}"), &f);
        // Inner length not what the outer header leaves.
        let mut short = inner.clone();
        short.extend_from_slice(&[0; 4]);
        p.dropped(&format!("ipip, inner shorter than outer says {v}"), &ipip(vlan, LB4, RS4, &short));
        let mut bad = inner6.clone();
        bad[5] += 1;
        p.dropped(&format!("ip6ip6, inner payload length +1 {v}"), &ipip(vlan, LB6, RS6, &bad));
        // Wrong inner version for the protocol.
        p.dropped(&format!("proto 4 with ipv6 inside {v}"), &outer(vlan, LB4, RS4, PROTO_IPIP, &inner6));
        p.dropped(&format!("next header 41 with ipv4 inside {v}"), &outer(vlan, LB6, RS6, 41, &inner));
        let mut junk = inner.clone();
        junk[0] = 0x05;
        p.dropped(&format!("gue with version 0 inside {v}"), &gue(vlan, LB4, RS4, 1, GUE_PORT, &junk));
        // Outer fragments: MF set, or an offset.
        for frag in [0x2000u16, 0x0001] {
            let mut f = ipip(vlan, LB4, RS4, &inner);
            f[l3 + 6..l3 + 8].copy_from_slice(&frag.to_be_bytes());
            lb_tests::frames::fix_ipv4_checksum(&mut f, l3);
            p.dropped(&format!("outer fragment {frag:#06x} {v}"), &f);
        }
        // UDP length shorter than the inner packet (and than the outer payload).
        let mut f = gue(vlan, LB4, RS4, 1, GUE_PORT, &inner);
        let udp_len = l3 + 20 + 4;
        f[udp_len..udp_len + 2].copy_from_slice(&((8 + inner.len() - 4) as u16).to_be_bytes());
        p.dropped(&format!("gue udp length short {v}"), &f);
        let mut f = gue(vlan, LB6, RS6, 1, GUE_PORT, &inner);
        let udp_len = l3 + 40 + 4;
        f[udp_len..udp_len + 2].copy_from_slice(&((8 + inner.len() - 4) as u16).to_be_bytes());
        p.dropped(&format!("gue6 udp length short {v}"), &f);
        // Outer IHL below 5 on a tunnel packet to us.
        let mut f = ipip(vlan, LB4, RS4, &inner);
        f[l3] = 0x44;
        p.dropped(&format!("outer ihl 4 {v}"), &f);
    }
}
