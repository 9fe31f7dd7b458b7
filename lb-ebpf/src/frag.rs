//! Fragments of one datagram go to one backend.
//!
//! Only a datagram's first fragment (offset 0) carries the TCP/UDP ports. It is
//! scheduled like any packet of its flow, and the choice is remembered in `FRAGS`
//! (an LRU hash keyed by source, destination, protocol and fragment id) with the
//! `CT_CLOCK` second it was made; for `Config::frag_timeout_s` seconds after it,
//! every fragment of that datagram (later ones, and a repeated or overlapping
//! first one) goes where the entry says, so one datagram never reaches two
//! backends. A later fragment with no fresh entry (it overtook its first, or the
//! first was never seen) is dropped and counted (`drop_frag_unknown`): XDP cannot
//! hold it back, and a random backend could not reassemble it anyway.
//!
//! Later fragments have no ports: in tunnel modes their outer entropy (GUE source
//! port, IPv6 flow label) comes from the addresses alone.
//!
//! IPv6: only a Fragment header directly after the fixed header is recognised
//! (see `parse.rs`); other extension headers pass to the stack as before.
//!
//! Keys and values are built in the per-CPU `SCRATCH` entry: these functions
//! run inside the balancer's call chain, which has little stack left.

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{stat, trace::ct_step, Config, FragVal, BACKEND_ACTIVE};

use crate::{
    backend::backend,
    conntrack::Lookup,
    maps::{Scratch, CT_CLOCK, FRAGS, SCRATCH},
    parse::Packet,
    stats::count,
    trace::Decision,
};

#[inline(always)]
fn now() -> u32 {
    CT_CLOCK.get(0).copied().unwrap_or(0)
}

/// `SCRATCH` with its fragment key set to `pkt`'s datagram.
#[inline(always)]
fn keyed(pkt: &Packet) -> Option<&'static mut Scratch> {
    // SAFETY: this CPU's entry, used by this program run only.
    let s = unsafe { &mut *SCRATCH.get_ptr_mut(0)? };
    s.frag_key.src = pkt.src;
    s.frag_key.dst = pkt.dst;
    s.frag_key.id = pkt.frag_id;
    s.frag_key.proto = pkt.proto;
    s.frag_key._pad = [0; 3];
    Some(s)
}

/// Where `pkt`'s datagram goes, if `FRAGS` has a fresh entry for it whose
/// backend is still usable.
#[inline(always)]
pub fn find(pkt: &Packet, cfg: &Config, d: &mut Decision) -> Option<Lookup> {
    let s = keyed(pkt)?;
    // SAFETY: a live entry of an LRU map, only read.
    let v: &'static FragVal = unsafe { FRAGS.get(&s.frag_key) }?;
    if now().wrapping_sub(v.created) > cfg.frag_timeout_s {
        return None;
    }
    let b = backend(v.backend_id, v.service_id, Some(v.generation), BACKEND_ACTIVE)?;
    d.ct = ct_step::FRAG_HIT;
    Some(Lookup::Hit { service_id: v.service_id, backend_id: v.backend_id, backend: b, snat: 0 })
}

/// Remembers where a first fragment goes.
#[inline(never)]
pub fn remember(pkt: &Packet, backend_id: u32, service_id: u32, generation: u32) {
    let Some(s) = keyed(pkt) else { return };
    s.frag_val = FragVal { backend_id, service_id, generation, created: now(), sport: pkt.sport, dport: pkt.dport };
    if FRAGS.insert(&s.frag_key, &s.frag_val, BPF_ANY as u64).is_err() {
        count(stat::FRAG_INSERT_FAILED);
    }
}
