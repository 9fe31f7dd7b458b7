//! High availability with the real daemons: three balancers behind an ECMP router
//! (BIRD, BGP + BFD, deploy/bird/) and an active/backup pair (keepalived VRRP,
//! deploy/keepalived/). Run as root, one test at a time (`--test-threads=1`);
//! each test builds its own namespaces and removes them on drop. The scenarios
//! live in `lb_tests::failover` (the benchmark runs them too).
//!
//! The measured figures (convergence, takeover) are printed: `--nocapture`.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_tests::{
    ecmp::{pinned_tables, VIP4, VIP4_B, VIP6},
    failover::{ecmp_config, ecmp_lab, ecmp_node_death, vrrp_pair, vrrp_takeover, Failover},
    lab::ECHO_PORT,
    traffic::{requests, requests_from, Load, LongLived, LongLivedResult, Proto, Record},
};

fn broken(results: &[LongLivedResult]) -> Vec<&LongLivedResult> {
    results.iter().filter(|r| r.error.is_some()).collect()
}

/// The longest pause between two requests of one sequential load.
fn longest_stall(records: &[Record]) -> Duration {
    records.windows(2).map(|w| w[1].0.duration_since(w[0].0)).max().unwrap_or_default()
}

/// Long-lived connections all alive; short ones failed only if they started
/// before the network converged (+200 ms); the survivors served traffic after.
fn assert_no_loss(what: &str, f: &Failover) {
    assert!(f.broken().is_empty(), "{what}: long-lived connections broke: {:?}", f.broken());
    for (t, e) in &f.short_failed {
        let at = t.saturating_duration_since(f.failed_at);
        assert!(
            at < f.converged + Duration::from_millis(200),
            "{what}: a short connection failed {at:?} after the failure, past convergence ({:?}): {e}",
            f.converged
        );
    }
    assert!(f.served_after > 50, "{what}: too few requests served after convergence: {}", f.served_after);
}

fn report(what: &str, f: &Failover) -> String {
    format!(
        "{what}: converged in {} ms; {} of {} short connections failed, slowest request {} ms; long-lived: {} of {} broken",
        f.converged.as_millis(),
        f.short_failed.len(),
        f.short_total,
        f.slowest.as_millis(),
        f.broken().len(),
        f.long.len()
    )
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

    // IPv6 goes through the ECMP group too.
    let t = requests(&lab.client, Proto::Http, IpAddr::V6(VIP6), 80, 30, 3, Duration::from_secs(20));
    assert_eq!(t.failures, 0, "requests to {VIP6} failed: {:?}", t.first_errors);

    // Spread: many clients, each node carries a share.
    let t = requests_from(&lab.client, &lab.client_addrs, IpAddr::V4(VIP4), 80, 4);
    assert_eq!(t.failures, 0, "requests failed: {:?}", t.first_errors);
    let per_node: Vec<u64> = (0..3).map(|i| lab.stats(i).services.iter().map(|c| c.packets).sum()).collect();
    println!("ECMP spread, packets per node: {per_node:?}; answers per backend: {:?}", t.by_backend);
    assert!(per_node.iter().all(|&p| p > 0), "a node carried nothing: {per_node:?}");

    // Under load, lb1 dies hard. Service 1 is echo: lb1 must have scheduled some
    // of the long-lived connections, or the test would prove nothing.
    let f = ecmp_node_death(&mut lab, 0);
    // (Its maps stay pinned after the kill.)
    let through_dead = lab.stats(0).services[1].new_flows;
    println!("{} ({through_dead} long-lived had gone through the dead node)", report("ECMP node death (BFD 100 ms x 3)", &f));
    assert!(through_dead > 0, "no long-lived connection went through lb1: the test would prove nothing");
    assert_no_loss("ECMP node death", &f);
    assert!(f.converged < Duration::from_millis(1500), "convergence took {:?} (BFD should take ~300 ms)", f.converged);
}

