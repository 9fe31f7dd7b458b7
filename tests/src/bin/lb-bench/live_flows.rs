//! The live section's TCP rows: (d) established flows and (e) a SYN flood with the
//! connection table full, and the check that a flood leaves established
//! connections where they are.
//!
//! - (d): `bench_gen` sends ACKs of `flows` connections; the warm-up's first two
//!   frames of each put it in `CT_ESTABLISHED`, so every timed frame is a hit there.
//! - (e): `bench_gen` in flood mode: a SYN of a new 5-tuple in every frame (source
//!   port and address count up per CPU). Before the first round a flood fills
//!   `CONNTRACK` (default size) so that every timed SYN's insert evicts.
//! - `HELD` connections are established first through BPF_PROG_TEST_RUN (SYN then
//!   ACK); after all rounds each must still be in `CT_ESTABLISHED` with the backend
//!   it had, and its next ACK must be a table hit.

use std::{fmt::Write as _, net::IpAddr, time::Instant};

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_agent::dataplane::Dataplane;
use lb_common::{FlowKey, FlowVal, map_names, stat};
use lb_tests::frames::Flow;

use crate::{
    live::{FRAME_LEN, Variant, blast, template},
    median,
    topo::{CLIENT, Topo, VIP, VIP_PORT},
};

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
/// Established connections checked not to move while the floods run.
pub const HELD: u16 = 16;
const HELD_FIRST_PORT: u16 = 20_000;
const XDP_TX: u32 = 3;

/// The live template as a TCP segment with `flags` (IPv4 protocol 6, a 20-byte TCP
/// header; the IP length and checksum as the UDP template's, updated).
pub fn tcp_template(flags: u8) -> [u8; FRAME_LEN] {
    let mut f = template();
    f[14 + 9] = 6;
    f[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let sum: u32 = f[14..34].chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    f[14 + 10..14 + 12].copy_from_slice(&sum.to_be_bytes());
    // Ports stay; seq 1, ack 0, data offset 5, flags, window, checksum 0 (none
    // checks it on this path), urgent 0.
    f[38..46].copy_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
    f[46..48].copy_from_slice(&[5 << 4, flags]);
    f[48..54].copy_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    f
}

fn frame(sport: u16, flags: u8) -> [u8; FRAME_LEN] {
    let mut f = tcp_template(flags);
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f
}

fn balancer(dp: &mut Dataplane) -> &Xdp {
    dp.ebpf_mut()
        .program(lb_common::PROG_BALANCER)
        .expect("lb_xdp")
        .try_into()
        .expect("XDP")
}

fn run(dp: &mut Dataplane, f: &[u8]) {
    let r = balancer(dp)
        .test_run(TestRunOptions { data_in: Some(f), ..TestRunOptions::new() })
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(r.return_value, XDP_TX, "lb_xdp did not forward a frame of a held connection");
}

fn table(dp: &mut Dataplane, name: &'static str) -> HashMap<MapData, FlowKey, FlowVal> {
    let m = dp.map_handle(name).expect("map handle");
    // The LRU map is read through the same syscalls; its type tag does not matter.
    HashMap::try_from(Map::HashMap(m)).expect("hash map")
}

fn key(sport: u16) -> FlowKey {
    Flow::tcp(IpAddr::V4(CLIENT), IpAddr::V4(VIP), sport, VIP_PORT).key()
}

/// Opens `n` connections (SYN, ACK) and returns their `CT_ESTABLISHED` entries.
pub fn establish(dp: &mut Dataplane, n: u16) -> Vec<(FlowKey, FlowVal)> {
    (0..n)
        .map(|i| {
            let sport = HELD_FIRST_PORT + i;
            run(dp, &frame(sport, SYN));
            run(dp, &frame(sport, ACK));
            let k = key(sport);
            let v = table(dp, map_names::CT_ESTABLISHED)
                .get(&k, 0)
                .unwrap_or_else(|e| panic!("held connection {sport} not in CT_ESTABLISHED after SYN, ACK: {e}"));
            (k, v)
        })
        .collect()
}

/// Floods until the connection table (`size` entries) has seen twice its size in
/// new flows (at most 20 s); returns the frames sent and the SYNs then recorded:
/// valid `FIRST_RECORD` slots (where a Maglev service's SYNs go) plus `CONNTRACK`
/// entries.
pub fn fill(topo: &Topo, bench: &Ebpf, dp: &mut Dataplane, size: u32) -> (u64, usize) {
    let gen_prog: &Xdp = bench.program("bench_gen").expect("bench_gen").try_into().expect("XDP");
    let target = 2 * u64::from(size);
    let (t, mut sent) = (Instant::now(), 0);
    while sent < target && t.elapsed().as_secs_f64() < 20.0 {
        sent += blast(&topo.gen_ns, gen_prog, 0.2).0;
    }
    assert!(sent >= target, "the flood sent {sent} frames in 20 s, fewer than {target}");
    let first = lb_agent::first_record::FirstRecords::new(dp.map_handle(map_names::FIRST_RECORD).expect("FIRST_RECORD"))
        .expect("map FIRST_RECORD");
    let records = first.count(lb_agent::conntrack::now_s(), &Default::default(), &mut Default::default());
    (sent, table(dp, map_names::CONNTRACK).keys().count() + records as usize)
}

/// What the floods left of the held connections.
pub struct Held {
    pub conns: usize,
    /// Entries gone from `CT_ESTABLISHED`, or whose backend changed.
    pub moved: usize,
    /// Frames of the fill flood before the first round, and `CONNTRACK` entries after it.
    pub fill_sent: u64,
    pub fill_entries: usize,
    /// `CONNTRACK`'s size.
    pub size: u32,
}

/// Checks the held connections after the rounds (panics if one moved: the floods
/// must not move established connections) and sends each one more ACK, which must
/// be a table hit.
pub fn check(dp: &mut Dataplane, conns: &[(FlowKey, FlowVal)], (fill_sent, fill_entries): (u64, usize), size: u32) -> Held {
    let est = table(dp, map_names::CT_ESTABLISHED);
    let moved: Vec<String> = conns
        .iter()
        .filter_map(|(k, v)| match est.get(k, 0) {
            Ok(now) if now.backend_id == v.backend_id && now.service_id == v.service_id => None,
            Ok(now) => Some(format!("port {}: backend {} -> {}", k.sport, v.backend_id, now.backend_id)),
            Err(_) => Some(format!("port {}: gone from CT_ESTABLISHED", k.sport)),
        })
        .collect();
    assert!(moved.is_empty(), "established connections moved during the SYN floods: {moved:?}");
    let counter = |dp: &mut Dataplane, c: u32| dp.stats().expect("counters").get(c);
    let (hits, misses) = (counter(dp, stat::CONN_HIT), counter(dp, stat::CONN_MISS));
    for (k, _) in conns {
        run(dp, &frame(k.sport, ACK));
    }
    assert_eq!(counter(dp, stat::CONN_MISS), misses, "a held connection's ACK missed the table");
    assert_eq!(counter(dp, stat::CONN_HIT) - hits, conns.len() as u64, "every held connection's ACK is a hit");
    Held { conns: conns.len(), moved: moved.len(), fill_sent, fill_entries, size }
}

/// Per-round ratios of `v` to the ceiling `a` (rounds interleaved, so round i of
/// each ran within seconds of the other).
fn ratios(v: &Variant, a: &Variant) -> Vec<f64> {
    v.pps.iter().zip(&a.pps).map(|(x, y)| x / y).collect()
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "missed" }
}

