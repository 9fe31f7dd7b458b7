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
mod first;
mod flood;
mod forward;
mod frag;
mod icmp;
mod maps;
mod parse;
mod sched;
mod schedule;
mod stats;
mod syn_filter;
mod trace;

use core::mem::MaybeUninit;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    stat, FlowKey, TraceFilter, TraceRecord, CONFIG_FULLNAT, CONFIG_NAT, NAT_REPLY_SLOT, NAT_SLOT, PREFIX_SLOT, RARE_SLOT,
    RARE_TRACE_SLOT,
};

use crate::{
    maps::{CONFIG, RARE, RARE_PROGS},
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
    if v as u32 == RARE_ACTION {
        // SAFETY: a tail call into the program the agent put at index 0
        // (`lb_rare`) or 2 (`lb_prefix`); control comes back only when it
        // fails (slot empty).
        let (slot, counter) = other_program(v);
        unsafe { RARE_PROGS.tail_call(&ctx, slot) };
        count(counter);
        return xdp_action::XDP_PASS;
    }
    if is_nat(v) {
        forward::nat::stash(v);
        // SAFETY: as above, into `lb_nat` (`forward/nat.rs`).
        unsafe { RARE_PROGS.tail_call(&ctx, NAT_SLOT) };
        count(stat::PASS_NOT_READY);
        return xdp_action::XDP_PASS;
    }
    let counter = (v >> 32) as u32;
    if counter == stat::PASS_NOT_VIP && nat_on() {
        // SAFETY: as above, into `lb_nat_reply`; on failure the frame passes.
        unsafe { RARE_PROGS.tail_call(&ctx, NAT_REPLY_SLOT) };
    }
    emit(&ctx, v as u32, counter)
}

/// Counts a verdict and returns its XDP action, redirecting the frame first when
/// its backend is on another interface (`forward/egress.rs`).
#[inline(always)]
fn emit(ctx: &XdpContext, action: u32, counter: u32) -> u32 {
    let (action, counter) = forward::egress::send(ctx, action, counter);
    count(counter);
    action
}

/// The packed verdict of a frame to no exact VIP.
const NOT_VIP: u64 = ((stat::PASS_NOT_VIP as u64) << 32) | xdp_action::XDP_PASS as u64;

/// Counter half of a `RARE_ACTION` verdict for `lb_prefix` (0: `lb_rare`).
const TO_PREFIX: u32 = 1;

/// Where a `RARE_ACTION` verdict continues (`RARE_PROGS` slot) and what is
/// counted when that slot is empty.
#[inline(always)]
fn other_program(v: u64) -> (u32, u32) {
    if (v >> 32) as u32 == TO_PREFIX {
        (PREFIX_SLOT, stat::PASS_NOT_VIP)
    } else {
        (RARE_SLOT, stat::PASS_NOT_L4)
    }
}

/// Prefix services (tail-called from `lb_xdp` and `lb_xdp_trace` for frames to
/// no exact VIP while `CONFIG_PREFIX` is set): the longest-prefix lookup in
/// `PREFIX_SERVICES`, then the balancer as in `lb_xdp`. ICMP and fragments to
/// a prefix service are passed (the rare path serves exact VIPs only); frames
/// `lb_xdp_trace` sends here are not traced.
#[xdp]
pub fn lb_prefix(ctx: XdpContext) -> u32 {
    let mut d = Decision::new();
    let (mut pkt, mut flow) = (MaybeUninit::uninit(), MaybeUninit::uninit());
    let mut v = packed(balance::<false, true>(&ctx, &mut d, &mut pkt, &mut flow));
    if v as u32 == RARE_ACTION {
        v = NOT_VIP;
    }
    if v == NOT_VIP && nat_on() {
        // SAFETY: a tail call into `lb_nat_reply` (a frame to no VIP and no
        // prefix may be a `nat` reply); on failure the frame passes.
        unsafe { RARE_PROGS.tail_call(&ctx, NAT_REPLY_SLOT) };
    }
    emit(&ctx, v as u32, (v >> 32) as u32)
}

