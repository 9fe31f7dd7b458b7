//! What the ICMP and fragment path costs the frames that never take it: the
//! non-VIP and established-flow classes through `lb_xdp` as built now ("after")
//! and built with lb-ebpf's `no-rare` feature ("before": the parser passes ICMP
//! and fragments to the stack, as before that path existed, and `lb_xdp` has no
//! tail call), in interleaved rounds of one run. Target: within 5% of before.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_agent::{config, dataplane::Dataplane, plan::Plan};
use lb_common::stat;

use crate::{
    Params,
    frames::{IFACE_MAC, config_yaml, fake_macs, ipv4_frame, ipv6_frame},
    median,
};

/// The balancer built with `no-rare` (tests/build.rs, release builds only).
#[cfg(no_rare_object)]
static NO_RARE_OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf")));
#[cfg(not(no_rare_object))]
static NO_RARE_OBJECT: Option<&[u8]> = None;

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

fn run(dp: &mut Dataplane, frame: &[u8], repeat: u32, expect: u32) -> f64 {
    let prog: &Xdp = dp.ebpf_mut().program(lb_common::PROG_BALANCER).expect("lb_xdp").try_into().expect("XDP");
    let r = prog
        .test_run(TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::new() })
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(r.return_value, expect, "unexpected XDP action");
    r.duration.as_nanos() as f64
}

/// Runs `frame` once and returns the action and whether `counter` moved.
fn verdict(dp: &mut Dataplane, frame: &[u8], counter: u32) -> (u32, bool) {
    let before = dp.stats().expect("counters").get(counter);
    let prog: &Xdp = dp.ebpf_mut().program(lb_common::PROG_BALANCER).expect("lb_xdp").try_into().expect("XDP");
    let r = prog.test_run(TestRunOptions { data_in: Some(frame), ..TestRunOptions::new() }).expect("BPF_PROG_TEST_RUN");
    (r.return_value, dp.stats().expect("counters").get(counter) > before)
}

fn spread(v: &[f64], digits: usize) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.digits$} ({min:.digits$}–{max:.digits$})", median(v.to_vec()))
}

pub fn bench_rare(p: &Params) -> String {
    // The per-packet table's set-up: 100 services x 50 backends.
    let cfg = config::parse(&config_yaml(100, 50, 65537, 262144, true), "bench-rare.yaml").unwrap_or_else(|e| panic!("{e}"));
    let plan = Plan::build(&cfg, &fake_macs(&cfg));
    let mut after = Dataplane::load(&plan).expect("load the XDP object");
    after.write(&plan, IFACE_MAC).expect("fill the maps");
    let mut before = Dataplane::load_object(
        NO_RARE_OBJECT.expect("lb-bench built without the no-rare object: build it with --release (tests/build.rs)"),
        &plan,
    ).expect("load the no-rare XDP object");
    before.write(&plan, IFACE_MAC).expect("fill the maps");

    let client = Ipv4Addr::new(203, 0, 113, 7);
    let vip4 = Ipv4Addr::new(198, 18, 0, 1);
    let vip6: Ipv6Addr = "2001:db8:1::1".parse().expect("v6");
    let client6: Ipv6Addr = "2001:db8:ff::7".parse().expect("v6");
    let classes: [(&str, Vec<u8>, u32); 4] = [
        ("non-VIP IPv4 (pass)", ipv4_frame(client, Ipv4Addr::new(192, 0, 2, 1), true, 40000, 80), XDP_PASS),
        ("VIP IPv4 TCP ACK, established", ipv4_frame(client, vip4, true, 40001, 80), XDP_TX),
        ("VIP IPv4 UDP, established", ipv4_frame(client, vip4, false, 40002, 53), XDP_TX),
        ("VIP IPv6 TCP ACK, established", ipv6_frame(client6, vip6, 40003, 80), XDP_TX),
    ];

    // Proof that the two objects differ as described: a first fragment of a VIP
    // flow is forwarded after and passed (PASS_FRAGMENT) before.
    let mut first_frag = classes[2].1.clone();
    first_frag[14 + 6] = 0x20;
    let (a, moved) = verdict(&mut after, &first_frag, stat::FRAG_FIRST);
    assert!(a == XDP_TX && moved, "the current object must forward a first fragment (action {a})");
    let (b, moved) = verdict(&mut before, &first_frag, stat::PASS_FRAGMENT);
    assert!(b == XDP_PASS && moved, "the no-rare object must pass a fragment as PASS_FRAGMENT (action {b})");
    // Every VIP class once, so the timed runs are connection-table hits.
    for (_, f, expect) in &classes {
        run(&mut after, f, 1, *expect);
        run(&mut before, f, 1, *expect);
    }

    let rounds = if p.quick { 5 } else { 15 };
    let mut ns: Vec<[Vec<f64>; 2]> = vec![Default::default(); classes.len()];
    for round in 0..rounds {
        // Which object goes first alternates round by round.
        for k in [round % 2, 1 - round % 2] {
            let dp = if k == 0 { &mut before } else { &mut after };
            for (i, (_, f, expect)) in classes.iter().enumerate() {
                ns[i][k].push(run(dp, f, p.repeat, *expect));
            }
        }
    }
    let mut md = String::from(
        "| packet class | before: no-rare (ns) | after: lb_xdp as built (ns) | after / before |\n|---|---:|---:|---:|\n",
    );
    let mut worst = 0.0f64;
    for (i, (class, ..)) in classes.iter().enumerate() {
        let ratio: Vec<f64> = ns[i][1].iter().zip(&ns[i][0]).map(|(a, b)| a / b).collect();
        worst = worst.max((median(ratio.clone()) - 1.0).abs());
        let _ = writeln!(md, "| {class} | {} | {} | **{}** |", spread(&ns[i][0], 0), spread(&ns[i][1], 0), spread(&ratio, 3));
    }
    let _ = writeln!(
        md,
        "\nMedian over {rounds} rounds (min–max of the rounds in brackets); in each round both objects run every \
         class at repeat {} (which object goes first alternates), and the ratio is taken within the round. \
         \"Before\" is lb-ebpf built with its `no-rare` feature (tests/build.rs builds it for the benchmark only): \
         the parser passes IPv4 fragments (`pass_fragment`) and ICMP and IPv6 Fragment headers (`pass_not_l4`) to \
         the stack as before the ICMP/fragment path existed, and `lb_xdp` has no tail call to `lb_rare`; checked \
         before timing (a first fragment of a VIP flow: forwarded after, passed before). Same 100 x 50 \
         set-up as the per-packet table, one object each, the same maps contents. Target: non-VIP and \
         established classes within 5% of before: **{}** (largest median deviation {:.1}%).",
        p.repeat,
        if worst <= 0.05 { "met" } else { "missed" },
        worst * 100.0
    );
    md
}
