//! Packet-level tests of the XDP program through BPF_PROG_TEST_RUN: hand-built
//! frames in, verdict, output frame and counters checked against what the agent's
//! plan predicts. Each test loads its own object, so maps start empty.
//!
//! Needs root (BPF_PROG_LOAD / BPF_PROG_TEST_RUN). Run with
//! `cargo test -p lb-tests --test packet -- --test-threads=1`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::programs::{ProgramError, TestRun, TestRunOptions};
use lb_agent::{config, dataplane::Dataplane, plan::Plan};
use lb_common::{flow_hash, maglev_slot, stat, Counters};
use lb_tests::frames::*;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
/// Passed to `Dataplane::write`: the source MAC of forwarded frames. Differs from
/// the frames' destination MAC (`LB_MAC`) so the rewrite is visible.
const IFACE_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0xee];
const Q_TAG: Vlan = Vlan { tpid: ETH_P_8021Q, tci: 100 };
const AD_TAG: Vlan = Vlan { tpid: ETH_P_8021AD, tci: 200 };

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("the packet tests load XDP programs and need root: run them with sudo");
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("bad address {s}: {e}"))
}
fn ip4(s: &str) -> Ipv4Addr {
    s.parse().unwrap_or_else(|e| panic!("bad address {s}: {e}"))
}
fn ip6(s: &str) -> Ipv6Addr {
    s.parse().unwrap_or_else(|e| panic!("bad address {s}: {e}"))
}

/// Each backend's MAC is derived from its address, so a MAC names one backend.
fn mac_of(addr: IpAddr) -> [u8; 6] {
    let o = match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    [0x02, 0xbe, o[12], o[13], o[14], o[15]]
}

/// One service in YAML; a backend written `addr*w` has weight `w`.
fn service(name: &str, vip: &str, port: u16, proto: &str, backends: &[&str]) -> String {
    let mut s = format!("  - name: {name}\n    vip: \"{vip}\"\n    port: {port}\n    protocol: {proto}\n    backends:\n");
    for b in backends {
        let (addr, w) = b.split_once('*').unwrap_or((b, "1"));
        s += &format!("      - {{ address: \"{addr}\", weight: {w} }}\n");
    }
    s
}

fn web() -> String {
    service("web", "198.18.1.10", 80, "tcp", &["198.18.0.11", "198.18.0.12", "198.18.0.13*2"])
}
fn web6() -> String {
    service("web6", "2001:db8:1::10", 80, "tcp", &["2001:db8::11", "2001:db8::12", "2001:db8::13"])
}
fn dns() -> String {
    service("dns", "198.18.1.10", 53, "udp", &["198.18.0.21", "198.18.0.22", "198.18.0.23"])
}

/// Builds the plan for `services`; backends listed in `unresolved` get no MAC.
fn plan_for(services: &[String], unresolved: &[&str]) -> Plan {
    let yaml = format!("conntrack_size: 4096\nservices:\n{}", services.concat());
    let cfg = config::parse(&yaml, "packet.rs").unwrap_or_else(|e| panic!("test config rejected: {e}\n{yaml}"));
    let skip: Vec<IpAddr> = unresolved.iter().map(|a| ip(a)).collect();
    let macs: BTreeMap<IpAddr, [u8; 6]> = Plan::backend_addresses(&cfg)
        .into_iter()
        .filter(|a| !skip.contains(a))
        .map(|a| (a, mac_of(a)))
        .collect();
    Plan::build(&cfg, &macs)
}

/// The backend a new flow gets: lb-common's hash on the plan's table, which must
/// also be what `Plan::backend_for` says.
fn predict(plan: &Plan, svc: usize, flow: &Flow) -> u32 {
    let s = &plan.services[svc].value;
    assert!(s.table_size > 0, "service {} has no Maglev table", plan.services[svc].name);
    let slot = maglev_slot(flow_hash(&flow.key()), s.table_size);
    let id = plan.maglev[(s.table_offset + slot) as usize];
    assert_eq!(plan.backend_for(svc, &flow.key()), Some(id), "Plan::backend_for disagrees for {flow:?}");
    id
}

/// A loaded and filled data plane plus the plan it was filled from.
struct Lab {
    dp: Dataplane,
    plan: Plan,
}

