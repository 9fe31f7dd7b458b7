//! LVS-NAT: the client's packet to VIP:port leaves for backend:port (the
//! destination rewritten), and the backend's reply, which comes back through the
//! balancer (its route to the clients), leaves from VIP:port (`nat_reply.rs`).
//!
//! `lb_xdp` finds the flow's backend as for every mode (connection table, then the
//! scheduler) and, for a `nat` backend, leaves its decision in `NAT_STASH` and
//! tail-calls `lb_nat` (`RARE_PROGS[NAT_SLOT]`): the rewrite and the reverse
//! entry cost the balancer's verification nothing. `lb_nat` parses the frame
//! again, records the reply's translation in `NAT_REVERSE` when the flow was just
//! scheduled (with the MAC the client's frame came from: the reply goes back to
//! that next hop, by the interface the frame came in on), rewrites the destination address and port, updates the
//! IPv4 header checksum and the TCP/UDP checksum incrementally (RFC 1624; an IPv4
//! UDP checksum of 0, "none", stays 0), decrements the TTL / hop limit (a packet
//! that would reach 0 is dropped, `drop_nat_ttl`), and sends the frame to the
//! backend's next hop (`Backend::mac`) from our MAC (XDP_TX; two-arm, by the
//! backend's egress interface: `egress.rs`).

use core::mem::MaybeUninit;

use aya_ebpf::{bindings::BPF_ANY, programs::XdpContext};
use lb_common::{stat, FlowKey, NatReverse, PROTO_TCP};

use super::{be16, bytes_mut, fold, set_be16};
use crate::{
    maps::{NatStash, BACKENDS, CONFIG, NAT_REVERSE, NAT_STASH},
    parse::{self, Outcome, Packet, KIND_FRAG_LATER, KIND_ICMP_ERROR, KIND_L4},
    stats::{count, count_forward},
};

/// Bit of `Outcome::Nat`'s word: the flow was scheduled by this packet.
pub(super) const NEW_FLOW: u32 = 1 << 31;

/// `lb_xdp`'s half, in the balancer: the decision as `Outcome::Nat`'s word (the
/// backend id and `NEW_FLOW`) and the flow's `FlowVal::snat` (`fullnat`: the SNAT
/// address and port of an established flow, `fullnat.rs`), which `lb_xdp` stores
/// in `NAT_STASH` before the tail call (one store there; a store here, on every
/// path of the balancer, cost the verifier 140,000 instructions). An ICMP error
/// about a `nat` or `fullnat` flow and a fragment of one (from `lb_rare`) go to
/// `lb_nat` too, marked (`nat_icmp.rs`, `nat_frag.rs`).
/// `fullnat`: the backend is a `fullnat` one (`FULLNAT_MARK` in the last word).
#[inline(always)]
pub fn hand_over(kind: u8, backend_id: u32, new_flow: bool, snat: u32, fullnat: bool) -> Outcome {
    let new = if new_flow { NEW_FLOW } else { 0 };
    if kind == KIND_ICMP_ERROR {
        return Outcome::Nat(backend_id | super::nat_icmp::ICMP_ERROR, 0);
    }
    if kind == KIND_FRAG_LATER {
        return Outcome::Nat(backend_id | super::nat_frag::FRAG | super::nat_frag::LATER | new, 0);
    }
    if kind != KIND_L4 {
        return Outcome::Nat(backend_id | super::nat_frag::FRAG | new, 0);
    }
    Outcome::Nat(backend_id | new, snat & 0xff_ffff | u32::from(fullnat) * FULLNAT_MARK)
}

/// Bit of `Outcome::Nat`'s second word and of `NatStash::snat`: the backend is
/// a `fullnat` one (set only for a TCP/UDP packet: `nat_est.rs` reads it).
pub const FULLNAT_MARK: u32 = 1 << 24;

/// Leaves `Outcome::Nat`'s word (high half of the packed verdict) and the
/// flow's `FlowVal::snat` (low 24 bits, with `FULLNAT_MARK`) for `lb_nat` in
/// this CPU's `NAT_STASH`.
#[inline(always)]
pub fn stash(v: u64) {
    let word = (v >> 32) as u32;
    if let Some(s) = NAT_STASH.get_ptr_mut(0) {
        // SAFETY: this CPU's entry, read by the program tail-called next.
        unsafe { *s = NatStash { backend_id: word & !NEW_FLOW, new_flow: word >> 31, snat: v as u32 & (FULLNAT_MARK | 0xff_ffff) } };
    }
}

