//! `forwarding: fullnat`'s established path at packet level (BPF_PROG_TEST_RUN
//! through `lb_xdp` and `lb_nat`): once a flow is in `CT_ESTABLISHED`, `lb_nat`
//! writes its SNAT address (as an index in the service's pool and a check of
//! the address) and port into the entry (`FlowVal::snat`), and its later
//! packets are translated from there without the `FULLNAT_FORWARD` lookup; a
//! pool whose address at that index changed is noticed (the mapping is looked
//! up again); the agent's sweep leaves a live flow's mapping and entry alone;
//! a `nat` reply is still translated while a `fullnat` service exists (its
//! `FULLNAT_REVERSE` miss first).
//!
//! Needs root: `cargo test -p lb-tests --test packet_fullnat_est -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::maps::{Array, HashMap, MapData};
use aya::programs::{TestRun, TestRunOptions};
use lb_agent::{config, dataplane::Dataplane, fullnat_table, plan::Plan};
use lb_common::{map_names, snat_check, snat_slot, stat, FlowKey, FlowVal, NatReverse, SnatFwd, SnatPool};
use lb_tests::frames::{addr16, ethernet, ipv4, ipv6, tcp, ETH_P_IP, ETH_P_IPV6, LB_MAC};

const XDP_TX: u32 = 3;

const YAML: &str = "snat_addresses: [198.18.0.2, 198.18.0.3, \"2001:db8::2\"]
snat_ports: 20000-29999
services:
  - { name: tcp4, vip: 198.18.1.10, port: 80, forwarding: fullnat, backends: [{ address: 198.18.5.11, port: 8080 }] }
  - { name: tcp6, vip: \"2001:db8:1::10\", port: 80, forwarding: fullnat, backends: [{ address: \"2001:db8:5::11\", port: 8080 }] }
  - { name: nat4, vip: 198.18.1.10, port: 81, forwarding: nat, backends: [{ address: 198.18.5.12 }] }
";

struct Lab {
    dp: Dataplane,
    plan: Plan,
}

impl Lab {
    fn new() -> Lab {
        // SAFETY: geteuid has no preconditions.
        assert!(unsafe { libc::geteuid() } == 0, "the packet tests load XDP programs and need root");
        let cfg = config::parse(YAML, "packet_fullnat_est.rs").expect("test config");
        let macs: BTreeMap<IpAddr, [u8; 6]> = Plan::backend_addresses(&cfg).into_iter().map(|a| (a, [2, 0xbe, 0, 0, 0, 1])).collect();
        let plan = Plan::build(&cfg, &macs);
        let mut dp = Dataplane::load(&plan).expect("load the XDP object");
        dp.write(&plan, LB_MAC).expect("fill the maps");
        Lab { dp, plan }
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

    fn hash<V: aya::Pod>(&mut self, name: &'static str) -> HashMap<MapData, FlowKey, V> {
        HashMap::try_from(aya::maps::Map::HashMap(self.dp.map_handle(name).expect("map"))).expect("hash map")
    }

    fn count(&mut self, i: u32) -> u64 {
        self.dp.stats().expect("counters").get(i)
    }

    fn service_id(&self, name: &str) -> u32 {
        self.plan.services.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("service {name}")).value.id
    }
}

/// A TCP ACK (no SYN) from `src` to `dst`.
fn frame(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    let seg = tcp(sport, dport, &[1, 2, 3]);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ethernet(None, ETH_P_IP, &ipv4(s, d, 6, &seg)),
        (IpAddr::V6(s), IpAddr::V6(d)) => ethernet(None, ETH_P_IPV6, &ipv6(s, d, 6, &seg)),
        _ => panic!("mixed families"),
    }
}

/// Source address and port, destination address and port of a translated frame.
fn ends(out: &[u8], v6: bool) -> (IpAddr, u16, IpAddr, u16) {
    let port = |i: usize| u16::from_be_bytes([out[i], out[i + 1]]);
    if v6 {
        let a = |i: usize| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&out[i..i + 16]).expect("16 bytes")));
        (a(22), port(54), a(38), port(56))
    } else {
        let a = |i: usize| IpAddr::V4(Ipv4Addr::new(out[i], out[i + 1], out[i + 2], out[i + 3]));
        (a(26), port(34), a(30), port(36))
    }
}

fn flow(client: IpAddr, vip: IpAddr, cport: u16) -> FlowKey {
    FlowKey { src: addr16(client), dst: addr16(vip), sport: cport, dport: 80, proto: 6, _pad: [0; 3] }
}

