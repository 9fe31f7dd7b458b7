//! Packet-level tests of the XDP program through BPF_PROG_TEST_RUN: hand-built
//! frames in; verdict, output frame and counters checked against what the agent's
//! plan predicts. Each test loads its own object, so its maps start empty.
//!
//! Needs root: `cargo test -p lb-tests --test packet -- --test-threads=1`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::{
    maps::Array,
    programs::{ProgramError, TestRun, TestRunOptions},
};
use lb_agent::{
    config,
    dataplane::Dataplane,
    plan::{Plan, PlannedService},
};
use lb_common::{
    Config, Counters, PROTO_TCP, PROTO_UDP, flow_hash, maglev_slot, map_names, stat::*,
};
use lb_tests::frames::*;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
/// Given to `Dataplane::write`: source MAC of forwarded frames. Differs from the
/// frames' destination MAC (`LB_MAC`), so the rewrite shows.
const IFACE_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0xee];
const C4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 100));
const C6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100));
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const VIP: IpAddr = IpAddr::V4(VIP4);
const VIP6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10));
/// Addresses that carry no service.
const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 99));
const OTHER6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x99));

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("the packet tests load XDP programs and need root: run them with sudo");
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("bad address {s}: {e}"))
}

/// The client address of `dst`'s family.
fn client(dst: IpAddr) -> IpAddr {
    if dst.is_ipv4() { C4 } else { C6 }
}

/// A small TCP or UDP frame from the client to `dst`:`dport`.
fn seg(proto: u8, dst: IpAddr, dport: u16) -> Vec<u8> {
    let flow = Flow {
        proto,
        ..Flow::tcp(client(dst), dst, 1234, dport)
    };
    flow.frame(None, 8)
}

/// Each backend's MAC is derived from its address, so a MAC names one backend.
fn mac_of(addr: IpAddr) -> [u8; 6] {
    let o = addr16(addr);
    [0x02, 0xbe, o[12], o[13], o[14], o[15]]
}

/// One service in YAML; a backend written `addr*w` has weight `w`.
fn service(name: &str, vip: &str, port: u16, proto: &str, backends: &[&str]) -> String {
    let mut s = format!("  - {{ name: {name}, vip: \"{vip}\", port: {port}, protocol: {proto},");
    s += " backends: [";
    for b in backends {
        let (addr, w) = b.split_once('*').unwrap_or((b, "1"));
        s += &format!("{{ address: \"{addr}\", weight: {w} }}, ");
    }
    s + "] }\n"
}

fn web_of(backends: &[&str]) -> String {
    service("web", "198.18.1.10", 80, "tcp", backends)
}
fn web() -> String {
    web_of(&["198.18.0.11", "198.18.0.12", "198.18.0.13*2"])
}
fn web6() -> String {
    let backends = ["2001:db8::11", "2001:db8::12", "2001:db8::13"];
    service("web6", "2001:db8:1::10", 80, "tcp", &backends)
}
fn dns() -> String {
    let backends = ["198.18.0.21", "198.18.0.22", "198.18.0.23"];
    service("dns", "198.18.1.10", 53, "udp", &backends)
}

fn config_for(services: &[String]) -> config::Config {
    let yaml = format!("conntrack_size: 4096\nservices:\n{}", services.concat());
    config::parse(&yaml, "packet.rs").unwrap_or_else(|e| panic!("test config rejected: {e}\n{yaml}"))
}

/// The plan for `services`; backends listed in `unresolved` get no MAC.
fn plan_for(services: &[String], unresolved: &[&str]) -> Plan {
    let cfg = config_for(services);
    let macs: BTreeMap<IpAddr, [u8; 6]> = Plan::backend_addresses(&cfg)
        .into_iter()
        .filter(|a| !unresolved.iter().any(|u| ip(u) == *a))
        .map(|a| (a, mac_of(a)))
        .collect();
    Plan::build(&cfg, &macs)
}

/// The backend a new flow gets: lb-common's flow hash on the plan's Maglev table,
/// which must also be what `Plan::backend_for` says.
fn predict(plan: &Plan, svc: usize, flow: &Flow) -> u32 {
    let s = &plan.services[svc];
    assert!(s.value.table_size > 0, "service {svc} has no Maglev table");
    let slot = maglev_slot(flow_hash(&flow.key()), s.value.table_size);
    let id = s.table[slot as usize];
    let agent = plan.backend_for(svc, &flow.key());
    assert_eq!(agent, Some(id), "Plan::backend_for disagrees for {flow:?}");
    id
}

