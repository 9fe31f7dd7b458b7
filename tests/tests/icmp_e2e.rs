//! ICMP and fragments end to end in the DR lab (native XDP): the PMTU black hole
//! (a far client behind a 1400-byte link, `pmtu.rs`) is closed by forwarding
//! "fragmentation needed" / "packet too big" to the flow's backend, and stays open
//! with `forward_icmp: false`; UDP datagrams larger than the MTU (fragmented by
//! the client) are answered by one backend each; `ping VIP` is answered.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Command,
    time::Duration,
};

use lb_agent::dataplane::Stats;
use lb_common::stat;
use lb_tests::{
    lab::{Lab, VIP4, VIP6},
    netns,
    pmtu::{bulk_server, download, FarClient, BULK},
};

const BULK_PORT: u16 = 8080;

/// The bulk service on both VIPs, DR to the lab's three backends, plus the UDP
/// service on port 53.
fn config(lab: &Lab, globals: &str) -> String {
    let mut y = format!("{globals}services:\n");
    for (name, vip, port, proto, v6) in [
        ("bulk", VIP4.to_string(), BULK_PORT, "tcp", false),
        ("bulk6", VIP6.to_string(), BULK_PORT, "tcp", true),
        ("dns", VIP4.to_string(), 53, "udp", false),
        ("dns6", VIP6.to_string(), 53, "udp", true),
    ] {
        y += &format!("  - {{ name: {name}, vip: \"{vip}\", port: {port}, protocol: {proto}, backends: [");
        for b in &lab.backends {
            let a = if v6 { b.v6.to_string() } else { b.v4.to_string() };
            y += &format!("{{ address: \"{a}\" }}, ");
        }
        y += "] }\n";
    }
    y
}

#[test]
fn pmtu_black_hole_is_closed_by_forwarding_icmp_errors() {
    let mut lab = Lab::new(3);
    let far = FarClient::new(&lab);
    let _servers: Vec<_> = lab.backends.iter().map(|b| bulk_server(&b.ns, BULK_PORT)).collect();
    lab.start_servers();
    let path = lab.write_config("lb.yaml", &config(&lab, "forward_icmp: false\n"));
    let agent = lab.start_agent(&path);

    // Switched off: the router's ICMP errors end at the balancer; the backends
    // keep sending full-sized segments the narrow link cannot carry.
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        far.forget_pmtu(&lab);
        let r = download(&far.client, vip, BULK_PORT, Duration::from_secs(6));
        assert!(r.is_err(), "download from {vip} without ICMP forwarding should stall, got {r:?}");
        eprintln!("forward_icmp off, {vip}: {r:?}");
    }
    let stats = Stats::read_pinned(&agent.pin_dir).expect("read the pinned maps");
    assert!(stats.get(stat::PASS_ICMP) > 0, "the router's errors reached the balancer (pass_icmp)");
    assert_eq!(stats.get(stat::ICMP_FORWARDED), 0, "nothing forwarded while switched off");

    // Switched on (reload): the same downloads complete.
    lab.write_config("lb.yaml", &config(&lab, ""));
    agent.wait_log("reload applied", 0, Duration::from_secs(10));
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        far.forget_pmtu(&lab);
        let got = download(&far.client, vip, BULK_PORT, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("download of 1 MB from {vip} through a 1400-byte link: {e}"));
        assert!(got >= BULK, "download from {vip}: {got} bytes");
    }
    let stats = Stats::read_pinned(&agent.pin_dir).expect("read the pinned maps");
    assert!(stats.get(stat::ICMP_FORWARDED) >= 2, "errors forwarded to the backends (icmp_forwarded)");
}

