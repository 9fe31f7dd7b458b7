//! ICMP and ICMPv6 to a VIP address.
//!
//! - An error (IPv4: destination unreachable, incl. "fragmentation needed", and
//!   time exceeded; IPv6: destination unreachable, packet too big, time exceeded)
//!   whose embedded packet is a reply of a VIP flow (embedded source = the VIP the
//!   error was sent to, TCP or UDP, not a later fragment) becomes a `KIND_ICMP_ERROR`
//!   packet whose flow is the embedded one swapped back to the client-to-VIP
//!   direction: `schedule::forward` sends it to that flow's backend (`peek`: the
//!   connection table is read, never changed), so a backend answering clients
//!   directly learns the path MTU (the PMTU black hole LVS, Katran and GLB solve).
//! - Other errors, errors too short to hold the embedded IP header and 8 bytes,
//!   and everything else are passed to the stack and counted.
//! - An echo request to a VIP address is answered in place (`answer_ping`).
//!
//! Limits (documented in docs/architecture.md): the outer IPv4 header and the
//! embedded one must have no options (IHL 5), and ICMPv6 / the embedded TCP or
//! UDP header must follow the IPv6 fixed headers directly: every offset is then a
//! constant (per Ethernet header length), as the verifier wants. All of this runs
//! in `#[inline(never)]` functions with small frames, off the balancer's stack.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    stat, trace::ct_step, v4_mapped, FlowKey, VipAddrKey, BACKEND_ACTIVE, CONFIG_ANSWER_PING, CONFIG_FORWARD_ICMP,
    PROTO_TCP, PROTO_UDP,
};

use crate::{
    backend::backend,
    conntrack::{Lookup, Slot},
    forward::bytes_mut,
    maps::{Scratch, CONFIG, CONNTRACK, CT_ESTABLISHED, SCRATCH, VIP_ADDRS},
    parse::{ptr_at, Outcome, Packet, KIND_ICMP_ERROR},
    trace::Decision,
};

const ICMP_HLEN: usize = 8;
/// The embedded packet's bytes after its IP header that an error must carry.
const QUOTED: usize = 8;

/// Reads an ICMP message to a VIP address: `Ok` with `pkt` turned into a
/// `KIND_ICMP_ERROR` packet of the embedded flow, or the outcome of anything else.
#[inline(always)]
pub fn inspect(ctx: &XdpContext, pkt: &mut Packet) -> Result<(), Outcome> {
    if !pkt.v6 && pkt.l4 != pkt.l3 + 20 {
        return Err(Outcome::Pass(stat::PASS_ICMP));
    }
    // The results come back through the per-CPU scratch entry: a pointer to
    // `pkt` would pin it (and its copies) to the balancer's stack.
    let Some(s) = SCRATCH.get_ptr_mut(0) else { return Err(Outcome::Pass(stat::PASS_ICMP)) };
    // SAFETY: this CPU's entry, used by this program run only.
    let s = unsafe { &mut *s };
    s.vip = pkt.dst;
    let counter = match (pkt.l3, pkt.v6) {
        (14, false) => v4::<14>(ctx, pkt.ip_len),
        (18, false) => v4::<18>(ctx, pkt.ip_len),
        (14, true) => v6::<14>(ctx, pkt.ip_len),
        _ => v6::<18>(ctx, pkt.ip_len),
    };
    match counter {
        0 => {
            pkt.src = s.client;
            pkt.sport = s.sport;
            pkt.dport = s.dport;
            pkt.proto = s.proto;
            pkt.kind = KIND_ICMP_ERROR;
            Ok(())
        }
        stat::ICMP_ECHO_REPLY => Err(Outcome::TxAs(stat::ICMP_ECHO_REPLY)),
        c => Err(Outcome::Pass(c)),
    }
}

/// The `CONFIG` flags (0 before the agent wrote them).
#[inline(always)]
fn flags() -> u32 {
    CONFIG.get(0).map(|c| c.flags).unwrap_or(0)
}

#[inline(always)]
fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: this CPU's entry, used by this program run only.
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// IPv4. Returns 0 when `SCRATCH` holds the embedded flow, else the counter of
/// the outcome (`ICMP_ECHO_REPLY`: answered, send it back out).
#[inline(never)]
fn v4<const L2: usize>(ctx: &XdpContext, ip_len: usize) -> u32 {
    let Some(s) = scratch() else { return stat::PASS_ICMP };
    let Ok(icmp) = ptr_at::<[u8; ICMP_HLEN]>(ctx, L2 + 20) else { return stat::PASS_ICMP_SHORT };
    // SAFETY: bounds checked.
    let ty = unsafe { (*icmp)[0] };
    match ty {
        8 => return echo::<L2, false>(ctx, &s.vip),
        3 | 11 => {}
        _ => return stat::PASS_ICMP,
    }
    if flags() & CONFIG_FORWARD_ICMP == 0 {
        return stat::PASS_ICMP;
    }
    if ip_len < 20 + ICMP_HLEN + 20 + QUOTED {
        return stat::PASS_ICMP_SHORT;
    }
    let Ok(inner) = ptr_at::<[u8; 20 + QUOTED]>(ctx, L2 + 20 + ICMP_HLEN) else { return stat::PASS_ICMP_SHORT };
    // SAFETY: bounds checked.
    let h = unsafe { &*inner };
    let src = v4_mapped([h[12], h[13], h[14], h[15]]);
    let offset = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
    if h[0] != 0x45 || offset != 0 || (h[9] != PROTO_TCP && h[9] != PROTO_UDP) || src != s.vip {
        return stat::PASS_ICMP;
    }
    s.client = v4_mapped([h[16], h[17], h[18], h[19]]);
    s.sport = u16::from_be_bytes([h[22], h[23]]);
    s.dport = u16::from_be_bytes([h[20], h[21]]);
    s.proto = h[9];
    0
}

