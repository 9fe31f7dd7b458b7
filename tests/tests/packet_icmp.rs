//! ICMP and fragments to a VIP at packet level (BPF_PROG_TEST_RUN): errors about
//! a VIP flow's replies reach the flow's backend (DR: only the MACs change;
//! ipip: the whole ICMP packet is the inner packet), other ICMP passes, echo
//! requests are answered, and a datagram's fragments all go where its first went.
//!
//! Needs root: `cargo test -p lb-tests --test packet_icmp -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::programs::{TestRun, TestRunOptions};
use lb_agent::{config, dataplane::Dataplane, plan::Plan};
use lb_common::{flow_hash, maglev_slot, stat::*, PROTO_TCP, PROTO_UDP};
use lb_tests::frames::*;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const IFACE_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0xee];
const C4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const C6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
/// A VIP with an any-port TCP service.
const ANY4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 20);
/// A VIP whose service tunnels (ipip).
const TUN4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 30);
const TUN6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x30);
/// Routers on the path that report errors.
const R4: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 1);
const R6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 1);
const SRC4: Ipv4Addr = Ipv4Addr::new(198, 18, 20, 2);
const SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 2);

const SERVICES: &str = "services:
  - { name: web, vip: 198.18.1.10, port: 80, backends: [{ address: 198.18.0.11 }, { address: 198.18.0.12 }, { address: 198.18.0.13 }] }
  - { name: web6, vip: \"2001:db8:1::10\", port: 80, backends: [{ address: \"2001:db8::11\" }, { address: \"2001:db8::12\" }, { address: \"2001:db8::13\" }] }
  - { name: dns, vip: 198.18.1.10, port: 53, protocol: udp, backends: [{ address: 198.18.0.21 }, { address: 198.18.0.22 }, { address: 198.18.0.23 }] }
  - { name: dns6, vip: \"2001:db8:1::10\", port: 53, protocol: udp, backends: [{ address: \"2001:db8::21\" }, { address: \"2001:db8::22\" }, { address: \"2001:db8::23\" }] }
  - { name: any, vip: 198.18.1.20, port: 0, backends: [{ address: 198.18.0.31 }, { address: 198.18.0.32 }] }
  - { name: tun, vip: 198.18.1.30, port: 80, forwarding: ipip, backends: [{ address: 198.18.5.11 }] }
  - { name: tun6, vip: \"2001:db8:1::30\", port: 80, forwarding: ipip, backends: [{ address: \"2001:db8:5::11\" }] }
";

fn mac_of(a: IpAddr) -> [u8; 6] {
    let o = addr16(a);
    [0x02, 0xbe, o[12], o[13], o[14], o[15]]
}

struct Lab {
    dp: Dataplane,
    plan: Plan,
}

impl Lab {
    fn new() -> Lab {
        Lab::with("")
    }

    /// A lab whose configuration starts with `globals` (YAML lines).
    fn with(globals: &str) -> Lab {
        // SAFETY: geteuid has no preconditions.
        assert!(unsafe { libc::geteuid() } == 0, "the packet tests load XDP programs and need root");
        let yaml = format!("{globals}{SERVICES}");
        let cfg = config::parse(&yaml, "packet_icmp.rs").unwrap_or_else(|e| panic!("test config: {e}"));
        let macs: BTreeMap<IpAddr, [u8; 6]> =
            Plan::backend_addresses(&cfg).into_iter().map(|a| (a, mac_of(a))).collect();
        let plan = Plan::build(&cfg, &macs);
        let mut dp = Dataplane::load(&plan).expect("loading the XDP object");
        dp.set_tunnel(SRC4.octets(), SRC6.octets(), 1500).expect("tunnel settings");
        dp.write(&plan, IFACE_MAC).expect("filling the maps");
        Lab { dp, plan }
    }

    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let prog = self.dp.balancer().expect("the balancer program");
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() };
        let r = prog.test_run(opts).unwrap_or_else(|e| panic!("test run failed: {e:?}"));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn global(&mut self) -> Vec<u64> {
        self.dp.stats().expect("reading the counters").global
    }

    fn svc(&self, name: &str) -> usize {
        self.plan.services.iter().position(|s| s.name == name).unwrap_or_else(|| panic!("no service {name}"))
    }

    /// The backend Maglev gives `flow` in service `svc`.
    fn predict(&self, svc: &str, flow: &Flow) -> u32 {
        let s = &self.plan.services[self.svc(svc)];
        let slot = maglev_slot(flow_hash(&flow.key()), s.value.table_size);
        s.table[slot as usize]
    }

    fn mac(&self, backend: u32) -> [u8; 6] {
        self.plan.backend(backend).and_then(|b| b.mac).expect("resolved backend")
    }

    /// Runs `frame`; it must be forwarded in DR to `want` (only the MACs
    /// changed) and move exactly `counters` (plus `forwarded`).
    fn dr(&mut self, frame: &[u8], want: u32, counters: &[u32], what: &str) {
        let before = self.global();
        let (rc, out) = self.run(frame);
        assert_eq!(rc, XDP_TX, "{what}: expected XDP_TX");
        assert_eq!(out.len(), frame.len(), "{what}: length changed");
        assert_eq!(out[0..6], self.mac(want), "{what}: not sent to backend {want}");
        assert_eq!(out[6..12], IFACE_MAC, "{what}: source MAC");
        assert_eq!(out[12..], frame[12..], "{what}: more than the MACs changed");
        let mut expected = vec![(FORWARDED, 1)];
        expected.extend(counters.iter().map(|&c| (c, 1)));
        self.expect_delta(&before, &expected, what);
    }

    /// Runs `frame`, which must come back untouched with `rc`, counted `counter`.
    fn left(&mut self, frame: &[u8], rc: u32, counter: u32, what: &str) {
        let before = self.global();
        let (got, out) = self.run(frame);
        assert_eq!(got, rc, "{what}: verdict (1 drop, 2 pass, 3 tx)");
        assert_eq!(out, frame, "{what}: frame was modified");
        self.expect_delta(&before, &[(counter, 1)], what);
    }

    fn expect_delta(&mut self, before: &[u64], expected: &[(u32, u64)], what: &str) {
        lb_tests::drpacket::expect_moved(before, &self.global(), expected, what);
    }
}

/// RFC 1071 sum (not inverted) of `data`, continuing `sum`.
fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The ICMPv6 checksum of `msg` from `src` to `dst`.
fn icmp6_checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let mut s = sum16(0, &src.octets());
    s = sum16(s, &dst.octets());
    s += msg.len() as u32 + 58;
    fold(sum16(s, msg))
}

/// An ICMP(v6) message `ty`/`code` with 4 bytes `rest` and `body`, checksummed.
fn icmp_msg(v6: Option<(Ipv6Addr, Ipv6Addr)>, ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let c = match v6 {
        Some((s, d)) => icmp6_checksum(s, d, &m),
        None => fold(sum16(0, &m)),
    };
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// A reply of `flow` (VIP to client), as the backend sent it: the IP packet.
fn reply_packet(flow: &Flow) -> Vec<u8> {
    let back = Flow { src: flow.dst, dst: flow.src, sport: flow.dport, dport: flow.sport, proto: flow.proto };
    let l4 = back.l4(&[0x55; 1200]);
    match (back.src, back.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s, d, back.proto, &l4),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, back.proto, &l4),
        _ => unreachable!(),
    }
}

