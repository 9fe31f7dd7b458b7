//! Per-packet cost of the XDP program through BPF_PROG_TEST_RUN (the per-stage
//! breakdown is in `breakdown.rs`).

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_agent::{config, dataplane::Dataplane, plan::Plan};
use lb_common::stat;

use crate::{
    Params,
    frames::{IFACE_MAC, config_yaml, fake_macs, ipv4_frame, ipv4_syn, ipv6_frame},
    med_min,
};

pub(crate) const XDP_PASS: u32 = 2;
pub(crate) const XDP_TX: u32 = 3;

pub(crate) fn test_run(prog: &Xdp, frame: &[u8], repeat: u32) -> (Duration, u32) {
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::new()
        })
        .expect("BPF_PROG_TEST_RUN");
    (r.duration, r.return_value)
}

/// Median and minimum over `runs` of the kernel's average ns per run with `repeat`.
fn per_packet(prog: &Xdp, frame: &[u8], p: &Params, expect: u32) -> (f64, f64) {
    let samples = (0..p.runs)
        .map(|_| {
            let (d, ret) = test_run(prog, frame, p.repeat);
            assert_eq!(ret, expect, "unexpected XDP action");
            d.as_nanos() as f64
        })
        .collect();
    med_min(samples)
}

pub struct PacketRow {
    pub class: &'static str,
    pub action: &'static str,
    pub ns: f64,
    pub min: f64,
    pub method: String,
}

pub(crate) fn xdp<'a>(dp: &'a mut Dataplane, name: &str) -> &'a Xdp {
    dp.ebpf_mut()
        .program(name)
        .unwrap_or_else(|| panic!("{name} in the object"))
        .try_into()
        .expect("XDP")
}

/// Addresses of the two extra services the breakdown needs.
pub(crate) const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
pub(crate) const PERSIST_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 2);

