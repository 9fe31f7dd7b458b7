//! The established packet of a `nat` or `fullnat` flow, on a lean path of
//! `lb_nat`: `lb_xdp` found the flow in the connection table, so this reads only
//! where the headers are (`layout`, not the full parse again), the backend and
//! (`fullnat`) the SNAT address its `FlowVal::snat` names, and rewrites the
//! frame. `lb_nat` runs it first, from one `NAT_STASH` read; the full path
//! (`nat.rs`, `fullnat.rs`) is what it leaves (`FULL_PATH`):
//! - new flows, ICMP errors and fragments (`NAT_STASH` says so);
//! - a `fullnat` flow whose `FlowVal::snat` is empty or no longer names its
//!   pool's address: the full path looks its mapping up in `FULLNAT_FORWARD` and
//!   notes it again;
//! - a frame `layout` does not take (IPv6 extension headers).
//!
//! Not in `lb_xdp` itself, which would save the tail call too: its frame (400
//! bytes) leaves 112 for a call, and the rewrite's frame is larger.

use aya_ebpf::programs::XdpContext;
use lb_common::{snat_check, stat, v4_mapped, Backend, PROTO_TCP, PROTO_UDP};

use super::{
    bytes_mut,
    fullnat::rewrite,
    nat::{translate, FULLNAT_MARK},
    nat_frag::FRAG,
    nat_icmp::ICMP_ERROR,
};
use crate::{
    maps::{BACKENDS, CONFIG, NAT_STASH, SNAT_POOLS},
    parse::{ptr_at, read_be16, Outcome},
    stats::{count, count_forward},
};

/// `run`'s answer when the full path must take the packet (`packed(Outcome::Rare)`,
/// which no translation returns).
pub const FULL_PATH: u64 = crate::RARE_ACTION as u64;

/// `lb_nat`'s lean path, as a packed verdict, or `FULL_PATH`.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> u64 {
    let Some(st) = NAT_STASH.get(0).copied() else { return FULL_PATH };
    if st.new_flow != 0 || st.backend_id & (ICMP_ERROR | FRAG) != 0 {
        return FULL_PATH;
    }
    if st.snat & FULLNAT_MARK != 0 {
        fullnat(ctx, st.backend_id, st.snat & 0xff_ffff)
    } else {
        nat(ctx, st.backend_id)
    }
}

/// An established `nat` flow's packet, translated and counted as the full path
/// would (`nat_forwarded`, the service's and backend's counters).
#[inline(never)]
fn nat(ctx: &XdpContext, backend_id: u32) -> u64 {
    let (Some(b), Some(cfg)) = (BACKENDS.get(backend_id), CONFIG.get(0)) else { return FULL_PATH };
    let Some(at) = layout(ctx) else { return FULL_PATH };
    let (l3, v6, l4, proto) = ((at & 0xff) as usize, (at >> 8) & 1 != 0, ((at >> 16) & 0xff) as usize, (at >> 24) as u8);
    let port = if b.port != 0 { b.port } else { (at >> 32) as u16 };
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let done = translate::<false>(ctx, l3, v6, l4, proto, &b.addr, port, &b.mac, &cfg.iface_mac);
    finish(done, stat::NAT_FORWARDED, b, backend_id, bytes)
}

/// An established `fullnat` flow's packet whose `FlowVal::snat` (`snat`) still
/// names its SNAT address: both ends rewritten, counted `fullnat_forwarded`.
#[inline(never)]
fn fullnat(ctx: &XdpContext, backend_id: u32, snat: u32) -> u64 {
    let (Some(b), Some(cfg)) = (BACKENDS.get(backend_id), CONFIG.get(0)) else { return FULL_PATH };
    let Some(at) = layout(ctx) else { return FULL_PATH };
    let Some(addr) = pool_address(b.service_id, snat, (at >> 8) & 1 != 0) else { return FULL_PATH };
    let port = if b.port != 0 { b.port } else { (at >> 32) as u16 };
    // `fullnat::shape`: the layout, then the new source and destination ports.
    let how = (at & 0xffff_ffff) | u64::from(snat as u16) << 32 | u64::from(port) << 48;
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let done = rewrite(ctx, how, &addr, &b.addr).and_then(|()| {
        let eth = bytes_mut::<12>(ctx, 0).ok_or(stat::DROP_NAT_UNSUPPORTED)?;
        eth[0..6].copy_from_slice(&b.mac);
        eth[6..12].copy_from_slice(&cfg.iface_mac);
        Ok(())
    });
    finish(done, stat::FULLNAT_FORWARDED, b, backend_id, bytes)
}

/// A translation's packed verdict, counted.
#[inline(always)]
fn finish(done: Result<(), u32>, counter: u32, b: &Backend, backend_id: u32, bytes: u64) -> u64 {
    crate::packed(match done {
        Ok(()) => {
            count(counter);
            count_forward(b.service_id, backend_id, bytes, false);
            Outcome::Out(u32::from(b.egress))
        }
        Err(reason) => Outcome::Drop(reason),
    })
}

/// The SNAT address a flow's `FlowVal::snat` names (`lb_common::snat_slot`: port
/// in the low 16 bits, pool index, 5-bit check of the address), if its service's
/// pool still holds that address there.
#[inline(always)]
fn pool_address(service_id: u32, snat: u32, v6: bool) -> Option<[u8; 16]> {
    if snat as u16 == 0 {
        return None;
    }
    let pool = SNAT_POOLS.get(service_id)?;
    let i = ((snat >> 16) & 7) as usize;
    let n = if v6 { pool.n_v6 } else { pool.n_v4 };
    if i >= n as usize {
        return None;
    }
    let addr = if v6 { pool.v6[i] } else { v4_mapped(pool.v4[i]) };
    (u32::from(snat_check(&addr)) == (snat >> 19) & 0x1f).then_some(addr)
}

/// Where the frame's headers are, in one register (`fullnat::shape`'s low half:
/// L3 offset, family, L4 offset, protocol; the destination port above): TCP or
/// UDP over IPv4, or over IPv6 without extension headers. `lb_xdp` parsed the
/// frame in full already; this reads only what the rewrite needs.
#[inline(always)]
fn layout(ctx: &XdpContext) -> Option<u64> {
    let mut l3 = 14;
    let mut ethertype = read_be16(ctx, 12).ok()?;
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        ethertype = read_be16(ctx, 16).ok()?;
        l3 = 18;
    }
    let (l4, v6, proto) = match ethertype {
        0x0800 => {
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*ptr_at::<[u8; 20]>(ctx, l3).ok()? };
            let ihl = ((h[0] & 0x0f) as usize) * 4;
            if h[0] >> 4 != 4 || ihl < 20 {
                return None;
            }
            (l3 + ihl, false, h[9])
        }
        0x86dd => {
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*ptr_at::<[u8; 8]>(ctx, l3).ok()? };
            (l3 + 40, true, h[6])
        }
        _ => return None,
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let l4 = l4 & 0x7f;
    let dport = read_be16(ctx, l4 + 2).ok()?;
    Some((l3 as u64) | u64::from(v6) << 8 | (l4 as u64) << 16 | u64::from(proto) << 24 | u64::from(dport) << 32)
}
