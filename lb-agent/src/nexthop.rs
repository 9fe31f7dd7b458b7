//! Where a tunnel service's backends are reached: the kernel's route to each
//! backend (RTM_GETROUTE, the same lookup `ip route get` does) gives the next hop,
//! the backend itself when it is on-link or its gateway otherwise, and the frame
//! goes to that next hop's MAC (resolved like a DR backend's, `neigh.rs`). A
//! backend whose route leaves by another interface, or that has no route, is
//! reported and gets no traffic, like an unresolved one. DR backends are their
//! own next hop (they must be on the interface's segment).
//!
//! Two-arm (`--backend-iface`), every backend's route is looked up: one on the
//! backend interface gets `EGRESS_BACKEND` (its frames are redirected there),
//! one on the client interface `EGRESS_SAME`; a route by any other interface is
//! reported as above.
//!
//! The agent looks the routes up again every 2 s and on reloads, so a route that
//! changes moves the backends' frames to the new next hop.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use futures::StreamExt;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::{
    route::{RouteAddress, RouteAttribute, RouteMessage},
    AddressFamily, RouteNetlinkMessage,
};

use lb_common::{EGRESS_BACKEND, EGRESS_SAME};

use crate::{
    config::Config,
    neigh::{Interface, Mac, Neighbours},
};

/// Why a tunnel backend has no next hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoute {
    /// The kernel has no route to it.
    Unreachable(String),
    /// Its route leaves by another interface (index).
    OtherInterface(u32),
}

impl std::fmt::Display for NoRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoRoute::Unreachable(e) => write!(f, "no route ({e})"),
            NoRoute::OtherInterface(i) => write!(f, "its route leaves by another interface (index {i})"),
        }
    }
}

/// The next hop of every backend of a configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NextHops {
    /// Looked-up backends: the neighbour their frames go to and the interface
    /// it is on (`Backend::egress`), or why none.
    via: BTreeMap<IpAddr, Result<Hop, NoRoute>>,
}

/// Where a backend's frames go: the neighbour and its interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hop {
    neighbour: IpAddr,
    /// `EGRESS_SAME` (the client interface) or `EGRESS_BACKEND`.
    egress: u8,
}

/// The interfaces the balancer is attached to: the one clients' frames arrive
/// on (`--iface`) and, two-arm, the one backends are reached by
/// (`--backend-iface`).
#[derive(Debug, Clone)]
pub struct Arms {
    pub client: Interface,
    pub backend: Option<Interface>,
}

impl Arms {
    /// The interface of egress `e` (`Backend::egress`).
    pub fn of(&self, e: u8) -> &Interface {
        match &self.backend {
            Some(b) if e == EGRESS_BACKEND => b,
            _ => &self.client,
        }
    }

    /// The interface tunnelled frames leave by (for the MTU): the backend
    /// interface two-arm.
    pub fn tunnel_iface(&self) -> &Interface {
        self.backend.as_ref().unwrap_or(&self.client)
    }

    /// Whether `ifindex` is one of them.
    pub fn has(&self, ifindex: u32) -> bool {
        self.client.index == ifindex || self.backend.as_ref().is_some_and(|b| b.index == ifindex)
    }
}

impl NextHops {
    /// Whether `config`'s backends have routes to follow: routed (tunnel or
    /// `nat`) services' always, every backend's two-arm (a DR backend's route
    /// says which interface it is on).
    pub fn needed(config: &Config, arms: &Arms) -> bool {
        arms.backend.is_some() || config.services.iter().any(|s| s.forwarding.is_routed())
    }

