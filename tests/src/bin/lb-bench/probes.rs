//! CPU cost of liveness probes: `lb_agent::health::Checker` probing 5,000 TCP
//! targets at 1 s intervals, in this process, on a tokio runtime shaped like the
//! agent's (two worker threads).
//!
//! The backends must cost the machine what remote ones would: next to nothing. They
//! are the XDP program `bench_synack` on the far end of a veth pair: it answers every
//! SYN with a SYN-ACK in place and drops the probes' RSTs, so no backend kernel, socket
//! or process takes part. (Listeners on the same machine charge their TCP work to the
//! prober: on veth and loopback the receiver's softirq runs in the sender's system
//! call; steering it to another CPU with RPS costs an inter-processor interrupt per
//! packet instead, which on this virtual machine costs more than the TCP work.) What
//! remains is the agent machine's own share: the prober's system calls, its TCP
//! stack sending SYN and RST and receiving the SYN-ACK, and tokio.
//! Addresses: prober 198.18.100.254, backends 198.18.100.1-100, 50 ports each.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Command,
    time::{Duration, Instant},
};

use aya::{Ebpf, programs::XdpMode};
use lb_agent::health::{Checker, Health, ProbeKind, ProbeSpec, Target, TargetKey};
use lb_tests::netns::{self, ns_sh, sh};

use crate::live::{BENCH_OBJECT, xdp};

pub const PORTS: usize = 50;
pub const ADDRESSES: u32 = 100;
pub const INTERVAL: Duration = Duration::from_secs(1);
/// The first probed port of each backend.
const FIRST_PORT: u16 = 8000;

pub struct ProbeParams {
    pub warmup_secs: f64,
    pub secs: f64,
    /// The run without `CAP_NET_RAW` and the plain loop, each.
    pub bare_secs: f64,
}

/// The address of backend `i` (0-based).
fn backend_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 100, (i + 1) as u8)
}

/// The prober's namespace and the backends' (the responder); removed on drop.
struct Lab {
    /// Where the prober runs.
    ns: String,
    /// Where the responder runs.
    backends: String,
    /// Keeps `bench_synack` and `bench_pass` attached.
    _bench: Ebpf,
}

