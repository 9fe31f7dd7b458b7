//! What tunnel forwarding costs per packet: established and new-flow frames of a
//! `dr`, an `ipip` and a `gue` service (IPv4 and IPv6, 32 backends each) through
//! one balancer, in interleaved rounds; the ratios are to the DR class of the same
//! family. Target: an encapsulated established flow at most 1.5x the DR one.
//!
//! Encapsulation rewrites the frame in place (`bpf_xdp_adjust_head`) and
//! BPF_PROG_TEST_RUN keeps the rewritten frame between repeats, so a repeated run
//! of `lb_xdp` would see its own output. The classes therefore run through
//! `bench_untunnel` (tests/bench-ebpf), which strips the outer headers the last
//! repeat put on and tail-calls `lb_xdp`: every repeat encapsulates the same client
//! frame. Its own work is the same for every frame, so it cancels in the
//! difference to the DR class; `lb_xdp`'s DR cost is measured directly.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
};

use aya::{
    Ebpf,
    maps::{Array, ProgramArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_agent::{config, dataplane::Dataplane, plan::Plan};

use crate::{
    Params,
    frames::{IFACE_MAC, fake_macs, ipv4_frame, ipv4_syn, ipv6_frame},
    live::{BENCH_OBJECT, xdp},
    median,
};

const XDP_TX: u32 = 3;
const SOURCE_V4: [u8; 4] = [198, 18, 20, 2];
const SOURCE_V6: &str = "2001:db8:20::2";

/// Mean of single runs without the outliers (over 3x the median): the kernel
/// reports a single run's time in coarse steps, and the mean of many resolves
/// differences finer than a step.
pub(crate) fn trimmed_mean(v: Vec<f64>) -> f64 {
    let m = median(v.clone());
    let kept: Vec<f64> = v.into_iter().filter(|x| *x <= 3.0 * m).collect();
    kept.iter().sum::<f64>() / kept.len().max(1) as f64
}

/// Runs `frame` `repeat` times; the kernel's average ns per run.
pub(crate) fn run(prog: &Xdp, frame: &[u8], repeat: u32) -> f64 {
    let r = prog
        .test_run(TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::new() })
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(r.return_value, XDP_TX, "unexpected XDP action for a frame of {} bytes: {:02x?}", frame.len(), &frame[..frame.len().min(80)]);
    r.duration.as_nanos() as f64
}

/// The frame after `repeat` runs.
fn output(prog: &Xdp, frame: &[u8], repeat: u32) -> Vec<u8> {
    let mut out = vec![0u8; frame.len() + 64];
    let r = prog
        .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat, ..TestRunOptions::new() })
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(r.return_value, XDP_TX, "unexpected XDP action");
    out.truncate(r.data_size_out as usize);
    out
}

fn yaml() -> String {
    let list = |f: &dyn Fn(u32) -> String| (1..=32).map(|i| format!("{{address: \"{}\"}}", f(i))).collect::<Vec<_>>().join(", ");
    let b4 = list(&|i| format!("10.9.0.{i}"));
    let b6 = list(&|i| format!("2001:db8:9::{i:x}"));
    let mut y = String::from("services:\n");
    for (mode, port) in [("dr", 80), ("ipip", 81), ("gue", 82)] {
        let _ = writeln!(y, "  - {{ name: {mode}4, vip: 198.18.0.1, port: {port}, forwarding: {mode}, backends: [{b4}] }}");
        let _ = writeln!(y, "  - {{ name: {mode}6, vip: \"2001:db8:1::1\", port: {port}, forwarding: {mode}, backends: [{b6}] }}");
    }
    y
}

/// Median and range of a sample, as a table cell.
fn cell(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.0} ({min:.0}–{max:.0})", median(v.to_vec()))
}

const CLASSES: [&str; 4] = [
    "IPv4 TCP ACK, established",
    "IPv6 TCP ACK, established",
    "IPv4 TCP SYN, new flow (scheduled every time)",
    "IPv6 TCP SYN, new flow (scheduled every time)",
];
const MODES: [(&str, u16); 3] = [("dr", 80), ("ipip", 81), ("gue", 82)];

