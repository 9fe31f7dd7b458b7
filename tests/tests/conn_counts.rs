//! ActiveConn/InActConn per backend (`lb-agent status --json`) against the
//! connections the backends really hold (`ss` in each backend's namespace):
//! after a burst of long-lived connections, after clients close some (FIN), and
//! after clients vanish without a FIN (counted until the `tcp` timeout, as IPVS
//! does, then gone). The bound checked is the documented one: a sweep (≤ 2 s).
//!
//! Needs root: `cargo test -p lb-tests --test conn_counts -- --test-threads=1`.

use std::{
    net::IpAddr,
    process::Command,
    time::{Duration, Instant},
};

use lb_agent::status::Status;
use lb_tests::{
    lab::{agent_bin, Lab, ECHO_PORT, VIP4},
    netns,
    traffic::LongLived,
};

/// `tcp` timeout of the test configuration.
const TCP_TIMEOUT: Duration = Duration::from_secs(6);
/// The counts' documented bound (`conntrack::MAX_SWEEP`) plus the status refresh
/// (1 s) and slack.
const BOUND: Duration = Duration::from_secs(4);

fn status(lab: &Lab) -> Status {
    let out = Command::new(agent_bin())
        .args(["status", "--json", "--socket"])
        .arg(lab.control_socket())
        .output()
        .expect("run lb-agent status");
    assert!(out.status.success(), "lb-agent status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// Per backend (lab order): (ActiveConn, InActConn) from the status.
fn counts(lab: &Lab) -> Vec<(u32, u32)> {
    let st = status(lab);
    let svc = st.services.iter().find(|s| s.name == "echo").expect("echo service");
    lab.backends
        .iter()
        .map(|b| {
            let s = svc.backends.iter().find(|x| x.address == Some(IpAddr::V4(b.v4))).expect("backend in status");
            (s.active_conns, s.inactive_conns)
        })
        .collect()
}

/// Per backend: established connections on the echo port, by `ss` there.
fn established(lab: &Lab) -> Vec<u32> {
    lab.backends
        .iter()
        .map(|b| {
            let sport = format!("sport = :{ECHO_PORT}");
            let out = netns::ns_sh(&b.ns, &["ss", "-Htn", "state", "established", &sport]);
            String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()).count() as u32
        })
        .collect()
}

/// Waits up to `within` for `ok(counts)`; returns the counts and how long it took.
fn settle(lab: &Lab, what: &str, within: Duration, ok: impl Fn(&[(u32, u32)]) -> bool) -> (Vec<(u32, u32)>, Duration) {
    let start = Instant::now();
    loop {
        let c = counts(lab);
        if ok(&c) {
            return (c, start.elapsed());
        }
        assert!(start.elapsed() < within, "{what}: counts {c:?}, backends hold {:?}", established(lab));
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn active_connections_match_the_backends() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    let backends: String = lab.backends.iter().map(|b| format!("      - address: {}\n", b.v4)).collect();
    let cfg = lab.write_config(
        "lb.yaml",
        &format!(
            "timeouts: {{ tcp: {}s, tcp_fin: 2s, udp: 3s }}\nservices:\n  - name: echo\n    vip: {VIP4}\n    port: {ECHO_PORT}\n    backends:\n{backends}",
            TCP_TIMEOUT.as_secs()
        ),
    );
    let _agent = lab.start_agent(&cfg);
    let vip = IpAddr::V4(VIP4);

    // A burst: 45 connections exchanging every 100 ms.
    let mut open: Vec<LongLived> = (0..45).map(|_| LongLived::open(&lab.client, vip, ECHO_PORT)).collect();
    let held = established(&lab);
    assert_eq!(held.iter().sum::<u32>(), 45, "the backends hold {held:?}");
    let (c, took) = settle(&lab, "after the burst", BOUND, |c| c.iter().map(|x| x.0).eq(held.iter().copied()));
    eprintln!("burst: backends hold {held:?}, counts {c:?} after {took:?}");

    // 15 clients close (FIN): their connections leave ActiveConn, count as inactive
    // until tcp_fin, then disappear.
    for c in open.drain(..15) {
        let r = c.finish();
        assert!(r.error.is_none(), "{r:?}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let held = established(&lab);
    assert_eq!(held.iter().sum::<u32>(), 30, "the backends hold {held:?}");
    let (c, took) = settle(&lab, "after 15 closed", BOUND, |c| c.iter().map(|x| x.0).eq(held.iter().copied()));
    eprintln!("closed: backends hold {held:?}, counts {c:?} after {took:?}");
    let (c, took) =
        settle(&lab, "closing entries expire (tcp_fin 2 s)", Duration::from_secs(2) + BOUND, |c| c.iter().all(|x| x.1 == 0));
    eprintln!("closing expired: counts {c:?} after {took:?}");

    // The other 30 vanish: their packets stop reaching the balancer (dropped on the
    // client's way out), then the clients close, so no FIN arrives either. The
    // balancer counts them until the tcp timeout, then not.
    let rule = format!("ip daddr {VIP4} tcp dport {ECHO_PORT} drop");
    for cmd in [
        "add table inet vanish".to_string(),
        "add chain inet vanish out { type filter hook output priority 0; }".to_string(),
        format!("add rule inet vanish out {rule}"),
    ] {
        let out = netns::ns_sh(&lab.client, &["nft", &cmd]);
        assert!(out.status.success(), "nft {cmd}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let vanished = Instant::now();
    for c in open.drain(..) {
        // Their exchanges now fail: that is the point.
        let _ = c.finish();
    }
    let c = counts(&lab);
    assert_eq!(c.iter().map(|x| x.0).sum::<u32>(), 30, "vanished clients still count before the timeout: {c:?}");
    let (c, _) = settle(&lab, "vanished clients expire after the tcp timeout", TCP_TIMEOUT + BOUND, |c| {
        c.iter().all(|x| *x == (0, 0))
    });
    let took = vanished.elapsed();
    eprintln!("vanished: counts {c:?} after {took:?} (tcp timeout {TCP_TIMEOUT:?})");
    assert!(took >= TCP_TIMEOUT - Duration::from_secs(1), "expired before the timeout: {took:?}");
}
