//! `forwarding: fullnat` end to end, one-arm (tests/src/natlab.rs, `NatLab::fullnat`):
//! backends in a subnet behind a router with no route to the clients and no VIP
//! anywhere; the balancer rewrites the client's packets to come from its SNAT
//! address and port and go to the backend, and the replies (sent to the SNAT
//! address) back to the VIP and the client, both in XDP, out of its only
//! interface.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use lb_agent::dataplane::Stats;
use lb_common::stat;
use lb_tests::{
    lab::Capture,
    natlab::{NatLab, CLIENT4, ECHO_PORT, SNAT4, SNAT6, VIP4, VIP6},
    netns,
    traffic::{requests, LongLived, Proto, Tally},
};

const CONNECTIONS: u64 = 3000;

fn backends(lab: &NatLab, v6: bool, which: &[usize], extra: &[&str]) -> String {
    which
        .iter()
        .enumerate()
        .map(|(k, &i)| {
            let b = &lab.backends[i];
            let more = extra.get(k).map_or(String::new(), |e| format!(", {e}"));
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

const POOL: &str = "snat_addresses: [198.18.51.3, \"2001:db8:51::3\"]\nsnat_ports: 10000-30000\n";

#[test]
fn fullnat_answers_tcp_and_udp_over_both_families_from_the_vip() {
    let mut lab = NatLab::fullnat(3);
    lab.start_servers(&[80, 8080]);
    let r2 = lab.r2.clone().expect("r2");
    let route = std::process::Command::new("ip").args(["netns", "exec", &r2, "ip", "route", "get", &CLIENT4.to_string()]).output().expect("ip");
    assert!(!route.status.success(), "r2 must have no route to the clients: {}", String::from_utf8_lossy(&route.stdout));
    let all = [0, 1, 2];
    let b4_8080 = backends(&lab, false, &all, &["port: 8080", "port: 8080", "port: 8080"]);
    let b6_w = backends(&lab, true, &all, &["weight: 1", "weight: 1", "weight: 2"]);
    let (b4, b6) = (backends(&lab, false, &all, &[]), backends(&lab, true, &all, &[]));
    let yaml = format!(
        "{POOL}services:
  - {{ name: http4, vip: {VIP4}, port: 80, forwarding: fullnat, backends: [{b4_8080}] }}
  - {{ name: http6, vip: \"{VIP6}\", port: 80, forwarding: fullnat, scheduler: wrr, backends: [{b6_w}] }}
  - {{ name: dns4, vip: {VIP4}, port: 53, protocol: udp, forwarding: fullnat, backends: [{b4}] }}
  - {{ name: dns6, vip: \"{VIP6}\", port: 53, protocol: udp, forwarding: fullnat, backends: [{b6}] }}
"
    );
    let cfg = lab.write_config(&yaml);
    let agent = lab.start_agent(&cfg);
    // The backends' side: what reaches them comes from the SNAT address only.
    let mut capture = Capture::start(&r2, "br1", lab.dir.join("backends.pcap"));
    let deadline = Duration::from_secs(180);
    let (v4, v6) = (IpAddr::V4(VIP4), IpAddr::V6(VIP6));
    let cases = [
        ("fullnat IPv4 TCP (to port 8080)", Proto::Http, v4, 80, [1, 1, 1]),
        ("fullnat IPv6 TCP (wrr 1:1:2)", Proto::Http, v6, 80, [1, 1, 2]),
        ("fullnat IPv4 UDP", Proto::Udp, v4, 53, [1, 1, 1]),
        ("fullnat IPv6 UDP", Proto::Udp, v6, 53, [1, 1, 1]),
    ];
    for (what, proto, vip, port, weights) in cases {
        let t = requests(&lab.client, proto, vip, port, CONNECTIONS, 4, deadline);
        assert_shares(what, &t, weights);
    }
    capture.stop();
    assert!(capture.count(&format!("src host {SNAT4} and dst port 8080")) > 0, "nothing from the IPv4 SNAT address to :8080");
    assert!(capture.count(&format!("src host {SNAT6} and dst port 53")) > 0, "nothing from the IPv6 SNAT address to :53");
    assert_eq!(capture.count("src net 198.18.50.0/24 or dst net 198.18.50.0/24 or src net 2001:db8:50::/64 or dst net 2001:db8:50::/64"), 0, "a client address reached the backends' subnet");
    assert_eq!(capture.count(&format!("host {VIP4} or host {VIP6}")), 0, "a VIP reached the backends' subnet");
    let stats = Stats::read_pinned(&lab.pin_dir()).expect("counters");
    assert!(stats.get(stat::FULLNAT_REPLY) >= 4 * CONNECTIONS, "replies translated: {}", stats.get(stat::FULLNAT_REPLY));
    assert_eq!(stats.get(stat::DROP_SNAT_EXHAUSTED), 0);
    let log = agent.log_text();
    assert!(!log.contains("unreachable"), "{log}");
}

fn flows(lab: &NatLab, cfg: &std::path::Path, service: &str) -> Vec<lb_agent::flows::Flow> {
    let out = std::process::Command::new(lb_tests::lab::agent_bin())
        .args(["flows", "--json", "--service", service, "--config"])
        .arg(cfg)
        .arg("--pin-dir")
        .arg(lab.pin_dir())
        .output()
        .expect("lb-agent flows");
    assert!(out.status.success(), "lb-agent flows: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("flows JSON")
}

#[test]
fn fullnat_long_lived_connections_are_kept_across_a_reload_that_adds_and_removes_a_backend() {
    let mut lab = NatLab::fullnat(4);
    lab.start_servers(&[80]);
    // b3 at weight 0 takes no new flows: every long-lived connection is on b1 or
    // b2, so the reload can remove b3 and add b4 without touching them.
    let config = |which: &[usize], extra: &[&str]| {
        let b = backends(&lab, false, which, extra);
        format!("{POOL}services:\n  - {{ name: echo, vip: {VIP4}, port: {ECHO_PORT}, forwarding: fullnat, backends: [{b}] }}\n  - {{ name: http, vip: {VIP4}, port: 80, forwarding: fullnat, backends: [{b}] }}\n")
    };
    let cfg = lab.write_config(&config(&[0, 1, 2], &["", "", "weight: 0"]).replace(", }", "}"));
    let agent = lab.start_agent(&cfg);
    let conns: Vec<LongLived> = (0..16).map(|_| LongLived::open(&lab.client, IpAddr::V4(VIP4), ECHO_PORT)).collect();
    let mut on: BTreeMap<String, usize> = BTreeMap::new();
    for c in &conns {
        *on.entry(c.backend.clone()).or_default() += 1;
    }
    assert!(on.len() == 2 && !on.contains_key("b3"), "the connections spread over b1 and b2: {on:?}");
    // `lb-agent flows` shows each client with its SNAT address and port.
    let rows = flows(&lab, &cfg, "echo");
    let echo: Vec<_> = rows.iter().filter(|r| r.client.ip() == IpAddr::V4(CLIENT4)).collect();
    assert_eq!(echo.len(), 16, "the 16 connections in `lb-agent flows`: {rows:?}");
    let mut snat_ports = std::collections::BTreeSet::new();
    for r in &echo {
        assert_eq!((r.forwarding.as_deref(), r.state.as_str()), (Some("fullnat"), "ESTABLISHED"), "{r:?}");
        let snat = r.snat.unwrap_or_else(|| panic!("no SNAT address in {r:?}"));
        assert_eq!(snat.ip(), IpAddr::V4(SNAT4), "{r:?}");
        assert!((10000..=30000).contains(&snat.port()), "{r:?}");
        snat_ports.insert(snat.port());
    }
    assert_eq!(snat_ports.len(), 16, "16 different SNAT ports");
    let reloads = agent.count_log("reload applied");
    lab.write_config(&config(&[0, 1, 3], &[]));
    agent.wait_log("reload applied", reloads, Duration::from_secs(15));
    std::thread::sleep(Duration::from_millis(1500));
    let t = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, 300, 2, Duration::from_secs(60));
    assert_eq!(t.failures, 0, "{:?}", t.first_errors);
    assert!(t.by_backend.get("b4").copied().unwrap_or(0) > 0, "b4 gets new connections after the reload: {:?}", t.by_backend);
    assert_eq!(t.by_backend.get("b3"), None, "b3 was removed: {:?}", t.by_backend);
    for c in conns {
        let r = c.finish();
        assert!(r.error.is_none() && r.exchanges > 5, "a long-lived connection broke across the reload: {r:?}");
    }
}

/// Opens `n` connections to the echo service at once (2 s to connect each);
/// returns the connected ones, each with its greeting checked.
fn open_many(ns: &str, n: usize) -> Vec<TcpStream> {
    netns::run_in(ns, move || {
        let threads: Vec<_> = (0..n)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut c = TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(VIP4), ECHO_PORT), Duration::from_secs(2)).ok()?;
                    c.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
                    let mut greeting = [0u8; 3];
                    c.read_exact(&mut greeting).ok()?;
                    assert_eq!(&greeting, b"b1\n", "the greeting of the only backend");
                    Some(c)
                })
            })
            .collect();
        threads.into_iter().filter_map(|t| t.join().expect("connect thread")).collect()
    })
}

#[test]
fn a_pool_of_64_ports_serves_64_of_200_flows_and_its_ports_return() {
    let mut lab = NatLab::fullnat(1);
    lab.start_servers(&[80]);
    let b = backends(&lab, false, &[0], &[]);
    let yaml = format!(
        "timeouts: {{ tcp: 15m, tcp_fin: 1s, udp: 5m }}\n{POOL}services:\n  - {{ name: echo, vip: {VIP4}, port: {ECHO_PORT}, forwarding: fullnat, snat_addresses: [{SNAT4}], snat_ports: 20000-20063, backends: [{b}] }}\n"
    );
    let cfg = lab.write_config(&yaml);
    let agent = lab.start_agent(&cfg);
    let mut conns = open_many(&lab.client, 200);
    assert_eq!(conns.len(), 64, "64 of 200 flows get a SNAT port\n{}", agent.log_text());
    let stats = Stats::read_pinned(&lab.pin_dir()).expect("counters");
    assert!(stats.get(stat::DROP_SNAT_EXHAUSTED) >= 136, "the other 136 dropped and counted: {}", stats.get(stat::DROP_SNAT_EXHAUSTED));
    // Nothing misrouted: every connection gets its own bytes back.
    for (i, c) in conns.iter_mut().enumerate() {
        let msg = format!("conn {i:03}\n");
        c.write_all(msg.as_bytes()).expect("send");
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(back, msg.as_bytes(), "connection {i} got another's answer");
    }
    let rows = flows(&lab, &cfg, "echo");
    let ports: std::collections::BTreeSet<u16> = rows.iter().filter_map(|r| r.snat).map(|s| s.port()).collect();
    assert_eq!(ports.len(), 64, "64 different ports in use: {ports:?}");
    assert!(ports.iter().all(|p| (20000..=20063).contains(p)), "{ports:?}");
    // The flows end; once their entries expire (tcp_fin 1 s) and the sweep has
    // run, the ports serve new flows.
    conns.clear();
    let entries = || {
        let data = aya::maps::MapData::from_pin(lab.pin_dir().join("FULLNAT_REVERSE")).expect("the pinned FULLNAT_REVERSE");
        let m: aya::maps::HashMap<_, lb_common::FlowKey, lb_common::NatReverse> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).expect("FULLNAT_REVERSE");
        m.keys().filter_map(Result::ok).count()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while entries() > 0 {
        assert!(Instant::now() < deadline, "{} FULLNAT_REVERSE entries left 15 s after their flows closed\n{}", entries(), agent.log_text());
        std::thread::sleep(Duration::from_millis(250));
    }
    let again = open_many(&lab.client, 64);
    assert_eq!(again.len(), 64, "the 64 ports serve new flows once the old ones are gone");
}

#[test]
fn a_snat_address_not_on_the_interface_is_refused_at_start_and_on_reload() {
    let mut lab = NatLab::fullnat(1);
    lab.start_servers(&[80]);
    let b = backends(&lab, false, &[0], &[]);
    let yaml = |snat: &str| format!("snat_addresses: [{snat}]\nservices:\n  - {{ name: web, vip: {VIP4}, port: 80, forwarding: fullnat, backends: [{b}] }}\n");
    // At start: the agent stops with the reason.
    let cfg = lab.write_config(&yaml("198.18.51.99"));
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.balancer))
        .arg("--")
        .arg(lb_tests::lab::agent_bin())
        .args(["run", "--iface", "eth0", "--xdp-mode", "native", "--metrics-listen", "off", "--config"])
        .arg(&cfg)
        .arg("--pin-dir")
        .arg(lab.pin_dir())
        .output()
        .expect("lb-agent run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "lb-agent started with a SNAT address not its own:\n{err}");
    assert!(
        err.contains("service web: snat address 198.18.51.99 is not an address of interface eth0"),
        "the reason is given:\n{err}"
    );
    // On reload: refused, the running configuration stays.
    lab.write_config(&yaml(&SNAT4.to_string()));
    let agent = lab.start_agent(&cfg);
    let t = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, 20, 1, Duration::from_secs(30));
    assert_eq!(t.failures, 0, "{:?}", t.first_errors);
    lab.write_config(&yaml("198.18.51.99"));
    agent.wait_log("reload failed", 0, Duration::from_secs(15));
    let log = agent.log_text();
    assert!(log.contains("snat address 198.18.51.99 is not an address of interface eth0"), "{log}");
    let t = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, 20, 1, Duration::from_secs(30));
    assert_eq!(t.failures, 0, "the old configuration still serves: {:?}", t.first_errors);
}
