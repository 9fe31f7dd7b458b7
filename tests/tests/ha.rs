//! High availability with the real daemons: three balancers behind an ECMP router
//! (BIRD, BGP + BFD, deploy/bird/) and an active/backup pair (keepalived VRRP,
//! deploy/keepalived/). Run as root, one test at a time (`--test-threads=1`);
//! each test builds its own namespaces and removes them on drop.
//!
//! The measured figures (convergence, takeover) are printed: `--nocapture`.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_tests::{
    ecmp::{pinned_tables, EcmpLab, VIP4, VIP4_B, VIP6},
    lab::ECHO_PORT,
    traffic::{requests_from, Load, LongLived, LongLivedResult, Record},
    vrrp::VrrpLab,
};

const PROBE: &str = "interval: 200ms\n        timeout: 150ms\n        rise: 2\n        fall: 2";

/// web and echo on VIP4 and VIP6 over all backends; `solo` on VIP4_B:8080 with
/// backend b3 only.
fn config(lab: &EcmpLab) -> String {
    let all = |v6: bool| -> String {
        lab.backends
            .iter()
            .map(|b| format!("      - address: {}\n", if v6 { IpAddr::V6(b.v6) } else { IpAddr::V4(b.v4) }))
            .collect()
    };
    let svc = |name: &str, vip: IpAddr, port: u16, kind: &str, backends: &str| {
        format!(
            "  - name: {name}\n    vip: {vip}\n    port: {port}\n    table_size: 251\n    probe:\n        kind: {kind}\n        {PROBE}\n    backends:\n{backends}"
        )
    };
    let b3 = format!("      - address: {}\n", lab.backends[2].v4);
    format!(
        "services:\n{}{}{}{}",
        svc("web", IpAddr::V4(VIP4), 80, "http", &all(false)),
        svc("echo", IpAddr::V4(VIP4), ECHO_PORT, "tcp", &all(false)),
        svc("web6", IpAddr::V6(VIP6), 80, "http", &all(true)),
        svc("solo", IpAddr::V4(VIP4_B), 8080, "tcp", &b3),
    )
}

/// A lab with every node running BIRD and its agent, and the router's route to
/// VIP4 spread over all of them.
fn ecmp_lab() -> EcmpLab {
    let mut lab = EcmpLab::new(3, 3);
    lab.start_servers();
    lab.start_http(2, 8080);
    let cfg = lab.write_config("lb.yaml", &config(&lab));
    for i in 0..lab.nodes.len() {
        lab.start_bird(i);
        lab.start_agent(i, &cfg);
    }
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6), IpAddr::V4(VIP4_B)] {
        lab.wait_nexthops(vip, 3, Duration::from_secs(30));
    }
    lab
}

fn broken(results: &[LongLivedResult]) -> Vec<&LongLivedResult> {
    results.iter().filter(|r| r.error.is_some()).collect()
}

/// The longest pause between two requests of one sequential load: how long the
/// slowest request took, retransmissions included.
fn longest_stall(records: &[Record]) -> Duration {
    records.windows(2).map(|w| w[1].0.duration_since(w[0].0)).max().unwrap_or_default()
}

fn failures(records: &[Record]) -> Vec<(Instant, String)> {
    records.iter().filter_map(|(t, r)| r.as_ref().err().map(|e| (*t, e.clone()))).collect()
}

