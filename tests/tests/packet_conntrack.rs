//! The two-part connection table at packet level (BPF_PROG_TEST_RUN): flows move
//! from `CONNTRACK` (LRU; a Maglev service's SYN from `FIRST_RECORD`) to
//! `CT_ESTABLISHED` at their second packet, keep their
//! backend there through an LRU flood and a table change, record FIN/RST and their
//! last-seen time, and stay forwarded (from the LRU) when `CT_ESTABLISHED` is full.
//!
//! Needs root: `cargo test -p lb-tests --test packet_conntrack -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use aya::{
    maps::{HashMap, MapData},
    programs::{TestRun, TestRunOptions},
};
use lb_agent::{config, conntrack::now_s, dataplane::Dataplane, plan::Plan};
use lb_common::{
    map_names, stat, FlowKey, FlowVal, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW,
};
use lb_tests::frames::{addr16, Flow, ETH_HLEN, IPV4_HLEN};

const XDP_TX: u32 = 3;
const IFACE_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0xee];
const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 10));
const TABLE: u32 = 1024;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert!(unsafe { libc::geteuid() } == 0, "the packet tests load XDP programs and need root");
}

fn yaml(backends: &[&str], established: u32) -> String {
    let list: String = backends.iter().map(|b| format!("      - address: {b}\n")).collect();
    format!(
        "conntrack_size: {TABLE}\nestablished_size: {established}\nservices:\n  - name: web\n    vip: {VIP}\n    port: 80\n    backends:\n{list}\
         \x20 - name: dns\n    vip: {VIP}\n    port: 53\n    protocol: udp\n    backends:\n{list}"
    )
}

/// Each backend's MAC names it: 02:be + its IPv4 address.
fn mac_of(a: IpAddr) -> [u8; 6] {
    let o = addr16(a);
    [0x02, 0xbe, o[12], o[13], o[14], o[15]]
}

struct Bench {
    dp: Dataplane,
    plan: Plan,
    established: u32,
}

impl Bench {
    fn new(backends: &[&str], established: u32) -> Bench {
        require_root();
        let plan = Self::plan(backends, established, None);
        let mut dp = Dataplane::load(&plan).expect("load the XDP object");
        dp.write(&plan, IFACE_MAC).expect("fill the maps");
        Bench { dp, plan, established }
    }

    fn plan(backends: &[&str], established: u32, prev: Option<&Plan>) -> Plan {
        Self::plan_with("", backends, established, prev)
    }

    /// `plan` with `globals` (top-level YAML lines) in front of the file.
    fn plan_with(globals: &str, backends: &[&str], established: u32, prev: Option<&Plan>) -> Plan {
        let text = format!("{globals}{}", yaml(backends, established));
        let cfg = config::parse(&text, "packet_conntrack.rs").expect("test config");
        let macs: BTreeMap<IpAddr, [u8; 6]> = Plan::backend_addresses(&cfg).into_iter().map(|a| (a, mac_of(a))).collect();
        Plan::next(&cfg, &macs, &Default::default(), prev)
    }

    /// As a reload: the new backend set in the same maps, ids kept.
    fn reload(&mut self, backends: &[&str]) {
        self.plan = Self::plan(backends, self.established, Some(&self.plan));
        self.dp.apply(&self.plan).expect("apply");
    }

