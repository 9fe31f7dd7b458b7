//! The interface and backend MAC addresses, from the kernel through rtnetlink.
//!
//! DR mode sends frames to a backend's MAC on the balancer's own segment, so every
//! backend must be a neighbour on the attached interface. A backend that has no
//! neighbour entry yet is probed (a datagram to the discard port makes the kernel
//! run ARP or ND for it) and looked up again; one that still cannot be resolved is
//! reported and left out of the tables, never sent to a zero MAC.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use futures::TryStreamExt;
use netlink_packet_route::{
    link::{LinkAttribute, LinkXdp},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
};
use rtnetlink::{Handle, IpVersion};

pub type Mac = [u8; 6];

#[derive(Debug, thiserror::Error)]
pub enum NeighError {
    #[error("cannot open an rtnetlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("interface {iface}: {source}")]
    Link { iface: String, source: Box<rtnetlink::Error> },
    #[error("interface {iface} does not exist")]
    NoSuchInterface { iface: String },
    #[error("interface {iface} has no Ethernet MAC address")]
    NoMac { iface: String },
    #[error("reading the neighbour table: {0}")]
    Dump(#[source] Box<rtnetlink::Error>),
}

/// An interface the balancer is attached to.
#[derive(Debug, Clone)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: Mac,
    /// Id of the XDP program attached to it when it was looked up, if any.
    pub xdp_prog: Option<u32>,
    /// The interface's MTU (0 when the kernel did not say).
    pub mtu: u32,
}

/// A live rtnetlink connection (clones share it).
#[derive(Clone)]
pub struct Neighbours {
    handle: Handle,
}

