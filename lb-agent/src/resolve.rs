//! When to try again for backends whose MAC is not known.
//!
//! A backend that does not answer ARP/ND when the agent starts (its rack is powered
//! on after the balancer, its link is down) leaves a FAILED neighbour entry, and the
//! kernel does not try it again until something sends to it. So the agent probes
//! every unresolved backend again (`Neighbours::probe`, a datagram that makes the
//! kernel run ARP/ND) on a backoff: [`FIRST`] after the last try, then doubling up to
//! [`CAP`] (1 s, 2 s, 4 s, 4 s, ...). A backend that comes up is thus tried within
//! [`CAP`], and the kernel's answer reaches the agent as a neighbour event, which
//! puts the backend in the tables at once. Each round also re-reads the neighbour
//! table, in case an event was lost.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

/// Delay before the first retry of an address.
pub const FIRST: Duration = Duration::from_secs(1);
/// Longest delay between two retries of an address.
pub const CAP: Duration = Duration::from_secs(4);

#[derive(Debug, Clone, Copy)]
struct Entry {
    next: Instant,
    delay: Duration,
}

/// The retry schedule of the unresolved addresses.
#[derive(Debug, Default)]
pub struct Backoff {
    entries: BTreeMap<IpAddr, Entry>,
}

impl Backoff {
    /// Of the `missing` addresses, those to try again at `now`, each then scheduled
    /// for its next try. An address not seen before is first due [`FIRST`] from now
    /// (it has just been tried: at start or by a reload); addresses no longer
    /// missing (resolved, or gone from the configuration) are forgotten, so one that
    /// goes missing again starts over at [`FIRST`].
    pub fn due(&mut self, missing: &[IpAddr], now: Instant) -> Vec<IpAddr> {
        self.entries.retain(|a, _| missing.contains(a));
        let mut out = Vec::new();
        for addr in missing {
            let e = self.entries.entry(*addr).or_insert(Entry { next: now + FIRST, delay: FIRST });
            if now >= e.next {
                e.delay = (e.delay * 2).min(CAP);
                e.next = now + e.delay;
                out.push(*addr);
            }
        }
        out
    }

    /// When `addr` is tried next, if it is scheduled.
    pub fn next_try(&self, addr: IpAddr) -> Option<Instant> {
        self.entries.get(&addr).map(|e| e.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The offsets (in seconds from the first sighting) at which `addr` is due when
    /// asked every 100 ms for `secs` seconds.
    fn schedule(secs: u64) -> Vec<f64> {
        let mut b = Backoff::default();
        let t0 = Instant::now();
        let a = ip("198.18.0.11");
        (0..=secs * 10)
            .filter_map(|i| {
                let now = t0 + Duration::from_millis(100 * i);
                (!b.due(&[a], now).is_empty()).then_some(i as f64 / 10.0)
            })
            .collect()
    }

    #[test]
    fn one_second_doubling_to_four() {
        assert_eq!(schedule(20), vec![1.0, 3.0, 7.0, 11.0, 15.0, 19.0]);
    }

    #[test]
    fn resolved_addresses_are_forgotten_and_start_over() {
        let mut b = Backoff::default();
        let t0 = Instant::now();
        let (a, c) = (ip("198.18.0.11"), ip("2001:db8::12"));
        assert!(b.due(&[a, c], t0).is_empty());
        assert_eq!(b.due(&[a, c], t0 + FIRST), vec![a, c]);
        // `a` resolves: only `c` stays scheduled.
        assert!(b.due(&[c], t0 + Duration::from_secs(2)).is_empty());
        assert_eq!(b.next_try(a), None);
        assert_eq!(b.next_try(c), Some(t0 + FIRST + 2 * FIRST));
        // `a` goes missing again: first retry one FIRST later, not at the cap.
        let t = t0 + Duration::from_secs(10);
        assert_eq!(b.due(&[a, c], t), vec![c]);
        assert_eq!(b.next_try(a), Some(t + FIRST));
    }
}
