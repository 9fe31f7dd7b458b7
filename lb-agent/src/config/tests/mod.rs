//! Tests of the configuration module. Every YAML text is built with [`lines`] so that
//! line numbers can be read off the array index (line = index + 1).

use std::path::Path;

use super::*;

mod addresses;
mod forwarding;
mod limits;
mod policy;
mod prefix;
mod probes;
mod rules;
mod snat;

/// Joins `lines` into a YAML text (line `n` is `lines[n - 1]`).
fn lines(lines: &[&str]) -> String {
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

/// Parses `text`, panicking with the errors if it is rejected.
fn parse_ok(text: &str) -> Config {
    parse(text, "test.yaml").unwrap_or_else(|e| panic!("unexpected errors:\n{e}\nin:\n{text}"))
}

/// Parses `text`, which must be rejected, and returns each diagnostic displayed.
fn errors(text: &str) -> Vec<String> {
    match parse(text, "test.yaml") {
        Ok(config) => panic!("expected errors, got {config:?}\nin:\n{text}"),
        Err(err) => err.errors.iter().map(ToString::to_string).collect(),
    }
}

/// Asserts that `text` is rejected with exactly `expected` (displayed, in order).
#[track_caller]
fn assert_errors(text: &str, expected: &[&str]) {
    let actual = errors(text);
    assert_eq!(actual, expected, "wrong diagnostics for:\n{text}");
}

/// A valid single service whose remaining lines (from line 4 on) are `tail`.
fn service(tail: &[&str]) -> String {
    let mut all = vec!["services:", "  - name: web", "    vip: 198.18.1.10"];
    all.extend_from_slice(tail);
    lines(&all)
}

fn example(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name)
}

#[test]
fn example_files_parse_cleanly() {
    for name in ["demo.yaml", "full.yaml"] {
        let path = example(name);
        if let Err(err) = load(&path) {
            panic!("{} is rejected:\n{err}", path.display());
        }
    }
}

