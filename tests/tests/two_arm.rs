//! Two-arm forwarding end to end (tests/src/twoarm.rs): clients on the
//! balancer's eth0, backends reachable only by its eth1 (`lb-agent run --iface
//! eth0 --backend-iface eth1`). Connections are answered through the balancer
//! with shares by weight, for `dr`, the tunnel modes, `nat` and `fullnat`, IPv4
//! and IPv6, and the frames to the backends leave by eth1 (XDP_REDIRECT: counted
//! `redirected`, seen on eth1's switch port); `nat` and `fullnat` replies, which
//! arrive on eth1, are redirected back to eth0.
//!
//! Needs root: `cargo test -p lb-tests --test two_arm -- --test-threads=1`.

use std::{net::IpAddr, process::Command, time::Duration};

use lb_common::stat;
use lb_tests::{
    lab::{agent_bin, Capture},
    traffic::{requests, Proto, Tally},
    twoarm::{Backends, TwoArmLab, SNAT4, SNAT6, VIP4, VIP6},
};

const CONNECTIONS: u64 = 4000;
/// Backends' weights (b1, b2, b3): shares 1/4, 1/4, 1/2.
const WEIGHTS: [u32; 3] = [1, 1, 2];

fn backends(lab: &TwoArmLab, v6: bool) -> String {
    lab.backends
        .iter()
        .zip(WEIGHTS)
        .map(|(b, w)| if v6 { format!("{{address: \"{}\", weight: {w}}}", b.v6) } else { format!("{{address: {}, weight: {w}}}", b.v4) })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every request answered, each backend's share its weight's (±10%).
fn assert_weighted(what: &str, t: &Tally) {
    assert_eq!(t.failures, 0, "{what}: {} failed, e.g. {:?}", t.failures, t.first_errors);
    assert_eq!(t.by_backend.values().sum::<u64>(), CONNECTIONS, "{what}: every request answered");
    let total: u32 = WEIGHTS.iter().sum();
    for (i, w) in WEIGHTS.iter().enumerate() {
        let name = format!("b{}", i + 1);
        let want = f64::from(*w) / f64::from(total);
        let got = *t.by_backend.get(&name).unwrap_or(&0) as f64 / CONNECTIONS as f64;
        assert!((got - want).abs() <= 0.1 * want, "{what}: {name} got {:.1}% ({:.1}% ± 10%): {:?}", got * 100.0, want * 100.0, t.by_backend);
    }
    eprintln!("{what}: {:?}", t.by_backend);
}

fn counter(lab: &TwoArmLab, i: u32) -> u64 {
    lb_agent::dataplane::Stats::read_pinned(&lab.pin_dir()).expect("counters").get(i)
}

/// Runs `cases` (what, protocol, vip, port) and checks the frames left by eth1:
/// counted `redirected` (at least `per_connection` per connection: 1, or 2 when
/// the replies come back across too), and seen on eth1's switch port matching
/// `on_backend_arm` (a tcpdump filter). Returns the capture, for more filters.
fn run_cases(lab: &TwoArmLab, cases: &[(&str, Proto, IpAddr, u16)], per_connection: u64, on_backend_arm: &[&str]) -> Capture {
    let mut capture = Capture::start(&lab.switch, "p-lb", lab.dir.join("backend-arm.pcap"));
    let before = counter(lab, stat::REDIRECTED);
    for (what, proto, vip, port) in cases {
        let t = requests(&lab.client, *proto, *vip, *port, CONNECTIONS, 4, Duration::from_secs(180));
        assert_weighted(what, &t);
    }
    capture.stop();
    let redirected = counter(lab, stat::REDIRECTED) - before;
    assert!(
        redirected >= per_connection * CONNECTIONS * cases.len() as u64,
        "redirected {redirected}: every connection's frames leave by the other interface"
    );
    assert_eq!(counter(lab, stat::DROP_NO_EGRESS), 0, "no frame without its egress interface");
    for filter in on_backend_arm {
        assert!(capture.count(filter) > 0, "no frame matching `{filter}` left by eth1");
    }
    capture
}

#[test]
fn dr_and_nat_backends_behind_the_second_interface() {
    let mut lab = TwoArmLab::new(3, Backends::Dr);
    lab.start_servers(&[80, 81]);
    let (b4, b6) = (backends(&lab, false), backends(&lab, true));
    let cfg = lab.write_config(&format!(
        "services:
  - {{ name: web4, vip: {VIP4}, port: 80, backends: [{b4}] }}
  - {{ name: web6, vip: \"{VIP6}\", port: 80, backends: [{b6}] }}
"
    ));
    // A backend interface that does not exist stops the agent with its name.
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.balancer))
        .arg("--")
        .arg(agent_bin())
        .args(["run", "--iface", "eth0", "--backend-iface", "nosuch9", "--metrics-listen", "off", "--config"])
        .arg(&cfg)
        .arg("--control-socket")
        .arg(lab.dir.join("refused.sock"))
        .arg("--pin-dir")
        .arg(lab.pin_dir())
        .env("NO_COLOR", "1")
        .output()
        .expect("run lb-agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "lb-agent started with a missing --backend-iface: {err}");
    assert!(err.contains("--backend-iface nosuch9") && err.contains("interface nosuch9 does not exist"), "unclear error: {err}");

    let agent = lab.start_agent(&cfg);
    let (v4, v6) = (TwoArmLab::vip(false), TwoArmLab::vip(true));
    // DR: the client's own packets, to the VIP, on the backend arm.
    run_cases(
        &lab,
        &[("dr IPv4 TCP", Proto::Http, v4, 80), ("dr IPv6 TCP", Proto::Http, v6, 80)],
        1,
        &[&format!("tcp and dst host {VIP4}"), &format!("tcp and dst host {VIP6}")],
    );
    let log = agent.log_text();
    assert!(log.contains("backend interface (two-arm)"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
    // `nat` two-arm: the backends' default route is the balancer's eth1, where
    // their replies arrive; they go back to the client by eth0 (redirected), from
    // the VIP. Added beside the `dr` services: a reload is refused (the agent
    // started without nat services created the NAT tables unsized), a restart
    // sizes them.
    let failed = agent.count_log("reload failed");
    lab.write_config(&format!(
        "services:
  - {{ name: web4, vip: {VIP4}, port: 80, backends: [{b4}] }}
  - {{ name: web6, vip: \"{VIP6}\", port: 80, backends: [{b6}] }}
  - {{ name: n4, vip: {VIP4}, port: 81, forwarding: nat, backends: [{b4}] }}
  - {{ name: n6, vip: \"{VIP6}\", port: 81, forwarding: nat, backends: [{b6}] }}
"
    ));
    agent.wait_log("reload failed", failed, Duration::from_secs(15));
    assert!(agent.log_text().contains("restart the agent to resize them"), "{}", agent.log_text());
    drop(agent);
    let agent = lab.start_agent(&cfg);
    let nat_replies = counter(&lab, stat::NAT_REPLY);
    run_cases(
        &lab,
        &[("nat IPv4 TCP", Proto::Http, v4, 81), ("nat IPv6 TCP", Proto::Http, v6, 81), ("dr IPv4 TCP beside nat", Proto::Http, v4, 80)],
        1,
        // The client's address reaches the backends (`nat`), to their own.
        &["tcp and src host 198.18.50.2 and dst port 81", "tcp and src host 2001:db8:50::2 and dst port 81"],
    );
    let nat_replies = counter(&lab, stat::NAT_REPLY) - nat_replies;
    assert!(nat_replies >= 2 * CONNECTIONS, "nat replies translated in XDP: {nat_replies}");
    let log = agent.log_text();
    assert!(!log.contains("ERROR"), "{log}");
}

/// FULLNAT two-arm: backends with no route to the clients (no default route) and
/// no VIP; the SNAT addresses are the balancer's on eth1. The client's frames
/// leave by eth1 from a SNAT address, the replies to it come back by eth1 and go
/// to the client by eth0 (both redirected). On eth1 no frame carries a client
/// address or a VIP.
#[test]
fn fullnat_backends_behind_the_second_interface() {
    let mut lab = TwoArmLab::new(3, Backends::Fullnat);
    lab.start_servers(&[80]);
    lab.start_udp_servers();
    let route = Command::new("ip").args(["netns", "exec", &lab.backends[0].ns, "ip", "route", "get", "198.18.50.2"]).output().expect("ip");
    assert!(!route.status.success(), "a backend must have no route to the clients: {}", String::from_utf8_lossy(&route.stdout));
    let (b4, b6) = (backends(&lab, false), backends(&lab, true));
    let cfg = lab.write_config(&format!(
        "snat_addresses: [{SNAT4}, \"{SNAT6}\"]
services:
  - {{ name: http4, vip: {VIP4}, port: 80, forwarding: fullnat, backends: [{b4}] }}
  - {{ name: http6, vip: \"{VIP6}\", port: 80, forwarding: fullnat, backends: [{b6}] }}
  - {{ name: dns4, vip: {VIP4}, port: 53, protocol: udp, forwarding: fullnat, backends: [{b4}] }}
  - {{ name: dns6, vip: \"{VIP6}\", port: 53, protocol: udp, forwarding: fullnat, backends: [{b6}] }}
"
    ));
    let agent = lab.start_agent(&cfg);
    let (v4, v6) = (TwoArmLab::vip(false), TwoArmLab::vip(true));
    let replies = counter(&lab, stat::FULLNAT_REPLY);
    let cases = [
        ("fullnat IPv4 TCP", Proto::Http, v4, 80),
        ("fullnat IPv6 TCP", Proto::Http, v6, 80),
        ("fullnat IPv4 UDP", Proto::Udp, v4, 53),
        ("fullnat IPv6 UDP", Proto::Udp, v6, 53),
    ];
    let capture = run_cases(
        &lab,
        &cases,
        2,
        &[&format!("tcp and src host {SNAT4} and dst port 80"), &format!("udp and src host {SNAT6} and dst port 53")],
    );
    let replies = counter(&lab, stat::FULLNAT_REPLY) - replies;
    assert!(replies >= cases.len() as u64 * CONNECTIONS, "fullnat replies translated in XDP: {replies}");
    assert_eq!(counter(&lab, stat::DROP_SNAT_EXHAUSTED), 0);
    // Only SNAT sources towards the backends; no client address, no VIP.
    assert_eq!(
        capture.count(&format!("(tcp dst port 80 or udp dst port 53) and not src host {SNAT4} and not src host {SNAT6}")),
        0,
        "a frame to a backend from another source than a SNAT address"
    );
    assert_eq!(
        capture.count("src net 198.18.50.0/24 or dst net 198.18.50.0/24 or src net 2001:db8:50::/64 or dst net 2001:db8:50::/64"),
        0,
        "a client address on the backend arm"
    );
    assert_eq!(capture.count(&format!("host {VIP4} or host {VIP6}")), 0, "a VIP on the backend arm");
    let log = agent.log_text();
    assert!(!log.contains("ERROR") && !log.contains("unreachable"), "{log}");
}

#[test]
fn tunnel_backends_behind_the_second_interface() {
    let mut lab = TwoArmLab::new(3, Backends::Tunnel);
    lab.start_servers(&[80, 8080]);
    let (b4, b6) = (backends(&lab, false), backends(&lab, true));
    let cfg = lab.write_config(&format!(
        "services:
  - {{ name: ipip4, vip: {VIP4}, port: 80, forwarding: ipip, backends: [{b4}] }}
  - {{ name: ipip6, vip: \"{VIP6}\", port: 80, forwarding: ipip, backends: [{b6}] }}
  - {{ name: gue4, vip: {VIP4}, port: 8080, forwarding: gue, backends: [{b4}] }}
"
    ));
    let agent = lab.start_agent(&cfg);
    let (v4, v6) = (TwoArmLab::vip(false), TwoArmLab::vip(true));
    run_cases(
        &lab,
        &[("ipip IPv4 TCP", Proto::Http, v4, 80), ("ip6ip6 TCP", Proto::Http, v6, 80), ("gue IPv4 TCP", Proto::Http, v4, 8080)],
        1,
        // Encapsulated from the backend interface's address.
        &["ip proto 4 and src host 198.18.51.1", "ip6 proto 41 and src host 2001:db8:51::1", "udp dst port 6080"],
    );
    let log = agent.log_text();
    assert!(!log.contains("unreachable"), "{log}");
}

/// Whether `dev` in the balancer's namespace carries an XDP program.
fn has_xdp(lab: &TwoArmLab, dev: &str) -> bool {
    let out = lb_tests::netns::ns_sh(&lab.balancer, &["ip", "link", "show", "dev", dev]);
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

fn answered(lab: &TwoArmLab, what: &str) {
    let t = requests(&lab.client, Proto::Http, TwoArmLab::vip(false), 80, 200, 2, Duration::from_secs(60));
    assert_eq!(t.failures, 0, "{what}: {:?}", t.first_errors);
}

/// `--keep-on-exit` leaves both links pinned and forwarding; the next two-arm
/// agent adopts both; one started without `--backend-iface` detaches the
/// balancer from eth1; a clean stop removes everything.
#[test]
fn restarts_adopt_both_links() {
    let mut lab = TwoArmLab::new(3, Backends::Dr);
    lab.start_servers(&[80]);
    let b4 = backends(&lab, false);
    let cfg = lab.write_config(&format!("services:\n  - {{ name: web4, vip: {VIP4}, port: 80, backends: [{b4}] }}\n"));
    let two_arm = ["--backend-iface", "eth1", "--keep-on-exit"];
    let link_backend = lab.pin_dir().join("link_backend");

    let mut first = lab.start_agent_with(&cfg, &two_arm);
    answered(&lab, "first agent");
    let (status, log) = first.stop_keeping();
    assert!(status.success(), "{log}");
    assert!(link_backend.exists() && has_xdp(&lab, "eth0") && has_xdp(&lab, "eth1"), "both links kept:\n{log}");
    answered(&lab, "no agent running");

    let mut second = lab.start_agent_with(&cfg, &two_arm);
    let log = second.log_text();
    assert!(log.contains("replaced the program in the pinned link"), "{log}");
    answered(&lab, "second agent (adopted)");
    second.stop_keeping();

    // One-arm now: eth1 is let go; its backends are on no interface of ours.
    let mut third = lab.start_agent_with(&cfg, &["--keep-on-exit"]);
    let log = third.log_text();
    assert!(log.contains("detached from the earlier agent's backend interface"), "{log}");
    assert!(!link_backend.exists() && !has_xdp(&lab, "eth1") && has_xdp(&lab, "eth0"), "eth1 detached:\n{log}");
    third.stop_keeping();

    // Two-arm again, then a clean stop (no --keep-on-exit): nothing is left.
    let mut last = lab.start_agent(&cfg);
    answered(&lab, "two-arm again");
    let (status, log) = last.stop();
    assert!(status.success(), "{log}");
    assert!(!has_xdp(&lab, "eth0") && !has_xdp(&lab, "eth1"), "detached from both:\n{log}");
    assert!(!lab.pin_dir().join("link").exists() && !link_backend.exists(), "pins removed:\n{log}");
}