    /// Runs a frame that must be forwarded; returns the backend address it went to.
    fn fwd(&mut self, frame: &[u8]) -> IpAddr {
        let mut out = vec![0u8; frame.len() + 64];
        let prog = self.dp.balancer().expect("balancer");
        let r = prog
            .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() })
            .expect("BPF_PROG_TEST_RUN");
        assert_eq!(r.return_value, XDP_TX, "frame not forwarded");
        let mac = &out[0..6];
        let b = self.plan.backends.iter().find(|b| b.mac.is_some_and(|m| m == mac));
        b.unwrap_or_else(|| panic!("sent to {mac:02x?}, no backend")).address
    }

    fn count(&mut self, i: u32) -> u64 {
        self.dp.stats().expect("counters").get(i)
    }

    fn table(&mut self, name: &'static str) -> HashMap<MapData, FlowKey, FlowVal> {
        let m = self.dp.map_handle(name).expect("map handle");
        HashMap::try_from(aya::maps::Map::HashMap(m)).expect("hash map")
    }

    fn entry(&mut self, name: &'static str, f: &Flow) -> Option<FlowVal> {
        // The LRU map is read through the same syscall; its type tag does not matter.
        self.table(name).get(&f.key(), 0).ok()
    }

    /// The flow's valid `FIRST_RECORD` entry (its slot holds it, check matching).
    fn first_record(&mut self, f: &Flow) -> Option<lb_common::FirstRecord> {
        let m = self.dp.map_handle(map_names::FIRST_RECORD).expect("map handle");
        let mask = m.info().expect("map info").max_entries() - 1;
        let a: aya::maps::Array<_, lb_common::FirstRecord> = aya::maps::Array::try_from(aya::maps::Map::Array(m)).expect("array");
        let r = a.get(&lb_common::first_record_slot(lb_common::flow_hash(&f.key()), mask), 0).expect("slot");
        (r.tag == lb_common::first_record_tag(&f.key()) && lb_agent::first_record::valid(&r)).then_some(r)
    }
}

fn tcp(src_last: u8, sport: u16) -> Flow {
    Flow::tcp(IpAddr::V4(Ipv4Addr::new(203, 0, 113, src_last)), VIP, sport, 80)
}

/// A flow's frame with TCP flags `flags`.
fn with_flags(f: &Flow, flags: u8) -> Vec<u8> {
    let mut frame = f.frame(None, 0);
    frame[ETH_HLEN + IPV4_HLEN + 13] = flags;
    frame
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN_ACK: u8 = 0x11;
const RST: u8 = 0x04;

#[test]
fn second_packet_moves_the_flow_to_the_established_table() {
    let mut b = Bench::new(&["198.18.0.11", "198.18.0.12", "198.18.0.13"], TABLE);
    let f = tcp(7, 40000);
    let first = b.fwd(&with_flags(&f, SYN));
    // A Maglev service's SYN is recorded in `FIRST_RECORD`, not `CONNTRACK`
    // (`packet_first_record.rs` has the details).
    assert!(b.entry(map_names::CONNTRACK, &f).is_none(), "the SYN went into CONNTRACK");
    assert!(b.first_record(&f).is_some(), "the SYN left no first record");
    assert!(b.entry(map_names::CT_ESTABLISHED, &f).is_none(), "established after one packet");
    assert_eq!(b.fwd(&with_flags(&f, ACK)), first, "the ACK follows the SYN");
    let est = b.entry(map_names::CT_ESTABLISHED, &f).expect("established after the ACK");
    assert_eq!(est.state, CT_STATE_ESTABLISHED);
    assert!(now_s().abs_diff(est.last_seen) <= 1, "last_seen {} vs now {}", est.last_seen, now_s());
    assert!(b.entry(map_names::CONNTRACK, &f).is_none(), "the flow went into CONNTRACK");
    assert!(b.first_record(&f).is_none(), "the first record is emptied once taken");
    assert_eq!(b.count(stat::CT_PROMOTED), 1);

    // Later packets refresh last_seen (written back as 0 here to see it move).
    b.table(map_names::CT_ESTABLISHED).insert(f.key(), FlowVal { last_seen: 0, ..est }, 0).expect("age the entry");
    assert_eq!(b.fwd(&with_flags(&f, ACK)), first);
    let est = b.entry(map_names::CT_ESTABLISHED, &f).expect("still established");
    assert!(now_s().abs_diff(est.last_seen) <= 1, "last_seen not refreshed: {}", est.last_seen);

    // The client's FIN marks it closing (shorter timeout); so does an RST.
    assert_eq!(b.fwd(&with_flags(&f, FIN_ACK)), first);
    assert_eq!(b.entry(map_names::CT_ESTABLISHED, &f).expect("entry").state, CT_STATE_CLOSING);
    let g = tcp(8, 40000);
    let to = b.fwd(&with_flags(&g, SYN));
    b.fwd(&with_flags(&g, ACK));
    assert_eq!(b.fwd(&with_flags(&g, RST)), to);
    assert_eq!(b.entry(map_names::CT_ESTABLISHED, &g).expect("entry").state, CT_STATE_CLOSING);

    // UDP: the second datagram (the first in `CONNTRACK`).
    let u = Flow::udp(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)), VIP, 5353, 53);
    b.fwd(&u.frame(None, 4));
    assert_eq!(b.entry(map_names::CONNTRACK, &u).expect("the first datagram's entry").state, CT_STATE_NEW);
    assert!(b.entry(map_names::CT_ESTABLISHED, &u).is_none());
    b.fwd(&u.frame(None, 4));
    assert!(b.entry(map_names::CT_ESTABLISHED, &u).is_some(), "UDP established at its second datagram");
}

