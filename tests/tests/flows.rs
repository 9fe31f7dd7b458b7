//! `lb-agent flows`: the connection table as `ipvsadm -Lnc` shows it, read from the
//! pinned maps, checked against connections the test holds open.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Command,
    time::Duration,
};

use lb_tests::{
    lab::{agent_bin, Lab, ECHO_PORT, VIP4},
    netns,
    traffic::LongLived,
};

fn flows(lab: &Lab, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(agent_bin())
        .arg("flows")
        .arg("--pin-dir")
        .arg(lab.pin_dir())
        .args(args)
        .output()
        .expect("run lb-agent flows");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(lab: &Lab, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err) = flows(lab, &all);
    assert_eq!(code, 0, "lb-agent flows {all:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("flows --json is no JSON array ({e}):\n{out}"))
}

#[test]
fn flows_lists_the_open_connections_with_their_backends() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    let backends: String = lab.backends.iter().map(|b| format!("      - address: {}\n", b.v4)).collect();
    let cfg = lab.write_config(
        "lb.yaml",
        &format!(
            "services:
  - name: echo
    vip: {VIP4}
    port: {ECHO_PORT}
    backends:
{backends}  - name: dns
    vip: {VIP4}
    port: 53
    protocol: udp
    backends:
{backends}"
        ),
    );
    let _agent = lab.start_agent(&cfg);
    let conns: Vec<LongLived> = (0..6).map(|_| LongLived::open(&lab.client, IpAddr::V4(VIP4), ECHO_PORT)).collect();
    // One datagram: a flow seen once.
    netns::run_in(&lab.client, || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.send_to(b"who", SocketAddr::new(IpAddr::V4(VIP4), 53)).expect("send");
    });
    std::thread::sleep(Duration::from_millis(500));

    let address: BTreeMap<String, String> = lab.backends.iter().map(|b| (b.name.clone(), b.v4.to_string())).collect();
    let mut want: BTreeMap<String, usize> = BTreeMap::new();
    for c in &conns {
        *want.entry(address[&c.backend].clone()).or_default() += 1;
    }
    let all = json(&lab, &["--config", cfg.to_str().expect("utf-8 path")]);
    let echo_vip = format!("{VIP4}:{ECHO_PORT}");
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    for f in all.iter().filter(|f| f["vip"] == echo_vip.as_str()) {
        assert_eq!(f["protocol"], "TCP", "{f}");
        assert_eq!(f["state"], "ESTABLISHED", "a long-lived connection: {f}");
        assert_eq!(f["table"], "established", "{f}");
        assert_eq!(f["service"], "echo", "named from --config: {f}");
        let expire = f["expire_s"].as_u64().expect("expire_s");
        assert!(expire > 850 && expire <= 900, "tcp timeout 900 s, just used: {f}");
        *got.entry(f["backend"].as_str().expect("backend").to_string()).or_default() += 1;
    }
    assert_eq!(got, want, "established flows by backend, against where the connections landed:\n{all:#?}");
    let udp: Vec<_> = all.iter().filter(|f| f["vip"] == format!("{VIP4}:53").as_str()).collect();
    assert_eq!(udp.len(), 1, "the one datagram: {all:#?}");
    assert_eq!((&udp[0]["protocol"], &udp[0]["state"], &udp[0]["table"]), (&"UDP".into(), &"NEW".into(), &"new".into()));

    // Filters: by name (with the file) and by VIP:PORT (without).
    let by_name = json(&lab, &["--config", cfg.to_str().expect("utf-8 path"), "--service", "dns"]);
    assert_eq!(by_name.len(), 1, "--service dns: {by_name:#?}");
    let by_vip = json(&lab, &["--service", &echo_vip]);
    assert_eq!(by_vip.len(), conns.len(), "--service {echo_vip}: {by_vip:#?}");
    assert!(by_vip.iter().all(|f| f["service"] == ""), "unnamed without --config: {by_vip:#?}");
    let (code, _, err) = flows(&lab, &["--service", "echo"]);
    assert_ne!(code, 0, "a service name without --config is refused");
    assert!(err.contains("--config"), "{err}");

    // The text form: a header, then one line per flow.
    let (code, text, err) = flows(&lab, &[]);
    assert_eq!(code, 0, "{err}");
    let mut lines = text.lines();
    assert!(lines.next().is_some_and(|h| h.starts_with("pro") && h.contains("backend")), "{text}");
    assert_eq!(lines.filter(|l| l.contains("ESTABLISHED") && l.contains(&echo_vip)).count(), conns.len(), "{text}");
    for c in conns {
        assert!(c.finish().error.is_none(), "a long-lived connection broke");
    }
}
