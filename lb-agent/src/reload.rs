//! What a reload changes, in words for the log: "+1 service, 2 backends re-weighted".

use std::collections::BTreeMap;

use crate::config::{Config, ServiceConfig};

fn service_key(s: &ServiceConfig) -> (std::net::IpAddr, Option<u8>, u16, u8) {
    (s.vip, s.vip_prefix, s.port, s.protocol.number())
}

/// "+1 service", "2 backends re-weighted": nothing when `n` is 0.
fn phrase(n: usize, sign: &str, noun: &str, suffix: &str, out: &mut Vec<String>) {
    if n > 0 {
        let plural = if n == 1 { "" } else { "s" };
        out.push(format!("{sign}{n} {noun}{plural}{suffix}"));
    }
}

/// Summary of the differences between two configurations.
pub fn describe(old: &Config, new: &Config) -> String {
    describe_among(old, new, None)
}

/// `describe` when only the services of `new` at `parsed` may differ from
/// `old`'s (`config::reparse`: the others are copies of services of `old`,
/// whatever their place): only those are compared.
pub fn describe_among(old: &Config, new: &Config, parsed: Option<&[usize]>) -> String {
    let before: BTreeMap<_, _> = old.services.iter().map(|s| (service_key(s), s)).collect();
    let after: BTreeMap<_, _> = match parsed {
        Some(parsed) => parsed.iter().filter_map(|&i| new.services.get(i)).map(|s| (service_key(s), s)).collect(),
        None => new.services.iter().map(|s| (service_key(s), s)).collect(),
    };
    let (mut added_s, mut removed_s, mut changed_s) = (0, 0, 0);
    let (mut added_b, mut removed_b, mut reweighted, mut changed_b) = (0, 0, 0, 0);
    for (k, s) in &after {
        let Some(o) = before.get(k) else {
            added_s += 1;
            added_b += s.backends.len();
            continue;
        };
        if std::sync::Arc::ptr_eq(o, s) || o == s {
            continue;
        }
        let (o, s): (&ServiceConfig, &ServiceConfig) = (o, s);
        let ob: BTreeMap<_, _> = o.backends.iter().map(|b| (b.address, b)).collect();
        let nb: BTreeMap<_, _> = s.backends.iter().map(|b| (b.address, b)).collect();
        added_b += nb.keys().filter(|a| !ob.contains_key(*a)).count();
        removed_b += ob.keys().filter(|a| !nb.contains_key(*a)).count();
        for (a, b) in &nb {
            if let Some(o) = ob.get(a) {
                if o.weight != b.weight {
                    reweighted += 1;
                } else if *o != *b {
                    changed_b += 1;
                }
            }
        }
        // Everything but the key and the backends (compared above), without copying
        // them; a new field fails to compile here until it is compared.
        let ServiceConfig {
            name,
            vip: _,
            vip_prefix: _,
            port: _,
            protocol: _,
            scheduler,
            forwarding,
            gue_port,
            snat,
            table_size,
            backends: _,
            on_all_down,
            persistence,
        } = o;
        let same = *name == s.name
            && *scheduler == s.scheduler
            && *forwarding == s.forwarding
            && *gue_port == s.gue_port
            && *snat == s.snat
            && *table_size == s.table_size
            && *on_all_down == s.on_all_down
            && *persistence == s.persistence;
        if !same {
            changed_s += 1;
        }
    }
    removed_s += match parsed {
        // Every service of `old` is carried over, re-parsed (same key) or gone.
        Some(parsed) => {
            let carried = new.services.len() - parsed.len();
            let reparsed = after.keys().filter(|k| before.contains_key(*k)).count();
            old.services.len().saturating_sub(carried + reparsed)
        }
        None => before.keys().filter(|k| !after.contains_key(*k)).count(),
    };
    let mut out = Vec::new();
    phrase(added_s, "+", "service", "", &mut out);
    phrase(removed_s, "-", "service", "", &mut out);
    phrase(changed_s, "", "service", " changed", &mut out);
    phrase(added_b, "+", "backend", "", &mut out);
    phrase(removed_b, "-", "backend", "", &mut out);
    phrase(reweighted, "", "backend", " re-weighted", &mut out);
    phrase(changed_b, "", "backend", " changed", &mut out);
    if out.is_empty() { "no change".into() } else { out.join(", ") }
}

/// Whether `new` is `old` when only its services at `parsed` may differ (as
/// in `describe_among`): `new == old` without comparing the copies.
pub fn same_among(old: &Config, new: &Config, parsed: &[usize]) -> bool {
    // In the same order (a copy with the key of the service it replaces is that
    // service: keys are unique), the parsed ones equal.
    old.services.len() == new.services.len()
        && old.services.iter().zip(&new.services).all(|(o, n)| service_key(o) == service_key(n))
        && parsed.iter().all(|&i| old.services.get(i) == new.services.get(i))
}

#[cfg(test)]
mod tests {
    use super::{describe, describe_among, same_among};
    use crate::config::parse;

    const BASE: &str = "services:
  - name: web
    vip: 198.18.1.10
    port: 80
    backends:
      - address: 198.18.0.11
      - address: 198.18.0.12
";

    #[test]
    fn describes_what_a_reload_changes() {
        let old = parse(BASE, "a").unwrap();
        assert_eq!(describe(&old, &old), "no change");
        let new = parse(
            &(BASE.replace("      - address: 198.18.0.12\n", "      - address: 198.18.0.12\n        weight: 3\n      - address: 198.18.0.13\n")
                + "  - name: dns\n    vip: 198.18.1.10\n    port: 53\n    protocol: udp\n    backends:\n      - address: 198.18.0.11\n"),
            "b",
        )
        .unwrap();
        // web's third backend moves its automatic table size from 257 to 521 slots.
        assert_eq!(describe(&old, &new), "+1 service, 1 service changed, +2 backends, 1 backend re-weighted");
        assert_eq!(describe(&new, &old), "-1 service, 1 service changed, -1 backend, 1 backend re-weighted");
    }

    #[test]
    fn a_reparse_is_described_from_its_parsed_services_alone() {
        let file = |w: u32, extra: bool| {
            let mut y = String::from("services:\n");
            for (i, name) in ["a", "b", "c"].iter().enumerate() {
                let weight = if i == 1 { w } else { 1 };
                y += &format!("  - name: {name}\n    vip: 198.18.1.{i}\n    port: 80\n    backends:\n      - address: 198.18.0.11\n        weight: {weight}\n");
            }
            if extra {
                y += "  - name: d\n    vip: 198.18.1.9\n    port: 80\n    backends:\n      - address: 198.18.0.12\n";
            }
            y
        };
        let old = parse(&file(1, false), "a").unwrap();
        for (new_text, parsed) in [(file(3, false), vec![1]), (file(3, true), vec![1, 3]), (file(1, true), vec![3])] {
            let new = parse(&new_text, "b").unwrap();
            assert_eq!(describe_among(&old, &new, Some(&parsed)), describe(&old, &new), "{parsed:?}");
            assert_eq!(describe_among(&new, &old, None), describe(&new, &old));
            assert!(!same_among(&old, &new, &parsed));
        }
        // One service gone: the others carried over.
        let three = parse(&file(1, true), "c").unwrap();
        assert_eq!(describe_among(&three, &old, Some(&[])), describe(&three, &old));
        assert_eq!(describe(&three, &old), "-1 service");
        assert!(same_among(&old, &old, &[0, 1]));
        // The same services in another order are another configuration.
        let mut swapped = old.clone();
        swapped.services.swap(0, 2);
        assert!(!same_among(&old, &swapped, &[]));
    }
}
