//! How a service reaches its backends (`forwarding`, `gue_port`, a `nat` backend's
//! `port`) and the global
//! tunnel fields (`tunnel_source_v4`, `tunnel_source_v6`, `mtu`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::super::raw::Int;
use super::super::{Forwarding, DEFAULT_GUE_PORT};
use super::Checker;

const MIN_MTU: u32 = 576;
const MAX_MTU: u32 = 65535;

impl Checker<'_> {
    pub(super) fn forwarding(&mut self, raw: Option<&str>, path: &str) -> Option<Forwarding> {
        let Some(text) = raw else { return Some(Forwarding::Dr) };
        let found = Forwarding::from_name(text);
        if found.is_none() {
            let names: Vec<&str> = Forwarding::ALL.iter().map(|f| f.as_str()).collect();
            self.at_value(path, format!("unknown forwarding {text:?}; expected one of {}", names.join(", ")));
        }
        found
    }

    /// `gue_port`: only for `forwarding: gue`, `1..=65535`.
    pub(super) fn gue_port(&mut self, raw: Option<Int>, forwarding: Option<Forwarding>, path: &str) -> Option<u16> {
        let Some(v) = raw else { return Some(DEFAULT_GUE_PORT) };
        if forwarding.is_some_and(|f| f != Forwarding::Gue) {
            self.at_value(path, "gue_port applies only to forwarding: gue".into());
            return None;
        }
        if v.0 == 0 {
            self.at_value(path, "gue_port 0 is not a port; give 1..=65535 (default 6080)".into());
            return None;
        }
        self.ranged(v, path, "gue_port", 1, u16::MAX)
    }

    /// A backend's `port`: only for `forwarding: nat`, `1..=65535`.
    pub(super) fn backend_port(&mut self, raw: Option<Int>, forwarding: Option<Forwarding>, path: &str) -> Option<Option<u16>> {
        let Some(v) = raw else { return Some(None) };
        if forwarding.is_some_and(|f| !f.is_nat()) {
            self.at_value(path, "a backend's port applies only to forwarding: nat and fullnat (the other modes keep the client's port)".into());
            return None;
        }
        if v.0 == 0 {
            self.at_value(path, "port 0 is not a backend port; give 1..=65535 (default: the service's port)".into());
            return None;
        }
        self.ranged(v, path, "port", 1, u16::MAX).map(Some)
    }

    pub(super) fn tunnel_source_v4(&mut self, raw: Option<&str>) -> Option<Option<Ipv4Addr>> {
        let Some(text) = raw else { return Some(None) };
        let path = "tunnel_source_v4";
        match self.address(text, path, path, "the tunnel source")? {
            IpAddr::V4(a) => Some(Some(a)),
            IpAddr::V6(a) => {
                self.at_value(path, format!("tunnel_source_v4 {a} is an IPv6 address; give an IPv4 one (tunnel_source_v6 takes IPv6)"));
                None
            }
        }
    }

    pub(super) fn tunnel_source_v6(&mut self, raw: Option<&str>) -> Option<Option<Ipv6Addr>> {
        let Some(text) = raw else { return Some(None) };
        let path = "tunnel_source_v6";
        match self.address(text, path, path, "the tunnel source")? {
            IpAddr::V6(a) => Some(Some(a)),
            IpAddr::V4(a) => {
                self.at_value(path, format!("tunnel_source_v6 {a} is an IPv4 address; give an IPv6 one (tunnel_source_v4 takes IPv4)"));
                None
            }
        }
    }

    pub(super) fn mtu(&mut self, raw: Option<Int>) -> Option<Option<u32>> {
        let Some(v) = raw else { return Some(None) };
        self.ranged(v, "mtu", "mtu", MIN_MTU, MAX_MTU).map(Some)
    }
}
