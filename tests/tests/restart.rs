//! Restarting the agent without losing traffic: the balancer keeps forwarding from
//! its pinned program and maps while no agent runs, and the next agent adopts
//! them (connection table kept) and swaps its program in through the pinned link.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use lb_agent::dataplane::Stats;
use lb_common::stat;
use lb_tests::{
    lab::{agent_bin, terminate, Lab, ECHO_PORT, VIP4},
    netns,
    traffic::{requests, Load, LongLived, Proto, Worker},
};

/// UDP request/reply over one socket per round, counting what was sent and what
/// came back (each reply is the backend's name, so it proves the datagram got
/// through the balancer).
fn udp_stream(ns: &str, vip: IpAddr) -> Worker<(u64, u64)> {
    Worker::spawn_in(ns, move |stop| {
        let (mut sent, mut answered) = (0u64, 0u64);
        let end = Instant::now() + Duration::from_secs(120);
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::SeqCst) && Instant::now() < end {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            s.connect(SocketAddr::new(vip, 53)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(1))).expect("timeout");
            s.send(b"who").expect("send");
            sent += 1;
            if s.recv(&mut buf).is_ok() {
                answered += 1;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        (sent, answered)
    })
}

/// The lab's services over its first `n` backends.
fn config(lab: &Lab, n: usize) -> std::path::PathBuf {
    let backends: String = lab.backends[..n].iter().map(|b| format!("      - address: {}\n", b.v4)).collect();
    lab.write_config(
        "lb.yaml",
        &format!(
            "services:
  - name: web
    vip: {VIP4}
    port: 80
    backends:
{backends}  - name: echo
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
    )
}

fn xdp_prog_id(lab: &Lab) -> String {
    let out = netns::ns_sh(&lab.balancer, &["ip", "-d", "link", "show", "eth0"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let id = text.split_whitespace().skip_while(|w| *w != "prog/xdp").nth(2).map(str::to_string);
    id.unwrap_or_else(|| panic!("no XDP program on the balancer's eth0:\n{text}"))
}

/// Runs traffic across `restart` and checks nothing was lost or broken.
fn across(lab: &mut Lab, restart: impl FnOnce(&Lab) -> lb_tests::lab::Agent) {
    let conns: Vec<LongLived> = (0..16).map(|_| LongLived::open(&lab.client, IpAddr::V4(VIP4), ECHO_PORT)).collect();
    let load = Load::start(&lab.client, IpAddr::V4(VIP4), 80);
    let udp = udp_stream(&lab.client, IpAddr::V4(VIP4));
    std::thread::sleep(Duration::from_millis(500));
    let before = xdp_prog_id(lab);

    let agent = restart(lab);

    std::thread::sleep(Duration::from_millis(700));
    let after = xdp_prog_id(lab);
    let http = load.finish();
    let (sent, answered) = udp.finish();
    let log = agent.log_text();
    assert!(log.contains("maps reused, connection table kept"), "the new agent adopts the maps:\n{log}");
    assert!(log.contains("replaced the program in the pinned link"), "and swaps its program in:\n{log}");
    assert_ne!(before, after, "a new program instance is attached");

    let failed: Vec<_> = http.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(http.len() > 50 && failed.is_empty(), "{} of {} HTTP requests failed: {failed:?}", failed.len(), http.len());
    assert!(sent > 50, "the UDP stream ran ({sent} sent)");
    assert_eq!(answered, sent, "UDP datagrams lost across the restart");
    for c in conns {
        let r = c.finish();
        assert!(r.error.is_none(), "long-lived connection to {} broke: {:?}", r.backend, r.error);
        assert!(r.exchanges > 5, "long-lived connection to {} barely ran", r.backend);
    }
    let stats = Stats::read_pinned(&lab.pin_dir()).expect("read the pinned maps");
    assert_eq!(stats.get(stat::DROP_NO_BACKEND), 0, "nothing dropped");
    assert_eq!(stats.get(stat::PASS_NOT_READY), 0, "never passed as not ready");
}

/// `ping VIP` from the client is answered: the balancer answers echo requests on
/// its rare path (`lb_rare`, a tail call through the pinned `RARE_PROGS`), so this
/// shows the tail call works while no agent runs.
fn assert_ping_answered(lab: &Lab, when: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.client, "ping", "-4", "-c", "3", "-i", "0.2", "-W", "1", &VIP4.to_string()])
        .output()
        .expect("run ping");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("3 received"), "ping {VIP4} {when} (the rare path's tail call):\n{text}");
}

