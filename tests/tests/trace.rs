//! `lb-agent trace` against a running agent in the namespace lab: one client's
//! packets among many, each decision's reason, one trace at a time, the budget,
//! and the filter cleared when the trace ends.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use aya::maps::{Array, MapData};
use lb_agent::trace::TraceLine;
use lb_common::{TraceFilter, PROTO_UDP};
use lb_tests::{
    flood::{parse_mac, Injector},
    frames::{ip_frame, udp},
    lab::{agent_bin, Lab, ECHO_PORT, VIP4},
    netns,
    traffic::{requests_from, LongLived},
};

/// A running `lb-agent trace --json`: its JSON lines arrive on a channel.
struct Trace {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Trace {
    fn start(lab: &Lab, args: &[&str]) -> Trace {
        let mut child = Command::new(agent_bin())
            .arg("trace")
            .args(args)
            .arg("--json")
            .arg("--socket")
            .arg(lab.control_socket())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start lb-agent trace");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (err, sink) = (child.stderr.take().expect("stderr"), stderr.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let t = Trace { child, lines, stderr };
        // The agent answers once the traced programs are verified (the first
        // trace loads them): started, or why not.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let err = t.stderr();
            if err.contains("tracing ") || err.contains("error:") {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        t
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Lines that arrive within `quiet` of each other (and at most `limit`).
    fn collect(&self, quiet: Duration, limit: Duration) -> Vec<TraceLine> {
        let end = Instant::now() + limit;
        let mut out = Vec::new();
        while Instant::now() < end {
            match self.lines.recv_timeout(quiet) {
                Ok(l) => out.push(serde_json::from_str(&l).unwrap_or_else(|e| panic!("trace line {l}: {e}"))),
                Err(_) => break,
            }
        }
        out
    }

    /// Ctrl-C, as an operator stops it.
    fn interrupt(mut self) -> String {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        self.stderr()
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn web_config(lab: &Lab) -> std::path::PathBuf {
    let list: String = lab.backends.iter().map(|b| format!("      - address: {}\n", b.v4)).collect();
    lab.write_config(
        "lb.yaml",
        &format!(
            "services:\n  - name: web\n    vip: {VIP4}\n    port: 80\n    backends:\n{list}\
             \x20 - name: echo\n    vip: {VIP4}\n    port: {ECHO_PORT}\n    backends:\n{list}\
             \x20 - name: dns\n    vip: {VIP4}\n    port: 53\n    protocol: udp\n    backends:\n{list}"
        ),
    )
}

/// The program's trace filter, read from the agent's pinned map.
fn pinned_filter(lab: &Lab) -> TraceFilter {
    let m = MapData::from_pin(lab.pin_dir().join("TRACE_FILTER")).expect("TRACE_FILTER pinned");
    let a: Array<_, TraceFilter> = Array::try_from(aya::maps::Map::Array(m)).expect("array");
    a.get(&0, 0).expect("entry 0")
}

/// The name of the XDP program on the balancer's eth0 (`ip -d link show`).
fn attached_program(lab: &Lab) -> String {
    let out = netns::ns_sh(&lab.balancer, &["ip", "-d", "link", "show", "eth0"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let name = text.split_whitespace().skip_while(|w| *w != "prog/xdp").skip_while(|w| *w != "name").nth(1);
    name.unwrap_or_else(|| panic!("no XDP program name on eth0:\n{text}")).to_string()
}

/// One HTTP GET from `src` (a fresh connection): (source port, backend name).
fn get_from(src: IpAddr) -> (u16, String) {
    use socket2::{Domain, Socket, Type};
    let remote = SocketAddr::new(IpAddr::V4(VIP4), 80);
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    sock.bind(&SocketAddr::new(src, 0).into()).expect("bind");
    sock.connect_timeout(&remote.into(), Duration::from_secs(2)).expect("connect");
    let mut c: TcpStream = sock.into();
    let port = c.local_addr().expect("local").port();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c.write_all(b"GET / HTTP/1.0\r\nHost: vip\r\n\r\n").expect("send");
    let mut resp = String::new();
    c.read_to_string(&mut resp).expect("read");
    (port, resp.split("\r\n\r\n").nth(1).expect("body").trim().to_string())
}

#[test]
fn tracing_one_client_among_many() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    let agent = lab.start_agent(&web_config(&lab));
    let sources = lab.add_client_addresses(20);
    let traced = sources[7];
    let names: BTreeMap<String, IpAddr> = lab.backends.iter().map(|b| (b.name.clone(), IpAddr::V4(b.v4))).collect();
    let trace = Trace::start(&lab, &["--client", &traced.to_string()]);
    assert!(trace.stderr().contains("tracing client"), "{}", trace.stderr());
    assert_eq!(pinned_filter(&lab).flags & lb_common::trace::TRACE_ON, 1, "the filter is set while tracing");
    assert_eq!(attached_program(&lab), "lb_xdp_trace", "the traced program is attached while tracing");

    // 950 requests from the other 19 clients, and 50 from the traced one, at once.
    let others: Vec<IpAddr> = sources.iter().copied().filter(|a| *a != traced).collect();
    let background = {
        let ns = lab.client.clone();
        std::thread::spawn(move || requests_from(&ns, &others, IpAddr::V4(VIP4), 80, 50))
    };
    let ours: Vec<(u16, String)> = netns::run_in(&lab.client, move || (0..50).map(|_| get_from(traced)).collect());
    let t = background.join().expect("background requests");
    assert_eq!(t.successes(), 950, "{t:?}");

    let lines = trace.collect(Duration::from_secs(2), Duration::from_secs(20));
    assert!(!lines.is_empty(), "nothing traced: {}\n{}", trace.stderr(), agent.log_text());
    for l in lines.iter().take(6) {
        eprintln!("{}", lb_agent::trace::render_text(l));
    }
    for l in &lines {
        assert_eq!(l.client, Some(traced), "a line of another client: {l:?}");
    }
    // Each connection's packets went to the backend that answered it.
    let by_port: BTreeMap<u16, &String> = ours.iter().map(|(p, n)| (*p, n)).collect();
    for l in lines.iter().filter(|l| l.verdict == "tx") {
        let name = by_port.get(&l.client_port).unwrap_or_else(|| panic!("traced port of no request: {l:?}"));
        assert_eq!(l.backend, Some(names[*name]), "{l:?} answered by {name}");
        assert_eq!(l.service.as_deref(), Some("web"), "{l:?}");
        assert!(l.backend_mac.is_some() && l.backend_state.as_deref() == Some("up"), "{l:?}");
    }
    // A new connection's SYN is scheduled: a miss, or "rescheduled" when the
    // client reused the source port of one of its earlier connections.
    let new_flows: Vec<&TraceLine> = lines.iter().filter(|l| l.tcp_flags == "S").collect();
    assert!(new_flows.iter().all(|l| ["conn_miss", "rescheduled"].contains(&l.conntrack.as_str())), "{new_flows:?}");
    assert_eq!(new_flows.len(), 50, "new flows traced for the client's 50 requests");
    assert!(new_flows.iter().all(|l| l.maglev_slot.is_some() && l.outcome == "forwarded"), "{new_flows:?}");
    assert!(lines.iter().any(|l| l.conntrack == "ct_promoted"), "the handshake's ACK moves each flow");

    let err = trace.interrupt();
    assert!(!err.contains("error"), "{err}");
    let deadline = Instant::now() + Duration::from_secs(3);
    while pinned_filter(&lab).flags != 0 {
        assert!(Instant::now() < deadline, "the filter is still set after Ctrl-C:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(agent.log_text().contains("trace stopped"), "{}", agent.log_text());
    // No trace code runs any more: the balancer without the hook is back.
    assert_eq!(attached_program(&lab), "lb_xdp");
}

#[test]
fn each_decision_is_traced_with_its_reason() {
    let mut lab = Lab::new(2);
    lab.start_servers();
    let agent = lab.start_agent(&web_config(&lab));
    let client = IpAddr::V4(lb_tests::lab::CLIENT4);
    let echo = LongLived::open(&lab.client, IpAddr::V4(VIP4), ECHO_PORT);
    let trace = Trace::start(&lab, &["--client", &client.to_string()]);

    // Not a VIP: the balancer's own address.
    netns::ns_sh(&lab.client, &["ping", "-c", "1", "-W", "1", &lb_tests::lab::BALANCER4.to_string()]);
    // An echo request to a VIP: the rare path (`lb_rare_trace`) answers and traces it.
    let ping = netns::ns_sh(&lab.client, &["ping", "-c", "1", "-W", "2", &VIP4.to_string()]);
    assert!(ping.status.success(), "the VIP answers ping: {}", String::from_utf8_lossy(&ping.stdout));
    // A VIP, but no service on the port.
    netns::run_in(&lab.client, || {
        let _ = TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(VIP4), 81), Duration::from_millis(300));
    });
    // Malformed: a UDP header cut short, to the VIP.
    let out = netns::ns_sh(&lab.balancer, &["cat", "/sys/class/net/eth0/address"]);
    let mac = parse_mac(String::from_utf8_lossy(&out.stdout).trim());
    netns::run_in(&lab.client, move || {
        let inj = Injector::open("eth0", mac);
        let mut f = ip_frame(None, client, IpAddr::V4(VIP4), PROTO_UDP, &udp(5000, 53, b"")[..4]);
        inj.send(&mut f);
    });
    // A drained backend's established flow keeps going to it.
    let backend = lab.backends.iter().find(|b| b.name == echo.backend).expect("echo backend").v4;
    let out = Command::new(agent_bin())
        .args(["drain", &backend.to_string(), "--service", "echo", "--socket"])
        .arg(lab.control_socket())
        .output()
        .expect("drain");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_millis(500));

    let lines = trace.collect(Duration::from_secs(2), Duration::from_secs(15));
    let r = echo.finish();
    assert!(r.error.is_none(), "{r:?}");
    let find = |what: &str, f: &dyn Fn(&TraceLine) -> bool| {
        lines.iter().find(|l| f(l)).unwrap_or_else(|| panic!("no {what} line in {lines:#?}\n{}", agent.log_text())).clone()
    };
    let not_vip = find("non-VIP", &|l| l.vip == Some(IpAddr::V4(lb_tests::lab::BALANCER4)));
    assert_eq!((not_vip.outcome.as_str(), not_vip.verdict.as_str()), ("pass_not_vip", "pass"), "{not_vip:?}");
    let no_svc = find("port 81", &|l| l.vip_port == 81);
    assert_eq!(no_svc.outcome, "pass_no_service", "{no_svc:?}");
    let echo_reply = find("echo request to the VIP", &|l| l.outcome == "icmp_echo_reply");
    assert_eq!((echo_reply.vip, echo_reply.verdict.as_str()), (Some(IpAddr::V4(VIP4)), "tx"), "{echo_reply:?}");
    let bad = find("malformed", &|l| l.outcome == "pass_malformed_l4");
    assert_eq!(bad.vip, Some(IpAddr::V4(VIP4)), "{bad:?}");
    let drained = find("drained backend", &|l| l.vip_port == ECHO_PORT && l.backend_state.as_deref() == Some("draining"));
    assert_eq!((drained.conntrack.as_str(), drained.outcome.as_str()), ("conn_hit", "forwarded"), "{drained:?}");
    assert_eq!(drained.backend, Some(IpAddr::V4(backend)), "{drained:?}");
    drop(trace);
}

#[test]
fn one_trace_at_a_time_and_a_budget() {
    let mut lab = Lab::new(2);
    lab.start_servers();
    let _agent = lab.start_agent(&web_config(&lab));
    let client = IpAddr::V4(lb_tests::lab::CLIENT4);
    let first = Trace::start(&lab, &["--client", &client.to_string(), "--budget", "20"]);
    assert!(first.stderr().contains("tracing client"), "{}", first.stderr());

    // A second trace is refused, naming the running one; the first goes on.
    let mut second = Trace::start(&lab, &["--vip", &format!("{VIP4}:80")]);
    let status = second.child.wait().expect("second trace exits");
    assert!(!status.success(), "a second trace must be refused");
    let err = second.stderr();
    assert!(err.contains("a trace is already running") && err.contains("client 198.18.0.2"), "{err}");
    assert_ne!(pinned_filter(&lab).flags, 0, "the first trace's filter stays");

    // 3,000 matching datagrams in well under a second: at most 20 records per
    // second and CPU are written, the rest are counted and reported.
    let out = netns::ns_sh(&lab.balancer, &["cat", "/sys/class/net/eth0/address"]);
    let mac = parse_mac(String::from_utf8_lossy(&out.stdout).trim());
    let started = Instant::now();
    netns::run_in(&lab.client, move || {
        let inj = Injector::open("eth0", mac);
        for i in 0..3000u16 {
            let mut f = ip_frame(None, client, IpAddr::V4(VIP4), PROTO_UDP, &udp(10000 + i, 53, b"q"));
            inj.send(&mut f);
        }
    });
    let secs = started.elapsed().as_secs_f64().ceil() + 1.0;
    let lines = first.collect(Duration::from_secs(2), Duration::from_secs(10));
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    assert!(!lines.is_empty(), "nothing traced");
    assert!(lines.len() as f64 <= 20.0 * cpus * secs, "{} lines over {secs} s: the budget did not hold", lines.len());
    // The note comes with the next second's report.
    std::thread::sleep(Duration::from_millis(1500));
    let err = first.interrupt();
    assert!(err.contains("records over the per-second budget not written"), "{err}");
}
