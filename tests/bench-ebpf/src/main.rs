//! Benchmark-only XDP programs for `lb-bench`'s live forwarding rate (never part of
//! the balancer):
//!
//! - `bench_gen`: the traffic generator. Run with `BPF_PROG_TEST_RUN` and
//!   `BPF_F_TEST_XDP_LIVE_FRAMES`, it rewrites the whole frame from `GEN_TEMPLATE`
//!   on every run (the kernel recycles the pages carrying whatever the far side
//!   wrote into them), gives it one of `flows` source ports in turn, and returns
//!   XDP_TX so the frame leaves the generator's interface. In flood mode every
//!   frame is a new flow instead: the source port and the low half of the source
//!   address count up per CPU (the CPU's number in the address), the IPv4
//!   checksum updated to match.
//! - `bench_count`: attached to the generator's interface, counts the IPv4 frames
//!   that come back (forwarded by the program under test) and drops everything.
//!
//! And for the liveness-probe benchmark:
//!
//! - `bench_synack`: stands in for 5,000 remote backends. Every IPv4 TCP SYN (no IP
//!   options) is answered in place with a SYN-ACK (XDP_TX); every other TCP segment
//!   (the probes' RSTs) is dropped; the rest (ARP) goes to the stack. The backends
//!   then cost next to nothing on the machine, as remote ones would.
//! - `bench_pass`: XDP_PASS, for the peer of a veth whose program uses XDP_TX.
//!
//! And for the per-packet cost of tunnel forwarding:
//!
//! - `bench_untunnel`: undoes the balancer's encapsulation of the frame it ran on
//!   last (BPF_PROG_TEST_RUN keeps the rewritten frame between repeats), then
//!   tail-calls the balancer, so a repeated run encapsulates the same client frame
//!   every time. Its own work is the same for every frame (see there).
//!
//! And for the new-flow cost (`lb-bench --newflow-only`):
//!
//! - `bench_newflow`: writes a sequence number into the IPv4 frame's source port
//!   and the low half of its source address, then tail-calls the balancer. Counting
//!   (`NEWFLOW[0]` = 1) makes every repeat of a repeated run a new 5-tuple; fixed
//!   (0) writes the same number every time; counting with a modulus N
//!   (`NEWFLOW[2]`) cycles over N flows (0..N). The same steps in every mode.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::XdpContext,
};

/// Frame length the generator sends; the template holds exactly this many bytes.
pub const FRAME_LEN: usize = 64;
/// Offset of the L4 source port (Ethernet 14 + IPv4 20, no options).
const SPORT_OFF: usize = 34;

/// Generator settings, index 0: `[flows, first source port, mode, 0]`; mode
/// `GEN_FLOOD`: every frame a new flow (`flows` and the port are not used).
#[map]
static GEN_CONFIG: Array<[u32; 4]> = Array::with_max_entries(1, 0);
const GEN_FLOOD: u32 = 1;
/// Offsets of the IPv4 checksum and of the low 16 bits of the source address.
const IP_CSUM_OFF: usize = 24;
const SADDR_LO_OFF: usize = 28;
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
    // SAFETY: per-CPU value, only this CPU's program touches it.
    let n = unsafe {
        let n = *seq;
        *seq = n.wrapping_add(1);
        n
    };
    if cfg[2] == GEN_FLOOD {
        // Source port: the low 16 bits of the count; source address low half:
        // 0x8000 | CPU << 14 | the next 14 bits (2^30 new flows per CPU before a
        // 5-tuple repeats, none equal to a template flow's, whose top bit is 0).
        // SAFETY: a helper without arguments.
        let cpu = unsafe { aya_ebpf::helpers::bpf_get_smp_processor_id() } & 1;
        let lo = (0x8000 | (cpu << 14) | ((n >> 16) & 0x3fff)) as u16;
        // SAFETY: all offsets + 2 <= FRAME_LEN (checked above).
        unsafe {
            let at = |off: usize| (start + off) as *mut [u8; 2];
            let old = u16::from_ne_bytes(at(SADDR_LO_OFF).read_unaligned());
            let new = u16::from_ne_bytes(lo.to_be_bytes());
            let csum = u16::from_ne_bytes(at(IP_CSUM_OFF).read_unaligned());
            let (o, w) = ([old, 0, 0, 0, 0], [new, 0, 0, 0, 0]);
            at(IP_CSUM_OFF).write_unaligned(csum_update(csum, &o, &w).to_ne_bytes());
            at(SADDR_LO_OFF).write_unaligned(lo.to_be_bytes());
            at(SPORT_OFF).write_unaligned((n as u16).to_be_bytes());
        }
        return xdp_action::XDP_TX;
    }
    let flows = if cfg[0] == 0 { 1 } else { cfg[0] };
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