/// A router's ICMP error to the VIP quoting the first `quote` bytes of `inner`.
fn error_v4(ty: u8, code: u8, inner: &[u8], quote: usize, vip: Ipv4Addr) -> Vec<u8> {
    let rest = if (ty, code) == (3, 4) { [0, 0, 0x05, 0x78] } else { [0; 4] };
    let msg = icmp_msg(None, ty, code, rest, &inner[..quote]);
    ethernet(None, ETH_P_IP, &ipv4(R4, vip, PROTO_ICMP, &msg))
}

fn error_v6(ty: u8, code: u8, inner: &[u8], quote: usize, vip: Ipv6Addr) -> Vec<u8> {
    let rest = if ty == 2 { 1400u32.to_be_bytes() } else { [0; 4] };
    let msg = icmp_msg(Some((R6, vip)), ty, code, rest, &inner[..quote]);
    ethernet(None, ETH_P_IPV6, &ipv6(R6, vip, PROTO_ICMPV6, &msg))
}

/// Counters of a flow's first packet (`Flow::frame` sends a TCP ACK: a TCP flow
/// starts as a mid-flow miss).
fn first_counters(proto: u8) -> &'static [u32] {
    if proto == PROTO_TCP { &[CONN_MISS, CT_MIDFLOW_MISS] } else { &[CONN_MISS] }
}

