//! `cargo xtask bench`: per-packet cost of the XDP program through
//! BPF_PROG_TEST_RUN (with a per-stage breakdown), the live forwarding rate on veth
//! with native XDP (MAC-swap ceiling, the balancer, nftables DNAT), control-plane
//! costs (Maglev, plan, full apply, memory, reload under traffic), and the CPU cost
//! of 5,000 liveness probes, and failover with the real BIRD and keepalived
//! (needs the lb-agent binary next to this one: `cargo xtask bench` builds it).
//!
//! Without `--quick` the results are also written to `docs/benchmarks.md` and
//! `docs/benchmarks.png`; with `--quick` fewer repetitions and sizes are used, the
//! plot is drawn to a temporary file and removed, and nothing is written.

mod breakdown;
mod conntrack;
mod control;
mod failover;
mod frames;
mod live;
mod live_gen;
mod live_flows;
mod packets;
mod plot;
mod probes;
mod rare;
mod reload;
mod report;
mod scale;
mod prefix;
mod schedulers;
mod topo;
mod nat;
mod nat_restore;
mod newflow;
mod newflow_cycle;
mod tunnel;
mod trace;

use std::{fmt::Write as _, path::Path, time::Instant};

use report::sh;

struct Params {
    quick: bool,
    /// Per-packet: runs of `repeat` each; the median run is reported.
    runs: usize,
    repeat: u32,
    /// Distinct flows for the new-flow measurement (one test run each).
    new_flows: u32,
    /// Maglev: runs per size, sizes.
    maglev_runs: usize,
    maglev_sizes: &'static [u32],
    /// Full apply of 1,000 x 32: runs.
    apply_runs: usize,
    /// Reload of 1,000 x 32 under traffic: runs.
    reload_runs: usize,
}

