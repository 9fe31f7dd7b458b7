//! What `forwarding: nat` and `fullnat` cost per packet, next to `dr` in the same
//! balancer: established and new-flow frames to the VIP, and the backend's replies
//! (which DR never sees), IPv4 and IPv6, 32 backends per service, in alternating
//! rounds. Target: an established NAT or FULLNAT packet (either direction) at most
//! 1.5x the DR established cost.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_agent::{config, dataplane::Dataplane, plan::Plan};

use crate::{
    Params,
    frames::{IFACE_MAC, fake_macs, ipv4_frame, ipv4_syn, ipv6_frame},
    median,
    tunnel::{run, trimmed_mean},
};

fn yaml() -> String {
    let list = |f: &dyn Fn(u32) -> String| (1..=32).map(|i| format!("{{address: \"{}\"}}", f(i))).collect::<Vec<_>>().join(", ");
    let b4 = list(&|i| format!("10.9.0.{i}"));
    let b6 = list(&|i| format!("2001:db8:9::{i:x}"));
    let mut y = String::from("snat_addresses: [198.18.0.2, \"2001:db8:1::2\"]\nservices:\n");
    for (mode, port) in [("dr", 80), ("nat", 81), ("fullnat", 82)] {
        let _ = writeln!(y, "  - {{ name: {mode}4, vip: 198.18.0.1, port: {port}, forwarding: {mode}, backends: [{b4}] }}");
        let _ = writeln!(y, "  - {{ name: {mode}6, vip: \"2001:db8:1::1\", port: {port}, forwarding: {mode}, backends: [{b6}] }}");
    }
    y
}

/// A frame to no VIP (at `p.repeat`, it passes untouched) without and with a nat
/// service: the price of the reply lookup for traffic that is not ours.
fn not_vip(p: &Params, rounds: u32) -> String {
    let dr_only = "services:\n  - { name: dr4, vip: 198.18.0.1, port: 80, backends: [{address: 10.9.0.1}] }\n";
    let load = |yaml: &str| {
        let cfg = config::parse(yaml, "bench-nat.yaml").unwrap_or_else(|e| panic!("{e}"));
        let plan = Plan::build(&cfg, &fake_macs(&cfg));
        let mut dp = Dataplane::load(&plan).expect("load the XDP object");
        dp.write(&plan, IFACE_MAC).expect("fill the maps");
        dp
    };
    let mut dps = [load(dr_only), load(&yaml())];
    let frame = ipv4_frame("203.0.113.7".parse().unwrap(), "192.0.2.1".parse().unwrap(), true, 40000, 80);
    let mut t: [Vec<f64>; 2] = Default::default();
    for round in 0..rounds {
        for i in [round as usize % 2, 1 - round as usize % 2] {
            let prog: &Xdp = dps[i].ebpf_mut().program(lb_common::PROG_BALANCER).expect("lb_xdp").try_into().expect("XDP");
            let r = prog
                .test_run(TestRunOptions { data_in: Some(&frame), repeat: p.repeat, ..TestRunOptions::new() })
                .expect("BPF_PROG_TEST_RUN");
            assert_eq!(r.return_value, 2, "a frame to no VIP passes");
            t[i].push(r.duration.as_nanos() as f64);
        }
    }
    let (off, on) = (median(t[0].clone()), median(t[1].clone()));
    format!(
        "A TCP frame to no VIP at repeat {}: {off:.1} ns with no nat service (`CONFIG_NAT` off: one array read \
         more than before), {on:.1} ns with a nat and a fullnat service (the tail call into `lb_nat_reply`, its \
         SNAT address filter test and its `NAT_REVERSE` miss), {rounds} alternating rounds, medians.",
        p.repeat
    )
}

/// The frame `prog` sends for `frame` (one run), to learn a flow's backend.
fn sent(prog: &Xdp, frame: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; frame.len() + 64];
    let r = prog
        .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..TestRunOptions::new() })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    out
}

