//! `forwarding: fullnat`'s SNAT pool: `snat_addresses` (a list of the balancer's
//! own addresses, IPv4 and IPv6) and `snat_ports` (`LOW-HIGH`), at the top level
//! (the default pool) and per service (the service's own). A `fullnat` service
//! needs an address of its backends' family in the pool in force; the other modes
//! take neither field. That the addresses are on the interface is checked when the
//! agent starts and reloads (`nexthop::check_snat`).

use std::net::IpAddr;

use lb_common::MAX_SNAT_ADDRS;

use super::super::{Forwarding, ServiceConfig, Snat, DEFAULT_SNAT_PORTS};
use super::Checker;

impl Checker<'_> {
    /// `snat_addresses` at `path` (`None`: an error was reported).
    pub(super) fn snat_addresses(&mut self, raw: Option<&[String]>, path: &str) -> Option<Option<Vec<IpAddr>>> {
        let Some(list) = raw else { return Some(None) };
        let mut out = Some(Vec::with_capacity(list.len()));
        let mut seen = Vec::new();
        for (i, text) in list.iter().enumerate() {
            let item = format!("{path}[{i}]");
            let addr = self.address(text, &item, "snat address", "a SNAT address");
            let addr = addr.filter(|a| {
                let dup = seen.contains(a);
                if dup {
                    self.at_value(&item, format!("duplicate snat address {a}"));
                }
                seen.push(*a);
                !dup
            });
            out = out.zip(addr).map(|(mut o, a)| {
                o.push(a);
                o
            });
        }
        if list.is_empty() {
            self.at_value(path, "snat_addresses is empty; list at least one of the balancer's own addresses".into());
            return None;
        }
        let out = out?;
        for (family, v4) in [("IPv4", true), ("IPv6", false)] {
            let n = out.iter().filter(|a| a.is_ipv4() == v4).count();
            if n > MAX_SNAT_ADDRS {
                self.at_value(path, format!("snat_addresses has {n} {family} addresses; at most {MAX_SNAT_ADDRS} per family"));
                return None;
            }
        }
        Some(Some(out))
    }

    /// `snat_ports` at `path`: `LOW-HIGH`, `1 <= LOW <= HIGH <= 65535`.
    pub(super) fn snat_ports(&mut self, raw: Option<&str>, path: &str) -> Option<Option<(u16, u16)>> {
        let Some(text) = raw else { return Some(None) };
        let parsed = text.split_once('-').and_then(|(lo, hi)| Some((lo.trim().parse::<u32>().ok()?, hi.trim().parse::<u32>().ok()?)));
        match parsed {
            Some((lo, hi)) if (1..=65535).contains(&lo) && (1..=65535).contains(&hi) && lo <= hi => Some(Some((lo as u16, hi as u16))),
            Some((lo, hi)) if lo > hi => {
                self.at_value(path, format!("snat_ports {text:?}: the first port ({lo}) is above the last ({hi})"));
                None
            }
            Some(_) => {
                self.at_value(path, format!("snat_ports {text:?}: ports must lie in 1..=65535"));
                None
            }
            None => {
                self.at_value(path, format!("snat_ports {text:?} is not a port range; write LOW-HIGH, e.g. 1024-65535"));
                None
            }
        }
    }

    /// The pool a service uses: its own fields over the global ones (`global`),
    /// for `fullnat` only; the others may not give them. `family_v4`: whether the
    /// service's backends are IPv4 (its vip's family).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn service_snat(
        &mut self,
        own: (Option<&[String]>, Option<&str>),
        global: Option<&Snat>,
        forwarding: Option<Forwarding>,
        vip: Option<IpAddr>,
        path: &str,
    ) -> Option<Option<Snat>> {
        let field = |name: &str| format!("{path}.{name}");
        let addresses = self.snat_addresses(own.0, &field("snat_addresses"));
        let ports = self.snat_ports(own.1, &field("snat_ports"));
        let Some(forwarding) = forwarding else { return Some(None) };
        if forwarding != Forwarding::Fullnat {
            for (given, name) in [(own.0.is_some(), "snat_addresses"), (own.1.is_some(), "snat_ports")] {
                if given {
                    self.at_value(&field(name), format!("{name} applies only to forwarding: fullnat"));
                    return None;
                }
            }
            return Some(None);
        }
        // A global pool with errors (reported there) reports nothing more here.
        let (addresses, ports) = (addresses?, ports?);
        let snat = Snat {
            addresses: match addresses {
                Some(a) => a,
                None => global?.addresses.clone(),
            },
            ports: match ports {
                Some(p) => p,
                None => global?.ports,
            },
        };
        if let Some(vip) = vip {
            if !snat.addresses.iter().any(|a| a.is_ipv4() == vip.is_ipv4()) {
                let family = if vip.is_ipv4() { "IPv4" } else { "IPv6" };
                self.at_value(
                    &field("forwarding"),
                    format!(
                        "forwarding: fullnat needs a SNAT address of the backends' family ({family}): give one in \
                         {path}.snat_addresses or the top-level snat_addresses"
                    ),
                );
                return None;
            }
            if snat.addresses.contains(&vip) {
                self.at_value(&field("vip"), format!("vip {vip} is also a snat address; a SNAT address must not be a vip"));
                return None;
            }
        }
        Some(Some(snat))
    }

    /// `fullnat` needs the established table (ports are returned when a flow's
    /// established entry expires); `false`: reported.
    pub(super) fn fullnat_table(&mut self, services: Option<&[ServiceConfig]>, established_size: Option<u32>) -> bool {
        let fullnat = services.is_some_and(|s| s.iter().any(|s| s.forwarding == Forwarding::Fullnat));
        if fullnat && established_size == Some(0) {
            self.at_value(
                "established_size",
                "established_size 0 cannot serve forwarding: fullnat (a flow's SNAT port is returned when its \
                 established entry expires); give a table size"
                    .into(),
            );
            return false;
        }
        true
    }

    /// The top-level pool.
    pub(super) fn global_snat(&mut self, addresses: Option<&[String]>, ports: Option<&str>) -> Option<Snat> {
        let addresses = self.snat_addresses(addresses, "snat_addresses");
        let ports = self.snat_ports(ports, "snat_ports");
        Some(Snat { addresses: addresses?.unwrap_or_default(), ports: ports?.unwrap_or(DEFAULT_SNAT_PORTS) })
    }
}