#[test]
fn ecmp_spreads_over_identical_nodes_and_survives_a_node_death() {
    let mut lab = ecmp_lab();

    // Same file, same maps: every node schedules a flow to the same backend.
    let first = pinned_tables(&lab.nodes[0].pin_dir);
    assert!(first.contains("table"), "no service in lb1's maps:\n{first}");
    for n in &lab.nodes[1..] {
        assert_eq!(pinned_tables(&n.pin_dir), first, "{} wrote other tables than lb1", n.ns);
    }

    // Spread: many clients, each node carries a share.
    let t = requests_from(&lab.client, &lab.client_addrs, IpAddr::V4(VIP4), 80, 4);
    assert_eq!(t.failures, 0, "requests failed: {:?}", t.first_errors);
    let per_node: Vec<u64> = (0..3).map(|i| lab.stats(i).services.iter().map(|c| c.packets).sum()).collect();
    println!("ECMP spread, packets per node: {per_node:?}; answers per backend: {:?}", t.by_backend);
    assert!(per_node.iter().all(|&p| p > 0), "a node carried nothing: {per_node:?}");

    // Under load, lb1 dies hard.
    let conns: Vec<LongLived> = (0..30).map(|_| LongLived::open(&lab.client, IpAddr::V4(VIP4), ECHO_PORT)).collect();
    let loads: Vec<Load> = (0..3).map(|_| Load::start(&lab.client, IpAddr::V4(VIP4), 80)).collect();
    std::thread::sleep(Duration::from_secs(1));
    // Service 1 is echo: lb1 scheduled some of the long-lived connections.
    let through_dead = lab.stats(0).services[1].new_flows;
    assert!(through_dead > 0, "no long-lived connection went through lb1: the test would prove nothing");
    let died = Instant::now();
    lab.kill_node(0);
    let convergence = lab.wait_nexthops(IpAddr::V4(VIP4), 2, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(3));
    let per_load: Vec<Vec<Record>> = loads.into_iter().map(Load::finish).collect();
    let stall = per_load.iter().map(|r| longest_stall(r)).max().unwrap_or_default();
    let records: Vec<Record> = per_load.into_iter().flatten().collect();
    let results: Vec<LongLivedResult> = conns.into_iter().map(LongLived::finish).collect();

    let failed = failures(&records);
    let window = failed.last().map(|(t, _)| t.saturating_duration_since(died));
    println!(
        "ECMP node death (BFD 100 ms x 3): router converged in {} ms; {} of {} short connections failed, \
         the last one started {:?} after the death; slowest request {} ms (a SYN lost to the dead node is \
         retransmitted after 1 s); long-lived: {} of {} broken ({} had gone through the dead node)",
        convergence.as_millis(),
        failed.len(),
        records.len(),
        window,
        stall.as_millis(),
        broken(&results).len(),
        results.len(),
        through_dead,
    );
    assert!(broken(&results).is_empty(), "long-lived connections broke: {:?}", broken(&results));
    assert!(convergence < Duration::from_millis(1500), "convergence took {convergence:?} (BFD should take ~300 ms)");
    // Short connections may fail only if they started before the router converged
    // (a SYN sent to the dead node times out after 1 s).
    for (t, e) in &failed {
        let at = t.saturating_duration_since(died);
        assert!(at < convergence + Duration::from_millis(200), "a short connection failed {at:?} after the death, past convergence: {e}");
    }
    assert!(records.len() > 100, "too little load to judge: {} requests", records.len());
}

#[test]
fn ecmp_withdraws_a_vip_without_backends_and_survives_rolling_restarts() {
    let mut lab = ecmp_lab();
    let (web, solo) = (IpAddr::V4(VIP4), IpAddr::V4(VIP4_B));

    // solo's only backend goes down: every node withdraws VIP4_B, keeps VIP4.
    lab.stop_server(2, 8080);
    lab.wait_nexthops(solo, 0, Duration::from_secs(10));
    for i in 0..3 {
        let a = lab.announced(i);
        assert!(!a.contains(&solo) && a.contains(&web), "lb{} announces {a:?}", i + 1);
    }
    lab.start_http(2, 8080);
    let back = lab.wait_nexthops(solo, 3, Duration::from_secs(10));
    println!("solo's backend back: announced again by all nodes within {} ms", back.as_millis());

    // A reload that adds a VIP: every node announces it once the maps have it.
    let more: IpAddr = "198.18.1.30".parse().unwrap();
    let extra: String = lab.backends.iter().map(|b| format!("      - address: {}\n", b.v4)).collect();
    let yaml = format!("{}  - name: more\n    vip: {more}\n    port: 80\n    table_size: 251\n    backends:\n{extra}", config(&lab));
    let cfg = lab.write_config("lb.yaml", &yaml);
    let added = lab.wait_nexthops(more, 3, Duration::from_secs(10));
    println!("reload adding {more}: announced by all nodes within {} ms of the write", added.as_millis());

    // Rolling restart: each agent stops cleanly (withdraw, wait, detach) and starts
    // again, one after another, under load.
    let conns: Vec<LongLived> = (0..30).map(|_| LongLived::open(&lab.client, web, ECHO_PORT)).collect();
    let loads: Vec<Load> = (0..3).map(|_| Load::start(&lab.client, web, 80)).collect();
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(500));
        let stopped = Instant::now();
        let (status, log) = lab.nodes[i].agent.as_mut().expect("agent").stop();
        assert!(status.success(), "lb{}'s agent failed to stop:\n{log}", i + 1);
        assert!(log.contains("VIP withdrawn"), "lb{} did not withdraw:\n{log}", i + 1);
        let took = stopped.elapsed();
        assert!(took >= Duration::from_secs(1), "lb{} detached without waiting for the routers ({took:?})", i + 1);
        assert_eq!(lab.nexthops(web), 2, "lb{} still in the router's route after its clean stop", i + 1);
        lab.start_agent(i, &cfg);
        let again = lab.wait_nexthops(web, 3, Duration::from_secs(15));
        println!("lb{}: clean stop took {} ms, announced again {} ms after restart", i + 1, took.as_millis(), again.as_millis());
    }
    std::thread::sleep(Duration::from_secs(1));
    let per_load: Vec<Vec<Record>> = loads.into_iter().map(Load::finish).collect();
    let stall = per_load.iter().map(|r| longest_stall(r)).max().unwrap_or_default();
    let records: Vec<Record> = per_load.into_iter().flatten().collect();
    let results: Vec<LongLivedResult> = conns.into_iter().map(LongLived::finish).collect();
    let failed = failures(&records);
    println!(
        "rolling restart: {} short connections, {} failed, slowest {} ms; long-lived {} broken",
        records.len(),
        failed.len(),
        stall.as_millis(),
        broken(&results).len()
    );
    assert!(failed.is_empty(), "short connections failed during the rolling restart: {:?}", &failed[..failed.len().min(5)]);
    assert!(broken(&results).is_empty(), "long-lived connections broke: {:?}", broken(&results));
}

