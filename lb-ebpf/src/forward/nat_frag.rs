//! Fragments of `nat` and `fullnat` flows, the client-to-backend direction.
//!
//! `lb_rare` schedules a fragment as for every mode (`frag.rs`): a first
//! fragment (offset 0, with the ports) by its flow, and remembered in `FRAGS`;
//! a later one by its datagram's `FRAGS` entry. A `nat` or `fullnat` backend's
//! fragment goes on to `lb_nat` marked `FRAG` (and `LATER`), and here:
//!
//! - `nat`: every fragment's destination address becomes the backend's (IPv4
//!   header checksum updated; IPv6 has none); the first fragment's destination
//!   port too, and its TCP/UDP checksum incrementally: the checksum covers the
//!   whole datagram, but only the pseudo-header and the port change, and both
//!   are in the first fragment (an IPv4 UDP checksum of 0 stays 0). A first
//!   fragment of a new flow writes the flow's `NAT_REVERSE` entry, as its first
//!   packet would.
//! - `fullnat`: the source address too (the flow's SNAT address), and in the
//!   first fragment the source port. The mapping is the flow's
//!   `FULLNAT_FORWARD` entry (a later fragment finds its flow's ports in the
//!   datagram's `FRAGS` entry); a first fragment of a flow without one gets one
//!   (`fullnat::allocate`, as a first packet); a later fragment without one
//!   (its first was dropped) is dropped, `drop_nat_unsupported`.
//!
//! TTL / hop limit are decremented (at 1: `drop_nat_ttl`), MACs set, and the
//! frame leaves by the backend's interface: counted `forwarded`, `nat_forwarded`
//! or `fullnat_forwarded`, and `frag_first` or `frag_followed`. IPv6: the
//! Fragment header right after the fixed header, as `parse.rs` finds it.
//!
//! Fragmented replies (backend to client, or to a SNAT address) are translated
//! in `lb_nat_reply` (`reply`): the first fragment by the reply's reverse entry,
//! the later ones by the ports it leaves in `FRAGS`; the first keeps the flow's
//! connection-table entry fresh, as a whole reply does.

use aya_ebpf::{bindings::BPF_ANY, programs::XdpContext};
use lb_common::{
    stat, v4_mapped, Backend, Config, FlowKey, FragKey, CONFIG_FULLNAT, CONFIG_NAT, FORWARD_FULLNAT, PROTO_TCP,
    PROTO_UDP,
};

use super::{bytes_mut, fullnat, nat};
use crate::{
    conntrack,
    maps::{
        BACKENDS, CONFIG, CT_CLOCK, FRAGS, FULLNAT_FORWARD, FULLNAT_REVERSE, FULLNAT_SCRATCH, NAT_REVERSE, NAT_STASH,
        SCRATCH,
    },
    parse::{ptr_at, read_be16, Outcome},
    stats::{count, count_forward},
};

/// Bit of `Outcome::Nat`'s word (kept in `NatStash::backend_id`): the packet is
/// a fragment of the flow's datagram.
pub const FRAG: u32 = 1 << 29;
/// With `FRAG`: a later fragment (no ports).
pub const LATER: u32 = 1 << 28;

/// `lb_nat` for a fragment, as a packed verdict. A call of its own, off the
/// other paths' frames (a first `fullnat` fragment calls `fullnat::allocate`:
/// this frame and that one must fit 512 bytes with `lb_nat`'s).
#[inline(never)]
pub fn run(ctx: &XdpContext) -> u64 {
    crate::packed(run_inline(ctx))
}

