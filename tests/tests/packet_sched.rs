//! The schedulers at packet level (BPF_PROG_TEST_RUN): `rr`/`wrr` follow the
//! agent's rotation exactly (one shared cursor), `lc`/`wlc` send new flows to the
//! least loaded backend by the per-backend counts.
//!
//! Needs root: `cargo test -p lb-tests --test packet_sched -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use aya::{
    maps::Array,
    programs::{TestRun, TestRunOptions},
};
use lb_agent::{config, dataplane::Dataplane, plan::Plan};
use lb_common::{map_names, BackendConns};
use lb_tests::frames::{addr16, Flow, ETH_HLEN, IPV4_HLEN};

const XDP_TX: u32 = 3;
const IFACE_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0xee];
const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 10));

fn mac_of(a: IpAddr) -> [u8; 6] {
    let o = addr16(a);
    [0x02, 0xbe, o[12], o[13], o[14], o[15]]
}

struct Bench {
    dp: Dataplane,
    plan: Plan,
}

impl Bench {
    /// One TCP service on port 80 with `scheduler` over `(address, weight)`.
    fn new(scheduler: &str, backends: &[(&str, u32)]) -> Bench {
        Self::with(scheduler, "", backends)
    }

    /// `new` with more service lines (`extra`, each ending in a newline).
    fn with(scheduler: &str, extra: &str, backends: &[(&str, u32)]) -> Bench {
        // SAFETY: geteuid has no preconditions.
        assert!(unsafe { libc::geteuid() } == 0, "the packet tests load XDP programs and need root");
        let list: String = backends.iter().map(|(a, w)| format!("      - {{address: {a}, weight: {w}}}\n")).collect();
        let yaml = format!(
            "services:\n  - name: web\n    vip: {VIP}\n    port: 80\n    scheduler: {scheduler}\n{extra}    table_size: 13\n    backends:\n{list}"
        );
        let cfg = config::parse(&yaml, "packet_sched.rs").expect("test config");
        let macs: BTreeMap<IpAddr, [u8; 6]> = Plan::backend_addresses(&cfg).into_iter().map(|a| (a, mac_of(a))).collect();
        let plan = Plan::next(&cfg, &macs, &Default::default(), None);
        let mut dp = Dataplane::load(&plan).expect("load the XDP object");
        dp.write(&plan, IFACE_MAC).expect("fill the maps");
        Bench { dp, plan }
    }

    /// Sends a SYN of a new flow; returns the index (in `backends` order) of the
    /// backend it went to.
    fn syn(&mut self, n: u32) -> usize {
        self.syn_from(Ipv4Addr::new(203, 0, (n >> 8) as u8, n as u8), 10_000 + (n % 50_000) as u16)
    }

    /// A SYN from `src:sport`; returns the backend index.
    fn syn_from(&mut self, src: Ipv4Addr, sport: u16) -> usize {
        let f = Flow::tcp(IpAddr::V4(src), VIP, sport, 80);
        let mut frame = f.frame(None, 0);
        frame[ETH_HLEN + IPV4_HLEN + 13] = 0x02;
        let mut out = vec![0u8; frame.len() + 64];
        let prog = self.dp.balancer().expect("balancer");
        let r = prog
            .test_run(TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), ..Default::default() })
            .expect("BPF_PROG_TEST_RUN");
        assert_eq!(r.return_value, XDP_TX, "SYN not forwarded");
        let mac = &out[0..6];
        let mut addrs: Vec<IpAddr> = self.plan.backends.iter().map(|b| b.address).collect();
        addrs.sort_by_key(|a| addr16(*a));
        addrs.iter().position(|a| mac_of(*a) == mac).unwrap_or_else(|| panic!("sent to {mac:02x?}"))
    }

    /// Sets the agent's base count of backend `index` (address order).
    fn set_base(&mut self, index: usize, active: i64, inactive: i64) {
        let mut b: Vec<_> = self.plan.backends.iter().map(|b| (addr16(b.address), b.id)).collect();
        b.sort();
        let id = b[index].1;
        let m = self.dp.map_handle(map_names::BACKEND_CONNS).expect("map");
        let mut a: Array<_, BackendConns> = Array::try_from(aya::maps::Map::Array(m)).expect("array");
        a.set(id, BackendConns { active, inactive }, 0).expect("set base");
    }
}

fn longest_run(picks: &[usize]) -> usize {
    picks.chunk_by(|a, b| a == b).map(|r| r.len()).max().unwrap_or(0)
}