/// The lines under the live table for (d) and (e).
pub fn flows_md(v: &[Variant], held: &Held, flows: u32) -> String {
    let (a, d, e, f) = (&v[0], &v[3], &v[4], &v[5]);
    let mut md = String::new();
    for (x, what, target) in [
        (d, "established TCP", 0.92),
        (e, "SYN flood", 0.7),
        (f, "SYN flood, every SYN recorded", 0.7),
    ] {
        let r = ratios(x, a);
        let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.iter().copied().fold(0.0, f64::max);
        let m = median(r.clone());
        let _ = writeln!(
            md,
            "- {}/a, {what}: per-round ratios {} (median **{m:.2}**, spread {lo:.2}..{hi:.2}; target >= {target}: {}); \
             lb_xdp {:.0} ns per frame in the kernel's BPF statistics (ceiling {:.0} ns)",
            x.short,
            r.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", "),
            verdict(m >= target),
            median(x.prog_ns.clone()),
            median(a.prog_ns.clone()),
        );
    }
    let _ = writeln!(
        md,
        "\n(d) sends ACKs of {flows} TCP connections (each in `CT_ESTABLISHED` after the warm-up's first two frames); \
         (e) a SYN of a new 5-tuple in every frame (the generator counts source port and address up per CPU), \
         at the default `syn_flood_kps` ({}: past {} new flows per CPU in a second, SYNs go unrecorded); \
         (f) the same with `syn_flood_kps: 0` (every SYN recorded). The program times come from the warm-up \
         (0.3 s), which opens a new one-second window: for (e) its first {} SYNs per CPU are recorded, so its \
         time is mostly that of recorded SYNs (`LB_BENCH_SYN_FLOOD_KPS=1` shows an unrecorded one's). \
         Before the first round a flood of {} SYNs, all recorded, filled the connection table (the default `conntrack_size`, {}; \
         {} SYNs recorded after it: valid `FIRST_RECORD` slots, where this Maglev service's SYNs go, and `CONNTRACK` entries), so \
         every recorded timed SYN overwrites another's record. {} TCP connections established before the floods (SYN, ACK \
         through BPF_PROG_TEST_RUN) were checked after all rounds: {} moved or left `CT_ESTABLISHED`, and \
         each one's next ACK was a table hit.",
        lb_common::DEFAULT_SYN_FLOOD_KPS,
        u32::from(lb_common::DEFAULT_SYN_FLOOD_KPS) * 1000,
        u32::from(lb_common::DEFAULT_SYN_FLOOD_KPS) * 1000,
        held.fill_sent,
        held.size,
        held.fill_entries,
        held.conns,
        held.moved,
    );
    md
}