/// Two balancers with keepalived, lb1 the master, and traffic flowing.
fn vrrp_pair() -> VrrpLab {
    let mut lab = VrrpLab::new(3);
    lab.start_servers();
    let backends: String = lab.backends.iter().map(|b| format!("      - address: {}\n", b.v4)).collect();
    let svc = |name: &str, port: u16, kind: &str| {
        format!("  - name: {name}\n    vip: {VIP4}\n    port: {port}\n    table_size: 251\n    probe:\n        kind: {kind}\n        {PROBE}\n    backends:\n{backends}")
    };
    let cfg = lab.write_config("lb.yaml", &format!("services:\n{}{}", svc("web", 80, "http"), svc("echo", ECHO_PORT, "tcp")));
    for i in 0..2 {
        lab.start_agent(i, &cfg);
    }
    lab.start_keepalived(0);
    lab.start_keepalived(1);
    lab.wait_master(0, Duration::from_secs(15));
    let t = requests_from(&lab.client, &[IpAddr::V4(lb_tests::lab::CLIENT4)], IpAddr::V4(VIP4), 80, 20);
    assert_eq!(t.failures, 0, "requests through the master failed: {:?}", t.first_errors);
    lab
}

/// Under load, `fail` takes lb1 out; lb2 must take the VIP with no long-lived
/// connection broken. Returns the takeover time.
fn vrrp_takeover(what: &str, fail: impl FnOnce(&mut VrrpLab)) -> Duration {
    let mut lab = vrrp_pair();
    let conns: Vec<LongLived> = (0..30).map(|_| LongLived::open(&lab.client, IpAddr::V4(VIP4), ECHO_PORT)).collect();
    let loads: Vec<Load> = (0..2).map(|_| Load::start(&lab.client, IpAddr::V4(VIP4), 80)).collect();
    std::thread::sleep(Duration::from_secs(1));
    let failed_at = Instant::now();
    fail(&mut lab);
    let takeover = lab.wait_master(1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(3));
    let per_load: Vec<Vec<Record>> = loads.into_iter().map(Load::finish).collect();
    let stall = per_load.iter().map(|r| longest_stall(r)).max().unwrap_or_default();
    let records: Vec<Record> = per_load.into_iter().flatten().collect();
    let results: Vec<LongLivedResult> = conns.into_iter().map(LongLived::finish).collect();
    let failed = failures(&records);
    println!(
        "VRRP ({what}): backup took the VIP in {} ms; {} of {} short connections failed, slowest request {} ms; \
         long-lived: {} of {} broken",
        takeover.as_millis(),
        failed.len(),
        records.len(),
        stall.as_millis(),
        broken(&results).len(),
        results.len()
    );
    assert!(broken(&results).is_empty(), "long-lived connections broke: {:?}", broken(&results));
    for (t, e) in &failed {
        let at = t.saturating_duration_since(failed_at);
        assert!(at < takeover + Duration::from_millis(200), "a short connection failed {at:?} after the failure, past the takeover: {e}");
    }
    let after = records.iter().filter(|(t, r)| *t > failed_at + takeover + Duration::from_millis(500) && r.is_ok()).count();
    assert!(after > 50, "too few requests served by the new master: {after}");
    takeover
}

#[test]
fn vrrp_backup_takes_over_when_the_master_dies() {
    let takeover = vrrp_takeover("master dies hard", |lab| lab.kill_peer(0));
    assert!(takeover < Duration::from_secs(3), "takeover took {takeover:?}");
}

#[test]
fn vrrp_master_gives_up_when_its_agent_dies() {
    // The program keeps forwarding from its pins, but the agent is gone: the
    // track_script fails twice (1 s apart) and the master steps down.
    let takeover = vrrp_takeover("master's agent killed", |lab| lab.peers[0].agent.as_mut().expect("agent").kill());
    assert!(takeover < Duration::from_secs(6), "takeover took {takeover:?}");
}
