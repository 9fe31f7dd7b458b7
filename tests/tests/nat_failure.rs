//! A `nat` or `fullnat` backend killed under load (tests/src/natlab.rs): its link is deleted
//! while long-lived connections to every backend and a stream of requests run,
//! over IPv4 and IPv6. As docs/architecture.md ("Health, drain, backups") says,
//! the probes take it out and its flows are scheduled again on a live backend;
//! for `nat` that backend has no such connection and answers the next segment
//! with a RST, which `lb_nat_reply` translates: the client sees its connection
//! reset (not hung). No other flow is touched: the long-lived connections to the
//! other backends keep echoing, byte for byte, before, during and after.

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use lb_tests::{
    natlab::{NatLab, ECHO_PORT, VIP4, VIP6},
    netns::{self, ns_sh},
    traffic::{requests, Load, Proto, Worker},
};

/// How a long-lived connection ended: exchanges made, and the first error.
struct Ended {
    exchanges: u64,
    error: Option<(ErrorKind, String)>,
}

/// A connection to the echo service exchanging 64 patterned bytes every 50 ms,
/// each echo compared byte for byte. Reads wait up to 15 s, so a reset shows as
/// a reset rather than as a timeout.
struct Echo {
    backend: String,
    vip: IpAddr,
    exchanges: Arc<AtomicU64>,
    /// Set when the exchanges stopped by themselves (an error).
    ended: Arc<AtomicBool>,
    worker: Worker<Ended>,
}

impl Echo {
    fn open(ns: &str, vip: IpAddr) -> Echo {
        let conn = netns::run_in(ns, move || TcpStream::connect_timeout(&SocketAddr::new(vip, ECHO_PORT), Duration::from_secs(3)));
        let mut conn = conn.unwrap_or_else(|e| panic!("connection to {vip}:{ECHO_PORT}: {e}"));
        conn.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
        let mut name = Vec::new();
        let mut byte = [0u8; 1];
        while conn.read_exact(&mut byte).is_ok() && byte[0] != b'\n' {
            name.push(byte[0]);
        }
        let backend = String::from_utf8_lossy(&name).into_owned();
        assert!(!backend.is_empty(), "no greeting on the connection to {vip}");
        let exchanges = Arc::new(AtomicU64::new(0));
        let (done, ended) = (exchanges.clone(), Arc::new(AtomicBool::new(false)));
        let over = ended.clone();
        let worker = Worker::spawn_in(ns, move |stop| {
            let end = Instant::now() + Duration::from_secs(300);
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                let msg: Vec<u8> = (0..64u64).map(|i| (n.wrapping_mul(31) + i * 7) as u8).collect();
                let mut back = [0u8; 64];
                if let Err(e) = conn.write_all(&msg).and_then(|_| conn.read_exact(&mut back)) {
                    over.store(true, Ordering::SeqCst);
                    return Ended { exchanges: n, error: Some((e.kind(), e.to_string())) };
                }
                if back[..] != msg[..] {
                    over.store(true, Ordering::SeqCst);
                    return Ended { exchanges: n, error: Some((ErrorKind::InvalidData, format!("echo differs after {n} exchanges"))) };
                }
                n += 1;
                done.store(n, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
            }
            Ended { exchanges: n, error: None }
        });
        Echo { backend, vip, exchanges, ended, worker }
    }
}

#[test]
fn nat_backend_killed_under_load_resets_its_flows_and_touches_no_other() {
    killed_under_load(NatLab::new(3), "nat", "");
}

/// The same in the FULLNAT lab (backends behind a router with no route to the
/// clients): the live backend that inherits b3's flows sees segments from a SNAT
/// address and port it has no connection for, and its RST reaches the client
/// translated by `lb_nat_reply`.
#[test]
fn fullnat_backend_killed_under_load_resets_its_flows_and_touches_no_other() {
    killed_under_load(NatLab::fullnat(3), "fullnat", "snat_addresses: [198.18.51.3, \"2001:db8:51::3\"]\n");
}

