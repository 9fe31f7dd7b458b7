//! `cargo xtask bench`: per-packet cost of the XDP program through
//! BPF_PROG_TEST_RUN, and control-plane costs (Maglev, plan, full apply, memory).
//!
//! Without `--quick` the results are also written to `docs/benchmarks.md`; with
//! `--quick` fewer repetitions and sizes are used and nothing is written.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use aya::{
    maps::Map,
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_agent::{
    config::{self, Config},
    dataplane::Dataplane,
    maglev::{MaglevBackend, build_table, is_prime},
    neigh::Mac,
    plan::Plan,
};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const IFACE_MAC: Mac = [0x02, 0x1b, 0, 0, 0, 1];
const CLIENT_MAC: Mac = [0x02, 0xc1, 0, 0, 0, 1];

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

// ---- frames ---------------------------------------------------------------

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&IFACE_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn l4(tcp: bool, sport: u16, dport: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    if tcp {
        p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]); // seq, ack
        p.extend_from_slice(&[5 << 4, 0x02]); // data offset 5, SYN
        p.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, checksum, urgent
    } else {
        p.extend_from_slice(&8u16.to_be_bytes());
        p.extend_from_slice(&[0, 0]);
    }
    p
}

fn ipv4_frame(src: Ipv4Addr, dst: Ipv4Addr, tcp: bool, sport: u16, dport: u16) -> Vec<u8> {
    let seg = l4(tcp, sport, dport);
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((20 + seg.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 1, 0x40, 0, 64, if tcp { 6 } else { 17 }, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let sum = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(&seg);
    ethernet(0x0800, &h)
}

fn ipv6_frame(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
    let seg = l4(true, sport, dport);
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    h.extend_from_slice(&[6, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&seg);
    ethernet(0x86dd, &h)
}

// ---- configurations -------------------------------------------------------

/// `services` services with `backends` backends each. With `mixed`, the last two
/// services are a UDP one (on the first IPv4 VIP, port 53) and an IPv6 TCP one.
fn config_yaml(
    services: u32,
    backends: u32,
    table_size: u32,
    conntrack: u32,
    mixed: bool,
) -> String {
    let mut y = format!("conntrack_size: {conntrack}\nservices:\n");
    for s in 0..services {
        let (vip, port, proto, v6) = if mixed && s == services - 2 {
            ("198.18.0.1".to_string(), 53, "udp", false)
        } else if mixed && s == services - 1 {
            ("2001:db8:1::1".to_string(), 80, "tcp", true)
        } else {
            (
                format!("198.18.{}.{}", s / 250, s % 250 + 1),
                80,
                "tcp",
                false,
            )
        };
        let _ = writeln!(
            y,
            "  - name: svc{s}\n    vip: {vip}\n    port: {port}\n    protocol: {proto}\n    table_size: {table_size}\n    backends:"
        );
        for b in 0..backends {
            let addr = if v6 {
                format!("2001:db8:{s:x}::{:x}", b + 1)
            } else {
                format!("10.{}.{}.{}", s / 250, s % 250, b + 1)
            };
            let _ = writeln!(y, "      - address: \"{addr}\"");
        }
    }
    y
}

fn fake_macs(cfg: &Config) -> BTreeMap<IpAddr, Mac> {
    Plan::backend_addresses(cfg)
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            let b = (i as u32).to_be_bytes();
            (a, [0x02, 0xbe, b[0], b[1], b[2], b[3]])
        })
        .collect()
}

// ---- per-packet -------------------------------------------------------------

fn test_run(prog: &Xdp, frame: &[u8], repeat: u32) -> (Duration, u32) {
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

struct PacketRow {
    class: &'static str,
    action: &'static str,
    ns: f64,
    min: f64,
    method: String,
}

fn bench_packets(p: &Params) -> (Vec<PacketRow>, String) {
    let cfg_text = config_yaml(100, 50, 65537, 262144, true);
    let cfg = config::parse(&cfg_text, "bench-100x50.yaml").unwrap_or_else(|e| panic!("{e}"));
    let plan = Plan::build(&cfg, &fake_macs(&cfg));
    let t = Instant::now();
    let mut dp = Dataplane::load(&plan).expect("load the XDP object");
    dp.write(&plan, IFACE_MAC).expect("fill the maps");
    let apply = t.elapsed();
    let ebpf = dp.ebpf_mut();
    {
        let prog: &mut Xdp = ebpf
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

    let mut rows = Vec::new();
    let (macswap_ns, macswap_min);
    {
        let ms: &Xdp = ebpf
            .program("bench_macswap")
            .expect("loaded")
            .try_into()
            .expect("XDP");
        (macswap_ns, macswap_min) = per_packet(ms, &non_vip, p, XDP_TX);
        rows.push(PacketRow {
            class: "reference: bench_macswap",
            action: "TX",
            ns: macswap_ns,
            min: macswap_min,
            method: rep.clone(),
        });
    }
    let prog: &Xdp = ebpf
        .program(lb_common::PROG_BALANCER)
        .expect("lb_xdp")
        .try_into()
        .expect("XDP");
    for (class, frame, expect, action) in [
        ("non-VIP IPv4 (pass)", &non_vip, XDP_PASS, "PASS"),
        ("VIP IPv4 TCP, established (table hit)", &est, XDP_TX, "TX"),
        ("VIP IPv4 UDP, established", &udp, XDP_TX, "TX"),
        ("VIP IPv6 TCP, established", &v6, XDP_TX, "TX"),
        (
            "malformed (truncated IPv4 header)",
            &malformed,
            XDP_PASS,
            "PASS",
        ),
    ] {
        // One run first so the flow is in CONNTRACK: every timed run is a hit.
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

    // New flows: repeat=1 over distinct flows (each a CONNTRACK miss + Maglev +
    // insert), then the same frames again (each a hit), and the reference and
    // non-VIP frames at repeat=1, so the repeat=1 numbers compare with each other.
    let frames: Vec<Vec<u8>> = (0..p.new_flows)
        .map(|i| {
            let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i);
            ipv4_frame(src, vip4, true, 1024 + (i % 60000) as u16, 80)
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
    let miss = one(prog, &frames, XDP_TX);
    let hit = one(prog, &frames, XDP_TX);
    let pass1 = one(prog, &vec![non_vip.clone(); p.new_flows as usize], XDP_PASS);
    let ms: &Xdp = ebpf
        .program("bench_macswap")
        .expect("loaded")
        .try_into()
        .expect("XDP");
    let ms1 = one(ms, &vec![non_vip.clone(); p.new_flows as usize], XDP_TX);
    rows.push(PacketRow {
        class: "VIP IPv4 TCP SYN, new flow (miss + insert)",
        action: "TX",
        ns: miss.0,
        min: miss.1,
        method: rep1.clone(),
    });
    rows.push(PacketRow {
        class: "VIP IPv4 TCP, same flows again (hit)",
        action: "TX",
        ns: hit.0,
        min: hit.1,
        method: rep1,
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
        "\nnon-VIP / macswap = {non_vip_ns:.0} / {macswap_ns:.0} = **{ratio:.2}x** (target <= 2x: {})",
        if ratio <= 2.0 { "met" } else { "missed" }
    );
    let _ = writeln!(
        md,
        "\nA new flow costs {:.0} ns more than a hit on the same frames (both at repeat 1).",
        miss.0 - hit.0
    );
    let _ = writeln!(
        md,
        "\nSet-up: 100 services x 50 backends (98 IPv4 TCP, 1 IPv4 UDP, 1 IPv6 TCP), table_size 65537 \
         ({} Maglev slots), conntrack_size 262144; load + fill of the maps took {:.2} s.",
        plan.maglev.len(),
        apply.as_secs_f64()
    );
    (rows, md)
}

// ---- control plane ------------------------------------------------------------

fn bench_maglev(p: &Params) -> String {
    let mut md = String::from(
        "| backends | table size | build time (ms) | target |\n|---:|---:|---:|---|\n",
    );
    for &size in p.maglev_sizes {
        assert!(is_prime(size), "{size} is not prime");
        for n in [10u32, 100, 1000] {
            let backends: Vec<MaglevBackend> = (0..n)
                .map(|i| MaglevBackend {
                    address: IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 1)) + i)),
                    weight: 1,
                })
                .collect();
            let samples = (0..p.maglev_runs)
                .map(|_| {
                    let t = Instant::now();
                    let table = build_table(&backends, size);
                    let d = t.elapsed();
                    assert_eq!(table.len(), size as usize);
                    d.as_secs_f64() * 1e3
                })
                .collect();
            let ms = median(samples);
            let target = if n == 1000 && size == 65537 {
                format!("< 5 ms: {}", if ms < 5.0 { "met" } else { "missed" })
            } else {
                String::new()
            };
            let _ = writeln!(md, "| {n} | {size} | {ms:.3} | {target} |");
        }
    }
    let _ = writeln!(
        md,
        "\nMedian of {} builds each, equal weights.",
        p.maglev_runs
    );
    md
}

fn map_ids(dp: &mut Dataplane) -> Vec<(String, u32, u32)> {
    dp.ebpf_mut()
        .maps()
        .filter_map(|(name, map)| {
            let data = match map {
                Map::Array(m) | Map::HashMap(m) | Map::LruHashMap(m) | Map::PerCpuArray(m) => m,
                _ => return None,
            };
            let info = data.info().ok()?;
            Some((name.to_string(), info.id(), info.max_entries()))
        })
        .collect()
}

fn memlock(id: u32) -> Option<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "show", "id", &id.to_string()])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rest = &text[text.find("\"bytes_memlock\":")? + "\"bytes_memlock\":".len()..];
    rest.trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn bench_apply(p: &Params) -> String {
    let (services, backends, table_size) = (1000u32, 32u32, 4099u32);
    let text = config_yaml(services, backends, table_size, 262144, false);
    let t = Instant::now();
    let cfg = config::parse(&text, "bench-1000x32.yaml").unwrap_or_else(|e| panic!("{e}"));
    let parse = t.elapsed();
    let macs = fake_macs(&cfg);
    let plans: Vec<f64> = (0..p.maglev_runs)
        .map(|_| {
            let t = Instant::now();
            let plan = Plan::build(&cfg, &macs);
            let d = t.elapsed();
            assert_eq!(plan.maglev.len(), (services * table_size) as usize);
            d.as_secs_f64() * 1e3
        })
        .collect();
    let plan_ms = median(plans);
    let plan = Plan::build(&cfg, &macs);
    let mut loads = Vec::new();
    let mut writes = Vec::new();
    let mut totals = Vec::new();
    let mut last = None;
    for _ in 0..p.apply_runs {
        drop(last.take());
        let t = Instant::now();
        let mut dp = Dataplane::load(&plan).expect("load the XDP object");
        let l = t.elapsed();
        dp.write(&plan, IFACE_MAC).expect("fill the maps");
        let total = t.elapsed();
        loads.push(l.as_secs_f64());
        writes.push((total - l).as_secs_f64());
        totals.push(total.as_secs_f64());
        last = Some(dp);
    }
    let mut dp = last.expect("at least one apply");
    let rss = status_kib("VmRSS:");
    let hwm = status_kib("VmHWM:");
    let mut maps = map_ids(&mut dp);
    maps.sort();
    let mut map_rows = String::new();
    let mut sum = 0u64;
    for (name, id, entries) in &maps {
        let m = memlock(*id);
        sum += m.unwrap_or(0);
        let shown = m.map_or("?".to_string(), |m| format!("{:.1}", m as f64 / 1048576.0));
        let _ = writeln!(map_rows, "| {name} | {entries} | {shown} |");
    }
    let total = median(totals.clone());
    let entries = plan.maglev.len() + plan.backends.len() + 2 * plan.services.len() + 2;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Configuration: {services} services x {backends} backends = {} backends, table_size {table_size} \
         (65537 would be {}M Maglev slots), conntrack_size 262144.\n",
        services * backends,
        services as u64 * 65537 / 1_000_000
    );
    md.push_str("| step | time | target |\n|---|---:|---|\n");
    let _ = writeln!(
        md,
        "| parse + validate the YAML (once) | {:.0} ms | |",
        parse.as_secs_f64() * 1e3
    );
    let _ = writeln!(
        md,
        "| `Plan::build` (all Maglev tables) | {plan_ms:.0} ms | |"
    );
    let _ = writeln!(
        md,
        "| `Dataplane::load` (object, verifier, map creation) | {:.3} s | |",
        median(loads)
    );
    let _ = writeln!(
        md,
        "| `Dataplane::write` ({entries} map entries, one syscall each) | {:.3} s | |",
        median(writes)
    );
    let _ = writeln!(
        md,
        "| full apply (load + write) | {total:.3} s | < 1 s: {} |",
        if total < 1.0 { "met" } else { "missed" }
    );
    let _ = writeln!(
        md,
        "\nMedian of {} runs for the plan, {} for the apply.\n",
        p.maglev_runs, p.apply_runs
    );
    let _ = writeln!(
        md,
        "Memory after the apply: agent VmRSS {:.1} MiB (VmHWM {:.1} MiB, which includes \
        the generated YAML, the parsed configuration and the plan), BPF maps {:.1} MiB (`bytes_memlock` \
        from `bpftool -j map show id N` for this object's maps):\n",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        sum as f64 / 1048576.0
    );
    md.push_str("| map | max entries | memlock (MiB) |\n|---|---:|---:|\n");
    md.push_str(&map_rows);
    md
}

