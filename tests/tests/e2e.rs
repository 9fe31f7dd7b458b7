//! End to end, in network namespaces: real TCP and UDP connections from a client to
//! the VIPs, spread by the XDP balancer (native mode, LVS-DR) over three backends
//! that answer the client directly.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use lb_agent::{config, dataplane::Stats, plan::Plan};
use lb_common::stat;
use lb_tests::{
    lab::{Capture, Lab, VIP4, VIP6},
    traffic::{requests, Proto, Tally},
};

const CONNECTIONS: u64 = 3000;

fn demo_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/demo.yaml")
}

/// Backend name (b1, b2, ...) -> weight share in `service` of the demo config.
fn weight_shares(cfg: &config::Config, service: &str, lab: &Lab) -> BTreeMap<String, f64> {
    let svc = cfg.services.iter().find(|s| s.name == service).expect("service in demo.yaml");
    let total: u32 = svc.backends.iter().map(|b| b.weight).sum();
    svc.backends
        .iter()
        .map(|b| {
            let host = lab
                .backends
                .iter()
                .find(|h| IpAddr::V4(h.v4) == b.address || IpAddr::V6(h.v6) == b.address)
                .expect("backend address belongs to a lab host");
            (host.name.clone(), f64::from(b.weight) / f64::from(total))
        })
        .collect()
}

fn assert_spread(what: &str, tally: &Tally, shares: &BTreeMap<String, f64>) {
    assert_eq!(tally.failures, 0, "{what}: {} requests failed, e.g. {:?}", tally.failures, tally.first_errors);
    let total = tally.successes() as f64;
    assert_eq!(tally.successes(), CONNECTIONS, "{what}: every request answered");
    for (name, share) in shares {
        let got = *tally.by_backend.get(name).unwrap_or(&0) as f64 / total;
        assert!(
            (got - share).abs() <= share * 0.10,
            "{what}: backend {name} got {:.1}% of requests, weight share is {:.1}% (±10%): {:?}",
            got * 100.0,
            share * 100.0,
            tally.by_backend
        );
    }
    eprintln!("{what}: {:?}", tally.by_backend);
}

#[test]
fn dr_forwarding_tcp_and_udp_v4_v6() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    let cfg = config::load(&demo_config()).expect("demo.yaml is valid");
    let mut agent = lab.start_agent(&demo_config());

    let mut capture = Capture::start(&lab.switch, &lab.balancer_port, lab.dir.join("balancer-port.pcap"));
    let deadline = Duration::from_secs(120);
    let tcp4 = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, CONNECTIONS, 4, deadline);
    let tcp6 = requests(&lab.client, Proto::Http, IpAddr::V6(VIP6), 80, CONNECTIONS, 4, deadline);
    let udp4 = requests(&lab.client, Proto::Udp, IpAddr::V4(VIP4), 53, CONNECTIONS, 4, deadline);
    let udp6 = requests(&lab.client, Proto::Udp, IpAddr::V6(VIP6), 53, CONNECTIONS, 4, deadline);
    capture.stop();

    assert_spread("tcp v4", &tcp4, &weight_shares(&cfg, "web", &lab));
    assert_spread("tcp v6", &tcp6, &weight_shares(&cfg, "web6", &lab));
    assert_spread("udp v4", &udp4, &weight_shares(&cfg, "dns", &lab));
    assert_spread("udp v6", &udp6, &weight_shares(&cfg, "dns6", &lab));

    // Replies go from the backends straight to the client: the link between the
    // switch and the balancer carries client->VIP frames (in and back out, rewritten)
    // and not one frame from a VIP.
    let from_vip = capture.count(&format!("src host {VIP4} or src host {VIP6}"));
    let to_vip = capture.count(&format!("dst host {VIP4} or dst host {VIP6}"));
    assert_eq!(from_vip, 0, "replies passed the balancer's link");
    assert!(to_vip as u64 >= 4 * CONNECTIONS, "capture saw only {to_vip} client->VIP frames");

    // The balancer's own counters: everything it forwarded, per service and per
    // backend, adds up; nothing was dropped, nothing of ours passed to the stack.
    let stats = Stats::read_pinned(&agent.pin_dir).expect("read the agent's pinned maps");
    let plan = Plan::build(&cfg, &Default::default());
    let forwarded = stats.get(stat::FORWARDED);
    let by_service: u64 = plan.services.iter().map(|s| stats.services[s.value.id as usize].packets).sum();
    let by_backend: u64 = plan.backends.iter().map(|b| stats.backends[b.id as usize].packets).sum();
    assert_eq!(forwarded, by_service, "forwarded == sum over services");
    assert_eq!(forwarded, by_backend, "forwarded == sum over backends");
    // At least SYN, ACK+request, FIN/ACK per TCP connection, one datagram per UDP request.
    assert!(forwarded >= 2 * 3 * CONNECTIONS + 2 * CONNECTIONS, "forwarded only {forwarded} packets");
    for b in &plan.backends {
        assert!(stats.backends[b.id as usize].packets > 0, "backend {} got no packets", b.address);
    }
    for reason in [stat::DROP_NO_BACKEND, stat::PASS_NO_SERVICE, stat::PASS_NOT_READY, stat::PASS_MALFORMED_L3] {
        assert_eq!(stats.get(reason), 0, "counter {} should be 0", stat::NAMES[reason as usize]);
    }

    let (status, log) = agent.stop();
    assert!(status.success(), "lb-agent exited with {status}:\n{log}");
    assert!(log.contains("detached"), "lb-agent log lacks the detach line:\n{log}");
    let link = lb_tests::netns::ns_sh(&lab.balancer, &["ip", "link", "show", "eth0"]);
    assert!(!String::from_utf8_lossy(&link.stdout).contains("xdp"), "XDP program still attached after SIGTERM");
    assert!(!agent.pin_dir.join("CONFIG").exists(), "pins left behind after SIGTERM");
}

