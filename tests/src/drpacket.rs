//! Shared by the packet tests of the DR path (tests/tests/packet.rs,
//! packet_reload.rs, packet_not_ours.rs): addresses and services of the test
//! configuration, and `Lab`, the data plane loaded and filled from it under
//! `BPF_PROG_TEST_RUN`, with the checks of verdict, output frame and counters
//! against what the agent's plan predicts. Each `Lab` loads its own object, so
//! its maps start empty.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::programs::{ProgramError, TestRun, TestRunOptions};
use lb_agent::{
    config,
    dataplane::Dataplane,
    plan::{Plan, PlannedService},
};
use lb_common::{PROTO_TCP, flow_hash, maglev_slot, stat::*};

use crate::frames::*;
// `mac_of`: each backend's MAC is derived from its address, so a MAC names one
// backend (`Lab::forward` relies on it).
pub use crate::natpacket::{XDP_DROP, XDP_PASS, XDP_TX, mac_of};

/// Given to `Dataplane::write`: source MAC of forwarded frames. Differs from the
/// frames' destination MAC (`LB_MAC`), so the rewrite shows.
pub const IFACE_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0xee];
pub const C4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 100));
pub const C6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100));
pub const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
pub const VIP: IpAddr = IpAddr::V4(VIP4);
pub const VIP6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10));
/// Addresses that carry no service.
pub const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 99));
pub const OTHER6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x99));

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("the packet tests load XDP programs and need root: run them with sudo");
    }
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("bad address {s}: {e}"))
}

/// The client address of `dst`'s family.
pub fn client(dst: IpAddr) -> IpAddr {
    if dst.is_ipv4() { C4 } else { C6 }
}

/// A small TCP or UDP frame from the client to `dst`:`dport`.
pub fn seg(proto: u8, dst: IpAddr, dport: u16) -> Vec<u8> {
    let flow = Flow {
        proto,
        ..Flow::tcp(client(dst), dst, 1234, dport)
    };
    flow.frame(None, 8)
}

/// One service in YAML; a backend written `addr*w` has weight `w`.
pub fn service(name: &str, vip: &str, port: u16, proto: &str, backends: &[&str]) -> String {
    let mut s = format!("  - {{ name: {name}, vip: \"{vip}\", port: {port}, protocol: {proto},");
    s += " backends: [";
    for b in backends {
        let (addr, w) = b.split_once('*').unwrap_or((b, "1"));
        s += &format!("{{ address: \"{addr}\", weight: {w} }}, ");
    }
    s + "] }\n"
}

pub fn web_of(backends: &[&str]) -> String {
    service("web", "198.18.1.10", 80, "tcp", backends)
}
pub fn web() -> String {
    web_of(&["198.18.0.11", "198.18.0.12", "198.18.0.13*2"])
}
pub fn web6() -> String {
    let backends = ["2001:db8::11", "2001:db8::12", "2001:db8::13"];
    service("web6", "2001:db8:1::10", 80, "tcp", &backends)
}
pub fn dns() -> String {
    let backends = ["198.18.0.21", "198.18.0.22", "198.18.0.23"];
    service("dns", "198.18.1.10", 53, "udp", &backends)
}

pub fn config_for(services: &[String]) -> config::Config {
    let yaml = format!("conntrack_size: 4096\nservices:\n{}", services.concat());
    config::parse(&yaml, "drpacket.rs").unwrap_or_else(|e| panic!("test config rejected: {e}\n{yaml}"))
}