impl Lab {
    fn new(services: &[String]) -> Lab {
        Lab::with_unresolved(services, &[])
    }

    fn with_unresolved(services: &[String], unresolved: &[&str]) -> Lab {
        require_root();
        let plan = plan_for(services, unresolved);
        let mut dp = Dataplane::load(&plan).unwrap_or_else(|e| panic!("loading the XDP object: {e}"));
        dp.write(&plan, IFACE_MAC).unwrap_or_else(|e| panic!("filling the maps: {e}"));
        Lab { dp, plan }
    }

    /// Writes another plan into the same maps (it must fit the sizes of the first).
    fn rewrite(&mut self, services: &[String], unresolved: &[&str]) {
        self.plan = plan_for(services, unresolved);
        self.dp.write(&self.plan, IFACE_MAC).unwrap_or_else(|e| panic!("rewriting the maps: {e}"));
    }

    fn try_run(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        let mut out = vec![0u8; frame.len() + 256];
        let prog = self.dp.balancer().unwrap_or_else(|e| panic!("no balancer program: {e}"));
        let r = prog.test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() })?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(frame).unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of a {}-byte frame failed: {e:?}", frame.len()))
    }

    fn global(&mut self) -> Vec<u64> {
        self.dp.stats().unwrap_or_else(|e| panic!("reading counters: {e}")).global
    }

    fn svc(&self, name: &str) -> usize {
        self.plan.services.iter().position(|s| s.name == name).unwrap_or_else(|| panic!("no service {name}"))
    }

    fn predict(&self, svc: usize, flow: &Flow) -> u32 {
        predict(&self.plan, svc, flow)
    }

    /// Runs a frame that must be forwarded: checks XDP_TX and the DR rewrite (only
    /// the two MACs change), returns the id of the backend of `svc` it went to.
    fn forward(&mut self, svc: usize, frame: &[u8], what: &str) -> u32 {
        let (rc, out) = self.run(frame);
        assert_eq!(rc, XDP_TX, "{what}: expected XDP_TX");
        assert_eq!(out.len(), frame.len(), "{what}: output length changed");
        assert_eq!(out[6..12], IFACE_MAC, "{what}: source MAC is not the interface MAC");
        assert_eq!(out[12..], frame[12..], "{what}: bytes after the MACs changed");
        let mac: [u8; 6] = out[0..6].try_into().unwrap();
        let b = self.plan.backends.iter().find(|b| b.service == svc && b.mac == Some(mac));
        b.unwrap_or_else(|| panic!("{what}: destination MAC {mac:02x?} is no resolved backend of service {svc}")).id
    }

    /// Runs a frame the program must not touch: `rc`, output identical to input.
    fn untouched(&mut self, frame: &[u8], rc: u32, what: &str) {
        let (got, out) = self.run(frame);
        assert_eq!(got, rc, "{what}: wrong verdict (1 drop, 2 pass, 3 tx)");
        assert_eq!(out, frame, "{what}: frame was modified");
    }

    /// Asserts the global counters moved by exactly `expected` since `before`.
    fn expect_delta(&mut self, before: &[u64], expected: &[(u32, u64)], what: &str) {
        let after = self.global();
        let mut want = vec![0u64; stat::COUNT as usize];
        for &(i, n) in expected {
            want[i as usize] += n;
        }
        let got: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
        if got != want {
            let show = |v: &[u64]| -> Vec<String> {
                v.iter().enumerate().filter(|(_, n)| **n != 0).map(|(i, n)| format!("{}+{n}", stat::NAMES[i])).collect()
            };
            panic!("{what}: counters moved by {:?}, expected {:?}", show(&got), show(&want));
        }
    }

    /// A pass-through frame: XDP_PASS, unchanged, and exactly `counter` + 1.
    fn expect_pass(&mut self, frame: &[u8], counter: u32, what: &str) {
        let before = self.global();
        self.untouched(frame, XDP_PASS, what);
        self.expect_delta(&before, &[(counter, 1)], what);
    }
}

