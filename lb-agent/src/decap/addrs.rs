//! The interface's addresses through rtnetlink, and a subscription to their changes.

use std::{collections::BTreeMap, net::IpAddr};

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;

use crate::neigh::{NeighError, Neighbours};

/// The 16-byte form `DECAP_ADDRS` uses (IPv4 as `::ffff:a.b.c.d`).
pub fn key_of(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => lb_common::v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

/// Every IPv4 and IPv6 address on interface `ifindex`: 16-byte form -> ifindex.
pub async fn interface_addrs(nl: &Neighbours, ifindex: u32) -> Result<BTreeMap<[u8; 16], u32>, NeighError> {
    let mut out = BTreeMap::new();
    let mut dump = nl.handle().address().get().set_link_index_filter(ifindex).execute();
    while let Some(msg) = dump.try_next().await.map_err(|e| NeighError::Dump(Box::new(e)))? {
        if msg.header.index != ifindex {
            continue;
        }
        // IFA_LOCAL is the address itself (IFA_ADDRESS the peer on point-to-point
        // links); IPv6 has only IFA_ADDRESS.
        let local = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(a) => Some(*a),
            _ => None,
        });
        let addr = local.or_else(|| {
            msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(a) => Some(*a),
                _ => None,
            })
        });
        if let Some(a) = addr {
            out.insert(key_of(a), ifindex);
        }
    }
    Ok(out)
}

/// The addresses of a `interface_addrs` answer, for the log.
pub fn describe(addrs: &BTreeMap<[u8; 16], u32>) -> String {
    let text: Vec<String> = addrs
        .keys()
        .map(|k| {
            let a = std::net::Ipv6Addr::from(*k);
            a.to_ipv4_mapped().map_or_else(|| a.to_string(), |v4| v4.to_string())
        })
        .collect();
    if text.is_empty() { "none".into() } else { text.join(",") }
}

/// Subscribes to address changes (RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR): each
/// new or removed address sends the index of its interface.
pub fn watch() -> Result<tokio::sync::mpsc::UnboundedReceiver<u32>, NeighError> {
    use netlink_packet_core::NetlinkPayload;
    use netlink_packet_route::RouteNetlinkMessage;

    let (mut conn, _handle, mut messages) = rtnetlink::new_connection().map_err(NeighError::Connect)?;
    let groups = rtnetlink::constants::RTMGRP_IPV4_IFADDR | rtnetlink::constants::RTMGRP_IPV6_IFADDR;
    {
        use netlink_sys::AsyncSocket;
        let addr = netlink_sys::SocketAddr::new(0, groups);
        conn.socket_mut().socket_mut().bind(&addr).map_err(NeighError::Connect)?;
    }
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        use futures::StreamExt;
        while let Some((msg, _)) = messages.next().await {
            let index = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(m))
                | NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(m)) => m.header.index,
                _ => continue,
            };
            if tx.send(index).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}
