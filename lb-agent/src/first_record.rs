//! The agent's view of `FIRST_RECORD` (`lb_common::first`): SYNs of `maglev`
//! and `sh` services recorded with one store instead of a `CONNTRACK` insert.
//! The sweep counts the records still valid (check matching, within
//! `timeouts.tcp_fin` of the SYN) as half-open connections, inactive on their
//! backend, as it counts a SYN in `CONNTRACK`.

use std::os::fd::{AsFd, AsRawFd};

use aya::maps::MapData;
use lb_common::{first_record_check, flow_hash, FirstRecord, FlowKey, FlowVal};

use crate::conntrack::{expired, Counts};
use crate::config::Timeouts;

/// `FIRST_RECORD` mapped read-only (the map is `BPF_F_MMAPABLE`; its 64-byte
/// elements lie back to back).
pub struct FirstRecords {
    ptr: *const FirstRecord,
    len: usize,
    _map: MapData,
}

// SAFETY: a read-only mapping owned by this value.
unsafe impl Send for FirstRecords {}

impl FirstRecords {
    /// Maps `map` (an array of `FirstRecord` created with BPF_F_MMAPABLE).
    pub fn new(map: MapData) -> std::io::Result<Self> {
        let len = map.info().map_err(std::io::Error::other)?.max_entries() as usize;
        let bytes = (len * size_of::<FirstRecord>()).max(1);
        // SAFETY: a shared read-only mapping of a BPF array the kernel allows to be
        // mapped; `_map` keeps the map alive (and the mapping does too).
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ, libc::MAP_SHARED, map.fd().as_fd().as_raw_fd(), 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(FirstRecords { ptr: ptr.cast(), len, _map: map })
    }

    /// Every slot, copied one by one (the program writes them meanwhile).
    fn records(&self) -> impl Iterator<Item = FirstRecord> + '_ {
        // SAFETY: in bounds of the live mapping; volatile copies of plain data.
        (0..self.len).map(|i| unsafe { std::ptr::read_volatile(self.ptr.add(i)) })
    }

    /// The valid records within `tcp_fin` of their SYN: half-open connections.
    fn live(&self, now: u32, t: &Timeouts) -> impl Iterator<Item = FirstRecord> + '_ {
        let tcp_fin = t.tcp_fin;
        self.records().filter(move |r| r.check != 0 && valid(r) && !expired(now, r.first_seen, tcp_fin))
    }

    /// Counts the live records into `counts` (inactive); returns how many.
    pub fn count(&self, now: u32, t: &Timeouts, counts: &mut Counts) -> u64 {
        let mut n = 0;
        for r in self.live(now, t) {
            counts.entry(r.backend_id).or_default().1 += 1;
            n += 1;
        }
        n
    }

    /// The live records as `CONNTRACK` would hold them (state new, `last_seen`
    /// the SYN's second), for `lb-agent flows`.
    pub fn entries(&self, now: u32, t: &Timeouts) -> Vec<(FlowKey, FlowVal)> {
        self.live(now, t)
            .map(|r| {
                let val = FlowVal {
                    backend_id: r.backend_id,
                    service_id: r.service_id,
                    generation: r.generation,
                    last_seen: r.first_seen,
                    state: lb_common::CT_STATE_NEW,
                    snat: [0; 3],
                };
                (r.key, val)
            })
            .collect()
    }
}

impl Drop for FirstRecords {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr as *mut _, (self.len * size_of::<FirstRecord>()).max(1)) };
    }
}

/// Whether a record's check matches its key and value (an empty or torn slot's
/// does not).
pub fn valid(r: &FirstRecord) -> bool {
    r.check == first_record_check(flow_hash(&r.key), r.backend_id, r.service_id, r.generation, r.first_seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_valid_only_with_its_check() {
        let key = FlowKey { src: [1; 16], dst: [2; 16], sport: 40000, dport: 80, proto: 6, _pad: [0; 3] };
        let check = first_record_check(flow_hash(&key), 3, 1, 7, 100);
        let r = FirstRecord { key, backend_id: 3, service_id: 1, generation: 7, first_seen: 100, check, _pad: 0 };
        assert!(valid(&r), "a record written whole is valid");
        assert!(!valid(&FirstRecord { check: !check, ..r }), "a taken record (check inverted) is not");
        assert!(!valid(&FirstRecord { backend_id: 4, ..r }), "a torn value is not");
        assert!(!valid(&FirstRecord { key: FlowKey { sport: 40001, ..key }, ..r }), "a torn key is not");
        assert!(!valid(&FirstRecord::default()), "an empty slot is not");
    }
}
