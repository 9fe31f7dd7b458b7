//! The established rows of the NAT table at repeat N: `nat` and `fullnat`
//! rewrite the frame in place and BPF_PROG_TEST_RUN keeps the rewritten frame
//! between repeats, so each class runs through `bench_restore`
//! (tests/bench-ebpf), which writes the frame's headers back before every
//! repeat and tail-calls `lb_xdp`. Its copy is the same for every mode of a
//! family, so it cancels in the difference to the DR frame of that family.

use std::fmt::Write as _;

use aya::{
    Ebpf,
    maps::{Array, ProgramArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_agent::dataplane::Dataplane;

use crate::{
    Params,
    live::{BENCH_OBJECT, xdp},
    median,
    tunnel::run,
};

/// The classes, by row: IPv4 and IPv6 established ACKs (dr, nat, fullnat), then
/// the replies of the `nat` and `fullnat` flows (no DR reply: the DR established
/// frame of the family is the reference).
pub const ROWS: [&str; 4] = [
    "IPv4 TCP ACK, established",
    "IPv6 TCP ACK, established",
    "IPv4 TCP ACK, reply (backend to client)",
    "IPv6 TCP ACK, reply (backend to client)",
];

/// What `measure` found: per row and mode (dr, nat, fullnat; `None` for the
/// reply rows' dr) the wrapped ns of every round, and `lb_xdp` alone on the DR
/// established frame of each family.
pub struct Restored {
    pub wrapped: [[Vec<f64>; 3]; 4],
    pub direct: [Vec<f64>; 2],
    pub rounds: usize,
}

/// `frames[row][mode]`: the frame of each class (the reply rows' dr entry is
/// unused). The flows must be established already.
pub fn measure(dp: &mut Dataplane, p: &Params, frames: &[[Vec<u8>; 3]; 4]) -> Restored {
    let mut bench = Ebpf::load(BENCH_OBJECT).expect("load the bench object");
    xdp(&mut bench, "bench_restore").load().expect("load bench_restore");
    {
        let target: &Xdp = dp.ebpf_mut().program(lb_common::PROG_BALANCER).expect("lb_xdp").try_into().expect("XDP");
        let fd = target.fd().expect("lb_xdp loaded").try_clone().expect("dup lb_xdp's fd");
        let mut m = ProgramArray::try_from(bench.map_mut("RESTORE_TARGET").expect("RESTORE_TARGET")).expect("program array");
        m.set(0, &fd, 0).expect("RESTORE_TARGET[0] = lb_xdp");
    }
    let set = |bench: &mut Ebpf, frame: &[u8]| {
        let long = frame[12..14] == [0x86, 0xdd];
        let n = if long { 74 } else { 54 };
        assert!(frame.len() >= n, "a frame of {} bytes is shorter than its headers", frame.len());
        let mut t = [0u8; 80];
        t[..n].copy_from_slice(&frame[..n]);
        t[79] = u8::from(long);
        let mut m: Array<_, [u8; 80]> = Array::try_from(bench.map_mut("RESTORE").expect("RESTORE")).expect("array");
        m.set(0, t, 0).expect("RESTORE");
    };
    let output = |bench: &Ebpf, frame: &[u8], repeat: u32| {
        let prog: &Xdp = bench.program("bench_restore").expect("bench_restore").try_into().expect("XDP");
        let mut out = vec![0u8; frame.len() + 64];
        let r = prog
            .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat, ..TestRunOptions::new() })
            .expect("BPF_PROG_TEST_RUN");
        assert_eq!(r.return_value, 3, "XDP_TX expected");
        out.truncate(r.data_size_out as usize);
        out
    };
    // Checked before timing: 3 repeats give byte for byte the output of 1, and
    // a nat/fullnat frame comes out rewritten (its addresses changed).
    for (row, modes) in frames.iter().enumerate() {
        for (m, f) in modes.iter().enumerate() {
            if row >= 2 && m == 0 {
                continue;
            }
            set(&mut bench, f);
            let once = output(&bench, f, 1);
            assert_eq!(once, output(&bench, f, 3), "{} mode {m}: repeated runs through bench_restore differ", ROWS[row]);
            if m > 0 {
                assert_ne!(once[14..], f[14..], "{} mode {m}: the frame was not rewritten", ROWS[row]);
            }
        }
    }
    let rounds = if p.quick { 5 } else { 15 };
    let mut out = Restored { wrapped: Default::default(), direct: Default::default(), rounds };
    for round in 0..rounds {
        let mut order = [0usize, 1, 2];
        order.rotate_left(round % 3);
        for m in order {
            for (row, modes) in frames.iter().enumerate() {
                if row >= 2 && m == 0 {
                    continue;
                }
                set(&mut bench, &modes[m]);
                let prog: &Xdp = bench.program("bench_restore").expect("bench_restore").try_into().expect("XDP");
                out.wrapped[row][m].push(run(prog, &modes[m], p.repeat));
            }
            if m == 0 {
                let direct: &Xdp = dp.ebpf_mut().program(lb_common::PROG_BALANCER).expect("lb_xdp").try_into().expect("XDP");
                out.direct[0].push(run(direct, &frames[0][0], p.repeat));
                out.direct[1].push(run(direct, &frames[1][0], p.repeat));
            }
        }
    }
    out
}

