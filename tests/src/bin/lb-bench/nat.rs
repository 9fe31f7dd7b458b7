//! What `forwarding: nat` costs per packet, next to `dr` in the same balancer:
//! established and new-flow frames to the VIP, and the backend's replies (which DR
//! never sees), IPv4 and IPv6, 32 backends per service, in alternating rounds.
//! Target: an established NAT packet (either direction) at most 1.5x the DR
//! established cost.

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
    let mut y = String::from("services:\n");
    for (mode, port) in [("dr", 80), ("nat", 81)] {
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
         more than before), {on:.1} ns with one (the tail call into `lb_nat_reply` and its `NAT_REVERSE` \
         miss), {rounds} alternating rounds, medians.",
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

pub fn bench_nat(p: &Params) -> String {
    let cfg = config::parse(&yaml(), "bench-nat.yaml").unwrap_or_else(|e| panic!("{e}"));
    let plan = Plan::build(&cfg, &fake_macs(&cfg));
    let mut dp = Dataplane::load(&plan).expect("load the XDP object");
    dp.write(&plan, IFACE_MAC).expect("fill the maps");
    let (vip4, vip6): (Ipv4Addr, Ipv6Addr) = ("198.18.0.1".parse().unwrap(), "2001:db8:1::1".parse().unwrap());
    let (c4, c6): (Ipv4Addr, Ipv6Addr) = ("203.0.113.7".parse().unwrap(), "2001:db8:ff::7".parse().unwrap());
    let rounds = if p.quick { 3 } else { 7 };
    let singles = (p.new_flows / rounds / 4).max(50);
    // NAT rewrites the frame in place and BPF_PROG_TEST_RUN does not restore it
    // between repeats: every class runs at repeat 1, the same frame `singles`
    // times (established, replies) or distinct SYNs (new flows).
    let mut rows: Vec<(&str, [Vec<f64>; 2])> = vec![
        ("IPv4 TCP ACK, established", Default::default()),
        ("IPv6 TCP ACK, established", Default::default()),
        ("IPv4 TCP SYN, new flow", Default::default()),
        ("IPv6 TCP SYN, new flow", Default::default()),
    ];
    let mut replies: [Vec<f64>; 2] = Default::default();
    let mut dr_repeat: [Vec<f64>; 2] = Default::default();
    let prog: &Xdp = dp.ebpf_mut().program(lb_common::PROG_BALANCER).expect("lb_xdp").try_into().expect("XDP");
    // The NAT flows' replies: from the backend each flow went to.
    let (n4, n6) = (ipv4_frame(c4, vip4, true, 40001, 81), ipv6_frame(c6, vip6, 40001, 81));
    run(prog, &n4, 1);
    run(prog, &n6, 1);
    let (o4, o6) = (sent(prog, &n4), sent(prog, &n6));
    let b4 = Ipv4Addr::new(o4[30], o4[31], o4[32], o4[33]);
    let b6 = Ipv6Addr::from(<[u8; 16]>::try_from(&o6[38..54]).expect("16 bytes"));
    let r4 = ipv4_frame(b4, c4, true, 81, 40001);
    let r6 = ipv6_frame(b6, c6, 81, 40001);
    let mut flow = 0u32;
    for round in 0..rounds {
        let mut order = [(0usize, 80u16), (1, 81)];
        order.rotate_left(round as usize % 2);
        for (m, port) in order {
            let f4 = ipv4_frame(c4, vip4, true, 40000 + m as u16, port);
            let f6 = ipv6_frame(c6, vip6, 40000 + m as u16, port);
            run(prog, &f4, 1);
            run(prog, &f6, 1);
            if m == 0 {
                dr_repeat[0].push(run(prog, &f4, p.repeat));
                dr_repeat[1].push(run(prog, &f6, p.repeat));
            }
            rows[0].1[m].push(trimmed_mean((0..singles).map(|_| run(prog, &f4, 1)).collect()));
            rows[1].1[m].push(trimmed_mean((0..singles).map(|_| run(prog, &f6, 1)).collect()));
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
            rows[2].1[m].push(trimmed_mean(s4));
            rows[3].1[m].push(trimmed_mean(s6));
            if m == 1 {
                replies[0].push(trimmed_mean((0..singles).map(|_| run(prog, &r4, 1)).collect()));
                replies[1].push(trimmed_mean((0..singles).map(|_| run(prog, &r6, 1)).collect()));
            }
        }
    }
    let mut md = not_vip(p, rounds);
    md.push_str("\n\n| packet class (repeat 1) | dr (ns) | nat (ns) | nat - dr | nat / dr |\n|---|---:|---:|---:|---:|\n");
    // The ratio to DR: DR established at `p.repeat` (the harness's fixed cost
    // spread thin) plus NAT's extra cost measured at repeat 1.
    let dr_rep = [median(dr_repeat[0].clone()), median(dr_repeat[1].clone())];
    let mut worst: f64 = 0.0;
    let mut dr_est = [0.0f64; 2];
    for (i, (class, s)) in rows.iter().enumerate() {
        let (d, n) = (median(s[0].clone()), median(s[1].clone()));
        let ratio = if i < 2 { (dr_rep[i] + n - d) / dr_rep[i] } else { n / d };
        if i < 2 {
            dr_est[i] = d;
            worst = worst.max(ratio);
        }
        let _ = writeln!(md, "| {class} | {d:.0} | {n:.0} | {:+.0} | {ratio:.2}x |", n - d);
    }
    for (i, class) in ["IPv4 TCP ACK, reply (backend to client)", "IPv6 TCP ACK, reply (backend to client)"].into_iter().enumerate() {
        let n = median(replies[i].clone());
        let ratio = (dr_rep[i] + n - dr_est[i]) / dr_rep[i];
        worst = worst.max(ratio);
        let _ = writeln!(md, "| {class} | ({:.0}: DR established) | {n:.0} | {:+.0} | {ratio:.2}x |", dr_est[i], n - dr_est[i]);
    }
    let _ = writeln!(
        md,
        "\nEvery class at repeat 1 (NAT rewrites the frame in place; BPF_PROG_TEST_RUN does not restore it \
         between repeats), so the harness's fixed cost is in every figure; the established rows' ratio is \
         (DR established at repeat {} + NAT's extra) / DR established at repeat {} (IPv4 {:.0} ns, IPv6 \
         {:.0} ns), the new-flow rows' the plain quotient. Worst established NAT packet (either direction) \
         **{worst:.2}x** the DR established one of its family (target <= 1.5x: {}). One \
         balancer, a dr and a nat service per family (32 backends each), {rounds} rounds (the modes in \
         turn first), each measuring every class: the same frame {singles} times for established flows and \
         replies, {singles} distinct SYNs for new flows; per round the mean of the single runs (outliers over \
         3x the median left out), then the median over rounds. A reply is a frame to no VIP: `lb_xdp` \
         passes it to `lb_nat_reply` (tail call) only because a nat service exists (`CONFIG_NAT`).",
        p.repeat,
        p.repeat,
        dr_rep[0],
        dr_rep[1],
        if worst <= 1.5 { "met" } else { "missed" }
    );
    md
}
