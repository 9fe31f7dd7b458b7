//! `lb-agent trace`: one aya-log record per packet that matches the agent's filter
//! (`TRACE_FILTER`), within a per-second budget (`TRACE_BUDGET`), describing every
//! decision the program made for it. Only `lb_xdp_trace` calls this; the agent
//! attaches it only while a trace runs.

use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::info;
pub use lb_common::trace::Decision;
use lb_common::{mask_addr, trace::*, v4_mapped, TraceFilter, TraceRecord, PROTO_TCP, PROTO_UDP};

use crate::maps::{BACKENDS, CT_CLOCK, TRACE_BUDGET, TRACE_FILTER, TRACE_SCRATCH};

/// The running trace's filter, if any.
#[inline(always)]
pub fn active() -> Option<&'static TraceFilter> {
    match TRACE_FILTER.get(0) {
        Some(f) if f.flags & TRACE_ON != 0 => Some(f),
        _ => None,
    }
}

/// This CPU's record, reset: `lb_xdp_trace` fills it in place.
#[inline(always)]
pub fn scratch() -> Option<&'static mut TraceRecord> {
    let r = TRACE_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's own slot, used by one packet at a time.
    let r = unsafe { &mut *r };
    *r = TraceRecord { decision: Decision::new(), ..TraceRecord::default() };
    Some(r)
}

/// This CPU's record as `lb_xdp_trace` left it (for `lb_rare_trace`, which it
/// tail-called).
#[inline(always)]
pub fn scratch_kept() -> Option<&'static mut TraceRecord> {
    let r = TRACE_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's own slot, used by one packet at a time.
    Some(unsafe { &mut *r })
}

/// `N` bytes at `offset` of the frame `[data, end)`, bounds-checked.
#[inline(always)]
fn at<const N: usize>(data: usize, end: usize, offset: usize) -> Option<&'static [u8; N]> {
    if data + offset + N > end {
        return None;
    }
    // SAFETY: bounds checked just above.
    Some(unsafe { &*((data + offset) as *const [u8; N]) })
}

/// Reads the frame's flow into `r`, as far as it goes (for frames that stop
/// early too). Called before the balancer runs: a tunnel mode rewrites the frame.
/// Takes the frame's bounds as 64-bit values rather than the context (LLVM would
/// pass the context's 32-bit fields and widen them with shifts, which the verifier
/// refuses on a packet pointer), and reads only at constant offsets; the ports of
/// an IPv4 packet with options are not read (shown as 0). `scratch` cleared `r`.
#[inline(never)]
pub fn read_flow(data: usize, end: usize, r: &mut TraceRecord) {
    let Some(eth) = at::<14>(data, end, 0) else { return };
    let ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        if let Some(t) = at::<2>(data, end, 16) {
            read_l3::<18>(data, end, r, u16::from_be_bytes(*t));
        }
    } else {
        read_l3::<14>(data, end, r, ethertype);
    }
}

#[inline(always)]
fn read_l3<const L3: usize>(data: usize, end: usize, r: &mut TraceRecord, ethertype: u16) {
    match ethertype {
        0x0800 => {
            let Some(h) = at::<20>(data, end, L3) else { return };
            r.src = v4_mapped([h[12], h[13], h[14], h[15]]);
            r.dst = v4_mapped([h[16], h[17], h[18], h[19]]);
            r.proto = h[9];
            if h[0] & 0x0f == 5 {
                read_l4(data, end, r, L3 + 20);
            }
        }
        0x86dd => {
            let Some(h) = at::<40>(data, end, L3) else { return };
            r.src.copy_from_slice(&h[8..24]);
            r.dst.copy_from_slice(&h[24..40]);
            r.proto = h[6];
            read_l4(data, end, r, L3 + 40);
        }
        _ => {}
    }
}

/// `l4` is a constant once inlined into `read_l3::<L3>`.
#[inline(always)]
fn read_l4(data: usize, end: usize, r: &mut TraceRecord, l4: usize) {
    if r.proto != PROTO_TCP && r.proto != PROTO_UDP {
        return;
    }
    if let Some(p) = at::<4>(data, end, l4) {
        r.sport = u16::from_be_bytes([p[0], p[1]]);
        r.dport = u16::from_be_bytes([p[2], p[3]]);
    }
    if r.proto == PROTO_TCP {
        if let Some(b) = at::<14>(data, end, l4) {
            r.tcp_flags = b[13];
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

/// Writes the record `r` (whose flow `read_flow` and whose decision the program
/// filled) if the packet matches the filter. Not inlined, and the record is in a map, not on the stack:
/// the balancer's frame and this one share the verifier's 512 bytes.
#[inline(never)]
pub fn record(ctx: &XdpContext, f: &TraceFilter, r: &mut TraceRecord, action: u32, counter: u32) {
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