/// Sends 200 new flows made by `make(source port)` to service `name`: each goes to
/// the predicted backend with only the MACs rewritten, and all backends get some.
fn check_spread(lab: &mut Lab, name: &str, what: &str, make: impl Fn(u16) -> (Flow, Vec<u8>)) {
    let svc = lab.svc(name);
    let mut used = BTreeMap::new();
    for sport in 40000..40200 {
        let (flow, frame) = make(sport);
        let what = format!("{what}, source port {sport}");
        let before = lab.global();
        let got = lab.forward(svc, &frame, &what);
        assert_eq!(got, lab.predict(svc, &flow), "{what}: not the backend the plan predicts");
        lab.expect_delta(&before, &[(stat::FORWARDED, 1), (stat::CONN_MISS, 1)], &what);
        *used.entry(got).or_insert(0) += 1;
    }
    let all = &lab.plan.services[svc].backend_ids;
    assert_eq!(used.len(), all.len(), "{what}: 200 flows reached only backends {used:?} of {all:?}");
}

#[test]
fn vip_hit_is_forwarded_to_the_predicted_backend() {
    let mut lab = Lab::new(&[web(), web6(), dns()]);
    let (vip, vip6) = (ip4("198.18.1.10"), ip6("2001:db8:1::10"));
    let flow4 = |c: &str, sport| Flow::tcp(ip(c), vip.into(), sport, 80);
    check_spread(&mut lab, "web", "IPv4 TCP", |p| (flow4("198.18.0.100", p), flow4("198.18.0.100", p).frame(None, 32)));
    let f6 = |p| Flow::tcp(ip("2001:db8::100"), vip6.into(), p, 80);
    check_spread(&mut lab, "web6", "IPv6 TCP", |p| (f6(p), f6(p).frame(None, 32)));
    let fu = |p| Flow::udp(ip("198.18.0.100"), vip.into(), p, 53);
    check_spread(&mut lab, "dns", "IPv4 UDP", |p| (fu(p), fu(p).frame(None, 40)));
    // Tagged frames: the tag stays (everything after the MACs is compared).
    check_spread(&mut lab, "web", "802.1Q", |p| (flow4("198.18.0.101", p), flow4("198.18.0.101", p).frame(Some(Q_TAG), 0)));
    check_spread(&mut lab, "web", "802.1ad", |p| (flow4("198.18.0.102", p), flow4("198.18.0.102", p).frame(Some(AD_TAG), 5)));
    check_spread(&mut lab, "web6", "IPv6 802.1Q", |p| {
        let f = Flow::tcp(ip("2001:db8::101"), vip6.into(), p, 80);
        (f, f.frame(Some(Q_TAG), 1))
    });
    // IHL 7: the ports must be read after the options.
    check_spread(&mut lab, "web", "IPv4 with options", |p| {
        let f = flow4("198.18.0.103", p);
        let opts = [0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x00]; // NOPs, end of list
        (f, ethernet(None, ETH_P_IP, &ipv4_opts(ip4("198.18.0.103"), vip, 6, &opts, &tcp(p, 80, b"x"))))
    });
}

