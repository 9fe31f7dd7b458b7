//! The control plane at scale, measured from outside the agent: the real
//! `lb-agent run` (release build) on a veth in a namespace of its own, with every
//! service at its default `table_size`; start to attached, memory, reloads through
//! the control socket, and `lb-agent status`.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use lb_agent::control::{Request, Response, call_with_timeout};
use lb_tests::netns::{ns_sh, sh};

use crate::median;

pub struct ScaleParams {
    /// Agent starts per scenario (a fresh agent each).
    pub starts: usize,
    /// Reloads of each cheap kind (no change, one service).
    pub reloads: usize,
    /// Reloads that change one weight in every service.
    pub weight_reloads: usize,
    /// Runs of each `lb-agent status` variant.
    pub status_runs: usize,
}

/// Backend addresses, per family: every service takes `backends` of them.
const POOL: usize = 512;

fn pool_v4(k: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 16 + (k / 200) as u8, (k % 200 + 10) as u8))
}

fn pool_v6(k: usize) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 1, k as u16 + 1))
}

/// What the file says, beside the services and backends.
#[derive(Clone, Copy, Default)]
struct Variant {
    /// Weight of backend 0 of every service.
    all: u32,
    /// Weight of backend 0 of service 0 (overrides `all` there).
    first: u32,
    /// A comment line: other bytes, the same configuration.
    comment: u32,
}

/// `services` x `backends`, IPv4 only or every other service IPv6; no `table_size`.
fn yaml(services: usize, backends: usize, mixed: bool, v: Variant) -> String {
    let mut y = format!("# variant {}\nservices:\n", v.comment);
    for s in 0..services {
        let v6 = mixed && s % 2 == 1;
        let vip = if v6 {
            format!("2001:db8:1::{:x}", s + 1)
        } else {
            format!("198.19.{}.{}", s / 250, s % 250 + 1)
        };
        let _ = writeln!(y, "  - name: svc{s}\n    vip: {vip}\n    port: 80\n    backends:");
        for b in 0..backends {
            let k = (s * 7 + b * 13) % POOL;
            let addr = if v6 { pool_v6(k) } else { pool_v4(k) };
            let w = if b != 0 { 1 } else if s == 0 && v.first > 0 { v.first } else { v.all.max(1) };
            let _ = writeln!(y, "      - address: \"{addr}\"\n        weight: {w}");
        }
    }
    y
}

/// A namespace with `eth0` (a veth) and a permanent neighbour entry for every
/// backend address; removed on drop.
struct Host {
    ns: String,
    dir: PathBuf,
}

