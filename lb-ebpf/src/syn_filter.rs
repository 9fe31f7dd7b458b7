//! The SYN filter, the program's half (`lb_common::syn_filter`): a TCP SYN reads
//! its flow's bit before looking `CT_ESTABLISHED` up, and skips the lookup when
//! the bit is clear; every `CT_ESTABLISHED` insert sets the flow's bit in both
//! copies once it is done.

use core::{
    intrinsics::{atomic_or, AtomicOrdering::Relaxed},
    ptr::read_volatile,
};

use lb_common::{syn_filter, FlowKey};

use crate::maps::CT_SYN_FILTER;

/// A TCP SYN's flow hash for the filter (`syn_filter::hash_by`, bits 32..64:
/// also the flow's `FIRST_RECORD` tag, so that the SYN hashes it once), and in
/// bit 0 whether the filter is on and says no `CT_ESTABLISHED` entry has
/// `flow`'s 5-tuple. A call of its own: the hash's registers stay in here.
#[inline(never)]
pub fn absent(flow: &FlowKey) -> u64 {
    let h = hash_of(flow);
    let tag = u64::from(h) << 32;
    let Some(head) = CT_SYN_FILTER.get_ptr(0) else { return tag };
    // SAFETY: a live array element the agent writes (one 64-bit store).
    let head = unsafe { read_volatile(head) };
    let reading = head as u32;
    if reading == 0 {
        return tag;
    }
    let Some(w) = CT_SYN_FILTER.get_ptr(syn_filter::word_index(h, reading - 1, (head >> 32) as u32)) else { return tag };
    // SAFETY: as above (the program sets bits with atomic ORs, the agent zeroes
    // words only of the copy not being read).
    let bits = syn_filter::bits(h);
    tag | u64::from((unsafe { read_volatile(w) } & bits) != bits)
}

/// Sets `flow`'s bit in both copies: called after each `CT_ESTABLISHED` insert
/// of the program (see `lb_common::syn_filter`; a SYN of the same 5-tuple that
/// reads the bit in between is one that came before the insert). Not from
/// within `first::take`: under `lb_xdp_trace` a third call frame would pass the
/// 512-byte stack.
#[inline(never)]
pub fn add(flow: &FlowKey) {
    let Some(head) = CT_SYN_FILTER.get_ptr(0) else { return };
    // SAFETY: as in `absent`.
    let mask = (unsafe { read_volatile(head) } >> 32) as u32;
    let h = hash_of(flow);
    let bit = syn_filter::bits(h);
    for copy in 0..2 {
        if let Some(w) = CT_SYN_FILTER.get_ptr_mut(syn_filter::word_index(h, copy, mask)) {
            // SAFETY: a live array element; every writer uses atomic ORs (the
            // agent zeroes the copy being rebuilt, see `lb_common::syn_filter`).
            unsafe { atomic_or::<u64, u64, { Relaxed }>(w, bit) };
        }
    }
}

/// `syn_filter::hash_by` of the key, its words read in order with volatile
/// loads (as `first::hash_of`, so that none is spilled to the stack).
#[inline(always)]
pub fn hash_of(flow: &FlowKey) -> u32 {
    let p = (flow as *const FlowKey).cast::<u16>();
    // SAFETY: within the key (16 u16 words of addresses), 2-byte aligned.
    let w = |i: usize| unsafe { u32::from(read_volatile(p.add(2 * i))) | (u32::from(read_volatile(p.add(2 * i + 1))) << 16) };
    syn_filter::hash_by(w, (u32::from(flow.sport) << 16) | u32::from(flow.dport), u32::from(flow.proto))
}
