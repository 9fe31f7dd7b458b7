//! What prefix services cost the other traffic (BPF_PROG_TEST_RUN): exact-vip
//! and non-vip frames through `lb_xdp` with no prefix service configured, on
//! this build and, when `LB_BENCH_BASE_OBJECT` names one (for example main's
//! `target/bpfel-unknown-none/release/lb-ebpf`, `cargo xtask build-ebpf`), on
//! that build; and with one prefix service configured. Balancers are measured
//! in alternating rounds.

use std::{fmt::Write as _, net::Ipv4Addr};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_agent::{config, dataplane::Dataplane, plan::Plan};

use crate::{
    Params,
    frames::{IFACE_MAC, fake_macs, ipv4_frame, ipv4_syn},
    median,
};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const NOT_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 99, 1);
const IN_PREFIX: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 9);

/// One exact service of 32 backends (Maglev); with `prefix`, also a prefix
/// service `198.18.50.0/24` of 32 backends.
fn balancer(object: &[u8], prefix: bool) -> Dataplane {
    let list: String = (0..32).map(|i| format!("      - {{address: 10.1.0.{}}}\n", i + 1)).collect();
    let mut text = format!("services:\n  - name: web\n    vip: {VIP}\n    port: 80\n    backends:\n{list}");
    if prefix {
        text += &format!("  - name: cache\n    vip: 198.18.50.0/24\n    port: 80\n    scheduler: dh\n    backends:\n{list}");
    }
    let cfg = config::parse(&text, "bench-prefix.yaml").unwrap_or_else(|e| panic!("{e}"));
    let plan = Plan::build(&cfg, &fake_macs(&cfg));
    let mut dp = Dataplane::load_object(object, &plan).expect("load the XDP object");
    dp.write(&plan, IFACE_MAC).expect("fill the maps");
    dp
}

fn run(prog: &Xdp, frame: &[u8], repeat: u32, want: u32) -> f64 {
    let r = prog
        .test_run(TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::new() })
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(r.return_value, want, "unexpected XDP action");
    r.duration.as_nanos() as f64
}

pub fn bench_prefix_paths(p: &Params) -> String {
    let base = std::env::var("LB_BENCH_BASE_OBJECT").ok().map(|path| {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("LB_BENCH_BASE_OBJECT {path}: {e}"));
        (path, bytes)
    });
    let mut rows: Vec<(String, Dataplane, bool)> = Vec::new();
    if let Some((path, bytes)) = &base {
        rows.push((format!("base ({path}), no prefix service"), balancer(bytes, false), false));
    }
    rows.push(("this build, no prefix service".into(), balancer(lb_agent::object::OBJECT, false), false));
    rows.push(("this build, one prefix service".into(), balancer(lb_agent::object::OBJECT, true), true));
    let rounds: usize = if p.quick { 5 } else { 9 };
    let per_round = (p.new_flows as usize / rounds).clamp(200, 2000);
    let ack = ipv4_frame(Ipv4Addr::new(203, 0, 113, 7), VIP, true, 40001, 80);
    let other = ipv4_frame(Ipv4Addr::new(203, 0, 113, 7), NOT_VIP, true, 40001, 80);
    let prefix_ack = ipv4_frame(Ipv4Addr::new(203, 0, 113, 7), IN_PREFIX, true, 40001, 80);
    // [row][class] -> per-round medians.
    let mut t: Vec<[Vec<f64>; 4]> = rows.iter().map(|_| Default::default()).collect();
    for round in 0..rounds {
        for (k, (_, dp, prefix)) in rows.iter_mut().enumerate() {
            let prog: &Xdp = dp.ebpf_mut().program(lb_common::PROG_BALANCER).expect("lb_xdp").try_into().expect("XDP");
            run(prog, &ack, 2, XDP_TX);
            t[k][0].push(run(prog, &ack, p.repeat, XDP_TX));
            let syns: Vec<f64> = (0..per_round)
                .map(|i| {
                    let i = (round * per_round + i) as u32;
                    let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i * 7);
                    run(prog, &ipv4_syn(src, VIP, 1024 + (i % 60000) as u16, 80), 1, XDP_TX)
                })
                .collect();
            t[k][1].push(median(syns));
            t[k][2].push(run(prog, &other, p.repeat, XDP_PASS));
            if *prefix {
                run(prog, &prefix_ack, 2, XDP_TX);
                t[k][3].push(run(prog, &prefix_ack, p.repeat, XDP_TX));
            }
        }
    }
    let mut md = String::from(
        "| balancer | exact vip, established ACK ns | exact vip, new flow (SYN) ns | not a vip (passed) ns | prefix service, established ACK ns |\n|---|---:|---:|---:|---:|\n",
    );
    let first: Vec<f64> = t[0].iter().take(3).map(|v| median(v.clone())).collect();
    for (k, (name, ..)) in rows.iter().enumerate() {
        let m: Vec<f64> = t[k].iter().map(|v| median(v.clone())).collect();
        let cell = |c: usize| {
            if k == 0 || c == 3 { format!("{:.1}", m[c]) } else { format!("{:.1} ({:.2}×)", m[c], m[c] / first[c]) }
        };
        let last = if t[k][3].is_empty() { "-".to_string() } else { cell(3) };
        let _ = writeln!(md, "| {name} | {} | {} | {} | {last} |", cell(0), cell(1), cell(2));
    }
    let _ = writeln!(
        md,
        "\nOne exact TCP service of 32 backends (Maglev); the last row adds a `dh` prefix service \
         198.18.50.0/24 of 32 backends. {rounds} alternating rounds, each one repeat-{} run of the \
         established ACK and of a frame to a non-vip address, and the median of {per_round} distinct SYNs \
         (repeat 1); medians over rounds, ratios against the first row.",
        p.repeat
    );
    md
}