pub fn bench_packets(p: &Params) -> (Vec<PacketRow>, String) {
    // 100 x 50 (the per-packet set-up), then two services for the breakdown: one
    // whose only backend has no MAC (empty table, `on_all_down: pass`) and one with
    // persistence.
    let mut cfg_text = config_yaml(100, 50, 65537, 262144, true);
    let _ = write!(
        cfg_text,
        "  - name: empty\n    vip: {EMPTY_VIP}\n    port: 80\n    table_size: 251\n    on_all_down: pass\n    backends:\n      - address: 10.254.0.1\n\
         \x20 - name: sticky\n    vip: {PERSIST_VIP}\n    port: 80\n    table_size: 65537\n    persistence: {{ timeout: 300s, prefix_v4: 24 }}\n    backends:\n"
    );
    for b in 0..50 {
        let _ = writeln!(cfg_text, "      - address: 10.253.0.{}", b + 1);
    }
    let cfg = config::parse(&cfg_text, "bench-100x50.yaml").unwrap_or_else(|e| panic!("{e}"));
    let mut macs = fake_macs(&cfg);
    macs.remove(&"10.254.0.1".parse().expect("address"));
    let plan = Plan::build(&cfg, &macs);
    let t = Instant::now();
    let mut dp = Dataplane::load(&plan).expect("load the XDP object");
    dp.write(&plan, IFACE_MAC).expect("fill the maps");
    let apply = t.elapsed();
    // Every SYN recorded, however fast they come; the SYN-flood bypass has a row
    // of its own below.
    dp.set_syn_flood_kps(0).expect("SYN flood threshold");
    {
        let prog: &mut Xdp = dp
            .ebpf_mut()
            .program_mut("bench_macswap")
            .expect("bench_macswap in the object")
            .try_into()
            .expect("XDP");
        prog.load().expect("load bench_macswap");
    }
    let rep = format!("median of {} runs x repeat {}", p.runs, p.repeat);
    let client = Ipv4Addr::new(203, 0, 113, 7);
    let vip4 = Ipv4Addr::new(198, 18, 0, 1);
    let vip6: Ipv6Addr = "2001:db8:1::1".parse().expect("v6");
    let client6: Ipv6Addr = "2001:db8:ff::7".parse().expect("v6");
    let non_vip = ipv4_frame(client, Ipv4Addr::new(192, 0, 2, 1), true, 40000, 80);
    let est = ipv4_frame(client, vip4, true, 40001, 80);
    let udp = ipv4_frame(client, vip4, false, 40002, 53);
    let v6 = ipv6_frame(client6, vip6, 40003, 80);
    let mut malformed = ipv4_frame(client, vip4, true, 40004, 80);
    malformed.truncate(14 + 10);
    let syn = ipv4_syn(client, vip4, 40005, 80);
    // A router's "fragmentation needed" to the VIP about a reply of the
    // established flow `est` (its IP header and first 8 bytes, swapped back).
    let icmp_err = {
        let mut reply = est[14..14 + 28].to_vec();
        reply[12..16].copy_from_slice(&vip4.octets());
        reply[16..20].copy_from_slice(&client.octets());
        reply[20..22].copy_from_slice(&80u16.to_be_bytes());
        reply[22..24].copy_from_slice(&40001u16.to_be_bytes());
        let mut msg = vec![3, 4, 0, 0, 0, 0, 0x05, 0x78];
        msg.extend_from_slice(&reply);
        let mut f = est[..14 + 20].to_vec();
        f[14 + 2..14 + 4].copy_from_slice(&((20 + msg.len()) as u16).to_be_bytes());
        f[14 + 9] = 1;
        f[14 + 12..14 + 16].copy_from_slice(&Ipv4Addr::new(192, 0, 2, 254).octets());
        f.extend_from_slice(&msg);
        f
    };
    // IPv4 UDP fragments to vip4:53 with identification `id`: the first (MF,
    // offset 0) and a later one (offset 1480).
    let fragment = |id: u16, later: bool| {
        let mut f = udp.clone();
        f[14 + 4..14 + 6].copy_from_slice(&id.to_be_bytes());
        f[14 + 6..14 + 8].copy_from_slice(if later { &[0x20, 0xb9] } else { &[0x20, 0x00] });
        f
    };
    let later_frag = fragment(0x7fff, true);

    let mut rows = Vec::new();
    let (macswap_ns, macswap_min) = per_packet(xdp(&mut dp, "bench_macswap"), &non_vip, p, XDP_TX);
    rows.push(PacketRow {
        class: "reference: bench_macswap",
        action: "TX",
        ns: macswap_ns,
        min: macswap_min,
        method: rep.clone(),
    });
    for (class, frame, expect, action) in [
        ("non-VIP IPv4 (pass)", &non_vip, XDP_PASS, "PASS"),
        ("VIP IPv4 TCP ACK, established (table hit)", &est, XDP_TX, "TX"),
        ("VIP IPv4 UDP, established", &udp, XDP_TX, "TX"),
        ("VIP IPv6 TCP ACK, established", &v6, XDP_TX, "TX"),
        (
            "VIP IPv4 TCP SYN (scheduled every time: Maglev + table update)",
            &syn,
            XDP_TX,
            "TX",
        ),
        (
            "malformed (truncated IPv4 header)",
            &malformed,
            XDP_PASS,
            "PASS",
        ),
        (
            "ICMP frag-needed about an established flow's reply (to its backend)",
            &icmp_err,
            XDP_TX,
            "TX",
        ),
        (
            "VIP IPv4 UDP later fragment (follows its first: FRAGS hit)",
            &later_frag,
            XDP_TX,
            "TX",
        ),
    ] {
        let prog = xdp(&mut dp, lb_common::PROG_BALANCER);
        // One run first so the flow is in CONNTRACK: every timed ACK/UDP run is a hit
        // (and, for the later fragment, its first so that it is in FRAGS).
        if std::ptr::eq(frame, &later_frag) {
            test_run(prog, &fragment(0x7fff, false), 1);
        }
        test_run(prog, frame, 1);
        let (ns, min) = per_packet(prog, frame, p, expect);
        rows.push(PacketRow {
            class,
            action,
            ns,
            min,
            method: rep.clone(),
        });
    }

    // The same SYN with the SYN-flood threshold at 1,000 per CPU-second: all but
    // the first thousand of each second go unrecorded (no CONNTRACK insert).
    dp.set_syn_flood_kps(1).expect("SYN flood threshold");
    let unrecorded = dp.stats().expect("counters").get(stat::CT_SYN_UNRECORDED);
    let (ns, min) = per_packet(xdp(&mut dp, lb_common::PROG_BALANCER), &syn, p, XDP_TX);
    let unrecorded = dp.stats().expect("counters").get(stat::CT_SYN_UNRECORDED) - unrecorded;
    let total = p.runs as u64 * u64::from(p.repeat);
    // Recorded at most: each CPU's window a second old restarts at its first SYN
    // past the threshold, so a CPU records up to twice the threshold in the
    // first window (docs/connection-table.md, "SYN floods"), and a window that ends
    // during the run another thousand.
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let most_recorded = (3 * 1000 * cpus).max(total / 10);
    assert!(
        unrecorded + most_recorded >= total,
        "only {unrecorded} of {total} SYNs above the threshold went unrecorded (at most {most_recorded} may be recorded)"
    );
    dp.set_syn_flood_kps(0).expect("SYN flood threshold");
    rows.push(PacketRow {
        class: "VIP IPv4 TCP SYN during a SYN flood (above `syn_flood_kps`: not recorded)",
        action: "TX",
        ns,
        min,
        method: rep.clone(),
    });

    // New flows: repeat=1 over distinct flows, SYNs (each a CONNTRACK insert of a key
    // not in the table + Maglev), then ACKs of the same flows (each a hit), and the
    // reference and non-VIP frames at repeat=1, so the repeat=1 rows compare with each other.
    let flow = |i: u32| {
        (
            Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i),
            1024 + (i % 60000) as u16,
        )
    };
    let syns: Vec<Vec<u8>> = (0..p.new_flows)
        .map(|i| {
            let (src, sport) = flow(i);
            ipv4_syn(src, vip4, sport, 80)
        })
        .collect();
    let acks: Vec<Vec<u8>> = (0..p.new_flows)
        .map(|i| {
            let (src, sport) = flow(i);
            ipv4_frame(src, vip4, true, sport, 80)
        })
        .collect();
    let one = |prog: &Xdp, frames: &[Vec<u8>], expect: u32| {
        med_min(
            frames
                .iter()
                .map(|f| {
                    let (d, ret) = test_run(prog, f, 1);
                    assert_eq!(ret, expect, "unexpected XDP action");
                    d.as_nanos() as f64
                })
                .collect(),
        )
    };
    let rep1 = format!(
        "median of {} single runs (repeat 1), distinct flows",
        p.new_flows
    );
    // First fragments: each of a new datagram (distinct ids) of an established
    // flow: the table hit, then a FRAGS insert.
    let firsts: Vec<Vec<u8>> = (0..p.new_flows).map(|i| fragment(i as u16, false)).collect();
    let first = one(xdp(&mut dp, lb_common::PROG_BALANCER), &firsts, XDP_TX);
    let counted = |dp: &mut Dataplane| {
        let s = dp.stats().expect("counters");
        (s.get(stat::CONN_HIT), s.get(stat::CT_MIDFLOW_MISS))
    };
    let before = counted(&mut dp);
    let prog = xdp(&mut dp, lb_common::PROG_BALANCER);
    let miss = one(prog, &syns, XDP_TX);
    let hit = one(prog, &acks, XDP_TX);
    let pass1 = one(prog, &vec![non_vip.clone(); p.new_flows as usize], XDP_PASS);
    let ms1 = one(
        xdp(&mut dp, "bench_macswap"),
        &vec![non_vip.clone(); p.new_flows as usize],
        XDP_TX,
    );
    let after = counted(&mut dp);
    let (hits, midflow) = (after.0 - before.0, after.1 - before.1);
    // Each ACK finds its SYN's first record (or, for the few whose record a
    // colliding SYN overwrote, is scheduled again by Maglev: a midflow miss).
    assert_eq!(
        hits + midflow,
        u64::from(p.new_flows),
        "every ACK after its flow's SYN must be a connection-table hit or a midflow miss"
    );
    // Outstanding handshakes share FIRST_RECORD's slots by hash: of n SYNs in m
    // slots, n - m(1 - (1 - 1/m)^n) lose their record to a later one (20,000
    // in 65,536: ~2,760). This row's n is far more than are in flight at once
    // on a real node (docs/connection-table.md, "The first record").
    let (n, m) = (f64::from(p.new_flows), f64::from(lb_common::first_record_entries(262_144)));
    let expected = n - m * (1.0 - (1.0 - 1.0 / m).powf(n));
    assert!((midflow as f64) <= 1.5 * expected + 100.0, "{midflow} of {} ACKs lost their first record (expected about {expected:.0})", p.new_flows);
    eprintln!("lb-bench: {midflow} of {} ACKs found their SYN's first record overwritten (rescheduled by Maglev)", p.new_flows);
    rows.push(PacketRow {
        class: "VIP IPv4 TCP SYN, new flow (miss + insert)",
        action: "TX",
        ns: miss.0,
        min: miss.1,
        method: rep1.clone(),
    });
    rows.push(PacketRow {
        class: "VIP IPv4 TCP ACK, same flows (hit, moved to CT_ESTABLISHED)",
        action: "TX",
        ns: hit.0,
        min: hit.1,
        method: rep1,
    });
    rows.push(PacketRow {
        class: "VIP IPv4 UDP first fragment, new datagram (table hit + FRAGS insert)",
        action: "TX",
        ns: first.0,
        min: first.1,
        method: format!("median of {} single runs (repeat 1), distinct fragment ids", p.new_flows),
    });
    let r1 = format!(
        "median of {} single runs (repeat 1), same frame",
        p.new_flows
    );
    rows.push(PacketRow {
        class: "non-VIP IPv4 (pass)",
        action: "PASS",
        ns: pass1.0,
        min: pass1.1,
        method: r1.clone(),
    });
    rows.push(PacketRow {
        class: "reference: bench_macswap",
        action: "TX",
        ns: ms1.0,
        min: ms1.1,
        method: r1,
    });

    let breakdown = crate::breakdown::breakdown(&mut dp, p, client, vip4, macswap_ns);

    let non_vip_ns = rows[1].ns;
    let ratio = non_vip_ns / macswap_ns;
    let mut md = String::new();
    md.push_str(
        "| packet class | action | ns/packet (median) | min | method |\n|---|---|---:|---:|---|\n",
    );
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {} |",
            r.class, r.action, r.ns, r.min, r.method
        );
    }
    let _ = writeln!(
        md,
        "\nnon-VIP / macswap = {non_vip_ns:.0} / {macswap_ns:.0} = **{ratio:.2}x** (target <= 2x: {}{})",
        if ratio <= 2.0 { "met" } else { "missed" },
        if ratio <= 2.0 {
            String::new()
        } else {
            format!(
                ", {:.0} ns over; the min column gives {:.0} / {:.0} = {:.2}x",
                non_vip_ns - 2.0 * macswap_ns,
                rows[1].min,
                macswap_min,
                rows[1].min / macswap_min
            )
        }
    );
    if ratio > 2.0 {
        let _ = writeln!(
            md,
            "\n*Why the 2x target is missed, and what would close it.* A non-VIP frame may cost at most \
             2 x {:.0} = {:.0} ns; it costs {:.0} ns more than the MAC swap, and the breakdown below puts \
             nearly all of that in one step: the IPv4 checks and the `VIP_FILTER` read (an inlined \
             array lookup; the `VIP_ADDRS` hash lookup only runs when the destination's Bloom bit is set). \
             The program cannot do less before XDP_PASS; what is left is this machine's noise.",
            macswap_ns,
            2.0 * macswap_ns,
            non_vip_ns - macswap_ns
        );
    }
    let _ = writeln!(
        md,
        "\nAt repeat 1 a new flow (SYN: Maglev, then a CONNTRACK insert of a new key) costs {:.0} ns \
         (median; {:.0} min) more than the first ACK of the same flow (a CONNTRACK hit that moves the \
         flow to CT_ESTABLISHED).",
        miss.0 - hit.0,
        miss.1 - hit.1
    );
    let _ = writeln!(
        md,
        "\nSet-up: 100 services x 50 backends (98 IPv4 TCP, 1 IPv4 UDP, 1 IPv6 TCP), table_size 65537, \
         plus the breakdown's two services below ({} Maglev slots in all), conntrack_size 262144; \
         load + fill of the maps took {:.2} s. TCP frames are ACKs (established) unless marked SYN: \
         the program schedules every SYN afresh (a reused 5-tuple must not inherit an old backend). \
         A repeat row runs one frame over and over, so the repeated SYN is a CONNTRACK insert over an \
         existing key: the kernel's LRU update takes a fresh node and frees the old one, with every \
         cache line it touches hot; the table never fills, so eviction is not in it. A new 5-tuple \
         costs about twice as much (cold buckets, Maglev slot and node) and more with the table full: \
         the new-flow section below measures both, the live SYN-flood rows (e) and (f) the rate. \
         Rows other than the SYN-flood one run with the SYN-flood threshold off (`syn_flood_kps` 0: every SYN recorded).",
        plan.maglev_slots(),
        apply.as_secs_f64()
    );
    md.push_str(&breakdown);
    (rows, md)
}