/// Whether a `nat` or `fullnat` service exists, so that frames to no VIP may be
/// replies to translate (`CONFIG_NAT`, `CONFIG_FULLNAT`): one array read, only for
/// frames that pass.
#[inline(always)]
fn nat_on() -> bool {
    CONFIG.get(0).is_some_and(|c| c.flags & (CONFIG_NAT | CONFIG_FULLNAT) != 0)
}

/// `nat` and `fullnat` forwarding, the client-to-backend direction (tail-called
/// from `lb_xdp` and `lb_xdp_trace` with the decision in `NAT_STASH`): see
/// `forward/nat.rs`, `forward/fullnat.rs`.
#[xdp]
pub fn lb_nat(ctx: XdpContext) -> u32 {
    // An established flow's TCP/UDP packet first, on its lean path
    // (`forward/nat_est.rs`); what that path leaves (`nat_est::FULL_PATH`) and
    // everything else takes the full one. Each path a call of its own, so
    // that neither's stack adds to the other's (`fullnat` makes calls of its
    // own: the chain must fit 512 bytes).
    let v = forward::nat_est::run(&ctx);
    if v != forward::nat_est::FULL_PATH {
        return emit(&ctx, v as u32, (v >> 32) as u32);
    }
    let rare = forward::nat::rare_stashed();
    let v = if rare & forward::nat_icmp::ICMP_ERROR != 0 {
        nat_icmp_call(&ctx)
    } else if rare != 0 {
        forward::nat_frag::run(&ctx)
    } else if forward::fullnat::stashed() {
        forward::fullnat::run(&ctx)
    } else {
        nat_call(&ctx)
    };
    emit(&ctx, v as u32, (v >> 32) as u32)
}

/// The ICMP error path of `lb_nat` (`forward/nat_icmp.rs`).
#[inline(never)]
fn nat_icmp_call(ctx: &XdpContext) -> u64 {
    packed(forward::nat::icmp(ctx))
}

/// The `nat` path of `lb_nat`.
#[inline(never)]
fn nat_call(ctx: &XdpContext) -> u64 {
    packed(forward::nat::forward(ctx))
}

/// `nat` and `fullnat` forwarding, the backend-to-client direction: see
/// `forward/nat_reply.rs`, `forward/fullnat.rs`.
#[xdp]
pub fn lb_nat_reply(ctx: XdpContext) -> u32 {
    // `fullnat` replies first (a call, as in `lb_nat`), then `nat`'s, each only
    // while such a service exists, `fullnat`'s only for frames to what may be a
    // SNAT address (`maybe_snat`: a `nat` reply, to a client, skips that
    // lookup); a frame that is neither's reply may be a fragment of one, or an
    // ICMP error about a packet sent to a backend of either (calls of their own:
    // within `nat_reply_call` they would pass the 512-byte stack).
    let flags = CONFIG.get(0).map_or(0, |c| c.flags);
    let mut v = forward::fullnat::NOT_FULLNAT;
    if flags & CONFIG_FULLNAT != 0 && forward::fullnat::maybe_snat(&ctx) {
        v = forward::fullnat::reply_call(&ctx);
    }
    if v == forward::fullnat::NOT_FULLNAT && flags & CONFIG_NAT != 0 {
        v = nat_reply_call(&ctx);
    }
    if v == forward::fullnat::NOT_FULLNAT {
        // A fragment of a reply (`forward/nat_frag.rs`), else maybe an ICMP error.
        v = if forward::nat_frag::is_fragment(&ctx) { forward::nat_frag::reply(&ctx) } else { nat_icmp_reply_call(&ctx) };
    }
    // Two-arm, a reply goes back to the client's interface (redirected).
    emit(&ctx, v as u32, (v >> 32) as u32)
}

/// The `nat` path of `lb_nat_reply` (`NOT_FULLNAT`: no TCP/UDP packet, which
/// `reply` says with `Outcome::Rare`).
#[inline(never)]
fn nat_reply_call(ctx: &XdpContext) -> u64 {
    forward::nat_reply::reply(ctx)
}

