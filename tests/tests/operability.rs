//! What operators use at 4 a.m.: `lb-agent status` and `drain` over the control
//! socket, the Prometheus endpoint, checked against the traffic actually sent.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use lb_agent::status::Status;
use lb_tests::{
    lab::{agent_bin, Lab, VIP4},
    netns,
    traffic::{requests, Proto},
};

fn demo_config() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/demo.yaml")
}

fn cli(args: &[&str], socket: &Path) -> (i32, String, String) {
    let out = Command::new(agent_bin()).args(args).arg("--socket").arg(socket).output().expect("run lb-agent");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status(lab: &Lab) -> Status {
    let (code, out, err) = cli(&["status", "--json"], &lab.control_socket());
    assert_eq!(code, 0, "lb-agent status --json: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status JSON: {e}\n{out}"))
}

/// GET /metrics from inside the balancer's namespace (the endpoint listens on its
/// 127.0.0.1).
fn scrape(lab: &Lab) -> String {
    netns::run_in(&lab.balancer, || {
        let mut c = TcpStream::connect("127.0.0.1:9642").expect("connect to the metrics endpoint");
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200"), "{resp}");
        resp.split("\r\n\r\n").nth(1).expect("body").to_string()
    })
}

/// The value of the series whose line starts with `prefix`.
fn series(metrics: &str, prefix: &str) -> f64 {
    let line = metrics.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} in:\n{metrics}"));
    line.rsplit(' ').next().unwrap().parse().expect("a number")
}

#[test]
fn status_and_metrics_match_the_traffic() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    let agent = lab.start_agent(&demo_config());
    let sent = 300;
    let t = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, sent, 2, Duration::from_secs(60));
    assert_eq!(t.failures, 0, "{:?}", t.first_errors);

    let st = status(&lab);
    let web = st.services.iter().find(|s| s.name == "web").expect("web in status");
    // Every request is a new TCP connection: one SYN, one new flow.
    assert_eq!(web.new_flows, sent, "new flows of web");
    assert_eq!(web.backends.iter().map(|b| b.new_flows).sum::<u64>(), sent);
    assert!(web.packets >= 3 * sent, "web packets {}", web.packets);
    assert_eq!(st.attach_mode, "native");
    // The requests are closed: counted inactive (closing) until tcp_fin expires them.
    assert!(web.backends.iter().all(|b| b.health == "up" && b.inactive_conns > 0), "{web:?}");

    let (code, table, err) = cli(&["status"], &lab.control_socket());
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("TCP  198.18.1.10:80 maglev (web)"), "{table}");
    assert!(table.contains("UDP  198.18.1.10:53 maglev (dns)"), "{table}");
    assert!(table.contains("[2001:db8:1::10]:80"), "{table}");
    assert_eq!(table.lines().filter(|l| l.trim_start().starts_with("-> 198.18.0.1")).count(), 6, "{table}");

    let metrics = scrape(&lab);
    let labels = format!("{{service=\"web\",vip=\"{VIP4}\",port=\"80\",protocol=\"tcp\"}}");
    assert_eq!(series(&metrics, &format!("lb_service_new_flows_total{labels}")), sent as f64);
    assert_eq!(series(&metrics, &format!("lb_service_packets_total{labels}")), web.packets as f64);
    for b in &web.backends {
        let addr = b.address.unwrap();
        let prefix = format!("lb_backend_new_flows_total{{service=\"web\",vip=\"{VIP4}\",port=\"80\",protocol=\"tcp\",backend=\"{addr}\"}}");
        assert_eq!(series(&metrics, &prefix), b.new_flows as f64, "{addr}");
    }
    assert!(metrics.contains("lb_xdp_attach_mode{mode=\"native\"} 1"), "{metrics}");
    let file = lab.dir.join("metrics.txt");
    std::fs::write(&file, &metrics).unwrap();
    let check = Command::new("promtool").args(["check", "metrics"]).stdin(std::fs::File::open(&file).unwrap()).output();
    let check = check.expect("promtool (Debian package prometheus) must be installed: cargo xtask setup does");
    assert!(check.status.success(), "promtool check metrics: {}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    drop(agent);
}