#[inline(always)]
fn run_inline(ctx: &XdpContext) -> Outcome {
    let Some(st) = NAT_STASH.get(0).copied() else { return Outcome::Pass(stat::PASS_NOT_READY) };
    let id = st.backend_id & !(FRAG | LATER);
    let later = st.backend_id & LATER != 0;
    let new_flow = st.new_flow != 0;
    let (Some(b), Some(cfg)) = (BACKENDS.get(id), CONFIG.get(0)) else {
        return Outcome::Pass(stat::PASS_NOT_READY);
    };
    let Some(s) = FULLNAT_SCRATCH.get_ptr_mut(0) else { return Outcome::Pass(stat::PASS_NOT_READY) };
    // SAFETY: this CPU's entry, used by this program run only.
    let s = unsafe { &mut *s };
    let Some((l3, l4, v6, frag_id, is_later)) = parse(ctx, &mut s.flow) else {
        return Outcome::Drop(stat::DROP_NAT_UNSUPPORTED);
    };
    if is_later != later {
        return Outcome::Drop(stat::DROP_NAT_UNSUPPORTED);
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let done = if b.forward == FORWARD_FULLNAT {
        to_fullnat(ctx, s, (l3, l4, v6, frag_id), b, id, later, cfg)
    } else {
        to_nat(ctx, s, (l3, l4, v6), b, id, new_flow, later, cfg)
    };
    match done {
        Ok(counter) => {
            count(counter);
            count(if later { stat::FRAG_FOLLOWED } else { stat::FRAG_FIRST });
            count_forward(b.service_id, id, bytes, new_flow);
            Outcome::Out(u32::from(b.egress))
        }
        Err(reason) => Outcome::Drop(reason),
    }
}

/// A `nat` backend's fragment: the destination (and the first fragment's port
/// and checksum). `Ok`: the counter of the mode.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn to_nat(
    ctx: &XdpContext,
    s: &mut fullnat::Scratch,
    (l3, l4, v6): (usize, usize, bool),
    b: &Backend,
    id: u32,
    new_flow: bool,
    later: bool,
    cfg: &Config,
) -> Result<u32, u32> {
    if later {
        nat::translate_l3::<false>(ctx, l3, v6, &b.addr, &b.mac, &cfg.iface_mac)?;
        return Ok(stat::NAT_FORWARDED);
    }
    let port = if b.port != 0 { b.port } else { s.flow.dport };
    if new_flow {
        remember(ctx, s, &b.addr, port, id, b.service_id);
    }
    nat::translate::<false>(ctx, l3, v6, l4, s.flow.proto, &b.addr, port, &b.mac, &cfg.iface_mac)?;
    Ok(stat::NAT_FORWARDED)
}

/// `nat::remember` for a first fragment's flow (`s.flow`), built in the scratch
/// entry.
#[inline(always)]
fn remember(ctx: &XdpContext, s: &mut fullnat::Scratch, backend: &[u8; 16], port: u16, backend_id: u32, service_id: u32) {
    let Some(eth) = bytes_mut::<12>(ctx, 0) else { return };
    let f = &s.flow;
    s.key = FlowKey { src: *backend, dst: f.src, sport: port, dport: f.sport, proto: f.proto, _pad: [0; 3] };
    let v = &mut s.val;
    v.vip = f.dst;
    v.vport = f.dport;
    v.mac.copy_from_slice(&eth[6..12]);
    v.backend_id = backend_id;
    v.service_id = service_id;
    v.client = f.src;
    v.cport = f.sport;
    v.seen = 0;
    v.created = 0;
    let _ = NAT_REVERSE.insert(&s.key, &s.val, BPF_ANY as u64);
}

/// A `fullnat` backend's fragment: both addresses (and the first fragment's
/// ports and checksum), by the flow's mapping.
#[inline(always)]
fn to_fullnat(
    ctx: &XdpContext,
    s: &mut fullnat::Scratch,
    (l3, l4, v6, frag_id): (usize, usize, bool, u32),
    b: &Backend,
    id: u32,
    later: bool,
    cfg: &Config,
) -> Result<u32, u32> {
    if later {
        // The flow's ports are the first fragment's (`frag::remember`).
        let k = FragKey { src: s.flow.src, dst: s.flow.dst, id: frag_id, proto: s.flow.proto, _pad: [0; 3] };
        // SAFETY: copied out at once.
        let v = unsafe { FRAGS.get(&k) }.ok_or(stat::DROP_NAT_UNSUPPORTED)?;
        s.flow.sport = v.sport;
        s.flow.dport = v.dport;
    }
    let bport = if b.port != 0 { b.port } else { s.flow.dport };
    // SAFETY: copied out at once.
    let known = match unsafe { FULLNAT_FORWARD.get(&s.flow) } {
        Some(m) if m.backend_id == id && m.generation == b.generation && m.backend_port == bport => {
            fullnat::copy_words(&mut s.m, m);
            true
        }
        _ => false,
    };
    if !known {
        if later {
            return Err(stat::DROP_NAT_UNSUPPORTED);
        }
        if !fullnat::allocate(ctx, s, b, u64::from(id) << 16 | u64::from(bport), v6 as u64) {
            return Err(stat::DROP_SNAT_EXHAUSTED);
        }
    }
    s.macs[..6].copy_from_slice(&b.mac);
    s.macs[6..].copy_from_slice(&cfg.iface_mac);
    if later {
        fullnat::translate_l3(ctx, l3, v6, &s.m.snat, &s.m.backend, &s.macs)?;
    } else {
        let how = fullnat::shape(l3, v6, l4, s.flow.proto, s.m.snat_port, s.m.backend_port);
        fullnat::translate_inline(ctx, how, &s.m.snat, &s.m.backend, &s.macs)?;
    }
    Ok(stat::FULLNAT_FORWARDED)
}