impl Lab {
    fn new() -> Lab {
        netns::require_root();
        let ns = format!("lbb{}-prober", std::process::id());
        let backends = format!("lbb{}-backends", std::process::id());
        for n in [&ns, &backends] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
            sh(&["ip", "netns", "add", n]);
            ns_sh(n, &["ip", "link", "set", "lo", "up"]);
        }
        sh(&["ip", "-n", &ns, "link", "add", "pa", "type", "veth", "peer", "pb", "netns", &backends]);
        ns_sh(&ns, &["ip", "addr", "add", "198.18.100.254/24", "dev", "pa"]);
        // The responder edits frames in place: they must carry complete checksums.
        ns_sh(&ns, &["ethtool", "-K", "pa", "tx", "off"]);
        // The backends' addresses answer ARP (the responder passes it to the stack).
        let mut batch = String::new();
        for i in 0..ADDRESSES {
            batch.push_str(&format!("addr add {}/24 dev pb\n", backend_addr(i)));
        }
        let path = std::env::temp_dir().join(format!("{backends}.ip"));
        std::fs::write(&path, batch).expect("write the address batch");
        ns_sh(&backends, &["ip", "-batch", &path.to_string_lossy()]);
        let _ = std::fs::remove_file(&path);
        for (n, dev) in [(&ns, "pa"), (&backends, "pb")] {
            ns_sh(n, &["ip", "link", "set", dev, "up"]);
        }
        let mut bench = Ebpf::load(BENCH_OBJECT).expect("load the bench object");
        // Native XDP_TX on a veth needs a program on the peer too (TOOLCHAIN.md).
        for (n, dev, prog) in [(&ns, "pa", "bench_pass"), (&backends, "pb", "bench_synack")] {
            let p = xdp(&mut bench, prog);
            p.load().unwrap_or_else(|e| panic!("load {prog}: {e}"));
            std::thread::scope(|sc| {
                sc.spawn(|| {
                    netns::enter(n);
                    p.attach(dev, XdpMode::Driver)
                        .unwrap_or_else(|e| panic!("attach {prog} to {dev}: {e}"));
                })
                .join()
                .expect("attach thread")
            });
        }
        Lab {
            ns,
            backends,
            _bench: bench,
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in [&self.ns, &self.backends] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// CPU time (user, system) of this process (`RUSAGE_SELF`) or the calling thread
/// (`RUSAGE_THREAD`) so far, in seconds.
fn cpu_secs(who: libc::c_int) -> (f64, f64) {
    // SAFETY: getrusage fills the zeroed struct.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut ru);
        ru
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (t(ru.ru_utime), t(ru.ru_stime))
}

/// The kernel's share: the same probes (SYN, SYN-ACK, RST: quick ACKs off,
/// `SO_LINGER` 0, as `lb_agent`'s TCP probe) by blocking connects from one plain
/// thread at the same rate over the same targets (no tokio, no timers, no epoll).
/// Returns the thread's CPU in % of one core and the connects per second done.
fn bare_connects(ns: &str, addrs: &[SocketAddr], secs: f64) -> (f64, f64) {
    use socket2::{Domain, Socket, Type};
    let ns = ns.to_string();
    let addrs = addrs.to_vec();
    std::thread::spawn(move || {
        lb_tests::netns::enter(&ns);
        // 1/100 s ticks of rate/100 connects each.
        let per_tick = addrs.len() / 100;
        let tick = Duration::from_millis(10);
        let (u0, s0) = cpu_secs(libc::RUSAGE_THREAD);
        let t0 = Instant::now();
        let (mut next, mut done, mut i) = (t0, 0u64, 0usize);
        while t0.elapsed().as_secs_f64() < secs {
            for _ in 0..per_tick {
                let a = addrs[i % addrs.len()];
                i += 1;
                let s = Socket::new(Domain::for_address(a), Type::STREAM, None).expect("a socket");
                s.set_quickack(false).expect("TCP_QUICKACK");
                s.set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
                if s.connect_timeout(&a.into(), Duration::from_secs(1)).is_ok() {
                    done += 1;
                }
            }
            next += tick;
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        let el = t0.elapsed().as_secs_f64();
        let (u1, s1) = cpu_secs(libc::RUSAGE_THREAD);
        ((u1 - u0 + s1 - s0) / el * 100.0, done as f64 / el)
    })
    .join()
    .expect("bare connect thread")
}

pub struct CheckerRun {
    pub cpu_pct: f64,
    pub user_pct: f64,
    pub sys_pct: f64,
    pub probes_per_sec: f64,
    pub secs: f64,
    pub downs: usize,
    /// CPU, % of one core, in each of [`WINDOWS`] equal parts of the run.
    pub windows: Vec<f64>,
}

/// Parts each measured run is split into, to show the spread.
const WINDOWS: usize = 5;

pub struct ProbeResult {
    pub targets: usize,
    /// The agent's runtime (two worker threads), raw sockets.
    pub raw: CheckerRun,
    /// The same without `CAP_NET_RAW`: a socket per probe.
    pub sockets: CheckerRun,
    /// Bare blocking connect + close at the same rate: (CPU %, connects/s).
    pub bare: (f64, f64),
}

pub fn bench_probes(pp: &ProbeParams) -> ProbeResult {
    let lab = Lab::new();
    let mut targets = Vec::new();
    for i in 0..PORTS {
        let port = FIRST_PORT + i as u16;
        for a in 0..ADDRESSES {
            let addr = IpAddr::V4(backend_addr(a));
            let spec = ProbeSpec {
                kind: ProbeKind::Tcp,
                interval: INTERVAL,
                timeout: INTERVAL,
                port: Some(port),
                ..ProbeSpec::default()
            };
            targets.push(Target {
                key: TargetKey {
                    service: format!("svc{i}"),
                    backend: addr,
                },
                addr: SocketAddr::new(addr, port),
                service: format!("svc{i}"),
                spec,
            });
        }
    }
    let n = targets.len();
    let addrs: Vec<SocketAddr> = targets.iter().map(|t| t.addr).collect();
    // The agent's runtime (two workers, run.rs), with and without CAP_NET_RAW.
    let raw = run_checker(&lab, targets.clone(), true, pp.warmup_secs, pp.secs);
    let sockets = run_checker(&lab, targets, false, pp.warmup_secs / 2.0, pp.bare_secs);
    let bare = bare_connects(&lab.ns, &addrs, pp.bare_secs);
    drop(lab);
    ProbeResult {
        targets: n,
        raw,
        sockets,
        bare,
    }
}

/// Drops `CAP_NET_RAW` from the calling thread's effective and permitted sets
/// (capabilities are per thread; the Checker opens its raw sockets on the thread
/// that sets its first tcp targets).
fn drop_net_raw() {
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_RAW: u32 = 13;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header { version: VERSION_3, pid: 0 };
    let mut data = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: capget/capset with a version-3 header and two data elements.
    unsafe {
        let rc = libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr());
        assert_eq!(rc, 0, "capget: {}", std::io::Error::last_os_error());
        data[0].effective &= !(1 << CAP_NET_RAW);
        data[0].permitted &= !(1 << CAP_NET_RAW);
        let rc = libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr());
        assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
    }
}

/// Runs the Checker on all `targets` on the agent's runtime (two workers) and
/// measures this process's CPU and the successful probes over `secs` after `warmup`
/// (on a thread inside the prober's namespace, whose workers enter it too); without
/// `raw`, that thread lacks `CAP_NET_RAW`, so every probe opens a socket.
fn run_checker(lab: &Lab, targets: Vec<Target>, raw: bool, warmup: f64, secs: f64) -> CheckerRun {
    let ns = lab.ns.clone();
    let keys: Vec<TargetKey> = targets.iter().map(|t| t.key.clone()).collect();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            lb_tests::netns::enter(&ns);
            if !raw {
                drop_net_raw();
            }
            let rt = {
                let ns = ns.clone();
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .on_thread_start(move || lb_tests::netns::enter(&ns))
                    .build()
            }
            .expect("tokio runtime");
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let run = rt.block_on(async {
                let mut c = Checker::new(lb_agent::health::DEFAULT_MAX_CONCURRENT, tx);
                c.set_targets(targets);
                let successes = |c: &Checker| -> u64 {
                    keys.iter()
                        .filter_map(|k| c.probe_stats(k))
                        .map(|s| s.successes)
                        .sum()
                };
                tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
                let (p0, c0, t0) = (successes(&c), cpu_secs(libc::RUSAGE_SELF), Instant::now());
                // The CPU of each of WINDOWS equal parts too: a shared machine's noise
                // shows as their spread.
                let mut windows = Vec::with_capacity(WINDOWS);
                let mut last = (c0, Instant::now());
                for _ in 0..WINDOWS {
                    tokio::time::sleep(Duration::from_secs_f64(secs / WINDOWS as f64)).await;
                    let now = (cpu_secs(libc::RUSAGE_SELF), Instant::now());
                    let cpu = now.0.0 - last.0.0 + now.0.1 - last.0.1;
                    windows.push(cpu / now.1.duration_since(last.1).as_secs_f64() * 100.0);
                    last = now;
                }
                let (p1, c1, secs) = (
                    successes(&c),
                    cpu_secs(libc::RUSAGE_SELF),
                    t0.elapsed().as_secs_f64(),
                );
                c.shutdown();
                assert!(
                    p1 > p0,
                    "probe benchmark: no probe succeeded in {secs:.1} s: broken set-up"
                );
                CheckerRun {
                    cpu_pct: (c1.0 - c0.0 + c1.1 - c0.1) / secs * 100.0,
                    user_pct: (c1.0 - c0.0) / secs * 100.0,
                    sys_pct: (c1.1 - c0.1) / secs * 100.0,
                    probes_per_sec: (p1 - p0) as f64 / secs,
                    secs,
                    downs: 0,
                    windows,
                }
            });
            let mut downs = 0;
            while let Ok(ev) = rx.try_recv() {
                if ev.health == Health::Down {
                    downs += 1;
                }
            }
            rt.shutdown_timeout(Duration::from_secs(2));
            CheckerRun { downs, ..run }
        })
        .join()
        .expect("probe thread")
    })
}