const _: () = assert!(forward::fullnat::NOT_FULLNAT == RARE_ACTION as u64, "packed(Outcome::Rare) is NOT_FULLNAT");

/// The ICMP error path of `lb_nat_reply` (`forward/nat_icmp.rs`).
#[inline(never)]
fn nat_icmp_reply_call(ctx: &XdpContext) -> u64 {
    forward::nat_icmp::to_client(ctx)
}

/// The rare path of `lb_xdp` (tail-called): ICMP errors, echo requests and
/// fragments to a VIP. An ICMP error about a `nat` flow continues in `lb_nat`.
#[xdp]
pub fn lb_rare(ctx: XdpContext) -> u32 {
    let v = rare_fast(&ctx);
    if is_nat(v) {
        // An ICMP error about a `nat` flow: translated in `lb_nat`
        // (`forward/nat_icmp.rs`).
        return to_nat(&ctx, v);
    }
    emit(&ctx, v as u32, (v >> 32) as u32)
}

/// Stores a `NAT_ACTION` verdict's word and tail-calls `lb_nat`; counted
/// `pass_not_ready` and passed if that slot is empty.
#[inline(always)]
fn to_nat(ctx: &XdpContext, v: u64) -> u32 {
    forward::nat::stash(v);
    // SAFETY: a tail call into `lb_nat`; control comes back only when it fails.
    unsafe { RARE_PROGS.tail_call(ctx, NAT_SLOT) };
    count(stat::PASS_NOT_READY);
    xdp_action::XDP_PASS
}

/// Action of a packed verdict that asks for the rare path.
pub(crate) const RARE_ACTION: u32 = u32::MAX;
/// Action of a packed verdict that asks for `lb_nat`: its top 7 bits; bit 24
/// says the backend is a `fullnat` one (`forward::nat::FULLNAT_MARK`), the low
/// 24 bits carry the flow's `FlowVal::snat` (`is_nat`).
const NAT_ACTION: u32 = 0xfc00_0000;

/// Whether a packed verdict asks for `lb_nat` (neither an XDP action nor
/// `RARE_ACTION`).
#[inline(always)]
fn is_nat(v: u64) -> bool {
    v as u32 & 0xfe00_0000 == NAT_ACTION
}

