//! Prefix services: a `vip` written as a prefix (`198.18.50.0/24`,
//! `2001:db8:100::/56`), and the schedulers that only make sense on one (`dh`,
//! `lblc`, `lblcr` schedule by the destination address, which an exact VIP
//! does not vary).

use std::net::IpAddr;

use super::super::Scheduler;
use super::Checker;

/// `vip` as written: the address, then `/len` for a prefix.
pub fn vip_text(vip: IpAddr, prefix: Option<u8>) -> String {
    match prefix {
        Some(len) => format!("{vip}/{len}"),
        None => vip.to_string(),
    }
}

/// `addr` with all but the first `len` bits cleared.
fn network(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    }
}

impl Checker<'_> {
    /// Parses a `vip`: an address, or a prefix (length 1..=32 for IPv4,
    /// 1..=128 for IPv6, no host bits set; its first address must be usable as
    /// an address is, so IPv4-mapped IPv6 prefixes are refused).
    pub(super) fn vip(&mut self, text: &str, path: &str) -> Option<(IpAddr, Option<u8>)> {
        let Some((addr, len)) = text.split_once('/') else {
            return self.address(text, path, "vip", "the vip").map(|a| (a, None));
        };
        let addr = self.address(addr.trim(), path, "vip", "the vip's prefix")?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len.trim().parse::<u8>() {
            Ok(len) if (1..=max).contains(&len) => len,
            _ => {
                let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
                self.at_value(
                    path,
                    format!("vip '{text}': the prefix length must be 1..={max} for {family}"),
                );
                return None;
            }
        };
        let net = network(addr, len);
        if net != addr {
            self.at_value(
                path,
                format!("vip {text} has host bits set: the prefix is {net}/{len}"),
            );
            return None;
        }
        Some((addr, Some(len)))
    }

    /// Refuses `dh`, `lblc` and `lblcr` on an exact VIP.
    pub(super) fn scheduler_needs_prefix(
        &mut self,
        scheduler: Option<Scheduler>,
        vip: Option<(IpAddr, Option<u8>)>,
        path: &str,
    ) -> Option<Scheduler> {
        let scheduler = scheduler?;
        if let Some((vip, None)) = vip {
            if scheduler.needs_prefix() {
                self.at_value(
                    path,
                    format!(
                        "scheduler {scheduler} schedules by destination address and needs a \
                         prefix vip (e.g. 198.18.50.0/24); vip {vip} is a single address"
                    ),
                );
                return None;
            }
        }
        Some(scheduler)
    }
}
