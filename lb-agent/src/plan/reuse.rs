//! `Plan::next`'s shortcut for a service that did not change: the very
//! configuration the previous plan's entry was built from (`Arc::ptr_eq`: an
//! incremental reload shares every service it did not parse), with the same
//! MAC and the same up/down state for each of its backends. Its entries are
//! then copied from the previous plan (ids, flags, table, Maglev inputs):
//! building them again would give the same, after two sorts and a walk per
//! service (at 1,000 services x 32 backends, about half of a reload's plan).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use lb_common::{VipKey, VIP_ANY_PORT_TCP, VIP_ANY_PORT_UDP};

use super::{PlannedBackend, PlannedService};
use crate::{
    config::{Protocol, ServiceConfig},
    neigh::Mac,
};

/// The previous plan's backends of `svc` when its entry `old` can be copied;
/// `None`: plan the service afresh.
pub(super) fn unchanged<'a>(
    old: &PlannedService,
    svc: &Arc<ServiceConfig>,
    prev_by_id: &[Option<&'a PlannedBackend>],
    macs: &HashMap<IpAddr, Mac>,
    down_here: &[IpAddr],
) -> Option<Vec<&'a PlannedBackend>> {
    if !old.source.as_ref().is_some_and(|s| Arc::ptr_eq(s, svc)) || old.backend_ids.len() != svc.backends.len() {
        return None;
    }
    let members: Vec<&PlannedBackend> = old.backend_ids.iter().map(|id| prev_by_id.get(*id as usize).copied().flatten()).collect::<Option<_>>()?;
    let same = members.iter().all(|b| b.mac == macs.get(&b.address).copied() && b.up != down_here.contains(&b.address));
    same.then_some(members)
}

/// The `VIP_ADDRS` flags of an exact VIP's address: any-port services set theirs.
pub(super) fn vip_flags(vip_addrs: &mut BTreeMap<[u8; 16], u32>, svc: &ServiceConfig, key: &VipKey) {
    if svc.vip_prefix.is_some() {
        return;
    }
    let flags = vip_addrs.entry(key.addr).or_insert(0);
    if svc.port == 0 {
        *flags |= match svc.protocol {
            Protocol::Tcp => VIP_ANY_PORT_TCP,
            Protocol::Udp => VIP_ANY_PORT_UDP,
        };
    }
}
