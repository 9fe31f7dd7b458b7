//! The XDP fast path: LVS-DR style forwarding to a Maglev-chosen backend.
//!
//! Per frame: parse (Ethernet, one 802.1Q tag, IPv4/IPv6, TCP/UDP), one lookup to
//! decide whether the destination is a VIP at all (everything else passes
//! untouched), the service lookup, the connection table, Maglev on a miss, and the
//! MAC rewrite followed by XDP_TX. Every outcome is counted in `STATS`.
#![no_std]
#![feature(core_intrinsics)]
#![feature(asm_experimental_arch)]
#![expect(internal_features, reason = "atomic_xadd: BPF's atomic add (conns.rs)")]
#![no_main]

mod backend;
mod conns;
mod conntrack;
mod decap;
mod forward;
mod frag;
mod icmp;
mod maps;
mod parse;
mod sched;
mod schedule;
mod stats;
mod trace;

use core::mem::MaybeUninit;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{stat, FlowKey, TraceFilter, TraceRecord, RARE_SLOT, RARE_TRACE_SLOT};

use crate::{
    maps::{RARE, RARE_PROGS},
    parse::{Outcome, Packet},
    stats::count,
    trace::Decision,
};

/// The balancer. Errors never escape: each parse failure maps to a counted outcome.
/// Attached while no trace runs: the decision record it fills is never read, so
/// the compiler drops it. ICMP and fragments to a VIP continue in `lb_rare`
/// through a tail call (its own stack frame; the fast path makes no call).
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let v = balance_fast(&ctx);
    if !parse::NO_RARE && v as u32 == RARE_ACTION {
        // SAFETY: a tail call into the program the agent put at index 0; control
        // comes back only when it fails (slot empty).
        unsafe { RARE_PROGS.tail_call(&ctx, RARE_SLOT) };
        count(stat::PASS_NOT_L4);
        return xdp_action::XDP_PASS;
    }
    count((v >> 32) as u32);
    v as u32
}

/// The rare path of `lb_xdp` (tail-called): ICMP errors, echo requests and
/// fragments to a VIP.
#[xdp]
pub fn lb_rare(ctx: XdpContext) -> u32 {
    let v = rare_fast(&ctx);
    count((v >> 32) as u32);
    v as u32
}

/// Action of a packed verdict that asks for the rare path.
const RARE_ACTION: u32 = u32::MAX;

/// An outcome as the XDP action (low half) and its counter (high half): what the
/// calls below return, in a register and fully defined (an `Outcome` returned
/// through memory would carry undefined payload bytes the verifier rejects).
#[inline(always)]
fn packed(outcome: Outcome) -> u64 {
    let (action, counter) = match outcome {
        Outcome::Rare => (RARE_ACTION, 0),
        o => verdict(o),
    };
    (u64::from(counter) << 32) | u64::from(action)
}

/// The balancer for TCP/UDP, a call of its own: ICMP and fragments to a VIP come
/// back as `Outcome::Rare` and go to `rare_fast`, a sibling call, so the two
/// frames never add up on the verifier's 512-byte stack.
#[inline(always)]
fn balance_fast(ctx: &XdpContext) -> u64 {
    let mut d = Decision::new();
    let (mut pkt, mut flow) = (MaybeUninit::uninit(), MaybeUninit::uninit());
    packed(balance::<false>(ctx, &mut d, &mut pkt, &mut flow))
}

/// ICMP and fragments (`icmp.rs`, `frag.rs`): parsed in full and scheduled with
/// their hooks. The packet and flow live in the per-CPU `RARE` entry: this path
/// has more to do and the same stack.
#[inline(always)]
fn rare_fast(ctx: &XdpContext) -> u64 {
    let mut d = Decision::new();
    packed(rare(ctx, &mut d))
}

#[inline(always)]
fn rare(ctx: &XdpContext, d: &mut Decision) -> Outcome {
    let Some(r) = RARE.get_ptr_mut(0) else { return Outcome::Pass(stat::PASS_NOT_L4) };
    // SAFETY: this CPU's entry, used by this program run only.
    let r = unsafe { &mut *r };
    balance::<true>(ctx, d, &mut r.pkt, &mut r.flow)
}