/// A loaded and filled data plane and the plan it was filled from.
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
        let mut dp = Dataplane::load(&plan).expect("loading the XDP object");
        dp.write(&plan, IFACE_MAC).expect("filling the maps");
        Lab { dp, plan }
    }

    /// Writes the next plan into the same maps, as the agent does on a reload:
    /// ids carried over from the current plan (it must fit the first one's sizes).
    fn rewrite(&mut self, services: &[String], unresolved: &[&str]) {
        let fresh = plan_for(services, unresolved);
        let cfg = config_for(services);
        let macs = fresh.backends.iter().filter_map(|b| b.mac.map(|m| (b.address, m))).collect();
        self.plan = Plan::next(&cfg, &macs, &Default::default(), Some(&self.plan));
        self.dp
            .write(&self.plan, IFACE_MAC)
            .expect("rewriting the maps");
    }

    fn try_run(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        let mut out = vec![0u8; frame.len() + 256];
        let prog = self.dp.balancer().expect("the balancer program");
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let r = prog.test_run(opts)?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let len = frame.len();
        self.try_run(frame)
            .unwrap_or_else(|e| panic!("test run of {len} bytes failed: {e:?}"))
    }

    fn global(&mut self) -> Vec<u64> {
        self.dp.stats().expect("reading the counters").global
    }

    fn svc(&self, name: &str) -> usize {
        let pos = self.plan.services.iter().position(|s| s.name == name);
        pos.unwrap_or_else(|| panic!("no service {name}"))
    }

    /// The service with exactly this flow's address, port and protocol.
    fn svc_of(&self, f: &Flow) -> usize {
        let k = f.key();
        let same = |s: &&PlannedService| {
            (s.key.addr, s.key.port, s.key.proto) == (k.dst, k.dport, k.proto)
        };
        let pos = self.plan.services.iter().position(|s| same(&s));
        pos.unwrap_or_else(|| panic!("no service for {f:?}"))
    }

    fn predict(&self, svc: usize, flow: &Flow) -> u32 {
        predict(&self.plan, svc, flow)
    }

    fn addr(&self, backend: u32) -> IpAddr {
        self.plan.backend(backend).expect("backend id in the plan").address
    }

    /// Runs a frame that must be forwarded: checks XDP_TX and the DR rewrite (only
    /// the two MACs change); returns the id of the backend of `svc` it went to.
    fn forward(&mut self, svc: usize, frame: &[u8], what: &str) -> u32 {
        let (rc, out) = self.run(frame);
        assert_eq!(rc, XDP_TX, "{what}: expected XDP_TX");
        assert_eq!(out.len(), frame.len(), "{what}: output length changed");
        assert_eq!(out[6..12], IFACE_MAC, "{what}: source MAC");
        assert_eq!(out[12..], frame[12..], "{what}: rest changed");
        let mac: [u8; 6] = out[0..6].try_into().unwrap();
        let mut ours = self.plan.backends.iter().filter(|b| b.service == svc);
        let b = ours.find(|b| b.mac == Some(mac)).unwrap_or_else(|| {
            panic!("{what}: destination {mac:02x?} is no resolved backend of service {svc}")
        });
        b.id
    }

    /// Forwards `frame` and checks it reached backend `want`, counted as `counters`
    /// (conn_hit or conn_miss, and the connection-table events) plus `forwarded`.
    fn expect_fwd(&mut self, svc: usize, frame: &[u8], want: u32, counters: &[u32], what: &str) {
        let before = self.global();
        let got = self.forward(svc, frame, what);
        let (a, b) = (self.addr(got), self.addr(want));
        assert!(got == want, "{what}: sent to {a}, expected {b}");
        let mut expected = vec![(FORWARDED, 1)];
        expected.extend(counters.iter().map(|&c| (c, 1)));
        self.expect_delta(&before, &expected, what);
    }

    /// A new flow's first frame: forwarded to the predicted backend. Returns it.
    fn new_flow(&mut self, svc: usize, flow: &Flow, frame: &[u8], what: &str) -> u32 {
        let want = self.predict(svc, flow);
        self.expect_fwd(svc, frame, want, &miss_counters(frame), what);
        want
    }

    /// Runs a frame the program must leave alone: verdict `rc`, output == input.
    fn untouched(&mut self, frame: &[u8], rc: u32, what: &str) {
        let (got, out) = self.run(frame);
        assert_eq!(got, rc, "{what}: wrong verdict (1 drop, 2 pass, 3 tx)");
        assert_eq!(out, frame, "{what}: frame was modified");
    }

    /// Asserts the global counters moved by exactly `expected` since `before`.
    fn expect_delta(&mut self, before: &[u64], expected: &[(u32, u64)], what: &str) {
        let mut want = vec![0u64; COUNT as usize];
        for &(i, n) in expected {
            want[i as usize] += n;
        }
        let after = self.global();
        let got: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
        let show = |v: &[u64]| -> Vec<String> {
            let moved = v.iter().enumerate().filter(|(_, n)| **n != 0);
            moved.map(|(i, n)| format!("{}+{n}", NAMES[i])).collect()
        };
        let (got, want) = (show(&got), show(&want));
        assert!(got == want, "{what}: counters {got:?}, expected {want:?}");
    }

    /// A pass-through frame: XDP_PASS, unchanged, and `counter` (only) goes up by one.
    fn expect_pass(&mut self, frame: &[u8], counter: u32, what: &str) {
        let before = self.global();
        self.untouched(frame, XDP_PASS, what);
        self.expect_delta(&before, &[(counter, 1)], what);
    }
}