/// `LB_BENCH_NAT_OBJECT=PATH` measures another build of lb-ebpf (an earlier
/// commit's, to compare) with the same maps and frames.
pub fn bench_nat(p: &Params) -> String {
    let cfg = config::parse(&yaml(), "bench-nat.yaml").unwrap_or_else(|e| panic!("{e}"));
    let plan = Plan::build(&cfg, &fake_macs(&cfg));
    let mut dp = match std::env::var("LB_BENCH_NAT_OBJECT") {
        Ok(path) => Dataplane::load_object(&std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}")), &plan),
        Err(_) => Dataplane::load(&plan),
    }
    .expect("load the XDP object");
    dp.write(&plan, IFACE_MAC).expect("fill the maps");
    let (vip4, vip6): (Ipv4Addr, Ipv6Addr) = ("198.18.0.1".parse().unwrap(), "2001:db8:1::1".parse().unwrap());
    let (c4, c6): (Ipv4Addr, Ipv6Addr) = ("203.0.113.7".parse().unwrap(), "2001:db8:ff::7".parse().unwrap());
    let rounds = if p.quick { 3 } else { 7 };
    let singles = (p.new_flows / rounds / 4).max(50);
    let prog: &Xdp = dp.ebpf_mut().program(lb_common::PROG_BALANCER).expect("lb_xdp").try_into().expect("XDP");
    // The established frames of each mode (port 80 dr, 81 nat, 82 fullnat),
    // and the NAT flows' replies: from the backend each flow went to (to the
    // client for nat, to the SNAT address and port for fullnat).
    let est = |m: usize| (ipv4_frame(c4, vip4, true, 40010 + m as u16, 80 + m as u16), ipv6_frame(c6, vip6, 40010 + m as u16, 80 + m as u16));
    let mut frames: [[Vec<u8>; 3]; 4] = Default::default();
    for m in 0..3 {
        let (f4, f6) = est(m);
        run(prog, &f4, 1);
        run(prog, &f6, 1);
        if m > 0 {
            let (o4, o6) = (sent(prog, &f4), sent(prog, &f6));
            let b4 = Ipv4Addr::new(o4[30], o4[31], o4[32], o4[33]);
            let b6 = Ipv6Addr::from(<[u8; 16]>::try_from(&o6[38..54]).expect("16 bytes"));
            let (s4, s6) = (Ipv4Addr::new(o4[26], o4[27], o4[28], o4[29]), Ipv6Addr::from(<[u8; 16]>::try_from(&o6[22..38]).expect("16 bytes")));
            let (sp4, sp6) = (u16::from_be_bytes([o4[34], o4[35]]), u16::from_be_bytes([o6[54], o6[55]]));
            let port = 80 + m as u16;
            frames[2][m] = ipv4_frame(b4, s4, true, port, sp4);
            frames[3][m] = ipv6_frame(b6, s6, port, sp6);
        }
        // A second packet: a fullnat flow notes its SNAT slot (`FlowVal::snat`)
        // in its `CT_ESTABLISHED` entry at its first established packet.
        run(prog, &f4, 1);
        run(prog, &f6, 1);
        frames[0][m] = f4;
        frames[1][m] = f6;
    }
    let restored = super::nat_restore::measure(&mut dp, p, &frames);
    // New flows at repeat 1: distinct SYNs.
    let prog: &Xdp = dp.ebpf_mut().program(lb_common::PROG_BALANCER).expect("lb_xdp").try_into().expect("XDP");
    let mut syns: [[Vec<f64>; 3]; 2] = Default::default();
    let mut flow = 0u32;
    for round in 0..rounds {
        let mut order = [(0usize, 80u16), (1, 81), (2, 82)];
        order.rotate_left(round as usize % 3);
        for (m, port) in order {
            let (mut s4, mut s6) = (Vec::new(), Vec::new());
            for _ in 0..singles {
                flow += 1;
                let sport = 1024 + (flow % 60000) as u16;
                let src4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + flow);
                s4.push(run(prog, &ipv4_syn(src4, vip4, sport, port), 1));
                let mut syn6 = ipv6_frame(Ipv6Addr::from(u128::from(c6) + u128::from(flow)), vip6, sport, port);
                syn6[14 + 40 + 13] = 0x02;
                s6.push(run(prog, &syn6, 1));
            }
            syns[0][m].push(trimmed_mean(s4));
            syns[1][m].push(trimmed_mean(s6));
        }
    }
    let mut md = not_vip(p, rounds);
    let (table, worst) = restored.table(p.repeat);
    md.push_str("\n\n");
    md.push_str(&table);
    let verdict = |w: f64| if w <= 1.5 { "met" } else { "missed" };
    let _ = writeln!(
        md,
        "\nEach cell: median over {} rounds (min–max of the rounds in brackets), each round one run of every class \
         and mode at repeat {} (the modes in a different order each round); differences and ratios are taken within \
         each round. Ratio: (`lb_xdp`'s DR established + the mode's extra) / `lb_xdp`'s DR established, where the \
         extra is the class's time minus the DR established frame's of its family, both through `bench_restore`. \
         {}. Worst established packet (either direction), median over rounds: NAT **{:.2}x**, FULLNAT **{:.2}x** \
         (target <= 1.5x: {}, {}).\n\n\
         Method: `nat` and `fullnat` rewrite the frame in place and BPF_PROG_TEST_RUN keeps it between repeats. \
         `bench_restore` (tests/bench-ebpf) runs first on every repeat: it writes the frame's headers back (54 \
         bytes for IPv4, 74 for IPv6, the same copy for every mode of a family) and tail-calls `lb_xdp`. Checked \
         before timing: after 3 repeats the output is byte for byte that of 1, and a nat/fullnat frame comes out \
         rewritten. An established `nat`/`fullnat` packet goes from `lb_xdp` to `lb_nat` (tail call), whose lean \
         path (lb-ebpf `forward/nat_est.rs`) reads only the header offsets and rewrites; an established fullnat \
         packet takes its SNAT address and port from its `CT_ESTABLISHED` entry (`FlowVal::snat`), not from \
         `FULLNAT_FORWARD`. A reply is a frame to no VIP: `lb_xdp` passes it to `lb_nat_reply` (tail call) only \
         because a nat or fullnat service exists (`CONFIG_NAT`, `CONFIG_FULLNAT`; a frame to a SNAT address, by \
         its `VIP_FILTER` bit, is looked up in `FULLNAT_REVERSE` first, any other in `NAT_REVERSE` only). One \
         balancer, a dr, a nat and a fullnat service per family (32 backends each).",
        restored.rounds,
        p.repeat,
        restored.reference(),
        worst[0],
        worst[1],
        verdict(worst[0]),
        verdict(worst[1])
    );
    md.push_str(
        "\n| new flow (repeat 1) | dr (ns) | nat (ns) | fullnat (ns) | nat / dr | fullnat / dr |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for (fam, class) in ["IPv4 TCP SYN, new flow", "IPv6 TCP SYN, new flow"].into_iter().enumerate() {
        let [d, n, f] = [0, 1, 2].map(|m| median(syns[fam][m].clone()));
        let _ = writeln!(md, "| {class} | {d:.0} | {n:.0} | {f:.0} | {:.2}x | {:.2}x |", n / d, f / d);
    }
    let _ = writeln!(
        md,
        "\nNew flows at repeat 1 (each SYN a new flow; a fullnat SYN also allocates a SNAT port: one \
         `FULLNAT_REVERSE` insert, usually the first candidate): {rounds} rounds, each {singles} distinct SYNs per \
         mode and family; per round the mean of the single runs (outliers over 3x the median left out), then the \
         median over rounds. The harness's fixed cost is in every figure."
    );
    md
}