// The new agent starts with a fourth backend: Maglev would move about a quarter of
// the flows, so only the kept connection table keeps the long-lived connections
// (and the HTTP requests in flight) on their backends.

#[test]
fn sigkill_and_restart_lose_nothing() {
    let mut lab = Lab::new(4);
    lab.start_servers();
    let mut first = lab.start_agent(&config(&lab, 3));
    across(&mut lab, |lab| {
        first.kill();
        // No agent at all for a while: the pinned balancer forwards on its own,
        // the tail-called rare path included.
        std::thread::sleep(Duration::from_millis(300));
        assert_ping_answered(lab, "after the agent was killed");
        lab.start_agent(&config(lab, 4))
    });
}

#[test]
fn keep_on_exit_then_replacement_loses_nothing() {
    let mut lab = Lab::new(4);
    lab.start_servers();
    let mut first = lab.start_agent_with(&config(&lab, 3), &["--keep-on-exit"]);
    across(&mut lab, |lab| {
        let (status, log) = first.stop_keeping();
        assert!(status.success(), "{log}");
        assert!(log.contains("left attached"), "{log}");
        assert_ping_answered(lab, "after the agent exited with --keep-on-exit");
        lab.start_agent(&config(lab, 4))
    });
}

/// An upgrade: the pins an older version left lack the maps added since
/// (`NAT_REVERSE`, `EGRESS_MAC`) and hold a `STATS` of fewer counters, a
/// `FIRST_RECORD` of 64-byte records (half-open handshakes only) and a `MAGLEV`
/// of 4-byte slots (tables the agent writes anyway). The new agent creates
/// those afresh and adopts the rest, the connection table with it.
#[test]
fn an_older_versions_pins_are_adopted_with_the_maps_it_lacked_created() {
    let mut lab = Lab::new(4);
    lab.start_servers();
    let mut first = lab.start_agent(&config(&lab, 3));
    across(&mut lab, |lab| {
        first.kill();
        let pins = lab.pin_dir();
        for name in [lb_common::map_names::NAT_REVERSE, lb_common::map_names::EGRESS_MAC] {
            std::fs::remove_file(pins.join(name)).unwrap_or_else(|e| panic!("remove the pin of {name}: {e}"));
        }
        pin_older_map(&pins, lb_common::map_names::STATS, "percpu_array", 8, Some(8), &[]);
        // FIRST_RECORD with the 64-byte records of the version before the 16-byte ones.
        let first = pin_older_map(&pins, lb_common::map_names::FIRST_RECORD, "array", 64, None, &["flags", "1024"]);
        // MAGLEV with 4-byte slots, as before the 16-bit ones. The old program
        // keeps the map it was loaded with; only the pin is replaced.
        let maglev = pin_older_map(&pins, lb_common::map_names::MAGLEV, "array", 4, None, &["flags", "1024"]);
        let agent = lab.start_agent(&config(lab, 4));
        let log = agent.log_text();
        assert!(log.contains("creating it afresh") && log.contains("STATS"), "STATS of 8 counters is replaced:\n{log}");
        assert!(log.contains("FIRST_RECORD"), "FIRST_RECORD of 64-byte records is replaced:\n{log}");
        assert!(log.contains("map=\"MAGLEV\"") || log.contains("map=MAGLEV"), "MAGLEV of 4-byte slots is replaced:\n{log}");
        assert_eq!(pinned(&maglev).value_size(), 8, "MAGLEV is created with this build's elements");
        assert_eq!(pinned(&first).value_size() as usize, size_of::<lb_common::FirstRecord>(), "FIRST_RECORD is created with this build's records");
        for name in [lb_common::map_names::NAT_REVERSE, lb_common::map_names::EGRESS_MAC] {
            assert!(pins.join(name).exists(), "{name} is created and pinned");
        }
        agent
    });
}

