//! `lb-agent trace`: one aya-log record per packet that matches the agent's filter
//! (`TRACE_FILTER`), within a per-second budget (`TRACE_BUDGET`), describing every
//! decision the program made for it. Only `lb_xdp_trace` calls this; the agent
//! attaches it only while a trace runs.

use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::info;
pub use lb_common::trace::Decision;
use lb_common::{mask_addr, trace::*, v4_mapped, TraceFilter, TraceRecord, PROTO_TCP, PROTO_UDP};

use crate::{
    maps::{BACKENDS, CT_CLOCK, TRACE_BUDGET, TRACE_FILTER, TRACE_SCRATCH},
    parse::{ptr_at, read_be16},
};

/// The running trace's filter, if any.
#[inline(always)]
pub fn active() -> Option<&'static TraceFilter> {
    match TRACE_FILTER.get(0) {
        Some(f) if f.flags & TRACE_ON != 0 => Some(f),
        _ => None,
    }
}

/// This CPU's record, its decision reset: `lb_xdp_trace` fills it in place.
#[inline(always)]
pub fn scratch() -> Option<&'static mut TraceRecord> {
    let r = TRACE_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's own slot, used by one packet at a time.
    let r = unsafe { &mut *r };
    r.decision = Decision::new();
    Some(r)
}

/// Reads the frame's flow into `r`, as far as it goes (for frames that stopped
/// early too).
#[inline(always)]
fn read_flow(ctx: &XdpContext, r: &mut TraceRecord) {
    r.src = [0; 16];
    r.dst = [0; 16];
    r.proto = 0;
    r.sport = 0;
    r.dport = 0;
    r.tcp_flags = 0;
    let Ok(mut ethertype) = read_be16(ctx, 12) else { return };
    let mut l3 = 14;
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        let Ok(t) = read_be16(ctx, 16) else { return };
        ethertype = t;
        l3 += 4;
    }
    let l4 = match ethertype {
        0x0800 => {
            let Ok(h) = ptr_at::<[u8; 20]>(ctx, l3) else { return };
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*h };
            r.src = v4_mapped([h[12], h[13], h[14], h[15]]);
            r.dst = v4_mapped([h[16], h[17], h[18], h[19]]);
            r.proto = h[9];
            l3 + ((h[0] & 0x0f) as usize) * 4
        }
        0x86dd => {
            let Ok(h) = ptr_at::<[u8; 40]>(ctx, l3) else { return };
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*h };
            r.src.copy_from_slice(&h[8..24]);
            r.dst.copy_from_slice(&h[24..40]);
            r.proto = h[6];
            l3 + 40
        }
        _ => return,
    };
    if r.proto == PROTO_TCP || r.proto == PROTO_UDP {
        if let Ok(p) = ptr_at::<[u8; 4]>(ctx, l4 & 0xff) {
            // SAFETY: bounds checked by ptr_at.
            let p = unsafe { *p };
            r.sport = u16::from_be_bytes([p[0], p[1]]);
            r.dport = u16::from_be_bytes([p[2], p[3]]);
        }
        if r.proto == PROTO_TCP {
            if let Ok(b) = ptr_at::<u8>(ctx, (l4 & 0xff) + 13) {
                // SAFETY: bounds checked by ptr_at.
                r.tcp_flags = unsafe { *b };
            }
        }
    }
}

#[inline(always)]
fn matches(f: &TraceFilter, r: &TraceRecord) -> bool {
    if f.flags & TRACE_MATCH_CLIENT != 0 && mask_addr(&r.src, f.client_prefix as u32) != f.client {
        return false;
    }
    if f.flags & TRACE_MATCH_VIP != 0 && r.dst != f.vip {
        return false;
    }
    if f.flags & TRACE_MATCH_PORT != 0 && r.dport != f.port {
        return false;
    }
    if f.flags & TRACE_MATCH_PROTO != 0 && r.proto != f.proto {
        return false;
    }
    if f.flags & TRACE_MATCH_BACKEND != 0 {
        match BACKENDS.get(r.decision.backend) {
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

/// Writes the record `r` (whose decision the program filled) if the packet
/// matches the filter. Not inlined, and the record is in a map, not on the stack:
/// the balancer's frame and this one share the verifier's 512 bytes.
#[inline(never)]
pub fn record(ctx: &XdpContext, f: &TraceFilter, r: &mut TraceRecord, action: u32, counter: u32) {
    read_flow(ctx, r);
    if !matches(f, r) || !within_budget(f) {
        return;
    }
    r.action = action;
    r.counter = counter;
    r.len = (ctx.data_end() - ctx.data()) as u32;
    // SAFETY: a plain-data struct viewed as its bytes.
    let bytes: &[u8] = unsafe {
        core::slice::from_raw_parts(r as *const TraceRecord as *const u8, core::mem::size_of::<TraceRecord>())
    };
    info!(ctx, "lbtrace2 {:x}", bytes);
}
