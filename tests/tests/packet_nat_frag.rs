//! Fragments of `forwarding: nat` and `fullnat` flows at packet level
//! (BPF_PROG_TEST_RUN through `lb_xdp`, which tail-calls `lb_rare` then `lb_nat`):
//! every fragment of a datagram leaves for the flow's backend with its
//! destination (`fullnat`: and source) address translated; the first fragment's
//! ports and TCP/UDP checksum too (updated incrementally, though the checksum
//! covers the whole datagram). The fragments are reassembled here and the
//! checksum recomputed from scratch over the new addresses; every other byte is
//! compared. IPv4 and IPv6 (Fragment header), TCP and UDP, a new flow (its first
//! datagram fragmented: the reverse entry or SNAT mapping is made by the first
//! fragment, so the replies come back) and an established one (the fragments
//! keep its SNAT port), an IPv4 UDP checksum of 0; and the backend's fragmented
//! replies, translated back to the client (the first fragment by the flow's
//! reverse entry, the later ones by the ports it left in `FRAGS`).
//!
//! Needs root: `cargo test -p lb-tests --test packet_nat_frag -- --test-threads=1`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::stat;
use lb_tests::{
    frames::{ethernet, CLIENT_MAC, ETH_P_IP, ETH_P_IPV6},
    natpacket::{check_fragments, fragments, mac_of, packet, FragWant, Lab, XDP_DROP, XDP_PASS, XDP_TX},
};

const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 7);
const NAT_VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const NAT_VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
const FULL_VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 20);
const FULL_VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x20);
const NAT_B4: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 11);
const NAT_B6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 0x11);
const FULL_B4: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 12);
const FULL_B6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 0x12);
const SNAT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const SNAT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const BACKEND_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x11];

