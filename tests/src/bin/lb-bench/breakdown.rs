//! The per-stage breakdown of the per-packet table (`packets.rs`), derived by
//! difference from frames that stop at each stage.

use std::{fmt::Write as _, net::Ipv4Addr};

use lb_agent::dataplane::Dataplane;
use lb_common::stat;

use crate::{
    Params,
    frames::{ipv4_frame, ipv4_syn},
    med_min,
    packets::{test_run, xdp, EMPTY_VIP, PERSIST_VIP, XDP_PASS, XDP_TX},
};

/// One stage of the breakdown: a frame that stops right after the stage.
struct Stage {
    name: &'static str,
    frame: Vec<u8>,
    expect: u32,
    /// The `STATS` counter that must move when the frame runs (proves where it stops).
    counter: u32,
    /// What this stage adds over the one before it.
    adds: &'static str,
}

/// Runs `frame` once and checks the verdict and that `counter` moved.
fn check_stage(dp: &mut Dataplane, frame: &[u8], expect: u32, counter: u32, what: &str) {
    let before = dp.stats().expect("read the counters").get(counter);
    let (_, ret) = test_run(xdp(dp, lb_common::PROG_BALANCER), frame, 1);
    let after = dp.stats().expect("read the counters").get(counter);
    assert_eq!(ret, expect, "{what}: unexpected XDP action");
    assert!(
        after > before,
        "{what}: counter {} did not move: the frame does not stop where the breakdown says",
        stat::NAMES[counter as usize]
    );
}

