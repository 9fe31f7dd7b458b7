//! A routed lab for tunnel modes: client — router — balancer, and the backends in
//! two other subnets behind the router (no L2 path from the balancer to them).
//! Backends carry the VIPs on `lo` and decapsulate with `lb-agent decap`, started
//! by `lb-realserver.sh up-tunnel`; they answer clients directly through the
//! router. Everything lives in namespaces removed on drop.
//!
//! ```text
//!  client 198.18.40.2 ── r ── 198.18.41.2 balancer (XDP, eth0)
//!                        │
//!                        ├── br-a 198.18.42.1/24 ── b1 .42.11, b2 .42.12
//!                        └── s-b  198.18.43.1/24 ── b3 .43.11
//! ```
//! (and the same in 2001:db8:40::/64 .. 2001:db8:43::/64).

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

pub const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 44, 10);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x44, 0, 0, 0, 0, 0x10);
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 40, 2);
pub const BALANCER4: Ipv4Addr = Ipv4Addr::new(198, 18, 41, 2);
pub const BALANCER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x41, 0, 0, 0, 0, 2);
/// The echo service's port (long-lived connections).
pub const ECHO_PORT: u16 = 7000;


pub struct Host {
    pub ns: String,
    pub name: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

pub struct RoutedLab {
    pub id: String,
    pub client: String,
    pub router: String,
    pub balancer: String,
    pub backends: Vec<Host>,
    pub dir: PathBuf,
    namespaces: Vec<String>,
    servers: Vec<Server>,
    pass: Option<aya::Ebpf>,
    decap_up: Vec<usize>,
}

impl RoutedLab {
    #[expect(clippy::new_without_default, reason = "builds namespaces: not a default value")]
    pub fn new() -> RoutedLab {
        netns::require_root();
        let (id, dir) = crate::lab::lab_id("rt");
        let host = |i: usize, subnet: u8, last: u8| Host {
            ns: format!("{id}-b{i}"),
            name: format!("b{i}"),
            v4: Ipv4Addr::new(198, 18, subnet, last),
            // 2001:db8:SUBNET::LAST, the decimal digits read as hex, like the router's.
            v6: format!("2001:db8:{subnet}::{last}").parse().expect("address"),
        };
        let mut lab = RoutedLab {
            client: format!("{id}-cl"),
            router: format!("{id}-r"),
            balancer: format!("{id}-lb"),
            backends: vec![host(1, 42, 11), host(2, 42, 12), host(3, 43, 11)],
            id,
            dir,
            namespaces: Vec::new(),
            servers: Vec::new(),
            pass: None,
            decap_up: Vec::new(),
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

    /// `ns`'s eth0, wired to `port` in the router (or on `bridge` there).
    fn wire(&self, ns: &str, port: &str, bridge: Option<&str>, v4: Ipv4Addr, v6: Ipv6Addr, subnet: u16) {
        sh(&["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", &self.router]);
        ns_sh(ns, &["sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0"]);
        ns_sh(ns, &["ip", "addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
        ns_sh(ns, &["ip", "addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
        ns_sh(ns, &["ip", "link", "set", "eth0", "up"]);
        ns_sh(ns, &["ethtool", "-K", "eth0", "tx", "off"]);
        ns_sh(ns, &["ip", "route", "add", "default", "via", &format!("198.18.{subnet}.1")]);
        ns_sh(ns, &["ip", "-6", "route", "add", "default", "via", &format!("2001:db8:{subnet}::1")]);
        match bridge {
            Some(br) => ns_sh(&self.router, &["ip", "link", "set", port, "master", br, "up"]),
            None => ns_sh(&self.router, &["ip", "link", "set", port, "up"]),
        };
    }

    fn router_addr(&self, dev: &str, subnet: u16) {
        ns_sh(&self.router, &["sysctl", "-qw", &format!("net.ipv6.conf.{dev}.accept_dad=0")]);
        ns_sh(&self.router, &["ip", "addr", "add", &format!("198.18.{subnet}.1/24"), "dev", dev]);
        ns_sh(&self.router, &["ip", "addr", "add", &format!("2001:db8:{subnet}::1/64"), "dev", dev, "nodad"]);
    }

    fn build(&mut self) {
        let (client, router, balancer) = (self.client.clone(), self.router.clone(), self.balancer.clone());
        for ns in [&client, &router, &balancer] {
            self.add_ns(ns);
        }
        for k in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"] {
            ns_sh(&router, &["sysctl", "-qw", k]);
        }
        self.wire(&client, "p-cl", None, CLIENT4, "2001:db8:40::2".parse().unwrap(), 40);
        self.router_addr("p-cl", 40);
        self.wire(&balancer, "p-lb", None, BALANCER4, BALANCER6, 41);
        self.router_addr("p-lb", 41);
        ns_sh(&balancer, &["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
        ns_sh(&router, &["ip", "route", "add", &format!("{VIP4}/32"), "via", &BALANCER4.to_string()]);
        ns_sh(&router, &["ip", "-6", "route", "add", &format!("{VIP6}/128"), "via", &BALANCER6.to_string()]);
        ns_sh(&router, &["ip", "link", "add", "br-a", "type", "bridge"]);
        ns_sh(&router, &["ip", "link", "set", "br-a", "up"]);
        self.router_addr("br-a", 42);
        for i in 0..self.backends.len() {
            let (ns, v4, v6) = (self.backends[i].ns.clone(), self.backends[i].v4, self.backends[i].v6);
            self.add_ns(&ns);
            let subnet = v4.octets()[2] as u16;
            let bridge = (subnet == 42).then_some("br-a");
            self.wire(&ns, &format!("p-b{}", i + 1), bridge, v4, v6, subnet);
            if subnet == 43 {
                self.router_addr(&format!("p-b{}", i + 1), 43);
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
        for i in 0..self.backends.len() {
            self.decap(i, "up-tunnel");
            self.decap_up.push(i);
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

    /// HTTP on `ports`, UDP on 53 (both VIPs) and echo on `ECHO_PORT`, on every
    /// backend, each answering with its name.
    pub fn start_servers(&mut self, ports: &[u16]) {
        for b in &self.backends {
            for p in ports {
                self.servers.push(traffic::http_server(&b.ns, *p, &b.name));
            }
            let udp = [SocketAddr::new(IpAddr::V4(VIP4), 53), SocketAddr::new(IpAddr::V6(VIP6), 53)];
            self.servers.extend(traffic::udp_server(&b.ns, &udp, &b.name));
            self.servers.push(traffic::echo_server(&b.ns, ECHO_PORT, &b.name));
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
    pub fn start_agent(&self, config: &std::path::Path) -> Agent {
        let mut args: Vec<String> = ["--iface", "eth0", "--xdp-mode", "native", "--metrics-listen", "off", "--config"].map(String::from).into();
        args.push(config.display().to_string());
        args.push("--control-socket".into());
        args.push(self.control_socket().display().to_string());
        spawn_agent(&self.balancer, &args, self.pin_dir(), self.dir.join("agent.log"), &[])
    }
}

impl Drop for RoutedLab {
    fn drop(&mut self) {
        self.servers.clear();
        for i in std::mem::take(&mut self.decap_up) {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.decap(i, "down-tunnel")));
            let _ = std::fs::remove_dir_all(self.decap_pin_dir(i));
        }
        self.pass = None;
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
