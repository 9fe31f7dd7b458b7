//! The live-rate topology: two namespaces joined by one veth pair, removed on drop
//! (even on panic).
//!
//! ```text
//!  GEN namespace                         BAL namespace
//!  g0 198.18.0.2  ◄──── veth ────►  b0 198.18.0.1, ip_forward=1
//!  bench_count (XDP, counts, drops)      program under test (native XDP), or
//!  bench_gen via live frames → XDP_TX    lb_pass + nftables DNAT + conntrack
//! ```
//!
//! Clients 198.19.0.7 (many source ports) send to the VIP; the backends
//! (198.18.2.1..) are static permanent neighbours of b0 whose MAC is g0's, so
//! whatever BAL forwards comes straight back to g0 and is counted there.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use lb_agent::neigh::Mac;
use lb_tests::netns::{ns_sh, sh};

pub const G0_MAC: Mac = [0x02, 0xbb, 0, 0, 0, 2];
pub const B0_MAC: Mac = [0x02, 0xbb, 0, 0, 0, 1];
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
pub const VIP_PORT: u16 = 80;
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 7);
pub const BACKENDS: u8 = 8;

pub fn backend(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, i + 1)
}

pub fn mac_str(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The two namespaces; deleted (and with them the veth pair and every XDP program
/// attached to it) when dropped.
pub struct Topo {
    pub gen_ns: String,
    pub bal: String,
    namespaces: Vec<String>,
    nft_file: std::path::PathBuf,
}

impl Topo {
    pub fn new() -> Topo {
        lb_tests::netns::require_root();
        let id = format!("lbb{}", std::process::id());
        let mut t = Topo {
            gen_ns: format!("{id}-gen"),
            bal: format!("{id}-bal"),
            namespaces: Vec::new(),
            nft_file: std::env::temp_dir().join(format!("{id}.nft")),
        };
        for ns in [t.gen_ns.clone(), t.bal.clone()] {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            sh(&["ip", "netns", "add", &ns]);
            t.namespaces.push(ns.clone());
            // No IPv6 on the pair: no ND or MLD frames next to the measured ones.
            ns_sh(&ns, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
            ns_sh(
                &ns,
                &["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"],
            );
            ns_sh(&ns, &["ip", "link", "set", "lo", "up"]);
        }
        let (g, b) = (t.gen_ns.clone(), t.bal.clone());
        sh(&[
            "ip", "link", "add", "g0", "netns", &g, "type", "veth", "peer", "name", "b0", "netns",
            &b,
        ]);
        ns_sh(
            &g,
            &["ip", "link", "set", "g0", "address", &mac_str(&G0_MAC)],
        );
        ns_sh(
            &b,
            &["ip", "link", "set", "b0", "address", &mac_str(&B0_MAC)],
        );
        ns_sh(&g, &["ip", "addr", "add", "198.18.0.2/24", "dev", "g0"]);
        ns_sh(&b, &["ip", "addr", "add", "198.18.0.1/24", "dev", "b0"]);
        ns_sh(&g, &["ip", "link", "set", "g0", "up"]);
        ns_sh(&b, &["ip", "link", "set", "b0", "up"]);
        // The forwarding stack for the nftables baseline: forward, out the same
        // port, without redirects or reverse-path filtering.
        for kv in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.b0.rp_filter=0",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.b0.send_redirects=0",
        ] {
            ns_sh(&b, &["sysctl", "-qw", kv]);
        }
        ns_sh(&b, &["ip", "route", "add", "198.18.2.0/24", "dev", "b0"]);
        ns_sh(&b, &["ip", "route", "add", "198.19.0.0/16", "dev", "b0"]);
        let g0 = mac_str(&G0_MAC);
        for i in 0..BACKENDS {
            let a = backend(i).to_string();
            ns_sh(
                &b,
                &[
                    "ip",
                    "neigh",
                    "add",
                    &a,
                    "lladdr",
                    &g0,
                    "dev",
                    "b0",
                    "nud",
                    "permanent",
                ],
            );
        }
        t
    }

    /// The nftables DNAT balancer: the VIP's UDP port to the backends, chosen by
    /// `numgen random` on each new conntrack entry (kube-proxy's nftables mode uses
    /// the same construct).
    pub fn nft_up(&self) {
        let mut map = String::new();
        for i in 0..BACKENDS {
            let _ = write!(map, "{}{i} : {}", if i > 0 { ", " } else { "" }, backend(i));
        }
        let rules = format!(
            "table ip lbbench {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
             ip daddr {VIP} udp dport {VIP_PORT} dnat to numgen random mod {BACKENDS} map {{ {map} }}\n  }}\n}}\n"
        );
        std::fs::write(&self.nft_file, rules).expect("write the nftables ruleset");
        ns_sh(
            &self.bal,
            &["nft", "-f", self.nft_file.to_str().expect("utf-8 path")],
        );
    }

    pub fn nft_down(&self) {
        ns_sh(&self.bal, &["nft", "delete", "table", "ip", "lbbench"]);
    }

    /// Entries in BAL's conntrack table (a check that nftables did the work).
    pub fn conntrack_count(&self) -> u64 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.bal,
                "sysctl",
                "-n",
                "net.netfilter.nf_conntrack_count",
            ])
            .stderr(Stdio::null())
            .output();
        out.ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
        let _ = std::fs::remove_file(&self.nft_file);
    }
}
