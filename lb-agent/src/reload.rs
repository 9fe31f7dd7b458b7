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
    let before: BTreeMap<_, _> = old.services.iter().map(|s| (service_key(s), s)).collect();
    let after: BTreeMap<_, _> = new.services.iter().map(|s| (service_key(s), s)).collect();
    let (mut added_s, mut removed_s, mut changed_s) = (0, 0, 0);
    let (mut added_b, mut removed_b, mut reweighted, mut changed_b) = (0, 0, 0, 0);
    for (k, s) in &after {
        let Some(o) = before.get(k) else {
            added_s += 1;
            added_b += s.backends.len();
            continue;
        };
        if o == s {
            continue;
        }
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
    removed_s += before.keys().filter(|k| !after.contains_key(*k)).count();
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

#[cfg(test)]
mod tests {
    use super::describe;
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
}
