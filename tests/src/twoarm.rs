//! A two-arm lab: the balancer has a client-side interface (`eth0`, a veth
//! straight to the client) and a backend-side one (`eth1`, on a bridge in a
//! switch namespace with the backends). The backends are reachable only by
//! `eth1`; their default route is the balancer's `eth1` address, and the
//! balancer's kernel forwards their replies (from the VIP) to the client. DR
//! backends carry the VIPs on `lo` (`lb-realserver.sh up`), tunnel backends
//! decapsulate with `lb-agent decap` (`up-tunnel`, XDP); `nat` backends need
//! nothing more (the balancer is their default route: its XDP translates their
//! replies). `fullnat` backends get no default route at all (no route to the
//! clients), and the balancer holds the SNAT addresses 198.18.51.3 and
//! 2001:db8:51::3 on `eth1`. Everything lives in namespaces removed on drop.
//!
//! ```text
//!  client 198.18.50.2 ── eth0 198.18.50.1  balancer (XDP on both)  eth1 198.18.51.1 ── br0 ── b1 .51.11, b2 .51.12, b3 .51.13
//! ```
//! (and the same in 2001:db8:50::/64 and 2001:db8:51::/64).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::Command,
};

use crate::{
    lab::{agent_bin, realserver_script, spawn_agent, Agent},
    netns::{self, ns_sh, sh},
    traffic::{self, Server},
};

pub const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 52, 10);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x52, 0, 0, 0, 0, 0x10);
/// The `fullnat` lab's SNAT addresses, on the balancer's `eth1`.
pub const SNAT4: Ipv4Addr = Ipv4Addr::new(198, 18, 51, 3);
pub const SNAT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x51, 0, 0, 0, 0, 3);

pub struct Host {
    pub ns: String,
    pub name: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

pub struct TwoArmLab {
    pub id: String,
    pub client: String,
    pub balancer: String,
    pub switch: String,
    pub backends: Vec<Host>,
    pub dir: PathBuf,
    namespaces: Vec<String>,
    servers: Vec<Server>,
    pass: Vec<aya::Ebpf>,
    decap_up: Vec<usize>,
}

/// How the backends take their frames.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Backends {
    /// The VIPs on `lo` (DR).
    Dr,
    /// `lb-agent decap` (ipip and gue).
    Tunnel,
    /// Nothing: no VIP, no route to the clients, the SNAT addresses on the
    /// balancer's `eth1` (`fullnat`; `nat` works with any kind but this one).
    Fullnat,
}

impl TwoArmLab {
    pub fn new(n: usize, kind: Backends) -> TwoArmLab {
        netns::require_root();
        let (id, dir) = crate::lab::lab_id("ta");
        let mut lab = TwoArmLab {
            client: format!("{id}-cl"),
            balancer: format!("{id}-lb"),
            switch: format!("{id}-sw"),
            backends: (1..=n)
                .map(|i| Host {
                    ns: format!("{id}-b{i}"),
                    name: format!("b{i}"),
                    v4: Ipv4Addr::new(198, 18, 51, 10 + i as u8),
                    v6: format!("2001:db8:51::{}", 10 + i).parse().expect("address"),
                })
                .collect(),
            id,
            dir,
            namespaces: Vec::new(),
            servers: Vec::new(),
            pass: Vec::new(),
            decap_up: Vec::new(),
        };
        lab.build(kind);
        lab
    }

    fn add_ns(&mut self, ns: &str) {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
        sh(&["ip", "netns", "add", ns]);
        self.namespaces.push(ns.to_string());
        ns_sh(ns, &["ip", "link", "set", "lo", "up"]);
    }

