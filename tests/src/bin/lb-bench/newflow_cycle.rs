//! The new-flow section's fair denominator: a wrapped ACK of an established flow
//! that is a different one every repeat, cycling over `flows()` flows put in
//! `CT_ESTABLISHED` by the program itself (each flow's SYN, then its ACK, through
//! `bench_newflow` with its sequence numbering). Every timed ACK is then a
//! `CT_ESTABLISHED` hit on an entry last touched `flows()` packets ago, as an
//! established packet of a real flow on a busy node is, where the hot wrapped
//! ACK hits the same entry every repeat. On a balancer of its own (the same
//! settings as the one with room), so that the other classes' tables stay as
//! they were; the new 5-tuple SYN is also timed there, against a
//! `CT_ESTABLISHED` that holds those flows (its lookup walks occupied buckets).

use std::net::Ipv4Addr;

use aya::{Ebpf, maps::Array};
use lb_agent::dataplane::Dataplane;
use lb_common::stat;

use crate::{
    frames::{ipv4_frame, ipv4_syn},
    newflow::{balancer, prog, run, wrapper},
};

/// Flows cycled over: the balancer's `established_size` (65536), the table as
/// full as a busy node's (nothing else moves a flow there: the SYNs timed on
/// this balancer are never answered). `LB_BENCH_CYCLE_FLOWS` (1..=65536) sets
/// another number, to see how the cost follows the table's size.
pub fn flows() -> u32 {
    match std::env::var("LB_BENCH_CYCLE_FLOWS") {
        Ok(v) => match v.parse() {
            Ok(n @ 1..=65_536) => n,
            _ => panic!("LB_BENCH_CYCLE_FLOWS={v}: a number from 1 to 65536 (the table's size)"),
        },
        Err(_) => 65_536,
    }
}
/// The cycling flows' client: the wrapper writes the low half of the address
/// (0 here, the sequence stays below 65536) and the source port (the sequence),
/// so these are 192.0.0.0:0..flows(), apart from the other wrapped flows' 203.0.x.x.
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 9);

/// Counters that must not move while the cycling ACKs run: each is a hit.
const NOT_HITS: [(u32, &str); 5] = [
    (stat::CT_PROMOTED, "ct_promoted"),
    (stat::CT_MIDFLOW_MISS, "ct_midflow_miss"),
    (stat::CONN_MISS, "conn_miss"),
    (stat::CT_ESTABLISHED_FULL, "ct_established_full"),
    (stat::CONN_INSERT_FAILED, "conn_insert_failed"),
];

/// A balancer holding `flows()` established flows, `bench_newflow` cycling over
/// them, and one counting (step 1) for new 5-tuple SYNs.
pub struct Cycle {
    dp: Dataplane,
    wrap: Ebpf,
    wrap_syn: Ebpf,
    ack: Vec<u8>,
    syn: Vec<u8>,
}

fn set(w: &mut Ebpf, index: u32, value: u32) {
    let mut m: Array<_, u32> = Array::try_from(w.map_mut("NEWFLOW").expect("NEWFLOW")).expect("array");
    m.set(index, value, 0).unwrap_or_else(|e| panic!("NEWFLOW[{index}]: {e}"));
}

fn counters(dp: &mut Dataplane) -> Vec<u64> {
    let s = dp.stats().expect("read the counters");
    (0..stat::COUNT).map(|c| s.get(c)).collect()
}

/// 0..n in a fixed pseudo-random order (Fisher-Yates over xorshift64).
fn shuffled(n: u32) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

impl Cycle {
    /// Loads `object` with `conntrack_size` `conntrack`, puts `flows()` flows in
    /// its `CT_ESTABLISHED` through a `bench_newflow` in front of it, then checks
    /// that one pass of the cycling ACK over all of them is all hits. `new_syn`:
    /// the new 5-tuple SYN's frame (a source apart from `CLIENT`'s 192.0.x.x).
    pub fn new(object: &[u8], conntrack: u32, vip: Ipv4Addr, new_syn: Vec<u8>) -> Cycle {
        let mut dp = balancer(object, conntrack);
        let mut wrap = wrapper(&mut dp);
        let mut wrap_syn = wrapper(&mut dp);
        set(&mut wrap_syn, 0, 1);
        let syn = ipv4_syn(CLIENT, vip, 1, 80);
        let ack = ipv4_frame(CLIENT, vip, true, 1, 80);
        let flows = flows();
        let before = counters(&mut dp);
        // Flow k: the sequence set to k, step 0 (so n = k), its SYN (recorded in
        // `FIRST_RECORD`), then its ACK (takes the record: into `CT_ESTABLISHED`).
        // The flows in a shuffled order: the hash hands out its preallocated
        // elements in memory order, so flows set up 0, 1, 2, ... would lie in a
        // row and the timed walk 0, 1, 2, ... would be a stride a prefetcher
        // follows; a real node's flows lie anywhere.
        set(&mut wrap, 0, 0);
        set(&mut wrap, 2, flows);
        for k in shuffled(flows) {
            set(&mut wrap, 1, k);
            let w = prog(&wrap, "bench_newflow");
            run(w, &syn, 1);
            run(w, &ack, 1);
        }
        let after = counters(&mut dp);
        let promoted = after[stat::CT_PROMOTED as usize] - before[stat::CT_PROMOTED as usize];
        assert_eq!(promoted, u64::from(flows), "every cycling flow's first ACK moves it to CT_ESTABLISHED");
        // Step 1 from flows - 1: the next repeat is flow 0, then 1, ... flows - 1, 0, ...
        set(&mut wrap, 0, 1);
        set(&mut wrap, 1, flows - 1);
        let mut c = Cycle { dp, wrap, wrap_syn, ack, syn: new_syn };
        c.ack(flows);
        c
    }

    /// One repeated run of the cycling ACK (the next `repeat` flows), its time
    /// per packet in ns; panics unless every packet was a `CT_ESTABLISHED` hit
    /// forwarded (`forwarded` and `conn_hit` up by `repeat`, nothing else).
    pub fn ack(&mut self, repeat: u32) -> f64 {
        let before = counters(&mut self.dp);
        let ns = run(prog(&self.wrap, "bench_newflow"), &self.ack, repeat);
        let after = counters(&mut self.dp);
        let moved = |c: u32| after[c as usize] - before[c as usize];
        let r = u64::from(repeat);
        assert_eq!(moved(stat::FORWARDED), r, "cycling ACKs: forwarded must move by the repeat count");
        assert_eq!(moved(stat::CONN_HIT), r, "cycling ACKs: conn_hit must move by the repeat count");
        for (c, name) in NOT_HITS {
            assert_eq!(moved(c), 0, "cycling ACKs: {name} moved, so not every ACK was a CT_ESTABLISHED hit");
        }
        ns
    }

    /// One repeated run of the new 5-tuple SYN on this balancer (every repeat a
    /// new flow, recorded), its time per packet in ns.
    pub fn syn(&mut self, repeat: u32) -> f64 {
        run(prog(&self.wrap_syn, "bench_newflow"), &self.syn, repeat)
    }
}