#[test]
fn ecmp_withdraws_a_vip_without_backends_and_survives_a_crash_and_rolling_restarts() {
    let mut lab = ecmp_lab();
    let (web, solo) = (IpAddr::V4(VIP4), IpAddr::V4(VIP4_B));

    // solo's only backend goes down: every node withdraws VIP4_B, keeps VIP4.
    lab.stop_server(2, 8080);
    lab.wait_nexthops(solo, 0, Duration::from_secs(10));
    for i in 0..3 {
        let a = lab.announced(i);
        assert!(!a.contains(&solo) && a.contains(&web), "lb{} announces {a:?}", i + 1);
    }
    let status = lab.status_text(0);
    let line = status.lines().find(|l| l.starts_with("announcing")).unwrap_or_default();
    assert_eq!(line, format!("announcing in routing table 100: {web}, {VIP6}"), "{status}");
    lab.start_http(2, 8080);
    let back = lab.wait_nexthops(solo, 3, Duration::from_secs(10));
    println!("solo's backend back: announced again by all nodes within {} ms", back.as_millis());

    // A reload that adds a VIP: every node announces it once the maps have it.
    let more: IpAddr = "198.18.1.30".parse().unwrap();
    let extra: String = lab.backends.iter().map(|b| format!("      - address: {}\n", b.v4)).collect();
    let yaml = format!("{}  - name: more\n    vip: {more}\n    port: 80\n    table_size: 251\n    backends:\n{extra}", ecmp_config(&lab));
    let cfg = lab.write_config("lb.yaml", &yaml);
    let added = lab.wait_nexthops(more, 3, Duration::from_secs(10));
    println!("reload adding {more}: announced by all nodes within {} ms of the write", added.as_millis());

    // Under load: a crash and an adoption, then a rolling restart: each agent stops
    // cleanly (withdraw, wait, detach) and starts again, one after another.
    let conns: Vec<LongLived> = (0..30).map(|_| LongLived::open(&lab.client, web, ECHO_PORT)).collect();
    let loads: Vec<Load> = (0..3).map(|_| Load::start(&lab.client, web, 80)).collect();
    // First a crash: the program keeps forwarding from its pins, so the routes
    // stay; the next agent adopts both.
    lab.nodes[0].agent.as_mut().expect("agent").kill();
    std::thread::sleep(Duration::from_secs(1));
    assert!(lab.announced(0).contains(&web), "lb1's routes went with its agent");
    assert_eq!(lab.nexthops(web), 3, "lb1 withdrawn after its agent crashed");
    lab.start_agent(0, &cfg);
    assert!(lab.nodes[0].agent.as_ref().unwrap().log_text().contains("replaced the program"), "lb1's new agent did not adopt");
    assert_eq!(lab.nexthops(web), 3);
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
    let failed: Vec<&String> = records.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
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

#[test]
fn vrrp_backup_takes_over_when_the_master_dies() {
    let mut lab = vrrp_pair();
    let f = vrrp_takeover(&mut lab, |lab| lab.kill_peer(0));
    println!("{}", report("VRRP, master dies hard: backup holds the VIP", &f));
    assert_no_loss("VRRP master death", &f);
    assert!(f.converged < Duration::from_secs(3), "takeover took {:?}", f.converged);
}

#[test]
fn vrrp_master_gives_up_when_its_agent_dies() {
    // The program keeps forwarding from its pins, but the agent is gone: the
    // track_script fails twice (1 s apart) and the master steps down.
    let mut lab = vrrp_pair();
    let f = vrrp_takeover(&mut lab, |lab| lab.peers[0].agent.as_mut().expect("agent").kill());
    println!("{}", report("VRRP, master's agent killed: backup holds the VIP", &f));
    assert_no_loss("VRRP agent death", &f);
    assert!(f.converged < Duration::from_secs(6), "takeover took {:?}", f.converged);
}