fn v4f(sport: u16, dport: u16, proto: u8, vip: Ipv4Addr) -> Flow {
    Flow { src: IpAddr::V4(C4), dst: IpAddr::V4(vip), sport, dport, proto }
}

fn v6f(sport: u16, dport: u16, proto: u8, vip: Ipv6Addr) -> Flow {
    Flow { src: IpAddr::V6(C6), dst: IpAddr::V6(vip), sport, dport, proto }
}

#[test]
fn icmp_errors_about_vip_flows_reach_the_flows_backend() {
    let mut lab = Lab::new();
    // Every type/code the balancer follows, both families, TCP and UDP; each for a
    // flow the table knows (its backend) and one it does not (Maglev's choice,
    // nothing recorded: the same error again is again a miss).
    let v4_types = [(3u8, 4u8), (3, 1), (3, 3), (11, 0)];
    let v6_types = [(2u8, 0u8), (1, 4), (3, 0)];
    for (i, &(ty, code)) in v4_types.iter().enumerate() {
        for (svc, proto, dport) in [("web", PROTO_TCP, 80), ("dns", PROTO_UDP, 53)] {
            let what = format!("ICMP {ty}/{code} about {svc}");
            let known = v4f(40000 + i as u16, dport, proto, VIP4);
            let b = lab.predict(svc, &known);
            lab.dr(&known.frame(None, 10), b, first_counters(proto), &format!("{what}: the flow's first packet"));
            // Quote lengths: IP header + 8 bytes (the minimum), and a longer one.
            for quote in [28, 548] {
                let err = error_v4(ty, code, &reply_packet(&known), quote, VIP4);
                lab.dr(&err, b, &[CONN_HIT, ICMP_FORWARDED], &format!("{what} (known flow, quote {quote})"));
            }
            let unknown = v4f(50000 + i as u16, dport, proto, VIP4);
            let b = lab.predict(svc, &unknown);
            let err = error_v4(ty, code, &reply_packet(&unknown), 28, VIP4);
            for n in 0..2 {
                lab.dr(&err, b, &[CONN_MISS, ICMP_FORWARDED], &format!("{what} (unknown flow, #{n})"));
            }
        }
    }
    for (i, &(ty, code)) in v6_types.iter().enumerate() {
        for (svc, proto, dport) in [("web6", PROTO_TCP, 80), ("dns6", PROTO_UDP, 53)] {
            let what = format!("ICMPv6 {ty}/{code} about {svc}");
            let known = v6f(40000 + i as u16, dport, proto, VIP6);
            let b = lab.predict(svc, &known);
            lab.dr(&known.frame(None, 10), b, first_counters(proto), &format!("{what}: the flow's first packet"));
            for quote in [48, 1000] {
                let err = error_v6(ty, code, &reply_packet(&known), quote, VIP6);
                lab.dr(&err, b, &[CONN_HIT, ICMP_FORWARDED], &format!("{what} (known flow, quote {quote})"));
            }
            let unknown = v6f(50000 + i as u16, dport, proto, VIP6);
            let b = lab.predict(svc, &unknown);
            let err = error_v6(ty, code, &reply_packet(&unknown), 48, VIP6);
            lab.dr(&err, b, &[CONN_MISS, ICMP_FORWARDED], &format!("{what} (unknown flow)"));
        }
    }
    // 802.1Q-tagged: the tag is kept, only the MACs change.
    for v6 in [false, true] {
        let (f, svc) = if v6 { (v6f(41500, 80, PROTO_TCP, VIP6), "web6") } else { (v4f(41500, 80, PROTO_TCP, VIP4), "web") };
        let b = lab.predict(svc, &f);
        let untagged = if v6 { error_v6(2, 0, &reply_packet(&f), 48, VIP6) } else { error_v4(3, 4, &reply_packet(&f), 28, VIP4) };
        let ethertype = if v6 { ETH_P_IPV6 } else { ETH_P_IP };
        let tagged = ethernet(Some(Q_TAG), ethertype, &untagged[14..]);
        lab.dr(&tagged, b, &[CONN_MISS, ICMP_FORWARDED], &format!("802.1Q-tagged ICMP error (v6: {v6})"));
    }
    // An any-port service: any embedded source port.
    let f = v4f(41000, 5555, PROTO_TCP, ANY4);
    let b = lab.predict("any", &f);
    let err = error_v4(3, 4, &reply_packet(&f), 28, ANY4);
    lab.dr(&err, b, &[CONN_MISS, ICMP_FORWARDED], "frag-needed about an any-port flow");
}

