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
mod maps;
mod parse;
mod sched;
mod schedule;
mod stats;
mod trace;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{stat, FlowKey};

use crate::{parse::Outcome, stats::count, trace::Decision};

/// The balancer. Errors never escape: each parse failure maps to a counted outcome.
/// Attached while no trace runs: the decision record it fills is never read, so
/// the compiler drops it.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let mut d = Decision::new();
    let (action, counter) = verdict(balance(&ctx, &mut d));
    count(counter);
    action
}

/// `lb_xdp` with the trace hook: the agent swaps it into the XDP link while an
/// `lb-agent trace` runs (and back afterwards), so tracing costs nothing while off.
#[xdp]
pub fn lb_xdp_trace(ctx: XdpContext) -> u32 {
    let Some(r) = trace::scratch() else {
        // Cannot happen (a one-entry per-CPU array): pass rather than inline a
        // second copy of the balancer.
        count(stat::PASS_NOT_READY);
        return xdp_action::XDP_PASS;
    };
    let (action, counter) = verdict(balance_call(&ctx, &mut r.decision));
    count(counter);
    if let Some(filter) = trace::active() {
        trace::record(&ctx, filter, r, action, counter);
    }
    action
}

/// `balance` as a call of its own (BPF-to-BPF) for `lb_xdp_trace`: the verifier
/// allows 512 bytes of stack for a whole call chain, and the balancer's frame plus
/// the trace record's would not fit in one frame.
#[inline(never)]
fn balance_call(ctx: &XdpContext, d: &mut Decision) -> Outcome {
    balance(ctx, d)
}

/// The XDP action of an outcome and the `STATS` counter it moves.
#[inline(always)]
fn verdict(outcome: Outcome) -> (u32, u32) {
    match outcome {
        Outcome::Pass(reason) => (xdp_action::XDP_PASS, reason),
        Outcome::Drop(reason) => (xdp_action::XDP_DROP, reason),
        Outcome::Tx => (xdp_action::XDP_TX, stat::FORWARDED),
        Outcome::TxAs(reason) => (xdp_action::XDP_TX, reason),
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

#[inline(always)]
fn balance(ctx: &XdpContext, d: &mut Decision) -> Outcome {
    let pkt = match parse::parse(ctx) {
        Ok(pkt) => pkt,
        Err(outcome) => return outcome,
    };
    let flow = FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    schedule::forward(ctx, &pkt, &flow, d)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