/// The per-stage breakdown: frames that stop after each stage, measured
/// interleaved (each round runs every stage once), and the differences.
pub(crate) fn breakdown(dp: &mut Dataplane, p: &Params, client: Ipv4Addr, vip4: Ipv4Addr, macswap_ns: f64) -> String {
    let sticky_client = Ipv4Addr::new(203, 0, 113, 77);
    let stages = vec![
        Stage {
            name: "1. malformed: truncated IPv4 header",
            frame: {
                let mut f = ipv4_frame(client, vip4, true, 41000, 80);
                f.truncate(14 + 10);
                f
            },
            expect: XDP_PASS,
            counter: stat::PASS_MALFORMED_L3,
            adds: "test-run harness, Ethernet parse, one `STATS` update",
        },
        Stage {
            name: "2. non-VIP IPv4",
            frame: ipv4_frame(client, Ipv4Addr::new(192, 0, 2, 1), true, 41001, 80),
            expect: XDP_PASS,
            counter: stat::PASS_NOT_VIP,
            adds: "IPv4 header checks + `VIP_FILTER` read (bit clear: no hash lookup)",
        },
        Stage {
            name: "3. VIP address, no service on the port",
            frame: ipv4_frame(client, vip4, true, 41002, 81),
            expect: XDP_PASS,
            counter: stat::PASS_NO_SERVICE,
            adds: "`VIP_FILTER` bit set, L4 header, `CONFIG` read, `CT_ESTABLISHED` + `CONNTRACK` lookups (miss), `SERVICES` lookup (miss), then `VIP_ADDRS` hit (twice: in `schedule::service_of` and for the reason)",
        },
        Stage {
            name: "4. service with an empty table, on_all_down pass (ACK)",
            frame: ipv4_frame(client, EMPTY_VIP, true, 41003, 80),
            expect: XDP_PASS,
            counter: stat::PASS_ALL_DOWN,
            adds: "`SERVICES` hit, a second `STATS` update",
        },
        Stage {
            name: "5. established flow (ACK, CONNTRACK hit)",
            frame: ipv4_frame(client, vip4, true, 41004, 80),
            expect: XDP_TX,
            counter: stat::CONN_HIT,
            adds: "`CONNTRACK` hit, `BACKENDS` read, MAC rewrite, `SERVICE_STATS` + `BACKEND_STATS`; no `VIP_ADDRS`/`SERVICES` lookups (the fast path)",
        },
        Stage {
            name: "6. new flow (SYN: Maglev + CONNTRACK insert)",
            frame: ipv4_syn(client, vip4, 41005, 80),
            expect: XDP_TX,
            counter: stat::CONN_MISS,
            adds: "`SERVICES` lookup, flow hash + `MAGLEV` read + `CONNTRACK` update (a call: `conntrack::insert_new`) + `BACKEND_CONN_DELTA` atomic add, instead of the `CONNTRACK` lookup",
        },
        Stage {
            name: "7. new flow, persistence service (SYN, AFFINITY hit)",
            frame: ipv4_syn(sticky_client, PERSIST_VIP, 41006, 80),
            expect: XDP_TX,
            counter: stat::PERSIST_HIT,
            adds: "address mask, clock read, `AFFINITY` lookup + in-place refresh, instead of Maglev",
        },
    ];
    // First run of each (puts stage 5's flow in CONNTRACK and stage 7's client in
    // AFFINITY), then a checked run proving where each frame stops.
    for s in &stages {
        test_run(xdp(dp, lb_common::PROG_BALANCER), &s.frame, 1);
    }
    for s in &stages {
        check_stage(dp, &s.frame, s.expect, s.counter, s.name);
    }
    let runs = p.runs * 2 + 1;
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); stages.len()];
    let prog = xdp(dp, lb_common::PROG_BALANCER);
    for _ in 0..runs {
        for (i, s) in stages.iter().enumerate() {
            let (d, ret) = test_run(prog, &s.frame, p.repeat);
            assert_eq!(ret, s.expect, "{}: unexpected XDP action", s.name);
            samples[i].push(d.as_nanos() as f64);
        }
    }
    let stats: Vec<(f64, f64)> = samples.into_iter().map(med_min).collect();
    let mut md = format!(
        "\n### Per-stage breakdown (derived by difference)\n\n\
         Each frame below stops right after one more stage of the program (checked by the `STATS` \
         counter it moves), so the difference between consecutive rows is the cost of that step. \
         These are **differences of medians, not measurements of the step alone**: each carries the \
         noise of two rows (a few ns), and a step can also change code layout and branches around it. \
         {runs} rounds x repeat {}, the stages interleaved within each round.\n\n\
         | stage (where the frame stops) | verdict | ns (median) | min | step cost (delta of medians) | delta of mins | what the step adds |\n\
         |---|---|---:|---:|---:|---:|---|\n",
        p.repeat
    );
    for (i, s) in stages.iter().enumerate() {
        let (ns, min) = stats[i];
        let (d, dmin) = if i == 0 {
            ("".to_string(), "".to_string())
        } else {
            (
                format!("{:+.0}", ns - stats[i - 1].0),
                format!("{:+.0}", min - stats[i - 1].1),
            )
        };
        let _ = writeln!(
            md,
            "| {} | {} | {ns:.0} | {min:.0} | {d} | {dmin} | {} |",
            s.name,
            if s.expect == XDP_TX { "TX" } else { "PASS" },
            s.adds
        );
    }
    let d = |i: usize| stats[i].0 - stats[i - 1].0;
    let lookups = stats[3].0 - stats[0].0;
    let _ = writeln!(
        md,
        "\nWhat it says: stage 1 ({:.0} ns) is mostly the test-run harness (compare `bench_macswap`, \
         {:.0} ns above), so parsing itself is cheap. An established frame (stage 5, {:.0} ns) takes the \
         fast path: the `VIP_FILTER` read, one `CT_ESTABLISHED` lookup (jhash of a 40-byte key), \
         the `CONFIG` and `BACKENDS` reads, the rewrite and the counters; frames that miss the connection \
         table (stages 3, 4, 6, 7) also pay the `SERVICES` lookup (and stage 3, whose port has no service, \
         the `VIP_ADDRS` lookup too; {lookups:.0} ns from stage 1 to stage 4). Differences to the stage before: stage 5 {:+.0} ns, stage 6 {:+.0} ns (for \
         new flows the expensive step is the `CONNTRACK` update: an LRU-hash update takes a node from the \
         LRU free list, even when the key is already there), stage 7 {:+.0} ns (persistence: the \
         `AFFINITY` lookup and in-place refresh instead of Maglev).",
        stats[0].0,
        macswap_ns,
        stats[4].0,
        d(4),
        d(5),
        d(6)
    );
    md
}
