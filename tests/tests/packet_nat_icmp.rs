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

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::stat;
use lb_tests::{
    frames::CLIENT_MAC,
    natpacket::{check, error, mac_of, open, packet, Lab, Want, XDP_DROP, XDP_PASS, XDP_TX},
};

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

/// TCP 80 to backends on 8080; UDP 53 to the service's port.
const SERVICES: &str = "services:
  - { name: tcp4, vip: 198.18.1.10, port: 80, forwarding: nat, backends: [{ address: 198.18.5.11, port: 8080 }] }
  - { name: udp4, vip: 198.18.1.10, port: 53, protocol: udp, forwarding: nat, backends: [{ address: 198.18.5.11 }] }
  - { name: tcp6, vip: \"2001:db8:1::10\", port: 80, forwarding: nat, backends: [{ address: \"2001:db8:5::11\", port: 8080 }] }
  - { name: udp6, vip: \"2001:db8:1::10\", port: 53, protocol: udp, forwarding: nat, backends: [{ address: \"2001:db8:5::11\" }] }
";

fn nat_lab(globals: &str) -> Lab {
    Lab::with(&format!("{globals}{SERVICES}"), "packet_nat_icmp.rs")
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
    let mut lab = nat_lab("");
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
    let mut lab = nat_lab("");
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
    let mut lab = nat_lab("");
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
    let mut off = nat_lab("forward_icmp: false\n");
    open(&mut off, c4, v4, 6, 43000, 80);
    let (rc, out) = off.run_counted(&f, &[stat::PASS_NOT_VIP], "switched off, to the client");
    assert_eq!((rc, &out[..]), (XDP_PASS, &f[..]));
    let g = error(ROUTER_C4.into(), v4, &reply, reply.len(), false, CLIENT_MAC);
    let (rc, out) = off.run_counted(&g, &[stat::PASS_ICMP], "switched off, to the backend");
    assert_eq!((rc, &out[..]), (XDP_PASS, &g[..]));
}

#[test]
fn a_tagged_error_keeps_its_tag() {
    let mut lab = nat_lab("");
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
    let mut lab = nat_lab("");
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
