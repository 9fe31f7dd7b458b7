//! Live forwarding rate on veth with native XDP: (a) the MAC-swap ceiling, (b) the
//! balancer, (c) nftables DNAT with conntrack, in one topology (see `topo`); then
//! the balancer with (d) established TCP flows and (e), (f) a SYN flood
//! (`live_flows`), and the balancer with the tunnel modes, (g) ipip and (h) gue, and with `fullnat`, (i).
//!
//! The generator is `bench_gen` run with BPF_PROG_TEST_RUN and
//! BPF_F_TEST_XDP_LIVE_FRAMES from a thread inside the generator's namespace (the
//! kernel resolves the `ingress_ifindex` of the context there); every frame it
//! sends leaves g0 by XDP_TX, is handled in BAL, and what BAL forwards comes back
//! to g0, where `bench_count` counts it. A run sends a bounded number of frames
//! in chunks until its time is up.

use std::time::Duration;

use aya::{
    Ebpf,
    programs::{Xdp, XdpMode},
};
use lb_agent::{
    config,
    dataplane::{AttachMode, Dataplane},
    plan::Plan,
};
use lb_tests::netns;

pub use crate::live_gen::{blast, template, xdp, FRAME_LEN};
use crate::live_gen::{frames_counted, run_stats, set_generator};
use crate::{
    live_flows::{self, Held},
    median,
    topo::{self, B0_MAC, G0_MAC, Topo, VIP, VIP_PORT},
};

/// The benchmark-only programs (tests/bench-ebpf), built by tests/build.rs.
pub static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench-ebpf"));

pub struct LiveParams {
    pub runs: usize,
    pub secs: f64,
    pub warmup_secs: f64,
    pub flows: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ceiling,
    Balancer,
    Nftables,
    /// The balancer, TCP ACKs of `flows` established connections.
    Established,
    /// The balancer, a TCP SYN of a new flow in every frame, the connection table full.
    Flood,
    /// `Flood` with the SYN-flood threshold off: every SYN recorded.
    FloodRecorded,
    /// The balancer, UDP to the service on `VIP_PORT + 1` (ipip) or `+ 2` (gue).
    Tunnel(u16),
    /// The balancer, UDP to the `fullnat` service on `VIP_PORT + 3`: both
    /// addresses rewritten in `lb_nat`.
    Fullnat,
}

impl Kind {
    /// Whether `lb_xdp` is the program on b0.
    fn balancer(self) -> bool {
        matches!(self, Kind::Balancer | Kind::Established | Kind::Flood | Kind::FloodRecorded | Kind::Tunnel(_) | Kind::Fullnat)
    }
}

pub struct Variant {
    pub kind: Kind,
    pub short: &'static str,
    pub label: &'static str,
    /// Frames forwarded back to g0, per second, one per run.
    pub pps: Vec<f64>,
    /// Frames the generator sent, per second, one per run.
    pub sent_pps: Vec<f64>,
    /// Run time of the XDP program on b0 per frame (kernel BPF stats), per run.
    pub prog_ns: Vec<f64>,
}

impl Variant {
    pub fn mpps(&self) -> f64 {
        median(self.pps.clone()) / 1e6
    }
}

/// Attaches the program of `kind` to b0 from a thread inside BAL (and the nftables
/// rules for `Nftables`).
fn attach(topo: &Topo, dp: &mut Dataplane, kind: Kind) -> Option<aya::programs::xdp::XdpLinkId> {
    if kind == Kind::Nftables {
        topo.nft_up();
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            netns::enter(&topo.bal);
            match kind {
                Kind::Ceiling => Some(
                    xdp(dp.ebpf_mut(), "bench_macswap")
                        .attach("b0", XdpMode::Driver)
                        .expect("attach bench_macswap to b0"),
                ),
                // veth takes native XDP_TX frames from g0 only if b0 has a program.
                Kind::Nftables => Some(
                    dp.pass_program()
                        .expect("lb_pass")
                        .attach("b0", XdpMode::Driver)
                        .expect("attach lb_pass to b0"),
                ),
                _ => {
                    dp.attach("b0", Some(AttachMode::Native))
                        .expect("attach lb_xdp natively to b0");
                    None
                }
            }
        })
        .join()
        .expect("attach thread")
    })
}

