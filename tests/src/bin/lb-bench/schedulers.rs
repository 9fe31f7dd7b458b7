//! New-flow cost per scheduler (BPF_PROG_TEST_RUN): one service of 32 or 256
//! backends under each scheduler, a TCP SYN of a distinct flow per run (a
//! connection-table miss: the scheduler runs), and an established ACK (repeat)
//! to show the hit path does not change. Balancers are loaded side by side and
//! measured in alternating rounds.

use std::{fmt::Write as _, net::Ipv4Addr};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_agent::{config, dataplane::Dataplane, plan::Plan};

use crate::{
    Params,
    frames::{IFACE_MAC, fake_macs, ipv4_frame, ipv4_syn},
    median,
};

const XDP_TX: u32 = 3;
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
/// The schedulers measured; `@prefix`: on the prefix service `PREFIX` (the
/// frame goes through `lb_prefix`: a tail call and the trie lookup), whose SYNs
/// go to `PREFIX_DSTS` destinations in turn (a cache cluster sees many flows per
/// destination; `lblc`/`lblcr` then find the destination's entry).
const SCHEDULERS: [&str; 10] =
    ["maglev", "rr", "wrr", "lc", "wlc", "sh", "maglev@prefix", "dh@prefix", "lblc@prefix", "lblcr@prefix"];
const PREFIX: &str = "198.18.64.0/18";
const PREFIX_DSTS: u32 = 1024;

/// The destination of new flow `i` of `scheduler`.
fn dst(scheduler: &str, i: u32) -> Ipv4Addr {
    if scheduler.ends_with("@prefix") {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 64, 0)) + i % PREFIX_DSTS)
    } else {
        VIP
    }
}

fn balancer(scheduler: &str, backends: u32) -> Dataplane {
    let (scheduler, vip) = match scheduler.strip_suffix("@prefix") {
        Some(s) => (s, PREFIX.to_string()),
        None => (scheduler, VIP.to_string()),
    };
    let list: String = (0..backends)
        .map(|i| format!("      - {{address: 10.{}.{}.{}, weight: {}}}\n", 1 + i / 65536, (i / 256) % 256, i % 256, 1 + i % 4))
        .collect();
    let extra = if scheduler == "sh" { "    prefix_v4: 24\n" } else { "" };
    let text = format!(
        "conntrack_size: 262144\nservices:\n  - name: web\n    vip: {vip}\n    port: 80\n    scheduler: {scheduler}\n{extra}    backends:\n{list}"
    );
    let cfg = config::parse(&text, "bench-schedulers.yaml").unwrap_or_else(|e| panic!("{e}"));
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

fn run(prog: &Xdp, frame: &[u8], repeat: u32) -> f64 {
    let r = prog
        .test_run(TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::new() })
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(r.return_value, XDP_TX, "unexpected XDP action");
    r.duration.as_nanos() as f64
}

pub fn bench_schedulers(p: &Params) -> String {
    let rounds: u32 = if p.quick { 3 } else { 5 };
    let per_round = (p.new_flows / rounds).min(4000);
    let mut md = String::from(
        "| scheduler | backends | new flow (SYN) ns | / maglev | established ACK (repeat) ns |\n|---|---:|---:|---:|---:|\n",
    );
    for backends in [32u32, 256] {
        let mut dps: Vec<Dataplane> = SCHEDULERS.iter().map(|s| balancer(s, backends)).collect();
        let mut syn: Vec<Vec<f64>> = vec![Vec::new(); SCHEDULERS.len()];
        let mut est: Vec<Vec<f64>> = vec![Vec::new(); SCHEDULERS.len()];
        for round in 0..rounds {
            for (k, dp) in dps.iter_mut().enumerate() {
                let name = SCHEDULERS[k];
                let ack = ipv4_frame(Ipv4Addr::new(203, 0, 113, 7), dst(name, 7), true, 40001, 80);
                let prog = prog(dp);
                let flows: Vec<Vec<u8>> = (0..per_round)
                    .map(|i| {
                        let i = round * per_round + i;
                        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i * 7);
                        ipv4_syn(src, dst(name, i), 1024 + (i % 60000) as u16, 80)
                    })
                    .collect();
                syn[k].push(median(flows.iter().map(|f| run(prog, f, 1)).collect()));
                run(prog, &ack, 2);
                est[k].push(run(prog, &ack, p.repeat));
            }
        }
        let maglev = median(syn[0].clone());
        for (k, name) in SCHEDULERS.iter().enumerate() {
            let s = median(syn[k].clone());
            let _ = writeln!(
                md,
                "| {name} | {backends} | {s:.0} | {:.2} | {:.0} |",
                s / maglev,
                median(est[k].clone())
            );
        }
    }
    let _ = writeln!(
        md,
        "\nOne TCP service per balancer, weights 1..4, table_size 65537; {rounds} alternating rounds, \
         each the median of {per_round} distinct SYNs (repeat 1) and one repeat-{} run of an established \
         ACK; the table shows medians over rounds. `lc`/`wlc` compare up to 4 backends per new flow \
         (exact up to 4, best of 4 beyond). `@prefix`: the service's vip is the prefix {PREFIX} and the \
         SYNs go to {PREFIX_DSTS} of its addresses in turn (the frame misses the exact vips and is \
         tail-called into `lb_prefix`, which looks up the prefix trie): `maglev@prefix` against `maglev` is \
         what the prefix path adds, `dh`/`lblc`/`lblcr` against `maglev@prefix` what the scheduler adds.",
        p.repeat
    );
    md
}