    /// Addresses `v4`/24 and `v6`/64 on `dev` in `ns`, link up, checksums filled
    /// in by the sender (native XDP loses veth's offload metadata).
    fn address(ns: &str, dev: &str, v4: &str, v6: &str) {
        ns_sh(ns, &["sysctl", "-qw", &format!("net.ipv6.conf.{dev}.accept_dad=0")]);
        ns_sh(ns, &["ip", "addr", "add", &format!("{v4}/24"), "dev", dev]);
        ns_sh(ns, &["ip", "addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"]);
        ns_sh(ns, &["ip", "link", "set", dev, "up"]);
        ns_sh(ns, &["ethtool", "-K", dev, "tx", "off"]);
    }

    fn build(&mut self, kind: Backends) {
        let (client, balancer, switch) = (self.client.clone(), self.balancer.clone(), self.switch.clone());
        for ns in [&client, &balancer, &switch] {
            self.add_ns(ns);
        }
        ns_sh(&switch, &["ip", "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"]);
        ns_sh(&switch, &["ip", "link", "set", "br0", "up"]);
        // Client arm: a veth straight from the client to the balancer's eth0.
        sh(&["ip", "link", "add", "eth0", "netns", &client, "type", "veth", "peer", "name", "eth0", "netns", &balancer]);
        Self::address(&client, "eth0", "198.18.50.2", "2001:db8:50::2");
        Self::address(&balancer, "eth0", "198.18.50.1", "2001:db8:50::1");
        ns_sh(&client, &["ip", "route", "add", &format!("{VIP4}/32"), "via", "198.18.50.1"]);
        ns_sh(&client, &["ip", "-6", "route", "add", &format!("{VIP6}/128"), "via", "2001:db8:50::1"]);
        // Backend arm: the balancer's eth1 on the switch.
        sh(&["ip", "link", "add", "eth1", "netns", &balancer, "type", "veth", "peer", "name", "p-lb", "netns", &switch]);
        ns_sh(&switch, &["ip", "link", "set", "p-lb", "master", "br0", "up"]);
        Self::address(&balancer, "eth1", "198.18.51.1", "2001:db8:51::1");
        if kind == Backends::Fullnat {
            ns_sh(&balancer, &["ip", "addr", "add", &format!("{SNAT4}/24"), "dev", "eth1"]);
            ns_sh(&balancer, &["ip", "addr", "add", &format!("{SNAT6}/64"), "dev", "eth1", "nodad"]);
        }
        // The balancer routes the backends' replies to the client (its kernel;
        // XDP passes them: they are to no VIP).
        for k in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"] {
            ns_sh(&balancer, &["sysctl", "-qw", k]);
        }
        let script = realserver_script();
        let script = script.to_str().expect("utf-8 path").to_string();
        for i in 0..self.backends.len() {
            let (ns, v4, v6) = (self.backends[i].ns.clone(), self.backends[i].v4, self.backends[i].v6);
            self.add_ns(&ns);
            let port = format!("p-b{}", i + 1);
            sh(&["ip", "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port, "netns", &switch]);
            ns_sh(&switch, &["ip", "link", "set", &port, "master", "br0", "up"]);
            Self::address(&ns, "eth0", &v4.to_string(), &v6.to_string());
            if kind != Backends::Fullnat {
                ns_sh(&ns, &["ip", "route", "add", "default", "via", "198.18.51.1"]);
                ns_sh(&ns, &["ip", "-6", "route", "add", "default", "via", "2001:db8:51::1"]);
            }
            if kind == Backends::Dr {
                ns_sh(&ns, &["bash", &script, "up", &VIP4.to_string(), &VIP6.to_string()]);
            }
        }
        // Native XDP_REDIRECT into eth1 (to the backends) and into eth0 (`nat`
        // and `fullnat` replies, to the client) needs a program on each peer.
        for (ns, dev) in [(switch.clone(), "p-lb"), (client.clone(), "eth0")] {
            let ebpf = netns::run_in(&ns, move || {
                let mut ebpf = aya::Ebpf::load(lb_agent::object::OBJECT).expect("load the XDP object");
                let prog: &mut aya::programs::Xdp =
                    ebpf.program_mut(lb_common::PROG_PASS).expect("lb_pass").try_into().expect("XDP");
                prog.load().expect("load lb_pass");
                prog.attach(dev, aya::programs::XdpMode::Driver).expect("attach lb_pass to the balancer's peer");
                ebpf
            });
            self.pass.push(ebpf);
        }
        if kind == Backends::Tunnel {
            for i in 0..self.backends.len() {
                self.decap(i, "up-tunnel");
                self.decap_up.push(i);
            }
        }
    }

    fn decap_pin_dir(&self, i: usize) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(format!("{}-decap-b{}", self.id, i + 1))
    }

