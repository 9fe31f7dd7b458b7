//! `cargo xtask demo`: a namespace lab, the agent, a few thousand real HTTP
//! requests to the VIPs, and how they spread over the backends.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use lb_agent::{config, dataplane::Stats, plan::Plan};
use lb_common::stat;
use lb_tests::{
    lab::{agent_bin, Lab, BALANCER4, CLIENT4, VIP4, VIP6},
    traffic::{requests, Proto, Tally},
};

const REQUESTS: u64 = 3000;

fn bar(n: u64, max: u64) -> String {
    let width = (n * 40).checked_div(max).unwrap_or(0) as usize;
    "#".repeat(width)
}

fn show(title: &str, vip: IpAddr, tally: &Tally, plan: &Plan, stats: &Stats, service: &str, lab: &Lab) {
    let svc = plan.services.iter().find(|s| s.name == service).expect("service in demo.yaml");
    println!("\n{title}: {} requests to {vip} port 80, {} answered, {} failed", tally.successes() + tally.failures, tally.successes(), tally.failures);
    println!("  {:<4} {:<16} {:>6} {:>8} {:>7}  {:<40} {:>16}", "", "backend", "weight", "answered", "share", "", "agent: packets");
    let max = tally.by_backend.values().copied().max().unwrap_or(0);
    for id in &svc.backend_ids {
        let b = &plan.backends[*id as usize];
        let host = lab
            .backends
            .iter()
            .find(|h| IpAddr::V4(h.v4) == b.address || IpAddr::V6(h.v6) == b.address)
            .expect("lab host");
        let n = tally.by_backend.get(&host.name).copied().unwrap_or(0);
        let share = 100.0 * n as f64 / tally.successes().max(1) as f64;
        let pkts = stats.backends.get(*id as usize).map(|c| c.packets).unwrap_or(0);
        println!("  {:<4} {:<16} {:>6} {:>8} {:>6.1}%  {:<40} {:>16}", host.name, b.address.to_string(), b.weight, n, share, bar(n, max), pkts);
    }
}

fn main() {
    let config_path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/demo.yaml");
    let cfg = config::load(&config_path).unwrap_or_else(|e| panic!("{e}"));
    println!("lb demo: an XDP load balancer in LVS direct-routing mode, in network namespaces.\n");
    println!("Building the lab (all in namespaces created here, removed at the end):");
    let mut lab = Lab::new(3);
    println!("  client    {CLIENT4}   routes the VIPs {VIP4} and {VIP6} via the balancer");
    println!("  balancer  {BALANCER4}   runs lb-agent; the XDP program on its eth0 rewrites");
    println!("            the destination MAC to the chosen backend's and sends the frame back out");
    for b in &lab.backends {
        println!("  {:<9} {}  {}  VIPs on lo (arp_ignore=1, arp_announce=2), HTTP server answering \"{}\"", b.name, b.v4, b.v6, b.name);
    }
    println!("  all on one bridge; backends answer the client directly, not through the balancer");
    lab.start_servers();

    println!("\nStarting: {} run --config deploy/examples/demo.yaml --iface eth0 --xdp-mode native", agent_bin().display());
    let started = Instant::now();
    let mut agent = lab.start_agent(&config_path);
    println!("  attached in {:.1} s", started.elapsed().as_secs_f64());

    let deadline = Duration::from_secs(120);
    let t = Instant::now();
    let v4 = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, REQUESTS, 4, deadline);
    let v6 = requests(&lab.client, Proto::Http, IpAddr::V6(VIP6), 80, REQUESTS, 4, deadline);
    let secs = t.elapsed().as_secs_f64();
    println!("\nSent {} HTTP requests (a new TCP connection each) in {secs:.1} s.", 2 * REQUESTS);

    let stats = Stats::read_pinned(&agent.pin_dir).expect("read the agent's pinned maps");
    let plan = Plan::build(&cfg, &Default::default());
    show("Service web (IPv4)", IpAddr::V4(VIP4), &v4, &plan, &stats, "web", &lab);
    show("Service web6 (IPv6)", IpAddr::V6(VIP6), &v6, &plan, &stats, "web6", &lab);
    println!("\n\"answered\" is what the client saw (each backend's HTTP body names it); \"agent: packets\"");
    println!("is the balancer's own per-backend counter (client->VIP packets only: replies bypass it).");
    println!("Weights are 1, 1, 2, so b3 takes about half of the connections.");
    print!("\nBalancer outcome counters:");
    for (i, name) in stat::NAMES.iter().enumerate() {
        let v = stats.get(i as u32);
        if v != 0 {
            print!(" {name}={v}");
        }
    }
    println!();

    println!("\nThe agent's own view, as an operator sees it (`lb-agent status`, like ipvsadm -Ln --rate):");
    let out = Command::new(agent_bin())
        .args(["status", "--socket"])
        .arg(lab.control_socket())
        .output()
        .expect("run lb-agent status");
    print!("{}", String::from_utf8_lossy(&out.stdout));

    let (status, _) = agent.stop();
    println!("\nStopped the agent ({status}): it detached the program and removed its pins.");
    let failed = v4.failures + v6.failures;
    drop(lab);
    println!("Removed the lab.");
    if failed > 0 {
        eprintln!("{failed} requests failed: {:?} {:?}", v4.first_errors, v6.first_errors);
        std::process::exit(1);
    }
}
