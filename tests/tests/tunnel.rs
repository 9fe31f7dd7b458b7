//! Tunnel forwarding end to end, in a routed lab (tests/src/routed.rs): backends
//! in two subnets behind a router, no L2 path from the balancer to them, each
//! decapsulating with `lb-agent decap` (XDP: this kernel has no ipip/fou modules;
//! the kernel path of lb-realserver.sh is not exercised here).

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use lb_tests::{
    lab::Capture,
    routed::{RoutedLab, ECHO_PORT, VIP4, VIP6},
    traffic::{requests, LongLived, Proto, Tally},
};

const CONNECTIONS: u64 = 3000;

/// Waits (at most 15 s) for a child that stops by itself and returns its stdout.
trait WaitOutput {
    fn wait_with_output_timeout(&mut self, log: &str) -> String;
}

impl WaitOutput for std::process::Child {
    fn wait_with_output_timeout(&mut self, log: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while self.try_wait().ok().flatten().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = self.kill();
                let mut out = String::new();
                use std::io::Read;
                let _ = self.stdout.take().expect("stdout").read_to_string(&mut out);
                panic!("lb-agent trace --count 1 did not end; its output: {out}\nagent log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut out = String::new();
        use std::io::Read;
        self.stdout.take().expect("stdout").read_to_string(&mut out).expect("read");
        out
    }
}

fn backends(lab: &RoutedLab, v6: bool, n: usize) -> String {
    lab.backends[..n]
        .iter()
        .map(|b| if v6 { format!("{{address: \"{}\"}}", b.v6) } else { format!("{{address: {}}}", b.v4) })
        .collect::<Vec<_>>()
        .join(", ")
}

/// ipip and gue services for both families on ports 80 (ipip) and 8080 (gue), an
/// IPv6 vip over GUE to IPv4 backends on 8081, UDP 53 (ipip over IPv4, gue over
/// IPv6), and echo over ipip on the first `echo` backends.
fn config(lab: &RoutedLab, echo: usize) -> String {
    let (b4, b6) = (backends(lab, false, 3), backends(lab, true, 3));
    format!(
        "services:
  - {{ name: ipip4, vip: {VIP4}, port: 80, forwarding: ipip, backends: [{b4}] }}
  - {{ name: ipip6, vip: \"{VIP6}\", port: 80, forwarding: ipip, backends: [{b6}] }}
  - {{ name: gue4, vip: {VIP4}, port: 8080, forwarding: gue, backends: [{b4}] }}
  - {{ name: gue6, vip: \"{VIP6}\", port: 8080, forwarding: gue, backends: [{b6}] }}
  - {{ name: gue64, vip: \"{VIP6}\", port: 8081, forwarding: gue, backends: [{b4}] }}
  - {{ name: dns4, vip: {VIP4}, port: 53, protocol: udp, forwarding: ipip, backends: [{b4}] }}
  - {{ name: dns6, vip: \"{VIP6}\", port: 53, protocol: udp, forwarding: gue, backends: [{b6}] }}
  - {{ name: echo, vip: {VIP4}, port: {ECHO_PORT}, forwarding: ipip, backends: [{}] }}
",
        backends(lab, false, echo)
    )
}

fn assert_even(what: &str, t: &Tally) {
    assert_eq!(t.failures, 0, "{what}: {} failed, e.g. {:?}", t.failures, t.first_errors);
    assert_eq!(t.successes(), CONNECTIONS, "{what}: every request answered");
    for name in ["b1", "b2", "b3"] {
        let got = *t.by_backend.get(name).unwrap_or(&0) as f64 / CONNECTIONS as f64;
        assert!((got - 1.0 / 3.0).abs() <= 0.1 / 3.0, "{what}: {name} got {:.1}% (1/3 ± 10%): {:?}", got * 100.0, t.by_backend);
    }
    eprintln!("{what}: {:?}", t.by_backend);
}

#[test]
fn ipip_and_gue_reach_routed_backends_and_replies_bypass_the_balancer() {
    let mut lab = RoutedLab::new();
    lab.start_servers(&[80, 8080, 8081]);
    let cfg = lab.write_config(&config(&lab, 3));
    let agent = lab.start_agent(&cfg);
    // On the router's port facing the balancer: frames both ways between them
    // (the balancer's own tap does not see what XDP sends).
    let mut capture = Capture::start(&lab.router, "p-lb", lab.dir.join("balancer-link.pcap"));
    let deadline = Duration::from_secs(180);
    let (v4, v6) = (IpAddr::V4(VIP4), IpAddr::V6(VIP6));
    let cases = [
        ("ipip IPv4 TCP", Proto::Http, v4, 80),
        ("ip6ip6 TCP", Proto::Http, v6, 80),
        ("gue IPv4 TCP", Proto::Http, v4, 8080),
        ("gue IPv6 TCP", Proto::Http, v6, 8080),
        ("gue IPv6 vip, IPv4 backends, TCP", Proto::Http, v6, 8081),
        ("ipip IPv4 UDP", Proto::Udp, v4, 53),
        ("gue IPv6 UDP", Proto::Udp, v6, 53),
    ];
    for (what, proto, vip, port) in cases {
        let t = requests(&lab.client, proto, vip, port, CONNECTIONS, 4, deadline);
        assert_even(what, &t);
    }
    capture.stop();
    // Replies go from the backends to the client through the router: nothing
    // from a VIP crosses the balancer's link.
    let from_vip = capture.count(&format!("src host {VIP4} or src host {VIP6}"));
    assert_eq!(from_vip, 0, "replies crossed the balancer");
    // What did cross it, towards the backends, was encapsulated.
    assert!(capture.count("ip proto 4") > 0, "no IPIP frames left the balancer");
    assert!(capture.count("ip6 proto 41") > 0, "no IP6IP6 frames left the balancer");
    assert!(capture.count("udp dst port 6080") > 0, "no GUE frames left the balancer");
    let log = agent.log_text();
    assert!(!log.contains("unreachable"), "{log}");
}

#[test]
fn long_lived_connections_keep_their_backend_across_a_reload() {
    let mut lab = RoutedLab::new();
    lab.start_servers(&[80, 8081]);
    let cfg = lab.write_config(&config(&lab, 2));
    let agent = lab.start_agent(&cfg);
    let conns: Vec<LongLived> = (0..12).map(|_| LongLived::open(&lab.client, IpAddr::V4(VIP4), ECHO_PORT)).collect();
    let mut on: BTreeMap<String, usize> = BTreeMap::new();
    for c in &conns {
        *on.entry(c.backend.clone()).or_default() += 1;
    }
    assert!(on.len() == 2, "the connections spread over b1 and b2: {on:?}");
    let reloads = agent.count_log("reload applied");
    lab.write_config(&config(&lab, 3));
    agent.wait_log("reload applied", reloads, Duration::from_secs(15));
    std::thread::sleep(Duration::from_millis(1500));
    for c in conns {
        let r = c.finish();
        assert!(r.error.is_none() && r.exchanges > 5, "a long-lived connection broke across the reload: {r:?}");
    }
    // A trace shows the encapsulation (one GUE packet to the IPv6 vip).
    let mut trace = std::process::Command::new(lb_tests::lab::agent_bin())
        .args(["trace", "--json", "--count", "1", "--vip", &format!("[{VIP6}]:8081"), "--socket"])
        .arg(lab.control_socket())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("lb-agent trace");
    // The first trace loads the traced programs (seconds of verification): wait
    // until it says it is tracing.
    let stderr = std::io::BufReader::new(trace.stderr.take().expect("stderr"));
    let started = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in stderr.lines().map_while(Result::ok) {
            if line.contains("tracing ") {
                let _ = started.0.send(());
            }
        }
    });
    started.1.recv_timeout(Duration::from_secs(30)).expect("lb-agent trace started");
    let t = requests(&lab.client, Proto::Http, IpAddr::V6(VIP6), 8081, 1, 1, Duration::from_secs(10));
    assert_eq!(t.failures, 0, "{:?}", t.first_errors);
    let out = trace.wait_with_output_timeout(&agent.log_text());
    let line: lb_agent::trace::TraceLine = serde_json::from_str(out.lines().next().expect("a traced packet")).expect("JSON");
    assert_eq!((line.forwarding.as_deref(), line.service.as_deref()), (Some("gue"), Some("gue64")), "{line:?}");
    assert!(line.backend.is_some_and(|b| b.is_ipv4()), "{line:?}");
    // `status` names each service's forwarding mode.
    let out = std::process::Command::new(lb_tests::lab::agent_bin())
        .args(["status", "--json", "--socket"])
        .arg(lab.control_socket())
        .output()
        .expect("lb-agent status");
    let status: lb_agent::status::Status = serde_json::from_slice(&out.stdout).expect("status JSON");
    let modes: BTreeMap<String, String> = status.services.iter().map(|s| (s.name.clone(), s.forwarding.clone())).collect();
    assert_eq!((modes["ipip4"].as_str(), modes["gue64"].as_str()), ("ipip", "gue"), "{modes:?}");
    // New connections now reach b3 too.
    let t = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, 300, 2, Duration::from_secs(60));
    assert_eq!(t.failures, 0, "{:?}", t.first_errors);
}

#[test]
fn path_mtu_discovery_works_through_the_tunnels() {
    use lb_tests::pmtu::{bulk_server, download, BULK};
    const BULK_PORT: u16 = 8000;
    let mut lab = RoutedLab::new();
    lab.start_servers(&[80]);
    let _bulk: Vec<_> = lab.backends.iter().map(|b| bulk_server(&b.ns, BULK_PORT)).collect();
    // The router's link to the client carries 1,400 bytes; the client's own
    // interface says 1,500 (its MSS invites full-sized segments).
    lb_tests::netns::ns_sh(&lab.router, &["ip", "link", "set", "p-cl", "mtu", "1400"]);
    let (b4, b6) = (backends(&lab, false, 3), backends(&lab, true, 3));
    let yaml = |globals: &str| {
        format!(
            "{globals}services:
  - {{ name: bulk4, vip: {VIP4}, port: {BULK_PORT}, forwarding: ipip, backends: [{b4}] }}
  - {{ name: bulk6, vip: \"{VIP6}\", port: {BULK_PORT}, forwarding: gue, backends: [{b6}] }}
"
        )
    };
    let cfg = lab.write_config(&yaml("forward_icmp: false\n"));
    let agent = lab.start_agent(&cfg);
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        let r = download(&lab.client, vip, BULK_PORT, Duration::from_secs(6));
        assert!(r.is_err(), "download from {vip} without ICMP forwarding should stall, got {r:?}");
    }
    lab.write_config(&yaml(""));
    agent.wait_log("reload applied", 0, Duration::from_secs(15));
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        let got = download(&lab.client, vip, BULK_PORT, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("1 MB from {vip} (ipip / gue) through a 1,400-byte link: {e}\n{}", agent.log_text()));
        assert!(got >= BULK, "download from {vip}: {got} bytes");
    }
    let stats = lb_agent::dataplane::Stats::read_pinned(&lab.pin_dir()).expect("counters");
    assert!(stats.get(lb_common::stat::ICMP_FORWARDED) >= 2, "the router's errors went to the backends");
}