/// The TCP flags of a TCP frame (Ethernet, at most one tag, IPv4 or IPv6).
fn tcp_flags(frame: &[u8]) -> Option<u8> {
    let mut l3 = ETH_HLEN;
    let mut ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = u16::from_be_bytes([frame[16], frame[17]]);
        l3 += VLAN_HLEN;
    }
    let (proto, l4) = match ethertype {
        ETH_P_IP => (frame[l3 + 9], l3 + usize::from(frame[l3] & 0x0f) * 4),
        ETH_P_IPV6 => (frame[l3 + 6], l3 + IPV6_HLEN),
        _ => return None,
    };
    (proto == PROTO_TCP).then(|| frame[l4 + 13])
}

/// Counters of a flow's first frame: scheduled, and for TCP without SYN also a
/// mid-flow miss (no entry for a packet that is not a connection's first).
fn miss_counters(frame: &[u8]) -> Vec<u32> {
    match tcp_flags(frame) {
        Some(flags) if flags & 0x02 == 0 => vec![CONN_MISS, CT_MIDFLOW_MISS],
        _ => vec![CONN_MISS],
    }
}

/// 200 new flows (`tmpl` from source ports 40000..40200), framed by `frame`: each
/// goes to the backend the plan predicts, and every backend of the service gets some.
fn spread(lab: &mut Lab, what: &str, tmpl: Flow, frame: impl Fn(&Flow) -> Vec<u8>) {
    let svc = lab.svc_of(&tmpl);
    let mut used = BTreeSet::new();
    for sport in 40000..40200 {
        let (flow, what) = (tmpl.sport(sport), format!("{what}, source port {sport}"));
        used.insert(lab.new_flow(svc, &flow, &frame(&flow), &what));
    }
    let all = &lab.plan.services[svc].backend_ids;
    assert!(used.len() == all.len(), "{what}: only {used:?} of {all:?}");
}

#[test]
fn vip_hit_is_forwarded_to_the_predicted_backend() {
    let mut lab = Lab::new(&[web(), web6(), dns()]);
    let c = |last| IpAddr::V4(Ipv4Addr::new(198, 18, 0, last));
    let c6 = ip("2001:db8::101");
    // The tagged cases also check that the tag stays (all bytes after the MACs do).
    let cases = [
        ("IPv4 TCP", Flow::tcp(c(100), VIP, 0, 80), None),
        ("IPv6 TCP", Flow::tcp(C6, VIP6, 0, 80), None),
        ("IPv4 UDP", Flow::udp(C4, VIP, 0, 53), None),
        ("802.1Q", Flow::tcp(c(101), VIP, 0, 80), Some(Q_TAG)),
        ("802.1ad", Flow::tcp(c(102), VIP, 0, 80), Some(AD_TAG)),
        ("IPv6 802.1Q", Flow::tcp(c6, VIP6, 0, 80), Some(Q_TAG)),
    ];
    for (what, tmpl, vlan) in cases {
        spread(&mut lab, what, tmpl, |f| f.frame(vlan, 32));
    }
    // IHL 7 (NOPs, end of list): the ports must be read after the options.
    let opts = [1, 1, 1, 1, 1, 1, 1, 0];
    let c103 = Ipv4Addr::new(198, 18, 0, 103);
    let frame = |f: &Flow| {
        let ip = ipv4_opts(c103, VIP4, PROTO_TCP, &opts, &f.l4(b"x"));
        ethernet(None, ETH_P_IP, &ip)
    };
    let tmpl = Flow::tcp(c103.into(), VIP, 0, 80);
    spread(&mut lab, "IPv4 options", tmpl, frame);
}

/// Frames of the flow 198.18.0.100:`sport` -> VIP:80/tcp, from `from` on.
fn flows(from: u16) -> impl Iterator<Item = Flow> {
    (from..from + 1000).map(|p| Flow::tcp(C4, VIP, p, 80))
}

#[test]
fn connection_table_keeps_flows_on_their_backend() {
    // The added backends have higher addresses, so the old ones keep their ids
    // (ids follow address order; the connection table stores ids).
    let old = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];
    let more = [&old[..], &["198.18.0.14", "198.18.0.15", "198.18.0.16"]].concat();
    let (a, b) = (web_of(&old), web_of(&more));
    let mut lab = Lab::new(&[a]);
    let plan_b = plan_for(std::slice::from_ref(&b), &[]);
    // A flow that Maglev sends elsewhere once the new backends exist.
    let moves = |f: &Flow| lab.predict(0, f) != predict(&plan_b, 0, f);
    let f = flows(40000).find(moves).expect("no flow moves");
    let frame = f.frame(None, 10);
    let first = lab.new_flow(0, &f, &frame, "first frame");
    lab.expect_fwd(0, &frame, first, &[CONN_HIT, CT_PROMOTED], "second frame");

    lab.rewrite(std::slice::from_ref(&b), &[]);
    assert_eq!(lab.addr(first), ip(old[first as usize]), "id changed");
    assert_ne!(lab.predict(0, &f), first, "set-up: flow should move");
    lab.expect_fwd(0, &frame, first, &[CONN_HIT], "after adding backends");
    let g = flows(41000).find(|g| lab.predict(0, g) >= 3).unwrap();
    lab.new_flow(0, &g, &g.frame(None, 0), "new flow after the change");

    // The flow's backend loses its MAC (inactive): the flow is scheduled again.
    lab.rewrite(&[b], &[old[first as usize]]);
    let next = lab.predict(0, &f);
    assert_ne!(next, first, "Maglev still picks the inactive backend");
    lab.expect_fwd(0, &frame, next, &[CONN_MISS], "after its backend left");
    lab.expect_fwd(0, &frame, next, &[CONN_HIT], "after rescheduling");
}