impl Neighbours {
    /// Opens the connection; its I/O task runs on the current tokio runtime.
    pub fn connect() -> Result<Self, NeighError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NeighError::Connect)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The rtnetlink handle (for other requests on the same connection).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Index and MAC of `name`.
    pub async fn interface(&self, name: &str) -> Result<Interface, NeighError> {
        let mut links = self.handle.link().get().match_name(name.to_string()).execute();
        let link = match links.try_next().await {
            Ok(Some(link)) => link,
            Ok(None) => return Err(NeighError::NoSuchInterface { iface: name.into() }),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                return Err(NeighError::NoSuchInterface { iface: name.into() });
            }
            Err(source) => return Err(NeighError::Link { iface: name.into(), source: Box::new(source) }),
        };
        let mac = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(b) if b.len() == 6 => Some([b[0], b[1], b[2], b[3], b[4], b[5]]),
                _ => None,
            })
            .ok_or_else(|| NeighError::NoMac { iface: name.into() })?;
        let xdp_prog = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Xdp(xdp) => xdp.iter().find_map(|x| match x {
                LinkXdp::ProgId(id) | LinkXdp::DrvProgId(id) | LinkXdp::SkbProgId(id) | LinkXdp::HwProgId(id)
                    if *id != 0 =>
                {
                    Some(*id)
                }
                _ => None,
            }),
            _ => None,
        });
        let mtu = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
            .unwrap_or(0);
        Ok(Interface { name: name.into(), index: link.header.index, mac, xdp_prog, mtu })
    }


    /// The interface's global addresses, in the kernel's order (the first of a
    /// family is its primary address).
    pub async fn addresses(&self, ifindex: u32) -> Result<Vec<IpAddr>, NeighError> {
        use netlink_packet_route::address::{AddressAttribute, AddressScope};
        let mut out = Vec::new();
        let mut dump = self.handle.address().get().set_link_index_filter(ifindex).execute();
        while let Some(msg) = dump.try_next().await.map_err(|e| NeighError::Dump(Box::new(e)))? {
            if msg.header.scope != AddressScope::Universe {
                continue;
            }
            for a in &msg.attributes {
                if let AddressAttribute::Address(ip) = a {
                    out.push(*ip);
                }
            }
        }
        Ok(out)
    }

    /// The usable neighbour entries on `ifindex`: address -> MAC.
    pub async fn table(&self, ifindex: u32) -> Result<BTreeMap<IpAddr, Mac>, NeighError> {
        let mut out = BTreeMap::new();
        for version in [IpVersion::V4, IpVersion::V6] {
            let mut dump = self.handle.neighbours().get().set_family(version).execute();
            while let Some(msg) = dump.try_next().await.map_err(|e| NeighError::Dump(Box::new(e)))? {
                if msg.header.ifindex != ifindex {
                    continue;
                }
                if let Some((ip, mac)) = usable_entry(&msg) {
                    out.insert(ip, mac);
                }
            }
        }
        Ok(out)
    }

    /// Resolves every address in `wanted` to a MAC on `iface`, probing the ones the
    /// kernel does not know yet for up to `timeout`. Returns the resolved ones; the
    /// rest are missing from the map (the caller reports them).
    pub async fn resolve(
        &self,
        iface: &Interface,
        wanted: &[IpAddr],
        timeout: Duration,
    ) -> Result<BTreeMap<IpAddr, Mac>, NeighError> {
        let deadline = Instant::now() + timeout;
        let mut last_probe: Option<Instant> = None;
        loop {
            let table = self.table(iface.index).await?;
            let missing: Vec<IpAddr> = wanted.iter().copied().filter(|a| !table.contains_key(a)).collect();
            if missing.is_empty() || Instant::now() >= deadline {
                return Ok(wanted.iter().filter_map(|a| table.get(a).map(|m| (*a, *m))).collect());
            }
            if last_probe.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                for addr in &missing {
                    probe(&iface.name, *addr);
                }
                last_probe = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn usable_entry(msg: &NeighbourMessage) -> Option<(IpAddr, Mac)> {
    match msg.header.state {
        NeighbourState::Reachable
        | NeighbourState::Stale
        | NeighbourState::Delay
        | NeighbourState::Probe
        | NeighbourState::Permanent => {}
        _ => return None,
    }
    let mut ip = None;
    let mut mac = None;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(IpAddr::V4(*a)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => ip = Some(IpAddr::V6(*a)),
            NeighbourAttribute::LinkLocalAddress(b) if b.len() == 6 => {
                mac = Some([b[0], b[1], b[2], b[3], b[4], b[5]])
            }
            _ => {}
        }
    }
    let mac = mac?;
    if mac == [0; 6] {
        return None;
    }
    Some((ip?, mac))
}

/// Makes the kernel resolve `addr` on `iface`: a one-byte datagram to the discard
/// port from a socket bound to the interface. Failures only mean no probe. The
/// kernel tries again even when the neighbour entry is FAILED.
pub fn probe(iface: &str, addr: IpAddr) {
    let bind: SocketAddr = match addr {
        IpAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        IpAddr::V6(_) => "[::]:0".parse().expect("literal"),
    };
    let Ok(sock) = UdpSocket::bind(bind) else { return };
    if socket2::SockRef::from(&sock).bind_device(Some(iface.as_bytes())).is_err() {
        tracing::debug!(%addr, iface, "SO_BINDTODEVICE failed for the neighbour probe");
    }
    if let Err(e) = sock.send_to(&[0], SocketAddr::new(addr, 9)) {
        tracing::debug!(%addr, error = %e, "neighbour probe not sent");
    }
}

/// A change in the kernel's neighbour table.
#[derive(Debug, Clone)]
pub struct NeighUpdate {
    pub ifindex: u32,
    pub addr: IpAddr,
    /// The usable MAC, or `None` when the entry is incomplete, failed or deleted.
    pub mac: Option<Mac>,
    /// The entry went to FAILED: the neighbour does not answer ARP/ND.
    pub failed: bool,
}

/// Subscribes to neighbour-table changes (rtnetlink multicast group RTMGRP_NEIGH).
pub fn watch() -> Result<tokio::sync::mpsc::UnboundedReceiver<NeighUpdate>, NeighError> {
    use netlink_packet_core::NetlinkPayload;
    use netlink_packet_route::RouteNetlinkMessage;

    let (mut conn, _handle, mut messages) = rtnetlink::new_connection().map_err(NeighError::Connect)?;
    let groups = netlink_sys::SocketAddr::new(0, rtnetlink::constants::RTMGRP_NEIGH);
    {
        use netlink_sys::AsyncSocket;
        conn.socket_mut().socket_mut().bind(&groups).map_err(NeighError::Connect)?;
    }
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        use futures::StreamExt;
        while let Some((msg, _)) = messages.next().await {
            let (m, deleted) = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(m)) => (m, false),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(m)) => (m, true),
                _ => continue,
            };
            let Some(addr) = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                _ => None,
            }) else {
                continue;
            };
            let mac = if deleted { None } else { usable_entry(&m).map(|(_, mac)| mac) };
            let failed = m.header.state == NeighbourState::Failed;
            if tx.send(NeighUpdate { ifindex: m.header.ifindex, addr, mac, failed }).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &Mac) -> String {
    let mut s = String::with_capacity(17);
    write_mac(&mut s, mac);
    s
}

/// Appends `aa:bb:cc:dd:ee:ff` to `s`.
pub fn write_mac(s: &mut String, mac: &Mac) {
    // By hand: the status formats one per backend every second.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in mac.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
}