/// Whether the frame is an IPv4 fragment or an IPv6 packet with a Fragment
/// header right after the fixed one: `lb_nat_reply` then runs `reply`.
#[inline(always)]
pub fn is_fragment(ctx: &XdpContext) -> bool {
    let mut l3 = 14;
    let Ok(mut ethertype) = read_be16(ctx, 12) else { return false };
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        let Ok(e) = read_be16(ctx, 16) else { return false };
        ethertype = e;
        l3 = 18;
    }
    match ethertype {
        0x0800 => read_be16(ctx, l3 + 6).is_ok_and(|f| f & 0x3fff != 0),
        // SAFETY: bounds checked by ptr_at.
        0x86dd => ptr_at::<u8>(ctx, l3 + 6).is_ok_and(|p| unsafe { *p } == 44),
        _ => false,
    }
}

/// `lb_nat_reply` for a fragment (`is_fragment`), as a packed verdict: a
/// fragment of a `fullnat` or `nat` reply is translated as the reply would be
/// (a later one: the addresses only). The first fragment finds the flow by its
/// 5-tuple (`FULLNAT_REVERSE`, then `NAT_REVERSE`) and leaves its ports in
/// `FRAGS` under the reply datagram's key (source, destination, protocol, id:
/// never a client's datagram's, whose destination is a VIP); a later fragment
/// finds them there while fresh (`fragments.timeout`). Anything else passes
/// (`pass_not_vip`, as before); a later fragment that overtook its first too.
/// Counted `nat_reply` / `fullnat_reply`, each fragment.
#[inline(never)]
pub fn reply(ctx: &XdpContext) -> u64 {
    reply_inline(ctx)
}

#[inline(always)]
fn reply_inline(ctx: &XdpContext) -> u64 {
    let not_ours = crate::packed(Outcome::Pass(stat::PASS_NOT_VIP));
    let Some(cfg) = CONFIG.get(0) else { return not_ours };
    let (Some(s), Some(f)) = (FULLNAT_SCRATCH.get_ptr_mut(0), SCRATCH.get_ptr_mut(0)) else { return not_ours };
    // SAFETY: this CPU's entries, used by this program run only.
    let (s, f) = unsafe { (&mut *s, &mut *f) };
    // `s.key`: the reply's 5-tuple.
    let Some((l3, l4, v6, id, later)) = parse(ctx, &mut s.key) else { return not_ours };
    f.frag_key.src = s.key.src;
    f.frag_key.dst = s.key.dst;
    f.frag_key.id = id;
    f.frag_key.proto = s.key.proto;
    f.frag_key._pad = [0; 3];
    let now = CT_CLOCK.get(0).copied().unwrap_or(0);
    if later {
        // SAFETY: copied out at once.
        let Some(v) = (unsafe { FRAGS.get(&f.frag_key) }) else { return not_ours };
        if now.wrapping_sub(v.created) > cfg.frag_timeout_s {
            return not_ours;
        }
        s.key.sport = v.sport;
        s.key.dport = v.dport;
    }
    let mut full = true;
    let mut p = if cfg.flags & CONFIG_FULLNAT != 0 { FULLNAT_REVERSE.get_ptr_mut(&s.key) } else { None };
    if p.is_none() && cfg.flags & CONFIG_NAT != 0 {
        p = NAT_REVERSE.get_ptr_mut(&s.key);
        full = false;
    }
    let Some(p) = p else { return not_ours };
    // SAFETY: a live entry, read in place (freed only after this run; only
    // `seen` is written, by `reply_due`).
    let r = unsafe { &*p };
    if !later {
        f.frag_val.backend_id = r.backend_id;
        f.frag_val.service_id = r.service_id;
        f.frag_val.generation = 0;
        f.frag_val.created = now;
        f.frag_val.sport = s.key.sport;
        f.frag_val.dport = s.key.dport;
        if FRAGS.insert(&f.frag_key, &f.frag_val, BPF_ANY as u64).is_err() {
            count(stat::FRAG_INSERT_FAILED);
        }
    }
    s.macs[..6].copy_from_slice(&r.mac);
    s.macs[6..].copy_from_slice(&cfg.iface_mac);
    let done = match (full, later) {
        (true, true) => fullnat::translate_l3(ctx, l3, v6, &r.vip, &r.client, &s.macs),
        (true, false) => {
            let how = fullnat::shape(l3, v6, l4, s.key.proto, r.vport, r.cport);
            fullnat::translate_inline(ctx, how, &r.vip, &r.client, &s.macs)
        }
        (false, true) => nat::translate_l3::<true>(ctx, l3, v6, &r.vip, &r.mac, &cfg.iface_mac),
        (false, false) => nat::translate::<true>(ctx, l3, v6, l4, s.key.proto, &r.vip, r.vport, &r.mac, &cfg.iface_mac),
    };
    match done {
        // By the interface the flow's first frame came in on (two-arm: redirected).
        Ok(()) => {
            // A first fragment keeps the flow fresh as a whole reply does (a FIN
            // in a fragmented reply is not followed: whole replies close flows).
            // SAFETY: a field of the live entry.
            if !later && conntrack::reply_due(unsafe { &raw mut (*p).seen }, false) {
                let flow = FlowKey { src: r.client, dst: r.vip, sport: r.cport, dport: r.vport, proto: s.key.proto, _pad: [0; 3] };
                conntrack::follow_reply(&flow, false);
            }
            super::nat_reply::sent_back(r.egress, if full { stat::FULLNAT_REPLY } else { stat::NAT_REPLY })
        }
        Err(reason) => crate::packed(Outcome::Drop(reason)),
    }
}