/// A flow established before a flood of two-packet flows (SYN, ACK) 20 times the
/// LRU's size keeps its backend after a table change; with `established_size: 0`
/// it moves. (One-packet floods do not evict it even then: the kernel's LRU keeps
/// referenced entries on its active list and evicts unreferenced ones first.)
fn flood_then_change(established: u32) -> (IpAddr, IpAddr) {
    let old = ["198.18.0.11", "198.18.0.12"];
    let new = ["198.18.0.11", "198.18.0.12", "198.18.0.13", "198.18.0.14"];
    let mut b = Bench::new(&old, established);
    // A flow that Maglev moves once the new backends are there.
    let after = Bench::plan(&new, established, Some(&b.plan));
    let f = (40000..41000)
        .map(|p| tcp(7, p))
        .find(|f| {
            let web = |p: &Plan| p.backend_for(0, &f.key()).and_then(|id| p.backend(id)).map(|x| x.address);
            web(&b.plan) != web(&after)
        })
        .expect("a flow that moves");
    let first = b.fwd(&with_flags(&f, SYN));
    b.fwd(&with_flags(&f, ACK));
    for i in 0..20 * TABLE {
        let g = Flow::tcp(IpAddr::V4(Ipv4Addr::from(0x6440_0000 + i)), VIP, 1024 + (i % 60000) as u16, 80);
        b.fwd(&with_flags(&g, SYN));
        b.fwd(&with_flags(&g, ACK));
    }
    b.reload(&new);
    (first, b.fwd(&with_flags(&f, ACK)))
}

#[test]
fn established_flows_keep_their_backend_through_an_lru_flood() {
    let (before, after) = flood_then_change(TABLE);
    assert_eq!(before, after, "the established flow moved after the flood and the table change");
    // The control: without the established table the flood evicts the flow.
    let (before, after) = flood_then_change(0);
    assert_ne!(before, after, "without protection the flow should have been evicted and moved");
}

#[test]
fn a_full_established_table_leaves_new_flows_in_the_lru() {
    let mut b = Bench::new(&["198.18.0.11", "198.18.0.12", "198.18.0.13"], TABLE);
    for i in 0..TABLE {
        let f = Flow::tcp(IpAddr::V4(Ipv4Addr::from(0x6440_0000 + i)), VIP, 2000, 80);
        b.fwd(&with_flags(&f, SYN));
        b.fwd(&with_flags(&f, ACK));
    }
    assert_eq!(b.count(stat::CT_PROMOTED), u64::from(TABLE), "every flow promoted while there was room");
    let f = tcp(7, 40000);
    let to = b.fwd(&with_flags(&f, SYN));
    assert_eq!(b.fwd(&with_flags(&f, ACK)), to, "forwarded from the LRU all the same");
    assert_eq!(b.fwd(&with_flags(&f, ACK)), to);
    assert_eq!(b.count(stat::CT_ESTABLISHED_FULL), 2, "each packet that could not be promoted is counted");
    assert!(b.entry(map_names::CONNTRACK, &f).is_some(), "the flow stays in the LRU");
    assert!(b.first_record(&f).is_none(), "the first record is emptied once taken");
    assert!(b.entry(map_names::CT_ESTABLISHED, &f).is_none());
}