#[test]
fn reload_command_reports_the_outcome() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    let demo = std::fs::read_to_string(demo_config()).unwrap();
    let cfg = lab.write_config("lb.yaml", &demo);
    let _agent = lab.start_agent(&cfg);
    let socket = lab.control_socket();

    let (code, out, err) = cli(&["reload"], &socket);
    assert_eq!(code, 0, "reload of an unchanged file: {err}");
    assert!(out.starts_with("reload applied: "), "{out}");

    // An invalid file: exit 1 with the file's line and column; nothing changes.
    assert!(demo.contains("        weight: 2\n"));
    std::fs::write(&cfg, demo.replacen("        weight: 2\n", "        weight: lots\n", 1)).unwrap();
    let (code, out, err) = cli(&["reload"], &socket);
    assert_eq!(code, 1, "reload of an invalid file: {out}");
    let line = demo.lines().position(|l| l == "        weight: 2").unwrap() + 1;
    assert!(
        err.contains("reload failed, the running configuration stays in force")
            && err.contains(&format!("lb.yaml:{line}:")),
        "{err}"
    );
    let t = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, 200, 2, Duration::from_secs(60));
    assert_eq!(t.failures, 0, "{:?}", t.first_errors);
    assert_eq!(t.by_backend.len(), 3, "{:?}", t.by_backend);

    // A valid change: 198.18.0.13 leaves web (the file watch may apply it first;
    // either way it is in force when the command returns).
    let without_b3 = demo.replacen("      - address: 198.18.0.13\n        weight: 2\n", "", 1);
    assert_ne!(without_b3, demo);
    std::fs::write(&cfg, &without_b3).unwrap();
    let (code, out, err) = cli(&["reload"], &socket);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("reload applied: "), "{out}");
    let st = status(&lab);
    let web = st.services.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(web.backends.len(), 2, "{:?}", web.backends);
    assert!(st.reloads_failed >= 1, "failed reloads counted: {}", st.reloads_failed);
    let t = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, 200, 2, Duration::from_secs(60));
    assert_eq!(t.failures, 0, "{:?}", t.first_errors);
    assert!(!t.by_backend.contains_key("b3"), "{:?}", t.by_backend);
}

#[test]
fn drain_and_undrain_at_run_time() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    let _agent = lab.start_agent(&demo_config());
    let socket = lab.control_socket();

    let (code, out, err) = cli(&["drain", "198.18.0.12", "--service", "web"], &socket);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("the file still says weight 1"), "{out}");
    let t = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, 300, 2, Duration::from_secs(60));
    assert_eq!(t.failures, 0);
    assert!(!t.by_backend.contains_key("b2"), "a drained backend got new connections: {:?}", t.by_backend);
    let st = status(&lab);
    let b2 = st.services.iter().find(|s| s.name == "web").unwrap().backends.iter()
        .find(|b| b.address == Some("198.18.0.12".parse().unwrap())).unwrap().clone();
    assert!(b2.drained && b2.weight == 0 && b2.config_weight == 1, "{b2:?}");

    // The IPv6 spelling of an IPv4 address names the same backend.
    let (code, out, err) = cli(&["undrain", "::ffff:198.18.0.12"], &socket);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("undrained 198.18.0.12 in web"), "{out}");
    let t = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, 300, 2, Duration::from_secs(60));
    assert!(t.by_backend.get("b2").copied().unwrap_or(0) > 30, "b2 back: {:?}", t.by_backend);

    let (code, _, err) = cli(&["drain", "198.18.0.99"], &socket);
    assert_eq!(code, 1, "an unknown backend is an error");
    assert!(err.contains("198.18.0.99 is not a backend of any service"), "{err}");
}