    /// Looks up the route of every routed (tunnel or `nat`) backend of `config`,
    /// and two-arm of every backend: one whose route leaves by the backend
    /// interface gets `EGRESS_BACKEND`. One-arm, DR backends need none (they are
    /// on the interface's segment); two-arm, a DR backend is its own next hop on
    /// the interface its route names.
    pub async fn lookup(nl: &Neighbours, arms: &Arms, config: &Config) -> NextHops {
        let two_arm = arms.backend.as_ref();
        let mut wanted: BTreeMap<IpAddr, bool> = BTreeMap::new();
        for s in &config.services {
            if !s.forwarding.is_routed() && two_arm.is_none() {
                continue;
            }
            for b in &s.backends {
                *wanted.entry(b.address).or_default() |= s.forwarding.is_routed();
            }
        }
        let mut via = BTreeMap::new();
        for (addr, routed) in wanted {
            let hop = match route_to(nl, addr).await {
                Ok((gateway, oif)) => {
                    let neighbour = if routed { gateway.unwrap_or(addr) } else { addr };
                    if oif == arms.client.index {
                        Ok(Hop { neighbour, egress: EGRESS_SAME })
                    } else if two_arm.is_some_and(|b| b.index == oif) {
                        Ok(Hop { neighbour, egress: EGRESS_BACKEND })
                    } else {
                        Err(NoRoute::OtherInterface(oif))
                    }
                }
                Err(e) => Err(NoRoute::Unreachable(e)),
            };
            via.insert(addr, hop);
        }
        NextHops { via }
    }

    /// The neighbour `backend`'s frames go to: itself (DR, or on-link), its
    /// gateway, or `None` when it has no usable route.
    pub fn neighbour(&self, backend: IpAddr) -> Option<IpAddr> {
        match self.via.get(&backend) {
            None => Some(backend),
            Some(hop) => hop.as_ref().ok().map(|h| h.neighbour),
        }
    }

    /// The interface `backend`'s frames leave by (`Backend::egress`).
    pub fn egress(&self, backend: IpAddr) -> u8 {
        match self.via.get(&backend) {
            Some(Ok(h)) => h.egress,
            _ => EGRESS_SAME,
        }
    }

    /// The interface neighbour `addr` is on (as `egress`).
    pub fn egress_of_neighbour(&self, addr: IpAddr) -> u8 {
        let on_backend = self.via.values().any(|h| matches!(h, Ok(h) if h.neighbour == addr && h.egress == EGRESS_BACKEND));
        if on_backend { EGRESS_BACKEND } else { EGRESS_SAME }
    }

    /// The backends without a usable route, and why.
    pub fn unroutable(&self) -> impl Iterator<Item = (IpAddr, &NoRoute)> {
        self.via.iter().filter_map(|(a, hop)| hop.as_ref().err().map(|e| (*a, e)))
    }

    /// The neighbours to resolve for `backends`.
    pub fn neighbours(&self, backends: &[IpAddr]) -> Vec<IpAddr> {
        let set: BTreeSet<IpAddr> = backends.iter().filter_map(|b| self.neighbour(*b)).collect();
        set.into_iter().collect()
    }

    /// Each backend's MAC (its next hop's), from the neighbours' MACs.
    pub fn backend_macs(&self, backends: &[IpAddr], neighbours: &BTreeMap<IpAddr, Mac>) -> BTreeMap<IpAddr, Mac> {
        backends.iter().filter_map(|b| Some((*b, *neighbours.get(&self.neighbour(*b)?)?))).collect()
    }

    /// Whether `addr` is the next hop of some backend in `backends`.
    pub fn is_neighbour_of(&self, addr: IpAddr, backends: impl IntoIterator<Item = IpAddr>) -> bool {
        backends.into_iter().any(|b| self.neighbour(b) == Some(addr))
    }

    /// Resolves neighbours `wanted` to MACs, each on its interface (`Neighbours::resolve`).
    pub async fn resolve(
        &self,
        nl: &Neighbours,
        arms: &Arms,
        wanted: &[IpAddr],
        timeout: std::time::Duration,
    ) -> Result<BTreeMap<IpAddr, Mac>, crate::neigh::NeighError> {
        let (far, near): (Vec<IpAddr>, Vec<IpAddr>) =
            wanted.iter().partition(|a| arms.backend.is_some() && self.egress_of_neighbour(**a) == EGRESS_BACKEND);
        let Some(b) = arms.backend.as_ref().filter(|_| !far.is_empty()) else {
            return nl.resolve(&arms.client, &near, timeout).await;
        };
        // Both at once: each may wait up to `timeout`.
        let (found, more) = tokio::join!(nl.resolve(&arms.client, &near, timeout), nl.resolve(b, &far, timeout));
        let mut found = found?;
        found.extend(more?);
        Ok(found)
    }
}