fn killed_under_load(mut lab: NatLab, forwarding: &str, pool: &str) {
    lab.start_servers(&[80]);
    let probe = "probe: { kind: tcp, interval: 200ms, timeout: 150ms, rise: 2, fall: 2 }";
    let list = |v6: bool| {
        lab.backends
            .iter()
            .map(|b| if v6 { format!("{{address: \"{}\"}}", b.v6) } else { format!("{{address: {}}}", b.v4) })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (b4, b6) = (list(false), list(true));
    let yaml = format!(
        "{pool}services:
  - {{ name: echo4, vip: {VIP4}, port: {ECHO_PORT}, forwarding: {forwarding}, {probe}, backends: [{b4}] }}
  - {{ name: echo6, vip: \"{VIP6}\", port: {ECHO_PORT}, forwarding: {forwarding}, {probe}, backends: [{b6}] }}
  - {{ name: http4, vip: {VIP4}, port: 80, forwarding: {forwarding}, {probe}, backends: [{b4}] }}
  - {{ name: http6, vip: \"{VIP6}\", port: 80, forwarding: {forwarding}, {probe}, backends: [{b6}] }}
"
    );
    let cfg = lab.write_config(&yaml);
    let agent = lab.start_agent(&cfg);
    let (v4, v6) = (IpAddr::V4(VIP4), IpAddr::V6(VIP6));
    // Long-lived connections until every backend holds some over each family.
    let mut conns = Vec::new();
    for vip in [v4, v6] {
        for _ in 0..60 {
            conns.push(Echo::open(&lab.client, vip));
            let on = |name: &str| conns.iter().filter(|c| c.vip == vip && c.backend == name).count();
            if conns.iter().filter(|c| c.vip == vip).count() >= 24 && ["b1", "b2", "b3"].iter().all(|n| on(n) >= 3) {
                break;
            }
        }
        for name in ["b1", "b2", "b3"] {
            let n = conns.iter().filter(|c| c.vip == vip && c.backend == name).count();
            assert!(n >= 3, "{vip}: 60 connections left {name} with {n}");
        }
    }
    let loads = [Load::start(&lab.client, v4, 80), Load::start(&lab.client, v6, 80)];
    std::thread::sleep(Duration::from_secs(2));
    let before: Vec<u64> = conns.iter().map(|c| c.exchanges.load(Ordering::SeqCst)).collect();
    assert!(before.iter().all(|&n| n > 0), "every connection exchanged before the kill: {before:?}");

    // Kill b3: its link to the segment disappears (a pulled cable, a dead host).
    let downs = agent.count_log("backend down");
    let killed = Instant::now();
    // (In the FULLNAT lab the backends' links are on r2.)
    let segment = lab.r2.clone().unwrap_or_else(|| lab.router.clone());
    ns_sh(&segment, &["ip", "link", "del", "p-b3"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while agent.count_log("backend down") < downs + 4 {
        assert!(Instant::now() < deadline, "b3 not taken out of the 4 services within 15 s:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Instant::now();
    eprintln!("b3 out of the 4 services {:?} after its link went", out - killed);
    std::thread::sleep(Duration::from_millis(500));
    let settled = Instant::now();

    // New connections meanwhile reach only b1 and b2, all answered.
    for vip in [v4, v6] {
        let t = requests(&lab.client, Proto::Http, vip, 80, 300, 2, Duration::from_secs(60));
        assert_eq!(t.failures, 0, "{vip}: new requests failed with b3 out: {:?}", t.first_errors);
        assert!(!t.by_backend.contains_key("b3"), "{vip}: b3 still answers: {:?}", t.by_backend);
    }
    // b3's connections end reset, within seconds of b3 leaving the tables (their
    // next retransmission meets a live backend); the others keep going.
    let mut healthy = Vec::new();
    for (c, start) in conns.into_iter().zip(before) {
        if c.backend != "b3" {
            healthy.push((c, start));
            continue;
        }
        let wait_until = out + Duration::from_secs(12);
        while !c.ended.load(Ordering::SeqCst) && Instant::now() < wait_until {
            std::thread::sleep(Duration::from_millis(50));
        }
        let (vip, ended) = (c.vip, c.worker.finish());
        let (kind, text) = ended.error.unwrap_or_else(|| panic!("{vip}: a connection to the dead b3 was neither reset nor broken"));
        assert_eq!(kind, ErrorKind::ConnectionReset, "{vip}: b3's connection ended by a reset, not {text} (after {} exchanges)", ended.exchanges);
    }
    std::thread::sleep(Duration::from_secs(1));
    for (c, start) in healthy {
        let now = c.exchanges.load(Ordering::SeqCst);
        let (who, vip) = (c.backend.clone(), c.vip);
        let ended = c.worker.finish();
        assert!(ended.error.is_none(), "{vip}: a connection to {who} was disturbed: {:?}", ended.error);
        // ~20 exchanges a second; the kill lies well inside this stretch.
        let ran = (Instant::now() - killed).as_secs_f64();
        assert!(
            (now - start) as f64 >= ran * 5.0,
            "{vip}: the connection to {who} slowed down: {} exchanges in {ran:.1} s since the kill",
            now - start
        );
    }
    // The request streams: every request started once b3 was out succeeded, on
    // b1 or b2.
    for (vip, load) in [v4, v6].into_iter().zip(loads) {
        let log = load.finish();
        let late: Vec<_> = log.iter().filter(|(at, _)| *at > settled).collect();
        assert!(late.len() > 20, "{vip}: the request stream ran on ({} requests)", late.len());
        let bad: Vec<_> = late.iter().filter(|(_, r)| r.as_deref().map_or(true, |b| b == "b3")).collect();
        assert!(bad.is_empty(), "{vip}: requests failed or reached b3 after it was out: {bad:?}");
        let early_failures = log.iter().filter(|(at, r)| *at <= settled && r.is_err()).count();
        eprintln!("{vip}: {} requests, {early_failures} failed while b3 was being taken out", log.len());
    }
}