/// The program's side of the per-backend counts (`BACKEND_CONN_DELTA`): a SYN
/// left in `FIRST_RECORD` is not counted (the sweep counts half-open records),
/// the ACK counts the flow active, FIN moves it to inactive; a UDP flow (a
/// `CONNTRACK` insert) counts inactive. Counts are read as the agent reads them
/// (base + delta, base 0 here: no sweep runs).
#[test]
fn backend_counts_follow_the_flow_states() {
    let mut b = Bench::new(&["198.18.0.11", "198.18.0.12", "198.18.0.13"], TABLE);
    let conns = |b: &mut Bench, a: IpAddr| {
        let id = b.plan.backends.iter().find(|x| x.address == a).expect("backend").id;
        b.dp.stats().expect("counters").conns[id as usize]
    };
    let f = tcp(21, 41000);
    let to = b.fwd(&with_flags(&f, SYN));
    assert_eq!(conns(&mut b, to), (0, 0), "after the SYN (a first record: no locked add)");
    b.fwd(&with_flags(&f, ACK));
    assert_eq!(conns(&mut b, to), (1, 0), "after the ACK");
    b.fwd(&with_flags(&f, ACK));
    assert_eq!(conns(&mut b, to), (1, 0), "after a second ACK");
    b.fwd(&with_flags(&f, FIN_ACK));
    assert_eq!(conns(&mut b, to), (0, 1), "after the FIN");
    b.fwd(&with_flags(&f, FIN_ACK));
    assert_eq!(conns(&mut b, to), (0, 1), "after a second FIN");

    // A SYN reusing the closing flow's 5-tuple: rescheduled in place, counted once.
    let again = b.fwd(&with_flags(&f, SYN));
    // Both services' backends (the same addresses under other ids).
    let total = |b: &mut Bench| b.dp.stats().expect("counters").conns.iter().fold((0, 0), |s, c| (s.0 + c.0, s.1 + c.1));
    assert_eq!(total(&mut b), (1, 0), "the reused 5-tuple counts once, as established (on {again})");

    let u = Flow::udp(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 22)), VIP, 5300, 53);
    let before = total(&mut b);
    b.fwd(&u.frame(None, 4));
    b.fwd(&u.frame(None, 4));
    b.fwd(&u.frame(None, 4));
    assert_eq!(total(&mut b), (before.0, before.1 + 1), "a UDP flow is one inactive connection");
}

/// The verifier's work per program (instructions processed, of its 1,000,000
/// limit): the least-connection scan is a bounded loop the verifier walks round by
/// round, so this is what bounds `LC_EXACT_MAX`. A third of the limit is kept
/// free for what comes next (measured with `LC_EXACT_MAX` 4: lb_xdp 543,950,
/// lb_xdp_trace 587,695), a quarter for `lb_prefix`, the largest: it went from
/// 621,000 to 700,000 with the 16-bit `MAGLEV` slots (the `Slot` struct that
/// change needed took `lb_xdp` from 432,000 to 346,000).
#[test]
fn verifier_work_stays_well_under_the_limit() {
    let mut b = Bench::new(&["198.18.0.11"], TABLE);
    for name in [
        lb_common::PROG_BALANCER,
        lb_common::PROG_BALANCER_TRACE,
        lb_common::PROG_RARE,
        lb_common::PROG_RARE_TRACE,
        lb_common::PROG_PREFIX,
        lb_common::PROG_NAT,
        lb_common::PROG_NAT_REPLY,
    ] {
        let prog: &mut aya::programs::Xdp =
            b.dp.ebpf_mut().program_mut(name).expect("program").try_into().expect("XDP");
        // The traced programs are loaded when a trace first needs them, the
        // prefix program with the first prefix service.
        if prog.fd().is_err() {
            prog.load().expect("load a traced program");
        }
        let n = prog.info().expect("program info").verified_instruction_count().expect("verified_insns");
        eprintln!("{name}: {n} instructions verified");
        let limit = if name == lb_common::PROG_PREFIX { 750_000 } else { 666_000 };
        assert!(n < limit, "{name}: {n} instructions verified");
    }
}

