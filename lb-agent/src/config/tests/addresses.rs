//! One test per address and backend rule: each asserts the exact message, line and
//! column.

use super::{assert_errors, lines, service};

#[test]
fn duplicate_services_same_vip_port_protocol() {
    assert_errors(
        &lines(&[
            "services:",
            "  - name: a",
            "    vip: 198.18.1.10",
            "    port: 80",
            "    backends: [{address: 198.18.0.11}]",
            "  - name: b",
            "    vip: 198.18.1.10",
            "    port: 80",
            "    protocol: tcp",
            "    backends: [{address: 198.18.0.11}]",
            "  - name: c",
            "    vip: 198.18.1.10",
            "    port: 80",
            "    protocol: udp",
            "    backends: [{address: 198.18.0.11}]",
        ]),
        &[
            "test.yaml:7:10: services[1].vip: duplicate service: vip 198.18.1.10 port 80 protocol tcp \
           is already used by service 'a' (services[0], line 2)",
        ],
    );
}

#[test]
fn duplicate_services_ipv6_vip_spelled_differently() {
    assert_errors(
        &lines(&[
            "services:",
            "  - name: a",
            "    vip: 2001:db8:0:0::10",
            "    port: 53",
            "    protocol: udp",
            "    backends: [{address: 2001:db8::1}]",
            "  - name: b",
            "    vip: 2001:DB8::10",
            "    port: 53",
            "    protocol: udp",
            "    backends: [{address: 2001:db8::1}]",
        ]),
        &[
            "test.yaml:8:10: services[1].vip: duplicate service: vip 2001:db8::10 port 53 protocol udp \
           is already used by service 'a' (services[0], line 2)",
        ],
    );
}

#[test]
fn duplicate_backends() {
    assert_errors(
        &service(&[
            "    port: 80",
            "    backends:",
            "      - address: 198.18.0.11",
            "      - address: 198.18.0.12",
            "      - address: 198.18.0.11",
            "        weight: 3",
        ]),
        &[
            "test.yaml:8:18: services[0].backends[2].address: duplicate backend 198.18.0.11 (first listed at line 6)",
        ],
    );
    assert_errors(
        &lines(&[
            "services:",
            "  - name: web6",
            "    vip: 2001:db8:1::10",
            "    port: 80",
            "    backends:",
            "      - address: 2001:db8::11",
            "      - {weight: 2, address: \"2001:0db8:0000::0011\"}",
        ]),
        &[
            "test.yaml:7:30: services[0].backends[1].address: duplicate backend 2001:db8::11 (first listed at line 6)",
        ],
    );
}

#[test]
fn backend_family_must_match_the_vip() {
    assert_errors(
        &service(&[
            "    port: 80",
            "    backends:",
            "      - address: 198.18.0.11",
            "      - address: 2001:db8::11",
        ]),
        &[
            "test.yaml:7:18: services[0].backends[1].address: backend 2001:db8::11 is IPv6 but the vip \
           198.18.1.10 is IPv4; a service's backends must have the vip's address family",
        ],
    );
    assert_errors(
        &lines(&[
            "services:",
            "  - name: web6",
            "    vip: 2001:db8:1::10",
            "    port: 80",
            "    backends: [{address: 2001:db8::11}, {address: 198.18.0.11}]",
        ]),
        &[
            "test.yaml:5:51: services[0].backends[1].address: backend 198.18.0.11 is IPv4 but the vip \
           2001:db8:1::10 is IPv6; a service's backends must have the vip's address family",
        ],
    );
}

#[test]
fn services_need_a_usable_backend() {
    assert_errors(
        &service(&["    port: 80"]),
        &[
            "test.yaml:2:5: services[0].backends: service 'web' has no usable backends: none are listed",
        ],
    );
    assert_errors(
        &service(&["    port: 80", "    backends: []"]),
        &[
            "test.yaml:5:5: services[0].backends: service 'web' has no usable backends: none are listed",
        ],
    );
    assert_errors(
        &service(&[
            "    port: 80",
            "    backends:",
            "      - address: 198.18.0.11",
            "        weight: 0",
            "      - {address: 198.18.0.12, weight: 0}",
        ]),
        &[
            "test.yaml:5:5: services[0].backends: service 'web' has no usable backends: every weight is 0",
        ],
    );
}

#[test]
fn weights_must_be_in_range() {
    for weight in ["70000", "65536", "-1"] {
        assert_errors(
            &service(&[
                "    port: 80",
                "    backends:",
                "      - address: 198.18.0.11",
                &format!("        weight: {weight}"),
            ]),
            &[&format!(
                "test.yaml:7:17: services[0].backends[0].weight: weight {weight} is out of range 0..=65535"
            )],
        );
    }
}

#[test]
fn vip_must_be_unicast() {
    let cases = [
        ("0.0.0.0", "0.0.0.0", "the unspecified address"),
        ("\"::\"", "::", "the unspecified address"),
        ("224.0.0.1", "224.0.0.1", "a multicast address"),
        ("ff02::1", "ff02::1", "a multicast address"),
        (
            "255.255.255.255",
            "255.255.255.255",
            "the broadcast address",
        ),
        ("127.0.0.1", "127.0.0.1", "a loopback address"),
        ("\"::1\"", "::1", "a loopback address"),
    ];
    for (text, shown, kind) in cases {
        assert_errors(
            &lines(&[
                "services:",
                "  - name: web",
                &format!("    vip: {text}"),
                "    port: 80",
                "    backends: [{address: 198.18.0.11}]",
            ]),
            &[&format!(
                "test.yaml:3:10: services[0].vip: vip {shown} is {kind}; the vip must be a unicast address"
            )],
        );
    }
}

#[test]
fn addresses_must_parse_and_backends_be_unicast() {
    assert_errors(
        &lines(&[
            "services:",
            "  - name: web",
            "    vip: web.example.com",
            "    port: 80",
            "    backends:",
            "      - address: 198.18.0.256",
            "      - address: 127.0.0.1",
            "      - address: 198.18.0.11",
        ]),
        &[
            "test.yaml:3:10: services[0].vip: vip 'web.example.com' is not a valid IPv4 or IPv6 address",
            "test.yaml:6:18: services[0].backends[0].address: address '198.18.0.256' is not a valid IPv4 or IPv6 address",
            "test.yaml:7:18: services[0].backends[1].address: address 127.0.0.1 is a loopback address; \
             a backend must be a unicast address",
        ],
    );
}
