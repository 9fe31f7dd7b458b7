//! Failover scenarios on the HA labs, shared by tests/tests/ha.rs (which asserts)
//! and the benchmark (which reports): a balancer fails under load (30 long-lived
//! connections plus sequential short ones) and the time until the network has
//! moved to the others is measured, with what the clients saw.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::{
    ecmp::{EcmpLab, VIP4, VIP4_B, VIP6},
    lab::{CLIENT4, CLIENT6, ECHO_PORT},
    traffic::{requests_from, Load, LongLived, LongLivedResult, Record},
    vrrp::VrrpLab,
};

pub const PROBE: &str = "interval: 200ms\n        timeout: 150ms\n        rise: 2\n        fall: 2";

/// What one failover cost.
#[derive(Debug, Clone)]
pub struct Failover {
    /// From the failure to the network using the others only (ECMP: the router's
    /// route lost the next hop; VRRP: the backup holds the VIP).
    pub converged: Duration,
    /// Short connections during the run, and those that failed.
    pub short_total: usize,
    pub short_failed: Vec<(Instant, String)>,
    /// The longest a short request took (a SYN lost to the dead node is
    /// retransmitted after 1 s).
    pub slowest: Duration,
    pub long: Vec<LongLivedResult>,
    /// When the failure was caused.
    pub failed_at: Instant,
    /// Short requests answered after the network converged (+500 ms).
    pub served_after: usize,
}

impl Failover {
    pub fn broken(&self) -> Vec<&LongLivedResult> {
        self.long.iter().filter(|r| r.error.is_some()).collect()
    }
}

fn service(name: &str, vip: IpAddr, port: u16, kind: &str, backends: &str) -> String {
    format!(
        "  - name: {name}\n    vip: {vip}\n    port: {port}\n    table_size: 251\n    probe:\n        kind: {kind}\n        {PROBE}\n    backends:\n{backends}"
    )
}

/// The ECMP lab's file: web and echo on VIP4, web6 on VIP6, over all backends;
/// `solo` on VIP4_B:8080 with backend b3 only.
pub fn ecmp_config(lab: &EcmpLab) -> String {
    let all = |v6: bool| -> String {
        lab.backends
            .iter()
            .map(|b| format!("      - address: {}\n", if v6 { IpAddr::V6(b.v6) } else { IpAddr::V4(b.v4) }))
            .collect()
    };
    let b3 = format!("      - address: {}\n", lab.backends[2].v4);
    format!(
        "services:\n{}{}{}{}",
        service("web", IpAddr::V4(VIP4), 80, "http", &all(false)),
        service("echo", IpAddr::V4(VIP4), ECHO_PORT, "tcp", &all(false)),
        service("web6", IpAddr::V6(VIP6), 80, "http", &all(true)),
        service("solo", IpAddr::V4(VIP4_B), 8080, "tcp", &b3),
    )
}

/// Three nodes running BIRD and the agent, the router's routes to every VIP over
/// all of them.
pub fn ecmp_lab() -> EcmpLab {
    let mut lab = EcmpLab::new(3, 3);
    lab.start_servers();
    lab.start_http(2, 8080);
    let cfg = lab.write_config("lb.yaml", &ecmp_config(&lab));
    for i in 0..lab.nodes.len() {
        lab.start_bird(i);
        lab.start_agent(i, &cfg);
    }
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6), IpAddr::V4(VIP4_B)] {
        lab.wait_nexthops(vip, 3, Duration::from_secs(30));
    }
    lab
}

/// Two balancers with keepalived, lb1 the master, traffic flowing through it.
pub fn vrrp_pair() -> VrrpLab {
    let mut lab = VrrpLab::new(3);
    lab.start_servers();
    let backends: String = lab.backends.iter().map(|b| format!("      - address: {}\n", b.v4)).collect();
    let backends6: String = lab.backends.iter().map(|b| format!("      - address: {}\n", b.v6)).collect();
    let yaml = format!(
        "services:\n{}{}{}",
        service("web", IpAddr::V4(VIP4), 80, "http", &backends),
        service("echo", IpAddr::V4(VIP4), ECHO_PORT, "tcp", &backends),
        service("web6", IpAddr::V6(VIP6), 80, "http", &backends6),
    );
    let cfg = lab.write_config("lb.yaml", &yaml);
    for i in 0..2 {
        lab.start_agent(i, &cfg);
    }
    lab.start_keepalived(0);
    lab.start_keepalived(1);
    lab.wait_master(0, Duration::from_secs(15));
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        let src = if vip.is_ipv4() { IpAddr::V4(CLIENT4) } else { IpAddr::V6(CLIENT6) };
        let t = requests_from(&lab.client, &[src], vip, 80, 20);
        assert_eq!(t.failures, 0, "requests to {vip} through the master failed: {:?}", t.first_errors);
    }
    lab
}

/// The longest pause between two requests of one sequential load.
fn longest_stall(records: &[Record]) -> Duration {
    records.windows(2).map(|w| w[1].0.duration_since(w[0].0)).max().unwrap_or_default()
}

/// Under load from `client`, runs `fail`, then `converged` (which returns once
/// the network has moved), keeps the load 3 s more and collects what the clients
/// saw. The convergence time runs from the start of `fail`.
pub fn under_load<L>(lab: &mut L, client: &str, fail: impl FnOnce(&mut L), converged: impl FnOnce(&L)) -> Failover {
    let conns: Vec<LongLived> = (0..30).map(|_| LongLived::open(client, IpAddr::V4(VIP4), ECHO_PORT)).collect();
    let loads: Vec<Load> = (0..3).map(|_| Load::start(client, IpAddr::V4(VIP4), 80)).collect();
    std::thread::sleep(Duration::from_secs(1));
    let failed_at = Instant::now();
    fail(lab);
    converged(lab);
    let converged = failed_at.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let per_load: Vec<Vec<Record>> = loads.into_iter().map(Load::finish).collect();
    let slowest = per_load.iter().map(|r| longest_stall(r)).max().unwrap_or_default();
    let records: Vec<Record> = per_load.into_iter().flatten().collect();
    let long: Vec<LongLivedResult> = conns.into_iter().map(LongLived::finish).collect();
    let short_failed = records.iter().filter_map(|(t, r)| r.as_ref().err().map(|e| (*t, e.clone()))).collect();
    let settled = failed_at + converged + Duration::from_millis(500);
    let served_after = records.iter().filter(|(t, r)| *t > settled && r.is_ok()).count();
    Failover { converged, short_total: records.len(), short_failed, slowest, long, failed_at, served_after }
}

/// ECMP: node `i` dies hard (its link down first, then agent and BIRD killed);
/// converged when the router's route to VIP4 has lost the node's next hop.
pub fn ecmp_node_death(lab: &mut EcmpLab, i: usize) -> Failover {
    let client = lab.client.clone();
    let before = lab.nexthops(IpAddr::V4(VIP4));
    under_load(lab, &client, |lab| lab.kill_node(i), |lab| {
        lab.wait_nexthops(IpAddr::V4(VIP4), before - 1, Duration::from_secs(10));
    })
}

/// VRRP: `fail` takes lb1 out; converged when lb2 alone holds the VIP.
pub fn vrrp_takeover(lab: &mut VrrpLab, fail: impl FnOnce(&mut VrrpLab)) -> Failover {
    let client = lab.client.clone();
    under_load(lab, &client, fail, |lab| {
        lab.wait_master(1, Duration::from_secs(10));
    })
}
