//! ICMP errors of `nat` flows end to end in the NAT lab (native XDP): the PMTU
//! black hole on either side of the balancer (`natpmtu.rs`) stays open with
//! `forward_icmp: false` and is closed once the balancer translates the errors:
//!
//! - a download through a 1400-byte link on the clients' side: the router's
//!   "fragmentation needed" / "packet too big" goes to the VIP and must reach the
//!   backend as an error about its own packet (backend:port -> client);
//! - an upload to a backend behind a 1400-byte link: that router's error goes to
//!   the client, through the balancer, and must reach it as an error about its
//!   packet to the VIP (client -> VIP:port).

use std::{net::IpAddr, time::Duration};

use lb_agent::dataplane::Stats;
use lb_common::stat;
use lb_tests::{
    natlab::{NatLab, VIP4, VIP6},
    natpmtu::{forget_pmtu, narrow_client_link, sink_server, upload, FarBackend, FAR_BACKEND4, FAR_BACKEND6, UPLOAD},
    pmtu::{bulk_server, download, BULK},
};

const PORT: u16 = 8080;

/// A `nat` service on `PORT` of both VIPs to these backends (IPv4, IPv6).
fn config(globals: &str, v4: &[String], v6: &[String]) -> String {
    let list = |a: &[String]| a.iter().map(|a| format!("{{ address: \"{a}\" }}")).collect::<Vec<_>>().join(", ");
    format!(
        "{globals}services:
  - {{ name: bulk4, vip: {VIP4}, port: {PORT}, forwarding: nat, backends: [{}] }}
  - {{ name: bulk6, vip: \"{VIP6}\", port: {PORT}, forwarding: nat, backends: [{}] }}
",
        list(v4),
        list(v6)
    )
}

#[test]
fn nat_pmtu_to_the_client_reaches_the_backend() {
    let lab = NatLab::new(3);
    let _servers: Vec<_> = lab.backends.iter().map(|b| bulk_server(&b.ns, PORT)).collect();
    narrow_client_link(&lab);
    let v4: Vec<String> = lab.backends.iter().map(|b| b.v4.to_string()).collect();
    let v6: Vec<String> = lab.backends.iter().map(|b| b.v6.to_string()).collect();
    let cfg = lab.write_config(&config("forward_icmp: false\n", &v4, &v6));
    let agent = lab.start_agent(&cfg);
    let forget = || lab.backends.iter().for_each(|b| forget_pmtu(&b.ns));

    // Switched off: the router's errors end at the balancer; the backends keep
    // sending segments the narrow link cannot carry.
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        forget();
        let r = download(&lab.client, vip, PORT, Duration::from_secs(6));
        assert!(r.is_err(), "download from {vip} without ICMP translation should stall, got {r:?}");
        eprintln!("forward_icmp off, {vip}: {r:?}");
    }
    let stats = Stats::read_pinned(&agent.pin_dir).expect("read the pinned maps");
    assert!(stats.get(stat::PASS_ICMP) > 0, "the router's errors reached the balancer (pass_icmp)");
    assert_eq!(stats.get(stat::ICMP_FORWARDED), 0, "nothing translated while switched off");

    lab.write_config(&config("", &v4, &v6));
    agent.wait_log("reload applied", 0, Duration::from_secs(10));
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        forget();
        let got = download(&lab.client, vip, PORT, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("download of 1 MB from {vip} (nat) through a 1400-byte link: {e}\n{}", agent.log_text()));
        assert!(got >= BULK, "download from {vip}: {got} bytes");
    }
    let stats = Stats::read_pinned(&agent.pin_dir).expect("read the pinned maps");
    assert!(stats.get(stat::ICMP_FORWARDED) >= 2, "errors translated for the backends (icmp_forwarded)");
    assert_eq!(stats.get(stat::DROP_NAT_UNSUPPORTED), 0, "no nat ICMP error dropped");
}

#[test]
fn nat_pmtu_to_a_backend_reaches_the_client() {
    let lab = NatLab::new(1);
    let far = FarBackend::new(&lab);
    let _sink = sink_server(&far.ns, PORT);
    let (v4, v6) = (vec![FAR_BACKEND4.to_string()], vec![FAR_BACKEND6.to_string()]);
    let cfg = lab.write_config(&config("forward_icmp: false\n", &v4, &v6));
    let agent = lab.start_agent(&cfg);

    // Switched off: the far router's errors, sent to the client through the
    // balancer, end there; the client keeps sending full-sized segments.
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        forget_pmtu(&lab.client);
        let r = upload(&lab.client, vip, PORT, Duration::from_secs(6));
        assert!(r.is_err(), "upload to {vip} without ICMP translation should stall, got {r:?}");
        eprintln!("forward_icmp off, {vip}: {r:?}");
    }
    let stats = Stats::read_pinned(&agent.pin_dir).expect("read the pinned maps");
    assert_eq!(stats.get(stat::NAT_ICMP_REPLY), 0, "nothing translated while switched off");

    lab.write_config(&config("", &v4, &v6));
    agent.wait_log("reload applied", 0, Duration::from_secs(10));
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        forget_pmtu(&lab.client);
        let got = upload(&lab.client, vip, PORT, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("upload of 1 MB to {vip} (nat) through a 1400-byte link: {e}\n{}", agent.log_text()));
        assert_eq!(got, UPLOAD, "upload to {vip}");
    }
    let stats = Stats::read_pinned(&agent.pin_dir).expect("read the pinned maps");
    assert!(stats.get(stat::NAT_ICMP_REPLY) >= 2, "errors translated for the client (nat_icmp_reply)");
}