#[test]
fn connection_table_keeps_flows_on_their_backend() {
    let base = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];
    let more = ["198.18.0.11", "198.18.0.12", "198.18.0.13", "198.18.0.14", "198.18.0.15", "198.18.0.16"];
    let (a, b) = (service("web", "198.18.1.10", 80, "tcp", &base), service("web", "198.18.1.10", 80, "tcp", &more));
    let mut lab = Lab::new(&[a]);
    let plan_b = plan_for(&[b.clone()], &[]);
    let flow = |sport| Flow::tcp(ip("198.18.0.100"), ip("198.18.1.10"), sport, 80);
    // A flow that Maglev moves to one of the added backends once they exist.
    let f = (40000..41000)
        .map(flow)
        .find(|f| lab.predict(0, f) != predict(&plan_b, 0, f))
        .expect("no flow moves to a new backend: Maglev tables look identical");
    let first = lab.predict(0, &f);

    let send = |lab: &mut Lab, want: u32, counter: u32, what: &str| {
        let before = lab.global();
        let got = lab.forward(0, &f.frame(None, 10), what);
        assert_eq!(got, want, "{what}: wrong backend (ids: {:?})", lab.plan.backends.iter().map(|b| (b.id, b.address)).collect::<Vec<_>>());
        lab.expect_delta(&before, &[(stat::FORWARDED, 1), (counter, 1)], what);
    };
    send(&mut lab, first, stat::CONN_MISS, "first frame of the flow");
    send(&mut lab, first, stat::CONN_HIT, "second frame of the flow");

    lab.rewrite(&[b.clone()], &[]);
    assert_eq!(lab.plan.backends[first as usize].address, ip(base[first as usize]), "ids of old backends changed");
    assert_ne!(lab.predict(0, &f), first, "test set-up: the flow should hash elsewhere now");
    send(&mut lab, first, stat::CONN_HIT, "after adding backends");
    let g = (41000..42000).map(flow).find(|g| lab.predict(0, g) >= 3).expect("no flow reaches a new backend");
    let before = lab.global();
    assert_eq!(lab.forward(0, &g.frame(None, 0), "new flow"), lab.predict(0, &g), "new flow after the change");
    lab.expect_delta(&before, &[(stat::FORWARDED, 1), (stat::CONN_MISS, 1)], "new flow after the change");

    // The flow's backend loses its MAC (inactive): the flow is scheduled again.
    lab.rewrite(&[b], &[base[first as usize]]);
    let next = lab.predict(0, &f);
    assert_ne!(next, first, "Maglev still maps the flow to its inactive backend");
    send(&mut lab, next, stat::CONN_MISS, "after its backend went away");
    send(&mut lab, next, stat::CONN_HIT, "after rescheduling");
}

#[test]
fn frames_not_for_a_service_pass_untouched() {
    let mut lab = Lab::new(&[web(), web6()]);
    let (c4, c6) = (ip("198.18.0.100"), ip("2001:db8::100"));
    let (vip, vip6) = (ip("198.18.1.10"), ip("2001:db8:1::10"));
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("TCP to a non-VIP", Flow::tcp(c4, ip("198.18.1.99"), 1234, 80).frame(None, 8), stat::PASS_NOT_VIP),
        ("UDP to a non-VIP", Flow::udp(c4, ip("198.18.1.99"), 1234, 80).frame(None, 8), stat::PASS_NOT_VIP),
        ("IPv6 TCP to a non-VIP", Flow::tcp(c6, ip("2001:db8:1::99"), 1234, 80).frame(None, 8), stat::PASS_NOT_VIP),
        ("tagged TCP to a non-VIP", Flow::tcp(c4, ip("198.18.1.99"), 1234, 80).frame(Some(Q_TAG), 8), stat::PASS_NOT_VIP),
        ("TCP to the VIP, wrong port", Flow::tcp(c4, vip, 1234, 81).frame(None, 8), stat::PASS_NO_SERVICE),
        ("IPv6 TCP to the VIP, wrong port", Flow::tcp(c6, vip6, 1234, 443).frame(None, 8), stat::PASS_NO_SERVICE),
        ("UDP to a TCP-only VIP port", Flow::udp(c4, vip, 1234, 80).frame(None, 8), stat::PASS_NO_SERVICE),
        ("IPv6 UDP to a TCP-only VIP port", Flow::udp(c6, vip6, 1234, 80).frame(None, 8), stat::PASS_NO_SERVICE),
        ("ICMP echo to the VIP", ethernet(None, ETH_P_IP, &ipv4(ip4("198.18.0.100"), ip4("198.18.1.10"), PROTO_ICMP, &icmp_echo(false))), stat::PASS_NOT_L4),
        ("ICMPv6 echo to the VIP", ethernet(None, ETH_P_IPV6, &ipv6(ip6("2001:db8::100"), ip6("2001:db8:1::10"), PROTO_ICMPV6, &icmp_echo(true))), stat::PASS_NOT_L4),
        ("ICMP echo to a non-VIP", ethernet(None, ETH_P_IP, &ipv4(ip4("198.18.0.100"), ip4("198.18.0.1"), PROTO_ICMP, &icmp_echo(false))), stat::PASS_NOT_VIP),
        ("ARP request for the VIP", arp_request(ip4("198.18.0.100"), ip4("198.18.1.10")), stat::PASS_NOT_IP),
        ("LLDP frame", ethernet(None, 0x88cc, &[0x02, 0x07, 0x04, 0, 0, 0, 0, 0, 1]), stat::PASS_NOT_IP),
        ("tagged ARP", { let mut f = ethernet(Some(Q_TAG), ETH_P_ARP, &arp_request(ip4("198.18.0.100"), ip4("198.18.1.10"))[ETH_HLEN..]); f[0..6].fill(0xff); f }, stat::PASS_NOT_IP),
    ];
    for (what, frame, counter) in cases {
        lab.expect_pass(&frame, counter, what);
    }
}

