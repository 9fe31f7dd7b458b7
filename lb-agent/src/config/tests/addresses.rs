//! One test per address and backend rule: each asserts the exact message, line and
//! column.

use super::{assert_errors, lines, parse_ok, service};

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
           198.18.1.10 is IPv4; a service's backends must have the vip's address family (only forwarding: gue carries one family in the other)",
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
           2001:db8:1::10 is IPv6; a service's backends must have the vip's address family (only forwarding: gue carries one family in the other)",
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

#[test]
fn ipv4_mapped_vip_beside_the_ipv4_vip_is_refused() {
    // Both would share one map key (IPv4 is stored IPv4-mapped) and the IPv4 service
    // would be silently blackholed.
    assert_errors(
        &lines(&[
            "services:",
            "  - name: web",
            "    vip: 198.18.1.10",
            "    port: 80",
            "    backends: [{address: 198.18.0.11}]",
            "  - name: web-mapped",
            "    vip: \"::ffff:198.18.1.10\"",
            "    port: 80",
            "    backends: [{address: 2001:db8::11}]",
        ]),
        &[
            "test.yaml:7:10: services[1].vip: vip ::ffff:198.18.1.10 is an IPv4-mapped IPv6 address; \
             write the IPv4 address 198.18.1.10 instead",
        ],
    );
}

#[test]
fn ipv6_spellings_of_ipv4_addresses_are_refused_everywhere() {
    let mapped = "is an IPv4-mapped IPv6 address; write the IPv4 address 198.18.0.11 instead";
    let compatible = "is an IPv4-compatible IPv6 address (::/96, deprecated); write the IPv4 \
                      address 198.18.0.11 instead";
    let cases = [
        ("::ffff:198.18.0.11", format!("::ffff:198.18.0.11 {mapped}")),
        ("::FFFF:c612:000b", format!("::ffff:198.18.0.11 {mapped}")),
        ("::198.18.0.11", format!("::c612:b {compatible}")),
    ];
    for (text, problem) in &cases {
        assert_everywhere(text, problem);
    }
}

#[test]
fn link_local_addresses_are_refused_everywhere() {
    assert_everywhere(
        "fe80::11",
        "fe80::11 is a link-local address (fe80::/10), which needs an interface the file \
         cannot name; WHAT must be a global or unique-local unicast address",
    );
    assert_everywhere(
        "febf:ffff::1",
        "febf:ffff::1 is a link-local address (fe80::/10), which needs an interface the file \
         cannot name; WHAT must be a global or unique-local unicast address",
    );
}

#[test]
fn addresses_in_this_network_are_refused() {
    assert_errors(
        &service(&["    port: 80", "    backends: [{address: 0.1.2.3}]"]),
        &[
            "test.yaml:5:26: services[0].backends[0].address: address 0.1.2.3 is in 0.0.0.0/8 \
             (\"this network\", never a destination); a backend must be a unicast address",
        ],
    );
}

/// Asserts that `text`, used in turn as an IPv6 service's vip, backend address and
/// probe address, is refused there with `problem` (`WHAT` replaced by the role).
#[track_caller]
fn assert_everywhere(text: &str, problem: &str) {
    let roles = [
        ("vip: V", "vip", "services[0].vip", "the vip"),
        (
            "address: B",
            "address",
            "services[0].backends[0].address",
            "a backend",
        ),
        (
            "address: P",
            "address",
            "services[0].backends[0].probe.address",
            "a probe address",
        ),
    ];
    let template = [
        "services:",
        "  - name: web6",
        "    vip: V",
        "    port: 80",
        "    backends:",
        "      - address: B",
        "        probe: {kind: tcp, address: P}",
    ];
    for (placeholder, field, path, what) in roles {
        let quoted = format!("\"{text}\"");
        let yaml: Vec<String> = template
            .iter()
            .map(|l| {
                l.replace(placeholder, &placeholder.replace(['V', 'B', 'P'], &quoted))
                    .replace('V', "2001:db8:1::10")
                    .replace('B', "2001:db8::11")
                    .replace('P', "2001:db8::99")
            })
            .collect();
        let line = yaml.iter().position(|l| l.contains(&quoted)).unwrap();
        let column = yaml[line].find(&quoted).unwrap() + 1;
        let yaml: Vec<&str> = yaml.iter().map(String::as_str).collect();
        let problem = problem.replace("WHAT", what);
        assert_errors(
            &lines(&yaml),
            &[&format!(
                "test.yaml:{}:{column}: {path}: {field} {problem}",
                line + 1
            )],
        );
    }
}

#[test]
fn addresses_have_one_spelling() {
    // IPv4 octets with leading zeros (read as octal by some tools) are not addresses.
    assert_errors(
        &service(&["    port: 80", "    backends: [{address: 198.18.0.011}]"]),
        &[
            "test.yaml:5:26: services[0].backends[0].address: address '198.18.0.011' is not a \
             valid IPv4 or IPv6 address",
        ],
    );
    // Every other spelling of an IPv6 address is the same address (see also
    // duplicate_services_ipv6_vip_spelled_differently and duplicate_backends).
    let config = parse_ok(&lines(&[
        "services:",
        "  - name: web6",
        "    vip: 2001:DB8:1:0:0:0:0:10",
        "    port: 80",
        "    backends: [{address: \"2001:db8::0.0.0.17\"}]",
    ]));
    let service = &config.services[0];
    assert_eq!(service.vip.to_string(), "2001:db8:1::10");
    assert_eq!(service.backends[0].address.to_string(), "2001:db8::11");
}