#[test]
fn backends_keep_their_ids_across_reloads() {
    // A backend with a lower address joins: on a first build it would take id 0
    // and renumber the others, but a reload keeps every id, so the connection
    // table still points at the right servers.
    let old = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];
    let mut lab = Lab::new(&[web_of(&old)]);
    let f = flows(40000).find(|f| lab.predict(0, f) == 1).expect("a flow to .12");
    let frame = f.frame(None, 0);
    lab.new_flow(0, &f, &frame, "first frame");
    lab.rewrite(&[web_of(&["198.18.0.10", "198.18.0.11", "198.18.0.12", "198.18.0.13"])], &[]);
    assert_eq!(lab.addr(1), ip("198.18.0.12"), "ids are stable across reloads");
    lab.expect_fwd(0, &frame, 1, &[CONN_HIT, CT_PROMOTED], "after a lower address joined");
}

#[test]
fn a_reused_backend_id_never_receives_old_flows() {
    // .12 leaves (its id is freed), a new backend joins later and is given that id
    // again with a new generation: the flow recorded for .12 must be scheduled
    // afresh, not sent to the newcomer.
    let mut lab = Lab::new(&[web_of(&["198.18.0.11", "198.18.0.12", "198.18.0.13"])]);
    let f = flows(40000).find(|f| lab.predict(0, f) == 1).expect("a flow to .12");
    let frame = f.frame(None, 0);
    lab.new_flow(0, &f, &frame, "first frame");
    lab.rewrite(&[web_of(&["198.18.0.11", "198.18.0.13"])], &[]);
    lab.rewrite(&[web_of(&["198.18.0.11", "198.18.0.13", "198.18.0.30"])], &[]);
    assert_eq!(lab.addr(1), ip("198.18.0.30"), "set-up: the newcomer took id 1");
    let want = lab.predict(0, &f);
    lab.expect_fwd(0, &frame, want, &[CONN_MISS], "old flow after its id was reused");
}

#[test]
fn a_syn_starts_a_new_flow_even_on_a_known_five_tuple() {
    // A client reusing a source port: the old connection's entry must not pin the
    // new connection to the old backend when Maglev now says otherwise.
    let old = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];
    let more = [&old[..], &["198.18.0.14", "198.18.0.15", "198.18.0.16"]].concat();
    let mut lab = Lab::new(&[web_of(&old)]);
    let plan_b = plan_for(&[web_of(&more)], &[]);
    let f = flows(40000).find(|f| lab.predict(0, f) != predict(&plan_b, 0, f)).expect("a flow that moves");
    let ack = f.frame(None, 0);
    let first = lab.new_flow(0, &f, &ack, "first connection");
    lab.rewrite(&[web_of(&more)], &[]);
    lab.expect_fwd(0, &ack, first, &[CONN_HIT, CT_PROMOTED], "the old connection stays");
    let mut syn = ack.clone();
    syn[14 + 20 + 13] = 0x02; // TCP flags: SYN only
    let want = lab.predict(0, &f);
    assert_ne!(want, first, "set-up: Maglev moved the flow");
    lab.expect_fwd(0, &syn, want, &[CONN_MISS], "a new connection on the same 5-tuple");
    lab.expect_fwd(0, &ack, want, &[CONN_HIT], "and its later packets follow it");
}

#[test]
fn a_backend_that_goes_down_and_up_takes_new_flows_again() {
    let backends = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];
    let mut lab = Lab::new(&[web_of(&backends)]);
    let cfg = config_for(&[web_of(&backends)]);
    let macs: BTreeMap<IpAddr, [u8; 6]> = backends.iter().map(|a| (ip(a), mac_of(ip(a)))).collect();
    let f = flows(40000).find(|f| lab.predict(0, f) == 1).expect("a flow to .12");
    let mut syn = f.frame(None, 0);
    syn[14 + 20 + 13] = 0x02;
    for (round, down) in [true, false, true, false].into_iter().enumerate() {
        let set: lb_agent::plan::DownSet =
            if down { [("web".to_string(), ip("198.18.0.12"))].into() } else { Default::default() };
        lab.plan = Plan::next(&cfg, &macs, &set, Some(&lab.plan));
        lab.dp.apply(&lab.plan).expect("apply");
        let want = lab.predict(0, &f);
        assert_eq!(want == 1, !down, "round {round}: the plan follows health");
        lab.expect_fwd(0, &syn, want, &[CONN_MISS], &format!("round {round}, down={down}"));
    }
}

