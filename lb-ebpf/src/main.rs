//! The XDP fast path: LVS-DR style forwarding to a Maglev-chosen backend.
//!
//! Per frame: parse (Ethernet, one 802.1Q tag, IPv4/IPv6, TCP/UDP), one lookup to
//! decide whether the destination is a VIP at all (everything else passes
//! untouched), the service lookup, the connection table, Maglev on a miss, and the
//! MAC rewrite followed by XDP_TX. Every outcome is counted in `STATS`.
#![no_std]
#![no_main]

mod backend;
mod conntrack;
mod maps;
mod parse;
mod schedule;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{stat, FlowKey};

use crate::{parse::Outcome, stats::count};

/// The balancer. Errors never escape: each parse failure maps to a counted outcome.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match balance(&ctx) {
        Outcome::Pass(reason) => {
            count(reason);
            xdp_action::XDP_PASS
        }
        Outcome::Drop(reason) => {
            count(reason);
            xdp_action::XDP_DROP
        }
        Outcome::Tx => {
            count(stat::FORWARDED);
            xdp_action::XDP_TX
        }
    }
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
fn balance(ctx: &XdpContext) -> Outcome {
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
    schedule::forward(ctx, &flow, pkt.syn, pkt.fin)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