#[test]
fn demo_file_has_the_lab_services() {
    let config = load(&example("demo.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let summary: Vec<String> = config
        .services
        .iter()
        .map(|s| {
            let backends: Vec<String> = s
                .backends
                .iter()
                .map(|b| format!("{}*{}", b.address, b.weight))
                .collect();
            format!(
                "{} {} {} {} {}",
                s.name,
                s.vip,
                s.port,
                s.protocol,
                backends.join(",")
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            "web 198.18.1.10 80 tcp 198.18.0.11*1,198.18.0.12*1,198.18.0.13*2",
            "web6 2001:db8:1::10 80 tcp 2001:db8::11*1,2001:db8::12*1,2001:db8::13*2",
            "dns 198.18.1.10 53 udp 198.18.0.11*1,198.18.0.12*1,198.18.0.13*1",
            "dns6 2001:db8:1::10 53 udp 2001:db8::11*1,2001:db8::12*1,2001:db8::13*1",
        ]
    );
    assert_eq!(config.conntrack_size, DEFAULT_CONNTRACK_SIZE);
}

#[test]
fn defaults_are_applied() {
    let config = parse_ok(&service(&[
        "    port: 80",
        "    backends:",
        "      - address: 198.18.0.11",
    ]));
    let expected = Config {
        conntrack_size: DEFAULT_CONNTRACK_SIZE,
        established_size: DEFAULT_CONNTRACK_SIZE,
        timeouts: Timeouts::default(),
        tunnel_source_v4: None,
        tunnel_source_v6: None,
        mtu: None,
        answer_ping: true,
        forward_icmp: true,
        syn_flood_kps: lb_common::DEFAULT_SYN_FLOOD_KPS,
        snat: Snat::default(),
        fragments: Fragments::default(),
        services: vec![std::sync::Arc::new(ServiceConfig {
            name: "web".to_string(),
            vip: "198.18.1.10".parse().unwrap(),
            vip_prefix: None,
            port: 80,
            protocol: Protocol::Tcp,
            scheduler: Scheduler::Maglev,
            forwarding: Forwarding::Dr,
            gue_port: DEFAULT_GUE_PORT,
            snat: None,
            table_size: 257,
            backends: vec![BackendConfig {
                address: "198.18.0.11".parse().unwrap(),
                weight: 1,
                backup: false,
                port: None,
                probe: crate::health::ProbeSpec::default(),
            }],
            on_all_down: OnAllDown::Drop,
            persistence: None,
        })],
    };
    assert_eq!(config, expected);
    assert_eq!((default_table_size(1), default_table_size(32), default_table_size(400)), (257, 4099, 65537));
    assert_eq!(DEFAULT_CONNTRACK_SIZE, 262144);
}

#[test]
fn explicit_values_are_kept_in_file_order() {
    let config = parse_ok(&lines(&[
        "conntrack_size: 1024",
        "services:",
        "  - name: b",
        "    vip: 2001:db8::1",
        "    port: 0",
        "    protocol: udp",
        "    scheduler: maglev",
        "    table_size: 7",
        "    backends:",
        "      - {address: 2001:db8::2, weight: 0}",
        "      - {address: 2001:db8::3, weight: 65535}",
        "  - name: a",
        "    vip: 198.18.1.10",
        "    port: 65535",
        "    backends: [{address: 198.18.0.11}]",
    ]));
    assert_eq!(config.conntrack_size, 1024);
    let names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["b", "a"]);
    let b = &config.services[0];
    assert_eq!((b.port, b.protocol, b.table_size), (0, Protocol::Udp, 7));
    let weights: Vec<u32> = b.backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [0, 65535]);
    assert_eq!(config.services[1].port, 65535);
}

#[test]
fn empty_service_list_is_accepted() {
    assert_eq!(parse_ok("services: []\n").services, []);
}

#[test]
fn several_errors_are_all_reported() {
    assert_errors(
        &lines(&[
            "conntrack_size: 10",
            "services:",
            "  - name: web",
            "    vip: 198.18.1.10",
            "    port: 80",
            "    protocol: sctp",
            "    table_size: 100",
            "    backends:",
            "      - address: 198.18.0.11",
            "        weight: 70000",
            "      - address: 2001:db8::1",
            "  - name: web",
            "    vip: 224.0.0.1",
            "    port: 99999",
            "    backends: []",
        ]),
        &[
            "test.yaml:1:17: conntrack_size: conntrack_size 10 is out of range 1024..=16777216",
            "test.yaml:6:15: services[0].protocol: unknown protocol 'sctp'; supported protocols: tcp, udp",
            "test.yaml:7:17: services[0].table_size: table_size 100 is not a prime number (the next prime is 101)",
            "test.yaml:10:17: services[0].backends[0].weight: weight 70000 is out of range 0..=65535",
            "test.yaml:11:18: services[0].backends[1].address: backend 2001:db8::1 is IPv6 but the vip 198.18.1.10 is IPv4; a service's backends must have the vip's address family (only forwarding: gue carries one family in the other)",
            "test.yaml:12:11: services[1].name: duplicate service name 'web' (first used by services[0] at line 3)",
            "test.yaml:13:10: services[1].vip: vip 224.0.0.1 is a multicast address; the vip must be a unicast address",
            "test.yaml:14:11: services[1].port: port 99999 is out of range 0..=65535",
            "test.yaml:15:5: services[1].backends: this service has no usable backends: none are listed",
        ],
    );
}

#[test]
fn error_display_is_one_diagnostic_per_line() {
    let err = parse(
        &service(&[
            "    port: 70000",
            "    backends: [{address: 198.18.0.11, weight: -1}]",
        ]),
        "deploy/x.yaml",
    )
    .expect_err("must be rejected");
    assert_eq!(
        err.to_string(),
        "deploy/x.yaml:4:11: services[0].port: port 70000 is out of range 0..=65535\n\
         deploy/x.yaml:5:47: services[0].backends[0].weight: weight -1 is out of range 0..=65535"
    );
    let first = &err.errors[0];
    assert_eq!(
        (
            first.origin.as_str(),
            first.line,
            first.column,
            first.path.as_str()
        ),
        ("deploy/x.yaml", 4, 11, "services[0].port")
    );
    assert_eq!(first.message, "port 70000 is out of range 0..=65535");
}

#[test]
fn unreadable_file_is_an_error() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("no/such/config.yaml");
    let err = load(&path).expect_err("a missing file must be rejected");
    assert_eq!(
        err.to_string(),
        format!(
            "{}: cannot read the file: no such file or directory (os error 2)",
            path.display()
        )
    );
    assert_eq!((err.errors[0].line, err.errors[0].column), (0, 0));
}

