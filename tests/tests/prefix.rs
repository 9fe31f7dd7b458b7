//! Prefix services in the namespace lab: `vip: 198.18.50.0/24` with the
//! backends accepting the prefix through a local route on `lo`, and the
//! destination schedulers' properties with real connections: `dh` keeps each
//! destination address on one backend, `lblc` too until that backend is
//! overloaded (then it moves), `lblcr` adds a backend to the destination's set
//! and keeps the old one.
//!
//! Needs root: `cargo test -p lb-tests --test prefix -- --test-threads=1`.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use lb_tests::{
    lab::{Lab, BALANCER4, ECHO_PORT},
    netns::ns_sh,
    traffic::{requests, LongLived, Proto},
};

const PREFIX: &str = "198.18.50.0/24";

/// A lab of three backends whose client routes `PREFIX` via the balancer and
/// whose backends take it as local (`ip route add local PREFIX dev lo`, the
/// real-server setup for prefix services), with the agent running `scheduler`
/// for HTTP (80) and echo (`ECHO_PORT`) on `PREFIX` over weights 2.
fn lab(scheduler: &str) -> (Lab, lb_tests::lab::Agent) {
    let mut lab = Lab::new(3);
    ns_sh(&lab.client, &["ip", "route", "add", PREFIX, "via", &BALANCER4.to_string()]);
    for b in &lab.backends {
        ns_sh(&b.ns, &["ip", "route", "add", "local", PREFIX, "dev", "lo"]);
    }
    lab.start_servers();
    let backends: String = lab.backends.iter().map(|b| format!("      - {{address: {}, weight: 2}}\n", b.v4)).collect();
    let svc = |name: &str, port: u16| {
        format!("  - name: {name}\n    vip: {PREFIX}\n    port: {port}\n    scheduler: {scheduler}\n    backends:\n{backends}")
    };
    let cfg = lab.write_config("lb.yaml", &format!("services:\n{}{}", svc("cache", 80), svc("cache-echo", ECHO_PORT)));
    let agent = lab.start_agent(&cfg);
    (lab, agent)
}

/// `n` HTTP requests one after the other to `dst`: the backends that answered.
fn answers(lab: &Lab, dst: &str, n: u64) -> BTreeSet<String> {
    let dst: IpAddr = dst.parse().unwrap();
    let t = requests(&lab.client, Proto::Http, dst, 80, n, 1, Duration::from_secs(10));
    assert_eq!(t.failures, 0, "requests to {dst}: {:?}", t.first_errors);
    t.by_backend.into_keys().collect()
}

fn open(lab: &Lab, dst: &str) -> LongLived {
    LongLived::open(&lab.client, dst.parse().unwrap(), ECHO_PORT)
}

#[test]
fn dh_keeps_each_destination_on_one_backend() {
    let (lab, _agent) = lab("dh");
    let mut used = BTreeSet::new();
    for host in 1..=16 {
        let dst = format!("198.18.50.{host}");
        let got = answers(&lab, &dst, 8);
        assert_eq!(got.len(), 1, "dh spread {dst} over {got:?}");
        used.extend(got);
    }
    assert!(used.len() >= 2, "16 destinations all went to {used:?}");
    // Outside the prefix nothing is balanced (the client's route goes to the
    // balancer, which passes it up to a stack that does not forward).
    let t = requests(&lab.client, Proto::Http, "198.18.51.1".parse().unwrap(), 80, 1, 1, Duration::from_secs(2));
    assert_eq!(t.failures, 1, "a destination outside the prefix was answered");
}

#[test]
fn lblc_keeps_a_destination_until_its_backend_is_overloaded() {
    let (lab, _agent) = lab("lblc");
    let dst = "198.18.50.7";
    // HTTP connections come and go: the destination stays on one backend.
    assert_eq!(answers(&lab, dst, 10).len(), 1);
    // Long-lived ones: up to the weight (2) active, the backend keeps the
    // destination; the one that finds 3 active there goes to an idle backend,
    // which becomes the destination's backend.
    let held: Vec<LongLived> = (0..5).map(|_| open(&lab, dst)).collect();
    let names: Vec<&str> = held.iter().map(|c| c.backend.as_str()).collect();
    eprintln!("lblc, one destination, 5 long-lived connections: {names:?}");
    assert!(names[0] == names[1] && names[1] == names[2], "lblc moved {dst} before it was overloaded: {names:?}");
    assert_ne!(names[3], names[0], "lblc kept {dst} on an overloaded backend: {names:?}");
    assert_eq!(names[4], names[3], "lblc did not keep {dst} on its new backend: {names:?}");
    // Another destination is scheduled on its own.
    assert_eq!(answers(&lab, "198.18.50.8", 5).len(), 1);
    for c in held {
        let r = c.finish();
        assert!(r.error.is_none(), "{:?}", r.error);
    }
}

