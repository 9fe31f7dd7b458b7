//! The reply side of FULLNAT (`fullnat.rs`): a backend's reply to a SNAT
//! address and port of a live flow, found in `FULLNAT_REVERSE`, leaves from
//! VIP:port to the client, by the interface the client's frames came in on.

use aya_ebpf::programs::XdpContext;
use lb_common::{snat_filter_bit, stat, v4_mapped, FlowKey, NatReverse, CONFIG_FULLNAT};

use super::{
    bytes_mut,
    fullnat::{shape, translate_inline},
};
use crate::{
    conntrack,
    maps::{CONFIG, FULLNAT_REVERSE, FULLNAT_SCRATCH, VIP_FILTER},
    parse::{read_be16, Outcome},
};

/// Whether the frame's destination may be a SNAT address: its
/// `lb_common::snat_filter_bit` is set in `VIP_FILTER` (the agent sets the bits
/// of every pool's addresses). A clear bit: no `FULLNAT_REVERSE` entry has this
/// destination. Frames that are not IPv4 or IPv6 answer yes (`reply_call`
/// decides, as before).
#[inline(always)]
pub fn maybe_snat(ctx: &XdpContext) -> bool {
    let Ok(mut ethertype) = read_be16(ctx, 12) else { return true };
    let mut l3 = 14;
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        let Ok(inner) = read_be16(ctx, 16) else { return true };
        (ethertype, l3) = (inner, 18);
    }
    let dst = match ethertype {
        0x0800 => {
            let Some(a) = bytes_mut::<4>(ctx, l3 + 16) else { return true };
            v4_mapped(*a)
        }
        0x86dd => {
            let Some(a) = bytes_mut::<16>(ctx, l3 + 24) else { return true };
            *a
        }
        _ => return true,
    };
    let bit = snat_filter_bit(&dst);
    VIP_FILTER.get(bit >> 6).is_none_or(|w| *w & (1u64 << (bit & 63)) != 0)
}

/// What `reply_call` returns for a frame that is no `fullnat` reply (the `nat`
/// lookup follows, then the ICMP error path; `main.rs`'s `nat_reply_call` uses
/// it too): an action no outcome has.
pub const NOT_FULLNAT: u64 = u32::MAX as u64;

/// `lb_nat_reply`'s first look, a call of its own: a reply to a SNAT address and
/// port of a live `fullnat` flow leaves from VIP:port to the client (packed
/// verdict); anything else is `NOT_FULLNAT`.
#[inline(never)]
pub fn reply_call(ctx: &XdpContext) -> u64 {
    match CONFIG.get(0) {
        Some(c) if c.flags & CONFIG_FULLNAT != 0 => {}
        _ => return NOT_FULLNAT,
    }
    let Some((key, l3, l4, v6, fin)) = super::nat_reply::parse(ctx) else { return NOT_FULLNAT };
    reply(ctx, &key, l3, l4, v6, fin).unwrap_or(NOT_FULLNAT)
}

/// A `fullnat` reply's packed verdict: back by the interface its entry names
/// (`nat_reply::sent_back`).
#[inline(always)]
fn reply(ctx: &XdpContext, key: &FlowKey, l3: usize, l4: usize, v6: bool, fin: bool) -> Option<u64> {
    let cfg = CONFIG.get(0)?;
    // SAFETY: a live entry, read in place (the agent removes it only once its
    // flow is gone; the kernel frees it after this run).
    let p = FULLNAT_REVERSE.get_ptr_mut(key)?;
    // SAFETY: as above; only `seen` is written.
    let r: &NatReverse = unsafe { &*p };
    let s = FULLNAT_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's entry, used by this program run only.
    let s = unsafe { &mut *s };
    s.macs[..6].copy_from_slice(&r.mac);
    s.macs[6..].copy_from_slice(&cfg.iface_mac);
    let how = shape(l3, v6, l4, key.proto, r.vport, r.cport);
    // Inline here: this frame and `translate`'s would pass 512 bytes together.
    Some(match translate_inline(ctx, how, &r.vip, &r.client, &s.macs) {
        Ok(()) => {
            // SAFETY: a field of the live entry.
            if conntrack::reply_due(unsafe { &raw mut (*p).seen }, fin) {
                let flow = FlowKey { src: r.client, dst: r.vip, sport: r.cport, dport: r.vport, proto: key.proto, _pad: [0; 3] };
                conntrack::follow_reply(&flow, fin);
            }
            super::nat_reply::sent_back(r.egress, stat::FULLNAT_REPLY)
        }
        Err(reason) => crate::packed(Outcome::Drop(reason)),
    })
}
