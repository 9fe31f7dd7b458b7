//! FULLNAT: the client's packet to VIP:port leaves from a SNAT address
//! and port of the balancer's to backend:port (both ends rewritten), and the
//! backend's reply, sent to the SNAT address (which is on the balancer's
//! interface, so the backend needs no route to the clients), leaves from VIP:port
//! to the client, by the interface the client's frames came in on (two-arm:
//! redirected, `NatReverse::egress`). The backend never sees the client's address.
//!
//! `lb_nat` (`nat.rs`) hands a `fullnat` backend's packet here. The flow's
//! mapping is in `FULLNAT_FORWARD` (client-to-VIP flow -> SNAT address and port,
//! backend address and port); a flow without one for its backend (new, or
//! rescheduled) gets one: candidates of the service's pool (`SNAT_POOLS`) are
//! probed from the pool's cursor, each by inserting the reply's 5-tuple into
//! `FULLNAT_REVERSE` with `BPF_NOEXIST`. That map is a plain hash, so a live
//! mapping is never evicted and no two live flows to one backend address and port
//! share a SNAT address and port; no free candidate within `SNAT_PROBES` probes,
//! or a full map, drops the packet (`drop_snat_exhausted`). The agent's sweep
//! removes the mappings of flows gone from the connection table
//! (lb-agent/src/fullnat_table.rs): their ports return to the pool.
//!
//! `lb_nat_reply` (`nat_reply.rs`) looks replies up in `FULLNAT_REVERSE` first
//! while `CONFIG_FULLNAT` is set (`fullnat_reply.rs`).

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    programs::XdpContext,
};
use lb_common::{
    snat_check, snat_slot, stat, Backend, Config, FlowKey, NatReverse, FORWARD_FULLNAT, MAX_SNAT_ADDRS,
    PROTO_TCP, SNAT_PROBES, SnatFwd,
};

use super::{be16, bytes_mut, fold, nat::acc, set_be16};
use crate::{
    maps::{
        BACKENDS, CONFIG, CT_CLOCK, CT_ESTABLISHED, FULLNAT_FORWARD, FULLNAT_REVERSE, FULLNAT_SCRATCH, NAT_STASH, SNAT_POOLS,
    },
    parse::Outcome,
    stats::{count, count_forward},
};

pub use super::fullnat_reply::{maybe_snat, reply_call, NOT_FULLNAT};

const EEXIST: i64 = 17;

/// Whether `lb_xdp` left a `fullnat` backend's packet in `NAT_STASH` (`lb_nat`
/// then runs `run`, else the `nat` path).
#[inline(always)]
pub fn stashed() -> bool {
    let Some(s) = NAT_STASH.get(0) else { return false };
    BACKENDS.get(s.backend_id).is_some_and(|b| b.forward == FORWARD_FULLNAT)
}

/// `lb_nat` for a `fullnat` backend's packet, as a packed verdict. A call of its
/// own: `lb_nat`'s frame holds neither path's stack. The frame was parsed in full
/// by `lb_xdp` (a VIP flow's TCP/UDP packet): the 5-tuple parser of the reply
/// direction is enough here, and, like `translate`, inline: on this CPU every
/// BPF-to-BPF return costs a "safe RET" (SRSO mitigation), and an established
/// packet makes no call but this one (new flows call `allocate`).
#[inline(never)]
pub fn run(ctx: &XdpContext) -> u64 {
    crate::packed(run_inline(ctx))
}

#[inline(always)]
fn run_inline(ctx: &XdpContext) -> Outcome {
    let Some(st) = NAT_STASH.get(0).copied() else { return Outcome::Pass(stat::PASS_NOT_READY) };
    let (Some(b), Some(cfg)) = (BACKENDS.get(st.backend_id), CONFIG.get(0)) else {
        return Outcome::Pass(stat::PASS_NOT_READY);
    };
    let Some(s) = FULLNAT_SCRATCH.get_ptr_mut(0) else { return Outcome::Pass(stat::PASS_NOT_READY) };
    // SAFETY: this CPU's entry, used by this program run only.
    let s = unsafe { &mut *s };
    let Some((flow, l3, l4, v6, _)) = super::nat_reply::parse(ctx) else { return Outcome::Drop(stat::DROP_NAT_UNSUPPORTED) };
    s.flow = flow;
    forward_inline(ctx, s, (l3, l4, v6), b, (st.backend_id, st.snat), st.new_flow != 0, cfg)
}