#[inline(always)]
fn word(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

/// A TCP/UDP fragment into `flow`: addresses, protocol, and a first fragment's
/// ports (a later one's are 0). Returns the IP and L4 header offsets, the
/// family, the fragment id and whether it is a later fragment.
#[inline(always)]
fn parse(ctx: &XdpContext, flow: &mut FlowKey) -> Option<(usize, usize, bool, u32, bool)> {
    let mut l3 = 14;
    let mut ethertype = read_be16(ctx, 12).ok()?;
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        ethertype = read_be16(ctx, 16).ok()?;
        l3 = 18;
    }
    let (l4, v6, id, later) = match ethertype {
        0x0800 => {
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*ptr_at::<[u8; 20]>(ctx, l3).ok()? };
            let ihl = ((h[0] & 0x0f) as usize) * 4;
            let frag = word(h, 6);
            if h[0] >> 4 != 4 || ihl < 20 || frag & 0x3fff == 0 {
                return None;
            }
            flow.src = v4_mapped([h[12], h[13], h[14], h[15]]);
            flow.dst = v4_mapped([h[16], h[17], h[18], h[19]]);
            flow.proto = h[9];
            (l3 + ihl, false, u32::from(word(h, 4)), frag & 0x1fff != 0)
        }
        0x86dd => {
            // The fixed header and the Fragment header right after it (not an
            // atomic fragment: those are whole datagrams).
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*ptr_at::<[u8; 48]>(ctx, l3).ok()? };
            let off_m = word(h, 42);
            if h[0] >> 4 != 6 || h[6] != 44 || off_m & 0xfff9 == 0 {
                return None;
            }
            flow.src.copy_from_slice(&h[8..24]);
            flow.dst.copy_from_slice(&h[24..40]);
            flow.proto = h[40];
            (l3 + 48, true, u32::from_be_bytes([h[44], h[45], h[46], h[47]]), off_m & 0xfff8 != 0)
        }
        _ => return None,
    };
    if flow.proto != PROTO_TCP && flow.proto != PROTO_UDP {
        return None;
    }
    flow._pad = [0; 3];
    // Within the first 128 bytes (IHL ≤ 60): a bound the verifier can see.
    let l4 = l4 & 0x7f;
    if later {
        flow.sport = 0;
        flow.dport = 0;
    } else {
        // SAFETY: bounds checked by ptr_at.
        let ports = unsafe { *ptr_at::<[u8; 4]>(ctx, l4).ok()? };
        flow.sport = u16::from_be_bytes([ports[0], ports[1]]);
        flow.dport = u16::from_be_bytes([ports[2], ports[3]]);
    }
    Some((l3, l4, v6, id, later))
}
