//! ICMP errors about `fullnat` flows: the addresses and ports the translated
//! error carries (`nat_icmp.rs` reads the error, rewrites it with them and fixes
//! every checksum), as Linux's NAT does for a connection with both a source and
//! a destination translation:
//!
//! - to the backend: an error sent to the VIP about a reply (embedded
//!   VIP:vport -> client:cport) leaves from the flow's SNAT address to the
//!   backend, quoting what the backend sent (backend:bport -> snat:sport). The
//!   mapping is the flow's `FULLNAT_FORWARD` entry (keyed by the client-to-VIP
//!   flow, the embedded packet reversed).
//! - to the client: an error about a packet sent to a backend (embedded
//!   snat:sport -> backend:bport), from the backend or a router on its side and
//!   addressed to the SNAT address, leaves from the VIP to the client, quoting
//!   what the client sent (client:cport -> VIP:vport). The mapping is the flow's
//!   `FULLNAT_REVERSE` entry (keyed by the reply's 5-tuple, the embedded packet
//!   reversed). The outer source is the VIP even when a router sent the error:
//!   the backends' side of a FULLNAT balancer is not the clients' to see (nor,
//!   often, to route).

use lb_common::{FlowKey, NatReverse};

use super::nat_icmp::Addresses;
use crate::maps::FULLNAT_FORWARD;

/// Sets `a` (an error about a reply of `backend_id`'s flow, as read) to what
/// the backend must get. `false`: the flow has no mapping to that backend (its
/// entry swept, or the flow scheduled again and not yet mapped).
#[inline(always)]
pub fn to_backend(a: &mut Addresses, backend_id: u32) -> bool {
    // The embedded reply went VIP -> client; the flow is the reverse.
    a.key = FlowKey {
        src: a.inner_dst,
        dst: a.inner_src,
        sport: a.inner_dport,
        dport: a.inner_sport,
        proto: a.proto,
        _pad: [0; 3],
    };
    // SAFETY: a live entry, read in place (the agent's sweep removes it only
    // once its flow is gone; the kernel frees it after this run).
    let Some(m) = (unsafe { FULLNAT_FORWARD.get(&a.key) }) else { return false };
    if m.backend_id != backend_id {
        return false;
    }
    a.src = m.snat;
    a.dst = m.backend;
    a.inner_src = m.backend;
    a.inner_sport = m.backend_port;
    a.inner_dst = m.snat;
    a.inner_dport = m.snat_port;
    true
}

/// Sets `a` (an error about a packet sent to a backend, as read) to what the
/// client must get, by the flow's reverse entry `r`.
#[inline(always)]
pub fn to_client(a: &mut Addresses, r: &NatReverse) {
    a.src = r.vip;
    a.dst = r.client;
    a.inner_src = r.client;
    a.inner_sport = r.cport;
    a.inner_dst = r.vip;
    a.inner_dport = r.vport;
}
