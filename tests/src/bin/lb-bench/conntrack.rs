//! What the established-flow table costs per packet: the same frames through two
//! balancers loaded side by side, one with `established_size: 0` (every flow in
//! the LRU table, the behaviour before `CT_ESTABLISHED`) and one with the
//! default, measured in alternating rounds.

use std::{fmt::Write as _, net::Ipv4Addr};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_agent::{config, dataplane::Dataplane, plan::Plan};

use crate::{
    Params,
    frames::{IFACE_MAC, config_yaml, fake_macs, ipv4_frame, ipv4_syn},
    median,
};

const XDP_TX: u32 = 3;

fn balancer(established: &str) -> Dataplane {
    let text = config_yaml(100, 50, 65537, 262144, true).replacen(
        "services:\n",
        &format!("established_size: {established}\nservices:\n"),
        1,
    );
    let cfg = config::parse(&text, "bench-conntrack.yaml").unwrap_or_else(|e| panic!("{e}"));
    let plan = Plan::build(&cfg, &fake_macs(&cfg));
    let mut dp = Dataplane::load(&plan).expect("load the XDP object");
    dp.write(&plan, IFACE_MAC).expect("fill the maps");
    // Every SYN recorded, however fast they come (the SYN-flood bypass is measured in packets.rs and the live section).
    dp.set_syn_flood_kps(0).expect("SYN flood threshold");
    dp
}

fn prog(dp: &mut Dataplane) -> &Xdp {
    dp.ebpf_mut().program(lb_common::PROG_BALANCER).expect("lb_xdp").try_into().expect("XDP")
}

/// Average ns per run of `frame` over `repeat` runs.
fn run(prog: &Xdp, frame: &[u8], repeat: u32) -> f64 {
    let r = prog
        .test_run(TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::new() })
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(r.return_value, XDP_TX, "unexpected XDP action");
    r.duration.as_nanos() as f64
}

/// Median over `frames`, one run each.
fn each(prog: &Xdp, frames: &[Vec<u8>]) -> f64 {
    median(frames.iter().map(|f| run(prog, f, 1)).collect())
}

/// Per class: (off, on) samples, one per round.
#[derive(Default)]
struct Samples {
    rows: Vec<(&'static str, Vec<f64>, Vec<f64>)>,
}

impl Samples {
    fn add(&mut self, class: &'static str, on: bool, v: f64) {
        if !self.rows.iter().any(|r| r.0 == class) {
            self.rows.push((class, Vec::new(), Vec::new()));
        }
        let r = self.rows.iter_mut().find(|r| r.0 == class).expect("row");
        if on { r.2.push(v) } else { r.1.push(v) }
    }
}

pub fn bench_protection(p: &Params) -> String {
    let mut off = balancer("0");
    let mut on = balancer("262144");
    let vip = Ipv4Addr::new(198, 18, 0, 1);
    let est = ipv4_frame(Ipv4Addr::new(203, 0, 113, 7), vip, true, 40001, 80);
    let udp = ipv4_frame(Ipv4Addr::new(203, 0, 113, 7), vip, false, 40002, 53);
    let rounds = if p.quick { 3 } else { 7 };
    let per_round = p.new_flows / rounds;
    let mut s = Samples::default();
    for round in 0..rounds {
        for (protect, dp) in [(false, &mut off), (true, &mut on)] {
            let prog = prog(dp);
            // Two runs first: the flow is established (in CT_ESTABLISHED when on).
            run(prog, &est, 2);
            run(prog, &udp, 2);
            s.add("VIP IPv4 TCP ACK, established (repeat)", protect, run(prog, &est, p.repeat));
            s.add("VIP IPv4 UDP, established (repeat)", protect, run(prog, &udp, p.repeat));
            let flow = |i: u32| {
                let i = round * per_round + i;
                (Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i), 1024 + (i % 60000) as u16)
            };
            let syns: Vec<Vec<u8>> = (0..per_round).map(flow).map(|(a, pt)| ipv4_syn(a, vip, pt, 80)).collect();
            let acks: Vec<Vec<u8>> =
                (0..per_round).map(flow).map(|(a, pt)| ipv4_frame(a, vip, true, pt, 80)).collect();
            s.add("TCP SYN, new flow (repeat 1, distinct flows)", protect, each(prog, &syns));
            s.add("first ACK of those flows (on: moves to CT_ESTABLISHED)", protect, each(prog, &acks));
            s.add("second ACK (established hit, repeat 1)", protect, each(prog, &acks));
        }
    }
    let mut md = String::from(
        "| packet class | off (`established_size: 0`, as before) ns | on (default) ns | on / off | spread of on/off over rounds |\n|---|---:|---:|---:|---|\n",
    );
    for (class, offs, ons) in &s.rows {
        let ratios: Vec<f64> = offs.iter().zip(ons).map(|(a, b)| b / a).collect();
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(0.0, f64::max);
        let _ = writeln!(
            md,
            "| {class} | {:.0} | {:.0} | {:.2} | {lo:.2}..{hi:.2} |",
            median(offs.clone()),
            median(ons.clone()),
            median(ratios.clone())
        );
    }
    let _ = writeln!(
        md,
        "\nTwo balancers loaded side by side (100 services x 50 backends, table_size 65537, \
         conntrack_size 262144), {rounds} alternating rounds; per round each class is the median of \
         its runs (repeat {} for the repeat rows, {per_round} distinct flows for the others); the \
         table shows the medians over rounds and the range of the per-round ratios.",
        p.repeat
    );
    md
}