#[test]
fn ipv6_to_an_ipv4_mapped_address_is_not_a_vip() {
    let mut lab = Lab::new(&[web()]);
    let mapped = IpAddr::V6(Ipv4Addr::new(198, 18, 1, 10).to_ipv6_mapped());
    lab.expect_pass(&seg(PROTO_TCP, mapped, 80), PASS_NOT_VIP, "IPv6 to ::ffff:198.18.1.10");
}

#[test]
fn frames_not_for_a_service_pass_untouched() {
    let mut lab = Lab::new(&[web(), web6()]);
    let (tcp, udp) = (PROTO_TCP, PROTO_UDP);
    const NO_SERVICE: u32 = PASS_NO_SERVICE;
    let lldp = ethernet(None, 0x88cc, &[0x02, 0x07, 0x04, 0, 0, 0, 0, 0, 1]);
    let arp = |vlan| arp_request(vlan, Ipv4Addr::new(198, 18, 0, 100), VIP4);
    let cases = [
        ("TCP to a non-VIP", seg(tcp, OTHER, 80), PASS_NOT_VIP),
        ("UDP to a non-VIP", seg(udp, OTHER, 80), PASS_NOT_VIP),
        ("IPv6 TCP to a non-VIP", seg(tcp, OTHER6, 80), PASS_NOT_VIP),
        ("ICMP to a non-VIP", icmp_echo(C4, OTHER), PASS_NOT_VIP),
        ("TCP to VIP:81", seg(tcp, VIP, 81), NO_SERVICE),
        ("IPv6 TCP to VIP:443", seg(tcp, VIP6, 443), NO_SERVICE),
        ("UDP to TCP-only VIP:80", seg(udp, VIP, 80), NO_SERVICE),
        ("IPv6 UDP to TCP-only VIP", seg(udp, VIP6, 80), NO_SERVICE),
        // ICMP to a VIP (echo answered, errors followed): packet_icmp.rs.
        ("ARP request for the VIP", arp(None), PASS_NOT_IP),
        ("802.1Q-tagged ARP", arp(Some(Q_TAG)), PASS_NOT_IP),
        ("LLDP", lldp, PASS_NOT_IP),
    ];
    for (what, frame, counter) in cases {
        lab.expect_pass(&frame, counter, what);
    }
    let mut tagged = seg(tcp, OTHER, 80);
    tagged.splice(12..12, [0x81, 0x00, 0x00, 0x64]);
    lab.expect_pass(&tagged, PASS_NOT_VIP, "802.1Q-tagged TCP to a non-VIP");
}

/// A frame to an address that is no VIP but shares a VIP's `VIP_FILTER` bit (a
/// Bloom-bit collision) passes as not a VIP, to a service's port or not, SYN
/// or not: the service lookup comes first for frames that miss the connection
/// table (`schedule::service_of`) and `VIP_ADDRS` says why there is none.
#[test]
fn a_vip_filter_collision_passes_as_not_a_vip() {
    let mut lab = Lab::new(&[web(), web6()]);
    let bit = lb_common::vip_filter_bit(&addr16(VIP));
    let twin = (0..=u16::MAX)
        .map(|i| IpAddr::V4(Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8)))
        .find(|a| lb_common::vip_filter_bit(&addr16(*a)) == bit)
        .expect("an address in 198.19.0.0/16 with the VIP's filter bit");
    lab.expect_pass(&seg(PROTO_TCP, twin, 80), PASS_NOT_VIP, "TCP to the VIP's port on a filter twin");
    let mut syn = seg(PROTO_TCP, twin, 80);
    syn[ETH_HLEN + 20 + 13] = 0x02; // TCP flags: SYN only
    lab.expect_pass(&syn, PASS_NOT_VIP, "a SYN to the VIP's port on a filter twin");
    lab.expect_pass(&seg(PROTO_TCP, twin, 81), PASS_NOT_VIP, "TCP to another port on a filter twin");
    lab.expect_pass(&seg(PROTO_UDP, twin, 80), PASS_NOT_VIP, "UDP on a filter twin");
}

