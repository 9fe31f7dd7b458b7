//! `forwarding: fullnat` and its SNAT pool: `snat_addresses`, `snat_ports`, at
//! the top level and per service.

use super::{assert_errors, lines, parse_ok};
use crate::config::{Forwarding, Snat, DEFAULT_SNAT_PORTS};

fn fullnat(top: &[&str], own: &[&str]) -> String {
    let mut all: Vec<&str> = top.to_vec();
    all.extend_from_slice(&["services:", "  - name: web", "    vip: 198.18.1.10", "    port: 80", "    forwarding: fullnat"]);
    all.extend_from_slice(own);
    all.push("    backends: [{address: 198.18.5.11, port: 8080}]");
    lines(&all)
}

#[test]
fn a_service_takes_the_global_pool_or_its_own() {
    let c = parse_ok(&fullnat(&["snat_addresses: [198.18.0.2, \"2001:db8::2\"]"], &[]));
    let s = &c.services[0];
    assert_eq!(s.forwarding, Forwarding::Fullnat);
    let global = Snat { addresses: vec!["198.18.0.2".parse().unwrap(), "2001:db8::2".parse().unwrap()], ports: DEFAULT_SNAT_PORTS };
    assert_eq!((s.snat.as_ref(), &c.snat), (Some(&global), &global));
    assert_eq!(s.backends[0].port, Some(8080), "a fullnat backend takes a port");
    let c = parse_ok(&fullnat(
        &["snat_addresses: [198.18.0.2]", "snat_ports: 30000-39999"],
        &["    snat_addresses: [198.18.0.3, 198.18.0.4]", "    snat_ports: 2000-2063"],
    ));
    let own = Snat { addresses: vec!["198.18.0.3".parse().unwrap(), "198.18.0.4".parse().unwrap()], ports: (2000, 2063) };
    assert_eq!(c.services[0].snat, Some(own));
    assert_eq!(c.snat.ports, (30000, 39999));
    // The other modes have no pool.
    let c = parse_ok(&lines(&["snat_addresses: [198.18.0.2]", "services:", "  - {name: a, vip: 198.18.1.10, port: 80, backends: [{address: 198.18.5.11}]}"]));
    assert_eq!(c.services[0].snat, None);
}

#[test]
fn bad_pools_are_refused_with_their_position() {
    assert_errors(
        &fullnat(&[], &[]),
        &["test.yaml:5:17: services[0].forwarding: forwarding: fullnat needs a SNAT address of the backends' family (IPv4): give one in services[0].snat_addresses or the top-level snat_addresses"],
    );
    assert_errors(
        &fullnat(&["snat_addresses: [\"2001:db8::2\"]"], &[]),
        &["test.yaml:6:17: services[0].forwarding: forwarding: fullnat needs a SNAT address of the backends' family (IPv4): give one in services[0].snat_addresses or the top-level snat_addresses"],
    );
    assert_errors(
        &fullnat(&["snat_addresses: [198.18.0.2, bogus, 198.18.0.2]"], &[]),
        &[
            "test.yaml:1:30: snat_addresses[1]: snat address 'bogus' is not a valid IPv4 or IPv6 address",
            "test.yaml:1:37: snat_addresses[2]: duplicate snat address 198.18.0.2",
        ],
    );
    assert_errors(&fullnat(&["snat_addresses: []"], &[]), &["test.yaml:1:17: snat_addresses: snat_addresses is empty; list at least one of the balancer's own addresses"]);
    for (ports, why) in [
        ("2000", "snat_ports \"2000\" is not a port range; write LOW-HIGH, e.g. 1024-65535"),
        ("3000-2000", "snat_ports \"3000-2000\": the first port (3000) is above the last (2000)"),
        ("0-100", "snat_ports \"0-100\": ports must lie in 1..=65535"),
        ("1-70000", "snat_ports \"1-70000\": ports must lie in 1..=65535"),
    ] {
        let text = fullnat(&["snat_addresses: [198.18.0.2]"], &[&format!("    snat_ports: {ports}")]);
        assert_errors(&text, &[&format!("test.yaml:7:17: services[0].snat_ports: {why}")]);
        let text = fullnat(&["snat_addresses: [198.18.0.2]", &format!("snat_ports: {ports}")], &[]);
        assert_errors(&text, &[&format!("test.yaml:2:13: snat_ports: {why}")]);
    }
    assert_errors(
        &fullnat(&["snat_addresses: [198.18.1.10]"], &[]),
        &["test.yaml:4:10: services[0].vip: vip 198.18.1.10 is also a snat address; a SNAT address must not be a vip"],
    );
    assert_errors(
        &fullnat(&["established_size: 0", "snat_addresses: [198.18.0.2]"], &[]),
        &["test.yaml:1:19: established_size: established_size 0 cannot serve forwarding: fullnat (a flow's SNAT port is returned when its established entry expires); give a table size"],
    );
}

#[test]
fn pool_fields_apply_only_to_fullnat() {
    let text = lines(&[
        "services:",
        "  - name: web",
        "    vip: 198.18.1.10",
        "    port: 80",
        "    forwarding: nat",
        "    snat_ports: 2000-2063",
        "    backends: [{address: 198.18.5.11}]",
    ]);
    assert_errors(&text, &["test.yaml:6:17: services[0].snat_ports: snat_ports applies only to forwarding: fullnat"]);
    let text = lines(&[
        "services:",
        "  - name: web",
        "    vip: 198.18.1.0/24",
        "    port: 80",
        "    forwarding: fullnat",
        "    snat_addresses: [198.18.0.2]",
        "    backends: [{address: 198.18.5.11}]",
    ]);
    assert_errors(&text, &["test.yaml:5:17: services[0].forwarding: forwarding: fullnat needs an exact vip, not a prefix"]);
}