#[test]
fn icmp_errors_to_tunnel_services_are_encapsulated_whole() {
    let mut lab = Lab::new();
    for v6 in [false, true] {
        let (f, err) = if v6 {
            let f = v6f(42000, 80, PROTO_TCP, TUN6);
            let e = error_v6(2, 0, &reply_packet(&f), 48, TUN6);
            (f, e)
        } else {
            let f = v4f(42000, 80, PROTO_TCP, TUN4);
            let e = error_v4(3, 4, &reply_packet(&f), 28, TUN4);
            (f, e)
        };
        let what = format!("ICMP error about an ipip flow (v6: {v6})");
        let b = lab.predict(if v6 { "tun6" } else { "tun" }, &f);
        let before = lab.global();
        let (rc, out) = lab.run(&err);
        assert_eq!(rc, XDP_TX, "{what}: verdict");
        assert_eq!(out[0..6], lab.mac(b), "{what}: next hop MAC");
        let outer = if v6 { 40 } else { 20 };
        assert_eq!(out.len(), err.len() + outer, "{what}: one outer header added");
        assert_eq!(out[14 + outer..], err[14..], "{what}: the ICMP packet is the inner packet, unchanged");
        if v6 {
            assert_eq!((out[14 + 6], &out[14 + 24..14 + 40]), (41, &addr16(lab.plan.backend(b).unwrap().address)[..]));
        } else {
            assert_eq!((out[14 + 9], &out[14 + 16..14 + 20]), (4, &addr16(lab.plan.backend(b).unwrap().address)[12..]));
        }
        lab.expect_delta(&before, &[(FORWARDED, 1), (CONN_MISS, 1), (ICMP_FORWARDED, 1), (ENCAP_IPIP, 1)], &what);
    }
}

