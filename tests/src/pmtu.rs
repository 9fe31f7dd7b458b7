//! A far client behind a router with a narrow link, added to a DR `Lab`: the PMTU
//! black hole in a box.
//!
//! ```text
//!   far client ─(eth0, MTU 1500)──(eth1, MTU 1400)─ router ─(eth0)─ lab switch
//!   198.18.50.2 / 2001:db8:50::2                    198.18.0.254 / 2001:db8::fe
//! ```
//!
//! The client's own interface keeps 1500, so it announces an MSS of 1460; the
//! backends answer it directly (DR) through the router, whose egress towards the
//! client is 1400. A full-sized reply makes the router send "fragmentation needed"
//! (ICMPv6 "packet too big") to the reply's source, the VIP, that is to the
//! balancer. Only if the balancer sends it on to the backend does the download go
//! through. Namespaces are removed on drop.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    lab::{Lab, BALANCER4, BALANCER6, VIP4, VIP6},
    netns::{self, ns_sh, sh},
    traffic::{self, Server},
};

pub const FAR4: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 2);
pub const FAR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x50, 0, 0, 0, 0, 2);
pub const ROUTER4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
pub const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe);
/// MTU of the router's link towards the far client.
pub const NARROW_MTU: u32 = 1400;

pub struct FarClient {
    pub router: String,
    pub client: String,
}

impl FarClient {
    /// Adds the router and the far client to `lab`, and routes to the far client
    /// on every backend.
    pub fn new(lab: &Lab) -> FarClient {
        let far = FarClient { router: format!("{}-rt", lab.id), client: format!("{}-far", lab.id) };
        for ns in [&far.router, &far.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            sh(&["ip", "netns", "add", ns]);
            ns_sh(ns, &["ip", "link", "set", "lo", "up"]);
            ns_sh(ns, &["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"]);
        }
        let (rt, cl) = (far.router.as_str(), far.client.as_str());
        sh(&["ip", "link", "add", "eth0", "netns", rt, "type", "veth", "peer", "name", "p-rt", "netns", &lab.switch]);
        ns_sh(&lab.switch, &["ip", "link", "set", "p-rt", "master", "br0", "up"]);
        sh(&["ip", "link", "add", "eth1", "netns", rt, "type", "veth", "peer", "name", "eth0", "netns", cl]);
        ns_sh(rt, &["ip", "link", "set", "eth1", "mtu", &NARROW_MTU.to_string()]);
        for (ns, dev, v4, v6) in [
            (rt, "eth0", format!("{ROUTER4}/24"), format!("{ROUTER6}/64")),
            (rt, "eth1", "198.18.50.1/24".to_string(), "2001:db8:50::1/64".to_string()),
            (cl, "eth0", format!("{FAR4}/24"), format!("{FAR6}/64")),
        ] {
            ns_sh(ns, &["ip", "addr", "add", &v4, "dev", dev]);
            ns_sh(ns, &["ip", "addr", "add", &v6, "dev", dev, "nodad"]);
            ns_sh(ns, &["ip", "link", "set", dev, "up"]);
            // Lab-only, as in `Lab`: full checksums on the wire.
            ns_sh(ns, &["ethtool", "-K", dev, "tx", "off"]);
        }
        ns_sh(rt, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        ns_sh(rt, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        ns_sh(rt, &["ip", "route", "add", &format!("{VIP4}/32"), "via", &BALANCER4.to_string()]);
        ns_sh(rt, &["ip", "-6", "route", "add", &format!("{VIP6}/128"), "via", &BALANCER6.to_string()]);
        ns_sh(cl, &["ip", "route", "add", "default", "via", "198.18.50.1"]);
        ns_sh(cl, &["ip", "-6", "route", "add", "default", "via", "2001:db8:50::1"]);
        for b in &lab.backends {
            ns_sh(&b.ns, &["ip", "route", "add", "198.18.50.0/24", "via", &ROUTER4.to_string()]);
            ns_sh(&b.ns, &["ip", "-6", "route", "add", "2001:db8:50::/64", "via", &ROUTER6.to_string()]);
        }
        far
    }

    /// Forgets every path MTU the backends learned (so each download starts
    /// from 1500 again).
    pub fn forget_pmtu(&self, lab: &Lab) {
        for b in &lab.backends {
            ns_sh(&b.ns, &["ip", "route", "flush", "cache"]);
            ns_sh(&b.ns, &["ip", "-6", "route", "flush", "cache"]);
        }
    }
}

impl Drop for FarClient {
    fn drop(&mut self) {
        for ns in [&self.router, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Body size of `bulk_server`.
pub const BULK: usize = 1 << 20;

/// An HTTP/1.0 server on `[::]:port` in `ns` answering every request with
/// `BULK` bytes (full-sized segments). Writes give up after 10 s, so a stalled
/// connection never keeps the server from stopping.
pub fn bulk_server(ns: &str, port: u16) -> Server {
    let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {BULK}\r\nConnection: close\r\n\r\n");
    traffic::tcp_server(ns, port, move |mut conn| {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf);
        let body = vec![b'x'; BULK];
        let _ = conn.write_all(head.as_bytes()).and_then(|_| conn.write_all(&body));
    })
}

/// Downloads from `addr:port` in `ns` within `deadline`: the bytes received, or
/// why it failed (with the bytes received by then).
pub fn download(ns: &str, addr: IpAddr, port: u16, deadline: Duration) -> Result<usize, String> {
    netns::run_in(ns, move || {
        let start = Instant::now();
        let mut s = TcpStream::connect_timeout(&SocketAddr::new(addr, port), Duration::from_secs(3))
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(b"GET /bulk HTTP/1.0\r\n\r\n").map_err(|e| format!("request: {e}"))?;
        let mut got = 0usize;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.checked_sub(start.elapsed()).filter(|d| !d.is_zero());
            let Some(left) = left else { return Err(format!("stalled: {got} bytes in {deadline:?}")) };
            s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            match s.read(&mut buf) {
                Ok(0) => return Ok(got),
                Ok(n) => got += n,
                Err(e) => return Err(format!("stalled: {got} bytes in {deadline:?} ({e})")),
            }
        }
    })
}
