//! Backups, `on_all_down` and `persistence`.

use std::time::Duration;

use super::{OnAllDown, Persistence, assert_errors, parse_ok, service};

#[test]
fn on_all_down_defaults_to_backup_only_with_a_backup() {
    let without = parse_ok(&service(&[
        "    port: 80",
        "    backends: [{address: 198.18.0.11}]",
    ]));
    assert_eq!(without.services[0].on_all_down, OnAllDown::Drop);
    let with = parse_ok(&service(&[
        "    port: 80",
        "    backends:",
        "      - address: 198.18.0.11",
        "      - address: 198.18.0.12",
        "        backup: true",
    ]));
    let service = &with.services[0];
    assert_eq!(service.on_all_down, OnAllDown::Backup);
    let backups: Vec<bool> = service.backends.iter().map(|b| b.backup).collect();
    assert_eq!(backups, [false, true]);
}

#[test]
fn on_all_down_explicit_values() {
    for (text, action) in [
        ("drop", OnAllDown::Drop),
        ("pass", OnAllDown::Pass),
        ("backup", OnAllDown::Backup),
    ] {
        let config = parse_ok(&service(&[
            "    port: 80",
            &format!("    on_all_down: {text}"),
            "    backends: [{address: 198.18.0.11}, {address: 198.18.0.12, backup: true}]",
        ]));
        assert_eq!(config.services[0].on_all_down, action);
        assert_eq!(action.to_string(), text);
    }
}

#[test]
fn on_all_down_must_be_known_and_backup_needs_a_backup() {
    assert_errors(
        &service(&[
            "    port: 80",
            "    on_all_down: reject",
            "    backends: [{address: 198.18.0.11}]",
        ]),
        &[
            "test.yaml:5:18: services[0].on_all_down: unknown on_all_down action 'reject'; supported actions: drop, pass, backup",
        ],
    );
    assert_errors(
        &service(&[
            "    port: 80",
            "    on_all_down: backup",
            "    backends: [{address: 198.18.0.11, backup: false}]",
        ]),
        &[
            "test.yaml:5:18: services[0].on_all_down: on_all_down backup needs a backend with `backup: true`",
        ],
    );
    assert_errors(
        &service(&[
            "    port: 80",
            "    backends: [{address: 198.18.0.11, backup: yes}]",
        ]),
        &[
            "test.yaml:5:47: services[0].backends[0].backup: invalid type: string \"yes\", expected a boolean",
        ],
    );
}

#[test]
fn usable_backends_are_primaries_with_weight() {
    assert_errors(
        &service(&[
            "    port: 80",
            "    backends:",
            "      - {address: 198.18.0.11, backup: true}",
        ]),
        &[
            "test.yaml:5:5: services[0].backends: service 'web' has no usable backends: every backend is a backup",
        ],
    );
    assert_errors(
        &service(&[
            "    port: 80",
            "    backends:",
            "      - {address: 198.18.0.11, weight: 0}",
            "      - {address: 198.18.0.12, backup: true}",
        ]),
        &[
            "test.yaml:5:5: services[0].backends: service 'web' has no usable backends: every primary (non-backup) backend has weight 0",
        ],
    );
    // A backup with weight 0 is allowed; the primary makes the service usable.
    let config = parse_ok(&service(&[
        "    port: 80",
        "    backends:",
        "      - {address: 198.18.0.11}",
        "      - {address: 198.18.0.12, backup: true, weight: 0}",
    ]));
    assert_eq!(config.services[0].backends[1].weight, 0);
}

#[test]
fn persistence_defaults_and_values() {
    let config = parse_ok(&service(&[
        "    port: 80",
        "    backends: [{address: 198.18.0.11}]",
    ]));
    assert_eq!(config.services[0].persistence, None);
    let persistence = |lines: &[&str]| {
        let mut tail = vec!["    port: 80", "    persistence:"];
        tail.extend_from_slice(lines);
        tail.push("    backends: [{address: 198.18.0.11}]");
        service(&tail)
    };
    assert_eq!(
        parse_ok(&persistence(&["      timeout: 5m"])).services[0].persistence,
        Some(Persistence {
            timeout: Duration::from_secs(300),
            prefix_v4: 32,
            prefix_v6: 128,
        })
    );
    assert_eq!(
        parse_ok(&persistence(&[
            "      timeout: 24h",
            "      prefix_v4: 24",
            "      prefix_v6: 64",
        ]))
        .services[0]
            .persistence,
        Some(Persistence {
            timeout: Duration::from_secs(86_400),
            prefix_v4: 24,
            prefix_v6: 64,
        })
    );
    assert_eq!(
        parse_ok(&service(&[
            "    port: 80",
            "    persistence: {}",
            "    backends: [{address: 198.18.0.11}]",
        ]))
        .services[0]
            .persistence
            .map(|p| p.timeout),
        Some(Duration::from_secs(300))
    );
    assert_errors(
        &persistence(&[
            "      timeout: 500ms",
            "      prefix_v4: 0",
            "      prefix_v6: 129",
        ]),
        &[
            "test.yaml:6:16: services[0].persistence.timeout: timeout 500ms is out of range 1s..=24h",
            "test.yaml:7:18: services[0].persistence.prefix_v4: prefix_v4 0 is out of range 1..=32",
            "test.yaml:8:18: services[0].persistence.prefix_v6: prefix_v6 129 is out of range 1..=128",
        ],
    );
    assert_errors(
        &persistence(&["      timeout: 25h", "      prefix: 24"]),
        &[
            "test.yaml:7:7: services[0].persistence: unknown field `prefix`, expected one of `timeout`, `prefix_v4`, `prefix_v6`",
        ],
    );
    assert_errors(
        &persistence(&["      timeout: 1d"]),
        &[
            "test.yaml:6:16: services[0].persistence.timeout: timeout '1d' is not a duration such as 500ms, 2s, 1m or 1h",
        ],
    );
}
