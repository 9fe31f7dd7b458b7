//! Service lookup and persistence; the schedulers are `sched/`, the connection
//! table `conntrack.rs`, sending the frame to its backend `forward/`.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns, programs::XdpContext};
use lb_common::{
    flow_hash, mask_addr, stat, AffinityKey, AffinityVal, FlowKey, Service, VipAddrKey, VipKey, BACKEND_ACCEPTS_NEW,
    BACKEND_ACTIVE, CONFIG_CT_PROTECT, CONFIG_READY, PROTO_TCP, SCHED_DH, SCHED_MAGLEV, SCHED_SH, SERVICE_PASS_ON_EMPTY,
    SERVICE_PERSIST, VIP_ANY_PORT_TCP, VIP_ANY_PORT_UDP,
    prefix::{prefix_bits, PrefixKey},
};
use aya_ebpf::maps::lpm_trie::Key;

use crate::{
    backend::backend,
    conntrack::{self, Lookup},
    forward, frag, icmp,
    maps::{AFFINITY, CONFIG, PREFIX_SERVICES, SERVICES, VIP_ADDRS},
    parse::{Outcome, Packet, KIND_FRAG_FIRST, KIND_FRAG_LATER, KIND_ICMP_ERROR},
    sched::{self, NoBackend, Pick},
    stats::{count, count_forward},
    trace::Decision,
};

/// The service of a frame to a VIP, or why there is none (`service_of`; the
/// reason, on the rare path of a frame to no service, from `VIP_ADDRS` again).
#[inline(always)]
fn find_service(flow: &FlowKey) -> Result<Service, Outcome> {
    let s = service_of(flow);
    if !s.is_null() {
        // SAFETY: a live `SERVICES` value, copied out at once (the agent
        // replaces whole entries).
        return Ok(unsafe { *s });
    }
    // SAFETY: as above.
    match unsafe { VIP_ADDRS.get(VipAddrKey { addr: flow.dst }) } {
        None => Err(crate::parse::not_vip()),
        Some(_) => Err(Outcome::Pass(stat::PASS_NO_SERVICE)),
    }
}

/// The frame's service in `SERVICES`, or null. `SERVICES` first: a frame that
/// misses the connection table is most often a new flow of a service, which
/// then costs one hash lookup instead of two; `VIP_ADDRS` is looked up only
/// after a miss (a Bloom-bit collision, a port without a service, an address
/// with an "any port" service). A call of its own that returns a pointer, so
/// that both hits leave the verifier one state (inline, with the key on the
/// balancer's frame, `lb_xdp` verified 696,000 instructions instead of 454,000).
#[inline(never)]
fn service_of(flow: &FlowKey) -> *const Service {
    let mut key = VipKey { addr: flow.dst, port: flow.dport, proto: flow.proto, _pad: 0 };
    // SAFETY: a lookup; the value is not read here.
    if let Some(s) = unsafe { SERVICES.get(&key) } {
        return s;
    }
    // SAFETY: as above.
    let Some(v) = (unsafe { VIP_ADDRS.get(VipAddrKey { addr: flow.dst }) }) else { return core::ptr::null() };
    let any = if flow.proto == PROTO_TCP { VIP_ANY_PORT_TCP } else { VIP_ANY_PORT_UDP };
    if v.flags & any == 0 {
        return core::ptr::null();
    }
    key.port = 0;
    // SAFETY: as above.
    unsafe { SERVICES.get(&key) }.map_or(core::ptr::null(), |s| s as *const Service)
}

/// The prefix service of a frame to no exact VIP (`PREFIX_SERVICES`, the
/// longest prefix): a service on the frame's port first, then an any-port one.
/// A reference, copied where the service is used: a trie update replaces the
/// node and frees the old one only after this program run (RCU), and the copy
/// stays off the frame while the connection table is looked up.
#[inline(always)]
fn find_prefix_service(flow: &FlowKey) -> Result<&'static Service, Outcome> {
    let mut key = Key::new(prefix_bits(128), PrefixKey::new(flow.proto, flow.dport, flow.dst));
    if let Some(s) = PREFIX_SERVICES.get(&key) {
        return Ok(s);
    }
    key.data.port = [0; 2];
    PREFIX_SERVICES.get(&key).ok_or(Outcome::Pass(stat::PASS_NOT_VIP))
}

