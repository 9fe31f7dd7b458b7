//! ICMP errors about `forwarding: fullnat` flows at packet level
//! (BPF_PROG_TEST_RUN through `lb_xdp`, which tail-calls `lb_rare` then `lb_nat`,
//! or `lb_nat_reply`):
//!
//! - an error sent to the VIP about a reply (a router on the client's side,
//!   quoting VIP:vport -> client:cport) leaves for the flow's backend from the
//!   flow's SNAT address, quoting what the backend sent (backend:bport ->
//!   snat:sport);
//! - an error about a packet sent to a backend (from a router on the backend's
//!   side, or the backend itself, addressed to the SNAT address, quoting
//!   snat:sport -> backend:bport) leaves for the client from the VIP, quoting
//!   client:cport -> VIP:vport.
//!
//! Every checksum of the result is recomputed from scratch (`natpacket::check`),
//! both families, both directions, TCP and UDP, whole and 8-byte quotes.
//!
//! Needs root: `cargo test -p lb-tests --test packet_fullnat_icmp -- --test-threads=1`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::stat;
use lb_tests::{
    frames::{ethernet, CLIENT_MAC, ETH_P_IP, ETH_P_IPV6},
    natpacket::{check, error, mac_of, packet, Lab, Want, XDP_DROP, XDP_PASS, XDP_TX},
};

const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 7);
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
const BACKEND4: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 11);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 0x11);
const SNAT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const SNAT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// A router on the clients' side, and one between the balancer and the backend.
const ROUTER_C4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const ROUTER_C6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 1);
const ROUTER_B4: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 1);
const ROUTER_B6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 1);
const BACKEND_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x11];