/// An outcome as the XDP action (low half) and its counter (high half): what the
/// calls below return, in a register and fully defined (an `Outcome` returned
/// through memory would carry undefined payload bytes the verifier rejects).
#[inline(always)]
fn packed(outcome: Outcome) -> u64 {
    let (action, counter) = match outcome {
        Outcome::Rare => (RARE_ACTION, 0),
        Outcome::Prefix => (RARE_ACTION, TO_PREFIX),
        Outcome::Nat(word, snat) => (NAT_ACTION | snat & (forward::nat::FULLNAT_MARK | 0xff_ffff), word),
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
    packed(balance::<false, false>(ctx, &mut d, &mut pkt, &mut flow))
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
    match balance::<true, false>(ctx, d, &mut r.pkt, &mut r.flow) {
        // ICMP and fragments to a prefix service are not balanced.
        Outcome::Prefix => Outcome::Pass(stat::PASS_NOT_VIP),
        o => o,
    }
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
        // SAFETY: a tail call into the program the agent put at index 1
        // (`lb_rare_trace`) or 2 (`lb_prefix`, which records no trace); control
        // comes back only when it fails (slot empty).
        let (slot, counter) = other_program(v);
        let slot = if slot == RARE_SLOT { RARE_TRACE_SLOT } else { slot };
        unsafe { RARE_PROGS.tail_call(&ctx, slot) };
        v = packed(Outcome::Pass(counter));
    }
    // `nat` packets continue in the untraced `lb_nat` / `lb_nat_reply`: they are
    // counted, not recorded.
    if is_nat(v) {
        forward::nat::stash(v);
        // SAFETY: as above, into `lb_nat`.
        unsafe { RARE_PROGS.tail_call(&ctx, NAT_SLOT) };
        v = packed(Outcome::Pass(stat::PASS_NOT_READY));
    }
    if (v >> 32) as u32 == stat::PASS_NOT_VIP && nat_on() {
        // SAFETY: as above, into `lb_nat_reply`.
        unsafe { RARE_PROGS.tail_call(&ctx, NAT_REPLY_SLOT) };
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
    if is_nat(v) {
        // As in `lb_rare`; counted, not recorded (as `lb_xdp_trace`'s `nat`
        // packets).
        return to_nat(&ctx, v);
    }
    finish_trace(&ctx, trace::active(), r, v)
}

/// Counts a packed verdict, records it when a trace runs, and returns the action.
#[inline(always)]
fn finish_trace(ctx: &XdpContext, filter: Option<&TraceFilter>, r: &mut TraceRecord, v: u64) -> u32 {
    let (action, counter) = forward::egress::send(ctx, v as u32, (v >> 32) as u32);
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
    packed(balance::<false, false>(ctx, d, &mut pkt, &mut flow))
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
        // XDP_TX, or a redirect `emit` carries out.
        Outcome::Out(e) => (forward::egress::action(e), stat::FORWARDED),
        Outcome::TxAs(reason) => (xdp_action::XDP_TX, reason),
        // Never left over: the entry points run the rare path or `lb_nat` for them.
        Outcome::Rare => (xdp_action::XDP_PASS, stat::PASS_NOT_L4),
        Outcome::Prefix => (xdp_action::XDP_PASS, stat::PASS_NOT_VIP),
        Outcome::Nat(..) => (xdp_action::XDP_PASS, stat::PASS_NOT_READY),
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

/// Parse and forward; `FULL`: the rare path (ICMP, fragments), see `parse`;
/// `PREFIX`: prefix services (`lb_prefix`), see `schedule::forward`.
#[inline(always)]
fn balance<const FULL: bool, const PREFIX: bool>(
    ctx: &XdpContext,
    d: &mut Decision,
    pkt: &mut MaybeUninit<Packet>,
    flow: &mut MaybeUninit<FlowKey>,
) -> Outcome {
    if let Err(outcome) = parse::parse::<FULL, PREFIX>(ctx, pkt) {
        return outcome;
    }
    // SAFETY: `parse` wrote the whole packet when it returned Ok.
    let pkt = unsafe { pkt.assume_init_ref() };
    // SAFETY: the whole key written as five 64-bit words (`FlowKey` is aligned
    // to 8 and 40 bytes long; ports, protocol and the zero padding make the
    // last word). Written field by field, the addresses were 32 byte stores,
    // and every hash that read the key back in 2-, 4- or 8-byte words (the
    // kernel's `CT_ESTABLISHED` lookup, `syn_filter::hash_of`) waited for them
    // to reach the cache (a load spanning two stores is not forwarded): a new
    // flow's SYN -17 to -29 ns (`lb-bench --newflow-only`, interleaved).
    let flow = unsafe {
        let w = flow.as_mut_ptr().cast::<u64>();
        let word = |a: &[u8; 16], i: usize| {
            u64::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3], a[i + 4], a[i + 5], a[i + 6], a[i + 7]])
        };
        w.write(word(&pkt.src, 0));
        w.add(1).write(word(&pkt.src, 8));
        w.add(2).write(word(&pkt.dst, 0));
        w.add(3).write(word(&pkt.dst, 8));
        // Little-endian (bpfel, checked below): sport, dport, proto at bytes
        // 32, 34 and 36.
        w.add(4).write(u64::from(pkt.sport) | (u64::from(pkt.dport) << 16) | (u64::from(pkt.proto) << 32));
        flow.assume_init_ref()
    };
    let kind = if FULL { pkt.kind } else { parse::KIND_L4 };
    schedule::forward::<PREFIX>(ctx, pkt, flow, d, kind)
}

const _: () = assert!(cfg!(target_endian = "little"), "balance writes the flow key as little-endian words");

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