#[test]
fn other_icmp_passes_and_is_counted() {
    let mut lab = Lab::new();
    let f = v4f(43000, 80, PROTO_TCP, VIP4);
    let reply = reply_packet(&f);
    // Embedded source is not the VIP (someone else's packet).
    let mut other = reply.clone();
    other[12..16].copy_from_slice(&[198, 18, 1, 99]);
    lab.left(&error_v4(3, 1, &other, 28, VIP4), XDP_PASS, PASS_ICMP, "embedded source not the VIP");
    // Embedded ICMP (an error about an echo reply).
    let echo = ipv4(VIP4, C4, PROTO_ICMP, &[0, 0, 0, 0, 0, 1, 0, 1, 1, 2, 3, 4]);
    lab.left(&error_v4(3, 1, &echo, 28, VIP4), XDP_PASS, PASS_ICMP, "embedded ICMP");
    // Types that are not followed: redirect, parameter problem, echo reply.
    for ty in [5u8, 12, 0] {
        lab.left(&error_v4(ty, 0, &reply, 28, VIP4), XDP_PASS, PASS_ICMP, &format!("ICMP type {ty}"));
    }
    let r6 = reply_packet(&v6f(43000, 80, PROTO_TCP, VIP6));
    for ty in [4u8, 129, 135] {
        lab.left(&error_v6(ty, 0, &r6, 48, VIP6), XDP_PASS, PASS_ICMP, &format!("ICMPv6 type {ty}"));
    }
    // The embedded flow's port has no service: not ours.
    let f = v4f(43000, 81, PROTO_TCP, VIP4);
    lab.left(&error_v4(3, 4, &reply_packet(&f), 28, VIP4), XDP_PASS, PASS_NO_SERVICE, "port without a service");
    // Too short for the embedded header and 8 bytes.
    lab.left(&error_v4(3, 4, &reply, 27, VIP4), XDP_PASS, PASS_ICMP_SHORT, "quote of 27 bytes");
    lab.left(&error_v4(11, 0, &reply, 20, VIP4), XDP_PASS, PASS_ICMP_SHORT, "quote of the header alone");
    lab.left(&error_v6(2, 0, &r6, 47, VIP6), XDP_PASS, PASS_ICMP_SHORT, "ICMPv6 quote of 47 bytes");
    lab.left(&error_v6(1, 0, &r6, 40, VIP6), XDP_PASS, PASS_ICMP_SHORT, "ICMPv6 quote of the header alone");
}

#[test]
fn icmp_forwarding_can_be_switched_off() {
    let mut lab = Lab::with("forward_icmp: false\n");
    let f = v4f(44000, 80, PROTO_TCP, VIP4);
    lab.left(&error_v4(3, 4, &reply_packet(&f), 28, VIP4), XDP_PASS, PASS_ICMP, "frag-needed, forwarding off");
    let f = v6f(44000, 80, PROTO_TCP, VIP6);
    lab.left(&error_v6(2, 0, &reply_packet(&f), 48, VIP6), XDP_PASS, PASS_ICMP, "too-big, forwarding off");
}

#[test]
fn echo_requests_to_a_vip_are_answered() {
    let mut lab = Lab::new();
    for (src, dst) in [(IpAddr::V4(C4), IpAddr::V4(VIP4)), (IpAddr::V6(C6), IpAddr::V6(VIP6))] {
        let req = icmp_echo(src, dst);
        let mut req = req.clone();
        // A valid checksum on the request (the builder leaves it zero).
        let l4 = if dst.is_ipv4() { 34 } else { 54 };
        let c = match (src, dst) {
            (IpAddr::V6(s), IpAddr::V6(d)) => icmp6_checksum(s, d, &req[l4..]),
            _ => fold(sum16(0, &req[l4..])),
        };
        req[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
        let before = lab.global();
        let (rc, out) = lab.run(&req);
        assert_eq!(rc, XDP_TX, "echo to {dst}: verdict");
        lab.expect_delta(&before, &[(ICMP_ECHO_REPLY, 1)], "echo");
        assert_eq!((&out[0..6], &out[6..12]), (&req[6..12], &req[0..6]), "MACs swapped");
        let (s, d) = if dst.is_ipv4() { (26, 30) } else { (22, 38) };
        let n = if dst.is_ipv4() { 4 } else { 16 };
        assert_eq!((&out[s..s + n], &out[d..d + n]), (&req[d..d + n], &req[s..s + n]), "addresses swapped");
        assert_eq!(out[l4], if dst.is_ipv4() { 0 } else { 129 }, "echo reply type");
        assert_eq!(out[l4 + 4..], req[l4 + 4..], "identifier, sequence and data kept");
        match (src, dst) {
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                assert_eq!(icmp6_checksum(d, s, &out[l4..]), 0, "ICMPv6 checksum");
            }
            _ => {
                assert_eq!(fold(sum16(0, &out[l4..])), 0, "ICMP checksum");
                assert_eq!(ipv4_checksum(&out[14..34]), 0, "IPv4 header checksum");
            }
        }
    }
    // Switched off: passed to the stack.
    let mut lab = Lab::with("answer_ping: false\n");
    lab.left(&icmp_echo(IpAddr::V4(C4), IpAddr::V4(VIP4)), XDP_PASS, PASS_ICMP, "echo, answer_ping off");
    lab.left(&icmp_echo(IpAddr::V6(C6), IpAddr::V6(VIP6)), XDP_PASS, PASS_ICMP, "ICMPv6 echo, answer_ping off");
}