/// One's-complement update of a checksum (RFC 1624) for 16-bit words changed from
/// `old` to `new`; all values as they lie in the packet (any byte order, the same
/// for all).
#[inline(always)]
fn csum_update(csum: u16, old: &[u16; 5], new: &[u16; 5]) -> u16 {
    let mut s = u32::from(!csum);
    for i in 0..5 {
        s += u32::from(!old[i]) + u32::from(new[i]);
    }
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// The 16-bit words of a 4-byte field as they lie in memory.
#[inline(always)]
fn words(b: [u8; 4]) -> [u16; 2] {
    [u16::from_ne_bytes([b[0], b[1]]), u16::from_ne_bytes([b[2], b[3]])]
}

#[xdp]
pub fn bench_synack(ctx: XdpContext) -> u32 {
    const TCP: usize = 34;
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + TCP + 20 > end {
        return xdp_action::XDP_PASS;
    }
    let p = start as *mut u8;
    // SAFETY: the first 54 bytes are within the packet (checked above); all accesses
    // below are at fixed offsets under 54.
    unsafe {
        let at = |off: usize| p.add(off);
        // IPv4, no options, TCP.
        if *(at(12) as *const [u8; 2]) != [0x08, 0x00] || *at(14) != 0x45 || *at(23) != 6 {
            return xdp_action::XDP_PASS;
        }
        let flags = *at(TCP + 13);
        // SYN alone (no ACK, RST or FIN); anything else of TCP is dropped.
        if flags & 0x17 != 0x02 {
            return xdp_action::XDP_DROP;
        }
        let mac = |off: usize| (at(off) as *const [u8; 6]).read_unaligned();
        let (dst, src) = (mac(0), mac(6));
        (at(0) as *mut [u8; 6]).write_unaligned(src);
        (at(6) as *mut [u8; 6]).write_unaligned(dst);
        // Swapping addresses and ports leaves both checksums as they are.
        let four = |off: usize| (at(off) as *const [u8; 4]).read_unaligned();
        let (saddr, daddr, ports) = (four(26), four(30), four(TCP));
        (at(26) as *mut [u8; 4]).write_unaligned(daddr);
        (at(30) as *mut [u8; 4]).write_unaligned(saddr);
        (at(TCP) as *mut [u8; 4]).write_unaligned([ports[2], ports[3], ports[0], ports[1]]);
        // seq := a fixed ISN, ack := the SYN's seq + 1, flags += ACK.
        let (seq, ack) = (four(TCP + 4), four(TCP + 8));
        let new_seq = [0x5e, 0xed, 0x00, 0x01];
        let new_ack = u32::from_be_bytes(seq).wrapping_add(1).to_be_bytes();
        let off_flags = (at(TCP + 12) as *const [u8; 2]).read_unaligned();
        let new_off_flags = [off_flags[0], flags | 0x10];
        (at(TCP + 4) as *mut [u8; 4]).write_unaligned(new_seq);
        (at(TCP + 8) as *mut [u8; 4]).write_unaligned(new_ack);
        (at(TCP + 12) as *mut [u8; 2]).write_unaligned(new_off_flags);
        let (s, a, ns, na) = (words(seq), words(ack), words(new_seq), words(new_ack));
        let old = [s[0], s[1], a[0], a[1], u16::from_ne_bytes(off_flags)];
        let new = [ns[0], ns[1], na[0], na[1], u16::from_ne_bytes(new_off_flags)];
        let csum = (at(TCP + 16) as *const u16).read_unaligned();
        (at(TCP + 16) as *mut u16).write_unaligned(csum_update(csum, &old, &new));
    }
    xdp_action::XDP_TX
}

#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// `bench_untunnel`'s settings, index 0: the client frame's two MACs (12 bytes),
/// then the balancer's tunnel sources, IPv4 (4 bytes) and IPv6 (16 bytes).
#[map]
static UNTUNNEL: Array<[u8; 32]> = Array::with_max_entries(1, 0);
/// Index 0: the balancer program `bench_untunnel` hands the frame to.
#[map]
static UNTUNNEL_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The length of the outer headers the balancer put in front of the client's IP
/// packet (an outer IP header from one of its tunnel sources, and UDP for GUE),
/// or 0 when the frame is not encapsulated (first run, or DR).
#[inline(always)]
fn outer_len(ctx: &XdpContext, cfg: &[u8; 32]) -> i32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 54 > end {
        return 0;
    }
    // SAFETY: the first 54 bytes are within the packet (checked above).
    let f = unsafe { &*(start as *const [u8; 54]) };
    match [f[12], f[13]] {
        [0x08, 0x00] if f[26..30] == cfg[12..16] => 20 + if f[23] == 17 { 8 } else { 0 },
        [0x86, 0xdd] if f[22..38] == cfg[16..32] => 40 + if f[20] == 17 { 8 } else { 0 },
        _ => 0,
    }
}

