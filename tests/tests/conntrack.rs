//! Established flows survive connection-table floods: with a 1,024-entry table, a
//! flood of two-packet flows hundreds of times its size, then a reload that moves
//! Maglev slots, breaks no long-lived connection (TCP or UDP), active or idle.
//! The same run with the established table turned off (`established_size: 0`,
//! everything in the LRU as before) shows the test catches the eviction.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Command,
    time::Duration,
};

use lb_agent::{dataplane::Stats, status::Status};
use lb_common::{stat, PROTO_TCP, PROTO_UDP};
use lb_tests::{
    flood::{parse_mac, two_packet_flows, Injector},
    lab::{agent_bin, Lab, ECHO_PORT, VIP4},
    netns,
    traffic::{requests, LongLived, Proto},
};

/// Port of the services the floods go to (nothing listens there on the backends).
const SINK_PORT: u16 = 9;
const TABLE: u32 = 1024;

/// Services over the first `n` backends: echo (TCP) and dns (UDP) carry the
/// long-lived flows, sink-tcp and sink-udp take the floods.
fn config(lab: &Lab, n: usize, established_size: Option<u32>) -> std::path::PathBuf {
    config_with(lab, n, established_size, "timeouts: { tcp_fin: 10s }\n")
}

/// `config` with more top-level lines (`extra`) and a web service on port 80.
fn config_with(lab: &Lab, n: usize, established_size: Option<u32>, extra: &str) -> std::path::PathBuf {
    let backends: String = lab.backends[..n].iter().map(|b| format!("      - address: {}\n", b.v4)).collect();
    let est = established_size.map(|s| format!("established_size: {s}\n")).unwrap_or_default();
    let svc = |name: &str, port: u16, proto: &str| {
        format!("  - name: {name}\n    vip: {VIP4}\n    port: {port}\n    protocol: {proto}\n    backends:\n{backends}")
    };
    lab.write_config(
        "lb.yaml",
        &format!(
            "conntrack_size: {TABLE}\n{est}{extra}services:\n{}{}{}{}{}",
            svc("web", 80, "tcp"),
            svc("echo", ECHO_PORT, "tcp"),
            svc("dns", 53, "udp"),
            svc("sink-tcp", SINK_PORT, "tcp"),
            svc("sink-udp", SINK_PORT, "udp"),
        ),
    )
}

/// A UDP "connection": one socket, one 5-tuple, asking its backend's name.
struct UdpFlow {
    sock: UdpSocket,
    backend: String,
}

impl UdpFlow {
    fn open(ns: &str) -> UdpFlow {
        let sock = netns::run_in(ns, || {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            s.connect(SocketAddr::new(IpAddr::V4(VIP4), 53)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(1))).expect("timeout");
            s
        });
        let mut flow = UdpFlow { sock, backend: String::new() };
        flow.backend = flow.ask().expect("first UDP answer");
        // Two exchanges: a UDP "connection" (one datagram alone is a request,
        // and stays in the LRU table).
        assert_eq!(flow.ask().as_deref(), Ok(flow.backend.as_str()), "second UDP answer");
        flow
    }

    /// The name of the backend that answers now (three tries).
    fn ask(&self) -> Result<String, String> {
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            self.sock.send(b"who").map_err(|e| e.to_string())?;
            if let Ok(n) = self.sock.recv(&mut buf) {
                return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        Err("no answer".into())
    }
}

fn balancer_mac(lab: &Lab) -> [u8; 6] {
    let out = netns::ns_sh(&lab.balancer, &["cat", "/sys/class/net/eth0/address"]);
    parse_mac(String::from_utf8_lossy(&out.stdout).trim())
}

