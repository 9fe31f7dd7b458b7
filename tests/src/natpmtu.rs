//! Narrow links for the NAT lab (`natlab.rs`): the PMTU black hole on either side
//! of a `nat` balancer.
//!
//! - On the clients' side, `narrow_client_link` lowers the router's port towards
//!   the client to 1400 (the client keeps 1500, so it announces an MSS of 1460): a
//!   full-sized reply, translated to come from the VIP, makes the router send
//!   "fragmentation needed" / "packet too big" to the VIP, that is to the
//!   balancer, which must translate it for the backend.
//! - On the backends' side, `FarBackend` is a backend behind a router whose link
//!   to it is 1400 bytes:
//!
//! ```text
//!   balancer ── br (router ns) ── rb 198.18.51.20 ─(eth1, MTU 1400)─ fb 198.18.53.2
//!                                    (default via the balancer)      (default via rb)
//! ```
//! (2001:db8:51::20, 2001:db8:53::2). The balancer routes 198.18.53.0/24 via rb.
//! A full-sized segment of an upload, translated to fb, makes rb send its error
//! to the client, through the balancer (rb's default route), which must
//! translate it for the client. Namespaces are removed on drop.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    natlab::NatLab,
    netns::{self, ns_sh, sh},
    traffic::{self, Server},
};

/// MTU of the narrow links.
pub const NARROW_MTU: u32 = 1400;
pub const FAR_BACKEND4: Ipv4Addr = Ipv4Addr::new(198, 18, 53, 2);
pub const FAR_BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x53, 0, 0, 0, 0, 2);

/// Lowers the MTU of the router's port towards the client.
pub fn narrow_client_link(lab: &NatLab) {
    ns_sh(&lab.router, &["ip", "link", "set", "p-cl", "mtu", &NARROW_MTU.to_string()]);
}

/// The FULLNAT lab (`NatLab::fullnat`): lowers the MTU of `r2`'s bridge towards
/// the backends (their own links keep 1500, so they announce an MSS of 1460): a
/// full-sized segment of an upload, translated to come from the SNAT address,
/// makes `r2` send its error to the SNAT address, that is to the balancer,
/// which must translate it for the client.
pub fn narrow_backend_bridge(lab: &NatLab) {
    let r2 = lab.r2.as_ref().expect("a FULLNAT lab (NatLab::fullnat)");
    ns_sh(r2, &["ip", "link", "set", "br1", "mtu", &NARROW_MTU.to_string()]);
}

/// Forgets every path MTU learned in `ns`.
pub fn forget_pmtu(ns: &str) {
    ns_sh(ns, &["ip", "route", "flush", "cache"]);
    ns_sh(ns, &["ip", "-6", "route", "flush", "cache"]);
}

pub struct FarBackend {
    pub router: String,
    pub ns: String,
}

impl FarBackend {
    pub fn new(lab: &NatLab) -> FarBackend {
        let far = FarBackend { router: format!("{}-rb", lab.id), ns: format!("{}-fb", lab.id) };
        for ns in [&far.router, &far.ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            sh(&["ip", "netns", "add", ns]);
            ns_sh(ns, &["ip", "link", "set", "lo", "up"]);
            ns_sh(ns, &["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"]);
        }
        let (rb, fb) = (far.router.as_str(), far.ns.as_str());
        sh(&["ip", "link", "add", "eth0", "netns", rb, "type", "veth", "peer", "name", "p-rb", "netns", &lab.router]);
        ns_sh(&lab.router, &["ip", "link", "set", "p-rb", "master", "br0", "up"]);
        sh(&["ip", "link", "add", "eth1", "netns", rb, "type", "veth", "peer", "name", "eth0", "netns", fb]);
        ns_sh(rb, &["ip", "link", "set", "eth1", "mtu", &NARROW_MTU.to_string()]);
        for (ns, dev, v4, v6) in [
            (rb, "eth0", "198.18.51.20/24", "2001:db8:51::20/64"),
            (rb, "eth1", "198.18.53.1/24", "2001:db8:53::1/64"),
            (fb, "eth0", "198.18.53.2/24", "2001:db8:53::2/64"),
        ] {
            ns_sh(ns, &["ip", "addr", "add", v4, "dev", dev]);
            ns_sh(ns, &["ip", "addr", "add", v6, "dev", dev, "nodad"]);
            ns_sh(ns, &["ip", "link", "set", dev, "up"]);
            // Lab-only, as in `NatLab`: full checksums on the wire.
            ns_sh(ns, &["ethtool", "-K", dev, "tx", "off"]);
        }
        for k in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"] {
            ns_sh(rb, &["sysctl", "-qw", k]);
        }
        // rb's way to the clients is the balancer (it is the backends' gateway).
        ns_sh(rb, &["ip", "route", "add", "default", "via", &crate::natlab::BALANCER4.to_string()]);
        ns_sh(rb, &["ip", "-6", "route", "add", "default", "via", &crate::natlab::BALANCER6.to_string()]);
        ns_sh(fb, &["ip", "route", "add", "default", "via", "198.18.53.1"]);
        ns_sh(fb, &["ip", "-6", "route", "add", "default", "via", "2001:db8:53::1"]);
        ns_sh(&lab.balancer, &["ip", "route", "add", "198.18.53.0/24", "via", "198.18.51.20"]);
        ns_sh(&lab.balancer, &["ip", "-6", "route", "add", "2001:db8:53::/64", "via", "2001:db8:51::20"]);
        far
    }
}

impl Drop for FarBackend {
    fn drop(&mut self) {
        for ns in [&self.router, &self.ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Size of an upload (`upload`, `sink_server`).
pub const UPLOAD: usize = 1 << 20;

/// A TCP server on `[::]:port` in `ns` that reads `UPLOAD` bytes and answers
/// `got N\n`, a thread per connection (reads give up after 10 s, so a stalled
/// upload never holds up the next).
pub fn sink_server(ns: &str, port: u16) -> Server {
    traffic::tcp_server(ns, port, |mut conn| {
        std::thread::spawn(move || {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            let mut got = 0usize;
            let mut buf = vec![0u8; 65536];
            while got < UPLOAD {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            let _ = conn.write_all(format!("got {got}\n").as_bytes());
        });
    })
}

/// Uploads `UPLOAD` bytes to `addr:port` from `ns` within `deadline`: the count
/// the server confirms, or why it failed.
pub fn upload(ns: &str, addr: IpAddr, port: u16, deadline: Duration) -> Result<usize, String> {
    netns::run_in(ns, move || {
        let start = Instant::now();
        let mut s = TcpStream::connect_timeout(&SocketAddr::new(addr, port), Duration::from_secs(3))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_write_timeout(Some(deadline)).map_err(|e| e.to_string())?;
        let body = vec![b'u'; UPLOAD];
        s.write_all(&body).map_err(|e| format!("send: {e}"))?;
        let _ = s.shutdown(Shutdown::Write);
        let left = deadline.checked_sub(start.elapsed()).filter(|d| !d.is_zero()).ok_or("stalled sending")?;
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).map_err(|e| format!("stalled: no confirmation ({e})"))?;
        let n = answer.trim().strip_prefix("got ").and_then(|n| n.parse().ok());
        n.ok_or_else(|| format!("answer {answer:?}"))
    })
}
