//! `forwarding`, `gue_port`, a `nat` backend's `port` and the global tunnel fields.

use super::{assert_errors, lines, parse_ok, service};
use crate::config::{Forwarding, Fragments, DEFAULT_GUE_PORT};

#[test]
fn forwarding_defaults_to_dr_and_takes_ipip_and_gue() {
    let c = parse_ok(&service(&["    port: 80", "    backends: [{address: 198.18.0.11}]"]));
    assert_eq!((c.services[0].forwarding, c.services[0].gue_port), (Forwarding::Dr, DEFAULT_GUE_PORT));
    let c = parse_ok(&service(&["    port: 80", "    forwarding: ipip", "    backends: [{address: 198.18.5.11}]"]));
    assert_eq!(c.services[0].forwarding, Forwarding::Ipip);
    // GUE carries IPv4 backends for an IPv6 vip (and the other way round).
    let c = parse_ok(&lines(&[
        "tunnel_source_v4: 198.18.20.2",
        "tunnel_source_v6: 2001:db8:20::2",
        "mtu: 1500",
        "services:",
        "  - name: web6",
        "    vip: 2001:db8:1::10",
        "    port: 80",
        "    forwarding: gue",
        "    gue_port: 7777",
        "    backends: [{address: 198.18.5.11}, {address: \"2001:db8:5::11\"}]",
    ]));
    assert_eq!((c.services[0].forwarding, c.services[0].gue_port), (Forwarding::Gue, 7777));
    assert_eq!(c.tunnel_source_v4, Some("198.18.20.2".parse().unwrap()));
    assert_eq!(c.mtu, Some(1500));
}

#[test]
fn nat_takes_a_port_per_backend() {
    let c = parse_ok(&service(&[
        "    port: 80",
        "    forwarding: nat",
        "    backends: [{address: 198.18.5.11, port: 8080}, {address: 198.18.5.12}]",
    ]));
    assert_eq!(c.services[0].forwarding, Forwarding::Nat);
    assert!(!c.services[0].forwarding.is_tunnel() && c.services[0].forwarding.is_routed());
    let ports: Vec<Option<u16>> = c.services[0].backends.iter().map(|b| b.port).collect();
    assert_eq!(ports, [Some(8080), None]);
}

#[test]
fn bad_nat_ports_are_refused_with_their_position() {
    assert_errors(
        &service(&["    port: 80", "    forwarding: nat", "    backends: [{address: 198.18.5.11, port: 0}]"]),
        &["test.yaml:6:45: services[0].backends[0].port: port 0 is not a backend port; give 1..=65535 (default: the service's port)"],
    );
    assert_errors(
        &service(&["    port: 80", "    forwarding: nat", "    backends: [{address: 198.18.5.11, port: 70000}]"]),
        &["test.yaml:6:45: services[0].backends[0].port: port 70000 is out of range 1..=65535"],
    );
    assert_errors(
        &service(&["    port: 80", "    backends: [{address: 198.18.5.11, port: 8080}]"]),
        &["test.yaml:5:45: services[0].backends[0].port: a backend's port applies only to forwarding: nat and fullnat (the other modes keep the client's port)"],
    );
}

#[test]
fn bad_tunnel_fields_are_refused_with_their_position() {
    assert_errors(
        &service(&["    port: 80", "    forwarding: ipip", "    backends: [{address: \"2001:db8::11\"}]"]),
        &["test.yaml:6:26: services[0].backends[0].address: backend 2001:db8::11 is IPv6 but the vip \
           198.18.1.10 is IPv4; a service's backends must have the vip's address family (only \
           forwarding: gue carries one family in the other)"],
    );
    assert_errors(
        &service(&["    port: 80", "    forwarding: gre", "    backends: [{address: 198.18.0.11}]"]),
        &["test.yaml:5:17: services[0].forwarding: unknown forwarding \"gre\"; expected one of dr, ipip, gue, nat, fullnat"],
    );
    assert_errors(
        &service(&["    port: 80", "    forwarding: gue", "    gue_port: 0", "    backends: [{address: 198.18.0.11}]"]),
        &["test.yaml:6:15: services[0].gue_port: gue_port 0 is not a port; give 1..=65535 (default 6080)"],
    );
    assert_errors(
        &service(&["    port: 80", "    gue_port: 7777", "    backends: [{address: 198.18.0.11}]"]),
        &["test.yaml:5:15: services[0].gue_port: gue_port applies only to forwarding: gue"],
    );
    assert_errors(
        &lines(&["tunnel_source_v4: 2001:db8::1", "tunnel_source_v6: 198.18.0.1", "mtu: 100", "services: []"]),
        &[
            "test.yaml:1:19: tunnel_source_v4: tunnel_source_v4 2001:db8::1 is an IPv6 address; give an IPv4 one (tunnel_source_v6 takes IPv6)",
            "test.yaml:2:19: tunnel_source_v6: tunnel_source_v6 198.18.0.1 is an IPv4 address; give an IPv6 one (tunnel_source_v4 takes IPv4)",
            "test.yaml:3:6: mtu: mtu 100 is out of range 576..=65535",
        ],
    );
}

#[test]
fn icmp_and_fragment_fields() {
    let config = parse_ok(&lines(&[
        "answer_ping: false",
        "forward_icmp: false",
        "fragments: { size: 1024, timeout: 5s }",
        "services: []",
    ]));
    assert!(!config.answer_ping);
    assert!(!config.forward_icmp);
    assert_eq!(config.fragments, Fragments { size: 1024, timeout: std::time::Duration::from_secs(5) });
    let defaults = parse_ok("services: []\n");
    assert!(defaults.answer_ping && defaults.forward_icmp);
    assert_eq!(defaults.fragments, Fragments::default());
    assert_errors(
        &lines(&["fragments: { size: 10, timeout: 1500ms }", "services: []"]),
        &[
            "test.yaml:1:20: fragments.size: size 10 is out of range 64..=1048576",
            "test.yaml:1:33: fragments.timeout: timeout '1500ms' must be whole seconds",
        ],
    );
    assert_errors(
        &lines(&["fragments: { timeout: 2m }", "services: []"]),
        &["test.yaml:1:23: fragments.timeout: timeout 2m is out of range 1s..=1m"],
    );
}