/// The plan for `services`; backends listed in `unresolved` get no MAC.
pub fn plan_for(services: &[String], unresolved: &[&str]) -> Plan {
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
pub fn predict(plan: &Plan, svc: usize, flow: &Flow) -> u32 {
    let s = &plan.services[svc];
    assert!(s.value.table_size > 0, "service {svc} has no Maglev table");
    let slot = maglev_slot(flow_hash(&flow.key()), s.value.table_size);
    let id = s.table[slot as usize];
    let agent = plan.backend_for(svc, &flow.key());
    assert_eq!(agent, Some(id), "Plan::backend_for disagrees for {flow:?}");
    id
}

/// A loaded and filled data plane and the plan it was filled from.
pub struct Lab {
    pub dp: Dataplane,
    pub plan: Plan,
}

impl Lab {
    pub fn new(services: &[String]) -> Lab {
        Lab::with_unresolved(services, &[])
    }

    pub fn with_unresolved(services: &[String], unresolved: &[&str]) -> Lab {
        require_root();
        let plan = plan_for(services, unresolved);
        let mut dp = Dataplane::load(&plan).expect("loading the XDP object");
        dp.write(&plan, IFACE_MAC).expect("filling the maps");
        Lab { dp, plan }
    }

    /// Writes the next plan into the same maps, as the agent does on a reload:
    /// ids carried over from the current plan (it must fit the first one's sizes).
    pub fn rewrite(&mut self, services: &[String], unresolved: &[&str]) {
        let fresh = plan_for(services, unresolved);
        let cfg = config_for(services);
        let macs = fresh.backends.iter().filter_map(|b| b.mac.map(|m| (b.address, m))).collect();
        self.plan = Plan::next(&cfg, &macs, &Default::default(), Some(&self.plan));
        self.dp
            .write(&self.plan, IFACE_MAC)
            .expect("rewriting the maps");
    }

    pub fn try_run(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
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

    pub fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let len = frame.len();
        self.try_run(frame)
            .unwrap_or_else(|e| panic!("test run of {len} bytes failed: {e:?}"))
    }

    pub fn global(&mut self) -> Vec<u64> {
        self.dp.stats().expect("reading the counters").global
    }

    pub fn svc(&self, name: &str) -> usize {
        let pos = self.plan.services.iter().position(|s| s.name == name);
        pos.unwrap_or_else(|| panic!("no service {name}"))
    }

    /// The service with exactly this flow's address, port and protocol.
    pub fn svc_of(&self, f: &Flow) -> usize {
        let k = f.key();
        let same = |s: &&PlannedService| {
            (s.key.addr, s.key.port, s.key.proto) == (k.dst, k.dport, k.proto)
        };
        let pos = self.plan.services.iter().position(|s| same(&s));
        pos.unwrap_or_else(|| panic!("no service for {f:?}"))
    }

    pub fn predict(&self, svc: usize, flow: &Flow) -> u32 {
        predict(&self.plan, svc, flow)
    }

    pub fn addr(&self, backend: u32) -> IpAddr {
        self.plan.backend(backend).expect("backend id in the plan").address
    }

    /// Runs a frame that must be forwarded: checks XDP_TX and the DR rewrite (only
    /// the two MACs change); returns the id of the backend of `svc` it went to.
    pub fn forward(&mut self, svc: usize, frame: &[u8], what: &str) -> u32 {
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
    pub fn expect_fwd(&mut self, svc: usize, frame: &[u8], want: u32, counters: &[u32], what: &str) {
        let before = self.global();
        let got = self.forward(svc, frame, what);
        let (a, b) = (self.addr(got), self.addr(want));
        assert!(got == want, "{what}: sent to {a}, expected {b}");
        let mut expected = vec![(FORWARDED, 1)];
        expected.extend(counters.iter().map(|&c| (c, 1)));
        self.expect_delta(&before, &expected, what);
    }

    /// A new flow's first frame: forwarded to the predicted backend. Returns it.
    pub fn new_flow(&mut self, svc: usize, flow: &Flow, frame: &[u8], what: &str) -> u32 {
        let want = self.predict(svc, flow);
        self.expect_fwd(svc, frame, want, &miss_counters(frame), what);
        want
    }

    /// Runs a frame the program must leave alone: verdict `rc`, output == input.
    pub fn untouched(&mut self, frame: &[u8], rc: u32, what: &str) {
        let (got, out) = self.run(frame);
        assert_eq!(got, rc, "{what}: wrong verdict (1 drop, 2 pass, 3 tx)");
        assert_eq!(out, frame, "{what}: frame was modified");
    }

    /// Asserts the global counters moved by exactly `expected` since `before`.
    pub fn expect_delta(&mut self, before: &[u64], expected: &[(u32, u64)], what: &str) {
        expect_moved(before, &self.global(), expected, what);
    }

    /// A pass-through frame: XDP_PASS, unchanged, and `counter` (only) goes up by one.
    pub fn expect_pass(&mut self, frame: &[u8], counter: u32, what: &str) {
        let before = self.global();
        self.untouched(frame, XDP_PASS, what);
        self.expect_delta(&before, &[(counter, 1)], what);
    }
}

/// The TCP flags of a TCP frame (Ethernet, at most one tag, IPv4 or IPv6).
pub fn tcp_flags(frame: &[u8]) -> Option<u8> {
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
pub fn miss_counters(frame: &[u8]) -> Vec<u32> {
    match tcp_flags(frame) {
        Some(flags) if flags & 0x02 == 0 => vec![CONN_MISS, CT_MIDFLOW_MISS],
        _ => vec![CONN_MISS],
    }
}

/// Asserts that the global counters went from `before` to `after` by exactly
/// `expected` (counter, increase) pairs, naming the counters that moved.
pub fn expect_moved(before: &[u64], after: &[u64], expected: &[(u32, u64)], what: &str) {
    let mut want = vec![0u64; COUNT as usize];
    for &(i, n) in expected {
        want[i as usize] += n;
    }
    let got: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let show = |v: &[u64]| -> Vec<String> {
        let moved = v.iter().enumerate().filter(|(_, n)| **n != 0);
        moved.map(|(i, n)| format!("{}+{n}", NAMES[i])).collect()
    };
    let (got, want) = (show(&got), show(&want));
    assert!(got == want, "{what}: counters {got:?}, expected {want:?}");
}
