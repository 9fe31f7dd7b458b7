//! One test per validation rule: each asserts the exact message, line and column.

use super::{assert_errors, lines, parse_ok, service};

#[test]
fn unknown_fields_are_rejected_everywhere() {
    assert_errors(
        &lines(&["services: []", "conntrack: 5"]),
        &["test.yaml:2:1: unknown field `conntrack`, expected one of `conntrack_size`, `established_size`, \
           `timeouts`, `tunnel_source_v4`, `tunnel_source_v6`, `mtu`, `answer_ping`, `forward_icmp`, \
           `syn_flood_kps`, `snat_addresses`, `snat_ports`, `fragments`, `services`"],
    );
    assert_errors(
        &service(&["    port: 80", "    backend: []"]),
        &[
            "test.yaml:5:5: services[0]: unknown field `backend`, expected one of `name`, `vip`, \
           `port`, `protocol`, `scheduler`, `prefix_v4`, `prefix_v6`, `forwarding`, `gue_port`, `snat_addresses`, `snat_ports`, `table_size`, `backends`, `probe`, \
           `on_all_down`, `persistence`",
        ],
    );
    assert_errors(
        &service(&[
            "    port: 80",
            "    backends:",
            "      - address: 198.18.0.11",
            "        wieght: 2",
        ]),
        &[
            "test.yaml:7:9: services[0].backends[0]: unknown field `wieght`, expected one of `address`, `weight`, \
             `backup`, `port`, `probe`",
        ],
    );
}

#[test]
fn syntax_and_type_errors_carry_their_location() {
    assert_errors(
        "services: [\n",
        &["test.yaml:2:1: while parsing a node, did not find expected node content"],
    );
    assert_errors(
        &service(&["    port: \"80\"", "    backends: [{address: 198.18.0.11}]"]),
        &["test.yaml:4:11: services[0].port: invalid type: string \"80\", expected an integer"],
    );
    assert_errors(
        &service(&[
            "    port: 80",
            "    backends: [{address: 198.18.0.11, weight: 1.5}]",
        ]),
        &[
            "test.yaml:5:47: services[0].backends[0].weight: invalid type: floating point `1.5`, \
           expected an integer",
        ],
    );
    assert_errors(
        "- web\n",
        &["test.yaml:1:1: invalid type: sequence, expected a mapping with a `services` list"],
    );
    assert_errors(
        "services: []\n---\nservices: []\n",
        &[
            "test.yaml:1:1: deserializing from YAML containing more than one document is not supported",
        ],
    );
}

#[test]
fn missing_required_fields() {
    assert_errors(
        "",
        &["test.yaml:1:1: services: missing required field `services`"],
    );
    assert_errors(
        &lines(&[
            "services:",
            "  - protocol: udp",
            "    port:",
            "    backends:",
            "      - weight: 2",
        ]),
        &[
            "test.yaml:2:5: services[0].name: missing required field `name`",
            "test.yaml:2:5: services[0].vip: missing required field `vip`",
            "test.yaml:3:5: services[0].port: missing required field `port`",
            "test.yaml:5:9: services[0].backends[0].address: missing required field `address`",
        ],
    );
}

#[test]
fn service_names_must_be_valid() {
    let long = "n".repeat(64);
    let cases = [
        ("\"\"", "service name must not be empty".to_string()),
        (
            "a b",
            "service name 'a b' may only contain the characters A-Z a-z 0-9 _ . -".to_string(),
        ),
        (
            "wéb",
            "service name 'wéb' may only contain the characters A-Z a-z 0-9 _ . -".to_string(),
        ),
        (
            &long,
            format!("service name '{long}' is too long (64 characters, at most 63)"),
        ),
    ];
    for (name, message) in cases {
        assert_errors(
            &lines(&[
                "services:",
                &format!("  - name: {name}"),
                "    vip: 198.18.1.10",
                "    port: 80",
                "    backends: [{address: 198.18.0.11}]",
            ]),
            &[&format!("test.yaml:2:11: services[0].name: {message}")],
        );
    }
    let ok = "n".repeat(63);
    let text = service(&["    port: 80", "    backends: [{address: 198.18.0.11}]"]);
    assert_eq!(
        parse_ok(&text.replace("name: web", &format!("name: {ok}"))).services[0].name,
        ok
    );
    parse_ok(&text.replace("name: web", "name: Web_1.v-2"));
}

#[test]
fn duplicate_service_names() {
    assert_errors(
        &lines(&[
            "services:",
            "  - name: web",
            "    vip: 198.18.1.10",
            "    port: 80",
            "    backends: [{address: 198.18.0.11}]",
            "  - name: web",
            "    vip: 198.18.1.11",
            "    port: 80",
            "    backends: [{address: 198.18.0.11}]",
        ]),
        &[
            "test.yaml:6:11: services[1].name: duplicate service name 'web' (first used by services[0] at line 2)",
        ],
    );
}

#[test]
fn table_size_must_be_a_prime_in_range() {
    let with_table = |size: &str| {
        service(&[
            "    port: 80",
            &format!("    table_size: {size}"),
            "    backends: [{address: 198.18.0.11}]",
        ])
    };
    assert_errors(
        &with_table("65536"),
        &[
            "test.yaml:5:17: services[0].table_size: table_size 65536 is not a prime number (the next prime is 65537)",
        ],
    );
    for size in ["5", "1048583", "-7"] {
        assert_errors(
            &with_table(size),
            &[&format!(
                "test.yaml:5:17: services[0].table_size: table_size {size} is out of range 7..=1048573"
            )],
        );
    }
}