fn detach(
    topo: &Topo,
    dp: &mut Dataplane,
    kind: Kind,
    link: Option<aya::programs::xdp::XdpLinkId>,
) {
    std::thread::scope(|s| {
        s.spawn(|| {
            netns::enter(&topo.bal);
            match (kind, link) {
                (Kind::Ceiling, Some(l)) => xdp(dp.ebpf_mut(), "bench_macswap")
                    .detach(l)
                    .expect("detach"),
                (Kind::Nftables, Some(l)) => dp
                    .pass_program()
                    .expect("lb_pass")
                    .detach(l)
                    .expect("detach"),
                _ => dp.detach().expect("detach lb_xdp"),
            }
        })
        .join()
        .expect("detach thread")
    });
    if kind == Kind::Nftables {
        topo.nft_down();
    }
}

fn prog_under_test(kind: Kind) -> &'static str {
    match kind {
        Kind::Ceiling => "bench_macswap",
        Kind::Nftables => lb_common::PROG_PASS,
        _ => lb_common::PROG_BALANCER,
    }
}

/// The variants' rates, and what became of the established connections the
/// floods ran next to.
pub struct Live {
    pub variants: Vec<Variant>,
    pub held: Held,
}

/// Runs the nine variants `lp.runs` times, interleaved (a, b, ..., i, a, ...)
/// so that drift on a shared machine hits all of them alike.
pub fn bench_live(lp: &LiveParams) -> Live {
    let topo = Topo::new();

    let mut bench = Ebpf::load(BENCH_OBJECT).expect("load the bench object");
    for name in ["bench_gen", "bench_count"] {
        xdp(&mut bench, name)
            .load()
            .unwrap_or_else(|e| panic!("load {name}: {e}"));
    }
    set_generator(&mut bench, Kind::Ceiling, lp.flows);
    std::thread::scope(|s| {
        s.spawn(|| {
            netns::enter(&topo.gen_ns);
            xdp(&mut bench, "bench_count")
                .attach("g0", XdpMode::Driver)
                .expect("attach bench_count to g0");
        })
        .join()
        .expect("attach thread")
    });

    // The balancer at its default table sizes: a UDP and a TCP service on the VIP,
    // and UDP services in the tunnel modes (ipip on VIP_PORT + 1, gue on + 2), the
    // same backends nftables uses, every backend's MAC (the tunnel modes' next hop
    // too) being g0's.
    // And a UDP `fullnat` service on + 3, from b0's address (the SNAT pool).
    let mut yaml = String::from("snat_addresses: [\"198.18.0.1\"]\nservices:\n");
    for (name, proto, offset, mode) in [
        ("udp", "udp", 0, "dr"),
        ("tcp", "tcp", 0, "dr"),
        ("ipip", "udp", 1, "ipip"),
        ("gue", "udp", 2, "gue"),
        ("fullnat", "udp", 3, "fullnat"),
    ] {
        yaml.push_str(&format!(
            "  - name: live-{name}\n    vip: {VIP}\n    port: {}\n    protocol: {proto}\n    forwarding: {mode}\n    backends:\n",
            VIP_PORT + offset
        ));
        for i in 0..topo::BACKENDS {
            yaml.push_str(&format!("      - address: \"{}\"\n", topo::backend(i)));
        }
    }
    let cfg = config::parse(&yaml, "bench-live.yaml").unwrap_or_else(|e| panic!("{e}"));
    let macs = Plan::backend_addresses(&cfg)
        .into_iter()
        .map(|a| (a, G0_MAC))
        .collect();
    let plan = Plan::build(&cfg, &macs);
    // `LB_BENCH_LIVE_OBJECT=PATH`: another build of lb-ebpf in place of the
    // agent's (to compare builds run by run).
    let mut dp = match std::env::var("LB_BENCH_LIVE_OBJECT") {
        Ok(path) => {
            let obj = std::fs::read(&path).unwrap_or_else(|e| panic!("LB_BENCH_LIVE_OBJECT {path}: {e}"));
            Dataplane::load_object(&obj, &plan).expect("load the balancer object")
        }
        Err(_) => Dataplane::load(&plan).expect("load the balancer object"),
    };
    // The tunnel source: b0's address.
    dp.set_tunnel(
        [198, 18, 0, 1],
        "2001:db8:20::1".parse::<std::net::Ipv6Addr>().expect("v6").octets(),
        1500,
    )
    .expect("tunnel source");
    dp.write(&plan, B0_MAC).expect("fill the maps");
    // The SYN filter, as an agent has it on from its second sweep.
    crate::newflow::syn_filter_on(&mut dp);
    xdp(dp.ebpf_mut(), "bench_macswap")
        .load()
        .expect("load bench_macswap");

    let mut out = vec![
        Variant {
            kind: Kind::Ceiling,
            short: "a",
            label: "(a) ceiling: bench_macswap XDP_TX",
            pps: vec![],
            sent_pps: vec![],
            prog_ns: vec![],
        },
        Variant {
            kind: Kind::Balancer,
            short: "b",
            label: "(b) balancer: lb_xdp XDP_TX",
            pps: vec![],
            sent_pps: vec![],
            prog_ns: vec![],
        },
        Variant {
            kind: Kind::Nftables,
            short: "c",
            label: "(c) nftables DNAT + conntrack",
            pps: vec![],
            sent_pps: vec![],
            prog_ns: vec![],
        },
        Variant {
            kind: Kind::Established,
            short: "d",
            label: "(d) balancer: lb_xdp, established TCP flows (ACKs)",
            pps: vec![],
            sent_pps: vec![],
            prog_ns: vec![],
        },
        Variant {
            kind: Kind::Flood,
            short: "e",
            label: "(e) balancer: lb_xdp, SYN flood (every frame a new flow, the connection table full)",
            pps: vec![],
            sent_pps: vec![],
            prog_ns: vec![],
        },
        Variant {
            kind: Kind::FloodRecorded,
            short: "f",
            label: "(f) as (e), `syn_flood_kps: 0` (every SYN recorded)",
            pps: vec![],
            sent_pps: vec![],
            prog_ns: vec![],
        },
        Variant {
            kind: Kind::Tunnel(1),
            short: "g",
            label: "(g) balancer, ipip: lb_xdp encapsulates, XDP_TX",
            pps: vec![],
            sent_pps: vec![],
            prog_ns: vec![],
        },
        Variant {
            kind: Kind::Tunnel(2),
            short: "h",
            label: "(h) balancer, gue: lb_xdp encapsulates, XDP_TX",
            pps: vec![],
            sent_pps: vec![],
            prog_ns: vec![],
        },
        Variant {
            kind: Kind::Fullnat,
            short: "i",
            label: "(i) balancer, fullnat: lb_xdp, then lb_nat rewrites both addresses, XDP_TX",
            pps: vec![],
            sent_pps: vec![],
            prog_ns: vec![],
        },
    ];
    // Established connections first (the floods must not move them), then the
    // connection table filled by a flood before the first timed round.
    let conns = live_flows::establish(&mut dp, live_flows::HELD);
    let (size, _) = dp.conntrack_capacity(&plan).expect("CONNTRACK size");
    let fill = {
        let link = attach(&topo, &mut dp, Kind::FloodRecorded);
        set_generator(&mut bench, Kind::FloodRecorded, lp.flows);
        dp.set_syn_flood_kps(0).expect("SYN flood threshold");
        let fill = live_flows::fill(&topo, &bench, &mut dp, size);
        detach(&topo, &mut dp, Kind::FloodRecorded, link);
        fill
    };
    run_rounds(lp, &topo, &mut bench, &mut dp, &mut out);
    let held = live_flows::check(&mut dp, &conns, fill, size);
    Live { variants: out, held }
}