#[test]
fn rr_cycles_through_the_backends() {
    let mut b = Bench::new("rr", &[("198.18.0.11", 1), ("198.18.0.12", 5), ("198.18.0.13", 1)]);
    let picks: Vec<usize> = (0..30).map(|n| b.syn(n)).collect();
    let first = picks[0];
    for (k, p) in picks.iter().enumerate() {
        assert_eq!(*p, (first + k) % 3, "rr order broken at {k}: {picks:?}");
    }
}

#[test]
fn wrr_gives_exact_shares_in_smooth_order() {
    let mut b = Bench::new("wrr", &[("198.18.0.11", 1), ("198.18.0.12", 2), ("198.18.0.13", 3)]);
    let picks: Vec<usize> = (0..600).map(|n| b.syn(n)).collect();
    let mut counts = [0; 3];
    for p in &picks {
        counts[*p] += 1;
    }
    assert_eq!(counts, [100, 200, 300], "{picks:?}");
    // Smooth wrr over 1, 2, 3 never gives one backend more than 2 in a row.
    assert!(longest_run(&picks) <= 2, "run of {}: {:?}", longest_run(&picks), &picks[..24]);
}

#[test]
fn lc_avoids_the_loaded_backend_until_the_others_catch_up() {
    let mut b = Bench::new("lc", &[("198.18.0.11", 1), ("198.18.0.12", 1), ("198.18.0.13", 1)]);
    // Backend 0 holds 60 established connections.
    b.set_base(0, 60, 0);
    let picks: Vec<usize> = (0..60).map(|n| b.syn(n)).collect();
    assert!(!picks.contains(&0), "the loaded backend got new flows: {picks:?}");
    // New flows count as inactive (SYN seen) at once: the others share evenly.
    let ones = picks.iter().filter(|p| **p == 1).count();
    assert!(ones.abs_diff(30) <= 1, "{picks:?}");
    // Once the others hold as much (as active), backend 0 is in the running again.
    b.set_base(1, 60, -30);
    b.set_base(2, 60, -30);
    let more: Vec<usize> = (100..130).map(|n| b.syn(n)).collect();
    let zeros = more.iter().filter(|p| **p == 0).count();
    assert!(zeros.abs_diff(10) <= 1, "{more:?}");
}

#[test]
fn wlc_balances_connections_per_weight() {
    let mut b = Bench::new("wlc", &[("198.18.0.11", 1), ("198.18.0.12", 2), ("198.18.0.13", 3)]);
    let picks: Vec<usize> = (0..600).map(|n| b.syn(n)).collect();
    let mut counts = [0usize; 3];
    for p in &picks {
        counts[*p] += 1;
    }
    // Inactive (SYN-seen) counts divided by weight stay within one per weight unit.
    for (i, c) in counts.iter().enumerate() {
        let expect = 100 * (i + 1);
        assert!(c.abs_diff(expect) <= i + 1, "{counts:?}");
    }
}

#[test]
fn a_retransmitted_syn_keeps_its_backend_under_rr() {
    let mut b = Bench::new("rr", &[("198.18.0.11", 1), ("198.18.0.12", 1), ("198.18.0.13", 1)]);
    let first = b.syn(7);
    for _ in 0..5 {
        assert_eq!(b.syn(7), first, "a retransmitted SYN moved");
    }
    // The rotation was not advanced by the retransmissions.
    assert_eq!(b.syn(8), (first + 1) % 3);
}

#[test]
fn sh_keeps_a_client_prefix_on_one_backend() {
    let backends = [("198.18.0.11", 1), ("198.18.0.12", 1), ("198.18.0.13", 1)];
    let mut b = Bench::with("sh", "    prefix_v4: 24\n", &backends);
    // 50 clients of one /24, several ports each: one backend.
    let mut seen = std::collections::BTreeSet::new();
    for host in 1..=50u8 {
        for port in [1000, 2000, 3000] {
            seen.insert(b.syn_from(Ipv4Addr::new(100, 64, 7, host), port));
        }
    }
    assert_eq!(seen.len(), 1, "one /24 went to {seen:?}");
    // Clients of 20 /24s spread over all three.
    let mut counts = [0; 3];
    for net in 0..20u8 {
        counts[b.syn_from(Ipv4Addr::new(100, 64, net, 9), 4000)] += 1;
    }
    assert!(counts.iter().all(|c| *c > 0), "20 /24s: {counts:?}");
    // With the whole address (the default), clients of one /24 spread.
    let mut b = Bench::new("sh", &backends);
    let mut counts = [0; 3];
    for host in 1..=50u8 {
        counts[b.syn_from(Ipv4Addr::new(100, 64, 7, host), 1000)] += 1;
    }
    assert!(counts.iter().all(|c| *c > 5), "50 hosts, prefix 32: {counts:?}");
}