/// The IPv4 fragments of `flow`'s datagram with `len` bytes of UDP payload, cut
/// at `mtu`: `(offset in 8-byte units, more fragments, frame)`.
fn fragments_v4(flow: &Flow, id: u16, len: usize, mtu: usize) -> Vec<Vec<u8>> {
    let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
    let l4 = flow.l4(&payload);
    let (IpAddr::V4(s), IpAddr::V4(d)) = (flow.src, flow.dst) else { panic!("v4 flow") };
    let step = (mtu - 20) / 8 * 8;
    let mut out = Vec::new();
    for (i, chunk) in l4.chunks(step).enumerate() {
        let mut ip = ipv4(s, d, flow.proto, chunk);
        let more = (i + 1) * step < l4.len();
        let off = (i * step / 8) as u16 | if more { 0x2000 } else { 0 };
        ip[4..6].copy_from_slice(&id.to_be_bytes());
        ip[6..8].copy_from_slice(&off.to_be_bytes());
        let mut f = ethernet(None, ETH_P_IP, &ip);
        fix_ipv4_checksum(&mut f, 14);
        out.push(f);
    }
    out
}

/// As `fragments_v4`, IPv6 (a Fragment header right after the fixed header).
fn fragments_v6(flow: &Flow, id: u32, len: usize, mtu: usize) -> Vec<Vec<u8>> {
    let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
    let l4 = flow.l4(&payload);
    let (IpAddr::V6(s), IpAddr::V6(d)) = (flow.src, flow.dst) else { panic!("v6 flow") };
    let step = (mtu - 48) / 8 * 8;
    let mut out = Vec::new();
    for (i, chunk) in l4.chunks(step).enumerate() {
        let more = (i + 1) * step < l4.len();
        let off = ((i * step) as u16) | u16::from(more);
        let mut fh = vec![flow.proto, 0];
        fh.extend_from_slice(&off.to_be_bytes());
        fh.extend_from_slice(&id.to_be_bytes());
        fh.extend_from_slice(chunk);
        out.push(ethernet(None, ETH_P_IPV6, &ipv6(s, d, PROTO_IPV6_FRAG, &fh)));
    }
    out
}

