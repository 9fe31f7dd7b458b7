//! tcp, udp, exec and none probes.

use super::*;

#[tokio::test]
async fn none_always_succeeds() {
    probe(ProbeKind::None, closed_port().await).await.unwrap();
}

#[tokio::test]
async fn tcp_open_and_closed_port() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    probe(ProbeKind::Tcp, listener.local_addr().unwrap())
        .await
        .unwrap();
    let err = probe(ProbeKind::Tcp, closed_port().await)
        .await
        .unwrap_err();
    assert!(err.starts_with("tcp: connect to 127.0.0.1:"), "{err}");
}

fn udp(payload: &str, expect: Option<&str>) -> ProbeKind {
    ProbeKind::Udp(UdpProbe {
        payload: payload.as_bytes().to_vec(),
        expect: expect.map(|e| e.as_bytes().to_vec()),
    })
}

#[tokio::test]
async fn udp_reply_expected_or_any() {
    let server = udp_server().await;
    probe(udp("ping", Some("pong")), server).await.unwrap();
    probe(udp("hello", None), server).await.unwrap();
}

#[tokio::test]
async fn udp_unexpected_reply_fails() {
    let server = udp_server().await;
    let err = probe(udp("ping", Some("PONG")), server).await.unwrap_err();
    assert!(err.contains("unexpected reply \"pong\""), "{err}");
}

#[tokio::test]
async fn udp_closed_port_fails() {
    let err = probe(udp("ping", None), closed_port().await)
        .await
        .unwrap_err();
    // Normally the ICMP port unreachable; a lost ICMP would end in a timeout.
    assert!(err.starts_with("udp: "), "{err}");
}

fn exec(argv: &[&str]) -> ProbeKind {
    ProbeKind::Exec(ExecProbe {
        command: argv.iter().map(|s| s.to_string()).collect(),
    })
}

#[tokio::test]
async fn exec_exit_status_decides() {
    let target: SocketAddr = "127.0.0.1:1234".parse().unwrap();
    probe(exec(&["true"]), target).await.unwrap();
    let err = probe(exec(&["false"]), target).await.unwrap_err();
    assert!(
        err.starts_with("exec: false failed: exit status: 1"),
        "{err}"
    );
    let err = probe(exec(&["/nonexistent/check"]), target)
        .await
        .unwrap_err();
    assert!(
        err.starts_with("exec: cannot run /nonexistent/check"),
        "{err}"
    );
}

#[tokio::test]
async fn exec_gets_the_environment() {
    let check = r#"test "$LB_SERVICE" = web && test "$LB_BACKEND_ADDRESS" = 127.0.0.1 && test "$LB_BACKEND_PORT" = 1234"#;
    let target: SocketAddr = "127.0.0.1:1234".parse().unwrap();
    probe(exec(&["sh", "-c", check]), target).await.unwrap();
    let other: SocketAddr = "127.0.0.1:4321".parse().unwrap();
    probe(exec(&["sh", "-c", check]), other).await.unwrap_err();
}

#[tokio::test]
async fn exec_timeout_kills_the_command() {
    let pid_file = temp_path("exec.pid");
    let script = format!("echo $$ > {}; exec sleep 30", pid_file.display());
    let spec = ProbeSpec {
        kind: exec(&["sh", "-c", &script]),
        timeout: Duration::from_millis(200),
        ..ProbeSpec::default()
    };
    let target: SocketAddr = "127.0.0.1:1234".parse().unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), probe_once(&spec, target, &ctx()))
        .await
        .expect("the probe must end at its timeout, not when sleep ends")
        .unwrap_err();
    assert!(err.contains("was killed"), "{err}");
    let pid = std::fs::read_to_string(&pid_file).expect("the command wrote its pid");
    let _ = std::fs::remove_file(&pid_file);
    let proc = std::path::Path::new("/proc").join(pid.trim());
    assert!(
        !proc.exists(),
        "the command (pid {}) still runs",
        pid.trim()
    );
}