/// A new flow of a service with persistence: the client's backend while its
/// affinity is fresh, else the scheduler's choice for the masked client address
/// (for Maglev, so one client's connections land together even before any
/// affinity exists).
#[inline(always)]
fn persistent<const PREFIX: bool>(flow: &FlowKey, svc: &Service, d: &mut Decision) -> Pick {
    let v4 = flow.src[..12] == lb_common::v4_mapped([0; 4])[..12];
    let prefix = if v4 { 96 + svc.persist_prefix_v4 as u32 } else { svc.persist_prefix_v6 as u32 };
    let client = mask_addr(&flow.src, prefix);
    let key = AffinityKey { service_id: svc.id, client };
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(p) = AFFINITY.get_ptr_mut(&key) {
        // SAFETY: a live entry of this LRU map; refreshed in place (a plain store,
        // no map update) and otherwise copied out at once.
        let a = unsafe { *p };
        let fresh = now.wrapping_sub(a.last_ns) < svc.persist_timeout_s as u64 * 1_000_000_000;
        if fresh {
            if let Some(b) = backend(a.backend_id, svc.id, Some(a.generation), BACKEND_ACTIVE | BACKEND_ACCEPTS_NEW) {
                count(stat::PERSIST_HIT);
                d.persist = 1;
                unsafe { (*p).last_ns = now };
                return Ok((a.backend_id, b));
            }
        }
    }
    let client_flow = FlowKey { src: client, sport: 0, ..*flow };
    let (id, b) = sched::pick::<PREFIX>(flow_hash(&client_flow), svc, &flow.dst, d)?;
    let val = AffinityVal { backend_id: id, generation: b.generation, last_ns: now };
    let _ = AFFINITY.insert(&key, &val, BPF_ANY as u64);
    Ok((id, b))
}

/// A new flow (or one whose backend went down or was replaced): persistence or
/// the service's scheduler (`sched/`). Also returns the hash the flow was
/// scheduled by (0 with persistence): for `maglev` the flow hash, which
/// `conntrack::insert_new` reuses for the SYN's `FIRST_RECORD` slot.
#[inline(always)]
fn schedule<const PREFIX: bool>(flow: &FlowKey, svc: &Service, d: &mut Decision) -> (u32, Pick) {
    count(stat::CONN_MISS);
    if svc.flags & SERVICE_PERSIST != 0 {
        return (0, persistent::<PREFIX>(flow, svc, d));
    }
    // One call for every scheduler (sh: the masked client address, no source
    // port; the others: the flow as is): a branch here would double the states the
    // verifier walks the schedulers with.
    let mut mode = (svc.scheduler == SCHED_SH) as u32;
    if PREFIX && svc.scheduler == SCHED_DH {
        mode = HASH_DST;
    }
    let hash = scheduling_hash(flow, svc.persist_prefix_v4, svc.persist_prefix_v6, mode);
    (hash, sched::pick::<PREFIX>(hash, svc, &flow.dst, d))
}

/// `scheduling_hash`'s mode for `dh`: the destination address alone.
const HASH_DST: u32 = 2;

/// The hash a new flow is scheduled by. `sh` (1 for `sh`, else 0): the client
/// address masked to the service's prefix (`prefix_v4: 24` is nginx's `ip_hash`)
/// and no source port; `HASH_DST` (`dh`): the destination address, port and
/// protocol, no client; otherwise the flow hash. A call of its own: the masked
/// key stays off the balancer's frame.
#[inline(never)]
fn scheduling_hash(flow: &FlowKey, prefix_v4: u8, prefix_v6: u8, sh: u32) -> u32 {
    if sh == 0 {
        return flow_hash(flow);
    }
    if sh == HASH_DST {
        return flow_hash(&FlowKey { src: [0; 16], sport: 0, ..*flow });
    }
    let v4 = flow.src[..12] == lb_common::v4_mapped([0; 4])[..12];
    let prefix = if v4 { 96 + prefix_v4 as u32 } else { prefix_v6 as u32 };
    flow_hash(&FlowKey { src: mask_addr(&flow.src, prefix), sport: 0, ..*flow })
}