#[test]
fn lblcr_adds_a_backend_and_keeps_the_first() {
    let (lab, _agent) = lab("lblcr");
    let dst = "198.18.50.7";
    let mut held: Vec<LongLived> = (0..5).map(|_| open(&lab, dst)).collect();
    let names: Vec<String> = held.iter().map(|c| c.backend.clone()).collect();
    eprintln!("lblcr, one destination, 5 long-lived connections: {names:?}");
    assert!(names[0] == names[1] && names[1] == names[2], "lblcr moved {dst} before it was overloaded: {names:?}");
    assert_ne!(names[3], names[0], "lblcr did not add a backend for {dst}: {names:?}");
    assert_eq!(names[4], names[3], "the set's least loaded member is the new one: {names:?}");
    // The first backend's connections close: it is the set's least loaded
    // member again and gets the destination back (lblc would have forgotten it).
    let first = names[0].clone();
    for c in held.drain(..3) {
        assert!(c.finish().error.is_none());
    }
    std::thread::sleep(Duration::from_millis(200));
    let again = open(&lab, dst);
    assert_eq!(again.backend, first, "lblcr forgot {first} from {dst}'s set");
    held.push(again);
    for c in held {
        assert!(c.finish().error.is_none());
    }
}

fn new_flows(lab: &Lab, service: &str) -> u64 {
    let out = std::process::Command::new(lb_tests::lab::agent_bin())
        .args(["status", "--json", "--socket"])
        .arg(lab.control_socket())
        .output()
        .expect("run lb-agent status");
    assert!(out.status.success(), "lb-agent status: {}", String::from_utf8_lossy(&out.stderr));
    let status: lb_agent::status::Status = serde_json::from_slice(&out.stdout).expect("status JSON");
    status.services.iter().find(|s| s.name == service).unwrap_or_else(|| panic!("no service {service}")).new_flows
}

/// A restarted agent finds the prefix services in the pinned `PREFIX_SERVICES`
/// and keeps their ids (counters carry on), backend ids and generations (the
/// `LOCALITY` entries stay valid); connections held across the restart carry on
/// (`lb_prefix` stays in the pinned `RARE_PROGS` while no agent runs).
#[test]
fn a_restarted_agent_adopts_prefix_services() {
    let (lab, mut agent) = lab("lblc");
    let dst = "198.18.50.7";
    let held: Vec<LongLived> = (0..2).map(|_| open(&lab, dst)).collect();
    let first = held[0].backend.clone();
    assert!(held.iter().all(|c| c.backend == first), "lblc spread {dst} before it was overloaded");
    std::thread::sleep(Duration::from_millis(1500));
    let before = new_flows(&lab, "cache-echo");
    assert!(before >= 2, "cache-echo counted {before} new flows");
    agent.kill();
    let agent = lab.start_agent(&lab.dir.join("lb.yaml"));
    let log = agent.log_text();
    assert!(log.contains("maps reused, connection table kept"), "the new agent adopts the maps:\n{log}");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(new_flows(&lab, "cache-echo") >= before, "the prefix service's counters restarted: a new service id");
    for c in held {
        let r = c.finish();
        assert!(r.error.is_none(), "connection to {} broke across the restart: {:?}", r.backend, r.error);
        assert!(r.exchanges > 20, "connection to {} barely ran: {} exchanges", r.backend, r.exchanges);
    }
    // Two active of weight 2: not overloaded, so the destination stays.
    let again = open(&lab, dst);
    assert_eq!(again.backend, first, "{dst} lost its backend across the restart");
    assert!(again.finish().error.is_none());
}
