//! The agent's view of `FIRST_RECORD` (`lb_common::first`): SYNs of `maglev`
//! and `sh` services recorded with one store instead of a `CONNTRACK` insert.
//! The sweep counts the records still valid (check matching, within
//! `timeouts.tcp_fin` of the SYN) as half-open connections, inactive on their
//! backend, as it counts a SYN in `CONNTRACK`, and empties the valid ones past
//! it (their `first_seen` keeps 16 bits of the second: a record left in place
//! would look young again 65,536 s later). A record keeps a tag of its
//! flow, not the 5-tuple: the half-open flows here can be counted (per
//! backend), not listed.

use std::{
    os::fd::AsFd,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::MapData;
use lb_common::{first_record_check, first_record_expired, FirstRecord};

use crate::conntrack::Counts;
use crate::config::Timeouts;

/// `FIRST_RECORD` mapped (the map is `BPF_F_MMAPABLE`; its 16-byte elements
/// lie back to back). Written only to empty expired records (`count`).
pub struct FirstRecords {
    mapping: crate::mmap::Mapping,
    len: usize,
    _map: MapData,
}

impl FirstRecords {
    /// Maps `map` (an array of `FirstRecord` created with BPF_F_MMAPABLE).
    pub fn new(map: MapData) -> std::io::Result<Self> {
        let len = map.info().map_err(std::io::Error::other)?.max_entries() as usize;
        let mapping = crate::mmap::Mapping::new(map.fd().as_fd(), len * size_of::<FirstRecord>())?;
        Ok(FirstRecords { mapping, len, _map: map })
    }

    /// Every slot, copied one by one (the program writes them meanwhile).
    fn records(&self) -> impl Iterator<Item = FirstRecord> + '_ {
        // SAFETY: in bounds of the live mapping; volatile copies of plain data.
        (0..self.len).map(|i| unsafe { std::ptr::read_volatile(self.mapping.ptr::<FirstRecord>().add(i)) })
    }

    /// The valid records within `tcp_fin` of their SYN: half-open connections.
    fn live(&self, now: u32, t: &Timeouts) -> impl Iterator<Item = FirstRecord> + '_ {
        let tcp_fin = t.tcp_fin;
        self.records().filter(move |r| r.check != 0 && valid(r) && !first_record_expired(now, r.first_seen, tcp_fin.as_secs()))
    }

    /// Counts the live records into `counts` (inactive); returns how many.
    /// Empties the valid records past `tcp_fin` (as the sweep removes a SYN's
    /// `CONNTRACK` entry): the check goes from the one read to 0 in one
    /// compare-and-swap, so a SYN that wrote the slot since keeps its record.
    pub fn count(&self, now: u32, t: &Timeouts, counts: &mut Counts) -> u64 {
        let tcp_fin = t.tcp_fin.as_secs();
        let mut n = 0;
        for (i, r) in self.records().enumerate() {
            if r.check == 0 || !valid(&r) {
                continue;
            }
            if first_record_expired(now, r.first_seen, tcp_fin) {
                // SAFETY: in bounds of the live, writable mapping; the check is a
                // 4-byte aligned u32 the program writes with plain stores.
                let check = unsafe { &*(&raw const (*self.mapping.ptr::<FirstRecord>().add(i)).check).cast::<AtomicU32>() };
                let _ = check.compare_exchange(r.check, 0, Ordering::Relaxed, Ordering::Relaxed);
                continue;
            }
            counts.entry(r.backend_id).or_default().1 += 1;
            n += 1;
        }
        n
    }

    /// The live records per backend id (half-open handshakes), for `lb-agent
    /// flows`, which cannot list them: a record holds no 5-tuple.
    pub fn per_backend(&self, now: u32, t: &Timeouts) -> std::collections::BTreeMap<u32, u64> {
        let mut out = std::collections::BTreeMap::new();
        for r in self.live(now, t) {
            *out.entry(r.backend_id).or_default() += 1;
        }
        out
    }
}

/// Whether a record's check matches its fields (an empty, taken or torn slot's
/// does not).
pub fn valid(r: &FirstRecord) -> bool {
    r.check == first_record_check(r.tag, r.backend_id, r.generation, r.first_seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_valid_only_with_its_check() {
        let tag = lb_common::first_record_tag(&lb_common::FlowKey { src: [1; 16], dst: [2; 16], sport: 40000, dport: 80, proto: 6, _pad: [0; 3] });
        let check = first_record_check(tag, 3, 7, 100);
        let r = FirstRecord { tag, backend_id: 3, generation: 7, first_seen: 100, check };
        assert!(valid(&r), "a record written whole is valid");
        assert!(!valid(&FirstRecord { check: !check, ..r }), "a taken record (check inverted) is not");
        assert!(!valid(&FirstRecord { backend_id: 4, ..r }), "a torn value is not");
        assert!(!valid(&FirstRecord { first_seen: 101, ..r }), "a torn second is not");
        assert!(!valid(&FirstRecord { tag: tag ^ 1, ..r }), "a torn tag is not");
        assert!(!valid(&FirstRecord::default()), "an empty slot is not");
    }

    #[test]
    fn sixteen_bit_seconds_expire_across_the_wrap() {
        // The SYN at second 65,530 (low bits), now 65,536 + 10: 16 s later.
        assert!(!first_record_expired(65_536 + 10, 65_530, 120));
        assert!(first_record_expired(65_536 + 10, 65_530, 15));
        assert!(!first_record_expired(100, 100, 0));
        assert!(first_record_expired(221, 100, 120));
        // A tcp_fin past 65,535 s would never expire a 16-bit age: capped.
        assert!(first_record_expired(65_100, 0, 7 * 24 * 3600));
    }
}
