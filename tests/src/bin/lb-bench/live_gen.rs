//! The live benchmark's generator: `bench_gen`'s frame templates and settings,
//! and sending frames from inside the generator's namespace (see `live`).

use std::time::Instant;

use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{ProgramInfo, TestRun, TestRunAttrs, TestRunOptions, Xdp},
};
use lb_tests::netns;

use crate::{
    live::Kind,
    live_flows,
    topo::{B0_MAC, CLIENT, G0_MAC, VIP, VIP_PORT},
};

pub const FRAME_LEN: usize = 64;
const FIRST_SPORT: u32 = 10_000;
/// `GEN_CONFIG` mode of `bench_gen`: every frame a new flow.
const GEN_FLOOD: u32 = 1;
/// Frames per BPF_PROG_TEST_RUN call (the kernel sends them in batches of `BATCH`).
const CHUNK: u32 = 1 << 16;
const BATCH: u32 = 64;
/// Upper bound on the send rate, to bound the frames of one run.
const MAX_PPS: f64 = 20e6;

/// The generator's frame: IPv4 UDP from CLIENT to the VIP, valid IP checksum, UDP
/// checksum 0 (none), padded to 64 bytes.
pub fn template() -> [u8; FRAME_LEN] {
    udp_template(VIP_PORT)
}

/// `template` to the VIP's `port`.
fn udp_template(port: u16) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&B0_MAC);
    f[6..12].copy_from_slice(&G0_MAC);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (FRAME_LEN - 14) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&CLIENT.octets());
    ip[16..20].copy_from_slice(&VIP.octets());
    let sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f[34..36].copy_from_slice(&(FIRST_SPORT as u16).to_be_bytes());
    f[36..38].copy_from_slice(&port.to_be_bytes());
    f[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f
}

pub fn xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut Xdp {
    ebpf.program_mut(name)
        .unwrap_or_else(|| panic!("{name} in the object"))
        .try_into()
        .expect("XDP program")
}

pub(crate) fn frames_counted(bench: &Ebpf) -> u64 {
    let m: PerCpuArray<_, u64> =
        PerCpuArray::try_from(bench.map("COUNT").expect("COUNT")).expect("per-CPU array");
    m.get(&0, 0).expect("COUNT[0]").iter().sum()
}

/// Points the generator at `kind`'s frames: its template and mode.
pub(crate) fn set_generator(bench: &mut Ebpf, kind: Kind, flows: u32) {
    let (t, mode) = match kind {
        Kind::Established => (live_flows::tcp_template(live_flows::ACK), 0),
        Kind::Flood | Kind::FloodRecorded => (live_flows::tcp_template(live_flows::SYN), GEN_FLOOD),
        Kind::Tunnel(offset) => (udp_template(VIP_PORT + offset), 0),
        Kind::Fullnat => (udp_template(VIP_PORT + 3), 0),
        _ => (template(), 0),
    };
    let mut cfg: aya::maps::Array<_, [u32; 4]> =
        aya::maps::Array::try_from(bench.map_mut("GEN_CONFIG").expect("GEN_CONFIG")).expect("array");
    cfg.set(0, [flows, FIRST_SPORT, mode, 0], 0).expect("GEN_CONFIG");
    let words: [u64; FRAME_LEN / 8] =
        std::array::from_fn(|i| u64::from_ne_bytes(t[i * 8..i * 8 + 8].try_into().unwrap()));
    let mut tpl: aya::maps::Array<_, [u64; FRAME_LEN / 8]> =
        aya::maps::Array::try_from(bench.map_mut("GEN_TEMPLATE").expect("GEN_TEMPLATE")).expect("array");
    tpl.set(0, words, 0).expect("GEN_TEMPLATE");
}

pub(crate) fn run_stats(info: Result<ProgramInfo, aya::programs::ProgramError>) -> (u64, u64) {
    info.map(|i| (i.run_time().as_nanos() as u64, i.run_count()))
        .unwrap_or((0, 0))
}

/// Sends frames from inside GEN for `secs` (at most `MAX_PPS * secs` frames);
/// returns the frames sent and the seconds it took.
pub fn blast(gen_ns: &str, prog: &Xdp, secs: f64) -> (u64, f64) {
    std::thread::scope(|s| {
        s.spawn(|| {
            netns::enter(gen_ns);
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(c"g0".as_ptr()) };
            assert!(ifindex != 0, "g0 not found in {gen_ns}");
            // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
            let ctx: Vec<u8> = [0, FRAME_LEN as u32, 0, ifindex, 0, 0]
                .iter()
                .flat_map(|v: &u32| v.to_ne_bytes())
                .collect();
            let frame = template();
            let max = (MAX_PPS * secs) as u64;
            let (t, mut sent) = (Instant::now(), 0u64);
            while sent < max && t.elapsed().as_secs_f64() < secs {
                let r = prog
                    .test_run(TestRunOptions {
                        data_in: Some(&frame),
                        ctx_in: Some(&ctx),
                        repeat: CHUNK,
                        attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                        ..TestRunOptions::new()
                    })
                    .expect("BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES");
                assert_eq!(
                    r.return_value, 0,
                    "live-frames run returned {}",
                    r.return_value
                );
                sent += u64::from(CHUNK);
            }
            (sent, t.elapsed().as_secs_f64())
        })
        .join()
        .expect("generator thread")
    })
}