#[xdp]
pub fn bench_untunnel(ctx: XdpContext) -> u32 {
    let Some(cfg) = UNTUNNEL.get(0) else { return xdp_action::XDP_ABORTED };
    // The same steps for every frame, whether there is something to undo or not
    // (a head adjustment, possibly by 0, and the Ethernet header written), so
    // that the difference between two frames' times is the balancer's alone.
    let shift = outer_len(&ctx, cfg);
    // SAFETY: plain helper call on our context; bounds are re-checked below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, shift) } != 0 {
        return xdp_action::XDP_ABORTED;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 15 > end {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: the first 15 bytes are within the packet (checked above).
    let eth = unsafe { &mut *(start as *mut [u8; 15]) };
    eth[0..12].copy_from_slice(&cfg[0..12]);
    let ethertype = if eth[14] >> 4 == 6 { [0x86, 0xdd] } else { [0x08, 0x00] };
    eth[12..14].copy_from_slice(&ethertype);
    // SAFETY: a tail call; control comes back only when it fails (empty slot).
    unsafe { UNTUNNEL_TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// `bench_restore`'s template, index 0: the frame's first 74 bytes (Ethernet,
/// IPv6 and TCP headers; an IPv4 frame's first 54 fill the front), and at byte 79
/// which length to write back: 1 for 74, 0 for 54.
#[map]
static RESTORE: Array<[u8; 80]> = Array::with_max_entries(1, 0);
/// Index 0: the balancer program `bench_restore` hands the frame to.
#[map]
static RESTORE_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Writes the template's headers over the frame, then tail-calls the balancer:
/// a program that rewrites the frame in place (`nat`, `fullnat`: addresses,
/// ports, checksums, TTL) sees the same frame on every repeat of
/// BPF_PROG_TEST_RUN. The same copy for every mode of a family, so it cancels
/// in their difference.
#[xdp]
pub fn bench_restore(ctx: XdpContext) -> u32 {
    let Some(t) = RESTORE.get(0) else { return xdp_action::XDP_ABORTED };
    let (start, end) = (ctx.data(), ctx.data_end());
    if t[79] != 0 {
        if start + 74 > end {
            return xdp_action::XDP_ABORTED;
        }
        // SAFETY: 74 bytes within the packet (checked above), from the map value.
        unsafe { *(start as *mut [u8; 74]) = *(t.as_ptr() as *const [u8; 74]) };
    } else {
        if start + 54 > end {
            return xdp_action::XDP_ABORTED;
        }
        // SAFETY: as above, 54 bytes.
        unsafe { *(start as *mut [u8; 54]) = *(t.as_ptr() as *const [u8; 54]) };
    }
    // SAFETY: a tail call; control comes back only when it fails (empty slot).
    unsafe { RESTORE_TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// `bench_newflow`'s settings and state, shared by all CPUs (the benchmark runs
/// one repeated run at a time): index 0 the step (0 or 1), index 1 the sequence,
/// index 2 the modulus (0: none; N: with step 1 the sequence cycles 0..N).
#[map]
static NEWFLOW: Array<u32> = Array::with_max_entries(3, 0);
/// Index 0: the balancer program `bench_newflow` hands the frame to.
#[map]
static NEWFLOW_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[xdp]
pub fn bench_newflow(ctx: XdpContext) -> u32 {
    let (Some(step), Some(modulus), Some(seq)) = (NEWFLOW.get(0), NEWFLOW.get(2), NEWFLOW.get_ptr_mut(1)) else {
        return xdp_action::XDP_ABORTED;
    };
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + SPORT_OFF + 2 > end {
        return xdp_action::XDP_ABORTED;
    }
    // The same compare whatever the modulus: with 0 it is true only when the
    // sequence wraps, where n is 0 already.
    // SAFETY: an element of an array map; the benchmark runs one run at a time.
    let n = unsafe {
        let mut n = (*seq).wrapping_add(*step);
        if n == *modulus {
            n = 0;
        }
        *seq = n;
        n
    };
    // SAFETY: both offsets are within the first SPORT_OFF + 2 bytes (checked above).
    unsafe {
        *((start + SPORT_OFF) as *mut [u8; 2]) = (n as u16).to_be_bytes();
        *((start + SADDR_LO_OFF) as *mut [u8; 2]) = ((n >> 16) as u16).to_be_bytes();
    }
    // SAFETY: a tail call; control comes back only when it fails (empty slot).
    unsafe { NEWFLOW_TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
