//! Probe blocks: defaults, the field-wise merge of a backend's probe over the service's,
//! and one test per rule with the exact message, line and column.

use std::time::Duration;

use super::{assert_errors, parse_ok, service};
use crate::health::{ExecProbe, Health, HttpProbe, ProbeKind, ProbeSpec, UdpProbe};

/// A service on port 80 with `probe` lines starting at line 5 and two backends after.
fn probed(probe: &[&str]) -> String {
    let mut tail = vec!["    port: 80", "    probe:"];
    tail.extend_from_slice(probe);
    tail.extend_from_slice(&[
        "    backends:",
        "      - address: 198.18.0.11",
        "      - address: 198.18.0.12",
    ]);
    service(&tail)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn no_probe_means_kind_none_with_defaults() {
    let config = parse_ok(&service(&[
        "    port: 80",
        "    backends: [{address: 198.18.0.11}]",
    ]));
    let probe = &config.services[0].backends[0].probe;
    assert_eq!(*probe, ProbeSpec::default());
    assert_eq!(
        (probe.kind.clone(), probe.interval, probe.timeout),
        (ProbeKind::None, ms(2000), ms(1000))
    );
    assert_eq!(
        (
            probe.rise,
            probe.fall,
            probe.initial,
            probe.port,
            probe.address
        ),
        (2, 3, Health::Up, None, None)
    );
}

#[test]
fn backend_fields_override_the_services_field_by_field() {
    let config = parse_ok(&service(&[
        "    port: 80",
        "    probe:",
        "      kind: http",
        "      interval: 5s",
        "      timeout: 500ms",
        "      rise: 1",
        "      fall: 10",
        "      initial: down",
        "      path: /healthz",
        "      host: www.example.com",
        "      expect_status: 200",
        "      body_contains: ok",
        "    backends:",
        "      - address: 198.18.0.11",
        "      - address: 198.18.0.12",
        "        probe: {port: 8080, expect_status: 200-204, address: 198.18.0.99}",
        "      - address: 198.18.0.13",
        "        probe: {kind: tcp}",
        "      - address: 198.18.0.14",
        "        probe: {kind: https, sni: backend.example, verify_tls: false}",
        "      - address: 198.18.0.15",
        "        probe: {kind: none}",
    ]));
    let backends = &config.services[0].backends;
    let http = HttpProbe {
        path: "/healthz".to_string(),
        host: Some("www.example.com".to_string()),
        sni: None,
        expect_status: (200, 200),
        body_contains: Some("ok".to_string()),
        verify_tls: true,
        ca_file: None,
    };
    let service_probe = ProbeSpec {
        kind: ProbeKind::Http(http.clone()),
        interval: ms(5000),
        timeout: ms(500),
        rise: 1,
        fall: 10,
        initial: Health::Down,
        port: None,
        address: None,
    };
    assert_eq!(backends[0].probe, service_probe);
    assert_eq!(
        backends[1].probe,
        ProbeSpec {
            kind: ProbeKind::Http(HttpProbe {
                expect_status: (200, 204),
                ..http.clone()
            }),
            port: Some(8080),
            address: Some("198.18.0.99".parse().unwrap()),
            ..service_probe.clone()
        }
    );
    // A backend choosing another kind keeps the general fields, not the http ones.
    assert_eq!(
        backends[2].probe,
        ProbeSpec {
            kind: ProbeKind::Tcp,
            ..service_probe.clone()
        }
    );
    assert_eq!(
        backends[3].probe.kind,
        ProbeKind::Https(HttpProbe {
            sni: Some("backend.example".to_string()),
            verify_tls: false,
            ..http
        })
    );
    assert_eq!(backends[4].probe, ProbeSpec::default());
}

#[test]
fn every_kind_parses() {
    let kind = |probe: &[&str]| {
        parse_ok(&probed(probe)).services[0].backends[0]
            .probe
            .clone()
    };
    assert_eq!(kind(&["      kind: tcp"]).kind, ProbeKind::Tcp);
    assert_eq!(
        kind(&["      kind: http"]).kind,
        ProbeKind::Http(HttpProbe::default())
    );
    assert_eq!(HttpProbe::default().expect_status, (200, 399));
    assert_eq!(
        kind(&[
            "      kind: https",
            "      sni: www.example.com",
            "      ca_file: /etc/lb/ca.pem",
            "      expect_status: 200-299",
        ])
        .kind,
        ProbeKind::Https(HttpProbe {
            sni: Some("www.example.com".to_string()),
            ca_file: Some("/etc/lb/ca.pem".into()),
            expect_status: (200, 299),
            ..HttpProbe::default()
        })
    );
    assert_eq!(
        kind(&[
            "      kind: udp",
            "      payload: ping",
            "      expect: \"pong\""
        ])
        .kind,
        ProbeKind::Udp(UdpProbe {
            payload: b"ping".to_vec(),
            expect: Some(b"pong".to_vec()),
        })
    );
    assert_eq!(
        kind(&["      kind: udp", "      payload: \"\""]).kind,
        ProbeKind::Udp(UdpProbe {
            payload: Vec::new(),
            expect: None,
        })
    );
    let exec = kind(&[
        "      kind: exec",
        "      command: [/usr/local/bin/check, --fast]",
        "      port: 9000",
    ]);
    assert_eq!(
        (exec.kind, exec.port),
        (
            ProbeKind::Exec(ExecProbe {
                command: vec!["/usr/local/bin/check".to_string(), "--fast".to_string()],
            }),
            Some(9000)
        )
    );
    assert_eq!(kind(&["      kind: none"]), ProbeSpec::default());
    // An empty `probe:` is no probe.
    assert_eq!(kind(&[]), ProbeSpec::default());
}

#[test]
fn probe_field_values_are_checked() {
    assert_errors(
        &probed(&[
            "      kind: icmp",
            "      interval: 50ms",
            "      timeout: 2",
            "      rise: 0",
            "      fall: 101",
            "      initial: maybe",
            "      port: 0",
            "      address: 198.18.0.99",
        ]),
        &[
            "test.yaml:6:13: services[0].probe.kind: unknown probe kind 'icmp'; supported kinds: none, tcp, http, https, udp, exec",
            "test.yaml:7:17: services[0].probe.interval: interval 50ms is out of range 100ms..=1h",
            "test.yaml:8:16: services[0].probe.timeout: timeout '2' is not a duration such as 500ms, 2s, 1m or 1h",
            "test.yaml:9:13: services[0].probe.rise: rise 0 is out of range 1..=100",
            "test.yaml:10:13: services[0].probe.fall: fall 101 is out of range 1..=100",
            "test.yaml:11:16: services[0].probe.initial: unknown initial state 'maybe'; supported states: up, down",
            "test.yaml:12:13: services[0].probe.port: port 0 is out of range 1..=65535",
            "test.yaml:13:16: services[0].probe.address: a probe `address` is only allowed in a backend's probe",
        ],
    );
    assert_errors(
        &probed(&[
            "      kind: https",
            "      interval: 2h",
            "      path: healthz",
            "      host: \"\"",
            "      sni: 198.18.0.11",
            "      expect_status: 200-600",
            "      body_contains: \"\"",
            "      ca_file: \"\"",
        ]),
        &[
            "test.yaml:7:17: services[0].probe.interval: interval 2h is out of range 100ms..=1h",
            "test.yaml:8:13: services[0].probe.path: path 'healthz' must start with '/'",
            "test.yaml:9:13: services[0].probe.host: host must not be empty",
            "test.yaml:10:12: services[0].probe.sni: sni '198.18.0.11' is an address; the server name must be a DNS name",
            "test.yaml:11:22: services[0].probe.expect_status: expect_status 200-600 is out of range 100..=599",
            "test.yaml:12:22: services[0].probe.body_contains: body_contains must not be empty",
            "test.yaml:13:16: services[0].probe.ca_file: ca_file must not be empty",
        ],
    );
}

#[test]
fn status_ranges_and_names() {
    let status =
        |text: &str| probed(&["      kind: http", &format!("      expect_status: {text}")]);
    for bad in ["2xx", "200-", "\"\"", "200-300-400"] {
        let shown = bad.trim_matches('"');
        assert_errors(
            &status(bad),
            &[&format!(
                "test.yaml:7:22: services[0].probe.expect_status: expect_status '{shown}' is not a \
                 status such as 200 or a range such as 200-399"
            )],
        );
    }
    assert_errors(
        &status("399-200"),
        &[
            "test.yaml:7:22: services[0].probe.expect_status: expect_status 399-200 is an empty range (the first status is larger)",
        ],
    );
    assert_errors(
        &status("99"),
        &[
            "test.yaml:7:22: services[0].probe.expect_status: expect_status 99 is out of range 100..=599",
        ],
    );
    assert_errors(
        &probed(&[
            "      kind: https",
            "      sni: \"bad name\"",
            "      path: /a b",
        ]),
        &[
            "test.yaml:7:12: services[0].probe.sni: sni 'bad name' is not a valid DNS name",
            "test.yaml:8:13: services[0].probe.path: path '/a b' must not contain spaces or control characters",
        ],
    );
}

#[test]
fn probe_type_errors_point_at_the_field() {
    assert_errors(
        &probed(&["      kind: https", "      verify_tls: maybe"]),
        &[
            "test.yaml:7:19: services[0].probe.verify_tls: invalid type: string \"maybe\", expected a boolean",
        ],
    );
    assert_errors(
        &probed(&["      kind: exec", "      command: /bin/true"]),
        &[
            "test.yaml:7:16: services[0].probe.command: invalid type: string \"/bin/true\", expected a sequence",
        ],
    );
    assert_errors(
        &probed(&["      kind: tcp", "      rise: fast"]),
        &[
            "test.yaml:7:13: services[0].probe.rise: invalid type: string \"fast\", expected an integer",
        ],
    );
    assert_errors(
        &probed(&["      kind: tcp", "      intervall: 1s"]),
        &[
            "test.yaml:7:7: services[0].probe: unknown field `intervall`, expected one of `kind`, \
             `interval`, `timeout`, `rise`, `fall`, `initial`, `port`, `address`, `path`, `host`, \
             `sni`, `expect_status`, `body_contains`, `verify_tls`, `ca_file`, `payload`, `expect`, \
             `command`",
        ],
    );
}

#[test]
fn fields_must_apply_to_the_kind() {
    assert_errors(
        &probed(&[
            "      kind: http",
            "      sni: www.example.com",
            "      payload: ping",
            "      command: [x]",
        ]),
        &[
            "test.yaml:7:12: services[0].probe.sni: `sni` does not apply to probe kind http (only to https)",
            "test.yaml:8:16: services[0].probe.payload: `payload` does not apply to probe kind http (only to udp)",
            "test.yaml:9:16: services[0].probe.command: `command` does not apply to probe kind http (only to exec)",
        ],
    );
    // Without a kind (none), nothing applies; a backend's field is reported at the backend.
    assert_errors(
        &service(&[
            "    port: 80",
            "    probe:",
            "      interval: 1s",
            "    backends:",
            "      - address: 198.18.0.11",
            "        probe: {port: 8080, path: /}",
        ]),
        &[
            "test.yaml:6:17: services[0].probe.interval: `interval` does not apply to probe kind none (only to tcp, http, https, udp, exec)",
            "test.yaml:9:23: services[0].backends[0].probe.port: `port` does not apply to probe kind none (only to tcp, http, https, udp, exec)",
            "test.yaml:9:35: services[0].backends[0].probe.path: `path` does not apply to probe kind none (only to http, https)",
        ],
    );
    // The service's kind applies to a backend's fields.
    assert_errors(
        &service(&[
            "    port: 80",
            "    probe: {kind: tcp}",
            "    backends:",
            "      - address: 198.18.0.11",
            "        probe: {expect: pong}",
        ]),
        &[
            "test.yaml:8:25: services[0].backends[0].probe.expect: `expect` does not apply to probe kind tcp (only to udp)",
        ],
    );
}

#[test]
fn kinds_need_their_fields() {
    assert_errors(
        &probed(&["      kind: udp"]),
        &["test.yaml:6:13: services[0].probe.kind: probe kind udp needs `payload`"],
    );
    assert_errors(
        &probed(&["      kind: exec"]),
        &["test.yaml:6:13: services[0].probe.kind: probe kind exec needs `command`"],
    );
    assert_errors(
        &probed(&["      kind: exec", "      command: []"]),
        &["test.yaml:7:16: services[0].probe.command: command must not be empty"],
    );
    assert_errors(
        &probed(&["      kind: exec", "      command: [\"\", x]"]),
        &[
            "test.yaml:7:17: services[0].probe.command[0]: the program (the first item of command) must not be empty",
        ],
    );
    // A backend switching to udp must bring its payload.
    assert_errors(
        &service(&[
            "    port: 53",
            "    probe: {kind: tcp}",
            "    backends:",
            "      - address: 198.18.0.11",
            "        probe: {kind: udp}",
        ]),
        &["test.yaml:8:23: services[0].backends[0].probe.kind: probe kind udp needs `payload`"],
    );
}

#[test]
fn any_port_services_need_a_probe_port() {
    let any_port = |backend_probe: &str| {
        service(&[
            "    port: 0",
            "    probe: {kind: tcp}",
            "    backends:",
            "      - address: 198.18.0.11",
            backend_probe,
        ])
    };
    assert_errors(
        &any_port("        probe: {kind: exec, command: [x]}"),
        &[
            "test.yaml:5:19: services[0].probe.kind: probe kind tcp needs `port`: the service's port is 0 (any port)",
        ],
    );
    let ok = service(&[
        "    port: 0",
        "    probe: {kind: tcp, port: 22}",
        "    backends:",
        "      - address: 198.18.0.11",
        "        probe: {kind: exec, command: [x]}",
    ]);
    let probe = &parse_ok(&ok).services[0].backends[0].probe;
    assert_eq!(
        probe.port,
        Some(22),
        "general fields are inherited across kinds"
    );
    assert_errors(
        &service(&[
            "    port: 0",
            "    backends:",
            "      - address: 198.18.0.11",
            "        probe: {kind: http}",
        ]),
        &[
            "test.yaml:7:23: services[0].backends[0].probe.kind: probe kind http needs `port`: the service's port is 0 (any port)",
        ],
    );
}

#[test]
fn timeout_must_not_exceed_the_interval() {
    assert_errors(
        &probed(&["      kind: tcp", "      interval: 1s", "      timeout: 2s"]),
        &["test.yaml:8:16: services[0].probe.timeout: timeout 2s is longer than the interval 1s"],
    );
    assert_errors(
        &probed(&["      kind: tcp", "      interval: 500ms"]),
        &[
            "test.yaml:7:17: services[0].probe.interval: interval 500ms is shorter than the timeout 1s (the default)",
        ],
    );
    // The service's probe is fine; the backend's shorter interval is not (reported once,
    // at the backend, however many backends inherit the service's probe).
    assert_errors(
        &service(&[
            "    port: 80",
            "    probe: {kind: tcp, timeout: 900ms}",
            "    backends:",
            "      - address: 198.18.0.11",
            "        probe: {interval: 800ms}",
            "      - address: 198.18.0.12",
        ]),
        &[
            "test.yaml:8:27: services[0].backends[0].probe.interval: interval 800ms is shorter than the timeout 900ms",
        ],
    );
}

#[test]
fn service_probe_errors_are_reported_once() {
    assert_errors(
        &probed(&["      kind: udp", "      interval: 1x"]),
        &[
            "test.yaml:6:13: services[0].probe.kind: probe kind udp needs `payload`",
            "test.yaml:7:17: services[0].probe.interval: interval '1x' is not a duration such as 500ms, 2s, 1m or 1h",
        ],
    );
}

#[test]
fn backend_probe_addresses_are_checked() {
    assert_errors(
        &service(&[
            "    port: 80",
            "    probe: {kind: tcp}",
            "    backends:",
            "      - address: 198.18.0.11",
            "        probe: {address: 224.0.0.1}",
            "      - address: 198.18.0.12",
            "        probe: {address: backend}",
        ]),
        &[
            "test.yaml:8:26: services[0].backends[0].probe.address: address 224.0.0.1 is a multicast address; a probe address must be a unicast address",
            "test.yaml:10:26: services[0].backends[1].probe.address: address 'backend' is not a valid IPv4 or IPv6 address",
        ],
    );
}

#[test]
fn numbers_in_string_fields_are_text() {
    let config = parse_ok(&probed(&[
        "      kind: udp",
        "      payload: 123",
        "      expect: 0x10",
    ]));
    assert_eq!(
        config.services[0].backends[0].probe.kind,
        ProbeKind::Udp(UdpProbe {
            payload: b"123".to_vec(),
            expect: Some(b"0x10".to_vec()),
        })
    );
}
