//! A one-arm LVS-NAT lab: the client behind a router; the router, the balancer and
//! three backends on one segment (a bridge in the router's namespace). The
//! backends carry no VIP and know nothing of the balancer but that it is their
//! default route; the router sends the VIPs to the balancer. Everything lives in
//! namespaces removed on drop.
//!
//! ```text
//!  client 198.18.50.2 ── r ──br── 198.18.51.2 balancer (XDP, eth0; the only arm)
//!                            ├── b1 198.18.51.11  (default via 198.18.51.2)
//!                            ├── b2 198.18.51.12
//!                            └── b3 198.18.51.13
//! ```
//! (and the same in 2001:db8:50::/64 and 2001:db8:51::/64). VIPs 198.18.52.10 and
//! 2001:db8:52::10, routed by the router to the balancer.
//!
//! The FULLNAT lab (`NatLab::fullnat`) puts the backends in a subnet of their own
//! behind a second router, `r2`, which has no route to the clients (no default
//! route at all); the balancer holds the SNAT addresses 198.18.51.3 and
//! 2001:db8:51::3 on its eth0 and routes 198.18.53.0/24 via r2:
//!
//! ```text
//!  client ── r ──br── balancer 198.18.51.2, SNAT 198.18.51.3 (route 198.18.53.0/24 via r2)
//!                 └── r2 198.18.51.5 ──br1── b1 198.18.53.11 (default via r2 198.18.53.1)
//!                                        ├── b2 198.18.53.12
//!                                        └── ...
//! ```

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::{
    lab::{spawn_agent, Agent},
    netns::{self, ns_sh, sh},
    traffic::{self, Server},
};

pub const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 52, 10);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x52, 0, 0, 0, 0, 0x10);
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 2);
pub const BALANCER4: Ipv4Addr = Ipv4Addr::new(198, 18, 51, 2);
pub const BALANCER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x51, 0, 0, 0, 0, 2);
/// The FULLNAT lab's SNAT addresses (on the balancer's eth0) and second router.
pub const SNAT4: Ipv4Addr = Ipv4Addr::new(198, 18, 51, 3);
pub const SNAT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x51, 0, 0, 0, 0, 3);
pub const R2_4: Ipv4Addr = Ipv4Addr::new(198, 18, 51, 5);
pub const R2_6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x51, 0, 0, 0, 0, 5);
/// The echo service's port on the backends (long-lived connections).
pub const ECHO_PORT: u16 = 7000;

static SEQ: AtomicU32 = AtomicU32::new(0);

pub struct Host {
    pub ns: String,
    pub name: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

pub struct NatLab {
    pub id: String,
    pub client: String,
    pub router: String,
    pub balancer: String,
    pub backends: Vec<Host>,
    /// FULLNAT lab: the backends' router (no route to the clients).
    pub r2: Option<String>,
    pub dir: PathBuf,
    namespaces: Vec<String>,
    servers: Vec<Server>,
    pass: Option<aya::Ebpf>,
}

impl NatLab {
    /// The lab with `n` backends (at most 9), nothing running yet.
    pub fn new(n: u8) -> NatLab {
        Self::with(n, false)
    }

    /// The FULLNAT lab with `n` backends (at most 9) behind `r2`.
    pub fn fullnat(n: u8) -> NatLab {
        Self::with(n, true)
    }

    fn with(n: u8, fullnat: bool) -> NatLab {
        netns::require_root();
        let net = if fullnat { 53 } else { 51 };
        let id = format!("nt{}x{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst));
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir).expect("lab dir");
        let backends = (1..=n)
            .map(|i| Host {
                ns: format!("{id}-b{i}"),
                name: format!("b{i}"),
                v4: Ipv4Addr::new(198, 18, net, 10 + i),
                v6: format!("2001:db8:{net}::{}", 10 + i).parse().expect("address"),
            })
            .collect();
        let mut lab = NatLab {
            client: format!("{id}-cl"),
            router: format!("{id}-r"),
            balancer: format!("{id}-lb"),
            backends,
            r2: fullnat.then(|| format!("{id}-r2")),
            id,
            dir,
            namespaces: Vec::new(),
            servers: Vec::new(),
            pass: None,
        };
        lab.build();
        lab
    }

    fn add_ns(&mut self, ns: &str) {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
        sh(&["ip", "netns", "add", ns]);
        self.namespaces.push(ns.to_string());
        ns_sh(ns, &["ip", "link", "set", "lo", "up"]);
    }