/// The flow (in `s.flow`), its mapping and the candidate's entry are built in
/// this CPU's `FULLNAT_SCRATCH`. An established flow whose `CT_ESTABLISHED`
/// entry holds its SNAT address and port (`snat`, from `FlowVal::snat`) takes
/// them from there and its pool: no `FULLNAT_FORWARD` lookup. Any other looks
/// its mapping up (or makes one) and writes it into that entry (`note_slot`).
#[inline(always)]
fn forward_inline(
    ctx: &XdpContext,
    s: &mut Scratch,
    (l3, l4, v6): (usize, usize, bool),
    b: &Backend,
    (backend_id, snat): (u32, u32),
    new_flow: bool,
    cfg: &Config,
) -> Outcome {
    let bport = if b.port != 0 { b.port } else { s.flow.dport };
    if !(snat as u16 != 0 && from_slot(s, b, snat, v6, bport)) {
        // SAFETY: copied out at once.
        let known = match unsafe { FULLNAT_FORWARD.get(&s.flow) } {
            Some(m) if m.backend_id == backend_id && m.generation == b.generation && m.backend_port == bport => {
                copy_words(&mut s.m, m);
                true
            }
            _ => false,
        };
        if !known && !allocate(ctx, s, b, u64::from(backend_id) << 16 | u64::from(bport), v6 as u64) {
            return Outcome::Drop(stat::DROP_SNAT_EXHAUSTED);
        }
        // A flow scheduled by this packet has no `CT_ESTABLISHED` entry yet (or
        // one just rescheduled): its next packets note it.
        if !new_flow {
            note_slot(s, b, backend_id, v6 as u64);
        }
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    s.macs[..6].copy_from_slice(&b.mac);
    s.macs[6..].copy_from_slice(&cfg.iface_mac);
    let how = shape(l3, v6, l4, s.flow.proto, s.m.snat_port, s.m.backend_port);
    match translate_inline(ctx, how, &s.m.snat, &s.m.backend, &s.macs) {
        Ok(()) => {
            count(stat::FULLNAT_FORWARDED);
            count_forward(b.service_id, backend_id, bytes, new_flow);
            Outcome::Out(u32::from(b.egress))
        }
        Err(reason) => Outcome::Drop(reason),
    }
}

/// The mapping of an established flow from its `FlowVal::snat` (`snat`, as
/// `lb_common::snat_slot` packs it) into `s.m`: the address at its index in the
/// service's pool, if that is still the address it names (`snat_check`).
#[inline(always)]
fn from_slot(s: &mut Scratch, b: &Backend, snat: u32, v6: bool, bport: u16) -> bool {
    let Some(pool) = SNAT_POOLS.get(b.service_id) else { return false };
    let i = ((snat >> 16) & 7) as usize;
    let n = if v6 { pool.n_v6 } else { pool.n_v4 };
    if i >= n as usize {
        return false;
    }
    let w = s.m.snat.as_mut_ptr() as *mut u32;
    // SAFETY: `snat` is the first field of `SnatFwd` (4-aligned, 16 bytes): four
    // words, written as words (a 10-byte fill becomes a call to a byte loop).
    unsafe {
        if v6 {
            copy16(&mut s.m.snat, &pool.v6[i]);
        } else {
            (*w, *w.add(1), *w.add(2)) = (0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]));
            *w.add(3) = u32::from_ne_bytes(pool.v4[i]);
        }
    }
    if u32::from(snat_check(&s.m.snat)) != (snat >> 19) & 0x1f {
        return false;
    }
    s.m.snat_port = snat as u16;
    copy16(&mut s.m.backend, &b.addr);
    s.m.backend_port = bport;
    true
}

/// `*dst = *src` for 16-byte addresses at 4-aligned offsets of their structs,
/// in words (a plain assignment becomes a call to a byte-loop `memmove`).
#[inline(always)]
fn copy16(dst: &mut [u8; 16], src: &[u8; 16]) {
    let (d, s) = (dst.as_mut_ptr() as *mut u32, src.as_ptr() as *const u32);
    // SAFETY: every caller's arrays sit at 4-aligned offsets of 4-aligned
    // structs (`SnatFwd`, `SnatPool::v6`, `Backend::addr`); four words each.
    unsafe { (*d, *d.add(1), *d.add(2), *d.add(3)) = (*s, *s.add(1), *s.add(2), *s.add(3)) };
}