#[test]
fn non_root_users_get_a_permission_error_not_a_hang() {
    let mut lab = Lab::new(1);
    lab.start_servers();
    let _agent = lab.start_agent(&demo_config());
    let out = Command::new("timeout")
        .args(["10", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(agent_bin())
        .args(["status", "--socket"])
        .arg(lab.control_socket())
        .output()
        .expect("run setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code (124 would be a hang): {err}");
    assert!(err.contains("permission denied") && err.contains("run as root"), "{err}");
}

#[test]
fn readiness_is_notified_after_the_maps_are_filled() {
    // systemd's Type=notify protocol: a datagram "READY=1" on $NOTIFY_SOCKET.
    let mut lab = Lab::new(1);
    lab.start_servers();
    let path = lab.dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("bind the notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // SAFETY-free: set for the child only.
    let agent = lab.start_agent_env(&demo_config(), &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("a readiness notification");
    let msg = String::from_utf8_lossy(&buf[..n]);
    assert!(msg.contains("READY=1"), "{msg}");
    // By then the balancer forwards.
    let t = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, 20, 1, Duration::from_secs(30));
    assert_eq!(t.failures, 0, "{:?}", t.first_errors);
    drop(agent);
}

/// `bulk` more services of 50 backends each (weight 0 but one, small tables), after
/// `yaml`: valid, megabytes long, seconds to parse in a debug build.
fn with_bulk(yaml: &str, bulk: usize) -> String {
    let mut out = String::from(yaml);
    for i in 0..bulk {
        out += &format!(
            "  - name: bulk{i}\n    vip: 198.18.{}.{}\n    port: {}\n    table_size: 53\n    backends:\n",
            100 + i / 250,
            i % 250 + 1,
            1000 + i
        );
        for j in 0..50 {
            out += &format!("      - address: 198.19.{}.{}\n        weight: {}\n", j / 250, j % 250 + 1, u32::from(j == 0));
        }
    }
    out
}

#[test]
fn status_answers_while_a_large_file_is_parsed() {
    let mut lab = Lab::new(2);
    lab.start_servers();
    let small = format!(
        "services:\n  - name: web\n    vip: {VIP4}\n    port: 80\n    backends:\n      - address: {}\n      - address: {}\n",
        lab.backends[0].v4, lab.backends[1].v4
    );
    let cfg = lab.write_config("lb.yaml", &small);
    let agent = lab.start_agent(&cfg);
    let socket = lab.control_socket();

    // About 6 MB of valid YAML; the file watch and `lb-agent reload` both see it.
    let big = with_bulk(&small, 2500);
    assert!(big.len() > 5_000_000, "{} bytes", big.len());
    lab.write_config("lb.yaml", &big);
    let reload = {
        let socket = socket.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let r = cli(&["reload"], &socket);
            (r, t0.elapsed())
        })
    };
    let mut answered = Vec::new();
    while !reload.is_finished() {
        let t0 = Instant::now();
        let (code, out, err) = cli(&["status", "--json"], &socket);
        let took = t0.elapsed();
        assert_eq!(code, 0, "lb-agent status during the parse ({took:?}): {err}\n{}", agent.log_text());
        assert!(out.contains("\"web\""), "{out}");
        answered.push(took);
        std::thread::sleep(Duration::from_millis(100));
    }
    let ((code, out, err), reload_took) = reload.join().expect("reload thread");
    eprintln!(
        "reload answered after {reload_took:?}; {} status calls meanwhile, the slowest {:?}",
        answered.len(),
        answered.iter().max()
    );
    for line in agent.log_text().lines().filter(|l| l.contains("pars") || l.contains("reload")) {
        eprintln!("  {line}");
    }
    // Status must have been asked while the parse ran, or this shows nothing.
    assert!(
        answered.len() >= 3,
        "the reload took only {reload_took:?} ({} status calls meanwhile): too short for this test; make the file larger",
        answered.len()
    );
    let slowest = answered.iter().max().copied().unwrap_or_default();
    assert!(slowest < Duration::from_secs(1), "status took {slowest:?} while the file was parsed: {answered:?}");

    // The caller got the outcome when the parse was done: 2,500 more services do
    // not fit the maps sized at start, so the running configuration stays.
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("does not fit the maps"), "{err}");
    let t = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, 40, 2, Duration::from_secs(30));
    assert_eq!(t.failures, 0, "{:?}", t.first_errors);
    assert_eq!(t.by_backend.len(), 2, "{:?}", t.by_backend);
}

