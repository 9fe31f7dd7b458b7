//! What the `lb-agent trace` hook costs: `lb_xdp_trace` (the program the agent
//! attaches while a trace runs) with no filter set, against `lb_xdp` (attached
//! otherwise), on the same maps, in alternating rounds.

use std::{fmt::Write as _, net::Ipv4Addr};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_agent::{config, dataplane::Dataplane, plan::Plan};

use crate::{
    Params,
    frames::{IFACE_MAC, config_yaml, fake_macs, ipv4_frame, ipv4_syn},
    median,
};

fn run(prog: &Xdp, frame: &[u8], repeat: u32, expect: u32) -> f64 {
    let r = prog
        .test_run(TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::new() })
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(r.return_value, expect, "unexpected XDP action");
    r.duration.as_nanos() as f64
}

pub fn bench_trace_hook(p: &Params) -> String {
    let text = config_yaml(100, 50, 65537, 262144, true);
    let cfg = config::parse(&text, "bench-trace.yaml").unwrap_or_else(|e| panic!("{e}"));
    let plan = Plan::build(&cfg, &fake_macs(&cfg));
    let mut dp = Dataplane::load(&plan).expect("load the XDP object");
    dp.write(&plan, IFACE_MAC).expect("fill the maps");
    // Every SYN recorded, however fast they come (the SYN-flood bypass is measured in packets.rs and the live section).
    dp.set_syn_flood_kps(0).expect("SYN flood threshold");
    let vip = Ipv4Addr::new(198, 18, 0, 1);
    let client = Ipv4Addr::new(203, 0, 113, 7);
    let non_vip = ipv4_frame(client, Ipv4Addr::new(192, 0, 2, 1), true, 40000, 80);
    let est = ipv4_frame(client, vip, true, 40001, 80);
    let rounds = if p.quick { 3 } else { 9 };
    let per_round = (p.new_flows / rounds).max(100);
    // (class, with hook, without) samples per round.
    let mut rows: Vec<(&str, Vec<f64>, Vec<f64>)> =
        vec![("non-VIP IPv4 (pass)", vec![], vec![]), ("VIP IPv4 TCP ACK, established", vec![], vec![]), ("VIP IPv4 TCP SYN, new flow (repeat 1)", vec![], vec![])];
    // The agent verifies the traced balancer only when a trace first needs it.
    let traced: &mut Xdp = dp.ebpf_mut().program_mut(lb_common::PROG_BALANCER_TRACE).expect("program").try_into().expect("XDP");
    if traced.fd().is_err() {
        traced.load().expect("loading lb_xdp_trace");
    }
    for round in 0..rounds {
        let syns: Vec<Vec<u8>> = (0..per_round)
            .map(|i| {
                let i = round * per_round + i;
                ipv4_syn(Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i), vip, 1024 + (i % 60000) as u16, 80)
            })
            .collect();
        // Alternate which program goes first.
        let (a, b) = (lb_common::PROG_BALANCER_TRACE, lb_common::PROG_BALANCER);
        let order = if round % 2 == 0 { [a, b] } else { [b, a] };
        for name in order {
            let hooked = name == lb_common::PROG_BALANCER_TRACE;
            let prog: &Xdp = dp.ebpf_mut().program(name).expect("program").try_into().expect("XDP");
            run(prog, &est, 2, 3);
            let samples = [
                run(prog, &non_vip, p.repeat, 2),
                run(prog, &est, p.repeat, 3),
                // Each program schedules its own half of the flows (a SYN always
                // schedules; the table insert is of a new key either way).
                median(syns.iter().skip(usize::from(!hooked)).step_by(2).map(|f| run(prog, f, 1, 3)).collect()),
            ];
            for (row, v) in rows.iter_mut().zip(samples) {
                if hooked { row.1.push(v) } else { row.2.push(v) }
            }
        }
    }
    let mut md = String::from(
        "| packet class | `lb_xdp_trace`, no filter (ns) | `lb_xdp` (ns) | ratio | range of per-round ratios |\n|---|---:|---:|---:|---|\n",
    );
    for (class, with, without) in &rows {
        let ratios: Vec<f64> = with.iter().zip(without).map(|(a, b)| a / b).collect();
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(0.0, f64::max);
        let _ = writeln!(
            md,
            "| {class} | {:.1} | {:.1} | {:.3} | {lo:.3}..{hi:.3} |",
            median(with.clone()),
            median(without.clone()),
            median(ratios.clone())
        );
    }
    let _ = writeln!(
        md,
        "\nWhile no trace runs the agent keeps `lb_xdp` in the XDP link: it has no trace code (its \
         decision record is never read and compiled away), so tracing costs nothing while off. While a \
         trace runs, `lb_xdp_trace` is attached; this table is what its hook (filter read and branch) \
         costs packets that do not match. One balancer (100 services x 50 backends, table_size 65537, \
         conntrack_size 262144), both programs on the same maps in {rounds} alternating rounds, repeat \
         {} for the first two rows, {} distinct new flows per round and program for the third.",
        p.repeat,
        per_round / 2
    );
    md
}
