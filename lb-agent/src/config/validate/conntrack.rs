//! The connection table's global fields: `established_size` and `timeouts`; and
//! the fragment table's (`fragments`).

use std::time::Duration;

use super::super::raw::{Int, RawFragments, RawTimeouts};
use super::super::{Fragments, MAX_CONNTRACK_SIZE, MAX_FRAGMENTS_SIZE, MIN_CONNTRACK_SIZE, MIN_FRAGMENTS_SIZE, Timeouts};
use super::Checker;

const MIN_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// `fragments.timeout`: whole seconds (the data plane's clock), at most a minute
/// (RFC 8200 reassembly gives up after 60 s).
const MIN_FRAG_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_FRAG_TIMEOUT: Duration = Duration::from_secs(60);

impl Checker<'_> {
    /// `established_size`: 0 (off) or a table size; defaults to `conntrack_size`.
    pub(super) fn established_size(&mut self, raw: Option<Int>, conntrack_size: Option<u32>) -> Option<u32> {
        let Some(v) = raw else { return conntrack_size };
        if v.0 == 0 {
            return Some(0);
        }
        self.ranged(v, "established_size", "established_size", MIN_CONNTRACK_SIZE, MAX_CONNTRACK_SIZE)
    }

    pub(super) fn fragments(&mut self, raw: Option<&RawFragments>) -> Option<Fragments> {
        let defaults = Fragments::default();
        let Some(raw) = raw else { return Some(defaults) };
        let size = match raw.size {
            None => Some(defaults.size),
            Some(v) => self.ranged(v, "fragments.size", "size", MIN_FRAGMENTS_SIZE, MAX_FRAGMENTS_SIZE),
        };
        let timeout = match &raw.timeout {
            None => Some(defaults.timeout),
            Some(t) => self
                .duration(t, "fragments.timeout", "timeout", MIN_FRAG_TIMEOUT, MAX_FRAG_TIMEOUT)
                .and_then(|d| {
                    if d.subsec_nanos() != 0 {
                        self.at_value("fragments.timeout", format!("timeout '{t}' must be whole seconds"));
                        return None;
                    }
                    Some(d)
                }),
        };
        Some(Fragments { size: size?, timeout: timeout? })
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
