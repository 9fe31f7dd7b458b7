//! Benchmark-only XDP programs for `lb-bench`'s live forwarding rate (never part of
//! the balancer):
//!
//! - `bench_gen`: the traffic generator. Run with `BPF_PROG_TEST_RUN` and
//!   `BPF_F_TEST_XDP_LIVE_FRAMES`, it rewrites the whole frame from `GEN_TEMPLATE`
//!   on every run (the kernel recycles the pages carrying whatever the far side
//!   wrote into them), gives it one of `flows` source ports in turn, and returns
//!   XDP_TX so the frame leaves the generator's interface.
//! - `bench_count`: attached to the generator's interface, counts the IPv4 frames
//!   that come back (forwarded by the program under test) and drops everything.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};

/// Frame length the generator sends; the template holds exactly this many bytes.
pub const FRAME_LEN: usize = 64;
/// Offset of the L4 source port (Ethernet 14 + IPv4 20, no options).
const SPORT_OFF: usize = 34;

/// Generator settings, index 0: `[flows, first source port]`.
#[map]
static GEN_CONFIG: Array<[u32; 2]> = Array::with_max_entries(1, 0);
/// The frame, index 0, as eight 64-bit words.
#[map]
static GEN_TEMPLATE: Array<[u64; FRAME_LEN / 8]> = Array::with_max_entries(1, 0);
/// Per-CPU sequence number of the generator (picks the flow).
#[map]
static GEN_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
/// Per-CPU count of IPv4 frames seen by `bench_count`, index 0.
#[map]
static COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + FRAME_LEN > end {
        return xdp_action::XDP_ABORTED;
    }
    let (Some(cfg), Some(tpl), Some(seq)) = (
        GEN_CONFIG.get(0),
        GEN_TEMPLATE.get(0),
        GEN_SEQ.get_ptr_mut(0),
    ) else {
        return xdp_action::XDP_ABORTED;
    };
    let frame = start as *mut u64;
    for (i, w) in tpl.iter().enumerate() {
        // SAFETY: FRAME_LEN bytes are within the packet (checked above).
        unsafe { frame.add(i).write_unaligned(*w) };
    }
    let flows = if cfg[0] == 0 { 1 } else { cfg[0] };
    // SAFETY: per-CPU value, only this CPU's program touches it.
    let n = unsafe {
        let n = *seq;
        *seq = n.wrapping_add(1);
        n
    };
    let sport = (cfg[1].wrapping_add(n % flows) as u16).to_be_bytes();
    // SAFETY: SPORT_OFF + 2 <= FRAME_LEN.
    unsafe { ((start + SPORT_OFF) as *mut [u8; 2]).write_unaligned(sport) };
    xdp_action::XDP_TX
}

#[xdp]
pub fn bench_count(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 14 <= ctx.data_end() {
        // SAFETY: the 14-byte Ethernet header is within the packet.
        let ethertype = unsafe { *((start + 12) as *const [u8; 2]) };
        if ethertype == [0x08, 0x00]
            && let Some(c) = COUNT.get_ptr_mut(0)
        {
            // SAFETY: per-CPU value.
            unsafe { *c += 1 };
        }
    }
    xdp_action::XDP_DROP
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