/// Median and minimum.
fn med_min(v: Vec<f64>) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    (median(v), min)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The flags `main` knows; any other argument (a typo, `--help`) is refused
/// rather than starting the full run, which rewrites docs/benchmarks.md.
const FLAGS: &[&str] = &[
    "--quick",
    "--scale-serve",
    "--scale-only",
    "--failover-only",
    "--nat-only",
    "--newflow-only",
    "--nat-probe",
    "--dataplane-only",
    "--live-only",
    "--probes-only",
    "--schedulers-only",
    "--packets-only",
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let serve_at = args.iter().position(|a| a == "--scale-serve");
    let probe_at = args.iter().position(|a| a == "--nat-probe");
    for (i, a) in args.iter().enumerate() {
        let serve_arg = serve_at.is_some_and(|at| i > at && i <= at + 2 && a.parse::<usize>().is_ok());
        let probe_arg = probe_at.is_some_and(|at| i > at && i <= at + 2);
        if !FLAGS.contains(&a.as_str()) && !serve_arg && !probe_arg {
            eprintln!(
                "lb-bench: unknown argument {a:?}\nusage: lb-bench [{}]\n(no argument: every section, written to docs/benchmarks.md)",
                FLAGS.join(" | ")
            );
            std::process::exit(2);
        }
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let p = if quick {
        Params {
            quick,
            runs: 3,
            repeat: 10_000,
            new_flows: 2_000,
            maglev_runs: 3,
            maglev_sizes: &[65537],
            apply_runs: 1,
            reload_runs: 1,
        }
    } else {
        Params {
            quick,
            runs: 5,
            repeat: 100_000,
            new_flows: 20_000,
            maglev_runs: 7,
            maglev_sizes: &[65537, 655373],
            apply_runs: 3,
            reload_runs: 3,
        }
    };
    let lp = if quick {
        live::LiveParams {
            runs: 2,
            secs: 0.5,
            warmup_secs: 0.1,
            flows: 1024,
        }
    } else {
        live::LiveParams {
            runs: 5,
            secs: 2.0,
            warmup_secs: 0.3,
            flows: 1024,
        }
    };
    let pp = if quick {
        probes::ProbeParams {
            warmup_secs: 1.5,
            secs: 3.0,
            bare_secs: 1.0,
        }
    } else {
        probes::ProbeParams {
            warmup_secs: 3.0,
            secs: 10.0,
            bare_secs: 3.0,
        }
    };
    let failover_runs = if quick { 1 } else { 3 };
    let sp = if quick {
        scale::ScaleParams { starts: 1, reloads: 3, weight_reloads: 2, status_runs: 2 }
    } else {
        scale::ScaleParams { starts: 3, reloads: 20, weight_reloads: 5, status_runs: 5 }
    };
    let started = Instant::now();
    if let Some(at) = std::env::args().position(|a| a == "--scale-serve") {
        let arg = |i: usize, default: usize| std::env::args().nth(at + i).and_then(|v| v.parse().ok()).unwrap_or(default);
        return scale::serve(arg(1, 10_000), arg(2, 8));
    }
    // Only the control plane at scale, printed and not written.
    if std::env::args().any(|a| a == "--scale-only") {
        println!("\n## Control plane at scale\n\n{}", scale::bench_scale(&sp));
        eprintln!("lb-bench: done in {:.1} s", started.elapsed().as_secs_f64());
        return;
    }
    // Only the failover benchmark, printed and not written (for working on HA).
    if std::env::args().any(|a| a == "--failover-only") {
        let md = failover::bench_failover(failover_runs);
        println!("\n## Failover\n\n{md}");
        eprintln!("lb-bench: done in {:.1} s", started.elapsed().as_secs_f64());
        return;
    }
    // Only the probe benchmark, printed and not written (for working on the prober).
    // Only the per-packet sections added with tunnels and tracing (for working on
    // the data plane).
    if let Some(at) = std::env::args().position(|a| a == "--nat-probe") {
        let arg = |i: usize| std::env::args().nth(at + i).unwrap_or_default();
        for class in arg(1).split(',') {
            nat::probe(class, arg(2).parse().unwrap_or(2.0));
        }
        return;
    }
    if std::env::args().any(|a| a == "--nat-only") {
        println!("\n## NAT forwarding: cost per packet\n\n{}", nat::bench_nat(&p));
        return;
    }
    // Only the new-flow path, printed and not written (for working on it).
    if std::env::args().any(|a| a == "--newflow-only") {
        println!("\n## New-flow path\n\n{}", newflow::bench_newflow(&p));
        eprintln!("lb-bench: done in {:.1} s", started.elapsed().as_secs_f64());
        return;
    }
    if std::env::args().any(|a| a == "--dataplane-only") {
        println!("\n## Tunnel forwarding: cost per packet\n\n{}", tunnel::bench_tunnel(&p));
        println!("\n## NAT forwarding: cost per packet\n\n{}", nat::bench_nat(&p));
        println!("\n## ICMP and fragment path: cost to the other frames\n\n{}", rare::bench_rare(&p));
        println!("\n## Established-flow table: cost\n\n{}", conntrack::bench_protection(&p));
        println!("\n## Trace hook\n\n{}", trace::bench_trace_hook(&p));
        return;
    }
    // Only the live section, printed and not written (for working on the data plane).
    if std::env::args().any(|a| a == "--live-only") {
        let live = live::bench_live(&lp);
        let v = &live.variants;
        println!("\n## Live forwarding rate (veth, native XDP)\n\n{}", report::live_md(v, lp.runs, lp.secs, lp.flows, "", f64::NAN, f64::NAN));
        println!("{}", live_flows::flows_md(v, &live.held, lp.flows));
        eprintln!("lb-bench: done in {:.1} s", started.elapsed().as_secs_f64());
        return;
    }
    if std::env::args().any(|a| a == "--probes-only") {
        let probe = probes::bench_probes(&pp);
        println!("\n## Liveness probes\n\n{}", probes::probes_md(&probe, &pp));
        eprintln!("lb-bench: done in {:.1} s", started.elapsed().as_secs_f64());
        return;
    }
    // Only the scheduler benchmark, printed and not written.
    if std::env::args().any(|a| a == "--schedulers-only") {
        println!("\n## Prefix services: cost to other traffic\n\n{}", prefix::bench_prefix_paths(&p));
        println!("\n## Schedulers: new-flow cost\n\n{}", schedulers::bench_schedulers(&p));
        eprintln!("lb-bench: done in {:.1} s", started.elapsed().as_secs_f64());
        return;
    }
    eprintln!("lb-bench: per-packet cost (BPF_PROG_TEST_RUN) ...");
    let (rows, packets) = packets::bench_packets(&p);
    println!("\n## Per-packet cost (BPF_PROG_TEST_RUN)\n\n{packets}");
    // Only the per-packet table, printed and not written (for working on the
    // data plane).
    eprintln!("lb-bench: the new-flow path ...");
    let newflow = newflow::bench_newflow(&p);
    println!("\n## New-flow path: a recorded SYN against an established ACK\n\n{newflow}");
    if std::env::args().any(|a| a == "--packets-only") {
        drop(rows);
        eprintln!("lb-bench: done in {:.1} s", started.elapsed().as_secs_f64());
        return;
    }
    eprintln!("lb-bench: connection-table protection, off vs on ...");
    let protection = conntrack::bench_protection(&p);
    println!("\n## Established-flow table: cost\n\n{protection}");
    eprintln!("lb-bench: tunnel forwarding per packet ...");
    let tunnel = tunnel::bench_tunnel(&p);
    println!("\n## Tunnel forwarding: cost per packet\n\n{tunnel}");
    eprintln!("lb-bench: nat forwarding per packet ...");
    let nat = nat::bench_nat(&p);
    println!("\n## NAT forwarding: cost per packet\n\n{nat}");
    eprintln!("lb-bench: the ICMP and fragment path, before and after ...");
    let rare = rare::bench_rare(&p);
    println!("\n## ICMP and fragment path: cost to the other frames\n\n{rare}");
    eprintln!("lb-bench: the trace hook with no trace running ...");
    let trace_hook = trace::bench_trace_hook(&p);
    println!("\n## Trace hook, no trace running\n\n{trace_hook}");
    eprintln!(
        "lb-bench: live forwarding rate on veth, native XDP ({} x {} s per path) ...",
        lp.runs, lp.secs
    );
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let live = live::bench_live(&lp);
    let variants = &live.variants;
    let row_ns = |class: &str| {
        rows.iter()
            .find(|r| r.class.starts_with(class))
            .map_or(f64::NAN, |r| r.ns)
    };
    let mut live_md = report::live_md(
        variants,
        lp.runs,
        lp.secs,
        lp.flows,
        &load,
        row_ns("reference: bench_macswap"),
        row_ns("VIP IPv4 UDP"),
    );
    live_md.push_str(&live_flows::flows_md(variants, &live.held, lp.flows));
    println!("\n## Live forwarding rate (veth, native XDP)\n\n{live_md}");
    eprintln!("lb-bench: Maglev ...");
    let maglev = control::bench_maglev(&p);
    println!("\n## Maglev table build\n\n{maglev}");
    eprintln!("lb-bench: plan and full apply of 1,000 x 32 ...");
    let apply = control::bench_apply(&p);
    println!("\n## Plan and full apply\n\n{apply}");
    eprintln!("lb-bench: reload of 1,000 x 32 under traffic ...");
    let reload = reload::bench_reload(&p);
    println!("\n## Reload\n\n{reload}");
    eprintln!("lb-bench: the agent at scale (1,000 x 32 and 10,000 x 8, default table_size) ...");
    let scale = scale::bench_scale(&sp);
    println!("\n## Control plane at scale\n\n{scale}");
    eprintln!(
        "lb-bench: probe CPU, {} TCP targets at 1 s ({:.0} s after {:.0} s warm-up) ...",
        probes::PORTS * probes::ADDRESSES as usize,
        pp.secs,
        pp.warmup_secs
    );
    let probe = probes::bench_probes(&pp);
    let probe_md = probes::probes_md(&probe, &pp);
    println!("\n## Liveness probes\n\n{probe_md}");
    eprintln!("lb-bench: new-flow cost per scheduler ...");
    let sched_md = schedulers::bench_schedulers(&p);
    println!("\n## Schedulers: new-flow cost\n\n{sched_md}");
    eprintln!("lb-bench: what prefix services cost other traffic ...");
    let prefix_md = prefix::bench_prefix_paths(&p);
    println!("\n## Prefix services: cost to other traffic\n\n{prefix_md}");
    eprintln!("lb-bench: failover with BIRD and keepalived ({failover_runs} run(s) per scenario) ...");
    let failover_md = failover::bench_failover(failover_runs);
    println!("\n## Failover\n\n{failover_md}");
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let png = if p.quick {
        std::env::temp_dir().join(format!("lb-bench-{}.png", std::process::id()))
    } else {
        docs.join("benchmarks.png")
    };
    plot::draw(&png, &variants[..3], &rows).unwrap_or_else(|e| panic!("drawing {}: {e}", png.display()));
    eprintln!("lb-bench: done in {:.1} s", started.elapsed().as_secs_f64());
    if p.quick {
        let _ = std::fs::remove_file(&png);
        return;
    }

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mut doc = String::new();
    let _ = write!(
        doc,
        "# Benchmarks\n\n\
         Generated by `cargo xtask bench` (the `lb-bench` binary of `tests/`); every number below is\n\
         the one that run printed. Re-run the command to refresh this file and the plot; `cargo xtask\n\
         bench --quick` runs fewer repetitions and sizes and writes nothing.\n\n\
         - date: {}\n- machine: {nproc} CPUs, `{cpu}`, kernel `{}`\n- command: `cargo xtask bench` (release build), total run time {:.0} s\n\n\
         ![Live forwarding rate of (a), (b), (c), and per-packet cost by frame class](benchmarks.png)\n\n\
         ## Per-packet cost of the XDP program\n\n{packets}\n\
         ### New-flow path: a recorded SYN against an established ACK\n\n{newflow}\n\n\
         ### Established-flow table: cost per packet, off vs on\n\n{protection}\n\
         ### Tunnel forwarding: cost per packet\n\n{tunnel}\n\
         ### NAT forwarding: cost per packet\n\n{nat}\n\
         ### ICMP and fragment path: cost to the frames that do not take it (before/after)\n\n{rare}\n\
         ### `lb-agent trace` hook: cost while no trace runs\n\n{trace_hook}\n\
         ## Live forwarding rate (veth, native XDP)\n\n{live_md}\n{}\n\
         ## Control plane\n\n### Maglev table build (`lb_agent::maglev::build_table`)\n\n{maglev}\n\
         ### Plan and full apply, 1,000 services x 32 backends\n\n{apply}\n\
         ### Reload under traffic, 1,000 services x 32 backends\n\n{reload}\n\
         ### The agent at scale: start, memory, reloads, status\n\n{scale}\n\
         ### Liveness probes: CPU\n\n{probe_md}\n\
         ## Schedulers: new-flow cost\n\n{sched_md}\n\
         ### Prefix services: cost to other traffic\n\n{prefix_md}\n\
         ## Failover (ECMP and VRRP pair)\n\n{failover_md}\n",
        sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        sh("uname", &["-r"]),
        started.elapsed().as_secs_f64(),
        report::LIVE_METHOD,
    );
    doc.push_str(report::HOW_MEASURED);
    let path = docs.join("benchmarks.md");
    std::fs::write(&path, doc).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    eprintln!("lb-bench: wrote docs/benchmarks.md and docs/benchmarks.png");
}
