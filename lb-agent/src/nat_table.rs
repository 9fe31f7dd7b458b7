//! The agent's side of `NAT_REVERSE` (`forwarding: nat`): an entry says how a
//! flow's replies are translated, and lives as long as the flow's own entry in the
//! connection table. Each sweep (`conntrack::run`) removes the entries whose flow is
//! in neither `CT_ESTABLISHED` nor `CONNTRACK` any more (expired, or evicted from
//! the LRU); `NAT_REVERSE` is an LRU hash itself, so a table that fills between
//! sweeps drops its least recently used entries rather than refusing new flows.

use aya::maps::{HashMap, MapData};
use lb_common::{FlowKey, FlowVal, NatReverse};

/// The client-to-VIP flow whose replies `key` (backend -> client) matches.
pub fn forward_flow(key: &FlowKey, val: &NatReverse) -> FlowKey {
    FlowKey { src: key.dst, dst: val.vip, sport: key.dport, dport: val.vport, proto: key.proto, _pad: [0; 3] }
}

/// Removes the entries of `reverse` whose flow is in neither table; returns how many.
pub fn sweep(
    reverse: &mut HashMap<MapData, FlowKey, NatReverse>,
    established: &HashMap<MapData, FlowKey, FlowVal>,
    new: &HashMap<MapData, FlowKey, FlowVal>,
) -> u64 {
    let live = |flow: &FlowKey| established.get(flow, 0).is_ok() || new.get(flow, 0).is_ok();
    // Collect first: deleting while walking makes the kernel restart the walk.
    let gone: Vec<FlowKey> =
        reverse.iter().filter_map(Result::ok).filter(|(k, v)| !live(&forward_flow(k, v))).map(|(k, _)| k).collect();
    let mut removed = 0;
    for key in gone {
        // Its flow may have come back since the walk (a new connection on the
        // same 5-tuple): keep it then.
        let Ok(val) = reverse.get(&key, 0) else { continue };
        if !live(&forward_flow(&key, &val)) && reverse.remove(&key).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forward_flow_of_a_reply() {
        let key = FlowKey { src: [1; 16], dst: [2; 16], sport: 8080, dport: 40000, proto: 6, _pad: [0; 3] };
        let val = NatReverse { vip: [3; 16], vport: 80, ..Default::default() };
        let f = forward_flow(&key, &val);
        assert_eq!((f.src, f.dst, f.sport, f.dport, f.proto), ([2; 16], [3; 16], 40000, 80, 6));
    }
}