    /// `ns`'s eth0 with these addresses, wired to `port` in the router (on the
    /// bridge when `bridged`), default routes via `gw4` / `gw6`.
    fn wire(&self, ns: &str, port: &str, bridged: bool, addrs: (Ipv4Addr, Ipv6Addr), gw: (String, String)) {
        self.wire_to(&self.router, "br0", ns, port, bridged, addrs, gw);
    }

    /// `wire` to router `router`'s bridge `bridge`.
    #[allow(clippy::too_many_arguments)]
    fn wire_to(&self, router: &str, bridge: &str, ns: &str, port: &str, bridged: bool, (v4, v6): (Ipv4Addr, Ipv6Addr), (gw4, gw6): (String, String)) {
        sh(&["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", router]);
        ns_sh(ns, &["sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0"]);
        ns_sh(ns, &["ip", "addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
        ns_sh(ns, &["ip", "addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
        ns_sh(ns, &["ip", "link", "set", "eth0", "up"]);
        // Complete checksums on the wire (veth's partial ones do not survive
        // native XDP; see docs/architecture.md).
        ns_sh(ns, &["ethtool", "-K", "eth0", "tx", "off"]);
        ns_sh(ns, &["ip", "route", "add", "default", "via", &gw4]);
        ns_sh(ns, &["ip", "-6", "route", "add", "default", "via", &gw6]);
        if bridged {
            ns_sh(router, &["ip", "link", "set", port, "master", bridge, "up"]);
        } else {
            ns_sh(router, &["ip", "link", "set", port, "up"]);
        }
    }

    fn build(&mut self) {
        let (client, router, balancer) = (self.client.clone(), self.router.clone(), self.balancer.clone());
        for ns in [&client, &router, &balancer] {
            self.add_ns(ns);
        }
        for k in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"] {
            ns_sh(&router, &["sysctl", "-qw", k]);
        }
        ns_sh(&router, &["ip", "link", "add", "br0", "type", "bridge"]);
        // A MAC of its own: a bridge otherwise takes its lowest port's, and
        // changes it when that port goes (a backend's link deleted), while the
        // balancer sends each nat flow's replies to the MAC its first frame came
        // from (tests/tests/nat_failure.rs saw every older flow stall).
        ns_sh(&router, &["ip", "link", "set", "br0", "address", "02:00:c6:12:33:01"]);
        ns_sh(&router, &["sysctl", "-qw", "net.ipv6.conf.br0.accept_dad=0"]);
        ns_sh(&router, &["ip", "link", "set", "br0", "up"]);
        ns_sh(&router, &["ip", "addr", "add", "198.18.51.1/24", "dev", "br0"]);
        ns_sh(&router, &["ip", "addr", "add", "2001:db8:51::1/64", "dev", "br0", "nodad"]);
        let gw = |s: &str| (format!("198.18.{s}.1"), format!("2001:db8:{s}::1"));
        self.wire(&client, "p-cl", false, (CLIENT4, "2001:db8:50::2".parse().unwrap()), gw("50"));
        ns_sh(&router, &["sysctl", "-qw", "net.ipv6.conf.p-cl.accept_dad=0"]);
        ns_sh(&router, &["ip", "addr", "add", "198.18.50.1/24", "dev", "p-cl"]);
        ns_sh(&router, &["ip", "addr", "add", "2001:db8:50::1/64", "dev", "p-cl", "nodad"]);
        self.wire(&balancer, "p-lb", true, (BALANCER4, BALANCER6), gw("51"));
        // The balancer's kernel forwards nothing: XDP translates both directions.
        ns_sh(&balancer, &["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
        ns_sh(&router, &["ip", "route", "add", &format!("{VIP4}/32"), "via", &BALANCER4.to_string()]);
        ns_sh(&router, &["ip", "-6", "route", "add", &format!("{VIP6}/128"), "via", &BALANCER6.to_string()]);
        if let Some(r2) = self.r2.clone() {
            self.build_r2(&r2);
        } else {
            let lb_gw = (BALANCER4.to_string(), BALANCER6.to_string());
            for i in 0..self.backends.len() {
                let (ns, v4, v6) = (self.backends[i].ns.clone(), self.backends[i].v4, self.backends[i].v6);
                self.add_ns(&ns);
                self.wire(&ns, &format!("p-b{}", i + 1), true, (v4, v6), lb_gw.clone());
            }
        }
        // Native XDP_TX from the balancer's eth0 needs a program on its peer.
        let ebpf = netns::run_in(&router, move || {
            let mut ebpf = aya::Ebpf::load(lb_agent::object::OBJECT).expect("load the XDP object");
            let prog: &mut aya::programs::Xdp =
                ebpf.program_mut(lb_common::PROG_PASS).expect("lb_pass").try_into().expect("XDP");
            prog.load().expect("load lb_pass");
            prog.attach("p-lb", aya::programs::XdpMode::Driver).expect("attach lb_pass to the router's port");
            ebpf
        });
        self.pass = Some(ebpf);
    }

    /// The FULLNAT lab's back end: `r2` on the segment (no route to the clients),
    /// the backends behind it, the SNAT addresses on the balancer and its route
    /// to the backends' subnet via `r2`.
    fn build_r2(&mut self, r2: &str) {
        self.add_ns(r2);
        for k in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"] {
            ns_sh(r2, &["sysctl", "-qw", k]);
        }
        self.wire(r2, "p-r2", true, (R2_4, R2_6), ("198.18.51.1".into(), "2001:db8:51::1".into()));
        // No route to the clients: r2 knows its two subnets and nothing else.
        ns_sh(r2, &["ip", "route", "del", "default"]);
        ns_sh(r2, &["ip", "-6", "route", "del", "default"]);
        ns_sh(r2, &["ip", "link", "add", "br1", "type", "bridge"]);
        // A MAC of its own, as br0's: the backends' gateway keeps its MAC when a
        // backend's link goes (tests/tests/nat_failure.rs).
        ns_sh(r2, &["ip", "link", "set", "br1", "address", "02:00:c6:12:35:01"]);
        ns_sh(r2, &["sysctl", "-qw", "net.ipv6.conf.br1.accept_dad=0"]);
        ns_sh(r2, &["ip", "link", "set", "br1", "up"]);
        ns_sh(r2, &["ip", "addr", "add", "198.18.53.1/24", "dev", "br1"]);
        ns_sh(r2, &["ip", "addr", "add", "2001:db8:53::1/64", "dev", "br1", "nodad"]);
        let gw = ("198.18.53.1".to_string(), "2001:db8:53::1".to_string());
        for i in 0..self.backends.len() {
            let (ns, v4, v6) = (self.backends[i].ns.clone(), self.backends[i].v4, self.backends[i].v6);
            self.add_ns(&ns);
            self.wire_to(r2, "br1", &ns, &format!("p-b{}", i + 1), true, (v4, v6), gw.clone());
        }
        let lb = self.balancer.clone();
        ns_sh(&lb, &["ip", "addr", "add", &format!("{SNAT4}/24"), "dev", "eth0"]);
        ns_sh(&lb, &["ip", "addr", "add", &format!("{SNAT6}/64"), "dev", "eth0", "nodad"]);
        ns_sh(&lb, &["ip", "route", "add", "198.18.53.0/24", "via", &R2_4.to_string()]);
        ns_sh(&lb, &["ip", "-6", "route", "add", "2001:db8:53::/64", "via", &R2_6.to_string()]);
    }

    /// HTTP on `ports`, UDP on 53 and echo on `ECHO_PORT` on backend `i`, each
    /// answering with its name (UDP bound to the backend's own addresses: a NAT
    /// backend answers from them, the balancer turns them into the VIP).
    pub fn start_servers_on(&mut self, i: usize, ports: &[u16]) {
        let b = &self.backends[i];
        for p in ports {
            self.servers.push(traffic::http_server(&b.ns, *p, &b.name));
        }
        let udp = [SocketAddr::new(IpAddr::V4(b.v4), 53), SocketAddr::new(IpAddr::V6(b.v6), 53)];
        self.servers.extend(traffic::udp_server(&b.ns, &udp, &b.name));
        self.servers.push(traffic::echo_server(&b.ns, ECHO_PORT, &b.name));
    }

    pub fn start_servers(&mut self, ports: &[u16]) {
        for i in 0..self.backends.len() {
            self.start_servers_on(i, ports);
        }
    }

    pub fn write_config(&self, yaml: &str) -> PathBuf {
        crate::lab::write_config_in(&self.dir, "lb.yaml", yaml)
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("ctl.sock")
    }

    pub fn pin_dir(&self) -> PathBuf {
        crate::lab::pin_dir_of(&self.id)
    }

    /// Starts `lb-agent run` on the balancer's eth0 (native XDP).
    pub fn start_agent(&self, config: &Path) -> Agent {
        let mut args: Vec<String> = ["--iface", "eth0", "--xdp-mode", "native", "--metrics-listen", "off", "--config"].map(String::from).into();
        args.push(config.display().to_string());
        args.push("--control-socket".into());
        args.push(self.control_socket().display().to_string());
        spawn_agent(&self.balancer, &args, self.pin_dir(), self.dir.join("agent.log"), &[])
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        self.servers.clear();
        self.pass = None;
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
