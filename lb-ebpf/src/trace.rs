//! `lb-agent trace`: one aya-log record per packet that matches the agent's filter
//! (`TRACE_FILTER`), within a per-second budget (`TRACE_BUDGET`), describing every
//! decision the program made for it. Only `lb_xdp_trace` calls this; the agent
//! attaches it only while a trace runs.

use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::info;
use lb_common::{
    mask_addr, trace::*, v4_mapped, TraceFilter, PROTO_TCP, PROTO_UDP,
};

use crate::{
    maps::{BACKENDS, CT_CLOCK, TRACE_BUDGET, TRACE_FILTER},
    parse::{ptr_at, read_be16},
};

/// What the program decided for one packet, filled in along the way (a few
/// stores to the stack); read only while a trace runs.
pub struct Decision {
    pub service: u32,
    /// `lb_common::trace::ct_step`.
    pub ct: u8,
    pub slot: u32,
    pub persist: u8,
    pub backend: u32,
}

impl Decision {
    #[inline(always)]
    pub const fn new() -> Self {
        Decision { service: u32::MAX, ct: ct_step::NONE, slot: u32::MAX, persist: 0, backend: u32::MAX }
    }
}

/// The running trace's filter, if any.
#[inline(always)]
pub fn active() -> Option<&'static TraceFilter> {
    match TRACE_FILTER.get(0) {
        Some(f) if f.flags & TRACE_ON != 0 => Some(f),
        _ => None,
    }
}

/// The flow of a frame as far as it can be read (for frames that stopped early).
struct Flow {
    src: [u8; 16],
    dst: [u8; 16],
    proto: u8,
    sport: u16,
    dport: u16,
    tcp_flags: u8,
}

#[inline(always)]
fn read_flow(ctx: &XdpContext) -> Flow {
    let mut f = Flow { src: [0; 16], dst: [0; 16], proto: 0, sport: 0, dport: 0, tcp_flags: 0 };
    let Ok(mut ethertype) = read_be16(ctx, 12) else { return f };
    let mut l3 = 14;
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        let Ok(t) = read_be16(ctx, 16) else { return f };
        ethertype = t;
        l3 += 4;
    }
    let l4 = match ethertype {
        0x0800 => {
            let Ok(h) = ptr_at::<[u8; 20]>(ctx, l3) else { return f };
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*h };
            f.src = v4_mapped([h[12], h[13], h[14], h[15]]);
            f.dst = v4_mapped([h[16], h[17], h[18], h[19]]);
            f.proto = h[9];
            l3 + ((h[0] & 0x0f) as usize) * 4
        }
        0x86dd => {
            let Ok(h) = ptr_at::<[u8; 40]>(ctx, l3) else { return f };
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*h };
            f.src.copy_from_slice(&h[8..24]);
            f.dst.copy_from_slice(&h[24..40]);
            f.proto = h[6];
            l3 + 40
        }
        _ => return f,
    };
    if f.proto == PROTO_TCP || f.proto == PROTO_UDP {
        if let Ok(p) = ptr_at::<[u8; 4]>(ctx, l4 & 0xffff) {
            // SAFETY: bounds checked by ptr_at.
            let p = unsafe { *p };
            f.sport = u16::from_be_bytes([p[0], p[1]]);
            f.dport = u16::from_be_bytes([p[2], p[3]]);
        }
        if f.proto == PROTO_TCP {
            if let Ok(b) = ptr_at::<u8>(ctx, (l4 & 0xffff) + 13) {
                // SAFETY: bounds checked by ptr_at.
                f.tcp_flags = unsafe { *b };
            }
        }
    }
    f
}

#[inline(always)]
fn matches(f: &TraceFilter, flow: &Flow, d: &Decision) -> bool {
    if f.flags & TRACE_MATCH_CLIENT != 0 && mask_addr(&flow.src, f.client_prefix as u32) != f.client {
        return false;
    }
    if f.flags & TRACE_MATCH_VIP != 0 && flow.dst != f.vip {
        return false;
    }
    if f.flags & TRACE_MATCH_PORT != 0 && flow.dport != f.port {
        return false;
    }
    if f.flags & TRACE_MATCH_PROTO != 0 && flow.proto != f.proto {
        return false;
    }
    if f.flags & TRACE_MATCH_BACKEND != 0 {
        match BACKENDS.get(d.backend) {
            Some(b) if b.addr == f.backend => {}
            _ => return false,
        }
    }
    true
}

/// Takes one record from this CPU's budget for the current second; counts a
/// refusal.
#[inline(always)]
fn within_budget(f: &TraceFilter) -> bool {
    let now = CT_CLOCK.get(0).copied().unwrap_or(0);
    let Some(b) = TRACE_BUDGET.get_ptr_mut(0) else { return false };
    // SAFETY: this CPU's own slot.
    unsafe {
        if (*b).second != now {
            (*b).second = now;
            (*b).used = 0;
        }
        if (*b).used >= f.budget_per_sec {
            (*b).dropped += 1;
            return false;
        }
        (*b).used += 1;
    }
    true
}

/// Writes the record of a packet that matches the filter.
#[inline(always)]
pub fn record(ctx: &XdpContext, f: &TraceFilter, d: &Decision, action: u32, counter: u32) {
    let flow = read_flow(ctx);
    if !matches(f, &flow, d) || !within_budget(f) {
        return;
    }
    let len = (ctx.data_end() - ctx.data()) as u32;
    info!(
        ctx,
        "lbtrace1 {} {:i} {} {:i} {} {} {} {} {} {} {} {} {} {}",
        flow.proto,
        flow.src,
        flow.sport,
        flow.dst,
        flow.dport,
        flow.tcp_flags,
        d.service,
        d.ct,
        d.slot,
        d.persist,
        d.backend,
        action,
        counter,
        len
    );
}
