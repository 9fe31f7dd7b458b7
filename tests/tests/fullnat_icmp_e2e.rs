//! ICMP errors of `fullnat` flows end to end in the FULLNAT lab (native XDP,
//! backends behind `r2`, which has no route to the clients): the PMTU black hole
//! on either side of the balancer stays open with `forward_icmp: false` and is
//! closed once the balancer translates the errors:
//!
//! - a download through a 1400-byte link on the clients' side: the router's
//!   "fragmentation needed" / "packet too big" goes to the VIP and must reach the
//!   backend from the SNAT address, as an error about its own packet
//!   (backend:port -> snat:sport);
//! - an upload through `r2`'s 1400-byte bridge to the backends: `r2`'s error goes
//!   to the SNAT address and must reach the client from the VIP, as an error
//!   about its packet (client -> VIP:port).

use std::{net::IpAddr, time::Duration};

use lb_agent::dataplane::Stats;
use lb_common::stat;
use lb_tests::{
    natlab::{NatLab, VIP4, VIP6},
    natpmtu::{forget_pmtu, narrow_backend_bridge, narrow_client_link, sink_server, upload, UPLOAD},
    pmtu::{bulk_server, download, BULK},
};

const PORT: u16 = 8080;
const POOL: &str = "snat_addresses: [198.18.51.3, \"2001:db8:51::3\"]\nsnat_ports: 10000-30000\n";

/// A `fullnat` service on `PORT` of both VIPs to the lab's backends.
fn config(lab: &NatLab, globals: &str) -> String {
    let list = |v6: bool| {
        let a: Vec<String> =
            lab.backends.iter().map(|b| format!("{{ address: \"{}\" }}", if v6 { b.v6.to_string() } else { b.v4.to_string() })).collect();
        a.join(", ")
    };
    format!(
        "{globals}{POOL}services:
  - {{ name: bulk4, vip: {VIP4}, port: {PORT}, forwarding: fullnat, backends: [{}] }}
  - {{ name: bulk6, vip: \"{VIP6}\", port: {PORT}, forwarding: fullnat, backends: [{}] }}
",
        list(false),
        list(true)
    )
}

#[test]
fn fullnat_pmtu_to_the_client_reaches_the_backend() {
    let lab = NatLab::fullnat(2);
    let _servers: Vec<_> = lab.backends.iter().map(|b| bulk_server(&b.ns, PORT)).collect();
    narrow_client_link(&lab);
    let cfg = lab.write_config(&config(&lab, "forward_icmp: false\n"));
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

    lab.write_config(&config(&lab, ""));
    agent.wait_log("reload applied", 0, Duration::from_secs(10));
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        forget();
        let got = download(&lab.client, vip, PORT, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("download of 1 MB from {vip} (fullnat) through a 1400-byte link: {e}\n{}", agent.log_text()));
        assert!(got >= BULK, "download from {vip}: {got} bytes");
    }
    let stats = Stats::read_pinned(&agent.pin_dir).expect("read the pinned maps");
    assert!(stats.get(stat::ICMP_FORWARDED) >= 2, "errors translated for the backends (icmp_forwarded)");
    assert_eq!(stats.get(stat::DROP_NAT_UNSUPPORTED), 0, "no fullnat ICMP error dropped");
}

#[test]
fn fullnat_pmtu_to_a_backend_reaches_the_client() {
    let lab = NatLab::fullnat(1);
    let _sink = sink_server(&lab.backends[0].ns, PORT);
    narrow_backend_bridge(&lab);
    let cfg = lab.write_config(&config(&lab, "forward_icmp: false\n"));
    let agent = lab.start_agent(&cfg);

    // Switched off: r2's errors, sent to the SNAT address, end at the
    // balancer; the client keeps sending full-sized segments.
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        forget_pmtu(&lab.client);
        let r = upload(&lab.client, vip, PORT, Duration::from_secs(6));
        assert!(r.is_err(), "upload to {vip} without ICMP translation should stall, got {r:?}");
        eprintln!("forward_icmp off, {vip}: {r:?}");
    }
    let stats = Stats::read_pinned(&agent.pin_dir).expect("read the pinned maps");
    assert_eq!(stats.get(stat::NAT_ICMP_REPLY), 0, "nothing translated while switched off");

    lab.write_config(&config(&lab, ""));
    agent.wait_log("reload applied", 0, Duration::from_secs(10));
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        forget_pmtu(&lab.client);
        let got = upload(&lab.client, vip, PORT, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("upload of 1 MB to {vip} (fullnat) through a 1400-byte bridge: {e}\n{}", agent.log_text()));
        assert_eq!(got, UPLOAD, "upload to {vip}");
    }
    let stats = Stats::read_pinned(&agent.pin_dir).expect("read the pinned maps");
    assert!(stats.get(stat::NAT_ICMP_REPLY) >= 2, "errors translated for the client (nat_icmp_reply)");
}
