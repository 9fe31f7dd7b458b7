//! The lean path of `lb_nat` (lb-ebpf `forward/nat_est.rs`) at packet level
//! (BPF_PROG_TEST_RUN through `lb_xdp`): an established `nat` or `fullnat`
//! flow's packet is translated there, from the header offsets alone, while the
//! flow's first packets take the full path (scheduling, the reverse entry,
//! `fullnat`'s SNAT slot noted in `CT_ESTABLISHED`). The same frame sent four
//! times must leave four times byte for byte the same, every checksum valid
//! (recomputed from scratch), for IPv4 and IPv6, TCP and UDP, tagged or not,
//! odd and even payloads; TTL 1 and an IPv4 UDP checksum of 0 behave there as
//! on the full path; the counters move as the full path moves them.
//!
//! Needs root: `cargo test -p lb-tests --test packet_nat_est -- --test-threads=1`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::stat;
use lb_tests::{
    frames::{ethernet, fix_ipv4_checksum, ipv4_checksum, Vlan, CLIENT_MAC, ETH_P_IP, ETH_P_IPV6, LB_MAC, Q_TAG},
    natpacket::{ip_bytes, l4_checksum, mac_of, packet, Lab, XDP_DROP, XDP_TX},
};

const YAML: &str = "snat_addresses: [198.18.0.2, \"2001:db8::2\"]
snat_ports: 20000-29999
services:
  - { name: nat4, vip: 198.18.1.10, port: 80, forwarding: nat, backends: [{ address: 198.18.5.11, port: 8080 }] }
  - { name: nat6, vip: \"2001:db8:1::10\", port: 80, forwarding: nat, backends: [{ address: \"2001:db8:5::11\", port: 8080 }] }
  - { name: natu4, vip: 198.18.1.10, port: 53, protocol: udp, forwarding: nat, backends: [{ address: 198.18.5.11 }] }
  - { name: natu6, vip: \"2001:db8:1::10\", port: 53, protocol: udp, forwarding: nat, backends: [{ address: \"2001:db8:5::11\" }] }
  - { name: fnat4, vip: 198.18.1.10, port: 81, forwarding: fullnat, backends: [{ address: 198.18.5.12, port: 8081 }] }
  - { name: fnat6, vip: \"2001:db8:1::10\", port: 81, forwarding: fullnat, backends: [{ address: \"2001:db8:5::12\", port: 8081 }] }
  - { name: fnatu4, vip: 198.18.1.10, port: 54, protocol: udp, forwarding: fullnat, backends: [{ address: 198.18.5.12 }] }
  - { name: fnatu6, vip: \"2001:db8:1::10\", port: 54, protocol: udp, forwarding: fullnat, backends: [{ address: \"2001:db8:5::12\" }] }
";

const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 7);

fn lab() -> Lab {
    Lab::with(YAML, "packet_nat_est.rs")
}

/// A frame from the client (`CLIENT_MAC`), optionally 802.1Q-tagged.
fn frame(tag: Option<Vlan>, client: IpAddr, vip: IpAddr, proto: u8, cport: u16, vport: u16, payload: usize) -> Vec<u8> {
    let ethertype = if client.is_ipv4() { ETH_P_IP } else { ETH_P_IPV6 };
    let mut f = ethernet(tag, ethertype, &packet(client, vip, proto, cport, vport, payload));
    f[6..12].copy_from_slice(&CLIENT_MAC);
    f
}

/// Where a frame's addresses and ports are, and what the expected translation is.
struct Want {
    mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    dport: u16,
    /// `fullnat`: the source port is the SNAT port (not known in advance).
    keep_sport: bool,
}

/// Checks `out` is `input` translated as `w` says, every checksum recomputed
/// and every byte not meant to change kept; returns the source port.
fn check(out: &[u8], input: &[u8], w: &Want, what: &str) -> u16 {
    assert_eq!(out.len(), input.len(), "{what}: length kept");
    assert_eq!((&out[0..6], &out[6..12]), (&w.mac[..], &LB_MAC[..]), "{what}: MACs");
    let l3 = if out[12..14] == [0x81, 0x00] { 18 } else { 14 };
    assert_eq!(&out[12..l3], &input[12..l3], "{what}: ethertype and tag kept");
    let (o, i) = (&out[l3..], &input[l3..]);
    let v4 = w.src.is_ipv4();
    let (hl, addrs, alen) = if v4 { (20, 12, 4) } else { (40, 8, 16) };
    if v4 {
        assert_eq!(ipv4_checksum(&o[..20]), 0, "{what}: IPv4 header checksum");
        assert_eq!(o[8], i[8] - 1, "{what}: TTL decremented");
        assert_eq!((&o[..8], o[9]), (&i[..8], i[9]), "{what}: rest of the IPv4 header");
    } else {
        assert_eq!(o[7], i[7] - 1, "{what}: hop limit decremented");
        assert_eq!(&o[..7], &i[..7], "{what}: rest of the IPv6 header");
    }
    assert_eq!(&o[addrs..addrs + alen], &ip_bytes(w.src)[..], "{what}: source address");
    assert_eq!(&o[addrs + alen..addrs + 2 * alen], &ip_bytes(w.dst)[..], "{what}: destination address");
    let proto = if v4 { o[9] } else { o[6] };
    let seg = &o[hl..];
    let sport = u16::from_be_bytes([seg[0], seg[1]]);
    if w.keep_sport {
        assert_eq!(&seg[0..2], &i[hl..hl + 2], "{what}: source port kept");
    }
    assert_eq!(u16::from_be_bytes([seg[2], seg[3]]), w.dport, "{what}: destination port");
    let at = if proto == 6 { 16 } else { 6 };
    if !(v4 && proto == 17 && i[hl + 6..hl + 8] == [0, 0]) {
        let got = u16::from_be_bytes([seg[at], seg[at + 1]]);
        assert_eq!(got, l4_checksum(w.src, w.dst, proto, seg), "{what}: L4 checksum (recomputed)");
    }
    assert_eq!(&seg[at + 2..], &i[hl + at + 2..], "{what}: rest of the L4 header and the payload kept");
    sport
}

/// Sends `f` four times (new flow, promotion, `fullnat`'s slot noted, then the
/// lean path twice): every output is the first's, which `w` checks. The last
/// packet's counters: a connection-table hit, forwarded by the mode.
fn four_times(lab: &mut Lab, f: &[u8], w: &Want, mode_counter: u32, what: &str) {
    let (rc, first) = lab.run(f);
    assert_eq!(rc, XDP_TX, "{what}: the first packet forwarded");
    let sport = check(&first, f, w, what);
    if !w.keep_sport {
        assert!((20000..=29999).contains(&sport), "{what}: a SNAT port of the pool, not {sport}");
    }
    for n in 2..4 {
        let (rc, out) = lab.run(f);
        assert_eq!((rc, out), (XDP_TX, first.clone()), "{what}: packet {n} leaves as the first did");
    }
    let mut want = [stat::FORWARDED, stat::CONN_HIT, mode_counter];
    want.sort();
    let (rc, out) = lab.run_counted(f, &want, what);
    assert_eq!((rc, out), (XDP_TX, first), "{what}: packet 4 leaves as the first did");
}

#[test]
fn established_packets_leave_byte_for_byte_as_the_first_one() {
    let mut lab = lab();
    let (c4, c6) = (IpAddr::V4(CLIENT4), IpAddr::V6(CLIENT6));
    let vip = |v6: bool| -> IpAddr { if v6 { "2001:db8:1::10".parse().unwrap() } else { "198.18.1.10".parse().unwrap() } };
    let addr = |v6: bool, last: u8| -> IpAddr {
        // 2001:db8:5::11 and 198.18.5.11 (hex and decimal digits alike).
        if v6 { IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, u16::from(last / 10 * 16 + last % 10))) } else { IpAddr::V4(Ipv4Addr::new(198, 18, 5, last)) }
    };
    let snat = |v6: bool| -> IpAddr { if v6 { "2001:db8::2".parse().unwrap() } else { "198.18.0.2".parse().unwrap() } };
    let mut cport = 40000;
    for tag in [None, Some(Q_TAG)] {
        for (client, v6) in [(c4, false), (c6, true)] {
            // (proto, vip port, backend port, fullnat, payloads)
            for (proto, vport, bport, full) in [(6, 80, 8080, false), (17, 53, 53, false), (6, 81, 8081, true), (17, 54, 54, true)] {
                for payload in [0, 1, 33, 100] {
                    cport += 1;
                    let backend = addr(v6, if full { 12 } else { 11 });
                    let w = Want {
                        mac: mac_of(backend),
                        src: if full { snat(v6) } else { client },
                        dst: backend,
                        dport: bport,
                        keep_sport: !full,
                    };
                    let what = format!(
                        "{} {client}:{cport} -> {}:{vport} proto {proto}, {payload} bytes{}",
                        if full { "fullnat" } else { "nat" },
                        vip(v6),
                        if tag.is_some() { ", tagged" } else { "" }
                    );
                    let f = frame(tag, client, vip(v6), proto, cport, vport, payload);
                    four_times(&mut lab, &f, &w, if full { stat::FULLNAT_FORWARDED } else { stat::NAT_FORWARDED }, &what);
                }
            }
        }
    }
    assert_eq!(lab.counters()[stat::DROP_SNAT_EXHAUSTED as usize], 0);
}

#[test]
fn an_ipv4_udp_checksum_of_zero_stays_zero_on_established_packets() {
    let mut lab = lab();
    let (client, vip) = (IpAddr::V4(CLIENT4), IpAddr::V4(Ipv4Addr::new(198, 18, 1, 10)));
    for (vport, full) in [(53, false), (54, true)] {
        for payload in [10, 11] {
            let mut f = frame(None, client, vip, 17, 41000 + payload as u16, vport, payload);
            f[40..42].fill(0);
            let backend = IpAddr::V4(Ipv4Addr::new(198, 18, 5, if full { 12 } else { 11 }));
            let w = Want {
                mac: mac_of(backend),
                src: if full { IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)) } else { client },
                dst: backend,
                dport: vport,
                keep_sport: !full,
            };
            let what = format!("{} UDP without checksum, {payload} bytes", if full { "fullnat" } else { "nat" });
            four_times(&mut lab, &f, &w, if full { stat::FULLNAT_FORWARDED } else { stat::NAT_FORWARDED }, &what);
            let (_, out) = lab.run(&f);
            assert_eq!(&out[40..42], &[0, 0], "{what}: the checksum of 0 stays 0");
        }
    }
}