/// IPv6, as `v4`.
#[inline(never)]
fn v6<const L2: usize>(ctx: &XdpContext, ip_len: usize) -> u32 {
    let Some(s) = scratch() else { return stat::PASS_ICMP };
    let Ok(icmp) = ptr_at::<[u8; ICMP_HLEN]>(ctx, L2 + 40) else { return stat::PASS_ICMP_SHORT };
    // SAFETY: bounds checked.
    let ty = unsafe { (*icmp)[0] };
    match ty {
        128 => return echo::<L2, true>(ctx, &s.vip),
        1..=3 => {}
        _ => return stat::PASS_ICMP,
    }
    if flags() & CONFIG_FORWARD_ICMP == 0 {
        return stat::PASS_ICMP;
    }
    if ip_len < 40 + ICMP_HLEN + 40 + QUOTED {
        return stat::PASS_ICMP_SHORT;
    }
    let Ok(inner) = ptr_at::<[u8; 40 + QUOTED]>(ctx, L2 + 40 + ICMP_HLEN) else { return stat::PASS_ICMP_SHORT };
    // SAFETY: bounds checked.
    let h = unsafe { &*inner };
    if h[0] >> 4 != 6 || (h[6] != PROTO_TCP && h[6] != PROTO_UDP) || h[8..24] != s.vip[..] {
        return stat::PASS_ICMP;
    }
    s.client.copy_from_slice(&h[24..40]);
    s.sport = u16::from_be_bytes([h[42], h[43]]);
    s.dport = u16::from_be_bytes([h[40], h[41]]);
    s.proto = h[6];
    0
}

/// Answers an echo request to `vip` in place: MACs and addresses swapped, type
/// 0 (ICMPv6 129), checksum updated incrementally (RFC 1624; swapping the
/// addresses changes neither the IPv4 header checksum nor the ICMPv6
/// pseudo-header sum). TTL / hop limit are kept.
#[inline(always)]
fn echo<const L2: usize, const V6: bool>(ctx: &XdpContext, vip: &[u8; 16]) -> u32 {
    if flags() & CONFIG_ANSWER_PING == 0 {
        return stat::PASS_ICMP;
    }
    // SAFETY: copied out at once (only presence matters).
    if unsafe { VIP_ADDRS.get(VipAddrKey { addr: *vip }) }.is_none() {
        return stat::PASS_NOT_VIP;
    }
    let ip_hlen = if V6 { 40 } else { 20 };
    let Some(eth) = bytes_mut::<12>(ctx, 0) else { return stat::PASS_MALFORMED_L2 };
    for i in 0..6 {
        eth.swap(i, i + 6);
    }
    if V6 {
        let Some(h) = bytes_mut::<40>(ctx, L2) else { return stat::PASS_MALFORMED_L3 };
        for i in 8..24 {
            h.swap(i, i + 16);
        }
    } else {
        let Some(h) = bytes_mut::<20>(ctx, L2) else { return stat::PASS_MALFORMED_L3 };
        for i in 12..16 {
            h.swap(i, i + 4);
        }
    }
    let Some(m) = bytes_mut::<4>(ctx, L2 + ip_hlen) else { return stat::PASS_ICMP_SHORT };
    let (old, new) = if V6 { (128u16, 129u16) } else { (8, 0) };
    let old = (old << 8) | u16::from(m[1]);
    let new = (new << 8) | u16::from(m[1]);
    m[0] = (new >> 8) as u8;
    let hc = u16::from_be_bytes([m[2], m[3]]);
    // HC' = ~(~HC + ~m + m')
    let mut s = u32::from(!hc) + u32::from(!old) + u32::from(new);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    m[2..4].copy_from_slice(&(!(s as u16)).to_be_bytes());
    stat::ICMP_ECHO_REPLY
}

/// The connection table's entry for an ICMP error's flow, looked up only
/// (`CT_ESTABLISHED`, then `CONNTRACK`): no insert, no promotion, no refresh.
#[inline(always)]
pub fn peek(flow: &FlowKey, protect: bool, d: &mut Decision) -> Lookup {
    if protect {
        // SAFETY: copied out at once.
        if let Some(v) = unsafe { CT_ESTABLISHED.get(flow) }.copied() {
            if let Some(b) = backend(v.backend_id, v.service_id, Some(v.generation), BACKEND_ACTIVE) {
                d.ct = ct_step::ICMP_HIT;
                return Lookup::Hit { service_id: v.service_id, backend_id: v.backend_id, backend: b, snat: 0 };
            }
        }
    }
    // SAFETY: as above.
    if let Some(v) = unsafe { CONNTRACK.get(flow) }.copied() {
        if let Some(b) = backend(v.backend_id, v.service_id, Some(v.generation), BACKEND_ACTIVE) {
            d.ct = ct_step::ICMP_HIT;
            return Lookup::Hit { service_id: v.service_id, backend_id: v.backend_id, backend: b, snat: 0 };
        }
    }
    d.ct = ct_step::ICMP_MISS;
    Lookup::Miss(Slot::new(false, 0))
}
