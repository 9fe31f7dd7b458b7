//! Liveness probes of every kind (https with SNI and a private CA, exec, udp, tcp,
//! none) and the neighbour watch (a backend's MAC changing, a backend becoming
//! unreachable), end to end: the agent in the balancer namespace probing real
//! servers in the backend namespaces, traffic through the XDP program.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_tests::{
    lab::{Agent, BALANCER4, Capture, Lab, VIP4, VIP6},
    netns::{self, ns_sh},
    tls::{TestPki, TlsServer, https_server},
    traffic::{Proto, Tally, requests, tcp_server},
};

/// Probe timing shared by the tests: fast, so state changes show within a second.
const FAST: &str = "interval: 200ms\n      timeout: 150ms";

fn spread(t: &Tally) -> String {
    format!(
        "{:?} failures {} {:?}",
        t.by_backend, t.failures, t.first_errors
    )
}

/// Log lines containing every one of `needles`.
fn lines_with(agent: &Agent, needles: &[&str]) -> Vec<String> {
    agent
        .log_text()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

/// Waits for a log line containing every one of `needles`; returns it. Panics with the
/// log after `timeout`.
fn wait_line(agent: &Agent, needles: &[&str], timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(line) = lines_with(agent, needles).into_iter().next() {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no log line with all of {needles:?} within {timeout:?}:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts no log line contains every one of `needles`.
fn assert_no_line(agent: &Agent, needles: &[&str], what: &str) {
    let found = lines_with(agent, needles);
    assert!(found.is_empty(), "{what}: {found:?}\n{}", agent.log_text());
}

/// `field=value` as the agent's log prints a backend.
fn be(addr: impl std::fmt::Display) -> String {
    format!("backend={addr} ")
}

fn http(lab: &Lab, vip: IpAddr, n: u64) -> Tally {
    requests(
        &lab.client,
        Proto::Http,
        vip,
        80,
        n,
        4,
        Duration::from_secs(60),
    )
}

fn udp(lab: &Lab, vip: IpAddr, n: u64) -> Tally {
    requests(
        &lab.client,
        Proto::Udp,
        vip,
        53,
        n,
        4,
        Duration::from_secs(60),
    )
}

/// Asserts every request succeeded and exactly the backends `names` answered.
fn assert_answered_by(t: &Tally, names: &[&str], agent: &Agent, what: &str) {
    let got: Vec<&str> = t.by_backend.keys().map(String::as_str).collect();
    assert!(
        t.failures == 0 && got == names,
        "{what}: expected answers from exactly {names:?}, got {}\n{}",
        spread(t),
        agent.log_text()
    );
}

#[test]
fn https_probe_with_sni_against_a_tls_server_in_a_namespace() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    let pki = TestPki::new("backend.example");
    let ca = lab.dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).expect("write the CA");
    let any: SocketAddr = "[::]:8443".parse().unwrap();
    let mut tls: Vec<TlsServer> = lab
        .backends
        .iter()
        .map(|b| https_server(&b.ns, any, &pki, "ok"))
        .collect();

    let probe = format!(
        "    probe:\n      kind: https\n      port: 8443\n      sni: backend.example\n      ca_file: {}\n      {FAST}\n      rise: 1\n      fall: 2\n      initial: down\n",
        ca.display()
    );
    let (b1, b2, b3) = (&lab.backends[0], &lab.backends[1], &lab.backends[2]);
    // web: b1 and b2 with the right name. web6: b1 with the right name, b3 (same
    // certificate, same CA) probed as `other.example`, which the certificate does not name.
    // Small tables: two services that start with every backend down and default-sized
    // tables do not fit the agent's MAGLEV map (see
    // `services_starting_with_every_backend_down_come_up`).
    let yaml = format!(
        "services:
  - name: web
    vip: {VIP4}
    port: 80
    table_size: 1021
{probe}    backends:
      - address: {b1v4}
      - address: {b2v4}
  - name: web6
    vip: {VIP6}
    port: 80
    table_size: 1021
{probe}    backends:
      - address: {b1v6}
      - address: {b3v6}
        probe:
          sni: other.example
",
        b1v4 = b1.v4,
        b2v4 = b2.v4,
        b1v6 = b1.v6,
        b3v6 = b3.v6,
    );
    let cfg = lab.write_config("lb.yaml", &yaml);
    let agent = lab.start_agent(&cfg);
    let started = Instant::now();

    // Everything starts down; the verified probes bring b1 and b2 up.
    for (service, addr) in [
        ("web", b1.v4.to_string()),
        ("web", b2.v4.to_string()),
        ("web6", b1.v6.to_string()),
    ] {
        wait_line(
            &agent,
            &["backend up", &format!("service={service} "), &be(&addr)],
            Duration::from_secs(5),
        );
    }
    let t = http(&lab, IpAddr::V4(VIP4), 200);
    assert_answered_by(
        &t,
        &["b1", "b2"],
        &agent,
        "web with both https probes passing",
    );

    // The wrong server name never passes: b3 stays down for 2 s of probing (10 probes).
    std::thread::sleep(Duration::from_secs(2).saturating_sub(started.elapsed()));
    assert_no_line(
        &agent,
        &["backend up", &be(b3.v6)],
        "b3 came up although its probe's SNI does not match the certificate",
    );
    let t = http(&lab, IpAddr::V6(VIP6), 100);
    assert_answered_by(
        &t,
        &["b1"],
        &agent,
        "web6: only b1 (b3's probe names other.example)",
    );
    // The probes really sent those names, and b3's handshakes were attempted.
    let (s1, s3) = (tls[0].snis(), tls[2].snis());
    assert!(
        !s1.is_empty() && s1.iter().all(|s| s.as_deref() == Some("backend.example")),
        "b1's server saw SNIs {s1:?}"
    );
    assert!(
        s3.len() >= 5 && s3.iter().all(|s| s.as_deref() == Some("other.example")),
        "b3's server saw SNIs {s3:?}"
    );
    assert_eq!(
        tls[2].answered(),
        0,
        "b3 answered a probe whose certificate check should fail"
    );
    assert!(
        tls[0].answered() > 0 && tls[1].answered() > 0,
        "b1 and b2 answered the probes"
    );

    // b2's TLS server stops: b2 goes down (fall 2) and gets no new connection.
    let stopped = Instant::now();
    tls[1].stop();
    let line = wait_line(
        &agent,
        &["backend down", "service=web ", &be(b2.v4)],
        Duration::from_secs(5),
    );
    eprintln!(
        "b2 down {:?} after its TLS server stopped: {line}",
        stopped.elapsed()
    );
    let t = http(&lab, IpAddr::V4(VIP4), 200);
    assert_answered_by(&t, &["b1"], &agent, "web after b2's TLS server stopped");
    assert_no_line(&agent, &["backend down", &be(b1.v4)], "b1 went down");
    assert_no_line(&agent, &["backend down", &be(b1.v6)], "b1 went down");
    drop(agent);
    drop(tls);
}

/// Processes of the exec probe's `sleep 30`: (pid, age, state) of every process
/// that runs `sleep 30` with `LB_SERVICE=service` set, or is a `sleep` child of `parent`
/// (zombies included).
fn sleeps(service: &str, parent: Option<u32>) -> Vec<(u32, Duration, char)> {
    let marker = format!("LB_SERVICE={service}\0");
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ... ; field 22 is the start time in clock ticks.
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = &stat[stat.find('(').map_or(0, |i| i + 1)..close];
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let (Some(state), Some(ppid), Some(start)) = (rest.first(), rest.get(1), rest.get(19))
        else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let ours_by_env = cmdline == b"sleep\x0030\x00"
            && environ
                .windows(marker.len())
                .any(|w| w == marker.as_bytes());
        let ours_by_parent =
            comm == "sleep" && parent.is_some_and(|p| ppid.parse::<u32>().ok() == Some(p));
        if ours_by_env || ours_by_parent {
            let age = (uptime - start.parse::<f64>().unwrap_or(0.0) / hz).max(0.0);
            out.push((
                pid,
                Duration::from_secs_f64(age),
                state.chars().next().unwrap_or('?'),
            ));
        }
    }
    out
}

