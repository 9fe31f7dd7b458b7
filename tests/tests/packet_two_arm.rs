//! Two-arm forwarding at packet level (BPF_PROG_TEST_RUN): a backend on the
//! backend interface (`Backend::egress` = `EGRESS_BACKEND`) gets its frame by
//! XDP_REDIRECT through `EGRESS`, with that interface's MAC as the source; a
//! backend on the client interface still by XDP_TX; a missing `EGRESS` entry
//! drops the frame (`drop_no_egress`). The replies of `nat` and `fullnat` flows
//! whose backend is on the backend interface are redirected back to the client
//! interface (the one their client's frames came in on, recorded in the reverse
//! entry), to the client's next hop from that interface's MAC; those of a backend
//! on the client interface still leave by XDP_TX. The test run returns the
//! verdict without sending anything; the devmap entries name `lo`, which any
//! namespace has (and on which test runs arrive: the client interface's index
//! matches first).
//!
//! Needs root: `cargo test -p lb-tests --test packet_two_arm -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::{
    maps::{HashMap, Map, MapData},
    programs::{TestRun, TestRunOptions},
};
use lb_agent::{config, dataplane::Dataplane, plan::Plan};
use lb_common::{map_names, stat, FlowKey, NatReverse, EGRESS_BACKEND, EGRESS_CLIENT, EGRESS_SAME};
use lb_tests::frames::{addr16, Flow, CLIENT_MAC, ETH_HLEN, IPV4_HLEN, IPV6_HLEN};

const XDP_DROP: u32 = 1;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
const IFACE_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0xee];
const BACKEND_IFACE_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0xbb];
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 7);
/// `lo`'s index in every network namespace.
const LO: u32 = 1;