#[test]
fn any_port_service_and_exact_port_precedence() {
    let b = ["198.18.0.31", "198.18.0.32", "198.18.0.33"];
    let any = service("any", "198.18.1.20", 0, "tcp", &b);
    let b = ["198.18.0.41", "198.18.0.42"];
    let https = service("https", "198.18.1.20", 443, "tcp", &b);
    let b = ["2001:db8::31", "2001:db8::32"];
    let any6 = service("any6", "2001:db8:1::20", 0, "udp", &b);
    let mut lab = Lab::new(&[any, https, any6]);
    let (s_any, s_https, s_any6) = (lab.svc("any"), lab.svc("https"), lab.svc("any6"));
    let (vip, vip6) = (ip("198.18.1.20"), ip("2001:db8:1::20"));
    for dport in [0, 1, 22, 80, 442, 444, 8080, 65535] {
        for sport in [1000, 2000, 3000] {
            let (f, what) = (Flow::tcp(C4, vip, sport, dport), format!("TCP to {dport}"));
            lab.new_flow(s_any, &f, &f.frame(None, 4), &what);
        }
        let (f, what) = (Flow::udp(C6, vip6, 53, dport), format!("UDP6 to {dport}"));
        lab.new_flow(s_any6, &f, &f.frame(None, 4), &what);
    }
    // new_flow() accepts only backends of `https`, never one of the any-port service.
    let mut used = BTreeSet::new();
    for f in (40000..40100).map(|p| Flow::tcp(C4, vip, p, 443)) {
        used.insert(lab.new_flow(s_https, &f, &f.frame(None, 4), "TCP to 443"));
    }
    assert_eq!(used.len(), 2, "port 443 flows used backends {used:?} only");
    let stats = lab.dp.stats().unwrap();
    let packets = |s: usize| stats.services[lab.plan.services[s].value.id as usize].packets;
    let got = (packets(s_any), packets(s_https), packets(s_any6));
    assert_eq!(got, (24, 100, 8), "packets of any, https, any6");
    // The any-port flag is per protocol: UDP to the TCP any-port VIP, TCP to the UDP one.
    let udp = Flow::udp(C4, vip, 1000, 53).frame(None, 4);
    lab.expect_pass(&udp, PASS_NO_SERVICE, "UDP to a TCP any-port VIP");
    let tcp = Flow::tcp(C6, vip6, 1000, 80).frame(None, 4);
    lab.expect_pass(&tcp, PASS_NO_SERVICE, "TCP to a UDP any-port VIP");
}

/// Sets IPv4 tot_len or IPv6 payload_len to end exactly at the end of `frame`.
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
    let cases = [
        ("IPv4 TCP", Flow::tcp(C4, VIP, 40000, 80), None),
        ("IPv4 802.1Q", Flow::tcp(C4, VIP, 40001, 80), Some(Q_TAG)),
        ("IPv4 UDP", Flow::udp(C4, VIP, 40002, 53), None),
        ("IPv6 TCP", Flow::tcp(C6, VIP6, 40003, 80), None),
        ("IPv6 802.1ad", Flow::tcp(C6, VIP6, 40004, 80), Some(AD_TAG)),
    ];
    let malformed = |v: &[u64]| {
        [PASS_MALFORMED_L2, PASS_MALFORMED_L3, PASS_MALFORMED_L4]
            .iter()
            .map(|&i| v[i as usize])
            .sum::<u64>()
    };
    for (name, flow, vlan) in cases {
        let full = flow.frame(vlan, 12);
        let svc = lab.svc_of(&flow);
        lab.forward(svc, &full, &format!("{name}: the whole frame"));
        let l3 = ETH_HLEN + if vlan.is_some() { VLAN_HLEN } else { 0 };
        let (v4, tcp) = (flow.dst.is_ipv4(), flow.proto == PROTO_TCP);
        let l4 = l3 + if v4 { IPV4_HLEN } else { IPV6_HLEN };
        let l4_end = l4 + if tcp { TCP_HLEN } else { UDP_HLEN };
        for len in 0..full.len() {
            let (cut, what) = (&full[..len], format!("{name} cut to {len}"));
            let before = lab.global();
            if len < ETH_HLEN {
                // The kernel refuses XDP test input shorter than an Ethernet header
                // (EINVAL from bpf_test_init) without running the program, so these
                // lengths cannot be tested; a NIC never hands XDP such frames anyway.
                match lab.try_run(cut) {
                    Err(ProgramError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::EINVAL) => {}
                    other => panic!("{what}: expected EINVAL from the test run, got {other:?}"),
                }
                lab.expect_delta(&before, &[], &what);
                continue;
            }
            // Cut inside the tag: l2. Anywhere later: l3, since either the IP header
            // is incomplete or its length field points past the end of the frame.
            let counter = if len < l3 {
                PASS_MALFORMED_L2
            } else {
                PASS_MALFORMED_L3
            };
            lab.expect_pass(cut, counter, &what);
            assert_eq!(malformed(&lab.global()) - malformed(&before), 1, "{what}");
            if (l4..l4_end).contains(&len) {
                let mut fitted = cut.to_vec();
                fit_length(&mut fitted, l3);
                let what = format!("{what}, length fitted");
                lab.expect_pass(&fitted, PASS_MALFORMED_L4, &what);
            }
        }
    }
}

