//! The first record (`FIRST_RECORD`, lb-ebpf/src/first.rs) at packet level
//! (BPF_PROG_TEST_RUN): a Maglev service's SYN is recorded with one store in a
//! direct-mapped array instead of a `CONNTRACK` insert; the flow's ACK takes the
//! record (from any CPU), keeps the SYN's backend through a table change and
//! moves the flow to `CT_ESTABLISHED`; a colliding SYN overwrites it (the ACK is
//! then scheduled again by Maglev, to the same backend); a torn or garbage record
//! is never taken; `rr` and persistence services record their SYNs in
//! `CONNTRACK` as before.
//!
//! Needs root: `cargo test -p lb-tests --test packet_first_record -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use aya::{
    maps::{Array, HashMap, MapData},
    programs::{TestRun, TestRunOptions},
};
use lb_agent::{config, dataplane::Dataplane, first_record::valid, plan::Plan};
use lb_common::{
    first_record_check, first_record_slot, first_record_tag, flow_hash, map_names, stat, FirstRecord, FlowKey, FlowVal, CT_STATE_ESTABLISHED,
    CT_STATE_NEW,
};
use lb_tests::frames::{addr16, Flow, ETH_HLEN, IPV4_HLEN};

const XDP_TX: u32 = 3;
const IFACE_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0xee];
const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 10));
const TABLE: u32 = 1024;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert!(unsafe { libc::geteuid() } == 0, "the packet tests load XDP programs and need root");
}

/// A TCP service on port 80 (`web`) with `extra` in its YAML, over `backends`.
fn yaml(backends: &[&str], extra: &str) -> String {
    let list: String = backends.iter().map(|b| format!("      - address: {b}\n")).collect();
    format!(
        "conntrack_size: {TABLE}\nestablished_size: {TABLE}\nsyn_flood_kps: 0\nservices:\n  - name: web\n    vip: {VIP}\n    port: 80\n{extra}    backends:\n{list}"
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
    extra: String,
}

impl Bench {
    fn new(backends: &[&str], extra: &str) -> Bench {
        require_root();
        let plan = Self::plan(backends, extra, None);
        let mut dp = Dataplane::load(&plan).expect("load the XDP object");
        dp.write(&plan, IFACE_MAC).expect("fill the maps");
        Bench { dp, plan, extra: extra.to_string() }
    }

    fn plan(backends: &[&str], extra: &str, prev: Option<&Plan>) -> Plan {
        let cfg = config::parse(&yaml(backends, extra), "packet_first_record.rs").expect("test config");
        let macs: BTreeMap<IpAddr, [u8; 6]> = Plan::backend_addresses(&cfg).into_iter().map(|a| (a, mac_of(a))).collect();
        Plan::next(&cfg, &macs, &Default::default(), prev)
    }

    fn reload(&mut self, backends: &[&str]) {
        self.plan = Self::plan(backends, &self.extra, Some(&self.plan));
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

    fn entry(&mut self, name: &'static str, f: &Flow) -> Option<FlowVal> {
        let m = self.dp.map_handle(name).expect("map handle");
        let t: HashMap<MapData, FlowKey, FlowVal> = HashMap::try_from(aya::maps::Map::HashMap(m)).expect("hash map");
        t.get(&f.key(), 0).ok()
    }

    fn records(&mut self) -> (Array<MapData, FirstRecord>, u32) {
        let m = self.dp.map_handle(map_names::FIRST_RECORD).expect("map handle");
        let mask = m.info().expect("map info").max_entries() - 1;
        (Array::try_from(aya::maps::Map::Array(m)).expect("array"), mask)
    }

    fn slot(&mut self, f: &Flow) -> u32 {
        let (_, mask) = self.records();
        first_record_slot(flow_hash(&f.key()), mask)
    }

    /// What the flow's slot holds.
    fn raw_record(&mut self, f: &Flow) -> FirstRecord {
        let slot = self.slot(f);
        self.records().0.get(&slot, 0).expect("slot")
    }

    fn set_record(&mut self, f: &Flow, r: FirstRecord) {
        let slot = self.slot(f);
        self.records().0.set(slot, r, 0).expect("write the slot");
    }

    /// The flow's record if its slot holds a valid one for it.
    fn record(&mut self, f: &Flow) -> Option<FirstRecord> {
        let r = self.raw_record(f);
        (r.tag == first_record_tag(&f.key()) && valid(&r)).then_some(r)
    }

    /// What the agent's sweep counts in `FIRST_RECORD` (`first_record.rs`), and
    /// the half-open records per backend `lb-agent flows` counts from it.
    fn swept(&mut self) -> (lb_agent::conntrack::Counts, BTreeMap<u32, u64>) {
        let m = self.dp.map_handle(map_names::FIRST_RECORD).expect("map handle");
        let records = lb_agent::first_record::FirstRecords::new(m).expect("map FIRST_RECORD");
        let mut counts = lb_agent::conntrack::Counts::new();
        let (now, t) = (lb_agent::conntrack::now_s(), config::Timeouts::default());
        records.count(now, &t, &mut counts);
        (counts, records.per_backend(now, &t))
    }

    fn id_of(&self, a: IpAddr) -> u32 {
        self.plan.backends.iter().find(|x| x.address == a).expect("backend").id
    }

    fn address_of(&self, id: u32) -> IpAddr {
        self.plan.backend(id).expect("backend id").address
    }

    /// Where Maglev sends the flow now.
    fn maglev(&self, f: &Flow) -> IpAddr {
        self.address_of(self.plan.backend_for(0, &f.key()).expect("a backend"))
    }

    fn conns(&mut self, a: IpAddr) -> (u64, u64) {
        let id = self.id_of(a);
        let c = self.dp.stats().expect("counters").conns[id as usize];
        (c.0 as u64, c.1 as u64)
    }
}

fn tcp(src_last: u8, sport: u16) -> Flow {
    Flow::tcp(IpAddr::V4(Ipv4Addr::new(203, 0, 113, src_last)), VIP, sport, 80)
}

fn with_flags(f: &Flow, flags: u8) -> Vec<u8> {
    let mut frame = f.frame(None, 0);
    frame[ETH_HLEN + IPV4_HLEN + 13] = flags;
    frame
}

/// Runs the rest of the test on `cpu` (BPF_PROG_TEST_RUN runs the program on
/// the calling thread's CPU).
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set), 0, "pin the test thread to CPU {cpu}");
    }
}