/// The connection table first (`conntrack::lookup`); only frames that miss it look
/// up their VIP and service and are scheduled, and the choice is recorded.
/// `kind` is `pkt.kind`, given as the constant `KIND_L4` by the fast path so that
/// the ICMP and fragment hooks compile away there.
///
/// `PREFIX` (`lb_prefix`, for frames to no exact VIP): the prefix service is
/// looked up first (frames to none pass at once), and a miss is scheduled by it.
#[inline(always)]
pub fn forward<const PREFIX: bool>(ctx: &XdpContext, pkt: &Packet, flow: &FlowKey, d: &mut Decision, kind: u8) -> Outcome {
    let (syn, fin) = (pkt.syn, pkt.fin);
    let cfg = match CONFIG.get(0) {
        Some(c) if c.flags & CONFIG_READY != 0 => c,
        _ => return Outcome::Pass(stat::PASS_NOT_READY),
    };
    let prefix_svc = if PREFIX {
        match find_prefix_service(flow) {
            Ok(s) => Some(s),
            Err(outcome) => return outcome,
        }
    } else {
        None
    };
    let protect = cfg.flags & CONFIG_CT_PROTECT != 0;
    // Hooks for `frag.rs` and `icmp.rs`: a fragment follows its datagram's first
    // one; an ICMP error only reads the connection table.
    let mut followed = None;
    if kind == KIND_FRAG_FIRST || kind == KIND_FRAG_LATER {
        followed = frag::find(pkt, cfg, d);
        if followed.is_none() && kind == KIND_FRAG_LATER {
            return Outcome::Drop(stat::DROP_FRAG_UNKNOWN);
        }
    }
    let is_frag_hit = followed.is_some();
    let lookup = match followed {
        Some(hit) => hit,
        None if kind == KIND_ICMP_ERROR => icmp::peek(flow, protect, d),
        None => conntrack::lookup(flow, syn, fin, protect, d),
    };
    let (service_id, backend_id, backend, new_flow, snat) = match lookup {
        Lookup::Hit { service_id, backend_id, backend, snat } => {
            if !is_frag_hit {
                count(stat::CONN_HIT);
            }
            d.service = service_id;
            (service_id, backend_id, backend, false, snat)
        }
        Lookup::Miss(slot) => {
            let svc = match prefix_svc {
                Some(s) => *s,
                None => match find_service(flow) {
                    Ok(s) => s,
                    Err(outcome) => return outcome,
                },
            };
            d.service = svc.id;
            if slot.midflow() {
                count(stat::CT_MIDFLOW_MISS);
            }
            // A retransmitted SYN keeps the backend its first copy got: Maglev
            // gives it the same one anyway; the other schedulers would not.
            let hashed = svc.scheduler == SCHED_MAGLEV || svc.scheduler == SCHED_SH || (PREFIX && svc.scheduler == SCHED_DH);
            let again = if syn && !hashed {
                conntrack::repeated_syn(flow, svc.id)
            } else {
                None
            };
            // A match, not `Option::ok_or(..).or_else(closure)`: LLVM may leave a
            // closure out of line, a BPF-to-BPF call returning a `Result` whose BTF
            // the kernel refuses (every map creation then fails).
            let (hash, picked) = match again {
                Some(pick) => (0, Ok(pick)),
                None => schedule::<PREFIX>(flow, &svc, d),
            };
            match picked {
                Ok((id, b)) if again.is_some() => (svc.id, id, b, false, 0),
                Ok((id, b)) => {
                    // An ICMP error is forwarded as its flow's packets would be,
                    // but records nothing. A SYN of a service whose scheduler is
                    // a function of the flow may go unrecorded during a SYN flood
                    // (`conntrack::insert_new`): its next packet gets the same
                    // backend and is recorded then.
                    // The SYN flood check's inputs, packed without a branch (a
                    // branch here would double what the verifier walks after
                    // it): `conntrack::insert_new` decides.
                    let flood = conntrack::flood_inputs(syn, svc.scheduler, svc.flags, cfg.syn_flood_kps, hash);
                    if kind != KIND_ICMP_ERROR {
                        conntrack::record(flow, slot, id, svc.id, b.generation, flood);
                    }
                    (svc.id, id, b, kind != KIND_ICMP_ERROR, 0)
                }
                Err(NoBackend::Empty) if svc.flags & SERVICE_PASS_ON_EMPTY != 0 => {
                    return Outcome::Pass(stat::PASS_ALL_DOWN);
                }
                Err(_) => return Outcome::Drop(stat::DROP_NO_BACKEND),
            }
        }
    };
    d.backend = backend_id;
    if kind == KIND_FRAG_FIRST && !is_frag_hit {
        frag::remember(pkt, backend_id, service_id, backend.generation);
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let outcome = forward::deliver(ctx, pkt, flow, backend, cfg, (kind, backend_id, new_flow, snat));
    if let Outcome::Out(_) = outcome {
        count_forward(service_id, backend_id, bytes, new_flow);
        if is_frag_hit {
            count(stat::FRAG_FOLLOWED);
        } else if kind == KIND_FRAG_FIRST {
            count(stat::FRAG_FIRST);
        } else if kind == KIND_ICMP_ERROR {
            count(stat::ICMP_FORWARDED);
        }
    }
    outcome
}