#[test]
fn any_port_service_and_exact_port_precedence() {
    let any = service("any", "198.18.1.20", 0, "tcp", &["198.18.0.31", "198.18.0.32", "198.18.0.33"]);
    let https = service("https", "198.18.1.20", 443, "tcp", &["198.18.0.41", "198.18.0.42"]);
    let any6 = service("any6", "2001:db8:1::20", 0, "udp", &["2001:db8::31", "2001:db8::32"]);
    let mut lab = Lab::new(&[any, https, any6]);
    let (s_any, s_https, s_any6) = (lab.svc("any"), lab.svc("https"), lab.svc("any6"));
    let (c4, vip) = (ip("198.18.0.100"), ip("198.18.1.20"));
    for dport in [0, 1, 22, 80, 442, 444, 8080, 65535] {
        for sport in [1000, 2000, 3000] {
            let f = Flow::tcp(c4, vip, sport, dport);
            let what = format!("TCP to the any-port VIP port {dport}");
            assert_eq!(lab.forward(s_any, &f.frame(None, 4), &what), lab.predict(s_any, &f), "{what}");
        }
        let f = Flow::udp(ip("2001:db8::100"), ip("2001:db8:1::20"), 5353, dport);
        let what = format!("IPv6 UDP to the any-port VIP port {dport}");
        assert_eq!(lab.forward(s_any6, &f.frame(None, 4), &what), lab.predict(s_any6, &f), "{what}");
    }
    let mut used = BTreeSet::new();
    for sport in 40000..40100 {
        let f = Flow::tcp(c4, vip, sport, 443);
        // forward() only accepts backends of `https`: never one of the any-port service.
        let got = lab.forward(s_https, &f.frame(None, 4), "TCP to the exact port 443");
        assert_eq!(got, lab.predict(s_https, &f), "TCP to port 443, source port {sport}");
        used.insert(got);
    }
    assert_eq!(used.len(), 2, "port 443 flows used backends {used:?} only");
    let stats = lab.dp.stats().unwrap();
    let ids = |s: usize| lab.plan.services[s].value.id as usize;
    assert_eq!(stats.services[ids(s_https)].packets, 100, "https service counter");
    assert_eq!(stats.services[ids(s_any)].packets, 24, "any-port service counter");
    assert_eq!(stats.services[ids(s_any6)].packets, 8, "any6 service counter");
    // The any-port flag is per protocol: UDP to the TCP any-port VIP, TCP to the UDP one.
    lab.expect_pass(&Flow::udp(c4, vip, 1000, 53).frame(None, 4), stat::PASS_NO_SERVICE, "UDP to a TCP any-port VIP");
    let f = Flow::tcp(ip("2001:db8::100"), ip("2001:db8:1::20"), 1000, 80);
    lab.expect_pass(&f.frame(None, 4), stat::PASS_NO_SERVICE, "TCP to a UDP any-port VIP");
}

/// Length field patch for the L4 truncation cases: IPv4 tot_len or IPv6 payload_len
/// made to end exactly at the cut, so the L3 checks pass and the L4 check fails.
fn fit_length(frame: &mut [u8], l3: usize) {
    let len = frame.len() - l3;
    if frame[l3] >> 4 == 4 {
        frame[l3 + 2..l3 + 4].copy_from_slice(&(len as u16).to_be_bytes());
        fix_ipv4_checksum(frame, l3);
    } else {
        frame[l3 + 4..l3 + 6].copy_from_slice(&((len - IPV6_HLEN) as u16).to_be_bytes());
    }
}