/// Median (min–max) of a series.
fn cell(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.0} ({min:.0}–{max:.0})", median(v.to_vec()))
}

impl Restored {
    /// Per round: the extra of `row`'s `mode` over its family's DR established
    /// frame, both through `bench_restore`.
    fn extra(&self, row: usize, m: usize) -> Vec<f64> {
        self.wrapped[row][m].iter().zip(&self.wrapped[row % 2][0]).map(|(t, d)| t - d).collect()
    }

    /// Per round: (`lb_xdp`'s DR established + the extra) / `lb_xdp`'s DR established.
    fn ratios(&self, row: usize, m: usize) -> Vec<f64> {
        self.extra(row, m).iter().zip(&self.direct[row % 2]).map(|(e, d)| (d + e) / d).collect()
    }

    /// The table and the worst median ratio of `nat` and of `fullnat`.
    pub fn table(&self, repeat: u32) -> (String, [f64; 2]) {
        let mut md = format!(
            "| packet class (bench_restore + lb_xdp, repeat {repeat}) | dr (ns) | nat (ns) | fullnat (ns) | nat - dr | \
             fullnat - dr | nat / dr | fullnat / dr |\n|---|---:|---:|---:|---:|---:|---:|---:|\n"
        );
        let mut worst = [0.0f64; 2];
        for (row, name) in ROWS.iter().enumerate() {
            let dr = if row < 2 { cell(&self.wrapped[row][0]) } else { "(established)".into() };
            let mut ratio = [String::new(), String::new()];
            for m in 1..3 {
                let r = self.ratios(row, m);
                let rm = median(r.clone());
                worst[m - 1] = worst[m - 1].max(rm);
                let (lo, hi) = (r.iter().copied().fold(f64::INFINITY, f64::min), r.iter().copied().fold(0.0, f64::max));
                ratio[m - 1] = format!("**{rm:.2}x** ({lo:.2}–{hi:.2})");
            }
            let _ = writeln!(
                md,
                "| {name} | {dr} | {} | {} | {} | {} | {} | {} |",
                cell(&self.wrapped[row][1]),
                cell(&self.wrapped[row][2]),
                cell(&self.extra(row, 1)),
                cell(&self.extra(row, 2)),
                ratio[0],
                ratio[1]
            );
        }
        (md, worst)
    }

    /// `lb_xdp` alone on the DR established frames, and what the wrapper adds.
    pub fn reference(&self) -> String {
        let overhead: Vec<f64> = self.wrapped[0][0].iter().zip(&self.direct[0]).map(|(w, d)| w - d).collect();
        format!(
            "`lb_xdp` alone, DR established: IPv4 {} ns, IPv6 {} ns; `bench_restore` and its tail call add {} ns \
             (IPv4 DR established, wrapped - direct)",
            cell(&self.direct[0]),
            cell(&self.direct[1]),
            cell(&overhead)
        )
    }
}
