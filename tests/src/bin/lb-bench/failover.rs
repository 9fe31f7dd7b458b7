//! Failover: how long a balancer's death takes to be routed around, and what the
//! clients lose, with the real daemons (the scenarios of `lb_tests::failover`,
//! which tests/tests/ha.rs asserts on). Each run builds a fresh lab.

use std::{fmt::Write as _, time::Duration};

use lb_tests::failover::{ecmp_lab, ecmp_node_death, vrrp_pair, vrrp_takeover, Failover};

use crate::median;

struct Row {
    label: &'static str,
    runs: Vec<Failover>,
}

/// Runs each scenario `runs` times and returns the markdown section.
pub fn bench_failover(runs: usize) -> String {
    let mut rows = vec![
        Row { label: "ECMP (3 nodes, BIRD, BFD 100 ms x 3): a node dies hard", runs: Vec::new() },
        Row { label: "VRRP pair (keepalived, adverts every 200 ms): the master dies hard", runs: Vec::new() },
        Row { label: "VRRP pair: the master's agent is killed (track_script every 1 s, fall 2)", runs: Vec::new() },
    ];
    for run in 0..runs {
        eprintln!("lb-bench: failover run {} of {runs} ...", run + 1);
        let mut lab = ecmp_lab();
        rows[0].runs.push(ecmp_node_death(&mut lab, run % 3));
        drop(lab);
        let mut lab = vrrp_pair();
        rows[1].runs.push(vrrp_takeover(&mut lab, |lab| lab.kill_peer(0)));
        drop(lab);
        let mut lab = vrrp_pair();
        rows[2].runs.push(vrrp_takeover(&mut lab, |lab| lab.peers[0].agent.as_mut().expect("agent").kill()));
    }
    md(&rows, runs)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn md(rows: &[Row], runs: usize) -> String {
    let mut md = String::from(
        "| failure | traffic moved after, ms (median) | min | max | long-lived connections broken | short connections failed | slowest short request, ms |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let t: Vec<f64> = r.runs.iter().map(|f| ms(f.converged)).collect();
        let min = t.iter().copied().fold(f64::INFINITY, f64::min);
        let max = t.iter().copied().fold(0.0, f64::max);
        let broken: usize = r.runs.iter().map(|f| f.broken().len()).sum();
        let long: usize = r.runs.iter().map(|f| f.long.len()).sum();
        let failed: usize = r.runs.iter().map(|f| f.short_failed.len()).sum();
        let short: usize = r.runs.iter().map(|f| f.short_total).sum();
        let slowest = r.runs.iter().map(|f| ms(f.slowest)).fold(0.0, f64::max);
        let _ = writeln!(
            md,
            "| {} | **{:.0}** | {min:.0} | {max:.0} | **{broken}** of {long} | {failed} of {short} | {slowest:.0} |",
            r.label,
            median(t.clone()),
        );
    }
    let _ = writeln!(
        md,
        "\n{runs} run(s) per row, each in a fresh namespace lab (tests/src/ecmp.rs, tests/src/vrrp.rs) with the \
         configurations of deploy/bird/ and deploy/keepalived/, agents in native XDP mode. Under load: 30 \
         long-lived TCP connections exchanging every 100 ms and 3 clients opening short HTTP connections \
         back to back (1 s connect timeout). \"Traffic moved\" runs from the failure (for a hard death, \
         the node's link going down, then its processes killed) to the router's ECMP route losing the \
         node's next hop, or the backup holding the VIP. A short connection fails when its SYN went to \
         the dead node before that; a later lost SYN is retransmitted after 1 s (the slowest request). \
         Long-lived connections survive because every node computes the same Maglev tables: the flow \
         arriving at another node is scheduled to the same backend. See docs/ha.md.\n"
    );
    md
}