#[test]
fn truncated_frames_pass_as_malformed() {
    let mut lab = Lab::new(&[web(), web6(), dns()]);
    let (c4, c6) = (ip("198.18.0.100"), ip("2001:db8::100"));
    let cases = [
        ("IPv4 TCP", Flow::tcp(c4, ip("198.18.1.10"), 40000, 80), None, IPV4_HLEN, TCP_HLEN),
        ("IPv4 TCP 802.1Q", Flow::tcp(c4, ip("198.18.1.10"), 40001, 80), Some(Q_TAG), IPV4_HLEN, TCP_HLEN),
        ("IPv4 UDP", Flow::udp(c4, ip("198.18.1.10"), 40002, 53), None, IPV4_HLEN, UDP_HLEN),
        ("IPv6 TCP", Flow::tcp(c6, ip("2001:db8:1::10"), 40003, 80), None, IPV6_HLEN, TCP_HLEN),
        ("IPv6 TCP 802.1ad", Flow::tcp(c6, ip("2001:db8:1::10"), 40004, 80), Some(AD_TAG), IPV6_HLEN, TCP_HLEN),
    ];
    let malformed = [stat::PASS_MALFORMED_L2, stat::PASS_MALFORMED_L3, stat::PASS_MALFORMED_L4];
    for (name, flow, vlan, ip_hlen, l4_hlen) in cases {
        let full = flow.frame(vlan, 12);
        let svc = lab.svc(if flow.proto == 17 { "dns" } else if ip_hlen == IPV6_HLEN { "web6" } else { "web" });
        lab.forward(svc, &full, &format!("{name}: the uncut frame"));
        let l3 = ETH_HLEN + if vlan.is_some() { VLAN_HLEN } else { 0 };
        let l4 = l3 + ip_hlen;
        for len in 0..full.len() {
            let cut = &full[..len];
            let what = format!("{name} cut to {len} of {} bytes", full.len());
            let before = lab.global();
            if len < ETH_HLEN {
                // The kernel refuses XDP test input shorter than an Ethernet header
                // (bpf_test_init: EINVAL) without running the program; a real NIC
                // never hands XDP such a frame either.
                match lab.try_run(cut) {
                    Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EINVAL) => {}
                    other => panic!("{what}: expected EINVAL from BPF_PROG_TEST_RUN, got {other:?}"),
                }
                lab.expect_delta(&before, &[], &what);
                continue;
            }
            // Cut inside the tag: l2. Cut anywhere later: l3, since either the IP header
            // is incomplete or its length field points past the end of the frame.
            let counter = if len < l3 { stat::PASS_MALFORMED_L2 } else { stat::PASS_MALFORMED_L3 };
            lab.expect_pass(cut, counter, &what);
            let after = lab.global();
            let sum = |v: &[u64]| malformed.iter().map(|&i| v[i as usize]).sum::<u64>();
            assert_eq!(sum(&after) - sum(&before), 1, "{what}: malformed counters");
            if (l4..l4 + l4_hlen).contains(&len) {
                let mut fitted = cut.to_vec();
                fit_length(&mut fitted, l3);
                lab.expect_pass(&fitted, stat::PASS_MALFORMED_L4, &format!("{what}, IP length fitted to the cut"));
            }
        }
    }
}