/// Three packets of a new flow (scheduled, promoted, then noted): returns the
/// flow's mapping and its `CT_ESTABLISHED` entry.
fn establish(lab: &mut Lab, client: IpAddr, vip: IpAddr, cport: u16) -> (SnatFwd, FlowVal) {
    let f = frame(client, vip, cport, 80);
    let mut first = None;
    for n in 0..3 {
        let (rc, out) = lab.run(&f);
        assert_eq!(rc, XDP_TX, "{client}:{cport}: packet {n} forwarded");
        let e = ends(&out, client.is_ipv6());
        assert_eq!(*first.get_or_insert(e), e, "{client}:{cport}: packet {n} leaves as the first did");
    }
    let key = flow(client, vip, cport);
    let m = lab.hash::<SnatFwd>(map_names::FULLNAT_FORWARD).get(&key, 0).expect("the flow's mapping");
    let v = lab.hash::<FlowVal>(map_names::CT_ESTABLISHED).get(&key, 0).expect("the flow's established entry");
    let (src, sport, _, _) = first.expect("three packets");
    assert_eq!((addr16(src), sport), (m.snat, m.snat_port), "{client}:{cport}: the frames leave from the mapping's address and port");
    (m, v)
}

#[test]
fn an_established_flow_is_translated_from_its_conntrack_entry() {
    let mut lab = Lab::new();
    for (client, vip, snat) in [
        (IpAddr::V4(Ipv4Addr::new(198, 18, 10, 7)), IpAddr::V4(Ipv4Addr::new(198, 18, 1, 10)), IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2))),
        (IpAddr::V6("2001:db8:10::7".parse().unwrap()), IpAddr::V6("2001:db8:1::10".parse().unwrap()), IpAddr::V6("2001:db8::2".parse().unwrap())),
    ] {
        let (m, v) = establish(&mut lab, client, vip, 40000);
        assert_eq!(m.snat, addr16(snat), "{client}: the pool's first address");
        assert_eq!(v.snat, snat_slot(m.snat_port, 0, snat_check(&m.snat)), "{client}: the entry holds the SNAT address's index and the port");
        // Without the mapping the flow still leaves from its address and port:
        // `FULLNAT_FORWARD` is not read.
        let key = flow(client, vip, 40000);
        lab.hash::<SnatFwd>(map_names::FULLNAT_FORWARD).remove(&key).expect("remove the mapping");
        let (rc, out) = lab.run(&frame(client, vip, 40000, 80));
        assert_eq!(rc, XDP_TX, "{client}: forwarded from the entry");
        let (src, sport, _, dport) = ends(&out, client.is_ipv6());
        assert_eq!((src, sport, dport), (snat, m.snat_port, 8080), "{client}: from the entry's SNAT address and port");
        // The backend's reply still goes to the client.
        let backend: IpAddr = if client.is_ipv4() { "198.18.5.11".parse().unwrap() } else { "2001:db8:5::11".parse().unwrap() };
        let (rc, out) = lab.run(&frame(backend, snat, 8080, m.snat_port));
        assert_eq!(rc, XDP_TX, "{client}: reply translated");
        assert_eq!(ends(&out, client.is_ipv6()), (vip, 80, client, 40000), "{client}: the reply from the VIP to the client");
    }
    assert_eq!(lab.count(stat::DROP_SNAT_EXHAUSTED), 0);
}

#[test]
fn a_pool_changed_under_a_flow_is_noticed() {
    let mut lab = Lab::new();
    let (client, vip) = (IpAddr::V4(Ipv4Addr::new(198, 18, 10, 8)), IpAddr::V4(Ipv4Addr::new(198, 18, 1, 10)));
    let (m, v) = establish(&mut lab, client, vip, 40001);
    assert_ne!(v.snat, [0; 3], "the entry holds the SNAT slot");
    // The pool's first address replaced (as a reload that changes the list
    // would): the entry's check no longer matches; the mapping is looked up and
    // the flow keeps the address it has.
    let id = lab.service_id("tcp4");
    let mut pools: Array<MapData, SnatPool> = Array::try_from(aya::maps::Map::Array(lab.dp.map_handle(map_names::SNAT_POOLS).expect("map"))).expect("array");
    let mut pool = pools.get(&id, 0).expect("the service's pool");
    pool.v4[0] = [198, 18, 0, 9];
    pools.set(id, pool, 0).expect("write the pool");
    let (rc, out) = lab.run(&frame(client, vip, 40001, 80));
    assert_eq!(rc, XDP_TX);
    let (src, sport, _, _) = ends(&out, false);
    assert_eq!((addr16(src), sport), (m.snat, m.snat_port), "the flow keeps its mapping's address, not the pool's new one");
}