/// Replaces the pinned map `name` under `pins` with an empty one of another
/// version's layout, made by bpftool: a `kind` of 4-byte keys and `value`-byte
/// values, `entries` of them (default: as many as the pinned one), then
/// `extra` arguments. Returns the pin's path.
fn pin_older_map(pins: &Path, name: &str, kind: &str, value: u32, entries: Option<u32>, extra: &[&str]) -> PathBuf {
    let path = pins.join(name);
    let entries = entries.unwrap_or_else(|| pinned(&path).max_entries());
    std::fs::remove_file(&path).unwrap_or_else(|e| panic!("remove the pin of {name}: {e}"));
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&path)
        .args(["type", kind, "key", "4", "value", &value.to_string(), "entries", &entries.to_string(), "name", name])
        .args(extra)
        .output()
        .expect("run bpftool");
    assert!(out.status.success(), "bpftool map create {name}: {}", String::from_utf8_lossy(&out.stderr));
    path
}

/// What the kernel says of the map pinned at `path`.
fn pinned(path: &Path) -> aya::maps::MapInfo {
    aya::maps::MapData::from_pin(path)
        .and_then(|m| Ok(m.info()?))
        .unwrap_or_else(|e| panic!("read the map pinned at {}: {e}", path.display()))
}

/// Starts another `lb-agent run` on the balancer's eth0 with `pin_dir` and its own
/// control socket and metrics port (so only the pin directory or the interface can
/// collide), and waits up to 15 s for it to exit: (exit code, how long it ran,
/// stderr). A process still running then is stopped and reported as `None`.
fn second_agent(lab: &Lab, config: &Path, pin_dir: &Path) -> (Option<i32>, Duration, String) {
    let err = lab.dir.join("second-agent.log");
    let started = Instant::now();
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.balancer))
        .arg("--")
        .arg(agent_bin())
        .args(["run", "--iface", "eth0", "--xdp-mode", "native", "--metrics-listen", "127.0.0.1:9643", "--config"])
        .arg(config)
        .arg("--pin-dir")
        .arg(pin_dir)
        .arg("--control-socket")
        .arg(lab.dir.join("second.sock"))
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).expect("second agent's log"))
        .spawn()
        .expect("start a second lb-agent");
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait for the second agent") {
            break status.code();
        }
        if started.elapsed() > Duration::from_secs(15) {
            terminate(&mut child, Duration::from_secs(5));
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&err).unwrap_or_default();
    eprintln!("second agent: exit {code:?} after {:?}:\n{text}", started.elapsed());
    (code, started.elapsed(), text)
}

/// What proves the first agent's balancer is intact: its program still attached,
/// its pins in place, traffic forwarded, its control socket answering.
fn assert_first_intact(lab: &Lab, prog_before: &str) {
    assert_eq!(xdp_prog_id(lab), prog_before, "the running balancer's program was replaced");
    for pin in ["link", "CONFIG", "CONNTRACK", lb_common::PROG_BALANCER] {
        assert!(lab.pin_dir().join(pin).exists(), "pin {pin} is gone");
    }
    let t = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, 60, 2, Duration::from_secs(30));
    assert_eq!(t.failures, 0, "{:?}", t.first_errors);
    let out = Command::new(agent_bin()).args(["status", "--socket"]).arg(lab.control_socket()).output().unwrap();
    assert!(out.status.success(), "the first agent answers: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_second_agent_on_the_same_pin_dir_is_refused_and_adopts_once_the_first_is_gone() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    let cfg = config(&lab, 3);
    let mut first = lab.start_agent(&cfg);
    let prog = xdp_prog_id(&lab);

    let (code, took, err) = second_agent(&lab, &cfg, &lab.pin_dir());
    assert_eq!(code, Some(1), "a second agent on the same pin directory must exit 1 (None: it kept running):\n{err}");
    assert!(took < Duration::from_secs(5), "refused only after {took:?}:\n{err}");
    let pid = first.pid();
    assert!(
        err.contains(&format!("pin directory {} is in use by another lb-agent (pid {pid}: ", lab.pin_dir().display()))
            && err.contains("lb-agent run --iface eth0"),
        "the refusal names the owner (pid {pid}) and its command line:\n{err}"
    );
    assert!(!err.contains("attached") && !err.contains("adopting"), "it touched the balancer:\n{err}");
    assert_first_intact(&lab, &prog);

    // The owner crashes: the kernel drops its lock, the next agent adopts.
    first.kill();
    let next = lab.start_agent(&cfg);
    let log = next.log_text();
    assert!(log.contains("maps reused, connection table kept"), "{log}");
    let t = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, 60, 2, Duration::from_secs(30));
    assert_eq!(t.failures, 0, "{:?}", t.first_errors);
}