#[test]
fn malformed_ip_headers_fragments_and_extension_headers_pass() {
    let mut lab = Lab::new(&[web(), web6()]);
    let (c4, vip) = (ip("198.18.0.100"), ip("198.18.1.10"));
    let good = Flow::tcp(c4, vip, 40000, 80).frame(None, 16);
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut v = good.clone();
        f(&mut v);
        fix_ipv4_checksum(&mut v, ETH_HLEN);
        v
    };
    for ihl in 0..5u8 {
        lab.expect_pass(&edit(&|v| v[14] = 0x40 | ihl), stat::PASS_MALFORMED_L3, &format!("IPv4 IHL {ihl}"));
    }
    for version in [0u8, 6, 15] {
        lab.expect_pass(&edit(&|v| v[14] = version << 4 | 5), stat::PASS_MALFORMED_L3, &format!("IPv4 frame, version {version}"));
    }
    lab.expect_pass(&edit(&|v| v[16..18].copy_from_slice(&19u16.to_be_bytes())), stat::PASS_MALFORMED_L3, "tot_len 19 < IHL*4");
    let opts = ethernet(None, ETH_P_IP, &ipv4_opts(ip4("198.18.0.100"), ip4("198.18.1.10"), 6, &[1, 1, 1, 0], &tcp(40000, 80, &[])));
    for tot_len in [20u16, 23] {
        let mut f = opts.clone();
        f[16..18].copy_from_slice(&tot_len.to_be_bytes());
        fix_ipv4_checksum(&mut f, ETH_HLEN);
        lab.expect_pass(&f, stat::PASS_MALFORMED_L3, &format!("IHL 6, tot_len {tot_len} < 24"));
    }
    let long = good.len() as u16 - 14 + 1;
    lab.expect_pass(&edit(&|v| v[16..18].copy_from_slice(&long.to_be_bytes())), stat::PASS_MALFORMED_L3, "tot_len beyond the frame");
    let mut six = Flow::tcp(ip("2001:db8::100"), ip("2001:db8:1::10"), 40000, 80).frame(None, 16);
    let six_good = six.clone();
    six[14] = 0x40;
    lab.expect_pass(&six, stat::PASS_MALFORMED_L3, "IPv6 frame, version 4");
    six = six_good.clone();
    let plen = six.len() as u16 - 54 + 1;
    six[18..20].copy_from_slice(&plen.to_be_bytes());
    lab.expect_pass(&six, stat::PASS_MALFORMED_L3, "IPv6 payload_len beyond the frame");

    for (frag, what) in [(0x2000u16, "MF set"), (0x00b9, "offset 1480"), (0x20b9, "MF and offset"), (0x4001, "DF and offset 8")] {
        let f = edit(&|v| v[20..22].copy_from_slice(&frag.to_be_bytes()));
        lab.expect_pass(&f, stat::PASS_FRAGMENT, &format!("IPv4 fragment to the VIP ({what})"));
    }
    let to_other = Flow::tcp(c4, ip("198.18.1.99"), 40000, 80).frame(None, 16);
    let mut frag = to_other.clone();
    frag[20] = 0x20;
    lab.expect_pass(&frag, stat::PASS_NOT_VIP, "IPv4 fragment to a non-VIP");
    // Not fragments: DF alone (the builder's default), no flags, and Ethernet padding after tot_len.
    let web = lab.svc("web");
    lab.forward(web, &good, "DF set");
    lab.forward(web, &edit(&|v| v[20..22].fill(0)), "no IPv4 flags");
    lab.forward(web, &[&good[..], &[0u8; 6][..]].concat(), "Ethernet padding after the IP packet");

    let hbh = [&[6u8, 0, 1, 4, 0, 0, 0, 0][..], &tcp(40000, 80, b"hi")].concat(); // hop-by-hop, PadN, then TCP
    let f = ethernet(None, ETH_P_IPV6, &ipv6(ip6("2001:db8::100"), ip6("2001:db8:1::10"), PROTO_HOPOPT, &hbh));
    lab.expect_pass(&f, stat::PASS_NOT_L4, "IPv6 hop-by-hop header to the VIP");
    let frag6 = [&[6u8, 0, 0, 1, 0, 0, 0, 7][..], &tcp(40000, 80, b"hi")].concat(); // fragment header, M set
    let f = ethernet(None, ETH_P_IPV6, &ipv6(ip6("2001:db8::100"), ip6("2001:db8:1::10"), 44, &frag6));
    lab.expect_pass(&f, stat::PASS_NOT_L4, "IPv6 fragment header to the VIP");
}