/// Writes the flow's mapping (`s.m`) into its `CT_ESTABLISHED` entry
/// (`FlowVal::snat`) while that entry still names this backend: its next packets
/// skip the `FULLNAT_FORWARD` lookup (`from_slot`). Only there: a `CONNTRACK`
/// entry can outlive its mapping (the agent's sweep takes the ports of flows idle
/// past their timeout back while the LRU still holds their entry), and a flow
/// moving to `CT_ESTABLISHED` does not take the field along. A call of its own:
/// its frame is not added to `lb_nat`'s.
#[inline(never)]
fn note_slot(s: &mut Scratch, b: &Backend, backend_id: u32, v6: u64) {
    let Some(pool) = SNAT_POOLS.get(b.service_id) else { return };
    let n = if v6 != 0 { pool.n_v6 } else { pool.n_v4 } as usize;
    let w = |a: &[u8; 16], k: usize| u32::from_ne_bytes([a[k], a[k + 1], a[k + 2], a[k + 3]]);
    let mut i = 0;
    while i < n && i < MAX_SNAT_ADDRS {
        let same = if v6 != 0 {
            let a = &pool.v6[i];
            (0..4).all(|k| w(a, 4 * k) == w(&s.m.snat, 4 * k))
        } else {
            u32::from_ne_bytes(pool.v4[i]) == w(&s.m.snat, 12)
        };
        if same {
            break;
        }
        i += 1;
    }
    if i >= n || i >= MAX_SNAT_ADDRS {
        return;
    }
    let Some(p) = CT_ESTABLISHED.get_ptr_mut(&s.flow) else { return };
    let slot = snat_slot(s.m.snat_port, i, snat_check(&s.m.snat));
    // SAFETY: a live entry; plain stores (a reader racing them sees a check that
    // does not match, or the old zeros, and looks the mapping up).
    unsafe {
        if (*p).backend_id == backend_id && (*p).generation == b.generation {
            (*p).snat[0] = slot[0];
            (*p).snat[1] = slot[1];
            (*p).snat[2] = slot[2];
        }
    }
}

/// `*dst = *src` in 32-bit words: a plain assignment between two map values
/// (which LLVM cannot prove apart) becomes a call to a byte-by-byte `memmove`
/// (44 iterations: most of an established packet's cost, measured).
#[inline(always)]
pub(super) fn copy_words(dst: &mut SnatFwd, src: &SnatFwd) {
    const WORDS: usize = core::mem::size_of::<SnatFwd>() / 4;
    let (d, s) = (dst as *mut SnatFwd as *mut u32, src as *const SnatFwd as *const u32);
    let mut i = 0;
    while i < WORDS {
        // SAFETY: both are 4-aligned (SnatFwd holds u32s), `WORDS` words long.
        unsafe { *d.add(i) = *s.add(i) };
        i += 1;
    }
}

/// Zeroes a 3-byte padding field byte by byte (an array store becomes a call
/// to a byte-loop `memset`).
#[inline(always)]
fn zero_pad(pad: &mut [u8; 3]) {
    pad[0] = 0;
    pad[1] = 0;
    pad[2] = 0;
}

/// Value of `FULLNAT_SCRATCH` (never pinned).
#[repr(C)]
pub struct Scratch {
    /// The packet's flow (client to VIP).
    pub flow: FlowKey,
    /// The `FULLNAT_REVERSE` key being tried, and its value.
    pub key: FlowKey,
    pub val: NatReverse,
    /// The flow's mapping.
    pub m: SnatFwd,
    /// The MACs a translated frame gets: destination, then source.
    pub macs: [u8; 12],
}