#[test]
fn table_size_must_exceed_the_backend_count() {
    let backends: Vec<String> = (1..=7)
        .map(|i| format!("      - address: 198.18.0.{i}"))
        .collect();
    let mut tail = vec!["    port: 80", "    table_size: 7", "    backends:"];
    tail.extend(backends.iter().map(String::as_str));
    assert_errors(
        &service(&tail),
        &[
            "test.yaml:5:17: services[0].table_size: table_size 7 must be larger than the number of backends (7)",
        ],
    );
    tail.pop();
    assert_eq!(parse_ok(&service(&tail)).services[0].table_size, 7);
}

#[test]
fn a_service_has_at_most_65536_backends() {
    // A table's slots are 16-bit indexes into its list of backends.
    let backends: Vec<String> = (0..65_537u32)
        .map(|i| format!("      - address: 198.{}.{}.{}", 18 + (i >> 16), (i >> 8) & 255, i & 255))
        .collect();
    let mut tail = vec!["    port: 80", "    backends:"];
    tail.extend(backends.iter().map(String::as_str));
    assert_errors(
        &service(&tail),
        &["test.yaml:6:7: services[0].backends: a service has at most 65536 backends, this one 65537"],
    );
    tail.pop();
    assert_eq!(parse_ok(&service(&tail)).services[0].backends.len(), 65_536);
}

#[test]
fn ports_must_be_in_range() {
    for port in ["65536", "-1"] {
        assert_errors(
            &service(&[
                &format!("    port: {port}"),
                "    backends: [{address: 198.18.0.11}]",
            ]),
            &[&format!(
                "test.yaml:4:11: services[0].port: port {port} is out of range 0..=65535"
            )],
        );
    }
}

#[test]
fn syn_flood_kps_defaults_and_is_bounded() {
    assert_eq!(parse_ok("services: []\n").syn_flood_kps, lb_common::DEFAULT_SYN_FLOOD_KPS);
    assert_eq!(parse_ok("syn_flood_kps: 0\nservices: []\n").syn_flood_kps, 0);
    assert_eq!(parse_ok("syn_flood_kps: 65535\nservices: []\n").syn_flood_kps, 65535);
    for v in ["-1", "65536"] {
        assert_errors(
            &lines(&[&format!("syn_flood_kps: {v}"), "services: []"]),
            &[&format!("test.yaml:1:16: syn_flood_kps: syn_flood_kps {v} is out of range 0..=65535")],
        );
    }
}

#[test]
fn conntrack_size_must_be_in_range() {
    for size in ["1023", "16777217"] {
        assert_errors(
            &lines(&[&format!("conntrack_size: {size}"), "services: []"]),
            &[&format!(
                "test.yaml:1:17: conntrack_size: conntrack_size {size} is out of range 1024..=16777216"
            )],
        );
    }
    assert_eq!(
        parse_ok("conntrack_size: 16777216\nservices: []\n").conntrack_size,
        16_777_216
    );
}

#[test]
fn protocol_and_scheduler_must_be_known() {
    assert_errors(
        &service(&[
            "    port: 80",
            "    protocol: TCP",
            "    scheduler: lcx",
            "    backends: [{address: 198.18.0.11}]",
        ]),
        &[
            "test.yaml:5:15: services[0].protocol: unknown protocol 'TCP'; supported protocols: tcp, udp",
            "test.yaml:6:16: services[0].scheduler: unknown scheduler 'lcx'; supported schedulers: maglev, rr, wrr, lc, wlc, sh, dh, lblc, lblcr",
        ],
    );
}

#[test]
fn sh_prefixes_are_checked_and_belong_to_sh() {
    assert_errors(
        &service(&[
            "    port: 80",
            "    scheduler: rr",
            "    prefix_v4: 24",
            "    backends: [{address: 198.18.0.11}]",
        ]),
        &["test.yaml:6:5: services[0].prefix_v4: prefix_v4 applies to scheduler sh only"],
    );
    assert_errors(
        &service(&[
            "    port: 80",
            "    scheduler: sh",
            "    prefix_v4: 33",
            "    prefix_v6: 0",
            "    backends: [{address: 198.18.0.11}]",
        ]),
        &[
            "test.yaml:6:16: services[0].prefix_v4: prefix_v4 33 is out of range 1..=32",
            "test.yaml:7:16: services[0].prefix_v6: prefix_v6 0 is out of range 1..=128",
        ],
    );
    assert_errors(
        &service(&[
            "    port: 80",
            "    scheduler: sh",
            "    persistence: {timeout: 60s}",
            "    backends: [{address: 198.18.0.11}]",
        ]),
        &["test.yaml:5:16: services[0].scheduler: scheduler sh with persistence: both keep a client's flows on one \
           backend; use persistence's prefixes or sh's, not both"],
    );
    let cfg = crate::config::parse(
        &service(&["    port: 80", "    scheduler: sh", "    prefix_v4: 24", "    backends: [{address: 198.18.0.11}]"]),
        "test.yaml",
    )
    .expect("valid");
    assert_eq!(cfg.services[0].scheduler, crate::config::Scheduler::Sh { prefix_v4: 24, prefix_v6: 128 });
}