/// TCP 80 to backends on 8080; UDP 53 to the service's port.
const SERVICES: &str = "snat_addresses: [198.18.0.2, \"2001:db8::2\"]
snat_ports: 20000-29999
services:
  - { name: tcp4, vip: 198.18.1.10, port: 80, forwarding: fullnat, backends: [{ address: 198.18.5.11, port: 8080 }] }
  - { name: udp4, vip: 198.18.1.10, port: 53, protocol: udp, forwarding: fullnat, backends: [{ address: 198.18.5.11 }] }
  - { name: tcp6, vip: \"2001:db8:1::10\", port: 80, forwarding: fullnat, backends: [{ address: \"2001:db8:5::11\", port: 8080 }] }
  - { name: udp6, vip: \"2001:db8:1::10\", port: 53, protocol: udp, forwarding: fullnat, backends: [{ address: \"2001:db8:5::11\" }] }
";

/// A `nat` service too (on port 81): `lb_nat_reply` then looks `NAT_REVERSE`
/// up before `FULLNAT_REVERSE`.
const NAT_TOO: &str = "  - { name: nat4, vip: 198.18.1.10, port: 81, forwarding: nat, backends: [{ address: 198.18.5.11 }] }\n";

fn fullnat_lab(globals: &str, more: &str) -> Lab {
    Lab::with(&format!("{globals}{SERVICES}{more}"), "packet_fullnat_icmp.rs")
}

/// Sends the flow's first packet; returns the SNAT port it was given (the
/// forwarded frame's source port).
fn open(lab: &mut Lab, client: IpAddr, vip: IpAddr, proto: u8, cport: u16, vport: u16) -> u16 {
    let mut f = ethernet(None, if client.is_ipv4() { ETH_P_IP } else { ETH_P_IPV6 }, &packet(client, vip, proto, cport, vport, 20));
    f[6..12].copy_from_slice(&CLIENT_MAC);
    let (rc, out) = lab.run(&f);
    assert_eq!(rc, XDP_TX, "the flow's first packet");
    let l4 = 14 + if client.is_ipv4() { 20 } else { 40 };
    u16::from_be_bytes([out[l4], out[l4 + 1]])
}

/// Cases: (client, vip, backend, snat, client-side router, backend-side router).
fn families() -> [(IpAddr, IpAddr, IpAddr, IpAddr, IpAddr, IpAddr); 2] {
    [
        (CLIENT4.into(), VIP4.into(), BACKEND4.into(), SNAT4.into(), ROUTER_C4.into(), ROUTER_B4.into()),
        (CLIENT6.into(), VIP6.into(), BACKEND6.into(), SNAT6.into(), ROUTER_C6.into(), ROUTER_B6.into()),
    ]
}

fn to_backend(lab: &mut Lab, cport0: u16) {
    let mut cport = cport0;
    for (client, vip, backend, snat, router, _) in families() {
        for (proto, vport, bport) in [(6u8, 80u16, 8080u16), (17, 53, 53)] {
            for quote in [usize::MAX, 8] {
                cport += 1;
                let sport = open(lab, client, vip, proto, cport, vport);
                let reply = packet(vip, client, proto, vport, cport, 300);
                let hl = if client.is_ipv4() { 20 } else { 40 };
                let q = if quote == 8 { hl + 8 } else { reply.len() };
                let f = error(router, vip, &reply, q, false, CLIENT_MAC);
                let what = format!("{router} -> {vip} about {vip}:{vport} -> {client}:{cport} proto {proto}, {q} bytes quoted");
                let (rc, out) = lab.run_counted(&f, &[stat::FORWARDED, stat::CONN_HIT, stat::ICMP_FORWARDED], &what);
                assert_eq!(rc, XDP_TX, "{what}: sent on");
                let w = Want { mac: mac_of(backend), src: snat, dst: backend, inner_src: backend, inner_dst: snat, sport: bport, dport: sport, full: reply.clone() };
                check(&out, &f, &w, &what);
            }
        }
    }
}

fn to_client(lab: &mut Lab, cport0: u16) {
    let mut cport = cport0;
    for (client, vip, backend, snat, _, router) in families() {
        for (proto, vport, bport) in [(6u8, 80u16, 8080u16), (17, 53, 53)] {
            // From a router on the way to the backend ("too big"), or from the
            // backend itself ("port unreachable"); quoted whole or 8 bytes.
            for (from, unreachable, quote) in [(router, false, usize::MAX), (router, false, 8), (backend, true, usize::MAX)] {
                cport += 1;
                let sport = open(lab, client, vip, proto, cport, vport);
                let sent = packet(snat, backend, proto, sport, bport, 99);
                let hl = if client.is_ipv4() { 20 } else { 40 };
                let q = if quote == 8 { hl + 8 } else { sent.len() };
                let f = error(from, snat, &sent, q, unreachable, BACKEND_MAC);
                let what = format!("{from} -> {snat} about {snat}:{sport} -> {backend}:{bport} proto {proto}, {q} bytes quoted");
                let (rc, out) = lab.run_counted(&f, &[stat::NAT_ICMP_REPLY], &what);
                assert_eq!(rc, XDP_TX, "{what}: sent on");
                // From the VIP, whoever sent it: the backends' side stays hidden.
                let w = Want { mac: CLIENT_MAC, src: vip, dst: client, inner_src: client, inner_dst: vip, sport: cport, dport: vport, full: sent.clone() };
                check(&out, &f, &w, &what);
            }
        }
    }
}

#[test]
fn an_error_about_a_reply_reaches_the_backend_from_the_snat_address() {
    to_backend(&mut fullnat_lab("", ""), 41000);
}

#[test]
fn an_error_about_a_packet_to_the_backend_reaches_the_client_from_the_vip() {
    to_client(&mut fullnat_lab("", ""), 42000);
}

/// With a `nat` service as well, `lb_nat_reply` tries `NAT_REVERSE` first and
/// the error still finds its `fullnat` flow.
#[test]
fn both_ways_with_a_nat_service_too() {
    let mut lab = fullnat_lab("", NAT_TOO);
    to_backend(&mut lab, 43000);
    to_client(&mut lab, 44000);
}

#[test]
fn errors_about_no_flow_or_switched_off_pass_and_ttl_one_drops() {
    let mut lab = fullnat_lab("", "");
    let (c4, v4, b4, s4) = (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), IpAddr::V4(BACKEND4), IpAddr::V4(SNAT4));
    // About a packet from a SNAT port no flow holds: not ours, passed untouched.
    let sent = packet(s4, b4, 6, 29999, 8080, 10);
    let f = error(ROUTER_B4.into(), s4, &sent, sent.len(), false, BACKEND_MAC);
    let (rc, out) = lab.run_counted(&f, &[stat::PASS_NOT_VIP], "no such flow");
    assert_eq!((rc, &out[..]), (XDP_PASS, &f[..]), "no such flow: passed untouched");
    // With the flow, but TTL 1: dropped, both ways.
    let sport = open(&mut lab, c4, v4, 6, 45000, 80);
    let sent = packet(s4, b4, 6, sport, 8080, 10);
    let mut f = error(ROUTER_B4.into(), s4, &sent, sent.len(), false, BACKEND_MAC);
    f[22] = 1;
    lb_tests::frames::fix_ipv4_checksum(&mut f, 14);
    assert_eq!(lab.run_counted(&f, &[stat::DROP_NAT_TTL], "TTL 1, to the client").0, XDP_DROP);
    let reply = packet(v4, c4, 6, 80, 45000, 10);
    let mut g = error(ROUTER_C4.into(), v4, &reply, reply.len(), false, CLIENT_MAC);
    g[22] = 1;
    lb_tests::frames::fix_ipv4_checksum(&mut g, 14);
    assert_eq!(lab.run_counted(&g, &[stat::CONN_HIT, stat::DROP_NAT_TTL], "TTL 1, to the backend").0, XDP_DROP);
    // `forward_icmp: false`: neither direction is translated.
    let mut off = fullnat_lab("forward_icmp: false\n", "");
    let sport = open(&mut off, c4, v4, 6, 45000, 80);
    let sent = packet(s4, b4, 6, sport, 8080, 10);
    let f = error(ROUTER_B4.into(), s4, &sent, sent.len(), false, BACKEND_MAC);
    let (rc, out) = off.run_counted(&f, &[stat::PASS_NOT_VIP], "switched off, to the client");
    assert_eq!((rc, &out[..]), (XDP_PASS, &f[..]));
    let g = error(ROUTER_C4.into(), v4, &reply, reply.len(), false, CLIENT_MAC);
    let (rc, out) = off.run_counted(&g, &[stat::PASS_ICMP], "switched off, to the backend");
    assert_eq!((rc, &out[..]), (XDP_PASS, &g[..]));
}