// ---- report -----------------------------------------------------------------

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() {
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
        }
    };
    let started = Instant::now();
    eprintln!("lb-bench: per-packet cost (BPF_PROG_TEST_RUN) ...");
    let (_, packets) = bench_packets(&p);
    println!("\n## Per-packet cost (BPF_PROG_TEST_RUN)\n\n{packets}");
    eprintln!("lb-bench: Maglev ...");
    let maglev = bench_maglev(&p);
    println!("\n## Maglev table build\n\n{maglev}");
    eprintln!("lb-bench: plan and full apply of 1,000 x 32 ...");
    let apply = bench_apply(&p);
    println!("\n## Plan and full apply\n\n{apply}");
    eprintln!("lb-bench: done in {:.1} s", started.elapsed().as_secs_f64());
    if p.quick {
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
         the one that run printed. Re-run the command to refresh this file; `cargo xtask bench --quick`\n\
         runs fewer repetitions and sizes and writes nothing.\n\n\
         - date: {}\n- machine: {nproc} CPUs, `{cpu}`, kernel `{}`\n- command: `cargo xtask bench` (release build), total run time {:.0} s\n\n\
         ## Per-packet cost of the XDP program\n\n{packets}\n\
         ## Control plane\n\n### Maglev table build (`lb_agent::maglev::build_table`)\n\n{maglev}\n\
         ### Plan and full apply, 1,000 services x 32 backends\n\n{apply}\n",
        sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        sh("uname", &["-r"]),
        started.elapsed().as_secs_f64()
    );
    doc.push_str(HOW_MEASURED);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md");
    std::fs::write(&path, doc).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    eprintln!("lb-bench: wrote docs/benchmarks.md");
}