#[test]
fn fragments_follow_their_first_fragment() {
    let mut lab = Lab::new();
    for v6 in [false, true] {
        let svc = if v6 { "dns6" } else { "dns" };
        let flow = |sport| if v6 { v6f(sport, 53, PROTO_UDP, VIP6) } else { v4f(sport, 53, PROTO_UDP, VIP4) };
        let frags = |f: &Flow, id: u16| {
            if v6 { fragments_v6(f, u32::from(id) << 8, 4000, 1500) } else { fragments_v4(f, id, 4000, 1500) }
        };
        // In order: the first is scheduled, the rest follow it.
        let f = flow(45000);
        let b = lab.predict(svc, &f);
        let fr = frags(&f, 1);
        assert_eq!(fr.len(), 3, "a 4,000-byte datagram in three fragments");
        lab.dr(&fr[0], b, &[CONN_MISS, FRAG_FIRST], &format!("v6 {v6}: first fragment"));
        for (i, x) in fr[1..].iter().enumerate() {
            lab.dr(x, b, &[FRAG_FOLLOWED], &format!("v6 {v6}: fragment {}", i + 1));
        }
        // Duplicated: every fragment again, same backend.
        for (i, x) in fr.iter().enumerate() {
            lab.dr(x, b, &[FRAG_FOLLOWED], &format!("v6 {v6}: duplicate of fragment {i}"));
        }
        // Out of order: a later fragment before its first is dropped, counted.
        let f2 = flow(45001);
        let b2 = lab.predict(svc, &f2);
        let fr2 = frags(&f2, 2);
        lab.left(&fr2[1], XDP_DROP, DROP_FRAG_UNKNOWN, &format!("v6 {v6}: later fragment first"));
        lab.dr(&fr2[0], b2, &[CONN_MISS, FRAG_FIRST], &format!("v6 {v6}: then the first"));
        lab.dr(&fr2[2], b2, &[FRAG_FOLLOWED], &format!("v6 {v6}: then the last"));
        // Overlapping: another "first" fragment of datagram 1 with other ports
        // (chosen so Maglev would pick another backend) still goes to datagram
        // 1's backend: one datagram never reaches two backends.
        let other = (46000u16..47000).map(flow).find(|g| lab.predict(svc, g) != b).expect("a flow on another backend");
        let overlap = &frags(&other, 1)[0];
        lab.dr(overlap, b, &[FRAG_FOLLOWED], &format!("v6 {v6}: overlapping first fragment"));
        // The same ports with another id: a new datagram, scheduled by its ports.
        let b3 = lab.predict(svc, &other);
        lab.dr(&frags(&other, 3)[0], b3, &[CONN_MISS, FRAG_FIRST], &format!("v6 {v6}: another datagram"));
    }
}

#[test]
fn many_datagrams_spread_like_flows() {
    let mut lab = Lab::new();
    let mut seen = BTreeMap::new();
    for i in 0..200u16 {
        let f = v4f(20000 + i, 53, PROTO_UDP, VIP4);
        let b = lab.predict("dns", &f);
        for (n, x) in fragments_v4(&f, 1000 + i, 20000, 1500).iter().enumerate() {
            let (rc, out) = lab.run(x);
            assert_eq!(rc, XDP_TX, "datagram {i} fragment {n}");
            assert_eq!(out[0..6], lab.mac(b), "datagram {i} fragment {n}: its flow's backend");
        }
        *seen.entry(b).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "datagrams of 200 flows reach all three backends: {seen:?}");
}

/// Sets the data plane's clock (`CT_CLOCK`, seconds) as the agent publishes it.
fn set_clock(lab: &mut Lab, seconds: u32) {
    let map = lab.dp.ebpf_mut().map_mut(lb_common::map_names::CT_CLOCK).expect("CT_CLOCK");
    let mut clock: aya::maps::Array<_, u32> = aya::maps::Array::try_from(map).expect("CT_CLOCK is an array");
    clock.set(0, seconds, 0).expect("write CT_CLOCK");
}

#[test]
fn fragment_entries_expire_after_the_timeout() {
    let mut lab = Lab::with("fragments: { size: 1024, timeout: 3s }\n");
    set_clock(&mut lab, 1000);
    let f = v4f(48000, 53, PROTO_UDP, VIP4);
    let b = lab.predict("dns", &f);
    let fr = fragments_v4(&f, 77, 4000, 1500);
    lab.dr(&fr[0], b, &[CONN_MISS, FRAG_FIRST], "first fragment at t=1000");
    set_clock(&mut lab, 1003);
    lab.dr(&fr[1], b, &[FRAG_FOLLOWED], "later fragment at t=1003 (within 3 s)");
    set_clock(&mut lab, 1004);
    lab.left(&fr[2], XDP_DROP, DROP_FRAG_UNKNOWN, "later fragment at t=1004 (expired)");
    // A first fragment with the same id after the timeout is a new datagram:
    // scheduled again (its flow is in the table by now) and remembered afresh.
    lab.dr(&fr[0], b, &[CONN_HIT, CT_PROMOTED, FRAG_FIRST], "first fragment again at t=1004");
    lab.dr(&fr[2], b, &[FRAG_FOLLOWED], "later fragment after it");
}