/// The pid of the agent running with configuration `config`.
fn agent_pid(config: &Path) -> Option<u32> {
    let cfg = config.to_str()?.as_bytes().to_vec();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_agent =
            args.first()?.ends_with(b"lb-agent") && args.contains(&cfg.as_slice());
        is_agent.then_some(pid)
    })
}

#[test]
fn exec_probe_healthy_failing_and_timeout() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    let (b1, b2, b3) = (lab.backends[0].v4, lab.backends[1].v4, lab.backends[2].v4);
    // A name only this lab uses, to tell its probe's processes from anyone else's.
    let service = format!("exec-{}", lab.id);
    let yaml = format!(
        "services:
  - name: {service}
    vip: {VIP4}
    port: 80
    probe:
      kind: exec
      command: [\"true\"]
      interval: 500ms
      timeout: 200ms
      rise: 1
      fall: 1
    backends:
      - address: {b1}
        probe:
          initial: down
      - address: {b2}
        probe:
          command: [\"false\"]
          initial: up
      - address: {b3}
        probe:
          command: [\"sleep\", \"30\"]
"
    );
    let cfg = lab.write_config("lb.yaml", &yaml);
    let agent = lab.start_agent(&cfg);
    let pid = agent_pid(&cfg);
    assert!(pid.is_some(), "the agent's process was not found in /proc");

    // The probe's `sleep 30` shows up (so the scan below can see it at all).
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut seen = Vec::new();
    while seen.is_empty() && Instant::now() < deadline {
        seen = sleeps(&service, pid);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !seen.is_empty(),
        "never saw the exec probe's `sleep 30` running"
    );

    let up = wait_line(&agent, &["backend up", &be(b1)], Duration::from_secs(3));
    let down2 = wait_line(&agent, &["backend down", &be(b2)], Duration::from_secs(3));
    let down3 = wait_line(&agent, &["backend down", &be(b3)], Duration::from_secs(3));
    assert!(
        down2.contains("false failed: exit status: 1"),
        "b2's reason: {down2}"
    );
    assert!(
        down3.contains("sleep did not finish within 200ms and was killed"),
        "b3's reason names the timeout: {down3}"
    );
    eprintln!("{up}\n{down2}\n{down3}");

    // The probe keeps running every 500 ms, each `sleep 30` killed after 200 ms: for
    // 1.5 s no such process (zombies included) ever lives longer than 1 s.
    let until = Instant::now() + Duration::from_millis(1500);
    let mut observed = 0;
    while Instant::now() < until {
        let now = sleeps(&service, pid);
        observed += now.len();
        let old: Vec<_> = now
            .iter()
            .filter(|(_, age, _)| *age > Duration::from_secs(1))
            .collect();
        assert!(
            old.is_empty(),
            "the exec probe left `sleep 30` behind (pid, age, state): {old:?}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("sampled {observed} short-lived `sleep 30` processes, none older than 1 s");

    let t = http(&lab, IpAddr::V4(VIP4), 200);
    assert_answered_by(
        &t,
        &["b1"],
        &agent,
        "only the backend whose command succeeds",
    );
    assert_no_line(&agent, &["backend down", &be(b1)], "b1 went down");
    assert_no_line(&agent, &["backend up", &be(b2)], "b2 came up");
    assert_no_line(&agent, &["backend up", &be(b3)], "b3 came up");

    // Stopping the agent ends the probe in flight too.
    let mut agent = agent;
    let (status, log) = agent.stop();
    assert!(status.success(), "lb-agent exited with {status}:\n{log}");
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let left = sleeps(&service, pid);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "`sleep 30` still running 1 s after the agent stopped: {left:?}\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A UDP responder on `addr` in namespace `ns`: `ping` gets `pong`, anything else `huh`.
struct Responder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Responder {
    fn start(ns: &str, addr: SocketAddr) -> Responder {
        let sock = netns::run_in(ns, move || UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr} in {ns}: {e}"));
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop2.load(Ordering::SeqCst) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let reply: &[u8] = if &buf[..n] == b"ping" {
                        b"pong"
                    } else {
                        b"huh"
                    };
                    let _ = sock.send_to(reply, from);
                }
            }
        });
        Responder {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn udp_probe_any_reply_and_expected_reply() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    let (b1, b2, b3) = (&lab.backends[0], &lab.backends[1], &lab.backends[2]);
    // Responders on b1 and b2's own addresses (where the probes go); none on b3.
    let _responders: Vec<Responder> = [b1, b2]
        .iter()
        .flat_map(|b| {
            [
                Responder::start(&b.ns, SocketAddr::new(IpAddr::V4(b.v4), 5353)),
                Responder::start(&b.ns, SocketAddr::new(IpAddr::V6(b.v6), 5353)),
            ]
        })
        .collect();
    // dns: `ping` must get exactly `pong`. dns6: any reply to `hello` will do, except
    // that b2 (which answers `huh`) is held to `pong`.
    let yaml = format!(
        "services:
  - name: dns
    vip: {VIP4}
    port: 53
    protocol: udp
    probe:
      kind: udp
      port: 5353
      payload: ping
      expect: pong
      {FAST}
      rise: 1
      fall: 2
    backends:
      - address: {b1v4}
      - address: {b2v4}
      - address: {b3v4}
  - name: dns6
    vip: {VIP6}
    port: 53
    protocol: udp
    probe:
      kind: udp
      port: 5353
      payload: hello
      {FAST}
      rise: 1
      fall: 2
    backends:
      - address: {b1v6}
      - address: {b2v6}
        probe:
          expect: pong
",
        b1v4 = b1.v4,
        b2v4 = b2.v4,
        b3v4 = b3.v4,
        b1v6 = b1.v6,
        b2v6 = b2.v6,
    );
    let cfg = lab.write_config("lb.yaml", &yaml);
    let agent = lab.start_agent(&cfg);
    let started = Instant::now();

    let down3 = wait_line(
        &agent,
        &["backend down", "service=dns ", &be(b3.v4)],
        Duration::from_secs(5),
    );
    assert!(
        down3.contains("ICMP port unreachable"),
        "b3's reason: {down3}"
    );
    let down2 = wait_line(
        &agent,
        &["backend down", "service=dns6 ", &be(b2.v6)],
        Duration::from_secs(5),
    );
    assert!(
        down2.contains("unexpected reply \"huh\" (expected \"pong\")"),
        "b2's reason: {down2}"
    );
    eprintln!("{down3}\n{down2}");
    // Give the healthy ones 2 s of probing (10 probes each) to go wrong.
    std::thread::sleep(Duration::from_secs(2).saturating_sub(started.elapsed()));
    for addr in [b1.v4.to_string(), b2.v4.to_string(), b1.v6.to_string()] {
        assert_no_line(
            &agent,
            &["backend down", &be(&addr)],
            "a backend with a matching reply went down",
        );
    }

    let t = udp(&lab, IpAddr::V4(VIP4), 200);
    assert_answered_by(
        &t,
        &["b1", "b2"],
        &agent,
        "dns: only b1 and b2 (b3 has no responder)",
    );
    let t = udp(&lab, IpAddr::V6(VIP6), 100);
    assert_answered_by(
        &t,
        &["b1"],
        &agent,
        "dns6: only b1 (b2's reply is not the expected one)",
    );
}

#[test]
fn tcp_probe_and_none() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    lab.stop_http(1);
    let (b1, b2, b3) = (&lab.backends[0], &lab.backends[1], &lab.backends[2]);
    // web: tcp to port 80; b2's port 80 is closed; b3 is not probed. web6: tcp to
    // port 81, where nothing listens anywhere; b3 is not probed.
    let yaml = format!(
        "services:
  - name: web
    vip: {VIP4}
    port: 80
    probe:
      kind: tcp
      {FAST}
      rise: 1
      fall: 1
      initial: down
    backends:
      - address: {b1v4}
      - address: {b2v4}
      - address: {b3v4}
        probe:
          kind: none
  - name: web6
    vip: {VIP6}
    port: 80
    probe:
      kind: tcp
      port: 81
      {FAST}
      rise: 1
      fall: 1
      initial: down
    backends:
      - address: {b1v6}
      - address: {b3v6}
        probe: {{kind: none}}
",
        b1v4 = b1.v4,
        b2v4 = b2.v4,
        b3v4 = b3.v4,
        b1v6 = b1.v6,
        b3v6 = b3.v6,
    );
    let cfg = lab.write_config("lb.yaml", &yaml);
    let agent = lab.start_agent(&cfg);
    let started = Instant::now();

    let up = wait_line(
        &agent,
        &["backend up", "service=web ", &be(b1.v4)],
        Duration::from_secs(5),
    );
    eprintln!("{up}");
    std::thread::sleep(Duration::from_secs(2).saturating_sub(started.elapsed()));
    assert_no_line(
        &agent,
        &["backend up", &be(b2.v4)],
        "b2 came up although its port 80 is closed",
    );
    assert_no_line(
        &agent,
        &["backend up", &be(b1.v6)],
        "b1 came up in web6 although nothing listens on port 81",
    );
    // `none` targets are never probed, so never change state.
    assert_no_line(&agent, &[&be(b3.v4)], "b3 (probe kind none) changed state");
    assert_no_line(&agent, &[&be(b3.v6)], "b3 (probe kind none) changed state");

    let t = http(&lab, IpAddr::V4(VIP4), 300);
    assert_answered_by(
        &t,
        &["b1", "b3"],
        &agent,
        "web: b1 (tcp probe passes) and b3 (not probed)",
    );
    let t = http(&lab, IpAddr::V6(VIP6), 100);
    assert_answered_by(
        &t,
        &["b3"],
        &agent,
        "web6: only b3 (not probed) while b1's probe port is closed",
    );
}

/// A TCP probe is SYN, SYN-ACK, RST: the handshake is never completed, so the
/// backend's application never accepts a probe connection, and the agent keeps no
/// TIME-WAIT socket per probe. The SYNs come from the agent's raw sockets.
#[test]
fn tcp_probe_is_syn_synack_rst_and_never_reaches_the_application() {
    const PORT: u16 = 8081;
    let lab = Lab::new(1);
    let b1 = &lab.backends[0];
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    let _server = tcp_server(&b1.ns, PORT, move |_| {
        count.fetch_add(1, Ordering::SeqCst);
    });
    let mut capture = Capture::start(&b1.ns, "eth0", lab.dir.join("probes.pcap"));
    let yaml = format!(
        "services:
  - name: web
    vip: {VIP4}
    port: 80
    probe: {{kind: tcp, port: {PORT}, interval: 200ms, timeout: 150ms, rise: 2, fall: 1, initial: down}}
    backends:
      - address: {v4}
  - name: web6
    vip: {VIP6}
    port: 80
    probe: {{kind: tcp, port: {PORT}, interval: 200ms, timeout: 150ms, rise: 2, fall: 1, initial: down}}
    backends:
      - address: {v6}
",
        v4 = b1.v4,
        v6 = b1.v6,
    );
    let cfg = lab.write_config("lb.yaml", &yaml);
    let mut agent = lab.start_agent(&cfg);
    for service in ["service=web ", "service=web6 "] {
        let up = wait_line(&agent, &["backend up", service], Duration::from_secs(5));
        eprintln!("{up}");
    }
    // About ten more probes per family, then no more probes.
    std::thread::sleep(Duration::from_secs(2));
    let time_wait = ns_sh(
        &lab.balancer,
        &["ss", "-Htan", "state", "time-wait", &format!("( dport = :{PORT} )")],
    );
    let (status, _) = agent.stop();
    assert!(status.success(), "the agent exited with {status}\n{}", agent.log_text());
    capture.stop();

    let lines = capture.lines(&format!("tcp port {PORT}"));
    let with = |family: &str, flags: &str| {
        lines
            .iter()
            .filter(|l| l.contains(family) && l.contains(&format!("Flags [{flags}]")))
            .count()
    };
    for (family, what) in [(" IP ", "IPv4"), (" IP6 ", "IPv6")] {
        let (syn, syn_ack, rst) = (with(family, "S"), with(family, "S."), with(family, "R") + with(family, "R."));
        let others = lines
            .iter()
            .filter(|l| l.contains(family))
            .count()
            - syn
            - syn_ack
            - rst;
        assert!(
            syn >= 10 && syn_ack == syn && rst == syn && others == 0,
            "{what}: expected only SYN, SYN-ACK, RST, as many of each, at least 10: \
             {syn} SYN, {syn_ack} SYN-ACK, {rst} RST, {others} others:\n{}",
            lines.join("\n")
        );
    }
    // The SYNs come from the agent's raw sockets, whose few source ports take turns
    // (a socket per probe would take a new ephemeral port each time).
    for family in ["IP", "IP6"] {
        let ports: std::collections::BTreeSet<&str> =
            syn_sources(&lines, family).into_iter().map(|(_, port)| port).collect();
        assert!(
            !ports.is_empty() && ports.len() <= 8,
            "{family}: SYNs from {} source ports {ports:?}, expected the agent's pool of 8",
            ports.len()
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "the backend's application accepted probe connections"
    );
    let time_wait = String::from_utf8_lossy(&time_wait.stdout).to_string();
    assert!(
        time_wait.trim().is_empty(),
        "the agent's namespace holds TIME-WAIT sockets to the probe port:\n{time_wait}"
    );
}

/// IPv4 SYNs carry the source address of the route to the backend (the TCP checksum
/// covers it); the agent keeps it per backend and finds it again when the routes
/// change, so probes follow a new preferred source at once and never fail for it.
#[test]
fn tcp_probe_source_follows_a_route_change() {
    const NEW_SOURCE: &str = "198.18.0.99";
    let mut lab = Lab::new(1);
    lab.start_servers();
    let b1 = &lab.backends[0];
    let yaml = format!(
        "services:
  - name: web
    vip: {VIP4}
    port: 80
    probe: {{kind: tcp, interval: 200ms, timeout: 150ms, rise: 1, fall: 1, initial: down}}
    backends:
      - address: {v4}
",
        v4 = b1.v4,
    );
    let cfg = lab.write_config("lb.yaml", &yaml);
    let agent = lab.start_agent(&cfg);
    wait_line(&agent, &["backend up", "service=web "], Duration::from_secs(5));
    let mut capture = Capture::start(&b1.ns, "eth0", lab.dir.join("sources.pcap"));
    std::thread::sleep(Duration::from_millis(600));
    ns_sh(&lab.balancer, &["ip", "addr", "add", &format!("{NEW_SOURCE}/32"), "dev", "eth0"]);
    ns_sh(
        &lab.balancer,
        &["ip", "route", "replace", "198.18.0.0/24", "dev", "eth0", "src", NEW_SOURCE],
    );
    std::thread::sleep(Duration::from_millis(1500));
    capture.stop();
    let lines = capture.lines("tcp port 80");
    let sources: Vec<&str> = syn_sources(&lines, "IP").into_iter().map(|(addr, _)| addr).collect();
    let old = BALANCER4.to_string();
    assert!(
        sources.first() == Some(&old.as_str()) && sources.iter().rev().take(4).all(|s| *s == NEW_SOURCE),
        "SYN sources, in order: expected {old} first and {NEW_SOURCE} last: {sources:?}"
    );
    assert_no_line(&agent, &["backend down"], "a probe failed across the route change");
}

/// The source (address, port) of each SYN of `family` (`IP` or `IP6`) among tcpdump's
/// one-line summaries, in order.
fn syn_sources<'a>(lines: &'a [String], family: &str) -> Vec<(&'a str, &'a str)> {
    lines
        .iter()
        .filter(|l| l.contains(&format!(" {family} ")) && l.contains("Flags [S],"))
        .filter_map(|l| l.split_whitespace().nth(2)?.rsplit_once('.'))
        .collect()
}

/// Backend `ns`'s eth0 MAC.
fn mac_of(ns: &str) -> String {
    let out = ns_sh(ns, &["cat", "/sys/class/net/eth0/address"]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn backend_mac_change_is_followed() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    let (b1, b2, b3) = (&lab.backends[0], &lab.backends[1], &lab.backends[2]);
    let yaml = format!(
        "services:
  - name: web
    vip: {VIP4}
    port: 80
    backends:
      - address: {}
      - address: {}
      - address: {}
",
        b1.v4, b2.v4, b3.v4
    );
    let cfg = lab.write_config("lb.yaml", &yaml);
    let agent = lab.start_agent(&cfg);
    let before = http(&lab, IpAddr::V4(VIP4), 300);
    assert_answered_by(&before, &["b1", "b2", "b3"], &agent, "before any change");
    eprintln!("before: {}", spread(&before));

    // b1 gets a new MAC; the balancer's kernel does not know yet, nor the agent:
    // frames for b1 still go to the old MAC and are dropped by b1's NIC.
    let old = mac_of(&b1.ns);
    let new = "02:00:00:00:b1:01";
    ns_sh(&b1.ns, &["ip", "link", "set", "eth0", "address", new]);
    let stale = requests(
        &lab.client,
        Proto::Http,
        IpAddr::V4(VIP4),
        80,
        30,
        10,
        Duration::from_secs(30),
    );
    eprintln!(
        "b1 {old} -> {new}; with the stale neighbour entry: {}",
        spread(&stale)
    );
    if lines_with(&agent, &["backend MAC changed"]).is_empty() {
        assert!(
            stale.failures > 0 && !stale.by_backend.contains_key("b1"),
            "b1 still answered through its old MAC: {}",
            spread(&stale)
        );
    }

    // The neighbour entry follows (as an ARP update would make the kernel do).
    let t0 = Instant::now();
    ns_sh(
        &lab.balancer,
        &[
            "ip",
            "neigh",
            "replace",
            &b1.v4.to_string(),
            "lladdr",
            new,
            "dev",
            "eth0",
            "nud",
            "reachable",
        ],
    );
    let line = wait_line(
        &agent,
        &["backend MAC changed", &be(b1.v4), &format!("mac={new}")],
        Duration::from_secs(1),
    );
    eprintln!("followed after {:?}: {line}", t0.elapsed());
    // The line is logged just before the maps are written.
    std::thread::sleep(Duration::from_millis(100));
    let after = http(&lab, IpAddr::V4(VIP4), 200);
    assert_answered_by(
        &after,
        &["b1", "b2", "b3"],
        &agent,
        "after b1's MAC change was followed",
    );

    // b2 becomes unreachable as far as the kernel is concerned.
    let b2_mac = mac_of(&b2.ns);
    ns_sh(
        &lab.balancer,
        &[
            "ip",
            "neigh",
            "replace",
            &b2.v4.to_string(),
            "lladdr",
            &b2_mac,
            "dev",
            "eth0",
            "nud",
            "failed",
        ],
    );
    let line = wait_line(
        &agent,
        &["backend unreachable", &be(b2.v4)],
        Duration::from_secs(1),
    );
    eprintln!("{line}");
    // What traffic does then (reported, not asserted: the agent keeps b2's last MAC).
    std::thread::sleep(Duration::from_millis(100));
    let t = http(&lab, IpAddr::V4(VIP4), 150);
    eprintln!(
        "after b2's neighbour entry failed (b2 itself still up): {}",
        spread(&t)
    );
    assert_eq!(t.failures, 0, "{}\n{}", spread(&t), agent.log_text());
}

/// Services whose backends all start down (`initial: down`) have no Maglev table at
/// start; when their probes pass they must get one.
#[test]
fn services_starting_with_every_backend_down_come_up() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    let probe = format!(
        "    probe:\n      kind: tcp\n      {FAST}\n      rise: 1\n      fall: 1\n      initial: down\n"
    );
    let service = |name: &str, vip: IpAddr, port: u16, proto: &str, addrs: Vec<IpAddr>| {
        let backends: String = addrs
            .iter()
            .map(|a| format!("      - address: {a}\n"))
            .collect();
        format!(
            "  - name: {name}\n    vip: {vip}\n    port: {port}\n    protocol: {proto}\n{probe}    backends:\n{backends}"
        )
    };
    let v4: Vec<IpAddr> = lab.backends.iter().map(|b| IpAddr::V4(b.v4)).collect();
    let v6: Vec<IpAddr> = lab.backends.iter().map(|b| IpAddr::V6(b.v6)).collect();
    // dns is probed on the backends' TCP port 80 (the probe only decides liveness).
    let yaml = format!(
        "services:\n{}{}{}",
        service("web", IpAddr::V4(VIP4), 80, "tcp", v4.clone()),
        service("web6", IpAddr::V6(VIP6), 80, "tcp", v6),
        service("dns", IpAddr::V4(VIP4), 53, "udp", v4)
            .replace("kind: tcp", "kind: tcp\n      port: 80"),
    );
    let cfg = lab.write_config("lb.yaml", &yaml);
    let agent = lab.start_agent(&cfg);
    for service in ["web", "web6", "dns"] {
        for b in 0..3 {
            let addr = if service == "web6" {
                lab.backends[b].v6.to_string()
            } else {
                lab.backends[b].v4.to_string()
            };
            wait_line(
                &agent,
                &["backend up", &format!("service={service} "), &be(&addr)],
                Duration::from_secs(5),
            );
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_no_line(
        &agent,
        &["could not update the maps"],
        "a backend was logged up but the maps were not updated",
    );
    let all = ["b1", "b2", "b3"];
    assert_answered_by(&http(&lab, IpAddr::V4(VIP4), 150), &all, &agent, "web");
    assert_answered_by(&http(&lab, IpAddr::V6(VIP6), 150), &all, &agent, "web6");
    assert_answered_by(&udp(&lab, IpAddr::V4(VIP4), 150), &all, &agent, "dns");
}