/// The kernel's route to `addr`: (gateway, output interface).
pub async fn route_to(nl: &Neighbours, addr: IpAddr) -> Result<(Option<IpAddr>, u32), String> {
    let mut msg = RouteMessage::default();
    match addr {
        IpAddr::V4(a) => {
            msg.header.address_family = AddressFamily::Inet;
            msg.header.destination_prefix_length = 32;
            msg.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(a)));
        }
        IpAddr::V6(a) => {
            msg.header.address_family = AddressFamily::Inet6;
            msg.header.destination_prefix_length = 128;
            msg.attributes.push(RouteAttribute::Destination(RouteAddress::Inet6(a)));
        }
    }
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetRoute(msg));
    req.header.flags = NLM_F_REQUEST;
    let mut handle = nl.handle().clone();
    let mut answers = handle.request(req).map_err(|e| e.to_string())?;
    while let Some(answer) = answers.next().await {
        match answer.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) => {
                let mut gateway = None;
                let mut oif = 0;
                for a in r.attributes {
                    match a {
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(IpAddr::V4(g)),
                        RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gateway = Some(IpAddr::V6(g)),
                        RouteAttribute::Oif(i) => oif = i,
                        _ => {}
                    }
                }
                return Ok((gateway, oif));
            }
            NetlinkPayload::Error(e) => return Err(e.to_io().to_string()),
            _ => {}
        }
    }
    Err("no answer".into())
}

/// The tunnel settings the data plane needs: outer source addresses and the MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelParams {
    pub source_v4: Option<std::net::Ipv4Addr>,
    pub source_v6: Option<std::net::Ipv6Addr>,
    pub mtu: u32,
}

impl TunnelParams {
    /// From the configuration, defaulting to the interface's primary address of
    /// each family (`addresses`, in the kernel's order) and its MTU. Fails when a
    /// tunnel service has backends of a family with no source address.
    pub fn resolve(config: &Config, iface: &Interface, addresses: &[IpAddr]) -> Result<TunnelParams, String> {
        let first_v4 = addresses.iter().find_map(|a| match a {
            IpAddr::V4(v) => Some(*v),
            _ => None,
        });
        let first_v6 = addresses.iter().find_map(|a| match a {
            IpAddr::V6(v) if (v.segments()[0] & 0xffc0) != 0xfe80 => Some(*v),
            _ => None,
        });
        let p = TunnelParams {
            source_v4: config.tunnel_source_v4.or(first_v4),
            source_v6: config.tunnel_source_v6.or(first_v6),
            mtu: config.mtu.unwrap_or(if iface.mtu == 0 { 1500 } else { iface.mtu }),
        };
        check_snat(config, iface, addresses)?;
        for s in config.services.iter().filter(|s| s.forwarding.is_tunnel()) {
            for b in &s.backends {
                let (missing, field) = match b.address {
                    IpAddr::V4(_) => (p.source_v4.is_none(), "tunnel_source_v4"),
                    IpAddr::V6(_) => (p.source_v6.is_none(), "tunnel_source_v6"),
                };
                if missing {
                    return Err(format!(
                        "service {} forwards over {} to {}, but interface {} has no address of that family: set {field}",
                        s.name, s.forwarding, b.address, iface.name
                    ));
                }
            }
        }
        Ok(p)
    }

    /// The values `Dataplane::set_tunnel` takes.
    pub fn for_dataplane(&self) -> ([u8; 4], [u8; 16], u32) {
        (
            self.source_v4.map(|a| a.octets()).unwrap_or_default(),
            self.source_v6.map(|a| a.octets()).unwrap_or_default(),
            self.mtu,
        )
    }
}

/// Every SNAT address a `fullnat` service uses must be one of the interface's
/// own (`addresses`): the backends' replies come back to it, and the kernel
/// answers ARP/ND for it only then. Checked at start and at every reload.
pub fn check_snat(config: &Config, iface: &Interface, addresses: &[IpAddr]) -> Result<(), String> {
    for s in &config.services {
        for a in s.snat.iter().flat_map(|p| p.addresses.iter()) {
            if !addresses.contains(a) {
                return Err(format!(
                    "service {}: snat address {a} is not an address of interface {}; a SNAT address must be the \
                     balancer's own (add it to the interface, or list another in snat_addresses)",
                    s.name, iface.name
                ));
            }
        }
    }
    Ok(())
}
