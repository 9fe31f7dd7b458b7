//! Addresses of vips, backends and probes: they must parse and be usable as a unicast
//! destination. An IPv6 spelling of an IPv4 address (`::ffff:198.18.1.10`, or the
//! deprecated `::198.18.1.10`) is refused: the maps key IPv4 addresses by their
//! IPv4-mapped form, so it would share one key with the IPv4 address, and the data
//! plane never matches an IPv4-mapped destination anyway. Every address that is
//! accepted thus has exactly one spelling as an `IpAddr`, and comparing `IpAddr`s
//! (duplicate services, duplicate backends) compares addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::Checker;

/// Why an address cannot be used, as (what it is, what to do instead).
enum Unusable {
    /// Not unicast: "the vip must be a unicast address".
    NotUnicast(&'static str),
    /// An IPv6 spelling of this IPv4 address.
    V4InV6(&'static str, Ipv4Addr),
    /// Link-local: only meaningful with an interface, which the file cannot name.
    LinkLocal,
}

fn unusable(address: IpAddr) -> Option<Unusable> {
    Some(match address {
        _ if address.is_unspecified() => Unusable::NotUnicast("the unspecified address"),
        _ if address.is_loopback() => Unusable::NotUnicast("a loopback address"),
        _ if address.is_multicast() => Unusable::NotUnicast("a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Unusable::NotUnicast("the broadcast address"),
        IpAddr::V4(v4) if v4.octets()[0] == 0 => {
            Unusable::NotUnicast("in 0.0.0.0/8 (\"this network\", never a destination)")
        }
        IpAddr::V6(v6) => match v6.segments() {
            [0, 0, 0, 0, 0, 0xffff, ..] => {
                Unusable::V4InV6("an IPv4-mapped IPv6 address", v4_tail(v6))
            }
            [0, 0, 0, 0, 0, 0, ..] => Unusable::V4InV6(
                "an IPv4-compatible IPv6 address (::/96, deprecated)",
                v4_tail(v6),
            ),
            [first, ..] if first & 0xffc0 == 0xfe80 => Unusable::LinkLocal,
            _ => return None,
        },
        IpAddr::V4(_) => return None,
    })
}

/// The IPv4 address in the last 32 bits of `v6`.
fn v4_tail(v6: Ipv6Addr) -> Ipv4Addr {
    let [.., a, b, c, d] = v6.octets();
    Ipv4Addr::new(a, b, c, d)
}

impl Checker<'_> {
    /// Parses a vip, backend or probe address and checks that it is usable. `what`
    /// names the address in messages ("the vip", "a backend", "a probe address").
    pub(super) fn address(
        &mut self,
        text: &str,
        path: &str,
        field: &str,
        what: &str,
    ) -> Option<IpAddr> {
        let Ok(address) = text.parse::<IpAddr>() else {
            self.at_value(
                path,
                format!("{field} '{text}' is not a valid IPv4 or IPv6 address"),
            );
            return None;
        };
        let Some(why) = unusable(address) else {
            return Some(address);
        };
        let message = match why {
            Unusable::NotUnicast(kind) => {
                format!("{field} {address} is {kind}; {what} must be a unicast address")
            }
            Unusable::V4InV6(kind, v4) => {
                format!("{field} {address} is {kind}; write the IPv4 address {v4} instead")
            }
            Unusable::LinkLocal => format!(
                "{field} {address} is a link-local address (fe80::/10), which needs an \
                 interface the file cannot name; {what} must be a global or unique-local \
                 unicast address"
            ),
        };
        self.at_value(path, message);
        None
    }
}