/// A new mapping for `s.flow` into `s.m`: the first free (SNAT address, port) of
/// the pool for this backend address and port, from the pool's cursor on.
/// `false`: exhausted. `id_port`: the backend id (high bits) and port (low 16
/// bits), packed (a BPF call takes five arguments). A call of its own: its frame
/// is not added to `lb_nat`'s, and the verifier walks its loop once.
#[inline(never)]
pub(super) fn allocate(ctx: &XdpContext, s: &mut Scratch, b: &Backend, id_port: u64, v6: u64) -> bool {
    let (backend_id, bport, v6) = ((id_port >> 16) as u32, id_port as u16, v6 != 0);
    let Some(pool) = SNAT_POOLS.get_ptr_mut(b.service_id) else { return false };
    // SAFETY: a live array element; the fields are copied out.
    let (n, lo, hi, cursor) = unsafe {
        let p = &*pool;
        (u32::from(if v6 { p.n_v6 } else { p.n_v4 }), p.port_lo, p.port_hi, p.cursor)
    };
    if n == 0 || n > MAX_SNAT_ADDRS as u32 || hi < lo {
        return false;
    }
    let ports = u32::from(hi - lo) + 1;
    let total = n * ports;
    // `checked_*`: a division LLVM cannot prove safe would call a panic (which
    // the verifier refuses), not return.
    let Some(start) = cursor.checked_rem(total) else { return false };
    let Some(eth) = bytes_mut::<12>(ctx, 0) else { return false };
    // Field by field: a value built on the stack and copied costs its size there.
    let v = &mut s.val;
    v.mac.copy_from_slice(&eth[6..12]);
    v.vip = s.flow.dst;
    v.vport = s.flow.dport;
    v.backend_id = backend_id;
    v.service_id = b.service_id;
    v.client = s.flow.src;
    v.cport = s.flow.sport;
    v.seen = 0;
    v.created = CT_CLOCK.get(0).copied().unwrap_or(0);
    v.egress = super::egress::reply_egress(ctx, b.egress);
    zero_pad(&mut v._pad);
    s.key.src = b.addr;
    s.key.sport = bport;
    s.key.proto = s.flow.proto;
    zero_pad(&mut s.key._pad);
    let probes = if total < SNAT_PROBES { total } else { SNAT_PROBES };
    let mut k = 0;
    while k < probes && k < SNAT_PROBES {
        let mut c = start + k;
        if c >= total {
            c -= total;
        }
        let (Some(i), Some(p)) = (c.checked_div(ports), c.checked_rem(ports)) else { return false };
        let i = i as usize & (MAX_SNAT_ADDRS - 1);
        // SAFETY: as above; `i` is within the arrays. Written in place (a
        // temporary address per branch costs this frame 32 bytes).
        unsafe {
            if v6 {
                s.key.dst = (*pool).v6[i];
            } else {
                s.key.dst[..10].fill(0);
                s.key.dst[10] = 0xff;
                s.key.dst[11] = 0xff;
                s.key.dst[12..].copy_from_slice(&(*pool).v4[i]);
            }
        }
        s.key.dport = lo.wrapping_add(p as u16);
        match FULLNAT_REVERSE.insert(&s.key, &s.val, BPF_NOEXIST as u64) {
            Ok(()) => {
                // SAFETY: as above; a racy store is harmless (the insert decides).
                unsafe { (*pool).cursor = c + 1 };
                s.m.snat = s.key.dst;
                s.m.backend = b.addr;
                s.m.snat_port = s.key.dport;
                s.m.backend_port = bport;
                s.m.backend_id = backend_id;
                s.m.generation = b.generation;
                if FULLNAT_FORWARD.insert(&s.flow, &s.m, BPF_ANY as u64).is_err() {
                    let _ = FULLNAT_REVERSE.remove(&s.key);
                    return false;
                }
                return true;
            }
            Err(e) if e as i64 == -EEXIST => {}
            // Full (or any other failure): no candidate will do better.
            Err(_) => return false,
        }
        k += 1;
    }
    false
}

/// `translate_inline`'s packet shape in one register: L3 offset, family, L4 offset,
/// protocol, the new source and destination ports.
#[inline(always)]
pub(super) fn shape(l3: usize, v6: bool, l4: usize, proto: u8, sport: u16, dport: u16) -> u64 {
    (l3 as u64 & 0xff)
        | u64::from(v6) << 8
        | (l4 as u64 & 0xff) << 16
        | u64::from(proto) << 24
        | u64::from(sport) << 32
        | u64::from(dport) << 48
}

/// Rewrites both ends of the packet (`shape`) to `src` and `dst` with the ports
/// `how` carries, decrements the TTL / hop limit and sets the MACs (`macs`:
/// destination, source); checksums updated incrementally (RFC 1624), an IPv4 UDP
/// checksum of 0 kept. `Err`: the counter of the drop.
#[inline(always)]
pub(super) fn translate_inline(ctx: &XdpContext, how: u64, src: &[u8; 16], dst: &[u8; 16], macs: &[u8; 12]) -> Result<(), u32> {
    rewrite(ctx, how, src, dst)?;
    let eth = bytes_mut::<12>(ctx, 0).ok_or(stat::DROP_NAT_UNSUPPORTED)?;
    eth.copy_from_slice(macs);
    Ok(())
}

/// `translate_inline` without the MACs.
#[inline(always)]
pub(super) fn rewrite(ctx: &XdpContext, how: u64, src: &[u8; 16], dst: &[u8; 16]) -> Result<(), u32> {
    let (l3, v6, l4, proto) = ((how & 0xff) as usize, (how >> 8) & 1 != 0, ((how >> 16) & 0xff) as usize, (how >> 24) as u8);
    let (sport, dport) = ((how >> 32) as u16, (how >> 48) as u16);
    let delta = match (l3, v6) {
        (14, false) => ip4::<14>(ctx, src, dst),
        (18, false) => ip4::<18>(ctx, src, dst),
        (14, true) => ip6::<14>(ctx, src, dst),
        _ => ip6::<18>(ctx, src, dst),
    }?;
    let l4 = l4 & 0x7f;
    let done = if proto == PROTO_TCP {
        l4_ports::<20, 16>(ctx, l4, delta, sport, dport, false)
    } else {
        l4_ports::<8, 6>(ctx, l4, delta, sport, dport, !v6)
    };
    done.ok_or(stat::DROP_NAT_UNSUPPORTED)
}

