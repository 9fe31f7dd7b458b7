//! `forwarding: nat` end to end, one-arm (tests/src/natlab.rs): backends with no VIP
//! whose default route is the balancer; the balancer rewrites the client's packets
//! to the backend's address (and port) and the replies back to the VIP, both in
//! XDP, out of its only interface.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use lb_tests::{
    lab::Capture,
    natlab::{NatLab, ECHO_PORT, VIP4, VIP6},
    traffic::{requests, LongLived, Proto, Tally},
};

const CONNECTIONS: u64 = 3000;

fn backends(lab: &NatLab, v6: bool, n: usize, extra: &[&str]) -> String {
    lab.backends[..n]
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let more = extra.get(i).map_or(String::new(), |e| format!(", {e}"));
            if v6 { format!("{{address: \"{}\"{more}}}", b.v6) } else { format!("{{address: {}{more}}}", b.v4) }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Shares within ±10% (relative) of `weights` (b1, b2, b3).
fn assert_shares(what: &str, t: &Tally, weights: [u32; 3]) {
    assert_eq!(t.failures, 0, "{what}: {} failed, e.g. {:?}", t.failures, t.first_errors);
    assert_eq!(t.successes(), CONNECTIONS, "{what}: every request answered");
    let total: u32 = weights.iter().sum();
    for (name, w) in ["b1", "b2", "b3"].into_iter().zip(weights) {
        let want = f64::from(w) / f64::from(total);
        let got = *t.by_backend.get(name).unwrap_or(&0) as f64 / CONNECTIONS as f64;
        assert!((got - want).abs() <= 0.1 * want, "{what}: {name} got {:.1}% ({:.1}% ± 10%): {:?}", got * 100.0, want * 100.0, t.by_backend);
    }
    eprintln!("{what}: {:?}", t.by_backend);
}

#[test]
fn nat_answers_tcp_and_udp_over_both_families_from_the_vip() {
    let mut lab = NatLab::new(3);
    lab.start_servers(&[80, 8080]);
    // HTTP over IPv4 goes to the backends' port 8080 (Maglev, equal weights); over
    // IPv6 to port 80, wrr with weights 1:1:2; UDP 53 both.
    let b4_8080 = backends(&lab, false, 3, &["port: 8080", "port: 8080", "port: 8080"]);
    let b6_w = backends(&lab, true, 3, &["weight: 1", "weight: 1", "weight: 2"]);
    let (b4, b6) = (backends(&lab, false, 3, &[]), backends(&lab, true, 3, &[]));
    let yaml = format!(
        "services:
  - {{ name: http4, vip: {VIP4}, port: 80, forwarding: nat, backends: [{b4_8080}] }}
  - {{ name: http6, vip: \"{VIP6}\", port: 80, forwarding: nat, scheduler: wrr, backends: [{b6_w}] }}
  - {{ name: dns4, vip: {VIP4}, port: 53, protocol: udp, forwarding: nat, backends: [{b4}] }}
  - {{ name: dns6, vip: \"{VIP6}\", port: 53, protocol: udp, forwarding: nat, backends: [{b6}] }}
"
    );
    let cfg = lab.write_config(&yaml);
    let agent = lab.start_agent(&cfg);
    // The router's port facing the balancer: what XDP sends both ways.
    let mut capture = Capture::start(&lab.router, "p-lb", lab.dir.join("balancer-link.pcap"));
    let deadline = Duration::from_secs(180);
    let (v4, v6) = (IpAddr::V4(VIP4), IpAddr::V6(VIP6));
    let cases = [
        ("nat IPv4 TCP (to port 8080)", Proto::Http, v4, 80, [1, 1, 1]),
        ("nat IPv6 TCP (wrr 1:1:2)", Proto::Http, v6, 80, [1, 1, 2]),
        ("nat IPv4 UDP", Proto::Udp, v4, 53, [1, 1, 1]),
        ("nat IPv6 UDP", Proto::Udp, v6, 53, [1, 1, 1]),
    ];
    for (what, proto, vip, port, weights) in cases {
        let t = requests(&lab.client, proto, vip, port, CONNECTIONS, 4, deadline);
        assert_shares(what, &t, weights);
    }
    capture.stop();
    // The replies left the balancer from the VIP (the backends sent them from
    // their own addresses, to the balancer).
    assert!(capture.count(&format!("src host {VIP4} and src port 80")) > 0, "no IPv4 reply from the VIP");
    assert!(capture.count(&format!("src host {VIP6} and src port 53")) > 0, "no IPv6 reply from the VIP");
    assert!(capture.count(&format!("dst host {} and dst port 8080", lab.backends[0].v4)) > 0, "nothing sent to b1:8080");
    let log = agent.log_text();
    assert!(!log.contains("unreachable"), "{log}");
}

#[test]
fn nat_long_lived_connections_keep_their_backend_across_a_reload() {
    let mut lab = NatLab::new(3);
    lab.start_servers(&[80]);
    let config = |n: usize| {
        let b4 = backends(&lab, false, n, &[]);
        format!("services:\n  - {{ name: echo, vip: {VIP4}, port: {ECHO_PORT}, forwarding: nat, backends: [{b4}] }}\n  - {{ name: http, vip: {VIP4}, port: 80, forwarding: nat, backends: [{b4}] }}\n")
    };
    let cfg = lab.write_config(&config(2));
    let agent = lab.start_agent(&cfg);
    let conns: Vec<LongLived> = (0..16).map(|_| LongLived::open(&lab.client, IpAddr::V4(VIP4), ECHO_PORT)).collect();
    let mut on: BTreeMap<String, usize> = BTreeMap::new();
    for c in &conns {
        *on.entry(c.backend.clone()).or_default() += 1;
    }
    assert!(on.len() == 2, "the connections spread over b1 and b2: {on:?}");
    // `lb-agent flows` lists them: client, VIP:port, backend:port, nat, the service.
    let out = std::process::Command::new(lb_tests::lab::agent_bin())
        .args(["flows", "--json", "--service", "echo", "--config"])
        .arg(&cfg)
        .arg("--pin-dir")
        .arg(lab.pin_dir())
        .output()
        .expect("lb-agent flows");
    assert!(out.status.success(), "lb-agent flows: {}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<lb_agent::flows::Flow> = serde_json::from_slice(&out.stdout).expect("flows JSON");
    let echo: Vec<_> = rows.iter().filter(|r| r.client.ip() == IpAddr::V4(lb_tests::natlab::CLIENT4)).collect();
    assert_eq!(echo.len(), 16, "the 16 connections in `lb-agent flows`: {rows:?}");
    let b12 = [IpAddr::V4(lab.backends[0].v4), IpAddr::V4(lab.backends[1].v4)];
    for r in echo {
        assert_eq!((r.vip, r.forwarding.as_deref(), r.state.as_str()), ((VIP4, ECHO_PORT).into(), Some("nat"), "ESTABLISHED"), "{r:?}");
        assert!(r.backend.is_some_and(|b| b12.contains(&b)) && r.backend_port == Some(ECHO_PORT), "{r:?}");
    }
    let reloads = agent.count_log("reload applied");
    lab.write_config(&config(3));
    agent.wait_log("reload applied", reloads, Duration::from_secs(15));
    std::thread::sleep(Duration::from_millis(1500));
    // New connections now reach b3 too.
    let t = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, 300, 2, Duration::from_secs(60));
    assert_eq!(t.failures, 0, "{:?}", t.first_errors);
    assert!(t.by_backend.get("b3").copied().unwrap_or(0) > 0, "b3 gets new connections after the reload: {:?}", t.by_backend);
    for c in conns {
        let r = c.finish();
        assert!(r.error.is_none() && r.exchanges > 5, "a long-lived connection broke across the reload: {r:?}");
    }
}

#[test]
fn nat_reverse_entries_leave_with_their_flows() {
    use lb_common::{FlowKey, NatReverse};
    let mut lab = NatLab::new(3);
    lab.start_servers(&[80]);
    let b4 = backends(&lab, false, 3, &[]);
    let yaml = format!("timeouts: {{ tcp: 15m, tcp_fin: 1s, udp: 5m }}\nservices:\n  - {{ name: http, vip: {VIP4}, port: 80, forwarding: nat, backends: [{b4}] }}\n");
    let cfg = lab.write_config(&yaml);
    let agent = lab.start_agent(&cfg);
    let entries = || {
        let data = aya::maps::MapData::from_pin(lab.pin_dir().join("NAT_REVERSE")).expect("the pinned NAT_REVERSE");
        let m: aya::maps::HashMap<_, FlowKey, NatReverse> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).expect("NAT_REVERSE");
        m.keys().filter_map(Result::ok).count()
    };
    let t = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, 200, 2, Duration::from_secs(60));
    assert_eq!(t.failures, 0, "{:?}", t.first_errors);
    let after = entries();
    assert!(after >= 200, "one reverse entry per connection: {after}");
    // The connections closed (FIN both ways): their entries expire after tcp_fin
    // (1 s), and the sweep (every second here) takes the reverse entries with them.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while entries() > 0 {
        assert!(std::time::Instant::now() < deadline, "{} NAT_REVERSE entries left 10 s after their flows closed\n{}", entries(), agent.log_text());
        std::thread::sleep(Duration::from_millis(250));
    }
}
