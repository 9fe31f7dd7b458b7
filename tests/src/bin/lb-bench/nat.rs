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
    let mut rows: Vec<(&str, [Vec<f64>; 3])> = vec![
        ("IPv4 TCP ACK, established", Default::default()),
        ("IPv6 TCP ACK, established", Default::default()),
        ("IPv4 TCP SYN, new flow", Default::default()),
        ("IPv6 TCP SYN, new flow", Default::default()),
    ];
    // By family, then nat (0) and fullnat (1).
    let mut replies: [[Vec<f64>; 2]; 2] = Default::default();
    let mut dr_repeat: [Vec<f64>; 2] = Default::default();
    let prog: &Xdp = dp.ebpf_mut().program(lb_common::PROG_BALANCER).expect("lb_xdp").try_into().expect("XDP");
    // The NAT flows' replies: from the backend each flow went to (to the client
    // for nat, to the SNAT address and port for fullnat).
    let mut reply_frames = Vec::new();
    for (port, cport) in [(81u16, 40001u16), (82, 40002)] {
        let (n4, n6) = (ipv4_frame(c4, vip4, true, cport, port), ipv6_frame(c6, vip6, cport, port));
        run(prog, &n4, 1);
        run(prog, &n6, 1);
        let (o4, o6) = (sent(prog, &n4), sent(prog, &n6));
        let b4 = Ipv4Addr::new(o4[30], o4[31], o4[32], o4[33]);
        let b6 = Ipv6Addr::from(<[u8; 16]>::try_from(&o6[38..54]).expect("16 bytes"));
        let (s4, s6) = (Ipv4Addr::new(o4[26], o4[27], o4[28], o4[29]), Ipv6Addr::from(<[u8; 16]>::try_from(&o6[22..38]).expect("16 bytes")));
        let (sp4, sp6) = (u16::from_be_bytes([o4[34], o4[35]]), u16::from_be_bytes([o6[54], o6[55]]));
        reply_frames.push((ipv4_frame(b4, s4, true, port, sp4), ipv6_frame(b6, s6, port, sp6)));
    }
    let mut flow = 0u32;
    for round in 0..rounds {
        let mut order = [(0usize, 80u16), (1, 81), (2, 82)];
        order.rotate_left(round as usize % 3);
        for (m, port) in order {
            let f4 = ipv4_frame(c4, vip4, true, 40010 + m as u16, port);
            let f6 = ipv6_frame(c6, vip6, 40010 + m as u16, port);
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
            if m >= 1 {
                let (r4, r6) = &reply_frames[m - 1];
                replies[0][m - 1].push(trimmed_mean((0..singles).map(|_| run(prog, r4, 1)).collect()));
                replies[1][m - 1].push(trimmed_mean((0..singles).map(|_| run(prog, r6, 1)).collect()));
            }
        }
    }
    let mut md = not_vip(p, rounds);
    md.push_str(
        "\n\n| packet class (repeat 1) | dr (ns) | nat (ns) | fullnat (ns) | nat - dr | fullnat - dr | nat / dr | fullnat / dr |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    // The ratio to DR: DR established at `p.repeat` (the harness's fixed cost
    // spread thin) plus the mode's extra cost measured at repeat 1.
    let dr_rep = [median(dr_repeat[0].clone()), median(dr_repeat[1].clone())];
    let mut worst = [0.0f64; 2];
    let mut dr_est = [0.0f64; 2];
    for (i, (class, s)) in rows.iter().enumerate() {
        let (d, n, f) = (median(s[0].clone()), median(s[1].clone()), median(s[2].clone()));
        let ratio = |x: f64| if i < 2 { (dr_rep[i] + x - d) / dr_rep[i] } else { x / d };
        if i < 2 {
            dr_est[i] = d;
            worst[0] = worst[0].max(ratio(n));
            worst[1] = worst[1].max(ratio(f));
        }
        let _ = writeln!(md, "| {class} | {d:.0} | {n:.0} | {f:.0} | {:+.0} | {:+.0} | {:.2}x | {:.2}x |", n - d, f - d, ratio(n), ratio(f));
    }
    for (i, class) in ["IPv4 TCP ACK, reply (backend to client)", "IPv6 TCP ACK, reply (backend to client)"].into_iter().enumerate() {
        let (n, f) = (median(replies[i][0].clone()), median(replies[i][1].clone()));
        let ratio = |x: f64| (dr_rep[i] + x - dr_est[i]) / dr_rep[i];
        worst[0] = worst[0].max(ratio(n));
        worst[1] = worst[1].max(ratio(f));
        let _ = writeln!(
            md,
            "| {class} | ({:.0}: DR established) | {n:.0} | {f:.0} | {:+.0} | {:+.0} | {:.2}x | {:.2}x |",
            dr_est[i],
            n - dr_est[i],
            f - dr_est[i],
            ratio(n),
            ratio(f)
        );
    }
    let verdict = |w: f64| if w <= 1.5 { "met" } else { "missed" };
    let _ = writeln!(
        md,
        "\nEvery class at repeat 1 (NAT and FULLNAT rewrite the frame in place; BPF_PROG_TEST_RUN does not \
         restore it between repeats), so the harness's fixed cost is in every figure; the established rows' \
         ratio is (DR established at repeat {} + the mode's extra) / DR established at repeat {} (IPv4 {:.0} ns, \
         IPv6 {:.0} ns), the new-flow rows' the plain quotient. Worst established packet (either direction): \
         NAT **{:.2}x**, FULLNAT **{:.2}x** the DR established one of its family (target <= 1.5x: {}, {}). One \
         balancer, a dr, a nat and a fullnat service per family (32 backends each), {rounds} rounds (the modes in \
         turn first), each measuring every class: the same frame {singles} times for established flows and \
         replies, {singles} distinct SYNs for new flows (a fullnat SYN also allocates a SNAT port: one \
         `FULLNAT_REVERSE` insert, usually the first candidate); per round the mean of the single runs (outliers \
         over 3x the median left out), then the median over rounds. A reply is a frame to no VIP: `lb_xdp` \
         passes it to `lb_nat_reply` (tail call) only because a nat or fullnat service exists (`CONFIG_NAT`, \
         `CONFIG_FULLNAT`; a frame to a SNAT address, by its `VIP_FILTER` bit, is looked up in `FULLNAT_REVERSE` \
         first, any other in `NAT_REVERSE` only). An established fullnat packet takes its SNAT address and port \
         from its `CT_ESTABLISHED` entry (`FlowVal::snat`), not from `FULLNAT_FORWARD`.",
        p.repeat,
        p.repeat,
        dr_rep[0],
        dr_rep[1],
        worst[0],
        worst[1],
        verdict(worst[0]),
        verdict(worst[1])
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
