//! Fragmented datagrams of `nat` and `fullnat` flows end to end (native XDP, the
//! NAT and FULLNAT labs): a client sends UDP datagrams larger than the path's
//! 1500-byte MTU (its stack fragments them, IPv4 and IPv6) to the VIP; every
//! fragment must reach the backend translated, the backend reassemble the
//! datagram and send it back whole, in fragments again, which must reach the
//! client translated. Before fragments were translated they were dropped
//! (`drop_nat_unsupported`) and no datagram was answered.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use lb_agent::dataplane::Stats;
use lb_common::stat;
use lb_tests::{
    natlab::{NatLab, VIP4, VIP6},
    netns, traffic,
};

/// Datagrams per family, and their size (three fragments at 1500).
const DATAGRAMS: usize = 20;
const SIZE: usize = 4000;

fn config(lab: &NatLab, mode: &str) -> String {
    let pool = if mode == "fullnat" { "snat_addresses: [198.18.51.3, \"2001:db8:51::3\"]\nsnat_ports: 10000-30000\n" } else { "" };
    let b = &lab.backends[0];
    format!(
        "{pool}services:
  - {{ name: dns4, vip: {VIP4}, port: 53, protocol: udp, forwarding: {mode}, backends: [{{ address: {} }}] }}
  - {{ name: dns6, vip: \"{VIP6}\", port: 53, protocol: udp, forwarding: {mode}, backends: [{{ address: \"{}\" }}] }}
",
        b.v4, b.v6
    )
}

/// Sends `DATAGRAMS` datagrams of `SIZE` bytes to `vip`:53 from `ns`, each from a
/// socket of its own (a flow of its own); how many came back whole.
fn send_big(ns: &str, vip: IpAddr) -> usize {
    netns::run_in(ns, move || {
        let mut answers = 0;
        for i in 0..DATAGRAMS {
            let any: SocketAddr = if vip.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
            let s = UdpSocket::bind(any).expect("bind");
            s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
            let body = vec![b'a' + (i % 26) as u8; SIZE];
            s.send_to(&body, SocketAddr::new(vip, 53)).expect("send");
            let mut buf = vec![0u8; 65536];
            if let Ok(n) = s.recv(&mut buf) {
                answers += usize::from(buf[..n] == body[..]);
            }
        }
        answers
    })
}

fn run(mode: &str, lab: NatLab) {
    let b = &lab.backends[0];
    let _echo = traffic::udp_echo_server(&b.ns, &[SocketAddr::new(IpAddr::V4(b.v4), 53), SocketAddr::new(IpAddr::V6(b.v6), 53)]);
    let cfg = lab.write_config(&config(&lab, mode));
    let agent = lab.start_agent(&cfg);
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        let answers = send_big(&lab.client, vip);
        assert_eq!(answers, DATAGRAMS, "{mode}: {SIZE}-byte datagrams to {vip} echoed whole\n{}", agent.log_text());
    }
    let stats = Stats::read_pinned(&agent.pin_dir).expect("read the pinned maps");
    let reply = if mode == "fullnat" { stat::FULLNAT_REPLY } else { stat::NAT_REPLY };
    assert!(stats.get(reply) >= 6 * DATAGRAMS as u64, "{mode}: reply fragments translated ({})", stat::NAMES[reply as usize]);
    assert!(stats.get(stat::FRAG_FIRST) >= 2 * DATAGRAMS as u64, "{mode}: first fragments translated (frag_first)");
    assert!(stats.get(stat::FRAG_FOLLOWED) >= 4 * DATAGRAMS as u64, "{mode}: later fragments followed (frag_followed)");
    assert_eq!(stats.get(stat::DROP_NAT_UNSUPPORTED), 0, "{mode}: no fragment dropped");
}

#[test]
fn nat_fragmented_datagrams_go_both_ways() {
    run("nat", NatLab::new(1));
}

#[test]
fn fullnat_fragmented_datagrams_go_both_ways() {
    run("fullnat", NatLab::fullnat(1));
}