/// The SYN flood threshold of every row but (f): the agent's default, or
/// `LB_BENCH_SYN_FLOOD_KPS` (to see what an unrecorded SYN costs live, say 1).
fn flood_kps() -> u16 {
    std::env::var("LB_BENCH_SYN_FLOOD_KPS").ok().and_then(|v| v.parse().ok()).unwrap_or(lb_common::DEFAULT_SYN_FLOOD_KPS)
}

/// The frames the balancer has encapsulated in `kind`'s tunnel mode, or
/// translated for `fullnat` (0 for the others).
fn encapsulated(dp: &mut Dataplane, kind: Kind) -> u64 {
    let i = match kind {
        Kind::Tunnel(1) => lb_common::stat::ENCAP_IPIP,
        Kind::Tunnel(_) => lb_common::stat::ENCAP_GUE,
        Kind::Fullnat => lb_common::stat::FULLNAT_FORWARDED,
        _ => return 0,
    };
    dp.stats().expect("balancer counters").global[i as usize]
}

fn run_rounds(
    lp: &LiveParams,
    topo: &Topo,
    bench: &mut Ebpf,
    dp: &mut Dataplane,
    out: &mut [Variant],
) {
    for round in 0..lp.runs {
        for v in out.iter_mut() {
            let link = attach(topo, dp, v.kind);
            set_generator(bench, v.kind, lp.flows);
            let kps = if v.kind == Kind::FloodRecorded { 0 } else { flood_kps() };
            dp.set_syn_flood_kps(kps).expect("SYN flood threshold");
            let gen_prog: &Xdp = bench
                .program("bench_gen")
                .expect("bench_gen")
                .try_into()
                .expect("XDP");
            // Warm-up (fills both connection tables), with the kernel's BPF run-time
            // statistics on (only while the fd is open): the program's ns per frame.
            let encap0 = encapsulated(dp, v.kind);
            let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
            let s0 = run_stats(
                dp.ebpf_mut()
                    .program(prog_under_test(v.kind))
                    .expect("program")
                    .info(),
            );
            let (warm_sent, _) = blast(&topo.gen_ns, gen_prog, lp.warmup_secs);
            let s1 = run_stats(
                dp.ebpf_mut()
                    .program(prog_under_test(v.kind))
                    .expect("program")
                    .info(),
            );
            drop(stats);
            // The timed run, statistics off (they cost two clock reads per program run).
            std::thread::sleep(Duration::from_millis(5));
            let c0 = frames_counted(bench);
            let (sent, secs) = blast(&topo.gen_ns, gen_prog, lp.secs);
            std::thread::sleep(Duration::from_millis(5));
            let c1 = frames_counted(bench);
            let got = c1 - c0;
            if got == 0 {
                let extra = match v.kind {
                    k if k.balancer() => {
                        format!("balancer counters: {:?}", dp.stats().map(|s| s.global).ok())
                    }
                    Kind::Nftables => {
                        format!("conntrack entries in BAL: {}", topo.conntrack_count())
                    }
                    _ => String::new(),
                };
                detach(topo, dp, v.kind, link);
                panic!(
                    "live rate {}: {sent} frames sent (+{warm_sent} warm-up), none came back to g0: broken set-up. {extra}",
                    v.label
                );
            }
            if let Kind::Tunnel(_) | Kind::Fullnat = v.kind {
                let encap = encapsulated(dp, v.kind) - encap0;
                assert!(encap >= got, "{}: {got} frames came back but the balancer rewrote {encap}", v.label);
            }
            if v.kind == Kind::Nftables {
                assert!(
                    topo.conntrack_count() > 0,
                    "nftables forwarded frames but BAL has no conntrack entries"
                );
            }
            detach(topo, dp, v.kind, link);
            let runs = s1.1.saturating_sub(s0.1);
            v.pps.push(got as f64 / secs);
            v.sent_pps.push(sent as f64 / secs);
            v.prog_ns.push(if runs > 0 {
                (s1.0 - s0.0) as f64 / runs as f64
            } else {
                f64::NAN
            });
            eprintln!(
                "lb-bench:   run {} {}: {:.3} Mpps forwarded ({:.3} Mpps sent, {:.0} ns/frame in the program)",
                round + 1,
                v.short,
                got as f64 / secs / 1e6,
                sent as f64 / secs / 1e6,
                v.prog_ns.last().copied().unwrap_or(f64::NAN)
            );
        }
    }
}
