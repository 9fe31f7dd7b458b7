//! Prefix services (`vip: 198.18.50.0/24`) and the schedulers that need one.

use super::{assert_errors, lines, parse_ok};

/// One service with `vip` and `scheduler` (line 3: vip, line 5: scheduler).
fn with(vip: &str, scheduler: &str) -> String {
    lines(&[
        "services:",
        "  - name: web",
        &format!("    vip: {vip}"),
        "    port: 80",
        &format!("    scheduler: {scheduler}"),
        "    backends: [{address: 198.18.0.11}, {address: 198.18.0.12}]",
    ])
}

#[test]
fn prefix_vips_parse_with_every_scheduler() {
    for scheduler in ["dh", "lblc", "lblcr", "maglev", "wlc"] {
        let c = parse_ok(&with("198.18.50.0/24", scheduler));
        let s = &c.services[0];
        assert_eq!((s.vip, s.vip_prefix), ("198.18.50.0".parse().unwrap(), Some(24)));
        assert_eq!(s.scheduler.as_str(), scheduler);
    }
    let c = parse_ok(&lines(&[
        "services:",
        "  - name: web6",
        "    vip: 2001:db8:100::/56",
        "    port: 0",
        "    scheduler: lblcr",
        "    backends: [{address: '2001:db8::11'}]",
    ]));
    assert_eq!(c.services[0].vip_prefix, Some(56));
    // An exact VIP has no prefix.
    assert_eq!(parse_ok(&with("198.18.1.10", "maglev")).services[0].vip_prefix, None);
}

#[test]
fn dh_lblc_lblcr_need_a_prefix_vip() {
    for scheduler in ["dh", "lblc", "lblcr"] {
        let message = format!(
            "test.yaml:5:16: services[0].scheduler: scheduler {scheduler} schedules by destination address \
             and needs a prefix vip (e.g. 198.18.50.0/24); vip 198.18.1.10 is a single address"
        );
        assert_errors(&with("198.18.1.10", scheduler), &[&message]);
    }
}

#[test]
fn bad_prefixes_are_refused() {
    assert_errors(
        &with("198.18.50.1/24", "dh"),
        &["test.yaml:3:10: services[0].vip: vip 198.18.50.1/24 has host bits set: the prefix is 198.18.50.0/24"],
    );
    assert_errors(
        &with("198.18.50.0/33", "dh"),
        &["test.yaml:3:10: services[0].vip: vip '198.18.50.0/33': the prefix length must be 1..=32 for IPv4"],
    );
    assert_errors(
        &with("198.18.50.0/0", "dh"),
        &["test.yaml:3:10: services[0].vip: vip '198.18.50.0/0': the prefix length must be 1..=32 for IPv4"],
    );
    assert_errors(
        &with("2001:db8::/129", "dh"),
        &["test.yaml:3:10: services[0].vip: vip '2001:db8::/129': the prefix length must be 1..=128 for IPv6"],
    );
    assert_errors(
        &with("198.18.50.0/x", "dh"),
        &["test.yaml:3:10: services[0].vip: vip '198.18.50.0/x': the prefix length must be 1..=32 for IPv4"],
    );
    let mapped = with("'::ffff:198.18.50.0/120'", "dh");
    let errors = super::errors(&mapped);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("test.yaml:3:10: services[0].vip: vip ::ffff:198.18.50.0 is an IPv4-mapped IPv6 address"),
        "{errors:?}"
    );
}

#[test]
fn the_same_prefix_twice_is_refused_nested_ones_are_not() {
    let dup = lines(&[
        "services:",
        "  - name: a",
        "    vip: 198.18.50.0/24",
        "    port: 80",
        "    backends: [{address: 198.18.0.11}]",
        "  - name: b",
        "    vip: 198.18.50.0/24",
        "    port: 80",
        "    backends: [{address: 198.18.0.12}]",
    ]);
    assert_errors(
        &dup,
        &["test.yaml:7:10: services[1].vip: duplicate service: vip 198.18.50.0/24 port 80 protocol tcp is already \
           used by service 'a' (services[0], line 2)"],
    );
    // Nested prefixes and an exact VIP inside a prefix: longest match decides.
    let nested = dup.replacen("198.18.50.0/24", "198.18.48.0/20", 1).replace("    vip: 198.18.1.10", "");
    let c = parse_ok(&(nested + "  - name: c\n    vip: 198.18.50.10\n    port: 80\n    backends: [{address: 198.18.0.13}]\n"));
    assert_eq!(c.services.len(), 3);
}

#[test]
fn nat_needs_an_exact_vip() {
    let text = lines(&[
        "services:",
        "  - name: web",
        "    vip: 198.18.50.0/24",
        "    port: 80",
        "    forwarding: nat",
        "    backends: [{address: 198.18.0.11}]",
    ]);
    assert_errors(&text, &["test.yaml:5:17: services[0].forwarding: forwarding: nat needs an exact vip, not a prefix"]);
}
