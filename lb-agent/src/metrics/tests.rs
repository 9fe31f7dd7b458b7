use std::io::Write;
use std::process::{Command, Stdio};

use super::*;
use crate::status::{BackendStatus, ProbeStatus, ServiceStatus};

fn backend(address: &str, health: &str, packets: u64) -> BackendStatus {
    BackendStatus {
        address: Some(address.parse().unwrap()),
        weight: 100,
        config_weight: 100,
        health: health.to_string(),
        packets,
        bytes: packets * 100,
        new_flows: packets / 10,
        ..BackendStatus::default()
    }
}

/// Two services, three backends: probed up, probed down with no success yet, and
/// unprobed unresolved.
fn status() -> Status {
    let mut up = backend("198.18.0.11", "up", 42);
    up.active_conns = 12;
    up.inactive_conns = 3;
    up.probe = Some(ProbeStatus {
        kind: "http".to_string(),
        last_latency_secs: Some(0.0015),
        successes: 17,
        failures: 2,
    });
    let mut down = backend("198.18.0.12", "down", 0);
    down.weight = 0;
    down.probe = Some(ProbeStatus {
        kind: "tcp".to_string(),
        last_latency_secs: None,
        successes: 0,
        failures: 5,
    });
    let unresolved = backend("2001:db8::11", "unresolved", 0);
    let names = lb_common::stat::NAMES;
    Status {
        iface: "eth0".to_string(),
        attach_mode: "native".to_string(),
        pin_dir: "/sys/fs/bpf/lb".to_string(),
        config_path: "/etc/lb/lb.yaml".to_string(),
        uptime_secs: 3600,
        reloads_ok: 3,
        reloads_failed: 1,
        outcomes: names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), 1000 + i as u64))
            .collect(),
        conntrack: crate::conntrack::TableStatus {
            new_capacity: 1024,
            established_capacity: 2048,
            established: 30,
            closing: 4,
            expired_total: 7,
            sweep_secs: 0.001,
            syn_filter: true,
        },
        services: vec![
            ServiceStatus {
                name: "web".to_string(),
                vip: Some("198.18.1.10".parse().unwrap()),
                port: 80,
                protocol: "tcp".to_string(),
                packets: 42,
                bytes: 4200,
                new_flows: 4,
                backends: vec![up, down],
                ..ServiceStatus::default()
            },
            ServiceStatus {
                name: "dns \"v6\"".to_string(),
                vip: Some("2001:db8::53".parse().unwrap()),
                port: 53,
                protocol: "udp".to_string(),
                backends: vec![unresolved],
                ..ServiceStatus::default()
            },
        ],
        announce: None,
    }
}

const WEB: &str = r#"service="web",vip="198.18.1.10",port="80",protocol="tcp""#;
const DNS: &str = r#"service="dns \"v6\"",vip="2001:db8::53",port="53",protocol="udp""#;

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