/// TCP 80 to backends on 8080, UDP 53 to the service's port; `nat` on one VIP
/// per family, `fullnat` on another.
const YAML: &str = "snat_addresses: [198.18.0.2, \"2001:db8::2\"]
snat_ports: 20000-29999
services:
  - { name: nat-tcp4, vip: 198.18.1.10, port: 80, forwarding: nat, backends: [{ address: 198.18.5.11, port: 8080 }] }
  - { name: nat-udp4, vip: 198.18.1.10, port: 53, protocol: udp, forwarding: nat, backends: [{ address: 198.18.5.11 }] }
  - { name: nat-tcp6, vip: \"2001:db8:1::10\", port: 80, forwarding: nat, backends: [{ address: \"2001:db8:5::11\", port: 8080 }] }
  - { name: nat-udp6, vip: \"2001:db8:1::10\", port: 53, protocol: udp, forwarding: nat, backends: [{ address: \"2001:db8:5::11\" }] }
  - { name: full-tcp4, vip: 198.18.1.20, port: 80, forwarding: fullnat, backends: [{ address: 198.18.5.12, port: 8080 }] }
  - { name: full-udp4, vip: 198.18.1.20, port: 53, protocol: udp, forwarding: fullnat, backends: [{ address: 198.18.5.12 }] }
  - { name: full-tcp6, vip: \"2001:db8:1::20\", port: 80, forwarding: fullnat, backends: [{ address: \"2001:db8:5::12\", port: 8080 }] }
  - { name: full-udp6, vip: \"2001:db8:1::20\", port: 53, protocol: udp, forwarding: fullnat, backends: [{ address: \"2001:db8:5::12\" }] }
";

/// A case: mode, client, VIP, backend, SNAT address (fullnat), protocol,
/// service port, backend port.
struct Case {
    fullnat: bool,
    client: IpAddr,
    vip: IpAddr,
    backend: IpAddr,
    snat: IpAddr,
    proto: u8,
    vport: u16,
    bport: u16,
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for fullnat in [false, true] {
        for v6 in [false, true] {
            for (proto, vport, bport) in [(6u8, 80u16, 8080u16), (17, 53, 53)] {
                let (client, vip, backend, snat): (IpAddr, IpAddr, IpAddr, IpAddr) = match (fullnat, v6) {
                    (false, false) => (CLIENT4.into(), NAT_VIP4.into(), NAT_B4.into(), SNAT4.into()),
                    (false, true) => (CLIENT6.into(), NAT_VIP6.into(), NAT_B6.into(), SNAT6.into()),
                    (true, false) => (CLIENT4.into(), FULL_VIP4.into(), FULL_B4.into(), SNAT4.into()),
                    (true, true) => (CLIENT6.into(), FULL_VIP6.into(), FULL_B6.into(), SNAT6.into()),
                };
                v.push(Case { fullnat, client, vip, backend, snat, proto, vport, bport });
            }
        }
    }
    v
}

impl Case {
    fn name(&self, cport: u16) -> String {
        let mode = if self.fullnat { "fullnat" } else { "nat" };
        format!("{mode} {}:{cport} -> {}:{} proto {}", self.client, self.vip, self.vport, self.proto)
    }

    /// Sends `frames`, each must leave; returns the translated frames.
    fn send(&self, lab: &mut Lab, frames: &[Vec<u8>], what: &str) -> Vec<Vec<u8>> {
        frames
            .iter()
            .enumerate()
            .map(|(n, f)| {
                let (rc, out) = lab.run(f);
                assert_eq!(rc, XDP_TX, "{what}: fragment {n} sent on");
                out
            })
            .collect()
    }

    /// The source port the backend sees: the SNAT port in `out` (fullnat) or the
    /// client's.
    fn sport(&self, out: &[u8], cport: u16) -> u16 {
        if !self.fullnat {
            return cport;
        }
        let l4 = 14 + if self.client.is_ipv4() { 20 } else { 48 };
        let p = u16::from_be_bytes([out[l4], out[l4 + 1]]);
        assert!((20000..=29999).contains(&p), "SNAT port {p} from the pool");
        p
    }

    fn want(&self, sport: u16) -> FragWant {
        let src = if self.fullnat { self.snat } else { self.client };
        FragWant { mac: mac_of(self.backend), src, dst: self.backend, sport, dport: self.bport }
    }

    /// The backend's (unfragmented) reply comes back translated: the flow's
    /// reverse entry or mapping exists.
    fn reply(&self, lab: &mut Lab, cport: u16, sport: u16, what: &str) {
        let to = if self.fullnat { self.snat } else { self.client };
        let ip = packet(self.backend, to, self.proto, self.bport, sport, 30);
        let mut f = ethernet(None, if self.client.is_ipv4() { ETH_P_IP } else { ETH_P_IPV6 }, &ip);
        f[6..12].copy_from_slice(&BACKEND_MAC);
        let (rc, out) = lab.run(&f);
        assert_eq!(rc, XDP_TX, "{what}: the reply sent on");
        let (addrs, alen, l4) = if self.client.is_ipv4() { (26, 4, 34) } else { (22, 16, 54) };
        let ip_of = |a: IpAddr| match a {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        assert_eq!(&out[addrs..addrs + alen], &ip_of(self.vip)[..], "{what}: the reply from the VIP");
        assert_eq!(&out[addrs + alen..addrs + 2 * alen], &ip_of(self.client)[..], "{what}: the reply to the client");
        assert_eq!(&out[l4..l4 + 4], &[self.vport.to_be_bytes(), cport.to_be_bytes()].concat()[..], "{what}: the reply's ports");
        assert_eq!(&out[0..6], &CLIENT_MAC[..], "{what}: the reply to the client's next hop");
    }
}

fn lab() -> Lab {
    Lab::with(YAML, "packet_nat_frag.rs")
}

#[test]
fn a_new_flows_fragmented_datagram_is_translated_and_its_replies_come_back() {
    let mut lab = lab();
    let mut cport = 40000;
    for c in cases() {
        cport += 1;
        let what = c.name(cport);
        let (frames, _) = fragments(c.client, c.vip, c.proto, (cport, c.vport), 3000, 0x1234 + u32::from(cport), 1400, false);
        assert_eq!(frames.len(), 3, "{what}: three fragments");
        let before = lab.counters();
        let out = c.send(&mut lab, &frames, &what);
        let after = lab.counters();
        let moved = |i: u32| after[i as usize] - before[i as usize];
        let mode = if c.fullnat { stat::FULLNAT_FORWARDED } else { stat::NAT_FORWARDED };
        assert_eq!((moved(stat::FRAG_FIRST), moved(stat::FRAG_FOLLOWED), moved(mode), moved(stat::FORWARDED)), (1, 2, 3, 3), "{what}: counters");
        assert_eq!(moved(stat::DROP_NAT_UNSUPPORTED), 0, "{what}: nothing dropped");
        let sport = c.sport(&out[0], cport);
        check_fragments(&out, &frames, &c.want(sport), &what);
        c.reply(&mut lab, cport, sport, &what);
    }
}

#[test]
fn an_established_flows_fragments_keep_its_translation() {
    let mut lab = lab();
    let mut cport = 41000;
    for c in cases() {
        cport += 1;
        let what = c.name(cport);
        // One unfragmented packet first: the flow and its SNAT port exist.
        let ip = packet(c.client, c.vip, c.proto, cport, c.vport, 20);
        let mut f = ethernet(None, if c.client.is_ipv4() { ETH_P_IP } else { ETH_P_IPV6 }, &ip);
        f[6..12].copy_from_slice(&CLIENT_MAC);
        let (rc, first) = lab.run(&f);
        assert_eq!(rc, XDP_TX, "{what}: the first packet");
        let l4 = 14 + if c.client.is_ipv4() { 20 } else { 40 };
        let sport = if c.fullnat { u16::from_be_bytes([first[l4], first[l4 + 1]]) } else { cport };
        for (n, payload) in [(0u32, 2000usize), (1, 5000)] {
            let (frames, _) = fragments(c.client, c.vip, c.proto, (cport, c.vport), payload, 0x4000 + n, 1200, false);
            let out = c.send(&mut lab, &frames, &what);
            assert_eq!(c.sport(&out[0], cport), sport, "{what}: datagram {n} keeps the flow's SNAT port");
            check_fragments(&out, &frames, &c.want(sport), &format!("{what}, datagram {n}"));
        }
    }
}

impl Case {
    /// Opens the flow with one unfragmented packet: the port the backend sees.
    fn open(&self, lab: &mut Lab, cport: u16, what: &str) -> u16 {
        let ip = packet(self.client, self.vip, self.proto, cport, self.vport, 20);
        let mut f = ethernet(None, if self.client.is_ipv4() { ETH_P_IP } else { ETH_P_IPV6 }, &ip);
        f[6..12].copy_from_slice(&CLIENT_MAC);
        let (rc, first) = lab.run(&f);
        assert_eq!(rc, XDP_TX, "{what}: the first packet");
        let l4 = 14 + if self.client.is_ipv4() { 20 } else { 40 };
        if self.fullnat { u16::from_be_bytes([first[l4], first[l4 + 1]]) } else { cport }
    }

    /// The backend's reply datagram, fragmented, from its next hop's MAC.
    fn reply_fragments(&self, sport: u16, payload: usize, id: u32) -> Vec<Vec<u8>> {
        let to = if self.fullnat { self.snat } else { self.client };
        let (mut frames, _) = fragments(self.backend, to, self.proto, (self.bport, sport), payload, id, 1400, false);
        for f in &mut frames {
            f[6..12].copy_from_slice(&BACKEND_MAC);
        }
        frames
    }
}

#[test]
fn a_fragmented_reply_reaches_the_client_translated() {
    let mut lab = lab();
    let mut cport = 44000;
    for c in cases() {
        cport += 1;
        let what = format!("reply of {}", c.name(cport));
        let sport = c.open(&mut lab, cport, &what);
        let frames = c.reply_fragments(sport, 3500, 0x5500 + u32::from(cport));
        assert_eq!(frames.len(), 3, "{what}: three fragments");
        let counter = if c.fullnat { stat::FULLNAT_REPLY } else { stat::NAT_REPLY };
        let before = lab.counters()[counter as usize];
        let out = c.send(&mut lab, &frames, &what);
        assert_eq!(lab.counters()[counter as usize] - before, 3, "{what}: every fragment counted");
        let w = FragWant { mac: CLIENT_MAC, src: c.vip, dst: c.client, sport: c.vport, dport: cport };
        check_fragments(&out, &frames, &w, &what);
    }
}

#[test]
fn a_reply_fragment_of_no_flow_or_before_its_first_passes() {
    let mut lab = lab();
    for c in cases() {
        let what = format!("reply of {}", c.name(45000));
        // No such flow: every fragment passes untouched.
        let frames = c.reply_fragments(45000, 3000, 0x6600);
        for f in &frames {
            let (rc, out) = lab.run_counted(f, &[stat::PASS_NOT_VIP], &what);
            assert_eq!((rc, &out[..]), (XDP_PASS, &f[..]), "{what}: passed untouched");
        }
        // The flow exists, but a later fragment comes before its first.
        let sport = c.open(&mut lab, 45001, &what);
        let frames = c.reply_fragments(sport, 3000, 0x6601);
        let (rc, _) = lab.run_counted(&frames[2], &[stat::PASS_NOT_VIP], &what);
        assert_eq!(rc, XDP_PASS, "{what}: a later fragment first passes");
    }
}

#[test]
fn an_ipv4_udp_datagram_without_checksum_keeps_none() {
    let mut lab = lab();
    for c in cases().into_iter().filter(|c| c.client.is_ipv4() && c.proto == 17) {
        let what = c.name(42000);
        let (frames, _) = fragments(c.client, c.vip, 17, (42000, c.vport), 3000, 0x777, 1400, true);
        let out = c.send(&mut lab, &frames, &what);
        let sport = c.sport(&out[0], 42000);
        check_fragments(&out, &frames, &c.want(sport), &what);
        assert_eq!(&out[0][14 + 20 + 6..14 + 20 + 8], &[0, 0], "{what}: no checksum stays none");
    }
}

#[test]
fn a_later_fragment_before_its_first_is_dropped() {
    let mut lab = lab();
    for c in cases() {
        let what = c.name(43000);
        let (frames, _) = fragments(c.client, c.vip, c.proto, (43000, c.vport), 3000, 0x999, 1400, false);
        let (rc, _) = lab.run_counted(&frames[1], &[stat::DROP_FRAG_UNKNOWN], &what);
        assert_eq!(rc, XDP_DROP, "{what}: dropped");
    }
}

#[test]
fn a_fragmented_reply_keeps_the_flow_fresh() {
    use aya::maps::{HashMap, MapData};
    use lb_common::{map_names, FlowKey, FlowVal};
    let mut lab = lab();
    let mut cport = 46000;
    for c in cases() {
        cport += 1;
        let what = format!("reply of {}", c.name(cport));
        // Two packets: the flow is in `CT_ESTABLISHED`.
        c.open(&mut lab, cport, &what);
        let sport = c.open(&mut lab, cport, &what);
        let key = FlowKey { src: lb_tests::frames::addr16(c.client), dst: lb_tests::frames::addr16(c.vip), sport: cport, dport: c.vport, proto: c.proto, _pad: [0; 3] };
        let mut table: HashMap<MapData, FlowKey, FlowVal> =
            HashMap::try_from(aya::maps::Map::HashMap(lab.dp.map_handle(map_names::CT_ESTABLISHED).expect("map"))).expect("hash map");
        let est = table.get(&key, 0).unwrap_or_else(|_| panic!("{what}: established after two packets"));
        assert_ne!(est.last_seen, 0, "{what}: the clock runs");
        table.insert(key, FlowVal { last_seen: 0, ..est }, 0).expect("age the entry");
        let frames = c.reply_fragments(sport, 3000, 0x7700 + u32::from(cport));
        c.send(&mut lab, &frames, &what);
        let fresh = table.get(&key, 0).expect("entry");
        assert_eq!(fresh.last_seen, est.last_seen, "{what}: the fragmented reply refreshed the flow");
    }
}
