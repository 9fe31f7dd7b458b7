//! Prefix services at packet level (BPF_PROG_TEST_RUN through `lb_xdp`, which
//! tail-calls `lb_prefix` on an exact-VIP miss): longest prefix, exact VIPs
//! first, everything else still passed; `dh` keeps each destination on one
//! backend, `lblc` moves a destination off an overloaded backend, `lblcr` adds
//! one to its set.
//!
//! Needs root: `cargo test -p lb-tests --test packet_prefix -- --test-threads=1`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use aya::{
    maps::Array,
    programs::{TestRun, TestRunOptions},
};
use lb_agent::{config, dataplane::Dataplane, plan::Plan};
use lb_common::{map_names, BackendConns};
use lb_tests::frames::{addr16, Flow, ETH_HLEN, IPV4_HLEN};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const IFACE_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0xee];
const IPV6_HLEN: usize = 40;

fn mac_of(a: IpAddr) -> [u8; 6] {
    let o = addr16(a);
    [0x02, 0xbe, o[12], o[13], o[14], o[15]]
}

struct Bench {
    dp: Dataplane,
    plan: Plan,
}

/// A service line set: `(name, vip, port, scheduler, backends)`.
type Svc<'a> = (&'a str, &'a str, u16, &'a str, &'a [&'a str]);

impl Bench {
    fn new(services: &[Svc]) -> Bench {
        // SAFETY: geteuid has no preconditions.
        assert!(unsafe { libc::geteuid() } == 0, "the packet tests load XDP programs and need root");
        let mut yaml = String::from("services:\n");
        for (name, vip, port, scheduler, backends) in services {
            let list: String = backends.iter().map(|a| format!("      - {{address: '{a}'}}\n")).collect();
            yaml += &format!(
                "  - name: {name}\n    vip: '{vip}'\n    port: {port}\n    scheduler: {scheduler}\n    table_size: 13\n    backends:\n{list}"
            );
        }
        let cfg = config::parse(&yaml, "packet_prefix.rs").expect("test config");
        let macs: BTreeMap<IpAddr, [u8; 6]> = Plan::backend_addresses(&cfg).into_iter().map(|a| (a, mac_of(a))).collect();
        let plan = Plan::next(&cfg, &macs, &Default::default(), None);
        let mut dp = Dataplane::load(&plan).expect("load the XDP object");
        dp.write(&plan, IFACE_MAC).expect("fill the maps");
        Bench { dp, plan }
    }