fn status(lab: &Lab) -> Status {
    let out = Command::new(agent_bin())
        .args(["status", "--json", "--socket"])
        .arg(lab.control_socket())
        .output()
        .expect("run lb-agent status");
    assert!(out.status.success(), "lb-agent status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// What happened to the long-lived flows.
struct Outcome {
    broken: Vec<String>,
    /// The connection table before the flood (after the long-lived flows began).
    before: lb_agent::conntrack::TableStatus,
    stats: Stats,
    status: Status,
}

/// 16 TCP connections (8 exchanging every 100 ms, 8 idle) and 16 UDP flows (8
/// asked again just before the flood, 8 idle), a TCP flood of `tcp_flows` and a
/// UDP flood of `udp_flows` two-packet flows, then a reload that adds a third
/// backend. Returns the flows that broke or moved.
fn flood_then_reload(established_size: Option<u32>, tcp_flows: u32, udp_flows: u32) -> Outcome {
    let mut lab = Lab::new(3);
    lab.start_servers();
    let cfg = config(&lab, 2, established_size);
    let agent = lab.start_agent(&cfg);
    let vip = IpAddr::V4(VIP4);
    let active: Vec<LongLived> = (0..8).map(|_| LongLived::open(&lab.client, vip, ECHO_PORT)).collect();
    let idle: Vec<LongLived> = (0..8).map(|_| LongLived::open_idle(&lab.client, vip, ECHO_PORT)).collect();
    let udp: Vec<UdpFlow> = (0..16).map(|_| UdpFlow::open(&lab.client)).collect();
    // Their second packets have gone by: established.
    let mut before = status(&lab).conntrack;
    for _ in 0..50 {
        if before.established >= 32 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        before = status(&lab).conntrack;
    }
    for f in &udp[..8] {
        f.ask().expect("UDP flow answers before the flood");
    }

    let mac = balancer_mac(&lab);
    let sent = netns::run_in(&lab.client, move || {
        let inj = Injector::open("eth0", mac);
        let tcp = two_packet_flows(&inj, PROTO_TCP, vip, SINK_PORT, tcp_flows);
        let udp = two_packet_flows(&inj, PROTO_UDP, vip, SINK_PORT, udp_flows);
        (tcp, udp)
    });
    eprintln!("flood: {} TCP and {} UDP frames sent", sent.0, sent.1);

    let reloads = agent.count_log("reload applied");
    config(&lab, 3, established_size);
    agent.wait_log("reload applied", reloads, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));

    let mut broken = Vec::new();
    for (kind, conns) in [("active", active), ("idle", idle)] {
        for c in conns {
            let r = c.finish();
            if let Some(e) = r.error {
                broken.push(format!("{kind} TCP connection to {}: {e}", r.backend));
            }
        }
    }
    for f in &udp {
        match f.ask() {
            Ok(name) if name == f.backend => {}
            Ok(name) => broken.push(format!("UDP flow moved from {} to {name}", f.backend)),
            Err(e) => broken.push(format!("UDP flow to {}: {e}", f.backend)),
        }
    }
    let stats = Stats::read_pinned(&agent.pin_dir).expect("read the pinned counters");
    // The sweep runs every second here (a tenth of tcp_fin, at least 1 s).
    std::thread::sleep(Duration::from_millis(1500));
    let status = status(&lab);
    Outcome { broken, stats, status, before }
}

fn summary(o: &Outcome) -> String {
    let names = ["conn_miss", "conn_hit", "ct_promoted", "ct_established_full", "ct_midflow_miss", "conn_insert_failed"];
    let counters: Vec<String> = names
        .iter()
        .map(|n| {
            let i = stat::NAMES.iter().position(|x| x == n).expect("counter name") as u32;
            format!("{n}={}", o.stats.get(i))
        })
        .collect();
    format!(
        "{}\nconntrack before: {:?}\nconntrack after: {:?}\nbroken: {:#?}",
        counters.join(" "),
        o.before,
        o.status.conntrack,
        o.broken
    )
}

#[test]
fn established_flows_survive_floods_and_a_reload() {
    let o = flood_then_reload(None, 300_000, 10 * TABLE);
    let text = summary(&o);
    eprintln!("{text}");
    // The floods really went through the table: far more new flows than it holds.
    assert!(o.stats.get(stat::CONN_MISS) > 100 * u64::from(TABLE), "the flood did not reach the table:\n{text}");
    // They also filled the established table (their second packets look like
    // life), so it was full while the long-lived flows kept their entries.
    assert!(o.stats.get(stat::CT_ESTABLISHED_FULL) > 0, "the established table never filled:\n{text}");
    let (before, after) = (&o.before, &o.status.conntrack);
    assert_eq!((after.new_capacity, after.established_capacity), (TABLE, TABLE), "{text}");
    // The 32 long-lived flows were established before the flood; after it the
    // table is full.
    assert!(before.established >= 32, "{text}");
    assert_eq!(after.established + after.closing, u64::from(TABLE), "{text}");
    assert!(o.broken.is_empty(), "long-lived flows broke:\n{text}");
}

#[test]
fn without_the_established_table_the_flood_breaks_flows() {
    // The control: everything in the LRU, as before the established table.
    let o = flood_then_reload(Some(0), 300_000, 10 * TABLE);
    let text = summary(&o);
    eprintln!("{text}");
    assert_eq!(o.stats.get(stat::CT_PROMOTED), 0, "{text}");
    assert!(!o.broken.is_empty(), "no flow broke without protection: the test would not catch eviction:\n{text}");
}

#[test]
fn idle_entries_expire_after_their_timeout() {
    let mut lab = Lab::new(2);
    lab.start_servers();
    let cfg = config_with(&lab, 2, None, "timeouts: { tcp: 6s, tcp_fin: 1s, udp: 2s }\n");
    let agent = lab.start_agent(&cfg);
    let vip = IpAddr::V4(VIP4);
    let idle: Vec<LongLived> = (0..2).map(|_| LongLived::open_idle(&lab.client, vip, ECHO_PORT)).collect();
    let _udp = UdpFlow::open(&lab.client);
    // Short connections: the client's FIN marks their entries closing.
    let t = requests(&lab.client, Proto::Http, vip, 80, 20, 2, Duration::from_secs(20));
    assert_eq!(t.successes(), 20, "{t:?}");

    // Closing entries go after tcp_fin (1 s), UDP after 2 s; the idle TCP ones stay.
    let wait = |what: &str, done: &dyn Fn(&lb_agent::conntrack::TableStatus) -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let ct = status(&lab).conntrack;
            if done(&ct) {
                return ct;
            }
            assert!(std::time::Instant::now() < deadline, "{what}: {ct:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // The agent turns the SYN filter on at its second sweep (1 s apart here).
    wait("the SYN filter turns on", &|ct| ct.syn_filter);
    let ct = wait("closing and UDP entries expire", &|ct| ct.closing == 0 && ct.expired_total >= 21);
    let dump = || {
        let path = agent.pin_dir.join("CT_ESTABLISHED");
        let out = Command::new("bpftool").args(["map", "dump", "pinned"]).arg(path).output().expect("bpftool");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(ct.established, 2, "the idle TCP connections are still established: {ct:?}\n{}", dump());
    let ct = wait("idle TCP entries expire after 6 s", &|ct| ct.established == 0);
    assert!(ct.expired_total >= 23, "{ct:?}");

    // An idle connection whose entry expired is scheduled again on its next packet:
    // with the same backends, to the same backend (counted as a mid-flow miss).
    let before = Stats::read_pinned(&agent.pin_dir).expect("counters").get(stat::CT_MIDFLOW_MISS);
    for c in idle {
        let r = c.finish();
        assert!(r.error.is_none(), "an idle connection broke after its entry expired: {r:?}");
    }
    let after = Stats::read_pinned(&agent.pin_dir).expect("counters").get(stat::CT_MIDFLOW_MISS);
    assert!(after >= before + 2, "expected mid-flow misses for the expired connections: {before} -> {after}");
}