const HOW_MEASURED: &str = "\
## How measured

- **Per packet.** The real object embedded in the agent is loaded with `Dataplane::load` and its
  maps filled with `Dataplane::write` from a plan of 100 services x 50 backends (fake backend
  MACs; nothing is attached to an interface). Each frame is run through `BPF_PROG_TEST_RUN`
  (aya `TestRun::test_run`) with `repeat` N; the kernel times the whole loop and reports the
  average per run in whole nanoseconds (`duration = total / repeat`), which includes the
  test-run harness's per-iteration overhead but not the syscall. A row is the median of
  several such calls. Before the timed calls each frame is run once, so for VIP frames every
  timed run is a connection-table hit (\"established\").
- **New flows.** A repeated run of one frame is a new flow only the first time, so new flows
  are measured as single runs (`repeat` 1) over many distinct flows (different client
  addresses): each is a connection-table miss, a Maglev lookup and an LRU insert. The same
  frames are then run once more (all hits), and the non-VIP frame and `bench_macswap` are run
  the same way; these repeat-1 rows include the timer read of a single-run loop and compare
  with each other, not with the repeated rows.
- **Noise.** The machine is small and shared (see above), and the kernel reports whole
  nanoseconds: medians move by up to about a third between runs of the command, so compare
  rows within one run (the ratio to `bench_macswap` is computed within the run) and look at
  the `min` column (the fastest of the runs) as the less noisy estimate.
- **Reference floor.** `bench_macswap` (in `lb-ebpf`, never attached by the agent) swaps the
  two MAC addresses and returns XDP_TX: the least an XDP forwarder can do. The target is a
  non-VIP frame costing at most twice that.
- **Control plane.** Wall-clock time (`Instant`) in the release build. The full apply is
  `Dataplane::load` + `Dataplane::write`: object load, verification, map creation, then every
  map entry written with its own `bpf(BPF_MAP_UPDATE_ELEM)` call. Resident memory is VmRSS from
  `/proc/self/status` after the apply; BPF map memory is the sum of `bytes_memlock` that
  `bpftool` reports for the maps of that object.
- **Closing the apply gap.** `write` costs one syscall per Maglev slot (4.1 M for 1,000 x 4099).
  Batched updates (`BPF_MAP_UPDATE_BATCH`, thousands of entries per call) or a `BPF_F_MMAPABLE`
  array for `MAGLEV` (the agent writes the tables straight into the mapped memory) would take
  this from seconds to milliseconds; a smaller default `table_size` for large fleets helps too.

## Not yet measured

- **Live forwarding rate.** Frames per second through an attached program, comparing the
  MAC-swap ceiling (`bench_macswap`), the balancer, and nftables DNAT as the kernel-stack
  baseline, with a live-frames generator (`BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES`,
  or pktgen / a traffic generator on a second machine) on a real NIC in native mode.
- Behaviour under load: CONNTRACK LRU eviction at a full table, several CPUs at once.
";
