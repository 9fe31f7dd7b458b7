//! Restarting the agent without losing traffic: the balancer keeps forwarding from
//! its pinned program and maps while no agent runs, and the next agent adopts
//! them (connection table kept) and swaps its program in through the pinned link.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use lb_agent::dataplane::Stats;
use lb_common::stat;
use lb_tests::{
    lab::{Lab, ECHO_PORT, VIP4},
    netns,
    traffic::{Load, LongLived, Worker},
};

/// UDP request/reply over one socket per round, counting what was sent and what
/// came back (each reply is the backend's name, so it proves the datagram got
/// through the balancer).
fn udp_stream(ns: &str, vip: IpAddr) -> Worker<(u64, u64)> {
    Worker::spawn_in(ns, move |stop| {
        let (mut sent, mut answered) = (0u64, 0u64);
        let end = Instant::now() + Duration::from_secs(120);
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::SeqCst) && Instant::now() < end {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            s.connect(SocketAddr::new(vip, 53)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(1))).expect("timeout");
            s.send(b"who").expect("send");
            sent += 1;
            if s.recv(&mut buf).is_ok() {
                answered += 1;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        (sent, answered)
    })
}

/// The lab's services over its first `n` backends.
fn config(lab: &Lab, n: usize) -> std::path::PathBuf {
    let backends: String = lab.backends[..n].iter().map(|b| format!("      - address: {}\n", b.v4)).collect();
    lab.write_config(
        "lb.yaml",
        &format!(
            "services:
  - name: web
    vip: {VIP4}
    port: 80
    backends:
{backends}  - name: echo
    vip: {VIP4}
    port: {ECHO_PORT}
    backends:
{backends}  - name: dns
    vip: {VIP4}
    port: 53
    protocol: udp
    backends:
{backends}"
        ),
    )
}

fn xdp_prog_id(lab: &Lab) -> String {
    let out = netns::ns_sh(&lab.balancer, &["ip", "-d", "link", "show", "eth0"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let id = text.split_whitespace().skip_while(|w| *w != "prog/xdp").nth(2).map(str::to_string);
    id.unwrap_or_else(|| panic!("no XDP program on the balancer's eth0:\n{text}"))
}

/// Runs traffic across `restart` and checks nothing was lost or broken.
fn across(lab: &mut Lab, restart: impl FnOnce(&Lab) -> lb_tests::lab::Agent) {
    let conns: Vec<LongLived> = (0..16).map(|_| LongLived::open(&lab.client, IpAddr::V4(VIP4), ECHO_PORT)).collect();
    let load = Load::start(&lab.client, IpAddr::V4(VIP4), 80);
    let udp = udp_stream(&lab.client, IpAddr::V4(VIP4));
    std::thread::sleep(Duration::from_millis(500));
    let before = xdp_prog_id(lab);

    let agent = restart(lab);

    std::thread::sleep(Duration::from_millis(700));
    let after = xdp_prog_id(lab);
    let http = load.finish();
    let (sent, answered) = udp.finish();
    let log = agent.log_text();
    assert!(log.contains("maps reused, connection table kept"), "the new agent adopts the maps:\n{log}");
    assert!(log.contains("replaced the program in the pinned link"), "and swaps its program in:\n{log}");
    assert_ne!(before, after, "a new program instance is attached");

    let failed: Vec<_> = http.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(http.len() > 50 && failed.is_empty(), "{} of {} HTTP requests failed: {failed:?}", failed.len(), http.len());
    assert!(sent > 50, "the UDP stream ran ({sent} sent)");
    assert_eq!(answered, sent, "UDP datagrams lost across the restart");
    for c in conns {
        let r = c.finish();
        assert!(r.error.is_none(), "long-lived connection to {} broke: {:?}", r.backend, r.error);
        assert!(r.exchanges > 5, "long-lived connection to {} barely ran", r.backend);
    }
    let stats = Stats::read_pinned(&lab.pin_dir()).expect("read the pinned maps");
    assert_eq!(stats.get(stat::DROP_NO_BACKEND), 0, "nothing dropped");
    assert_eq!(stats.get(stat::PASS_NOT_READY), 0, "never passed as not ready");
}

// The new agent starts with a fourth backend: Maglev would move about a quarter of
// the flows, so only the kept connection table keeps the long-lived connections
// (and the HTTP requests in flight) on their backends.

#[test]
fn sigkill_and_restart_lose_nothing() {
    let mut lab = Lab::new(4);
    lab.start_servers();
    let mut first = lab.start_agent(&config(&lab, 3));
    across(&mut lab, |lab| {
        first.kill();
        // No agent at all for a while: the pinned balancer forwards on its own.
        std::thread::sleep(Duration::from_millis(700));
        lab.start_agent(&config(lab, 4))
    });
}

#[test]
fn keep_on_exit_then_replacement_loses_nothing() {
    let mut lab = Lab::new(4);
    lab.start_servers();
    let mut first = lab.start_agent_with(&config(&lab, 3), &["--keep-on-exit"]);
    across(&mut lab, |lab| {
        let (status, log) = first.stop_keeping();
        assert!(status.success(), "{log}");
        assert!(log.contains("left attached"), "{log}");
        lab.start_agent(&config(lab, 4))
    });
}