#[test]
fn protocol_and_scheduler_names() {
    assert_eq!((Protocol::Tcp.number(), Protocol::Udp.number()), (6, 17));
    assert_eq!(
        (Protocol::Tcp.as_str(), Protocol::Udp.as_str()),
        ("tcp", "udp")
    );
    assert_eq!(Protocol::Udp.to_string(), "udp");
    assert_eq!(Scheduler::Maglev.to_string(), "maglev");
    assert_eq!(Protocol::from_name("TCP"), None);
}

#[test]
fn primes() {
    let small: Vec<u32> = (0..30).filter(|&n| validate::is_prime(n)).collect();
    assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
    assert!(validate::is_prime(MAX_TABLE_SIZE));
    assert!(!validate::is_prime(1_048_575));
    assert!(!validate::is_prime(65_535));
}

#[test]
fn columns_count_characters() {
    // yaml-rust2 (semantic errors) and libyaml (serde_yaml errors) both count columns in
    // characters, so they agree after non-ASCII text.
    let line = "  - {name: \"wé\", vip: 198.18.1.10, port: 80, backends: [{address: 198.18.0.11, weight: W}]}";
    let column = |needle: &str| line[..line.find(needle).unwrap()].chars().count() + 1;
    let semantic = errors(&lines(&["services:", &line.replace('W', "0")]));
    assert_eq!(
        semantic,
        [
            format!(
                "test.yaml:2:{}: services[0].name: service name 'wé' may only contain the characters \
                 A-Z a-z 0-9 _ . -",
                column("\"wé")
            ),
            format!(
                "test.yaml:2:{}: services[0].backends: this service has no usable backends: every weight is 0",
                column("backends")
            ),
        ]
    );
    let serde = errors(&lines(&["services:", &line.replace('W', "0.5")]));
    assert_eq!(
        serde,
        [format!(
            "test.yaml:2:{}: services[0].backends[0].weight: invalid type: floating point `0.5`, \
             expected an integer",
            column("W")
        )]
    );
}

#[test]
fn byte_order_mark_does_not_shift_positions() {
    let text = format!(
        "\u{feff}{}",
        service(&["    port: 70000", "    backends: [{address: 198.18.0.11}]"])
    );
    assert_eq!(
        errors(&text),
        ["test.yaml:4:11: services[0].port: port 70000 is out of range 0..=65535"]
    );
}

#[test]
fn anchors_and_aliases_resolve_to_the_alias() {
    assert_errors(
        &lines(&[
            "services:",
            "  - &web",
            "    name: web",
            "    vip: 198.18.1.10",
            "    port: 80",
            "    backends: [{address: 198.18.0.11}]",
            "  - *web",
        ]),
        &[
            "test.yaml:7:5: services[1].name: duplicate service name 'web' (first used by services[0] at line 3)",
            "test.yaml:7:5: services[1].vip: duplicate service: vip 198.18.1.10 port 80 protocol tcp is \
             already used by service 'web' (services[0], line 3)",
        ],
    );
}