const BACKENDS: [&str; 3] = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];

#[test]
fn a_syn_leaves_a_first_record_and_its_ack_on_another_cpu_takes_it() {
    let mut b = Bench::new(&BACKENDS, "");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let f = tcp(7, 40000);
    pin_to(0);
    let to = b.fwd(&with_flags(&f, SYN));
    assert!(b.entry(map_names::CONNTRACK, &f).is_none(), "the SYN went into CONNTRACK");
    let r = b.record(&f).expect("the SYN left no first record");
    assert_eq!(b.address_of(r.backend_id), to, "the record names the SYN's backend");
    // The program does not count a recorded SYN (no locked add on its path);
    // the agent's sweep counts it as half-open (inactive) in the exact base it writes.
    assert_eq!(b.conns(to), (0, 0), "the program counted the recorded SYN");
    assert_eq!(b.swept(), (BTreeMap::from([(r.backend_id, (0, 1))]), BTreeMap::from([(r.backend_id, 1)])), "the sweep's count after the SYN");
    // The ACK on the other CPU when there is one: the array is shared.
    pin_to(1 % cpus);
    assert_eq!(b.fwd(&with_flags(&f, ACK)), to, "the ACK follows the SYN");
    let est = b.entry(map_names::CT_ESTABLISHED, &f).expect("established after the ACK");
    assert_eq!((est.state, b.address_of(est.backend_id)), (CT_STATE_ESTABLISHED, to));
    assert!(b.entry(map_names::CONNTRACK, &f).is_none(), "the ACK went into CONNTRACK");
    assert!(b.record(&f).is_none(), "the record stays valid after the ACK took it");
    assert_eq!(b.conns(to), (1, 0), "after the ACK: active");
    assert_eq!(b.swept(), (BTreeMap::new(), BTreeMap::new()), "the sweep still counts the taken record");
    assert_eq!(b.count(stat::CT_PROMOTED), 1);
    assert_eq!(b.count(stat::CT_MIDFLOW_MISS), 0, "the ACK was taken for a midflow miss");
    assert_eq!(b.fwd(&with_flags(&f, ACK)), to, "later packets: a CT_ESTABLISHED hit");
    assert_eq!(b.count(stat::CT_PROMOTED), 1);
    pin_to(0);
}