/// `--nat-probe CLASS SECS`: one class of `bench_nat` run at repeat 1 over and
/// over for SECS seconds (to profile it with `perf record -e cpu-clock`); prints
/// the mean. CLASS: dr4 nat4 fnat4 natrep4 fnatrep4 (and ...6), notvip.
pub fn probe(class: &str, secs: f64) {
    let cfg = config::parse(&yaml(), "bench-nat.yaml").unwrap_or_else(|e| panic!("{e}"));
    let plan = Plan::build(&cfg, &fake_macs(&cfg));
    let mut dp = Dataplane::load(&plan).expect("load the XDP object");
    dp.write(&plan, IFACE_MAC).expect("fill the maps");
    let (vip4, vip6): (Ipv4Addr, Ipv6Addr) = ("198.18.0.1".parse().unwrap(), "2001:db8:1::1".parse().unwrap());
    let (c4, c6): (Ipv4Addr, Ipv6Addr) = ("203.0.113.7".parse().unwrap(), "2001:db8:ff::7".parse().unwrap());
    let prog: &Xdp = dp.ebpf_mut().program(lb_common::PROG_BALANCER).expect("lb_xdp").try_into().expect("XDP");
    let v6 = class.ends_with('6');
    let port = match class.trim_end_matches(['4', '6']) { "dr" => 80, "nat" | "natrep" => 81, _ => 82 };
    let fwd = if v6 { ipv6_frame(c6, vip6, 40001, port) } else { ipv4_frame(c4, vip4, true, 40001, port) };
    let frame = if class == "notvip" {
        ipv4_frame("203.0.113.7".parse().unwrap(), "192.0.2.1".parse().unwrap(), true, 40000, 80)
    } else if class.contains("rep") {
        run(prog, &fwd, 1);
        let o = sent(prog, &fwd);
        if v6 {
            let (b, s) = (Ipv6Addr::from(<[u8; 16]>::try_from(&o[38..54]).unwrap()), Ipv6Addr::from(<[u8; 16]>::try_from(&o[22..38]).unwrap()));
            ipv6_frame(b, s, port, u16::from_be_bytes([o[54], o[55]]))
        } else {
            ipv4_frame(Ipv4Addr::new(o[30], o[31], o[32], o[33]), Ipv4Addr::new(o[26], o[27], o[28], o[29]), true, port, u16::from_be_bytes([o[34], o[35]]))
        }
    } else {
        run(prog, &fwd, 1);
        run(prog, &fwd, 1);
        fwd
    };
    let start = std::time::Instant::now();
    let mut t = Vec::new();
    while start.elapsed().as_secs_f64() < secs {
        if class == "notvip" {
            let r = prog.test_run(TestRunOptions { data_in: Some(&frame), repeat: 1000, ..TestRunOptions::new() }).expect("run");
            t.push(r.duration.as_nanos() as f64);
        } else {
            t.push(run(prog, &frame, 1));
        }
    }
    println!("{class}: {:.1} ns (median {:.1}, {} runs)", trimmed_mean(t.clone()), median(t.clone()), t.len());
}
