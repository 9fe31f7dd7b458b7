//! The first record (`FIRST_RECORD`): where a TCP SYN of a `maglev` or `sh`
//! service went, kept in a direct-mapped array instead of an insert into the
//! `CONNTRACK` LRU hash (see docs/architecture.md, "Where a new flow's time goes").
//!
//! One entry per slot, the slot chosen by the flow hash (`first_record_slot`):
//! a SYN writes its entry with plain stores, and a colliding SYN overwrites it,
//! as an LRU evicts. The flow's next packet (the client's ACK) takes the entry
//! if it names the same 5-tuple and its `check` matches: a torn write (two CPUs
//! writing the slot at once, or a reader between the stores of one) or a stale
//! entry of another flow is never taken for a hit.

use crate::{hash::check_mix, FlowKey};

pub mod names {
    pub const FIRST_RECORD: &str = "FIRST_RECORD";
}

/// Value of `FIRST_RECORD` (key: the slot, `first_record_slot`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FirstRecord {
    /// The SYN's flow: an entry is taken only by a packet of this exact flow.
    pub key: FlowKey,
    pub backend_id: u32,
    pub service_id: u32,
    /// `Backend::generation` when the SYN was scheduled.
    pub generation: u32,
    /// `CT_CLOCK` at the SYN: the agent counts the entry as a half-open
    /// connection (inactive) for `timeouts.tcp_fin` after it, as it counts a SYN
    /// in `CONNTRACK`.
    pub first_seen: u32,
    /// `first_record_check` of the fields above; written last. An entry whose
    /// check does not match is empty (the flow's ACK took it: the check is then
    /// inverted).
    pub check: u32,
    pub _pad: u32,
}

/// The slot of a flow (its `flow_hash`) in a `FIRST_RECORD` of `mask + 1` slots.
#[inline(always)]
pub fn first_record_slot(hash: u32, mask: u32) -> u32 {
    hash & mask
}

/// The check of an entry: the flow hash of its key mixed with every value
/// field, never 0 (a zeroed slot is never valid). A reader that found the key
/// equal to its own flow recomputes it from the hash it already has.
#[inline(always)]
pub fn first_record_check(hash: u32, backend_id: u32, service_id: u32, generation: u32, first_seen: u32) -> u32 {
    check_mix(hash, [backend_id, service_id, generation, first_seen]) | 1
}

/// Entries of `FIRST_RECORD` for a `conntrack_size`: the next power of two.
pub fn first_record_entries(conntrack_size: u32) -> u32 {
    conntrack_size.max(1024).checked_next_power_of_two().unwrap_or(1 << 31)
}

const _: () = assert!(core::mem::size_of::<FirstRecord>() == 64);

#[cfg(feature = "user")]
// SAFETY: repr(C), integers and a repr(C) key, explicit padding.
unsafe impl aya::Pod for FirstRecord {}