/// `lb-agent stats --pin-dir DIR [--config FILE]`: (exit code, stdout, stderr).
fn stats_cli(lab: &Lab, config: Option<&Path>) -> (i32, String, String) {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("stats").arg("--pin-dir").arg(lab.pin_dir());
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    let out = cmd.output().expect("run lb-agent stats");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The new flows `lb-agent stats` gives each backend address (`  -> ADDR ... new_flows N`).
fn stats_new_flows(out: &str) -> BTreeMap<IpAddr, u64> {
    out.lines()
        .filter_map(|l| l.trim_start().strip_prefix("-> "))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let flows = words.iter().position(|w| *w == "new_flows").map(|i| words[i + 1]);
            let flows = flows.unwrap_or_else(|| panic!("no new_flows in {l:?}"));
            (words[0].parse().expect("an address"), flows.parse().expect("a number"))
        })
        .collect()
}

#[test]
fn stats_attribute_counters_to_the_right_backends_after_a_reload_adds_one() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    let config = |backends: &[&str]| {
        let list: Vec<String> = backends.iter().map(|a| format!("{{address: {a}}}")).collect();
        format!("services:\n  - name: web\n    vip: {VIP4}\n    port: 80\n    backends: [{}]\n", list.join(", "))
    };
    // b1 and b3 get ids 0 and 1; b2, added by the reload, id 2 (ids are stable, new
    // ones appended), while the new file's order would number b1, b2, b3 as 0, 1, 2.
    let cfg = lab.write_config("lb.yaml", &config(&["198.18.0.11", "198.18.0.13"]));
    let _agent = lab.start_agent(&cfg);
    let before = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, 200, 2, Duration::from_secs(60));
    assert_eq!(before.failures, 0, "{:?}", before.first_errors);
    assert!(!before.by_backend.contains_key("b2"), "{:?}", before.by_backend);

    lab.write_config("lb.yaml", &config(&["198.18.0.11", "198.18.0.12", "198.18.0.13"]));
    let (code, out, err) = cli(&["reload"], &lab.control_socket());
    assert_eq!(code, 0, "reload: {out}{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let st = status(&lab);
        let web = st.services.iter().find(|s| s.name == "web").expect("web in status");
        if web.backends.len() == 3 && web.backends.iter().all(|b| b.health == "up") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "b2 did not come up: {web:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, 300, 2, Duration::from_secs(60));
    assert_eq!(after.failures, 0, "{:?}", after.first_errors);
    assert!(after.by_backend.get("b2").copied().unwrap_or(0) > 0, "{:?}", after.by_backend);

    // Every request is a new connection, so a backend's new flows are the requests it
    // answered (its HTTP server answers with its name).
    let by = |t: &lb_tests::traffic::Tally, name: &str| t.by_backend.get(name).copied().unwrap_or(0);
    let answered: BTreeMap<IpAddr, u64> =
        lab.backends.iter().map(|b| (IpAddr::V4(b.v4), by(&before, &b.name) + by(&after, &b.name))).collect();
    let (code, named, err) = stats_cli(&lab, Some(&cfg));
    assert_eq!(code, 0, "lb-agent stats --config: {err}");
    assert_eq!(stats_new_flows(&named), answered, "lb-agent stats --config:\n{named}");
    assert!(named.contains(&format!("web tcp {VIP4}:80  packets ")), "{named}");
    // Without the file: the same counters, the service shown by its address.
    let (code, unnamed, err) = stats_cli(&lab, None);
    assert_eq!(code, 0, "lb-agent stats: {err}");
    assert_eq!(stats_new_flows(&unnamed), answered, "lb-agent stats:\n{unnamed}");
    assert!(unnamed.starts_with(&format!("tcp {VIP4}:80  packets ")), "{unnamed}");
}