    /// Sends a TCP SYN `src:sport -> dst:dport`; returns the action and, when
    /// forwarded, the backend's address.
    fn syn(&mut self, src: &str, sport: u16, dst: &str, dport: u16) -> (u32, Option<IpAddr>) {
        let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        let f = Flow::tcp(src, dst, sport, dport);
        let mut frame = f.frame(None, 0);
        let l3 = if dst.is_ipv4() { IPV4_HLEN } else { IPV6_HLEN };
        frame[ETH_HLEN + l3 + 13] = 0x02;
        let mut out = vec![0u8; frame.len() + 64];
        let prog = self.dp.balancer().expect("balancer");
        let r = prog
            .test_run(TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), ..Default::default() })
            .expect("BPF_PROG_TEST_RUN");
        if r.return_value != XDP_TX {
            return (r.return_value, None);
        }
        let to = self.plan.backends.iter().map(|b| b.address).find(|a| mac_of(*a) == out[0..6]);
        (r.return_value, Some(to.unwrap_or_else(|| panic!("sent to unknown MAC {:02x?}", &out[0..6]))))
    }

    /// The backend a new flow from client `n` to `dst` goes to (it must be forwarded).
    fn to(&mut self, n: u32, dst: &str) -> IpAddr {
        let src = Ipv4Addr::new(203, 0, (n >> 8) as u8, n as u8).to_string();
        match self.syn(&src, 10_000 + (n % 50_000) as u16, dst, 80) {
            (XDP_TX, Some(a)) => a,
            other => panic!("SYN from client {n} to {dst} not forwarded: {other:?}"),
        }
    }

    /// Sets the agent's base count of the backend at `addr` (in any service).
    fn set_active(&mut self, addr: &str, active: i64) {
        let addr: IpAddr = addr.parse().unwrap();
        let ids: Vec<u32> = self.plan.backends.iter().filter(|b| b.address == addr).map(|b| b.id).collect();
        let m = self.dp.map_handle(map_names::BACKEND_CONNS).expect("map");
        let mut a: Array<_, BackendConns> = Array::try_from(aya::maps::Map::Array(m)).expect("array");
        for id in ids {
            a.set(id, BackendConns { active, inactive: 0 }, 0).expect("set base");
        }
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn a_prefix_service_takes_its_prefix_and_nothing_else() {
    let mut b = Bench::new(&[("cache", "198.18.50.0/24", 80, "maglev", &["198.18.0.11"])]);
    for host in [0, 1, 77, 255] {
        assert_eq!(b.syn("203.0.113.1", 40000, &format!("198.18.50.{host}"), 80), (XDP_TX, Some(ip("198.18.0.11"))));
    }
    // Other addresses, other ports, and an exact-VIP-less world still pass.
    assert_eq!(b.syn("203.0.113.1", 40000, "198.18.51.1", 80).0, XDP_PASS);
    assert_eq!(b.syn("203.0.113.1", 40000, "198.18.49.255", 80).0, XDP_PASS);
    assert_eq!(b.syn("203.0.113.1", 40000, "198.18.50.1", 81).0, XDP_PASS);
}

#[test]
fn ipv6_prefix_and_any_port() {
    let mut b = Bench::new(&[("cache6", "2001:db8:100::/56", 0, "maglev", &["2001:db8::11"])]);
    let to = Some(ip("2001:db8::11"));
    assert_eq!(b.syn("2001:db8:ffff::1", 40000, "2001:db8:100:ff::1", 80), (XDP_TX, to));
    assert_eq!(b.syn("2001:db8:ffff::1", 40000, "2001:db8:100::9", 5353), (XDP_TX, to));
    assert_eq!(b.syn("2001:db8:ffff::1", 40000, "2001:db8:101::1", 80).0, XDP_PASS);
}

#[test]
fn the_longest_prefix_wins_and_an_exact_vip_beats_both() {
    let mut b = Bench::new(&[
        ("wide", "198.18.48.0/20", 80, "maglev", &["198.18.0.11"]),
        ("narrow", "198.18.50.0/24", 80, "maglev", &["198.18.0.12"]),
        ("exact", "198.18.50.10", 80, "maglev", &["198.18.0.13"]),
    ]);
    assert_eq!(b.syn("203.0.113.1", 40000, "198.18.49.9", 80).1, Some(ip("198.18.0.11")));
    assert_eq!(b.syn("203.0.113.1", 40000, "198.18.63.9", 80).1, Some(ip("198.18.0.11")));
    assert_eq!(b.syn("203.0.113.1", 40000, "198.18.50.9", 80).1, Some(ip("198.18.0.12")));
    assert_eq!(b.syn("203.0.113.1", 40000, "198.18.50.10", 80).1, Some(ip("198.18.0.13")));
    assert_eq!(b.syn("203.0.113.1", 40000, "198.18.64.1", 80).0, XDP_PASS);
}

const FOUR: &[&str] = &["198.18.0.11", "198.18.0.12", "198.18.0.13", "198.18.0.14"];

#[test]
fn dh_keeps_each_destination_on_one_backend() {
    let mut b = Bench::new(&[("cache", "198.18.50.0/24", 80, "dh", FOUR)]);
    let mut used = BTreeSet::new();
    for host in 1..=40u32 {
        let dst = format!("198.18.50.{host}");
        let first = b.to(host * 100, &dst);
        for client in 1..10 {
            assert_eq!(b.to(host * 100 + client, &dst), first, "dh moved {dst} for client {client}");
        }
        used.insert(first);
    }
    assert!(used.len() >= 3, "40 destinations over 4 backends used only {used:?}");
}

#[test]
fn lblc_sticks_until_the_backend_is_overloaded_then_moves() {
    let mut b = Bench::new(&[("cache", "198.18.50.0/24", 80, "lblc", FOUR)]);
    let dst = "198.18.50.7";
    let first = b.to(1, dst);
    // Flows to one destination stay together (lc/wlc would spread them).
    for n in 2..40 {
        assert_eq!(b.to(n, dst), first, "lblc moved {dst} while not overloaded");
    }
    // Overloaded: more active connections than its weight (1) while another
    // backend has fewer than half its weight.
    b.set_active(&first.to_string(), 5);
    let second = b.to(100, dst);
    assert_ne!(second, first, "lblc kept {dst} on its overloaded backend");
    for n in 101..120 {
        assert_eq!(b.to(n, dst), second, "lblc did not keep {dst} on its new backend");
    }
    // Loaded everywhere else too: it stays (IPVS moves only when another backend
    // has room).
    for a in FOUR {
        b.set_active(a, 5);
    }
    assert_eq!(b.to(200, dst), second);
}

#[test]
fn lblcr_adds_a_backend_to_an_overloaded_destination_set() {
    let mut b = Bench::new(&[("cache", "198.18.50.0/24", 80, "lblcr", FOUR)]);
    let dst = "198.18.50.7";
    let first = b.to(1, dst);
    for n in 2..20 {
        assert_eq!(b.to(n, dst), first, "lblcr moved {dst} while not overloaded");
    }
    b.set_active(&first.to_string(), 5);
    let second = b.to(100, dst);
    assert_ne!(second, first, "lblcr did not add a backend for {dst}");
    assert_eq!(b.to(101, dst), second, "the set's least loaded member is the new one");
    // The first stays a member: once it is the least loaded again it gets the
    // destination's flows back (lblc would have forgotten it).
    b.set_active(&first.to_string(), 0);
    b.set_active(&second.to_string(), 1);
    assert_eq!(b.to(102, dst), first, "lblcr forgot the first member of {dst}'s set");
    // Other destinations have sets of their own.
    let other = b.to(300, "198.18.50.8");
    assert_eq!(b.to(301, "198.18.50.8"), other);
}
