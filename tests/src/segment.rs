//! Building blocks of the HA labs: namespaces removed on drop, hosts plugged into a
//! bridge (an L2 segment in a namespace of its own), and the `lb_pass` program on
//! the bridge ports that face balancers (native XDP_TX on a veth needs one).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    process::Command,
};

use crate::netns::{self, ns_sh, sh};

/// Namespaces created by a lab, deleted (in reverse order) on drop.
#[derive(Default)]
pub struct Namespaces(Vec<String>);

impl Namespaces {
    pub fn add(&mut self, ns: &str) {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
        sh(&["ip", "netns", "add", ns]);
        self.0.push(ns.to_string());
        ns_sh(ns, &["ip", "link", "set", "lo", "up"]);
    }

    /// A namespace holding bridge `br0` (no multicast snooping: VRRP and ND flood).
    pub fn add_switch(&mut self, ns: &str) {
        self.add(ns);
        ns_sh(ns, &["ip", "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"]);
        ns_sh(ns, &["ip", "link", "set", "br0", "up"]);
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in self.0.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}

/// Addresses on `dev` in `ns` (CIDR strings), link up, TX checksum offload off.
pub fn addresses(ns: &str, dev: &str, v4: &str, v6: &str) {
    ns_sh(ns, &["sysctl", "-qw", &format!("net.ipv6.conf.{dev}.accept_dad=0")]);
    ns_sh(ns, &["ip", "addr", "add", v4, "dev", dev]);
    ns_sh(ns, &["ip", "addr", "add", v6, "dev", dev, "nodad"]);
    ns_sh(ns, &["ip", "link", "set", dev, "up"]);
    // Lab-only: full checksums on the wire (native XDP on veth loses offload state).
    ns_sh(ns, &["ethtool", "-K", dev, "tx", "off"]);
}

/// Plugs `dev` of `ns` into `switch`'s br0 as `port`, with a /24 and a /64.
pub fn plug(switch: &str, ns: &str, dev: &str, port: &str, v4: Ipv4Addr, v6: Ipv6Addr) {
    sh(&["ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", port, "netns", switch]);
    ns_sh(switch, &["ip", "link", "set", port, "master", "br0", "up"]);
    addresses(ns, dev, &format!("{v4}/24"), &format!("{v6}/64"));
}

/// Plugs a balancer: as `plug`, and its port gets no unknown-unicast flooding. A
/// NIC drops unicast frames for other MACs; a veth does not, and the XDP program
/// runs before the stack would. Without this, frames for a dead balancer (its MAC
/// forgotten by the bridge, so flooded) would be forwarded by the others and hide
/// the real failover time.
pub fn plug_balancer(switch: &str, ns: &str, port: &str, v4: Ipv4Addr, v6: Ipv6Addr) {
    plug(switch, ns, "eth0", port, v4, v6);
    ns_sh(switch, &["bridge", "link", "set", "dev", port, "flood", "off"]);
    // The balancer must not route the VIPs itself.
    ns_sh(ns, &["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
}

/// Attaches `lb_pass` to `ports` of `switch`; detached when the result is dropped.
pub fn pass_on_ports(switch: &str, ports: Vec<String>) -> aya::Ebpf {
    netns::run_in(switch, move || {
        let mut ebpf = aya::Ebpf::load(lb_agent::object::OBJECT).expect("load the XDP object");
        let prog: &mut aya::programs::Xdp =
            ebpf.program_mut(lb_common::PROG_PASS).expect("lb_pass").try_into().expect("lb_pass is XDP");
        prog.load().expect("load lb_pass");
        for port in &ports {
            prog.attach(port, aya::programs::XdpMode::Driver).expect("attach lb_pass to a switch port");
        }
        ebpf
    })
}