/// During a SYN flood (this CPU past `syn_flood_kps` thousand SYNs in the current
/// second) a Maglev service's SYN is forwarded without being recorded (neither in
/// `FIRST_RECORD`, where it goes below the threshold, nor in `CONNTRACK`); the
/// flow's ACK goes to the same backend and is recorded then (as a midflow miss),
/// and its next packet moves it to `CT_ESTABLISHED`.
#[test]
fn syns_past_the_flood_threshold_go_unrecorded() {
    let backends = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];
    let mut b = Bench::new(&backends, TABLE);
    // The threshold from the file, as a reload writes it.
    b.plan = Bench::plan_with("syn_flood_kps: 1\n", &backends, TABLE, Some(&b.plan));
    b.dp.apply(&b.plan).expect("apply");
    let (recorded_before, unrecorded_before) = (b.count(stat::CT_PROMOTED), b.count(stat::CT_SYN_UNRECORDED));
    // Distinct flows until one SYN goes unrecorded (the threshold is 1,000 per CPU
    // and second; the loop takes well under a second).
    let mut found = None;
    for i in 0..5000u32 {
        let f = Flow::tcp(IpAddr::V4(Ipv4Addr::from(0x6440_0000 + i)), VIP, 1024 + (i % 60000) as u16, 80);
        let to = b.fwd(&with_flags(&f, SYN));
        if b.count(stat::CT_SYN_UNRECORDED) > unrecorded_before {
            found = Some((f, to, i));
            break;
        }
        assert!(b.first_record(&f).is_some(), "SYN {i} below the threshold is recorded");
    }
    let (f, to, i) = found.expect("no SYN of 5,000 went unrecorded with the threshold at 1,000 per second");
    assert!(i >= 1000, "only {i} SYNs recorded before the threshold");
    assert!(b.entry(map_names::CONNTRACK, &f).is_none(), "the unrecorded SYN left a CONNTRACK entry");
    assert!(b.first_record(&f).is_none(), "the unrecorded SYN left a first record");
    let midflow = b.count(stat::CT_MIDFLOW_MISS);
    assert_eq!(b.fwd(&with_flags(&f, ACK)), to, "the ACK goes where the unrecorded SYN went");
    assert_eq!(b.count(stat::CT_MIDFLOW_MISS), midflow + 1, "the ACK is a midflow miss");
    assert!(b.entry(map_names::CONNTRACK, &f).is_some(), "the ACK is recorded");
    assert_eq!(b.fwd(&with_flags(&f, ACK)), to);
    assert!(b.entry(map_names::CT_ESTABLISHED, &f).is_some(), "the third packet establishes the flow");
    assert_eq!(b.count(stat::CT_PROMOTED), recorded_before + 1);
    // Threshold off (`syn_flood_kps: 0` in the file): every SYN recorded again.
    b.plan = Bench::plan_with("syn_flood_kps: 0\n", &backends, TABLE, Some(&b.plan));
    b.dp.apply(&b.plan).expect("apply");
    let g = tcp(9, 45000);
    b.fwd(&with_flags(&g, SYN));
    assert!(b.first_record(&g).is_some(), "with syn_flood_kps 0 every SYN is recorded");
}

/// One sweep of `CT_ESTABLISHED` with the SYN filter, as the agent's sweep task
/// runs it (`conntrack::run`).
fn sweep_with(b: &mut Bench, f: &mut lb_agent::syn_filter::SynFilter) {
    let mut table = b.table(map_names::CT_ESTABLISHED);
    let (mut status, mut counts) = (Default::default(), Default::default());
    let t = config::Timeouts::default();
    let complete = lb_agent::conntrack::sweep_with_filter(&mut table, now_s(), &t, &mut status, &mut counts, f);
    assert!(complete, "the walk ended early");
}