/// One backend per service, so the expected backend is known: DR on ports 80
/// (IPv4, backend interface), 81 (IPv6, backend interface) and 82 (IPv4, client
/// interface), IPIP on 83, GUE on 84 (both on the backend interface), and 85 a
/// DR backend whose egress has no `EGRESS` entry, and 86 a `nat` backend (port
/// 8086) on the backend interface, 87 one on the client interface; `fullnat` on
/// 88 (TCP, IPv4 to port 8088; UDP, IPv6), on the backend interface, and 89 on
/// the client interface.
const YAML: &str = "snat_addresses: [198.18.20.2, \"2001:db8:20::2\"]
services:
  - { name: dr4, vip: 198.18.1.10, port: 80, backends: [{ address: 198.18.5.11 }] }
  - { name: dr6, vip: \"2001:db8:1::10\", port: 81, backends: [{ address: \"2001:db8:5::11\" }] }
  - { name: near, vip: 198.18.1.10, port: 82, backends: [{ address: 198.18.0.11 }] }
  - { name: ipip4, vip: 198.18.1.10, port: 83, forwarding: ipip, backends: [{ address: 198.18.6.11 }] }
  - { name: gue6, vip: \"2001:db8:1::10\", port: 84, forwarding: gue, backends: [{ address: \"2001:db8:6::11\" }] }
  - { name: lost, vip: 198.18.1.10, port: 85, backends: [{ address: 198.18.7.11 }] }
  - { name: nat4, vip: 198.18.1.10, port: 86, forwarding: nat, backends: [{ address: 198.18.8.11, port: 8086 }] }
  - { name: nat_near, vip: 198.18.1.10, port: 87, forwarding: nat, backends: [{ address: 198.18.0.12 }] }
  - { name: fn4, vip: 198.18.1.10, port: 88, forwarding: fullnat, backends: [{ address: 198.18.9.11, port: 8088 }] }
  - { name: fn6, vip: \"2001:db8:1::10\", port: 88, protocol: udp, forwarding: fullnat, backends: [{ address: \"2001:db8:9::11\" }] }
  - { name: fn_near, vip: 198.18.1.10, port: 89, forwarding: fullnat, backends: [{ address: 198.18.0.13 }] }
";

/// An `EGRESS` index the agent never writes.
const UNSET_EGRESS: u8 = 5;

fn mac_of(a: IpAddr) -> [u8; 6] {
    let o = addr16(a);
    [0x02, 0xbe, o[12], o[13], o[14], o[15]]
}

fn egress_of(a: IpAddr) -> u8 {
    match a.to_string().as_str() {
        "198.18.0.11" | "198.18.0.12" | "198.18.0.13" => EGRESS_SAME,
        "198.18.7.11" => UNSET_EGRESS,
        _ => EGRESS_BACKEND,
    }
}

struct Lab {
    dp: Dataplane,
}

impl Lab {
    fn new() -> Lab {
        // SAFETY: geteuid has no preconditions.
        assert!(unsafe { libc::geteuid() } == 0, "the packet tests load XDP programs and need root");
        let cfg = config::parse(YAML, "packet_two_arm.rs").expect("test config");
        let macs: BTreeMap<IpAddr, [u8; 6]> = Plan::backend_addresses(&cfg).into_iter().map(|a| (a, mac_of(a))).collect();
        let plan = Plan::build(&cfg, &macs).set_egress(egress_of);
        let mut dp = Dataplane::load(&plan).expect("load the XDP object");
        dp.set_tunnel([198, 18, 20, 2], addr16("2001:db8:20::2".parse().unwrap()), 1500).expect("tunnel settings");
        dp.set_egress((LO, IFACE_MAC), Some((LO, BACKEND_IFACE_MAC))).expect("egress interfaces");
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

fn frame(dst: &str, dport: u16) -> Vec<u8> {
    let dst: IpAddr = dst.parse().unwrap();
    let src = if dst.is_ipv4() { IpAddr::V4(CLIENT4) } else { IpAddr::V6(CLIENT6) };
    Flow::tcp(src, dst, 40000, dport).frame(None, 16)
}

/// Asserts the frame left for `backend`'s MAC from `from`, its IP packet as it came.
fn assert_dr(what: &str, out: &[u8], input: &[u8], backend: &str, from: [u8; 6]) {
    assert_eq!(out[0..6], mac_of(backend.parse().unwrap()), "{what}: destination MAC");
    assert_eq!(out[6..12], from, "{what}: source MAC");
    assert_eq!(out[12..], input[12..], "{what}: the packet itself is not changed");
}

#[test]
fn backends_on_the_backend_interface_are_redirected_from_its_mac() {
    let mut lab = Lab::new();
    for (what, dst, port, backend) in
        [("DR IPv4", "198.18.1.10", 80, "198.18.5.11"), ("DR IPv6", "2001:db8:1::10", 81, "2001:db8:5::11")]
    {
        let input = frame(dst, port);
        let before = (lab.count(stat::FORWARDED), lab.count(stat::REDIRECTED));
        // Twice: the new flow (scheduled) and the established one (table hit).
        for round in ["new flow", "established"] {
            let (verdict, out) = lab.run(&input);
            assert_eq!(verdict, XDP_REDIRECT, "{what}, {round}: XDP_REDIRECT expected");
            assert_dr(&format!("{what}, {round}"), &out, &input, backend, BACKEND_IFACE_MAC);
        }
        let after = (lab.count(stat::FORWARDED), lab.count(stat::REDIRECTED));
        assert_eq!((after.0 - before.0, after.1 - before.1), (2, 2), "{what}: forwarded and redirected counted");
    }
    assert_eq!(lab.count(stat::DROP_NO_EGRESS), 0);
}

#[test]
fn backends_on_the_client_interface_stay_one_arm() {
    let mut lab = Lab::new();
    let input = frame("198.18.1.10", 82);
    let (verdict, out) = lab.run(&input);
    assert_eq!(verdict, XDP_TX, "a backend on the client interface: XDP_TX");
    assert_dr("one-arm DR", &out, &input, "198.18.0.11", IFACE_MAC);
    assert_eq!(lab.count(stat::REDIRECTED), 0, "nothing redirected");
}

#[test]
fn tunnelled_frames_leave_by_the_backend_interface() {
    let mut lab = Lab::new();
    // IPIP over IPv4.
    let input = frame("198.18.1.10", 83);
    let (verdict, out) = lab.run(&input);
    assert_eq!(verdict, XDP_REDIRECT, "ipip: XDP_REDIRECT expected");
    assert_eq!(out[0..6], mac_of("198.18.6.11".parse().unwrap()), "ipip: next hop's MAC");
    assert_eq!(out[6..12], BACKEND_IFACE_MAC, "ipip: the backend interface's MAC");
    assert_eq!(out.len(), input.len() + IPV4_HLEN, "ipip: one outer IPv4 header");
    assert_eq!(out[ETH_HLEN + 9], 4, "ipip: outer protocol 4");
    assert_eq!(out[ETH_HLEN + IPV4_HLEN..], input[ETH_HLEN..], "ipip: the client's packet inside");
    // GUE over IPv6.
    let input = frame("2001:db8:1::10", 84);
    let (verdict, out) = lab.run(&input);
    assert_eq!(verdict, XDP_REDIRECT, "gue: XDP_REDIRECT expected");
    assert_eq!(out[6..12], BACKEND_IFACE_MAC, "gue: the backend interface's MAC");
    assert_eq!(out.len(), input.len() + IPV6_HLEN + 8, "gue: outer IPv6 and UDP headers");
    assert_eq!(out[ETH_HLEN + 6], 17, "gue: outer next header UDP");
    assert_eq!(lab.count(stat::REDIRECTED), 2);
    assert_eq!(lab.count(stat::ENCAP_IPIP) + lab.count(stat::ENCAP_GUE), 2);
}

#[test]
fn a_missing_egress_entry_drops_and_counts() {
    let mut lab = Lab::new();
    let (verdict, _) = lab.run(&frame("198.18.1.10", 85));
    assert_eq!(verdict, XDP_DROP, "no EGRESS entry: dropped");
    assert_eq!(lab.count(stat::DROP_NO_EGRESS), 1, "drop_no_egress counted");
    assert_eq!(lab.count(stat::FORWARDED), 0, "not counted as forwarded");
}

#[test]
fn nat_frames_leave_by_the_backend_interface() {
    let mut lab = Lab::new();
    let input = frame("198.18.1.10", 86);
    let (verdict, out) = lab.run(&input);
    assert_eq!(verdict, XDP_REDIRECT, "nat: XDP_REDIRECT expected (lb_nat, tail-called)");
    assert_eq!(out[0..6], mac_of("198.18.8.11".parse().unwrap()), "nat: the backend's MAC");
    assert_eq!(out[6..12], BACKEND_IFACE_MAC, "nat: the backend interface's MAC");
    assert_eq!(out[ETH_HLEN + 16..ETH_HLEN + 20], [198, 18, 8, 11], "nat: destination rewritten");
    assert_eq!(u16::from_be_bytes([out[ETH_HLEN + IPV4_HLEN + 2], out[ETH_HLEN + IPV4_HLEN + 3]]), 8086, "nat: port rewritten");
    assert_eq!((lab.count(stat::NAT_FORWARDED), lab.count(stat::REDIRECTED)), (1, 1));
}

/// The source MAC of the backends' replies (their next hop's, the balancer's
/// backend side): never the one they leave with.
const REPLY_FROM: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x01];

/// A backend's reply of `flow` (backend to the client or the SNAT address).
fn reply_frame(flow: Flow) -> Vec<u8> {
    let mut f = flow.frame(None, 16);
    f[6..12].copy_from_slice(&REPLY_FROM);
    f
}

/// The reverse entry of a reply (`NAT_REVERSE` or `FULLNAT_REVERSE`).
fn reverse_entry(lab: &mut Lab, name: &'static str, reply: &Flow) -> NatReverse {
    let data = lab.dp.map_handle(name).expect("reverse map");
    let map = if name == map_names::NAT_REVERSE { Map::LruHashMap(data) } else { Map::HashMap(data) };
    let m: HashMap<MapData, FlowKey, NatReverse> = HashMap::try_from(map).expect("hash map");
    m.get(&reply.key(), 0).unwrap_or_else(|e| panic!("no {name} entry for {reply:?}: {e}"))
}

/// The addresses and ports of an IPv4 or IPv6 frame's packet.
fn ends(out: &[u8], v6: bool) -> (IpAddr, IpAddr, u16, u16) {
    let (src, dst, l4) = if v6 {
        let a = |at: usize| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&out[at..at + 16]).unwrap()));
        (a(ETH_HLEN + 8), a(ETH_HLEN + 24), ETH_HLEN + IPV6_HLEN)
    } else {
        let a = |at: usize| IpAddr::V4(Ipv4Addr::new(out[at], out[at + 1], out[at + 2], out[at + 3]));
        (a(ETH_HLEN + 12), a(ETH_HLEN + 16), ETH_HLEN + IPV4_HLEN)
    };
    let port = |at: usize| u16::from_be_bytes([out[at], out[at + 1]]);
    (src, dst, port(l4), port(l4 + 2))
}

/// Asserts a translated reply: to the client's next hop (`CLIENT_MAC`, the
/// source of its frames) from `from`, VIP:vport to client:cport.
fn assert_reply(what: &str, out: &[u8], from: [u8; 6], vip: IpAddr, vport: u16, client: IpAddr, cport: u16) {
    assert_eq!(out[0..6], CLIENT_MAC, "{what}: to the MAC the client's frames came from");
    assert_eq!(out[6..12], from, "{what}: source MAC");
    assert_eq!(ends(out, vip.is_ipv6()), (vip, client, vport, cport), "{what}: from the VIP to the client");
}

#[test]
fn nat_replies_on_the_backend_interface_go_back_to_the_client_interface() {
    let mut lab = Lab::new();
    let (vip, client, backend) = (IpAddr::V4(Ipv4Addr::new(198, 18, 1, 10)), IpAddr::V4(CLIENT4), "198.18.8.11".parse().unwrap());
    let (verdict, _) = lab.run(&frame("198.18.1.10", 86));
    assert_eq!(verdict, XDP_REDIRECT, "nat: the client's frame to the backend interface");
    let reply = Flow::tcp(backend, client, 8086, 40000);
    let entry = reverse_entry(&mut lab, map_names::NAT_REVERSE, &reply);
    assert_eq!(entry.egress, EGRESS_CLIENT, "the reverse entry names the client interface: {entry:?}");
    for round in ["first reply", "second reply"] {
        let (verdict, out) = lab.run(&reply_frame(reply));
        assert_eq!(verdict, XDP_REDIRECT, "nat, {round}: redirected to the client interface");
        assert_reply(&format!("nat, {round}"), &out, IFACE_MAC, vip, 86, client, 40000);
    }
    assert_eq!(lab.count(stat::NAT_REPLY), 2, "counted nat_reply");
    assert_eq!(lab.count(stat::REDIRECTED), 3, "the client's frame and both replies redirected");
    assert_eq!(lab.count(stat::DROP_NO_EGRESS), 0);
}

#[test]
fn fullnat_replies_on_the_backend_interface_go_back_to_the_client_interface() {
    let mut lab = Lab::new();
    for (what, vip, backend, bport, snat, v6) in [
        ("fullnat IPv4 TCP", "198.18.1.10", "198.18.9.11", 8088, "198.18.20.2", false),
        ("fullnat IPv6 UDP", "2001:db8:1::10", "2001:db8:9::11", 88, "2001:db8:20::2", true),
    ] {
        let (vip, backend, snat): (IpAddr, IpAddr, IpAddr) = (vip.parse().unwrap(), backend.parse().unwrap(), snat.parse().unwrap());
        let client = if v6 { IpAddr::V6(CLIENT6) } else { IpAddr::V4(CLIENT4) };
        let flow = if v6 { Flow::udp(client, vip, 40000, 88) } else { Flow::tcp(client, vip, 40000, 88) };
        let (verdict, out) = lab.run(&flow.frame(None, 16));
        assert_eq!(verdict, XDP_REDIRECT, "{what}: the client's frame to the backend interface");
        assert_eq!(out[6..12], BACKEND_IFACE_MAC, "{what}: from the backend interface's MAC");
        let (src, dst, sport, dport) = ends(&out, v6);
        assert_eq!((src, dst, dport), (snat, backend, bport), "{what}: from the SNAT address to the backend");
        let reply = if v6 { Flow::udp(backend, snat, bport, sport) } else { Flow::tcp(backend, snat, bport, sport) };
        let entry = reverse_entry(&mut lab, map_names::FULLNAT_REVERSE, &reply);
        assert_eq!(entry.egress, EGRESS_CLIENT, "{what}: the reverse entry names the client interface: {entry:?}");
        let (verdict, out) = lab.run(&reply_frame(reply));
        assert_eq!(verdict, XDP_REDIRECT, "{what}: the reply redirected to the client interface");
        assert_reply(&format!("{what}, reply"), &out, IFACE_MAC, vip, 88, client, 40000);
    }
    assert_eq!((lab.count(stat::FULLNAT_REPLY), lab.count(stat::REDIRECTED)), (2, 4), "two replies, four frames redirected");
    assert_eq!(lab.count(stat::DROP_NO_EGRESS), 0);
}

#[test]
fn nat_and_fullnat_replies_of_client_interface_backends_stay_one_arm() {
    let mut lab = Lab::new();
    let (vip, client) = (IpAddr::V4(Ipv4Addr::new(198, 18, 1, 10)), IpAddr::V4(CLIENT4));
    // nat, backend on the client interface.
    let (verdict, _) = lab.run(&frame("198.18.1.10", 87));
    assert_eq!(verdict, XDP_TX, "nat: a backend on the client interface: XDP_TX");
    let reply = Flow::tcp("198.18.0.12".parse().unwrap(), client, 87, 40000);
    assert_eq!(reverse_entry(&mut lab, map_names::NAT_REVERSE, &reply).egress, EGRESS_SAME, "nat: the reply leaves as it came");
    let (verdict, out) = lab.run(&reply_frame(reply));
    assert_eq!(verdict, XDP_TX, "nat: the reply leaves by XDP_TX");
    assert_reply("nat reply, one-arm", &out, IFACE_MAC, vip, 87, client, 40000);
    // fullnat, backend on the client interface.
    let (verdict, out) = lab.run(&frame("198.18.1.10", 89));
    assert_eq!(verdict, XDP_TX, "fullnat: a backend on the client interface: XDP_TX");
    let (snat, backend, sport, bport) = ends(&out, false);
    let reply = Flow::tcp(backend, snat, bport, sport);
    assert_eq!(reverse_entry(&mut lab, map_names::FULLNAT_REVERSE, &reply).egress, EGRESS_SAME, "fullnat: the reply leaves as it came");
    let (verdict, out) = lab.run(&reply_frame(reply));
    assert_eq!(verdict, XDP_TX, "fullnat: the reply leaves by XDP_TX");
    assert_reply("fullnat reply, one-arm", &out, IFACE_MAC, vip, 89, client, 40000);
    assert_eq!(lab.count(stat::REDIRECTED), 0, "nothing redirected");
    assert_eq!((lab.count(stat::NAT_REPLY), lab.count(stat::FULLNAT_REPLY)), (1, 1));
}

/// An ICMP error about a packet sent to a backend on the backend interface (a
/// router on its path, or the backend) and a backend's fragmented reply arrive
/// on the backend interface too: they go back to the client interface like the
/// flow's replies (the reverse entry's `egress`), for `nat` and `fullnat`.
#[test]
fn icmp_errors_and_reply_fragments_of_two_arm_flows_go_back_to_the_client_interface() {
    use lb_tests::natpacket::{error, fragments, packet};
    let mut lab = Lab::new();
    let (vip, client) = (IpAddr::V4(Ipv4Addr::new(198, 18, 1, 10)), IpAddr::V4(CLIENT4));
    let router: IpAddr = "198.18.8.1".parse().unwrap();
    // nat: the client's frame, then a router's "too big" about it (as sent:
    // client -> backend:8086), then a fragmented reply.
    let (verdict, _) = lab.run(&frame("198.18.1.10", 86));
    assert_eq!(verdict, XDP_REDIRECT, "nat: the client's frame to the backend interface");
    let backend: IpAddr = "198.18.8.11".parse().unwrap();
    let sent = packet(client, backend, 6, 40000, 8086, 16);
    let (verdict, out) = lab.run(&error(router, client, &sent, 28, false, REPLY_FROM));
    assert_eq!(verdict, XDP_REDIRECT, "nat: the ICMP error redirected to the client interface");
    assert_eq!((out[0..6].to_vec(), out[6..12].to_vec()), (CLIENT_MAC.to_vec(), IFACE_MAC.to_vec()), "nat ICMP error: MACs");
    assert_eq!(lab.count(stat::NAT_ICMP_REPLY), 1, "counted nat_icmp_reply");
    let (frags, _) = fragments(backend, client, 6, (8086, 40000), 3000, 77, 1480, false);
    assert!(frags.len() >= 3, "a reply in {} fragments", frags.len());
    for (i, f) in frags.iter().enumerate() {
        let (verdict, out) = lab.run(f);
        assert_eq!(verdict, XDP_REDIRECT, "nat: reply fragment {i} redirected to the client interface");
        assert_eq!((out[0..6].to_vec(), out[6..12].to_vec()), (CLIENT_MAC.to_vec(), IFACE_MAC.to_vec()), "nat reply fragment {i}: MACs");
        assert_eq!(ends(&out, false).0, vip, "nat reply fragment {i}: from the VIP");
    }
    assert_eq!(lab.count(stat::NAT_REPLY), frags.len() as u64, "each fragment counted nat_reply");
    // fullnat: the client's frame (its SNAT port from the output), then a
    // router's error about it.
    let (verdict, out) = lab.run(&frame("198.18.1.10", 88));
    assert_eq!(verdict, XDP_REDIRECT, "fullnat: the client's frame to the backend interface");
    let (snat, fbackend, sport, bport) = ends(&out, false);
    let sent = packet(snat, fbackend, 6, sport, bport, 16);
    let (verdict, out) = lab.run(&error(router, snat, &sent, 28, false, REPLY_FROM));
    assert_eq!(verdict, XDP_REDIRECT, "fullnat: the ICMP error redirected to the client interface");
    assert_eq!((out[0..6].to_vec(), out[6..12].to_vec()), (CLIENT_MAC.to_vec(), IFACE_MAC.to_vec()), "fullnat ICMP error: MACs");
    assert_eq!(ends(&out, false).1, client, "fullnat ICMP error: to the client");
    assert_eq!(lab.count(stat::NAT_ICMP_REPLY), 2, "counted nat_icmp_reply");
    assert_eq!(lab.count(stat::DROP_NO_EGRESS), 0);
}