#[test]
fn malformed_ip_headers_fragments_and_extension_headers_pass() {
    let mut lab = Lab::new(&[web(), web6()]);
    let web = lab.svc("web");
    let good = Flow::tcp(C4, VIP, 40000, 80).frame(None, 16);
    // `good` with bytes from offset `at` replaced (in the IPv4 header at 14).
    let edit = |at: usize, bytes: &[u8]| {
        let mut v = good.clone();
        v[at..at + bytes.len()].copy_from_slice(bytes);
        fix_ipv4_checksum(&mut v, ETH_HLEN);
        v
    };
    for ihl in 0..5u8 {
        let what = format!("IPv4 IHL {ihl}");
        lab.expect_pass(&edit(14, &[0x40 | ihl]), PASS_MALFORMED_L3, &what);
    }
    for version in [0u8, 6, 15] {
        let what = format!("IPv4 ethertype, version {version}");
        lab.expect_pass(&edit(14, &[version << 4 | 5]), PASS_MALFORMED_L3, &what);
    }
    lab.expect_pass(&edit(16, &[0, 19]), PASS_MALFORMED_L3, "tot_len 19 < IHL*4");
    let tot_len = (good.len() - ETH_HLEN + 1) as u16;
    let long = edit(16, &tot_len.to_be_bytes());
    lab.expect_pass(&long, PASS_MALFORMED_L3, "tot_len past the frame");
    let l4 = tcp(40000, 80, &[]);
    let opts = ipv4_opts(Ipv4Addr::new(198, 18, 0, 100), VIP4, 6, &[1, 1, 1, 0], &l4);
    for tot_len in [20u8, 23] {
        let mut f = ethernet(None, ETH_P_IP, &opts);
        f[17] = tot_len;
        fix_ipv4_checksum(&mut f, ETH_HLEN);
        let what = format!("IHL 6, tot_len {tot_len} < 24");
        lab.expect_pass(&f, PASS_MALFORMED_L3, &what);
    }
    let good6 = Flow::tcp(C6, VIP6, 40000, 80).frame(None, 16);
    let mut six = good6.clone();
    six[14] = 0x40;
    lab.expect_pass(&six, PASS_MALFORMED_L3, "IPv6 ethertype, version 4");
    six = good6.clone();
    six[19] += 1;
    lab.expect_pass(&six, PASS_MALFORMED_L3, "IPv6 payload_len past the frame");

    // Later fragments (offset 1480, with MF, DF with offset 8) whose first was
    // never seen: dropped (fragments in full: packet_icmp.rs).
    for frag in [[0x00, 0xb9], [0x20, 0xb9], [0x40, 0x01]] {
        let what = format!("IPv4 later fragment to the VIP, flags/offset {frag:02x?}");
        let before = lab.global();
        lab.untouched(&edit(20, &frag), XDP_DROP, &what);
        lab.expect_delta(&before, &[(DROP_FRAG_UNKNOWN, 1)], &what);
    }
    let mut frag = seg(PROTO_TCP, OTHER, 80);
    frag[20] = 0x20;
    lab.expect_pass(&frag, PASS_NOT_VIP, "IPv4 fragment to a non-VIP");
    // Not fragments: DF (the builder's default), no flags; padding after tot_len.
    lab.forward(web, &good, "DF set");
    lab.forward(web, &edit(20, &[0, 0]), "no IPv4 flags");
    let padded = [&good[..], &[0u8; 6]].concat();
    lab.forward(web, &padded, "Ethernet padding after the IP packet");

    // IPv6 extension headers (hop-by-hop with PadN; fragment with M set), then TCP.
    let hbh = [&[6, 0, 1, 4, 0, 0, 0, 0][..], &l4].concat();
    let f = ip_frame(None, C6, VIP6, PROTO_HOPOPT, &hbh);
    lab.expect_pass(&f, PASS_NOT_L4, "IPv6 hop-by-hop header to the VIP");
    // A first fragment (offset 0, M set) is balanced (packet_icmp.rs); with a
    // hop-by-hop header before it, it is not looked for.
    let frag6 = [&[6, 0, 0, 1, 0, 0, 0, 7][..], &l4].concat();
    let hbh_frag = [&[44, 0, 1, 4, 0, 0, 0, 0][..], &frag6].concat();
    let f = ip_frame(None, C6, VIP6, PROTO_HOPOPT, &hbh_frag);
    lab.expect_pass(&f, PASS_NOT_L4, "IPv6 fragment header after hop-by-hop to the VIP");
}