#[test]
fn unresolvable_backend_is_reported_and_gets_no_traffic() {
    let mut lab = Lab::new(1);
    lab.start_servers();
    // 198.18.0.99 is on the segment but no host answers ARP for it.
    let config = lab.dir.join("lb.yaml");
    std::fs::write(
        &config,
        format!(
            "services:\n  - name: web\n    vip: {VIP4}\n    port: 80\n    backends:\n      - address: 198.18.0.11\n      - address: 198.18.0.99\n"
        ),
    )
    .expect("write config");
    let agent = lab.start_agent(&config);
    let log = agent.log_text();
    assert!(
        log.lines().any(|l| l.contains("not resolved") && l.contains("198.18.0.99")),
        "the agent must report the unresolved backend:\n{log}"
    );
    let tally = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, 300, 2, Duration::from_secs(60));
    assert_eq!(tally.failures, 0, "requests failed: {:?}", tally.first_errors);
    assert_eq!(tally.by_backend.get("b1"), Some(&300), "all flows on the resolved backend: {:?}", tally.by_backend);

    // Traffic that is not for a VIP is left to the stack: the balancer still answers ping.
    lb_tests::netns::ns_sh(&lab.client, &["ping", "-c", "2", "-i", "0.2", "-W", "2", "198.18.0.1"]);
    let stats = Stats::read_pinned(&agent.pin_dir).expect("read the agent's pinned maps");
    assert!(stats.get(stat::PASS_NOT_VIP) >= 2, "pings to the balancer counted as pass_not_vip");
}

#[test]
fn invalid_configuration_is_refused_before_touching_the_interface() {
    let lab = Lab::new(1);
    let config = lab.dir.join("bad.yaml");
    std::fs::write(&config, "services:\n  - name: web\n    vip: 198.18.1.10\n    port: 80\n    backends: []\n").unwrap();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.balancer))
        .arg("--")
        .arg(lb_tests::lab::agent_bin())
        .args(["run", "--iface", "eth0", "--pin-dir"])
        .arg(lab.pin_dir())
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run lb-agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("{}:5:", config.display())), "error names file:line: {stderr}");
    let link = lb_tests::netns::ns_sh(&lab.balancer, &["ip", "link", "show", "eth0"]);
    assert!(!String::from_utf8_lossy(&link.stdout).contains("xdp"), "nothing attached");
    assert!(!lab.pin_dir().exists(), "nothing pinned");
}