#[test]
fn an_agent_with_another_pin_dir_is_refused_the_interface() {
    let mut lab = Lab::new(2);
    lab.start_servers();
    let cfg = config(&lab, 2);
    let _first = lab.start_agent(&cfg);
    let prog = xdp_prog_id(&lab);

    let other = Path::new("/sys/fs/bpf").join(format!("{}-other", lab.id));
    let (code, took, err) = second_agent(&lab, &cfg, &other);
    let leftover = other.exists();
    let _ = std::fs::remove_dir_all(&other);
    assert_eq!(code, Some(1), "an agent on an interface another balancer holds must exit 1:\n{err}");
    assert!(took < Duration::from_secs(5), "refused only after {took:?}:\n{err}");
    assert!(
        err.contains(&format!("interface eth0 already carries XDP program {prog} (lb_xdp)")),
        "the refusal names the program on the interface ({prog}):\n{err}"
    );
    assert!(!leftover, "the refused agent left {} behind", other.display());
    assert_first_intact(&lab, &prog);
}

/// A first agent started without `nat` services creates the NAT tables with one
/// entry each; a restart whose file adds a `nat` service adopts the maps (the
/// connection table with them) and creates those three afresh at full size.
/// A `FIRST_RECORD` of the size an older version gave the default
/// `conntrack_size` (262,144 slots, 4 MB) is created afresh at this build's.
#[test]
fn a_restart_that_adds_the_first_nat_service_sizes_the_nat_tables_and_keeps_the_rest() {
    let mut lab = Lab::new(4);
    lab.start_servers();
    let mut first = lab.start_agent(&config(&lab, 3));
    let names = [lb_common::map_names::NAT_REVERSE, lb_common::map_names::FULLNAT_REVERSE, lb_common::map_names::FULLNAT_FORWARD];
    let entries = |pins: &Path, name: &str| pinned(&pins.join(name)).max_entries();
    for name in names {
        assert_eq!(entries(&lab.pin_dir(), name), lb_agent::pinning::NAT_UNSIZED, "{name} unsized without nat services");
    }
    across(&mut lab, |lab| {
        first.kill();
        let path = config(lab, 4);
        let mut text = std::fs::read_to_string(&path).expect("the configuration");
        text += &format!(
            "  - name: natweb\n    vip: {VIP4}\n    port: 8080\n    forwarding: nat\n    backends:\n      - address: {}\n        port: 80\n",
            lab.backends[0].v4
        );
        std::fs::write(&path, text).expect("write the configuration");
        let record_size = size_of::<lb_common::FirstRecord>() as u32;
        let first = pin_older_map(&lab.pin_dir(), lb_common::map_names::FIRST_RECORD, "array", record_size, Some(262_144), &["flags", "1024"]);
        let agent = lab.start_agent(&path);
        let log = agent.log_text();
        assert!(log.contains("FIRST_RECORD holds 262144 entries"), "FIRST_RECORD of 262,144 slots is replaced:\n{log}");
        let want = lb_common::first_record_entries(lb_agent::config::DEFAULT_CONNTRACK_SIZE);
        assert_eq!(pinned(&first).max_entries(), want, "FIRST_RECORD is created at this build's size");
        for name in names {
            assert!(log.contains("creating it afresh") && log.contains(name), "{name} is created afresh:\n{log}");
            assert!(entries(&lab.pin_dir(), name) > lb_agent::pinning::NAT_UNSIZED, "{name} sized for the nat service");
        }
        agent
    });
}