#[test]
fn the_sweep_leaves_a_live_flow_and_its_slot_alone() {
    let mut lab = Lab::new();
    let (client, vip) = (IpAddr::V4(Ipv4Addr::new(198, 18, 10, 9)), IpAddr::V4(Ipv4Addr::new(198, 18, 1, 10)));
    let (m, v) = establish(&mut lab, client, vip, 40002);
    let key = flow(client, vip, 40002);
    let mut fwd = lab.hash::<SnatFwd>(map_names::FULLNAT_FORWARD);
    let mut rev = lab.hash::<NatReverse>(map_names::FULLNAT_REVERSE);
    let est = lab.hash::<FlowVal>(map_names::CT_ESTABLISHED);
    let new = lab.hash::<FlowVal>(map_names::CONNTRACK);
    let mut t = fullnat_table::Tables { forward: &mut fwd, reverse: &mut rev, established: &est, new: &new };
    let removed = fullnat_table::sweep(&mut t, v.last_seen + 100, &config::Timeouts::default());
    assert_eq!(removed, (0, 0), "nothing of a live flow removed");
    assert_eq!(fwd.get(&key, 0).expect("mapping kept"), m);
    assert_eq!(est.get(&key, 0).expect("entry kept").snat, v.snat, "the entry's slot kept");
    let (rc, out) = lab.run(&frame(client, vip, 40002, 80));
    assert_eq!(rc, XDP_TX);
    assert_eq!(ends(&out, false).1, m.snat_port, "the same SNAT port after the sweep");
}

#[test]
fn a_nat_reply_is_translated_while_a_fullnat_service_exists() {
    let mut lab = Lab::new();
    let (client, vip, backend) =
        (IpAddr::V4(Ipv4Addr::new(198, 18, 10, 10)), IpAddr::V4(Ipv4Addr::new(198, 18, 1, 10)), IpAddr::V4(Ipv4Addr::new(198, 18, 5, 12)));
    let (rc, out) = lab.run(&frame(client, vip, 40003, 81));
    assert_eq!(rc, XDP_TX, "nat: forwarded");
    assert_eq!(ends(&out, false), (client, 40003, backend, 81), "nat: to the backend, from the client");
    let (rc, out) = lab.run(&frame(backend, client, 81, 40003));
    assert_eq!(rc, XDP_TX, "nat: reply translated");
    assert_eq!(ends(&out, false), (vip, 81, client, 40003), "nat: the reply from the VIP");
    assert_eq!(lab.count(stat::NAT_REPLY), 1);
    assert_eq!(lab.count(stat::FULLNAT_REPLY), 0);
}

#[test]
fn a_reload_that_moves_a_pool_address_clears_the_flows_slots() {
    let mut lab = Lab::new();
    let (client, vip) = (IpAddr::V4(Ipv4Addr::new(198, 18, 10, 11)), IpAddr::V4(Ipv4Addr::new(198, 18, 1, 10)));
    let (m, v) = establish(&mut lab, client, vip, 40003);
    assert_ne!(v.snat, [0; 3], "the entry holds the SNAT slot");
    assert_eq!(m.snat, addr16("198.18.0.2".parse().unwrap()), "the pool's first address");
    // The reload puts at index 0 an address whose 5-bit check is the old one's:
    // the slot alone cannot tell them apart, so the agent clears it.
    let same_check = (4..=254)
        .map(|x| Ipv4Addr::new(198, 18, 0, x))
        .find(|a| snat_check(&addr16(IpAddr::V4(*a))) == snat_check(&m.snat))
        .expect("an address of 198.18.0.0/24 with the same check");
    let yaml = YAML.replace("198.18.0.2, 198.18.0.3", &format!("{same_check}, 198.18.0.3"));
    let cfg = config::parse(&yaml, "packet_fullnat_est.rs").expect("reloaded config");
    let macs: BTreeMap<IpAddr, [u8; 6]> = Plan::backend_addresses(&cfg).into_iter().map(|a| (a, [2, 0xbe, 0, 0, 0, 1])).collect();
    let plan = Plan::build(&cfg, &macs);
    lab.dp.write(&plan, LB_MAC).expect("apply the reload");
    let key = flow(client, vip, 40003);
    let entry = lab.hash::<FlowVal>(map_names::CT_ESTABLISHED).get(&key, 0).expect("the entry is kept");
    assert_eq!(entry.snat, [0; 3], "the slot of a flow on a moved pool address is cleared");
    assert_eq!((entry.backend_id, entry.service_id), (v.backend_id, v.service_id), "the rest of the entry kept");
    // The flow keeps its mapping's address and port, then notes no slot (its
    // address is in the pool no more).
    for n in 0..3 {
        let (rc, out) = lab.run(&frame(client, vip, 40003, 80));
        assert_eq!(rc, XDP_TX);
        let (src, sport, _, _) = ends(&out, false);
        assert_eq!((addr16(src), sport), (m.snat, m.snat_port), "packet {n} after the reload: from the mapping's address and port");
    }
}