/// What `lb_xdp` (through `lb_rare`) left in `NAT_STASH` besides a flow's
/// packet: `ICMP_ERROR` (an ICMP error about a reply: `lb_nat` then runs `icmp`,
/// a call of its own: with the translation's own call it would not fit `nat`'s
/// stack frame), `FRAG` (a fragment: `nat_frag.rs`), or 0. One read, as the
/// ICMP test alone was.
#[inline(always)]
pub fn rare_stashed() -> u32 {
    NAT_STASH.get(0).map_or(0, |s| s.backend_id & (super::nat_icmp::ICMP_ERROR | super::nat_frag::FRAG))
}

/// `lb_nat` for an ICMP error about a reply of a `nat` or `fullnat` flow (see
/// `nat_icmp.rs`, `fullnat_icmp.rs`).
#[inline(always)]
pub fn icmp(ctx: &XdpContext) -> Outcome {
    let Some(s) = NAT_STASH.get(0).copied() else { return Outcome::Pass(stat::PASS_NOT_READY) };
    super::nat_icmp::to_backend(ctx, s.backend_id & !super::nat_icmp::ICMP_ERROR)
}

/// `lb_nat`: the forward direction.
#[inline(always)]
pub fn forward(ctx: &XdpContext) -> Outcome {
    let Some(s) = NAT_STASH.get(0).copied() else { return Outcome::Pass(stat::PASS_NOT_READY) };
    let mut pkt = MaybeUninit::uninit();
    if let Err(outcome) = parse::parse::<false, false>(ctx, &mut pkt) {
        return outcome;
    }
    // SAFETY: `parse` wrote the whole packet when it returned Ok.
    let pkt = unsafe { pkt.assume_init_ref() };
    let (Some(b), Some(cfg)) = (BACKENDS.get(s.backend_id), CONFIG.get(0)) else {
        return Outcome::Pass(stat::PASS_NOT_READY);
    };
    let port = if b.port != 0 { b.port } else { pkt.dport };
    let (service_id, egress) = (b.service_id, b.egress);
    if s.new_flow != 0 {
        remember(ctx, pkt, (&b.addr, port), s.backend_id, service_id, egress);
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let done = translate::<false>(ctx, pkt.l3, pkt.v6, pkt.l4, pkt.proto, &b.addr, port, &b.mac, &cfg.iface_mac);
    match done {
        Ok(()) => {
            count(stat::NAT_FORWARDED);
            count_forward(service_id, s.backend_id, bytes, s.new_flow != 0);
            Outcome::Out(u32::from(egress))
        }
        Err(reason) => Outcome::Drop(reason),
    }
}

/// Records how the flow's replies are translated back, and by which interface
/// they leave (`egress::reply_egress`: the backend's `egress` given).
#[inline(always)]
fn remember(ctx: &XdpContext, pkt: &Packet, (backend, port): (&[u8; 16], u16), backend_id: u32, service_id: u32, egress: u8) {
    let Some(eth) = bytes_mut::<12>(ctx, 0) else { return };
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&eth[6..12]);
    let egress = super::egress::reply_egress(ctx, egress);
    let key = FlowKey { src: *backend, dst: pkt.src, sport: port, dport: pkt.sport, proto: pkt.proto, _pad: [0; 3] };
    let val = NatReverse {
        vip: pkt.dst,
        vport: pkt.dport,
        mac,
        backend_id,
        service_id,
        client: pkt.src,
        cport: pkt.sport,
        seen: 0,
        created: 0,
        egress,
        _pad: [0; 3],
    };
    let _ = NAT_REVERSE.insert(&key, &val, BPF_ANY as u64);
}

/// One's-complement sum of a 16-bit word's replacement (RFC 1624, eqn. 3: the
/// new checksum is `fold(!old_checksum + Σ(!m + m'))`).
#[inline(always)]
pub(super) fn acc(sum: u32, old: u16, new: u16) -> u32 {
    sum + u32::from(!old) + u32::from(new)
}

/// Rewrites one end of the packet, its source (`SRC`: a reply) or its destination,
/// to `addr`:`port`, decrements the TTL / hop limit and sets the MACs. `Err`: the
/// counter of the drop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn translate<const SRC: bool>(
    ctx: &XdpContext,
    l3: usize,
    v6: bool,
    l4: usize,
    proto: u8,
    addr: &[u8; 16],
    port: u16,
    to: &[u8; 6],
    from: &[u8; 6],
) -> Result<(), u32> {
    let delta = match (l3, v6) {
        (14, false) => ip4::<14, SRC>(ctx, addr),
        (18, false) => ip4::<18, SRC>(ctx, addr),
        (14, true) => ip6::<14, SRC>(ctx, addr),
        _ => ip6::<18, SRC>(ctx, addr),
    }?;
    // The L4 header sits within the first 128 bytes (IHL ≤ 60): a bound the
    // verifier can see.
    let l4 = l4 & 0x7f;
    let done = if proto == PROTO_TCP {
        l4_ports::<20, 16, SRC>(ctx, l4, delta, port, false)
    } else {
        l4_ports::<8, 6, SRC>(ctx, l4, delta, port, !v6)
    };
    done.ok_or(stat::DROP_NAT_UNSUPPORTED)?;
    let eth = bytes_mut::<12>(ctx, 0).ok_or(stat::DROP_NAT_UNSUPPORTED)?;
    eth[0..6].copy_from_slice(to);
    eth[6..12].copy_from_slice(from);
    Ok(())
}