    /// `lb-realserver.sh up-tunnel|down-tunnel eth0 VIP4 VIP6` on backend `i`.
    fn decap(&self, i: usize, action: &str) {
        let b = &self.backends[i];
        let run = self.dir.join(format!("decap-b{}", i + 1));
        std::fs::create_dir_all(&run).expect("decap dir");
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", b.ns))
            .arg("--")
            .arg("bash")
            .arg(realserver_script())
            .args([action, "eth0", &VIP4.to_string(), &VIP6.to_string()])
            .env("LB_DECAP", "xdp")
            .env("LB_AGENT", agent_bin())
            .env("LB_DECAP_ARGS", format!("--xdp-mode native --pin-dir {}", self.decap_pin_dir(i).display()))
            .env("LB_DECAP_RUN", &run)
            .env("NO_COLOR", "1")
            .output()
            .expect("run lb-realserver.sh");
        assert!(
            out.status.success(),
            "lb-realserver.sh {action} on {} failed: {}{}",
            b.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// HTTP on `ports` on every backend, each answering with its name.
    pub fn start_servers(&mut self, ports: &[u16]) {
        for b in &self.backends {
            for p in ports {
                self.servers.push(traffic::http_server(&b.ns, *p, &b.name));
            }
        }
    }

    /// UDP on port 53 of every backend's addresses, answering with its name.
    pub fn start_udp_servers(&mut self) {
        for b in &self.backends {
            let at = [SocketAddr::new(IpAddr::V4(b.v4), 53), SocketAddr::new(IpAddr::V6(b.v6), 53)];
            self.servers.extend(traffic::udp_server(&b.ns, &at, &b.name));
        }
    }

    pub fn write_config(&self, yaml: &str) -> PathBuf {
        crate::lab::write_config_in(&self.dir, "lb.yaml", yaml)
    }

    pub fn pin_dir(&self) -> PathBuf {
        crate::lab::pin_dir_of(&self.id)
    }

    /// Starts `lb-agent run --iface eth0 --backend-iface eth1` (native XDP).
    pub fn start_agent(&self, config: &std::path::Path) -> Agent {
        self.start_agent_with(config, &["--backend-iface", "eth1"])
    }

    /// `lb-agent run --iface eth0` with `extra` arguments.
    pub fn start_agent_with(&self, config: &std::path::Path, extra: &[&str]) -> Agent {
        let mut args: Vec<String> =
            ["--iface", "eth0", "--xdp-mode", "native", "--metrics-listen", "off", "--config"].map(String::from).into();
        args.push(config.display().to_string());
        args.push("--control-socket".into());
        args.push(self.dir.join("ctl.sock").display().to_string());
        args.extend(extra.iter().map(|a| a.to_string()));
        spawn_agent(&self.balancer, &args, self.pin_dir(), self.dir.join("agent.log"), &[])
    }

    /// The address the client connects to for `vip` of a family.
    pub fn vip(v6: bool) -> IpAddr {
        if v6 { IpAddr::V6(VIP6) } else { IpAddr::V4(VIP4) }
    }
}

impl Drop for TwoArmLab {
    fn drop(&mut self) {
        self.servers.clear();
        for i in std::mem::take(&mut self.decap_up) {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.decap(i, "down-tunnel")));
            let _ = std::fs::remove_dir_all(self.decap_pin_dir(i));
        }
        self.pass.clear();
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