pub fn bench_tunnel(p: &Params) -> String {
    let cfg = config::parse(&yaml(), "bench-tunnel.yaml").unwrap_or_else(|e| panic!("{e}"));
    let plan = Plan::build(&cfg, &fake_macs(&cfg));
    let mut dp = Dataplane::load(&plan).expect("load the XDP object");
    let source_v6 = SOURCE_V6.parse::<Ipv6Addr>().expect("v6").octets();
    dp.set_tunnel(SOURCE_V4, source_v6, 1500).expect("tunnel");
    dp.write(&plan, IFACE_MAC).expect("fill the maps");
    // Every SYN recorded, however fast they come (the SYN-flood bypass is measured in packets.rs and the live section).
    dp.set_syn_flood_kps(0).expect("SYN flood threshold");
    let (vip4, vip6): (Ipv4Addr, Ipv6Addr) = ("198.18.0.1".parse().unwrap(), "2001:db8:1::1".parse().unwrap());
    let (c4, c6): (Ipv4Addr, Ipv6Addr) = ("203.0.113.7".parse().unwrap(), "2001:db8:ff::7".parse().unwrap());
    let frame = |class: usize, port: u16| match class {
        0 => ipv4_frame(c4, vip4, true, 40000 + port, port),
        1 => ipv6_frame(c6, vip6, 40000 + port, port),
        2 => ipv4_syn(c4, vip4, 41000 + port, port),
        _ => {
            let mut f = ipv6_frame(c6, vip6, 41000 + port, port);
            f[14 + 40 + 13] = 0x02;
            f
        }
    };

    // bench_untunnel in front of lb_xdp.
    let mut bench = Ebpf::load(BENCH_OBJECT).expect("load the bench object");
    {
        let mut settings = [0u8; 32];
        settings[..12].copy_from_slice(&frame(0, 80)[..12]);
        settings[12..16].copy_from_slice(&SOURCE_V4);
        settings[16..32].copy_from_slice(&source_v6);
        let mut m: Array<_, [u8; 32]> = Array::try_from(bench.map_mut("UNTUNNEL").expect("UNTUNNEL")).expect("array");
        m.set(0, settings, 0).expect("UNTUNNEL");
    }
    xdp(&mut bench, "bench_untunnel").load().expect("load bench_untunnel");
    {
        let target: &Xdp = dp.ebpf_mut().program(lb_common::PROG_BALANCER).expect("lb_xdp").try_into().expect("XDP");
        let fd = target.fd().expect("lb_xdp loaded").try_clone().expect("dup lb_xdp's fd");
        let mut m = ProgramArray::try_from(bench.map_mut("UNTUNNEL_TARGET").expect("UNTUNNEL_TARGET")).expect("program array");
        m.set(0, &fd, 0).expect("UNTUNNEL_TARGET[0] = lb_xdp");
    }
    let wrapped: &Xdp = bench.program("bench_untunnel").expect("bench_untunnel").try_into().expect("XDP");
    let direct: &Xdp = dp.ebpf_mut().program(lb_common::PROG_BALANCER).expect("lb_xdp").try_into().expect("XDP");

    // Each class once (the established flows enter the connection table), then
    // proof that the wrapper restores the frame: the output after 3 repeats is
    // byte for byte the output after 1, and has the mode's outer headers.
    for class in 0..CLASSES.len() {
        for (m, (mode, port)) in MODES.iter().enumerate() {
            let f = frame(class, *port);
            run(direct, &f, 1);
            let once = output(wrapped, &f, 1);
            assert_eq!(once, output(wrapped, &f, 3), "{mode} {}: a repeated run through bench_untunnel differs from a single one", CLASSES[class]);
            let outer = [0, 20, 28][m] + if class % 2 == 1 { [0, 20, 20][m] } else { 0 };
            assert_eq!(once.len(), f.len() + outer, "{mode} {}: {} bytes out of {} in", CLASSES[class], once.len(), f.len());
        }
    }

    let rounds = if p.quick { 5 } else { 15 };
    // [class][mode]: per-round ns through the wrapper; [family]: lb_xdp alone, DR.
    let mut wrapped_ns: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); MODES.len()]; CLASSES.len()];
    let mut direct_ns: [Vec<f64>; 2] = Default::default();
    for round in 0..rounds {
        // A different mode goes first each round (the first pays for cold caches).
        let mut order = [0usize, 1, 2];
        order.rotate_left(round % 3);
        for m in order {
            for (class, series) in wrapped_ns.iter_mut().enumerate() {
                series[m].push(run(wrapped, &frame(class, MODES[m].1), p.repeat));
            }
            if m == 0 {
                direct_ns[0].push(run(direct, &frame(0, 80), p.repeat));
                direct_ns[1].push(run(direct, &frame(1, 80), p.repeat));
            }
        }
    }

    let mut md = String::from(
        "| packet class (bench_untunnel + lb_xdp) | dr (ns) | ipip (ns) | gue (ns) | ipip - dr | gue - dr |\n|---|---:|---:|---:|---:|---:|\n",
    );
    // Per round: the mode's extra over DR in the same round.
    let extra = |class: usize, m: usize| -> Vec<f64> {
        wrapped_ns[class][m].iter().zip(&wrapped_ns[class][0]).map(|(t, d)| t - d).collect()
    };
    for (class, name) in CLASSES.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} |",
            cell(&wrapped_ns[class][0]),
            cell(&wrapped_ns[class][1]),
            cell(&wrapped_ns[class][2]),
            cell(&extra(class, 1)),
            cell(&extra(class, 2))
        );
    }
    let mut ratios = String::new();
    let mut worst = 0.0f64;
    for (fam, name) in ["IPv4", "IPv6"].iter().enumerate() {
        let d = &direct_ns[fam];
        for m in 1..3 {
            // Per round: (lb_xdp DR + the mode's extra) / lb_xdp DR.
            let r: Vec<f64> = extra(fam, m).iter().zip(d).map(|(e, d)| (d + e) / d).collect();
            let rm = median(r.clone());
            worst = worst.max(rm);
            let (lo, hi) = (r.iter().copied().fold(f64::INFINITY, f64::min), r.iter().copied().fold(0.0, f64::max));
            let _ = write!(ratios, "{name} {} **{rm:.2}x** ({lo:.2}–{hi:.2}); ", MODES[m].0);
        }
    }
    let overhead: Vec<f64> = wrapped_ns[0][0].iter().zip(&direct_ns[0]).map(|(w, d)| w - d).collect();
    let _ = writeln!(
        md,
        "\nEach cell: median over {rounds} rounds (min–max of the rounds in brackets), each round one run of every \
         class and mode at repeat {} (the modes in a different order each round); the differences are taken \
         within each round. `lb_xdp` alone, DR established (repeat {}, same rounds): IPv4 {}, IPv6 {} ns; \
         `bench_untunnel` and its tail call add {} ns (IPv4 DR established, wrapped - direct).\n\n\
         Encapsulated established flow / DR established flow, per round (lb_xdp's DR cost + the mode's extra) / \
         lb_xdp's DR cost, median (range): {ratios}target <= 1.5x: **{}**.\n\n\
         Method: BPF_PROG_TEST_RUN keeps the frame a run rewrote, so without help a repeated run encapsulates \
         its own output (the second repeat is then not for a VIP at all). `bench_untunnel` (tests/bench-ebpf) \
         runs first on every repeat: it strips the outer headers a previous repeat put on (recognised by the \
         balancer's tunnel source address), writes the client frame's Ethernet header back, and tail-calls \
         `lb_xdp`; it does the same steps for DR frames (a head adjustment by 0, the same header write), so it \
         cancels in the differences. Checked before timing: after 3 repeats the output is byte for byte that of \
         1 repeat, with the mode's outer headers. One balancer, three services per family (dr, ipip, gue; 32 \
         backends each, table_size 65537).",
        p.repeat,
        p.repeat,
        cell(&direct_ns[0]),
        cell(&direct_ns[1]),
        cell(&overhead),
        if worst <= 1.5 { "met" } else { "missed" }
    );
    md
}