/// `lb_xdp` with the trace hook: the agent swaps it into the XDP link while an
/// `lb-agent trace` runs (and back afterwards), so tracing costs nothing while off.
/// ICMP and fragments to a VIP continue in `lb_rare_trace` (`RARE_PROGS[1]`), as
/// `lb_xdp` continues in `lb_rare`: one program verifying both paths would pass
/// the verifier's million-instruction limit.
#[xdp]
pub fn lb_xdp_trace(ctx: XdpContext) -> u32 {
    let Some(r) = trace::scratch() else {
        // Cannot happen (a one-entry per-CPU array): pass rather than inline a
        // second copy of the balancer.
        count(stat::PASS_NOT_READY);
        return xdp_action::XDP_PASS;
    };
    // The flow first: a tunnel mode rewrites the frame. The filter is looked up
    // again afterwards rather than kept: a pointer-or-null held across the
    // balancer would double the states the verifier walks.
    if trace::active().is_some() {
        trace::read_flow(ctx.data(), ctx.data_end(), r);
    }
    let mut v = balance_call(&ctx, &mut r.decision);
    if v as u32 == RARE_ACTION {
        // SAFETY: a tail call into the program the agent put at index 1; control
        // comes back only when it fails (slot empty).
        unsafe { RARE_PROGS.tail_call(&ctx, RARE_TRACE_SLOT) };
        v = packed(Outcome::Pass(stat::PASS_NOT_L4));
    }
    finish_trace(&ctx, trace::active(), r, v)
}

/// The rare path of `lb_xdp_trace` (tail-called), with the record that
/// `lb_xdp_trace` started in this CPU's scratch entry.
#[xdp]
pub fn lb_rare_trace(ctx: XdpContext) -> u32 {
    let Some(r) = trace::scratch_kept() else {
        count(stat::PASS_NOT_READY);
        return xdp_action::XDP_PASS;
    };
    let v = rare_call(&ctx, &mut r.decision);
    finish_trace(&ctx, trace::active(), r, v)
}

/// Counts a packed verdict, records it when a trace runs, and returns the action.
#[inline(always)]
fn finish_trace(ctx: &XdpContext, filter: Option<&TraceFilter>, r: &mut TraceRecord, v: u64) -> u32 {
    let (action, counter) = (v as u32, (v >> 32) as u32);
    count(counter);
    if let Some(filter) = filter {
        trace::record(ctx, filter, r, action, counter);
    }
    action
}

/// `balance` for `lb_xdp_trace`, inline as in `lb_xdp`: the decision record is in
/// this CPU's `TRACE_SCRATCH` entry, not on the stack (as a BPF-to-BPF call, the
/// verifier walked ~130,000 instructions more).
#[inline(always)]
fn balance_call(ctx: &XdpContext, d: &mut Decision) -> u64 {
    let (mut pkt, mut flow) = (MaybeUninit::uninit(), MaybeUninit::uninit());
    packed(balance::<false>(ctx, d, &mut pkt, &mut flow))
}

/// `rare_fast` with the trace's decision record.
#[inline(never)]
fn rare_call(ctx: &XdpContext, d: &mut Decision) -> u64 {
    packed(rare(ctx, d))
}

/// The XDP action of an outcome and the `STATS` counter it moves.
#[inline(always)]
fn verdict(outcome: Outcome) -> (u32, u32) {
    match outcome {
        Outcome::Pass(reason) => (xdp_action::XDP_PASS, reason),
        Outcome::Drop(reason) => (xdp_action::XDP_DROP, reason),
        Outcome::Tx => (xdp_action::XDP_TX, stat::FORWARDED),
        Outcome::TxAs(reason) => (xdp_action::XDP_TX, reason),
        // Never left over: the entry points run the rare path for it.
        Outcome::Rare => (xdp_action::XDP_PASS, stat::PASS_NOT_L4),
    }
}

/// The real servers' decapsulator (`lb-agent decap`): see `decap.rs`.
#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    decap::run(&ctx)
}

/// Returns XDP_PASS for everything. Attached to the far end of a veth pair so that
/// native-mode XDP_TX frames from the balancer are delivered (veth needs an XDP
/// program on the receiving end to take them).
#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Swaps the source and destination MAC and returns XDP_TX: the cheapest program
/// that still touches the frame. Reference floor for the benchmarks, never
/// attached by the agent.
#[xdp]
pub fn bench_macswap(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: 12 bytes (both MAC addresses) are within bounds.
    let eth = unsafe { &mut *(start as *mut [u8; 12]) };
    for i in 0..6 {
        eth.swap(i, i + 6);
    }
    xdp_action::XDP_TX
}

/// Parse and forward; `FULL`: the rare path (ICMP, fragments), see `parse`.
#[inline(always)]
fn balance<const FULL: bool>(
    ctx: &XdpContext,
    d: &mut Decision,
    pkt: &mut MaybeUninit<Packet>,
    flow: &mut MaybeUninit<FlowKey>,
) -> Outcome {
    if let Err(outcome) = parse::parse::<FULL>(ctx, pkt) {
        return outcome;
    }
    // SAFETY: `parse` wrote the whole packet when it returned Ok.
    let pkt = unsafe { pkt.assume_init_ref() };
    let flow = flow.write(FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        _pad: [0; 3],
    });
    let kind = if FULL { pkt.kind } else { parse::KIND_L4 };
    schedule::forward(ctx, pkt, flow, d, kind)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