/// `translate` for a later fragment (no TCP/UDP header): the source (`SRC`: a
/// reply) or destination address, TTL / hop limit, MACs.
#[inline(always)]
pub(super) fn translate_l3<const SRC: bool>(
    ctx: &XdpContext,
    l3: usize,
    v6: bool,
    addr: &[u8; 16],
    to: &[u8; 6],
    from: &[u8; 6],
) -> Result<(), u32> {
    match (l3, v6) {
        (14, false) => ip4::<14, SRC>(ctx, addr),
        (18, false) => ip4::<18, SRC>(ctx, addr),
        (14, true) => ip6::<14, SRC>(ctx, addr),
        _ => ip6::<18, SRC>(ctx, addr),
    }?;
    let eth = bytes_mut::<12>(ctx, 0).ok_or(stat::DROP_NAT_UNSUPPORTED)?;
    eth[0..6].copy_from_slice(to);
    eth[6..12].copy_from_slice(from);
    Ok(())
}

/// The IPv4 header's part: returns the pseudo-header's checksum change.
#[inline(always)]
fn ip4<const L2: usize, const SRC: bool>(ctx: &XdpContext, addr: &[u8; 16]) -> Result<u32, u32> {
    let h = bytes_mut::<20>(ctx, L2).ok_or(stat::DROP_NAT_UNSUPPORTED)?;
    if h[8] <= 1 {
        return Err(stat::DROP_NAT_TTL);
    }
    let at = if SRC { 12 } else { 16 };
    let mut ip = u32::from(!be16(h, 10));
    let old_ttl = be16(h, 8);
    let new_ttl = old_ttl - 0x100;
    set_be16(h, 8, new_ttl);
    ip = acc(ip, old_ttl, new_ttl);
    let mut pseudo = 0;
    let (o0, o1) = (be16(h, at), be16(h, at + 2));
    let (n0, n1) = (be16(addr, 12), be16(addr, 14));
    ip = acc(acc(ip, o0, n0), o1, n1);
    pseudo = acc(acc(pseudo, o0, n0), o1, n1);
    set_be16(h, at, n0);
    set_be16(h, at + 2, n1);
    set_be16(h, 10, fold(ip));
    Ok(pseudo)
}

/// The IPv6 header's part (no checksum of its own): the pseudo-header's change.
#[inline(always)]
fn ip6<const L2: usize, const SRC: bool>(ctx: &XdpContext, addr: &[u8; 16]) -> Result<u32, u32> {
    let h = bytes_mut::<40>(ctx, L2).ok_or(stat::DROP_NAT_UNSUPPORTED)?;
    if h[7] <= 1 {
        return Err(stat::DROP_NAT_TTL);
    }
    h[7] -= 1;
    let at = if SRC { 4 } else { 12 };
    let mut pseudo = 0;
    let (h, addr) = (h.as_mut_ptr() as *mut u16, addr.as_ptr() as *const u16);
    let mut i = 0;
    // In 16-bit words (the header is 2-aligned, the address 4-aligned in its
    // map value), each written as soon as it is summed.
    while i < 8 {
        // SAFETY: words 4..12 or 12..20 of the 40-byte header checked above, and
        // of the 16-byte address.
        unsafe {
            let n = *addr.add(i);
            pseudo = acc(pseudo, u16::from_be(*h.add(at + i)), u16::from_be(n));
            *h.add(at + i) = n;
        }
        i += 1;
    }
    Ok(pseudo)
}

/// The TCP/UDP header's part: the port (source for `SRC`, else destination) and
/// the checksum at `C`. `zero_is_none`: IPv4 UDP, where a checksum of 0 means none
/// (kept), and a computed 0 is sent as 0xffff (RFC 768).
#[inline(always)]
fn l4_ports<const N: usize, const C: usize, const SRC: bool>(
    ctx: &XdpContext,
    l4: usize,
    delta: u32,
    port: u16,
    zero_is_none: bool,
) -> Option<()> {
    let h = bytes_mut::<N>(ctx, l4)?;
    let at = if SRC { 0 } else { 2 };
    let delta = acc(delta, be16(h, at), port);
    set_be16(h, at, port);
    let old = be16(h, C);
    if zero_is_none && old == 0 {
        return Some(());
    }
    let mut sum = fold(u32::from(!old) + delta);
    if zero_is_none && sum == 0 {
        sum = 0xffff;
    }
    set_be16(h, C, sum);
    Some(())
}