/// The agent's sweep empties a valid record past `tcp_fin` (its 16-bit second
/// would otherwise look young again 65,536 s later), and its flow's ACK is then
/// a midflow miss, scheduled again by Maglev; a live one it counts and keeps.
#[test]
fn the_sweep_empties_records_past_tcp_fin() {
    let mut b = Bench::new(&BACKENDS, "");
    let (f, g) = (tcp(7, 40000), tcp(8, 40000));
    let to = b.fwd(&with_flags(&f, SYN));
    b.fwd(&with_flags(&g, SYN));
    let r = b.record(&f).expect("the SYN's record");
    let old = r.first_seen.wrapping_sub(121);
    b.set_record(&f, FirstRecord { first_seen: old, check: first_record_check(r.tag, r.backend_id, r.generation, old), ..r });
    assert!(b.record(&f).is_some(), "the aged record is valid");
    let rg = b.record(&g).expect("the other SYN's record");
    assert_eq!(b.swept().1, BTreeMap::from([(rg.backend_id, 1)]), "the sweep counts only the live record");
    assert_eq!(b.raw_record(&f).check, 0, "the sweep emptied the expired record");
    assert_eq!(b.record(&g), Some(rg), "the sweep kept the live record");
    let midflow = b.count(stat::CT_MIDFLOW_MISS);
    assert_eq!(b.fwd(&with_flags(&f, ACK)), to, "Maglev sends the ACK to the SYN's backend");
    assert_eq!(b.count(stat::CT_MIDFLOW_MISS), midflow + 1, "the ACK of the emptied record is a midflow miss");
}

/// The reason for a record at all: a reload between the SYN and the ACK that
/// moves the flow's Maglev slot to another backend does not move the handshake.
#[test]
fn the_ack_keeps_the_syns_backend_across_a_table_change() {
    let mut b = Bench::new(&BACKENDS[..2], "");
    let after = Bench::plan(&BACKENDS, "", Some(&b.plan));
    let f = (40000..41000)
        .map(|p| tcp(7, p))
        .find(|f| {
            let web = |p: &Plan| p.backend_for(0, &f.key()).and_then(|id| p.backend(id)).map(|x| x.address);
            web(&b.plan) != web(&after)
        })
        .expect("a flow that moves");
    let to = b.fwd(&with_flags(&f, SYN));
    b.reload(&BACKENDS);
    assert_ne!(b.maglev(&f), to, "Maglev moves the flow after the reload");
    assert_eq!(b.fwd(&with_flags(&f, ACK)), to, "the ACK went where Maglev sends it now, not where the SYN went");
    assert_eq!(b.fwd(&with_flags(&f, ACK)), to);
}

/// Two flows in one slot: the second SYN overwrites the first's record (as an
/// LRU evicts); the first flow's ACK finds no record, counts a midflow miss and
/// is scheduled again by Maglev, to the backend its SYN got.
#[test]
fn a_colliding_syn_overwrites_the_record_and_maglev_sends_the_ack_to_the_same_backend() {
    let mut b = Bench::new(&BACKENDS, "");
    let f = tcp(7, 40000);
    let slot = b.slot(&f);
    let g = (1..60000u16).map(|p| tcp(8, p)).find(|g| b.slot(g) == slot).expect("a flow in the same slot");
    let to_f = b.fwd(&with_flags(&f, SYN));
    let to_g = b.fwd(&with_flags(&g, SYN));
    assert!(b.record(&f).is_none(), "the colliding SYN did not overwrite the record");
    assert!(b.record(&g).is_some(), "the second SYN's record");
    let midflow = b.count(stat::CT_MIDFLOW_MISS);
    assert_eq!(b.fwd(&with_flags(&f, ACK)), to_f, "the first flow's ACK went elsewhere than its SYN");
    assert_eq!(b.count(stat::CT_MIDFLOW_MISS), midflow + 1, "the first flow's ACK is a midflow miss");
    assert_eq!(b.entry(map_names::CONNTRACK, &f).expect("recorded at its ACK").state, CT_STATE_NEW);
    assert_eq!(b.fwd(&with_flags(&g, ACK)), to_g, "the second flow's ACK takes its record");
    assert_eq!(b.count(stat::CT_MIDFLOW_MISS), midflow + 1);
    assert!(b.entry(map_names::CT_ESTABLISHED, &g).is_some());
}