/// `translate_inline` for a later fragment (no TCP/UDP header): both addresses,
/// TTL / hop limit, MACs.
#[inline(always)]
pub(super) fn translate_l3(ctx: &XdpContext, l3: usize, v6: bool, src: &[u8; 16], dst: &[u8; 16], macs: &[u8; 12]) -> Result<(), u32> {
    match (l3, v6) {
        (14, false) => ip4::<14>(ctx, src, dst),
        (18, false) => ip4::<18>(ctx, src, dst),
        (14, true) => ip6::<14>(ctx, src, dst),
        _ => ip6::<18>(ctx, src, dst),
    }?;
    let eth = bytes_mut::<12>(ctx, 0).ok_or(stat::DROP_NAT_UNSUPPORTED)?;
    eth.copy_from_slice(macs);
    Ok(())
}

/// The IPv4 header: TTL and both addresses; returns the pseudo-header's change.
#[inline(always)]
fn ip4<const L2: usize>(ctx: &XdpContext, src: &[u8; 16], dst: &[u8; 16]) -> Result<u32, u32> {
    let h = bytes_mut::<20>(ctx, L2).ok_or(stat::DROP_NAT_UNSUPPORTED)?;
    if h[8] <= 1 {
        return Err(stat::DROP_NAT_TTL);
    }
    let mut ip = u32::from(!be16(h, 10));
    let old_ttl = be16(h, 8);
    let new_ttl = old_ttl - 0x100;
    set_be16(h, 8, new_ttl);
    ip = acc(ip, old_ttl, new_ttl);
    let mut pseudo = 0;
    for (at, addr) in [(12, src), (16, dst)] {
        let (o0, o1) = (be16(h, at), be16(h, at + 2));
        let (n0, n1) = (be16(addr, 12), be16(addr, 14));
        ip = acc(acc(ip, o0, n0), o1, n1);
        pseudo = acc(acc(pseudo, o0, n0), o1, n1);
        set_be16(h, at, n0);
        set_be16(h, at + 2, n1);
    }
    set_be16(h, 10, fold(ip));
    Ok(pseudo)
}

/// The IPv6 header: hop limit and both addresses; the pseudo-header's change.
#[inline(always)]
fn ip6<const L2: usize>(ctx: &XdpContext, src: &[u8; 16], dst: &[u8; 16]) -> Result<u32, u32> {
    let h = bytes_mut::<40>(ctx, L2).ok_or(stat::DROP_NAT_UNSUPPORTED)?;
    if h[7] <= 1 {
        return Err(stat::DROP_NAT_TTL);
    }
    h[7] -= 1;
    let mut pseudo = 0;
    let (h, src, dst) = (h.as_mut_ptr() as *mut u16, src.as_ptr() as *const u16, dst.as_ptr() as *const u16);
    let mut i = 0;
    // In 16-bit words (the header is 2-aligned, the addresses 4-aligned in
    // their map values), each written as soon as it is summed: summing first
    // and copying after keeps 64 values live (504 bytes of spills).
    while i < 8 {
        // SAFETY: words 4..12 and 12..20 of the 40-byte header checked above,
        // and of the two 16-byte addresses.
        unsafe {
            let (s, d) = (*src.add(i), *dst.add(i));
            pseudo = acc(pseudo, u16::from_be(*h.add(4 + i)), u16::from_be(s));
            *h.add(4 + i) = s;
            pseudo = acc(pseudo, u16::from_be(*h.add(12 + i)), u16::from_be(d));
            *h.add(12 + i) = d;
        }
        i += 1;
    }
    Ok(pseudo)
}

/// The TCP/UDP header: both ports and the checksum at `C` (`zero_is_none`: IPv4
/// UDP, where 0 means no checksum and stays, and a computed 0 is sent as 0xffff).
#[inline(always)]
fn l4_ports<const N: usize, const C: usize>(
    ctx: &XdpContext,
    l4: usize,
    delta: u32,
    sport: u16,
    dport: u16,
    zero_is_none: bool,
) -> Option<()> {
    let h = bytes_mut::<N>(ctx, l4)?;
    let delta = acc(acc(delta, be16(h, 0), sport), be16(h, 2), dport);
    set_be16(h, 0, sport);
    set_be16(h, 2, dport);
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