impl Host {
    fn new() -> Host {
        let ns = format!("lbscale{}", std::process::id());
        let dir = std::env::temp_dir().join(&ns);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        std::fs::create_dir_all(&dir).expect("scale temp dir");
        sh(&["ip", "netns", "add", &ns]);
        let host = Host { ns, dir };
        let ns = host.ns.as_str();
        ns_sh(ns, &["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"]);
        ns_sh(ns, &["sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0"]);
        ns_sh(ns, &["ip", "addr", "add", "198.18.0.1/16", "dev", "eth0"]);
        ns_sh(ns, &["ip", "addr", "add", "2001:db8::1/64", "dev", "eth0", "nodad"]);
        for l in ["lo", "eth0", "peer0"] {
            ns_sh(ns, &["ip", "link", "set", l, "up"]);
        }
        let mut batch = String::new();
        for k in 0..POOL {
            for a in [pool_v4(k), pool_v6(k)] {
                let _ = writeln!(batch, "neigh replace {a} lladdr 02:00:00:00:{:02x}:{:02x} dev eth0 nud permanent", k >> 8, k & 255);
            }
        }
        let file = host.dir.join("neigh.batch");
        std::fs::write(&file, batch).expect("neighbour batch");
        ns_sh(ns, &["ip", "-batch", file.to_str().expect("utf-8 path")]);
        host
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Agent {
    child: Child,
    sock: PathBuf,
    pins: PathBuf,
}

impl Agent {
    /// Starts the agent and returns it with the time until its "attached" line.
    fn start(host: &Host, config: &Path) -> (Agent, f64) {
        let (sock, pins, log) = (host.dir.join("ctl.sock"), PathBuf::from(format!("/sys/fs/bpf/{}", host.ns)), host.dir.join("agent.log"));
        let t = Instant::now();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", host.ns))
            .arg("--")
            .arg(lb_tests::lab::agent_bin())
            .args(["run", "--iface", "eth0", "--xdp-mode", "native", "--metrics-listen", "off", "--config"])
            .arg(config)
            .arg("--pin-dir")
            .arg(&pins)
            .arg("--control-socket")
            .arg(&sock)
            .env("LB_LOG", std::env::var("LB_SCALE_AGENT_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"))
            .spawn()
            .expect("starting lb-agent");
        let mut agent = Agent { child, sock, pins };
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("attached iface") {
                return (agent, t.elapsed().as_secs_f64());
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("lb-agent exited ({status}) before attaching:\n{text}");
            }
            assert!(t.elapsed() < Duration::from_secs(300), "lb-agent did not attach within 300 s:\n{text}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// (VmRSS, VmHWM, RssAnon) in MiB.
    fn memory(&self) -> (f64, f64, f64) {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let kib = |field: &str| -> f64 {
            let line = s.lines().find(|l| l.starts_with(field));
            line.and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
        };
        (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0, kib("RssAnon:") / 1024.0)
    }

    /// `MAGLEV`: (max_entries, bytes_memlock from bpftool).
    fn maglev(&self) -> (u32, Option<u64>) {
        let data = aya::maps::MapData::from_pin(self.pins.join("MAGLEV")).expect("pinned MAGLEV");
        let info = data.info().expect("MAGLEV info");
        (info.max_entries(), crate::control::memlock(info.id()))
    }

    /// One reload through the control socket; its time.
    fn reload(&self) -> f64 {
        let t = Instant::now();
        let answer = call_with_timeout(&self.sock, &Request::Reload, Duration::from_secs(300));
        let secs = t.elapsed().as_secs_f64();
        match answer {
            Ok(Response::Done { message }) if message.starts_with("reload applied") => secs,
            other => panic!("reload: {other:?}"),
        }
    }

    /// Sum of the outcome counters whose name starts with "drop".
    fn drops(&self) -> u64 {
        match call_with_timeout(&self.sock, &Request::Status, Duration::from_secs(60)) {
            Ok(Response::Status(s)) => s.outcomes.iter().filter(|(n, _)| n.starts_with("drop")).map(|(_, v)| v).sum(),
            other => panic!("status: {other:?}"),
        }
    }

    /// `lb-agent status ARGS` as a user runs it: (seconds, bytes printed).
    fn status_cli(&self, args: &[&str]) -> (f64, usize) {
        let t = Instant::now();
        let out = Command::new(lb_tests::lab::agent_bin())
            .arg("status")
            .args(args)
            .arg("--socket")
            .arg(&self.sock)
            .output()
            .expect("lb-agent status");
        let secs = t.elapsed().as_secs_f64();
        assert!(out.status.success(), "lb-agent status {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        (secs, out.stdout.len())
    }

    fn stop(mut self) {
        if std::env::var_os("LB_SCALE_AGENT_LOG").is_some() {
            let log = self.sock.with_file_name("agent.log");
            let text = std::fs::read_to_string(log).unwrap_or_default();
            text.lines().filter(|l| l.contains("reload") || l.contains("phases")).for_each(|l| eprintln!("{l}"));
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

/// "median (min–max)" in ms.
fn ms(v: &[f64]) -> String {
    let (lo, hi) = v.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    format!("{:.1} ms ({:.1}–{:.1}, n={})", median(v.to_vec()) * 1e3, lo * 1e3, hi * 1e3, v.len())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "missed" }
}

/// One scenario; its rows as markdown (with targets when `targets`).
fn scenario(sp: &ScaleParams, services: usize, backends: usize, mixed: bool, targets: bool) -> String {
    let host = Host::new();
    let cfg = host.dir.join("lb.yaml");
    let write = |v: Variant| std::fs::write(&cfg, yaml(services, backends, mixed, v)).expect("writing the configuration");
    let size = lb_agent::config::default_table_size(backends);
    write(Variant::default());
    let mut starts = Vec::new();
    let mut rss_start = Vec::new();
    let mut anon_start = Vec::new();
    let mut agent = None;
    for i in 0..sp.starts {
        let (a, secs) = Agent::start(&host, &cfg);
        starts.push(secs);
        rss_start.push(a.memory().0);
        anon_start.push(a.memory().2);
        if i + 1 == sp.starts {
            agent = Some(a);
        } else {
            a.stop();
        }
    }
    let agent = agent.expect("at least one start");
    let (entries, memlock) = agent.maglev();
    let drops_before = agent.drops();
    let mut rss = vec![agent.memory().0];
    let mut series = |variant: &dyn Fn(u32) -> Variant, n: usize| -> Vec<f64> {
        (0..n as u32)
            .map(|i| {
                write(variant(i));
                let secs = agent.reload();
                rss.push(agent.memory().0);
                secs
            })
            .collect()
    };
    // The file as the agent started with it.
    let mut after = Vec::new();
    let same = series(&|_| Variant::default(), sp.reloads);
    after.push(agent.memory().0);
    let comment = series(&|i| Variant { comment: i + 1, ..Variant::default() }, sp.reloads);
    after.push(agent.memory().0);
    // Backend 0 of every service: 2, 1, 2, ...
    let weights = series(&|i| Variant { all: 2 - i % 2, ..Variant::default() }, sp.weight_reloads);
    after.push(agent.memory().0);
    let all = 2 - (sp.weight_reloads as u32 - 1) % 2;
    let one = series(&|i| Variant { all, first: 3 + i % 2, ..Variant::default() }, sp.reloads);
    after.push(agent.memory().0);
    let drops_after = agent.drops();
    let (_, hwm, anon_end) = agent.memory();
    let status = |args: &[&str]| -> (Vec<f64>, usize) {
        let runs: Vec<(f64, usize)> = (0..sp.status_runs).map(|_| agent.status_cli(args)).collect();
        (runs.iter().map(|r| r.0).collect(), runs[0].1)
    };
    let (table_t, table_b) = status(&[]);
    let (json_t, json_b) = status(&["--json"]);
    let (one_t, one_b) = status(&["--json", "--service", "svc7"]);
    let (bare_t, bare_b) = status(&["--json", "--no-backends"]);
    agent.stop();

    let reloads = rss.len() - 1;
    let rss_max = rss.iter().copied().fold(0.0, f64::max);
    let maglev_mb = f64::from(entries) * 8.0 / 1e6;
    let t = |s: &str| if targets { s.to_string() } else { String::new() };
    let med = |v: &[f64]| median(v.to_vec());
    let mut md = String::new();
    let _ = writeln!(
        md,
        "{services} services x {backends} backends{}, default `table_size` ({size} slots for {backends} backends), no `table_size` in the file.\n",
        if mixed { " (every other service IPv6)" } else { " (IPv4)" }
    );
    md += "| what | measured | target |\n|---|---:|---|\n";
    let s_ok = med(&starts) < 1.0;
    let _ = writeln!(md, "| start to attached (spawn to the log line) | {} | {} |", ms(&starts), t(&format!("< 1 s: {}", verdict(s_ok))));
    let _ = writeln!(
        md,
        "| `MAGLEV` in the kernel (max_entries x 8 B per element; bpftool bytes_memlock) | {entries} entries = {maglev_mb:.0} MB; memlock {} | {} |",
        memlock.map_or("n/a".into(), |b| format!("{:.0} MB", b as f64 / 1e6)),
        t(&format!("< 400 MB: {}", verdict(maglev_mb < 400.0)))
    );
    let _ = writeln!(md, "| reload, byte-identical file | {} | {} |", ms(&same), t(&format!("< 50 ms: {}", verdict(med(&same) < 0.05))));
    let _ = writeln!(md, "| reload, same configuration in other bytes (a comment changed): parsed, then no plan and no map writes | {} | |", ms(&comment));
    let _ = writeln!(md, "| reload, one weight changed in every service | {} | {} |", ms(&weights), t(&format!("< 0.5 s: {}", verdict(med(&weights) < 0.5))));
    let _ = writeln!(md, "| reload, one service changed | {} | {} |", ms(&one), t(&format!("< 20 ms: {}", verdict(med(&one) < 0.02))));
    let flat = rss_max < 256.0 && rss[reloads] <= rss[1] * 1.1 + 8.0;
    let _ = writeln!(
        md,
        "| agent VmRSS after start (median of starts) / after 1 reload / max over {reloads} reloads / after the last; VmHWM | {:.0} / {:.0} / {:.0} / {:.0} MiB; {hwm:.0} MiB | {} |",
        med(&rss_start), rss[1], rss_max, rss[reloads],
        t(&format!("< 256 MB and flat: {}", verdict(flat)))
    );
    let _ = writeln!(
        md,
        "| agent VmRSS after each series of the rows above (identical, comment, all weights, one service) | {} MiB | |",
        after.iter().map(|m| format!("{m:.0}")).collect::<Vec<_>>().join(" / ")
    );
    let _ = writeln!(
        md,
        "| of which the agent's own heap (RssAnon) after start / after the last reload | {:.0} / {anon_end:.0} MiB | |",
        med(&anon_start)
    );
    let _ = writeln!(md, "| drop counters (sum of `drop_*` outcomes) before / after the reloads | {drops_before} / {drops_after} | |");
    let fast = |v: &[f64]| format!("< 200 ms: {}", verdict(med(v) < 0.2));
    let _ = writeln!(md, "| `lb-agent status` (table) | {}, {:.1} MB | {} |", ms(&table_t), table_b as f64 / 1e6, fast(&table_t));
    let _ = writeln!(md, "| `lb-agent status --json` | {}, {:.1} MB | {} |", ms(&json_t), json_b as f64 / 1e6, fast(&json_t));
    let _ = writeln!(md, "| `lb-agent status --json --service svc7` | {}, {:.1} kB | |", ms(&one_t), one_b as f64 / 1e3);
    let _ = writeln!(md, "| `lb-agent status --json --no-backends` | {}, {:.1} MB | |", ms(&bare_t), bare_b as f64 / 1e6);
    md
}

/// For profiling by hand: starts an agent on `services` x `backends` (mixed
/// families), prints its pid and control socket, and waits for a line on stdin.
pub fn serve(services: usize, backends: usize) {
    let host = Host::new();
    let cfg = host.dir.join("lb.yaml");
    std::fs::write(&cfg, yaml(services, backends, backends < 32, Variant::default())).expect("writing the configuration");
    let (agent, secs) = Agent::start(&host, &cfg);
    println!("pid {} socket {} config {} (attached in {secs:.3} s)", agent.child.id(), agent.sock.display(), cfg.display());
    let _ = std::io::stdin().read_line(&mut String::new());
    agent.stop();
}

fn loadavg() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

pub fn bench_scale(sp: &ScaleParams) -> String {
    let load_before = loadavg();
    let mut md = scenario(sp, 1000, 32, false, true);
    md.push('\n');
    // The targets are for 1,000 x 32; at 10,000 x 8 only `status` has one.
    md += &scenario(sp, 10_000, 8, true, false);
    let _ = write!(
        md,
        "\nThe release `lb-agent run` on a veth (native XDP) in a namespace of its own, backends' MACs \
         from permanent neighbour entries (a pool of {POOL} IPv4 and {POOL} IPv6 addresses, each \
         service taking its backends from it at its own offset), no probes, no traffic. Times are \
         medians with (min–max, number of runs); a fresh agent for each start. Reloads go through \
         the control socket (`lb-agent reload`'s request) and are timed to its answer, which comes \
         after the maps are written; the kinds run in the order of the rows, {} of each ({} of the \
         all-weights kind), alternating between two files so each one changes what it says. RSS is \
         `/proc/PID/status` of the agent; it includes the pages of the agent's shared mapping of \
         `MAGLEV` (the map's own memory, not a copy). `MAGLEV` elements are 8 bytes apart in the \
         kernel (a u32 value rounded up). `lb-agent status` is timed as a user runs it (process \
         start to exit, output to a pipe). The drop counters only show that no reload drops \
         anything by itself: there is no traffic here; the reload under traffic is the section above. \
         Load average (1, 5, 15 min) of this shared 2-CPU machine before / after this part: {load_before} / {}; \
         other builds ran meanwhile, so a median here can be up to twice a quiet run's.\n",
        sp.reloads, sp.weight_reloads, loadavg()
    );
    md
}
