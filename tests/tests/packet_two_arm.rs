//! Two-arm forwarding at packet level (BPF_PROG_TEST_RUN): a backend on the
//! backend interface (`Backend::egress` = `EGRESS_BACKEND`) gets its frame by
//! XDP_REDIRECT through `EGRESS`, with that interface's MAC as the source; a
//! backend on the client interface still by XDP_TX; a missing `EGRESS` entry
//! drops the frame (`drop_no_egress`). The test run returns the verdict without
//! sending anything; the devmap entries name `lo`, which any namespace has.
//!
//! Needs root: `cargo test -p lb-tests --test packet_two_arm -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::programs::{TestRun, TestRunOptions};
use lb_agent::{config, dataplane::Dataplane, plan::Plan};
use lb_common::{stat, EGRESS_BACKEND, EGRESS_SAME};
use lb_tests::frames::{addr16, Flow, ETH_HLEN, IPV4_HLEN, IPV6_HLEN};

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
/// 8086) on the backend interface.
const YAML: &str = "services:
  - { name: dr4, vip: 198.18.1.10, port: 80, backends: [{ address: 198.18.5.11 }] }
  - { name: dr6, vip: \"2001:db8:1::10\", port: 81, backends: [{ address: \"2001:db8:5::11\" }] }
  - { name: near, vip: 198.18.1.10, port: 82, backends: [{ address: 198.18.0.11 }] }
  - { name: ipip4, vip: 198.18.1.10, port: 83, forwarding: ipip, backends: [{ address: 198.18.6.11 }] }
  - { name: gue6, vip: \"2001:db8:1::10\", port: 84, forwarding: gue, backends: [{ address: \"2001:db8:6::11\" }] }
  - { name: lost, vip: 198.18.1.10, port: 85, backends: [{ address: 198.18.7.11 }] }
  - { name: nat4, vip: 198.18.1.10, port: 86, forwarding: nat, backends: [{ address: 198.18.8.11, port: 8086 }] }
";

/// An `EGRESS` index the agent never writes.
const UNSET_EGRESS: u8 = 5;

fn mac_of(a: IpAddr) -> [u8; 6] {
    let o = addr16(a);
    [0x02, 0xbe, o[12], o[13], o[14], o[15]]
}

fn egress_of(a: IpAddr) -> u8 {
    match a.to_string().as_str() {
        "198.18.0.11" => EGRESS_SAME,
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