#[test]
fn ttl_one_on_an_established_flow_is_dropped_and_counted() {
    let mut lab = lab();
    for (client, vip) in [
        (IpAddr::V4(CLIENT4), IpAddr::V4(Ipv4Addr::new(198, 18, 1, 10))),
        (IpAddr::V6(CLIENT6), IpAddr::V6("2001:db8:1::10".parse().unwrap())),
    ] {
        for vport in [80, 81] {
            let f = frame(None, client, vip, 6, 42000, vport, 10);
            for n in 0..3 {
                assert_eq!(lab.run(&f).0, XDP_TX, "{client} -> port {vport}: packet {n} forwarded");
            }
            let mut low = f.clone();
            if client.is_ipv4() {
                low[22] = 1;
                fix_ipv4_checksum(&mut low, 14);
            } else {
                low[21] = 1;
            }
            let (rc, out) = lab.run_counted(&low, &[stat::CONN_HIT, stat::DROP_NAT_TTL], &format!("{client} -> port {vport}, TTL 1"));
            assert_eq!((rc, out), (XDP_DROP, low), "{client} -> port {vport}: TTL 1 dropped untouched");
            assert_eq!(lab.run(&f).0, XDP_TX, "{client} -> port {vport}: the flow goes on");
        }
    }
}