/// The SYN filter (`lb_common::syn_filter`): while it is off every SYN looks
/// `CT_ESTABLISHED` up; the agent turns it on at its second sweep; then a SYN
/// whose bit is clear skips the lookup (an entry written behind the program's
/// back, without its bit, is not found), the program sets the bit of every flow
/// it establishes (through `FIRST_RECORD` and through `CONNTRACK`), so a SYN
/// reusing an established flow's 5-tuple still finds its entry, and each rebuild
/// sets the bits of what the table holds and drops those of what left it.
#[test]
fn syns_skip_the_established_table_only_when_their_filter_bit_is_clear() {
    let mut b = Bench::new(&["198.18.0.11", "198.18.0.12", "198.18.0.13"], TABLE);
    let mut filter = lb_agent::syn_filter::SynFilter::new(b.dp.map_handle(map_names::CT_SYN_FILTER).expect("map handle"))
        .expect("map CT_SYN_FILTER");
    // An entry written here, behind the program's back (no bit), closing: a SYN
    // that finds it reschedules the flow in place, which makes it established.
    let (d, e, m) = (tcp(19, 40999), tcp(20, 41000), tcp(21, 41001));
    b.fwd(&with_flags(&d, SYN));
    b.fwd(&with_flags(&d, ACK));
    let est = b.entry(map_names::CT_ESTABLISHED, &d).expect("d established");
    let closing = FlowVal { state: CT_STATE_CLOSING, ..est };
    let plant = |b: &mut Bench, f: &Flow| b.table(map_names::CT_ESTABLISHED).insert(f.key(), closing, 0).expect("plant");
    let found_by_syn = |b: &mut Bench, f: &Flow| {
        b.fwd(&with_flags(f, SYN));
        let v = b.entry(map_names::CT_ESTABLISHED, f).expect("the entry stays");
        v.state == CT_STATE_ESTABLISHED
    };
    let (g, h) = (tcp(22, 41002), tcp(23, 41003));
    plant(&mut b, &g);
    assert!(found_by_syn(&mut b, &g), "off: a SYN looks the table up");
    sweep_with(&mut b, &mut filter);
    assert!(!filter.is_on(), "on after one sweep");
    sweep_with(&mut b, &mut filter);
    assert!(filter.is_on(), "off after two sweeps");
    plant(&mut b, &h);
    assert!(!found_by_syn(&mut b, &h), "on: a SYN whose bit is clear looked the table up");
    // Established by the program while the filter is on, through `FIRST_RECORD`
    // (SYN, ACK) and through `CONNTRACK` (two ACKs: a midflow miss, then its
    // promotion): their bits are set, so a SYN reusing their 5-tuple finds them.
    b.fwd(&with_flags(&e, SYN));
    b.fwd(&with_flags(&e, ACK));
    b.fwd(&with_flags(&m, ACK));
    b.fwd(&with_flags(&m, ACK));
    for f in [&e, &m] {
        assert!(b.entry(map_names::CT_ESTABLISHED, f).is_some(), "not established");
        plant(&mut b, f);
        assert!(found_by_syn(&mut b, f), "a SYN reusing a flow the program established missed its entry");
    }
    // The next rebuild walks the table: h's bit is set now.
    plant(&mut b, &h);
    sweep_with(&mut b, &mut filter);
    assert!(found_by_syn(&mut b, &h), "a rebuilt filter lacks the bit of an entry in the table");
    // Gone from the table: the next rebuild (the other copy, zeroed) drops its bit.
    b.table(map_names::CT_ESTABLISHED).remove(&h.key()).expect("remove h");
    sweep_with(&mut b, &mut filter);
    plant(&mut b, &h);
    assert!(!found_by_syn(&mut b, &h), "the bit of an entry that left the table survived a rebuild");
    plant(&mut b, &g);
    assert!(found_by_syn(&mut b, &g), "g is in the table and walked: its bit is set");
}