#[test]
fn service_without_resolved_backends_drops() {
    let dead = service("dead", "198.18.1.30", 80, "tcp", &["198.18.0.51", "198.18.0.52"]);
    let half = service("half", "198.18.1.30", 81, "tcp", &["198.18.0.61", "198.18.0.62", "198.18.0.63"]);
    let mut lab = Lab::with_unresolved(&[dead, half], &["198.18.0.51", "198.18.0.52", "198.18.0.62"]);
    let (s_dead, s_half) = (lab.svc("dead"), lab.svc("half"));
    assert_eq!(lab.plan.services[s_dead].value.table_size, 0, "plan gave the dead service a table");
    for sport in 40000..40020 {
        let f = Flow::tcp(ip("198.18.0.100"), ip("198.18.1.30"), sport, 80);
        assert_eq!(lab.plan.backend_for(s_dead, &f.key()), None, "plan predicts a backend for the dead service");
        let before = lab.global();
        lab.untouched(&f.frame(None, 8), XDP_DROP, &format!("dead service, source port {sport}"));
        lab.expect_delta(&before, &[(stat::DROP_NO_BACKEND, 1), (stat::CONN_MISS, 1)], "dead service");
    }
    let unresolved = lab.plan.backends.iter().find(|b| b.address == ip("198.18.0.62")).unwrap().id;
    let mut used = BTreeSet::new();
    for sport in 40000..40100 {
        let f = Flow::tcp(ip("198.18.0.100"), ip("198.18.1.30"), sport, 81);
        let got = lab.forward(s_half, &f.frame(None, 8), "service with one unresolved backend");
        assert_eq!(got, lab.predict(s_half, &f), "source port {sport}: not the predicted backend");
        assert_ne!(got, unresolved, "source port {sport}: sent to the unresolved backend");
        used.insert(got);
    }
    assert_eq!(used.len(), 2, "flows used only {used:?}");
    let stats = lab.dp.stats().unwrap();
    let id = lab.plan.services[s_dead].value.id as usize;
    assert_eq!(stats.services[id], Counters::default(), "dead service counters");
}

#[test]
fn service_and_backend_counters_are_exact() {
    let mut lab = Lab::new(&[web(), dns()]);
    let (s_web, s_dns) = (lab.svc("web"), lab.svc("dns"));
    let nsvc = lab.plan.services.len();
    let mut svc_want = vec![Counters::default(); nsvc];
    let mut be_want = vec![Counters::default(); lab.plan.backends.len()];
    let mut first_hop = BTreeMap::new();
    let (mut n, mut passed) = (0u64, 0u64);
    let before = lab.global();
    for i in 0..90u16 {
        // 30 flows, 3 frames each, of different sizes; a non-VIP frame every 10th.
        let (svc, flow) = if i % 30 < 20 {
            (s_web, Flow::tcp(ip("198.18.0.100"), ip("198.18.1.10"), 50000 + i % 30, 80))
        } else {
            (s_dns, Flow::udp(ip("198.18.0.100"), ip("198.18.1.10"), 50000 + i % 30, 53))
        };
        let frame = flow.frame(if i % 4 == 0 { Some(Q_TAG) } else { None }, usize::from(i * 17 % 700));
        let got = lab.forward(svc, &frame, &format!("frame {i}"));
        let want = *first_hop.entry((svc, flow.sport)).or_insert_with(|| lab.predict(svc, &flow));
        assert_eq!(got, want, "frame {i}: flow changed backend");
        for c in [&mut svc_want[svc], &mut be_want[got as usize]] {
            c.packets += 1;
            c.bytes += frame.len() as u64;
        }
        n += 1;
        if i % 10 == 0 {
            lab.untouched(&Flow::tcp(ip("198.18.0.100"), ip("198.18.1.99"), 1, 80).frame(None, 100), XDP_PASS, "non-VIP");
            passed += 1;
        }
    }
    let expected = [(stat::FORWARDED, n), (stat::CONN_MISS, 30), (stat::CONN_HIT, n - 30), (stat::PASS_NOT_VIP, passed)];
    lab.expect_delta(&before, &expected, "after the counted frames");
    let stats = lab.dp.stats().unwrap();
    for (i, s) in lab.plan.services.iter().enumerate() {
        assert_eq!(stats.services[s.value.id as usize], svc_want[i], "service {} counters", s.name);
    }
    for b in &lab.plan.backends {
        assert_eq!(stats.backends[b.id as usize], be_want[b.id as usize], "backend {} counters", b.address);
    }
    let zero = |v: &[Counters], from: usize| v[from..].iter().all(|c| *c == Counters::default());
    assert!(zero(&stats.services, nsvc), "counters of unused service ids moved");
    assert!(zero(&stats.backends, be_want.len()), "counters of unused backend ids moved");
}