pub fn probes_md(r: &ProbeResult, pp: &ProbeParams) -> String {
    let expected = r.targets as f64 / INTERVAL.as_secs_f64();
    let us = |pct: f64, rate: f64| pct / 100.0 / rate.max(1.0) * 1e6;
    let (m, s1) = (&r.raw, &r.sockets);
    let mut md = format!(
        "| what | probes/s | CPU, % of one core | CPU per probe | target |\n\
         |---|---:|---:|---:|---|\n\
         | **`Checker`, {} TCP targets, interval {:?}, the agent's runtime (2 workers)** (expected {expected:.0}/s) | {:.0} | **{:.1}%** (user {:.1}, system {:.1}) | {:.1} µs | < 10%: {} |\n\
         | comparison: the same `Checker` without `CAP_NET_RAW` (a socket per probe) | {:.0} | {:.1}% (user {:.1}, system {:.1}) | {:.1} µs | |\n\
         | comparison: a socket per probe from a plain loop of blocking connects, one thread, same rate and targets | {:.0} | {:.1}% | {:.1} µs | |\n\n",
        r.targets,
        INTERVAL,
        m.probes_per_sec,
        m.cpu_pct,
        m.user_pct,
        m.sys_pct,
        us(m.cpu_pct, m.probes_per_sec),
        if m.cpu_pct < 10.0 {
            "met".to_string()
        } else {
            format!("missed by {:.1} points ({:.1}x the target)", m.cpu_pct - 10.0, m.cpu_pct / 10.0)
        },
        s1.probes_per_sec,
        s1.cpu_pct,
        s1.user_pct,
        s1.sys_pct,
        us(s1.cpu_pct, s1.probes_per_sec),
        r.bare.1,
        r.bare.0,
        us(r.bare.0, r.bare.1),
    );
    let parts = |r: &CheckerRun| {
        r.windows.iter().map(|w| format!("{w:.1}")).collect::<Vec<_>>().join(", ")
    };
    md.push_str(&format!(
        "The CPU figure is the whole run's; its {WINDOWS} equal parts measured {}% (without \
         `CAP_NET_RAW`: {}%), which shows how much this shared machine moves from second to \
         second.\n\n",
        parts(m),
        parts(s1),
    ));
    md.push_str(&format!(
        "`lb_agent::health::Checker` with {} TCP probes ({} ports on each of {} backend addresses), \
         interval 1 s, timeout 1 s, at most {} probes at once (the agent's setting). A probe is SYN, \
         SYN-ACK, RST (docs/config.md): the Checker sends the SYN from a raw socket and matches the \
         SYN-ACK there, and the kernel sends the RST itself, since no socket owns the probe's port \
         (`lb-agent/src/health/syn.rs`). CPU is user + system time of the probing process from \
         `getrusage(RUSAGE_SELF)` over {:.1} s after a {:.1} s warm-up (the row without `CAP_NET_RAW`: \
         {:.1} s after {:.1} s); probes/s are the successful probes the Checker counted. Health changes to down: \
         {} and {}. The plain-loop row runs {:.1} s on one thread \
         (`getrusage(RUSAGE_THREAD)`), without tokio, timers or epoll: the least a socket per probe \
         costs.\n\n\
         The backends are the XDP program `bench_synack` on the far end of a veth pair, in a namespace of \
         their own: it answers each SYN with a SYN-ACK in place and drops the RSTs, so the backends cost \
         next to nothing here, as remote ones would. Listeners on this machine would not do: on veth \
         and loopback the receiver's TCP work runs in the sender's system call and is charged to the \
         prober, and moving it to the other CPU with receive packet steering costs an inter-processor \
         interrupt per packet, which on this virtual machine costs the sender more than the TCP work \
         (both were tried). What is left is the agent machine's own share, all of it: the system calls, \
         sending the SYN, receiving the SYN-ACK and sending the RST. The receiving runs here inside the \
         prober's `sendto` (the veth pair hands the frame over synchronously); on a machine with a NIC \
         it runs where the NIC's interrupt lands and is charged to the agent only when the agent happens \
         to be running there, so these figures are an upper bound.\n",
        r.targets,
        PORTS,
        ADDRESSES,
        lb_agent::health::DEFAULT_MAX_CONCURRENT,
        m.secs,
        pp.warmup_secs,
        s1.secs,
        pp.warmup_secs / 2.0,
        m.downs,
        s1.downs,
        pp.bare_secs,
    ));
    if m.cpu_pct >= 10.0 {
        md.push_str(&format!(
            "\n*The 10% target is missed in this run.* {:.0} probes/s cost {:.1}% of a core, {:.1} µs per \
             probe, {:.0}% of it system time. What would lower it: sending the SYNs of one 10 ms tick with \
             one `sendmmsg` call instead of one `sendto` each; or longer intervals for very large fleets \
             (2 s halves the cost).\n",
            m.probes_per_sec,
            m.cpu_pct,
            us(m.cpu_pct, m.probes_per_sec),
            m.sys_pct / m.cpu_pct.max(1e-9) * 100.0,
        ));
    }
    md
}
