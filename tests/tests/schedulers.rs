//! The schedulers in the namespace lab, with real HTTP connections and
//! long-lived echo connections, each asserting its scheduler's property.
//!
//! Needs root: `cargo test -p lb-tests --test schedulers -- --test-threads=1`.

use std::{net::IpAddr, process::Command, time::Duration};

use lb_agent::status::Status;
use lb_tests::{
    lab::{agent_bin, Lab, ECHO_PORT, VIP4},
    traffic::{requests, LongLived, Proto},
};

fn status(lab: &Lab) -> Status {
    let out = Command::new(agent_bin())
        .args(["status", "--json", "--socket"])
        .arg(lab.control_socket())
        .output()
        .expect("run lb-agent status");
    assert!(out.status.success(), "lb-agent status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// web (HTTP, port 80) and echo (`ECHO_PORT`) with `scheduler` over the lab's
/// backends with `weights`.
fn config(lab: &Lab, scheduler: &str, weights: &[u32]) -> std::path::PathBuf {
    let backends: String =
        lab.backends.iter().zip(weights).map(|(b, w)| format!("      - {{address: {}, weight: {w}}}\n", b.v4)).collect();
    let svc = |name: &str, port: u16| {
        format!("  - name: {name}\n    vip: {VIP4}\n    port: {port}\n    scheduler: {scheduler}\n    backends:\n{backends}")
    };
    lab.write_config("lb.yaml", &format!("services:\n{}{}", svc("web", 80), svc("echo", ECHO_PORT)))
}

/// One HTTP request at a time, `n` of them: the backend names in order.
fn sequence(lab: &Lab, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let t = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, 1, 1, Duration::from_secs(5));
            assert_eq!(t.failures, 0, "{:?}", t.first_errors);
            t.by_backend.into_keys().next().expect("one answer")
        })
        .collect()
}

#[test]
fn wrr_gives_each_backend_its_weight_in_smooth_order() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    let _agent = lab.start_agent(&config(&lab, "wrr", &[1, 2, 3]));
    let seq = sequence(&lab, 600);
    let count = |name: &str| seq.iter().filter(|s| *s == name).count();
    let counts = [count("b1"), count("b2"), count("b3")];
    let run = seq.chunk_by(|a, b| a == b).map(|r| r.len()).max().unwrap_or(0);
    eprintln!("wrr 1,2,3 over 600 connections: {counts:?}, longest run {run}");
    // One shared cursor: exact shares, and smooth wrr over 1, 2, 3 repeats a
    // backend at most twice in a row.
    assert_eq!(counts, [100, 200, 300]);
    assert!(run <= 2, "run of {run}: {:?}", &seq[..24]);
}

#[test]
fn lc_sends_nothing_to_a_loaded_backend_until_the_others_catch_up() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    // Weights 1, 0, 0: all 60 long-lived connections on b1 ...
    let cfg = config(&lab, "lc", &[1, 0, 0]);
    let agent = lab.start_agent(&cfg);
    let vip = IpAddr::V4(VIP4);
    let held: Vec<LongLived> = (0..60).map(|_| LongLived::open(&lab.client, vip, ECHO_PORT)).collect();
    assert!(held.iter().all(|c| c.backend == "b1"));
    // ... then all three take new flows.
    let reloads = agent.count_log("reload applied");
    config(&lab, "lc", &[1, 1, 1]);
    agent.wait_log("reload applied", reloads, Duration::from_secs(10));
    // 50 more long-lived connections: b1 (60 active) gets none; b2 and b3 share.
    let more: Vec<LongLived> = (0..50).map(|_| LongLived::open(&lab.client, vip, ECHO_PORT)).collect();
    let to = |name: &str| more.iter().filter(|c| c.backend == name).count();
    eprintln!("lc: b1 {} b2 {} b3 {}", to("b1"), to("b2"), to("b3"));
    assert_eq!(to("b1"), 0);
    assert!(to("b2").abs_diff(25) <= 1, "b2 {} b3 {}", to("b2"), to("b3"));
    // 20 more: the others are at 25, b1 still at 60: none for b1 yet.
    let extra: Vec<LongLived> = (0..20).map(|_| LongLived::open(&lab.client, vip, ECHO_PORT)).collect();
    assert!(extra.iter().all(|c| c.backend != "b1"));
    let st = status(&lab);
    let echo = st.services.iter().find(|s| s.name == "echo").expect("echo");
    let active: Vec<u32> = echo.backends.iter().map(|b| b.active_conns).collect();
    eprintln!("lc: ActiveConn {active:?}");
    assert_eq!(active.iter().sum::<u32>(), 130, "{active:?}");
    for c in held.into_iter().chain(more).chain(extra) {
        assert!(c.finish().error.is_none());
    }
}

#[test]
fn wlc_balances_active_connections_per_weight() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    let _agent = lab.start_agent(&config(&lab, "wlc", &[1, 2, 3]));
    let vip = IpAddr::V4(VIP4);
    let conns: Vec<LongLived> = (0..120).map(|_| LongLived::open(&lab.client, vip, ECHO_PORT)).collect();
    let to = |name: &str| conns.iter().filter(|c| c.backend == name).count();
    let counts = [to("b1"), to("b2"), to("b3")];
    eprintln!("wlc 1,2,3 over 120 long-lived connections: {counts:?}");
    // active / weight within one connection per weight unit: 20, 40, 60.
    for (i, c) in counts.iter().enumerate() {
        assert!(c.abs_diff(20 * (i + 1)) <= i + 1, "{counts:?}");
    }
    for c in conns {
        assert!(c.finish().error.is_none());
    }
}

#[test]
fn sh_puts_the_clients_of_one_prefix_on_one_backend() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    let backends: String = lab.backends.iter().map(|b| format!("      - address: {}\n", b.v4)).collect();
    let write = |prefix: u8| {
        lab.write_config(
            "lb.yaml",
            &format!(
                "services:\n  - name: web\n    vip: {VIP4}\n    port: 80\n    scheduler: sh\n    prefix_v4: {prefix}\n    backends:\n{backends}"
            ),
        )
    };
    let agent = lab.start_agent(&write(24));
    // 50 client addresses, all in the lab's one /24, 2 connections each.
    let clients = lab.add_client_addresses(50);
    let t = lb_tests::traffic::requests_from(&lab.client, &clients, IpAddr::V4(VIP4), 80, 2);
    assert_eq!(t.failures, 0, "{:?}", t.first_errors);
    eprintln!("sh prefix 24, 50 clients of one /24: {:?}", t.by_backend);
    assert_eq!(t.by_backend.len(), 1, "{:?}", t.by_backend);
    // With the whole address, the same clients spread over all three.
    let reloads = agent.count_log("reload applied");
    write(32);
    agent.wait_log("reload applied", reloads, Duration::from_secs(10));
    let t = lb_tests::traffic::requests_from(&lab.client, &clients, IpAddr::V4(VIP4), 80, 2);
    assert_eq!(t.failures, 0, "{:?}", t.first_errors);
    eprintln!("sh prefix 32, same clients: {:?}", t.by_backend);
    assert_eq!(t.by_backend.len(), 3, "{:?}", t.by_backend);
}
