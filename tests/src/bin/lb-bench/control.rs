//! Control-plane costs: Maglev table build, plan, full apply, memory.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    process::Command,
    time::Instant,
};

use aya::maps::Map;
use lb_agent::{
    config,
    dataplane::Dataplane,
    maglev::{MaglevBackend, build_table, is_prime},
    plan::Plan,
};

use crate::{
    Params,
    frames::{IFACE_MAC, config_yaml, fake_macs},
    median,
};

pub fn bench_maglev(p: &Params) -> String {
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

pub fn memlock(id: u32) -> Option<u64> {
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

pub fn bench_apply(p: &Params) -> String {
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
            assert_eq!(plan.maglev_slots(), (services * table_size) as usize);
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
    // What `write` does by syscall: BACKENDS and the zeroing of BACKEND_STATS per
    // backend; SERVICE_STATS zeroing and SERVICES per service; VIP_ADDRS per
    // address; CONFIG twice. MAGLEV goes through the memory mapping.
    let syscalls = 2 * plan.backends.len() + 2 * plan.services.len() + plan.vip_addrs.len() + 2;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Configuration: {services} services x {backends} backends = {} backends, table_size {table_size} (the default for {backends} backends; \
         65537, the default before, would be {}M Maglev slots), conntrack_size 262144.\n",
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
        "| `Dataplane::write` ({} `MAGLEV` slots copied through the map's memory mapping; {syscalls} \
         other entries, one `bpf()` syscall each) | {:.3} s | |",
        plan.maglev_slots(),
        median(writes)
    );
    let _ = writeln!(
        md,
        "| full apply (load + write) | {total:.3} s | < 1 s: {} |",
        if total < 1.0 {
            "met".to_string()
        } else {
            format!("missed by {:.0} ms", (total - 1.0) * 1e3)
        }
    );
    let _ = writeln!(
        md,
        "\nMedian of {} runs for the plan, {} for the apply.\n",
        p.maglev_runs, p.apply_runs
    );
    let _ = writeln!(
        md,
        "Memory after the apply: agent VmRSS {:.1} MiB (VmHWM {:.1} MiB, which includes \
        the generated YAML, the parsed configuration and the plan; both also count the written pages of \
        the agent's shared mapping of `MAGLEV`, which is the map's own memory, not a copy), BPF maps {:.1} MiB (`bytes_memlock` \
        from `bpftool -j map show id N` for this object's maps):\n",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        sum as f64 / 1048576.0
    );
    md.push_str("| map | max entries | memlock (MiB) |\n|---|---:|---:|\n");
    md.push_str(&map_rows);
    md
}
