//! The connection table's global fields: `established_size` and `timeouts`.

use std::time::Duration;

use super::super::raw::{Int, RawTimeouts};
use super::super::{MAX_CONNTRACK_SIZE, MIN_CONNTRACK_SIZE, Timeouts};
use super::Checker;

const MIN_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

impl Checker<'_> {
    /// `established_size`: 0 (off) or a table size; defaults to `conntrack_size`.
    pub(super) fn established_size(&mut self, raw: Option<Int>, conntrack_size: Option<u32>) -> Option<u32> {
        let Some(v) = raw else { return conntrack_size };
        if v.0 == 0 {
            return Some(0);
        }
        self.ranged(v, "established_size", "established_size", MIN_CONNTRACK_SIZE, MAX_CONNTRACK_SIZE)
    }

    pub(super) fn timeouts(&mut self, raw: Option<&RawTimeouts>) -> Option<Timeouts> {
        let defaults = Timeouts::default();
        let Some(raw) = raw else { return Some(defaults) };
        let mut one = |text: &Option<String>, name: &str, default: Duration| match text {
            None => Some(default),
            Some(t) => self.duration(t, &format!("timeouts.{name}"), name, MIN_TIMEOUT, MAX_TIMEOUT),
        };
        let tcp = one(&raw.tcp, "tcp", defaults.tcp);
        let tcp_fin = one(&raw.tcp_fin, "tcp_fin", defaults.tcp_fin);
        let udp = one(&raw.udp, "udp", defaults.udp);
        Some(Timeouts { tcp: tcp?, tcp_fin: tcp_fin?, udp: udp? })
    }
}