/// A record whose check does not match its tag and fields (a torn write: two
/// CPUs writing the slot at once, or a read between one write's stores), or
/// garbage, is not taken; nor is a whole, valid record of another flow in the
/// same slot (another tag): the ACK is scheduled by Maglev, not sent to the
/// backend the record names.
#[test]
fn a_torn_garbage_or_other_flows_record_is_never_taken() {
    let mut b = Bench::new(&BACKENDS, "");
    let f = tcp(7, 40000);
    let to = b.fwd(&with_flags(&f, SYN));
    assert!(b.record(&f).is_some(), "the SYN left no first record");
    let other = BACKENDS.iter().map(|a| a.parse().expect("address")).find(|a: &IpAddr| *a != to).expect("another backend");
    let other_id = b.id_of(other);
    let midflow = b.count(stat::CT_MIDFLOW_MISS);
    for case in 0..4u8 {
        // A flow of its own for each case, whose Maglev backend is not `other`.
        let g = (41000..42000u16).map(|p| tcp(9 + case, p)).find(|g| b.maglev(g) != other).expect("a flow");
        b.fwd(&with_flags(&g, SYN));
        let rg = b.record(&g).expect("the SYN's record");
        let bad = match case {
            // A torn write: this record's tag and check, another write's backend.
            0 => FirstRecord { backend_id: other_id, ..rg },
            // Another write's whole value and check (made for another flow's
            // tag), this flow's tag.
            1 => FirstRecord {
                backend_id: other_id,
                first_seen: rg.first_seen.wrapping_add(1),
                check: first_record_check(first_record_tag(&tcp(8, 1).key()), other_id, rg.generation, rg.first_seen.wrapping_add(1)),
                ..rg
            },
            // Garbage under this flow's tag.
            2 => FirstRecord { tag: rg.tag, backend_id: other_id, generation: 7, first_seen: 9, check: 0x5555_5555 },
            // A valid record of another flow in this slot: one tag bit apart.
            _ => {
                let tag = rg.tag ^ 0x8000_0000;
                let r = FirstRecord {
                    tag,
                    backend_id: other_id,
                    check: first_record_check(tag, other_id, rg.generation, rg.first_seen),
                    ..rg
                };
                assert!(valid(&r), "case {case}: the other flow's record is valid");
                r
            }
        };
        b.set_record(&g, bad);
        assert!(b.record(&g).is_none(), "case {case}: the test's record is this flow's");
        assert_eq!(b.fwd(&with_flags(&g, ACK)), b.maglev(&g), "case {case}: the ACK took a torn, garbage or other flow's record");
        assert_eq!(b.count(stat::CT_MIDFLOW_MISS), midflow + 1 + u64::from(case), "case {case}: not a midflow miss");
    }
    // The untouched flow still takes its own.
    assert_eq!(b.fwd(&with_flags(&f, ACK)), to);
}

/// A SYN's record lies in its flow's slot (`first_record_slot` of `flow_hash`)
/// whatever hash scheduled it: a `maglev` SYN's slot comes from the hash Maglev
/// used (the flow hash, not computed twice), an `sh` SYN's from the flow hash
/// computed for the record (`sh` scheduled by the masked client address alone).
/// Many flows, so that a slot taken from the wrong hash would show.
#[test]
fn a_syn_is_recorded_in_its_flows_slot_whatever_hash_scheduled_it() {
    for extra in ["", "    scheduler: sh\n"] {
        let mut b = Bench::new(&BACKENDS, extra);
        for p in 0..64u16 {
            let f = tcp(7 + (p % 5) as u8, 40000 + p * 7);
            let to = b.fwd(&with_flags(&f, SYN));
            let r = b.record(&f).unwrap_or_else(|| panic!("{extra:?}: no record in the flow's slot for port {}", f.sport));
            assert_eq!(b.address_of(r.backend_id), to, "{extra:?}: the record names another backend");
            assert_eq!(b.fwd(&with_flags(&f, ACK)), to, "{extra:?}: the ACK left the SYN's backend");
            assert!(b.entry(map_names::CT_ESTABLISHED, &f).is_some(), "{extra:?}: the ACK did not take the record");
        }
        assert_eq!(b.count(stat::CT_MIDFLOW_MISS), 0, "{extra:?}: an ACK found no record");
    }
}

/// `rr` (its choice is not a function of the flow: a lost record would move the
/// connection) and persistence services record their SYNs in `CONNTRACK`.
#[test]
fn rr_and_persistence_services_record_the_syn_in_conntrack() {
    for extra in ["    scheduler: rr\n", "    persistence: {}\n"] {
        let mut b = Bench::new(&BACKENDS, extra);
        let f = tcp(7, 40000);
        let to = b.fwd(&with_flags(&f, SYN));
        let lru = b.entry(map_names::CONNTRACK, &f).unwrap_or_else(|| panic!("{extra}: the SYN is not in CONNTRACK"));
        assert_eq!((lru.state, b.address_of(lru.backend_id)), (CT_STATE_NEW, to), "{extra}");
        assert!(b.record(&f).is_none(), "{extra}: the SYN left a first record");
        // A retransmitted SYN keeps its backend (rr: `repeated_syn`).
        assert_eq!(b.fwd(&with_flags(&f, SYN)), to, "{extra}: the retransmitted SYN moved");
        assert_eq!(b.fwd(&with_flags(&f, ACK)), to, "{extra}");
        assert!(b.entry(map_names::CT_ESTABLISHED, &f).is_some(), "{extra}");
        assert!(b.entry(map_names::CONNTRACK, &f).is_none(), "{extra}");
    }
}
