//! The first record (`FIRST_RECORD`): where a TCP SYN of a `maglev` or `sh`
//! service went, kept in a direct-mapped array instead of an insert into the
//! `CONNTRACK` LRU hash (see docs/connection-table.md, "Where a new flow's time goes").
//!
//! One entry per slot, the slot chosen by the flow hash (`first_record_slot`):
//! a SYN writes its entry with plain stores, and a colliding SYN overwrites it,
//! as an LRU evicts. An entry is 16 bytes (four to a cache line): it does not
//! hold the flow's key but a 32-bit tag of it (`first_record_tag`, the SYN
//! filter's hash: a second hash of the 5-tuple, independent of the flow hash
//! whose low bits choose the slot). The flow's next packet (the client's ACK)
//! takes the entry if its tag is the packet's and its `check` matches: a torn
//! write (two CPUs writing the slot at once, or a reader between the stores of
//! one) is never taken for a hit.
//!
//! What the tag costs: an ACK of another flow that is in neither connection
//! table, falls on the same slot and has the same tag takes the entry (and the
//! backend of the SYN recorded there); for such an ACK the chance is about
//! 2^-32. The flow whose SYN it was then misses at its ACK and is scheduled
//! again by the same function (to the same backend while the table is
//! unchanged).

use crate::hash::check_mix;

pub mod names {
    pub const FIRST_RECORD: &str = "FIRST_RECORD";
}

/// Value of `FIRST_RECORD` (key: the slot, `first_record_slot`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FirstRecord {
    /// `first_record_tag` of the SYN's flow: an entry is taken only by a packet
    /// with this tag (in this slot).
    pub tag: u32,
    /// The backend the SYN went to (its service: `Backend::service_id`).
    pub backend_id: u32,
    /// The low 16 bits of `Backend::generation` when the SYN was scheduled
    /// (compared as such).
    pub generation: u16,
    /// The low 16 bits of `CT_CLOCK` at the SYN: the agent counts the entry as a
    /// half-open connection (inactive) for `timeouts.tcp_fin` after it, with
    /// wrapping 16-bit arithmetic (`tcp_fin` capped at 65,000 s), as it counts a
    /// SYN in `CONNTRACK`.
    pub first_seen: u16,
    /// `first_record_check` of the fields above; written last. An entry whose
    /// check does not match is empty (the flow's ACK took it: the check is then
    /// inverted).
    pub check: u32,
}

/// The slot of a flow (its `flow_hash`) in a `FIRST_RECORD` of `mask + 1` slots.
#[inline(always)]
pub fn first_record_slot(hash: u32, mask: u32) -> u32 {
    hash & mask
}

/// The tag of a flow: its `syn_filter::hash_by`, a hash of the 5-tuple other
/// than the flow hash (whose low bits are the slot), so that all 32 bits tell
/// flows of one slot apart.
pub fn first_record_tag(key: &crate::FlowKey) -> u32 {
    crate::syn_filter::hash(key)
}

/// The check of an entry: its tag mixed with every other field, never 0 (a
/// zeroed slot is never valid) and odd (a taken entry, check inverted, is even).
#[inline(always)]
pub fn first_record_check(tag: u32, backend_id: u32, generation: u16, first_seen: u16) -> u32 {
    check_mix(tag, [backend_id, u32::from(generation) | (u32::from(first_seen) << 16), 0, 0]) | 1
}

/// Longest a record counts (s): below 65,536 so that the sweep, which empties
/// expired records (every 2 s at most), does so well before the 16-bit age wraps.
pub const FIRST_RECORD_MAX_AGE: u64 = 65_000;

/// Whether a 16-bit second (`FirstRecord::first_seen`) is past `timeout_secs`
/// (at most `FIRST_RECORD_MAX_AGE`) at `now` (the full `CT_CLOCK` second), in
/// wrapping 16-bit arithmetic.
pub fn first_record_expired(now: u32, first_seen: u16, timeout_secs: u64) -> bool {
    u64::from((now as u16).wrapping_sub(first_seen)) > timeout_secs.min(FIRST_RECORD_MAX_AGE)
}

/// Most entries `FIRST_RECORD` has: 65,536 slots, 1 MB. The array holds
/// handshakes in flight (a SYN until its ACK, one round trip), not tracked
/// flows: at 100,000 new connections a second with 50 ms round trips, 5,000 at
/// once, of which about n^2/2m = 190 (3.8%) share a slot with another and lose
/// their record (their ACKs are scheduled again by the same function). A larger
/// array loses fewer but costs every new flow's SYN a store out of this CPU's
/// cache and TLB: with 16 MB (a `conntrack_size` of 1,048,576) about 50 ns more
/// than with 1 MB (docs/connection-table.md, "The first record").
pub const FIRST_RECORD_MAX_ENTRIES: u32 = 1 << 16;

/// Entries of `FIRST_RECORD` for a `conntrack_size`: the next power of two, at
/// least 1,024 and at most `FIRST_RECORD_MAX_ENTRIES`.
pub fn first_record_entries(conntrack_size: u32) -> u32 {
    conntrack_size.clamp(1024, FIRST_RECORD_MAX_ENTRIES).next_power_of_two()
}

const _: () = assert!(core::mem::size_of::<FirstRecord>() == 16);

#[cfg(feature = "user")]
// SAFETY: repr(C), integers, no padding.
unsafe impl aya::Pod for FirstRecord {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_follows_conntrack_size_up_to_its_cap() {
        assert_eq!(first_record_entries(0), 1024);
        assert_eq!(first_record_entries(5000), 8192);
        assert_eq!(first_record_entries(65_536), 65_536);
        // The default `conntrack_size` and anything larger: 1 MB.
        assert_eq!(first_record_entries(262_144), FIRST_RECORD_MAX_ENTRIES);
        assert_eq!(first_record_entries(u32::MAX), FIRST_RECORD_MAX_ENTRIES);
    }
}