#[test]
fn metrics_render_lines() {
    let text = render(&status());
    let lines = lines(&text);
    let b11 = format!(r#"{WEB},backend="198.18.0.11""#);
    let b12 = format!(r#"{WEB},backend="198.18.0.12""#);
    let b6 = format!(r#"{DNS},backend="2001:db8::11""#);
    let expected = [
        "# HELP lb_service_packets_total Packets sent to the backends of a service.".to_string(),
        "# TYPE lb_service_packets_total counter".to_string(),
        format!("lb_service_packets_total{{{WEB}}} 42"),
        format!("lb_service_packets_total{{{DNS}}} 0"),
        format!("lb_service_bytes_total{{{WEB}}} 4200"),
        format!("lb_service_new_flows_total{{{WEB}}} 4"),
        format!("lb_backend_packets_total{{{b11}}} 42"),
        r#"lb_backend_packets_total{service="web",vip="198.18.1.10",port="80",protocol="tcp",backend="198.18.0.11"} 42"#.to_string(),
        format!("lb_backend_bytes_total{{{b11}}} 4200"),
        format!("lb_backend_new_flows_total{{{b11}}} 4"),
        format!("lb_backend_up{{{b11}}} 1"),
        format!("lb_backend_up{{{b12}}} 0"),
        format!("lb_backend_up{{{b6}}} 0"),
        format!("lb_backend_weight{{{b11}}} 100"),
        "# TYPE lb_backend_active_connections gauge".to_string(),
        format!("lb_backend_active_connections{{{b11}}} 12"),
        format!("lb_backend_inactive_connections{{{b11}}} 3"),
        format!("lb_backend_active_connections{{{b12}}} 0"),
        format!("lb_backend_weight{{{b12}}} 0"),
        "# TYPE lb_backend_probe_latency_seconds gauge".to_string(),
        format!("lb_backend_probe_latency_seconds{{{b11}}} 0.0015"),
        format!("lb_backend_probe_successes_total{{{b11}}} 17"),
        format!("lb_backend_probe_successes_total{{{b12}}} 0"),
        format!("lb_backend_probe_failures_total{{{b11}}} 2"),
        format!("lb_backend_probe_failures_total{{{b12}}} 5"),
        "# TYPE lb_packets_total counter".to_string(),
        r#"lb_packets_total{outcome="pass_not_ip"} 1000"#.to_string(),
        r#"lb_packets_total{outcome="pass_not_vip"} 1001"#.to_string(),
        r#"lb_packets_total{outcome="forwarded"} 1008"#.to_string(),
        r#"lb_packets_total{outcome="drop_no_backend"} 1009"#.to_string(),
        r#"lb_packets_total{outcome="pass_all_down"} 1014"#.to_string(),
        "lb_conntrack_hits_total 1011".to_string(),
        "lb_conntrack_misses_total 1012".to_string(),
        "lb_conntrack_insert_failures_total 1013".to_string(),
        "lb_conntrack_promotions_total 1016".to_string(),
        "lb_conntrack_established_full_total 1017".to_string(),
        "lb_conntrack_midflow_misses_total 1018".to_string(),
        "lb_conntrack_syn_unrecorded_total 1032".to_string(),
        r#"lb_conntrack_established_entries{state="established"} 30"#.to_string(),
        r#"lb_conntrack_established_entries{state="closing"} 4"#.to_string(),
        "lb_conntrack_established_capacity 2048".to_string(),
        "lb_conntrack_syn_filter 1".to_string(),
        "lb_conntrack_new_capacity 1024".to_string(),
        "lb_conntrack_expired_total 7".to_string(),
        "lb_persistence_hits_total 1015".to_string(),
        r#"lb_reloads_total{result="ok"} 3"#.to_string(),
        r#"lb_reloads_total{result="failed"} 1"#.to_string(),
        r#"lb_xdp_attach_mode{mode="native"} 1"#.to_string(),
        "# TYPE lb_uptime_seconds gauge".to_string(),
        "lb_uptime_seconds 3600".to_string(),
    ];
    for line in &expected {
        assert!(
            lines.contains(&line.as_str()),
            "no line {line:?} in:\n{text}"
        );
    }
    // Backends without a probe (or a success) have no probe series.
    assert!(!text.contains(&format!("lb_backend_probe_latency_seconds{{{b12}}}")));
    assert!(!text.contains(&format!("lb_backend_probe_failures_total{{{b6}}}")));
    // Non-verdicts are not packet verdicts; nothing of OpenMetrics is left.
    for absent in [
        "outcome=\"conn_hit\"",
        "outcome=\"persist_hit\"",
        "outcome=\"ct_promoted\"",
        "# EOF",
        "# UNIT",
    ] {
        assert!(!text.contains(absent), "{absent:?} in:\n{text}");
    }
    // Every family has one HELP and one TYPE line, and each series one family.
    let helps = lines.iter().filter(|l| l.starts_with("# HELP ")).count();
    let types = lines.iter().filter(|l| l.starts_with("# TYPE ")).count();
    assert_eq!((helps, types), (38, 38), "{text}");
}

#[test]
fn metrics_render_edge_cases() {
    // An empty snapshot still has the reloads and the uptime.
    let text = render(&Status::default());
    assert!(
        text.contains("lb_reloads_total{result=\"ok\"} 0\n"),
        "{text}"
    );
    assert!(text.contains("lb_uptime_seconds 0\n"), "{text}");
    assert!(!text.contains("lb_xdp_attach_mode"), "{text}");
    assert!(!text.contains("lb_backend_"), "{text}");

    // Two backends of a service with the same labels: only the first is exported.
    let mut status = status();
    let mut twin = status.services[0].backends[0].clone();
    twin.packets = 7;
    status.services[0].backends.push(twin);
    let text = render(&status);
    let b11 = format!(r#"lb_backend_packets_total{{{WEB},backend="198.18.0.11"}}"#);
    assert_eq!(text.matches(&b11).count(), 1, "{text}");
    assert!(text.contains(&format!("{b11} 42\n")), "{text}");
}

/// Runs `promtool check metrics` on `text`; fails if promtool is missing.
fn promtool_check(text: &str) {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => panic!(
            "cannot run `promtool` ({e}): it is in the Debian package `prometheus` \
             (`apt-get install -y prometheus`, or `cargo xtask setup`)"
        ),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- input:\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

#[test]
fn metrics_pass_promtool() {
    promtool_check(&render(&status()));
    promtool_check(&render(&Status::default()));
}

#[tokio::test]
async fn metrics_served_over_http() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let status = Arc::new(RwLock::new(status()));
    let (stop, shutdown) = watch::channel(false);
    let server = tokio::spawn(serve_listener(listener, status.clone(), shutdown));

    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let response = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    assert_eq!(
        response.headers()[reqwest::header::CONTENT_TYPE],
        CONTENT_TYPE_TEXT
    );
    let body = response.text().await.unwrap();
    assert_eq!(body, render(&status.read().unwrap()));
    assert!(body.contains(r#"lb_backend_packets_total{service="web",vip="198.18.1.10",port="80",protocol="tcp",backend="198.18.0.11"} 42"#));

    // The next scrape sees the snapshot as it is then.
    status.write().unwrap().uptime_secs = 7200;
    let body = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(body.contains("lb_uptime_seconds 7200\n"), "{body}");

    let response = client
        .get(format!("http://{addr}/other"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::NOT_FOUND);
    let response = client
        .post(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::METHOD_NOT_ALLOWED);

    // The client keeps its connection open; shutdown closes it.
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("serve did not stop within 10 s")
        .unwrap()
        .unwrap();
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(refused.is_err(), "still listening after shutdown");
}

#[tokio::test]
async fn metrics_serve_binds_and_stops() {
    // Bound by `serve` itself; a dropped sender stops it too.
    let status = Arc::new(RwLock::new(Status::default()));
    let (stop, shutdown) = watch::channel(false);
    let server = tokio::spawn(serve("127.0.0.1:0".parse().unwrap(), status, shutdown));
    drop(stop);
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("serve did not stop within 10 s")
        .unwrap()
        .unwrap();

    // A listen address in use is an error.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (_stop, shutdown) = watch::channel(false);
    let status = Arc::new(RwLock::new(Status::default()));
    assert!(
        serve(taken.local_addr().unwrap(), status, shutdown)
            .await
            .is_err()
    );
}