#[test]
fn service_without_resolved_backends_drops() {
    let dead = service(
        "dead",
        "198.18.1.30",
        80,
        "tcp",
        &["198.18.0.51", "198.18.0.52"],
    );
    let b = ["198.18.0.61", "198.18.0.62", "198.18.0.63"];
    let half = service("half", "198.18.1.30", 81, "tcp", &b);
    let unresolved = ["198.18.0.51", "198.18.0.52", "198.18.0.62"];
    let mut lab = Lab::with_unresolved(&[dead, half], &unresolved);
    let (s_dead, s_half) = (lab.svc("dead"), lab.svc("half"));
    let vip = ip("198.18.1.30");
    assert_eq!(lab.plan.services[s_dead].value.table_size, 0, "table");
    for f in (40000..40020).map(|p| Flow::tcp(C4, vip, p, 80)) {
        assert_eq!(lab.plan.backend_for(s_dead, &f.key()), None, "{f:?}");
        let before = lab.global();
        lab.untouched(&f.frame(None, 8), XDP_DROP, &format!("dead service, {f:?}"));
        let want = [(DROP_NO_BACKEND, 1), (CONN_MISS, 1), (CT_MIDFLOW_MISS, 1)];
        lab.expect_delta(&before, &want, "dead service");
    }
    let mut used = BTreeSet::new();
    for f in (40000..40100).map(|p| Flow::tcp(C4, vip, p, 81)) {
        used.insert(lab.new_flow(s_half, &f, &f.frame(None, 8), "half"));
    }
    let got: Vec<IpAddr> = used.iter().map(|&id| lab.addr(id)).collect();
    assert_eq!(got, [ip(b[0]), ip(b[2])], "backends used by `half`");
    let stats = lab.dp.stats().unwrap();
    let id = lab.plan.services[s_dead].value.id as usize;
    assert_eq!(stats.services[id], Counters::default(), "dead service");
}

#[test]
fn service_and_backend_counters_are_exact() {
    let mut lab = Lab::new(&[web(), dns()]);
    let nsvc = lab.plan.services.len();
    let mut svc_want = vec![Counters::default(); nsvc];
    let mut be_want = vec![Counters::default(); lab.plan.backends.len()];
    let mut first_hop = BTreeMap::new();
    let before = lab.global();
    // 30 flows (20 TCP, 10 UDP), 3 frames each, of varied sizes, some tagged; and a
    // non-VIP frame every 10th, which must not be counted.
    let (n, flows, passed) = (90u64, 30u64, 9u64);
    for i in 0..n as u16 {
        let sport = 50000 + i % 30;
        let tcp = Flow::tcp(C4, VIP, sport, 80);
        let flow = if i % 30 < 20 {
            tcp
        } else {
            Flow::udp(C4, VIP, sport, 53)
        };
        let svc = lab.svc_of(&flow);
        let vlan = (i % 4 == 0).then_some(Q_TAG);
        let frame = flow.frame(vlan, usize::from(i * 17 % 700));
        let got = lab.forward(svc, &frame, &format!("frame {i}"));
        let new_flow = !first_hop.contains_key(&sport);
        let hop = first_hop.entry(sport);
        let want = *hop.or_insert_with(|| lab.predict(svc, &flow));
        assert_eq!(got, want, "frame {i}: flow changed backend");
        for c in [&mut svc_want[svc], &mut be_want[got as usize]] {
            c.packets += 1;
            c.bytes += frame.len() as u64;
            c.new_flows += u64::from(new_flow);
        }
        if i % 10 == 0 {
            lab.untouched(&seg(PROTO_TCP, OTHER, 80), XDP_PASS, "non-VIP");
        }
    }
    let expected = [
        (FORWARDED, n),
        (CONN_MISS, flows),
        (CONN_HIT, n - flows),
        // TCP flows start with an ACK here (no SYN seen): a mid-flow miss each.
        (CT_MIDFLOW_MISS, 20),
        // Every flow's second frame moves it to CT_ESTABLISHED.
        (CT_PROMOTED, flows),
        (PASS_NOT_VIP, passed),
    ];
    lab.expect_delta(&before, &expected, "after all frames");
    let stats = lab.dp.stats().unwrap();
    for (i, s) in lab.plan.services.iter().enumerate() {
        let (got, name) = (stats.services[s.value.id as usize], &s.name);
        assert_eq!(got, svc_want[i], "service {name}");
    }
    for b in &lab.plan.backends {
        let (got, addr) = (stats.backends[b.id as usize], b.address);
        assert_eq!(got, be_want[b.id as usize], "backend {addr}");
    }
    // Unused ids (the maps are larger than the plan) stay at zero.
    let zero = |v: &[Counters]| v.iter().all(|c| *c == Counters::default());
    assert!(zero(&stats.services[nsvc..]), "unused service ids");
    assert!(zero(&stats.backends[be_want.len()..]), "unused backend ids");
}

#[test]
fn vip_traffic_passes_until_the_maps_are_marked_ready() {
    let mut lab = Lab::new(&[web()]);
    // As while the agent is still filling the maps: all entries there, not ready.
    let map = lab.dp.ebpf_mut().map_mut(map_names::CONFIG).unwrap();
    let mut config: Array<_, Config> = map.try_into().unwrap();
    let ready = config.get(&0, 0).unwrap();
    config.set(0, Config { flags: 0, ..ready }, 0).unwrap();
    let frame = Flow::tcp(C4, VIP, 40000, 80).frame(None, 8);
    lab.expect_pass(&frame, PASS_NOT_READY, "VIP frame, maps not ready");
    lab.rewrite(&[web()], &[]);
    lab.forward(0, &frame, "VIP frame, maps ready");
}