/// Sends one datagram of `size` bytes from `src` (port 0: any) to `vip`:53 and
/// returns the answering backend's name (up to 3 tries).
fn ask(sock: &UdpSocket, vip: IpAddr, size: usize) -> Result<String, String> {
    let payload = vec![0x5a; size];
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        sock.send_to(&payload, SocketAddr::new(vip, 53)).map_err(|e| format!("send: {e}"))?;
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            return Ok(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
    Err(format!("no answer to a {size}-byte datagram to {vip}"))
}

#[test]
fn large_udp_datagrams_are_answered_by_one_backend() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    let path = lab.write_config("lb.yaml", &config(&lab, ""));
    let agent = lab.start_agent(&path);
    let sources = lab.add_client_addresses(20);

    // Both sizes, both families, from the client's main address.
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        for size in [4000, 20000] {
            let name = netns::run_in(&lab.client, move || {
                let any: SocketAddr = if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
                let sock = UdpSocket::bind(any).expect("bind");
                sock.set_read_timeout(Some(Duration::from_millis(700))).expect("timeout");
                ask(&sock, vip, size)
            });
            let name = name.unwrap_or_else(|e| panic!("{e}"));
            assert!(name.starts_with('b'), "{size} bytes to {vip}: answered {name:?}");
        }
    }

    // 1,000 datagrams (half 4,000, half 20,000 bytes) from 20 addresses and many
    // ports: every one answered, spread over the backends like flows.
    let tally = netns::run_in(&lab.client, move || {
        let mut by_backend: BTreeMap<String, u64> = BTreeMap::new();
        let mut failures = Vec::new();
        for i in 0..1000usize {
            let src = sources[i % sources.len()];
            let sock = UdpSocket::bind(SocketAddr::new(src, 0)).expect("bind");
            sock.set_read_timeout(Some(Duration::from_millis(700))).expect("timeout");
            let size = if i % 2 == 0 { 4000 } else { 20000 };
            match ask(&sock, IpAddr::V4(VIP4), size) {
                Ok(name) => *by_backend.entry(name).or_default() += 1,
                Err(e) => failures.push(e),
            }
        }
        (by_backend, failures)
    });
    let (by_backend, failures) = tally;
    assert!(failures.is_empty(), "{} datagrams unanswered, e.g. {:?}", failures.len(), &failures[..failures.len().min(3)]);
    assert_eq!(by_backend.values().sum::<u64>(), 1000);
    for (name, n) in &by_backend {
        assert!((200..=470).contains(n), "backend {name} answered {n} of 1000 (expected about a third): {by_backend:?}");
    }
    assert_eq!(by_backend.len(), 3, "all backends answer: {by_backend:?}");
    let stats = Stats::read_pinned(&agent.pin_dir).expect("read the pinned maps");
    assert!(stats.get(stat::FRAG_FIRST) >= 1000, "first fragments scheduled: {}", stats.get(stat::FRAG_FIRST));
    assert!(stats.get(stat::FRAG_FOLLOWED) >= 1000 * 2, "later fragments followed: {}", stats.get(stat::FRAG_FOLLOWED));
    eprintln!(
        "large UDP: {by_backend:?}; frag_first {}, frag_followed {}, drop_frag_unknown {}",
        stats.get(stat::FRAG_FIRST),
        stats.get(stat::FRAG_FOLLOWED),
        stats.get(stat::DROP_FRAG_UNKNOWN)
    );
}

#[test]
fn ping_to_a_vip_is_answered() {
    let mut lab = Lab::new(3);
    lab.start_servers();
    let path = lab.write_config("lb.yaml", &config(&lab, ""));
    let agent = lab.start_agent(&path);
    for (flag, vip) in [("-4", VIP4.to_string()), ("-6", VIP6.to_string())] {
        let out = Command::new("ip")
            .args(["netns", "exec", &lab.client, "ping", flag, "-c", "3", "-i", "0.2", "-W", "1", &vip])
            .output()
            .expect("run ping");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "ping {vip} from the client:\n{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("3 received"), "ping {vip}:\n{text}");
    }
    let stats = Stats::read_pinned(&agent.pin_dir).expect("read the pinned maps");
    assert!(stats.get(stat::ICMP_ECHO_REPLY) >= 6, "answered by the balancer: {}", stats.get(stat::ICMP_ECHO_REPLY));
}
