//! Map layouts and pure functions shared by the XDP program (`lb-ebpf`) and the
//! agent (`lb-agent`).
//!
//! Every key and value is `#[repr(C)]`, built from fixed-width integers with
//! explicit padding, and its size is asserted at compile time: the kernel side is
//! built with nightly for `bpfel-unknown-none`, the user side with stable for the
//! host, and both must agree byte for byte.
//!
//! Addresses are always 16 bytes: IPv6 as is, IPv4 in its IPv4-mapped form
//! (`::ffff:a.b.c.d`), so one key type serves both families without ambiguity.
#![no_std]

pub mod conntrack;
pub mod decap;
pub mod egress;
pub mod first;
pub mod frag;
pub mod hash;
pub mod nat;
pub mod prefix;
pub mod syn_filter;
pub mod table;

pub use conntrack::{
    AffinityKey, AffinityVal, BackendConns, FlowKey, FlowVal, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW,
};
pub use egress::{EgressMac, EGRESS_BACKEND, EGRESS_CLIENT, EGRESS_ENTRIES, EGRESS_SAME};
pub use decap::{decap_stat, DecapAddrKey, DecapAddrVal, DecapConfig, DEFAULT_GUE_PORT, PROG_DECAP};
pub use first::{
    first_record_check, first_record_entries, first_record_expired, first_record_slot, first_record_tag, FirstRecord,
    FIRST_RECORD_MAX_ENTRIES,
};
pub use frag::{FragKey, FragVal};
pub use hash::{flow_hash, flow_hash_by, maglev_slot};
pub use nat::{NatReverse, NAT_REPLY_SLOT, NAT_SLOT, PROG_NAT, PROG_NAT_REPLY};
pub use prefix::{LocalityKey, LocalityVal, PrefixKey, PREFIX_SLOT, PROG_PREFIX};

/// IP protocol numbers the data plane balances.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Names of the maps in the object, as `bpftool map list` shows them.
pub mod map_names {
    pub const VIP_ADDRS: &str = "VIP_ADDRS";
    pub const SERVICES: &str = "SERVICES";
    pub const MAGLEV: &str = "MAGLEV";
    pub const BACKENDS: &str = "BACKENDS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const CT_ESTABLISHED: &str = "CT_ESTABLISHED";
    pub const CT_CLOCK: &str = "CT_CLOCK";
    pub const TRACE_FILTER: &str = "TRACE_FILTER";
    pub const TRACE_BUDGET: &str = "TRACE_BUDGET";
    pub const TRACE_SCRATCH: &str = "TRACE_SCRATCH";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const STATS: &str = "STATS";
    pub const CONFIG: &str = "CONFIG";
    pub const AFFINITY: &str = "AFFINITY";
    pub const VIP_FILTER: &str = "VIP_FILTER";
    pub const FRAGS: &str = "FRAGS";
    pub const BACKEND_CONNS: &str = "BACKEND_CONNS";
    pub const BACKEND_CONN_DELTA: &str = "BACKEND_CONN_DELTA";
    pub const ROTATION: &str = "ROTATION";
    /// The program array of tail-called programs (pinned apart from `layout()`:
    /// a program array has no BTF value type to check).
    pub const RARE_PROGS: &str = "RARE_PROGS";
    pub const NAT_REVERSE: &str = "NAT_REVERSE";
    pub const FULLNAT_REVERSE: &str = "FULLNAT_REVERSE";
    pub const FULLNAT_FORWARD: &str = "FULLNAT_FORWARD";
    pub const SNAT_POOLS: &str = "SNAT_POOLS";
    pub use crate::decap::names::*;
    pub use crate::first::names::*;
    pub use crate::egress::names::*;
    pub use crate::prefix::names::*;
    pub use crate::syn_filter::names::*;
}

/// Bits in `VIP_FILTER`, a one-hash Bloom filter over the VIP addresses kept in a
/// plain array (64-bit words): a frame whose destination's bit is clear is not for
/// a VIP, decided without a hash-map lookup.
pub const VIP_FILTER_BITS: u32 = 4096;
pub const VIP_FILTER_WORDS: u32 = VIP_FILTER_BITS / 64;

/// The `VIP_FILTER` bit of an address (16-byte form).
#[inline(always)]
pub fn vip_filter_bit(addr: &[u8; 16]) -> u32 {
    let w = |i: usize| u32::from_le_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    let mut h = w(0) ^ w(4).rotate_left(7) ^ w(8).rotate_left(14) ^ w(12).rotate_left(21);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h & (VIP_FILTER_BITS - 1)
}

/// The `VIP_FILTER` bit of a SNAT address (`snat_addresses`, 16-byte form):
/// another bit than the address's `vip_filter_bit`, so the balancer's VIP test
/// does not take it for a VIP. `lb_nat_reply` looks a frame up in
/// `FULLNAT_REVERSE` only when this bit of its destination is set.
#[inline(always)]
pub fn snat_filter_bit(addr: &[u8; 16]) -> u32 {
    vip_filter_bit(addr) ^ (VIP_FILTER_BITS / 2)
}

/// Name of the balancer's XDP program in the object.
pub const PROG_BALANCER: &str = "lb_xdp";
/// Name of the balancer's rare path (ICMP, fragments), tail-called from `lb_xdp`
/// through the `RARE_PROGS` program array.
pub const PROG_RARE: &str = "lb_rare";
/// Name of `lb_rare` with the trace hook, tail-called from `lb_xdp_trace`.
pub const PROG_RARE_TRACE: &str = "lb_rare_trace";
/// Slots in `RARE_PROGS`.
pub const RARE_PROGS_ENTRIES: u32 = 8;
/// `RARE_PROGS` index of `lb_rare`.
pub const RARE_SLOT: u32 = 0;
/// `RARE_PROGS` index of `lb_rare_trace` (filled when the first trace starts).
pub const RARE_TRACE_SLOT: u32 = 1;

/// Name of the balancer with the trace hook (attached while `lb-agent trace` runs).
pub const PROG_BALANCER_TRACE: &str = "lb_xdp_trace";
/// Name of a program that only returns XDP_PASS. Attached to the far end of a veth
/// so that native XDP_TX frames are delivered (see docs/architecture.md).
pub const PROG_PASS: &str = "lb_pass";

/// Default sizes. The agent overrides the compile-time maxima at load time from
/// the configuration, so map memory follows what is configured.
pub const DEFAULT_MAX_SERVICES: u32 = 1024;
pub const DEFAULT_MAX_BACKENDS: u32 = 8192;
pub const DEFAULT_CONNTRACK_SIZE: u32 = 65536;
pub const DEFAULT_FRAGS_SIZE: u32 = 8192;
/// Default lifetime of a `FRAGS` entry, in seconds.
pub const DEFAULT_FRAG_TIMEOUT_S: u32 = 2;

/// ICMP (IPv4) and ICMPv6 protocol numbers.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// Maps an IPv4 address (network order octets) to the 16-byte key form.
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// Key of `VIP_ADDRS`: the destination address alone. One lookup in this map
/// decides whether a frame can be ours at all; everything else passes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipAddrKey {
    pub addr: [u8; 16],
}

/// Value of `VIP_ADDRS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipAddrVal {
    /// `VIP_ANY_PORT_TCP` / `VIP_ANY_PORT_UDP`: an "any port" service exists for
    /// this address and protocol, so a miss on the exact port falls back to port 0.
    pub flags: u32,
}

pub const VIP_ANY_PORT_TCP: u32 = 1;
pub const VIP_ANY_PORT_UDP: u32 = 2;

/// Key of `SERVICES`: (address, port, protocol). Port 0 is the "any port" service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct VipKey {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    /// 0 in `SERVICES`. The agent's plan keys a prefix service (`PREFIX_SERVICES`)
    /// by its prefix length here (in the 16-byte form, so never 0).
    pub _pad: u8,
}

/// Value of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Service {
    /// Index into `SERVICE_STATS`.
    pub id: u32,
    /// First word of this service's table in `MAGLEV` (its layout: `table`).
    pub table_offset: u32,
    /// Number of slots (a prime); 0 means the service has no usable backend.
    pub table_size: u32,
    /// `SERVICE_PASS_ON_EMPTY`, `SERVICE_PERSIST`.
    pub flags: u32,
    /// Client affinity lifetime in seconds (with `SERVICE_PERSIST`).
    pub persist_timeout_s: u32,
    /// Affinity key prefix lengths: IPv4 (1..=32) and IPv6 (1..=128); for
    /// `SCHED_SH`, the client prefixes it hashes.
    pub persist_prefix_v4: u8,
    pub persist_prefix_v6: u8,
    /// `SCHED_*`: how new flows pick a backend; what the table region holds.
    pub scheduler: u8,
    pub _pad: u8,
    /// First word of the service's `MAGLEV` region (two halves, each room for
    /// one table: `table::half_words`; the agent writes the idle one and then
    /// moves `table_offset` to it).
    pub region: u32,
}

/// No usable backend: pass the packet to the stack instead of dropping it.
pub const SERVICE_PASS_ON_EMPTY: u32 = 1;
/// New flows from a client go to the backend it was last sent to (`AFFINITY`).
pub const SERVICE_PERSIST: u32 = 2;

/// `Service::scheduler`: Maglev; the table is the Maglev lookup table.
pub const SCHED_MAGLEV: u8 = 0;
/// Round robin: the table lists the backends taking new flows, once each; a
/// shared per-service cursor (`ROTATION`) walks it.
pub const SCHED_RR: u8 = 1;
/// Weighted round robin: the table is one period of nginx's smooth weighted
/// rotation (weights divided by their gcd); walked as `SCHED_RR`.
pub const SCHED_WRR: u8 = 2;
/// Least connections: the table lists the backends taking new flows; the one with
/// the least `active * 256 + inactive` wins.
pub const SCHED_LC: u8 = 3;
/// Weighted least connections: as `SCHED_LC`, overhead divided by weight.
pub const SCHED_WLC: u8 = 4;
/// Source hashing: the Maglev table, looked up with the hash of the client
/// address masked to `persist_prefix_v4`/`persist_prefix_v6` (and the service's
/// own address, port and protocol); no `AFFINITY` entry.
pub const SCHED_SH: u8 = 5;
/// Destination hashing (prefix services): the Maglev table, looked up with the
/// hash of the destination address (and the service's port and protocol).
pub const SCHED_DH: u8 = 6;
/// Locality-based least connections (prefix services): each destination keeps
/// one backend (`LOCALITY`) until it is overloaded; the table lists the
/// candidates, chosen among as `SCHED_WLC`.
pub const SCHED_LBLC: u8 = 7;
/// As `SCHED_LBLC` with a set of backends per destination, grown by the least
/// loaded backend when every member is overloaded.
pub const SCHED_LBLCR: u8 = 8;
/// Backends the least-connection schedulers compare exactly; above this, the
/// best of this many consecutive table slots from one drawn from the flow hash
/// (weighted best of k choices). Bounded by the verifier's work (see
/// `lb-ebpf/src/sched/leastconn.rs`).
pub const LC_EXACT_MAX: u32 = 4;

/// IPVS's connection overhead: an active connection weighs 256 inactive ones.
#[inline(always)]
pub fn conn_overhead(active: u32, inactive: u32) -> u64 {
    (active as u64) * 256 + inactive as u64
}

/// Value of `BACKENDS`, indexed by backend id. A backend id names one backend of
/// one service (like an IPVS destination), so its counters are per service, and it
/// carries what forwarding to it needs (the service's mode), so the established
/// fast path needs no service lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// Destination MAC of frames to it: its own (DR, or a tunnel backend on-link),
    /// or its next hop's (a tunnel backend behind a router).
    pub mac: [u8; 6],
    /// `FORWARD_DR`, `FORWARD_IPIP`, `FORWARD_GUE`, `FORWARD_NAT`: the service's mode.
    pub forward: u8,
    /// The interface its frames leave by: `EGRESS_SAME` (the one the frame came
    /// in on, XDP_TX) or an `EGRESS` index (XDP_REDIRECT, two-arm: `egress.rs`).
    pub egress: u8,
    /// `BACKEND_ACTIVE` when the slot holds a usable backend.
    pub flags: u32,
    /// The service this backend belongs to.
    pub service_id: u32,
    /// Incarnation of this id: bumped whenever the agent gives the id to another
    /// backend, so a flow recorded for the old one is never sent to the new one.
    pub generation: u32,
    /// The backend's address: the outer destination in tunnel modes (also for
    /// operators and for an agent adopting the maps).
    pub addr: [u8; 16],
    /// Destination port (host byte order): the GUE port for `FORWARD_GUE`; the
    /// backend's port for `FORWARD_NAT` (0: the client's destination port kept).
    pub port: u16,
    /// Weight in force (for `SCHED_WLC`; 0 while draining).
    pub weight: u16,
}

/// LVS-DR: only the MACs change.
pub const FORWARD_DR: u8 = 0;
/// IPIP (IPv4 in IPv4, protocol 4) or IP6IP6 (IPv6 in IPv6, next header 41).
pub const FORWARD_IPIP: u8 = 1;
/// GUE variant 1: the inner IP packet in UDP (any family in either).
pub const FORWARD_GUE: u8 = 2;

/// LVS-NAT: the destination address (and port) become the backend's; its replies
/// come back through the balancer and leave from the VIP (`lb_nat`, `lb_nat_reply`).
pub const FORWARD_NAT: u8 = 3;

/// FULLNAT: both addresses (and ports) change: the client's becomes a SNAT
/// address and port of the balancer's (`SNAT_POOLS`), the VIP the backend's; the
/// backend's replies come back to the SNAT address and leave from the VIP to the
/// client (`lb_nat`, `lb_nat_reply`, `FULLNAT_FORWARD`, `FULLNAT_REVERSE`).
pub const FORWARD_FULLNAT: u8 = 4;

/// Established flows may use the backend (it is up).
pub const BACKEND_ACTIVE: u32 = 1;
/// New flows may be sent to it (up and weight > 0); a draining backend has only
/// `BACKEND_ACTIVE`.
pub const BACKEND_ACCEPTS_NEW: u32 = 2;

/// Marks an empty Maglev slot (never produced for a service with backends).
pub const NO_BACKEND: u32 = u32::MAX;

/// `addr` with only its first `prefix` bits kept (16-byte form; an IPv4 prefix
/// must be given as 96 + its length).
#[inline(always)]
pub fn mask_addr(addr: &[u8; 16], prefix: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        let start = (i as u32) * 8;
        let keep = prefix.saturating_sub(start).min(8);
        // keep in 0..=8: 0xff << (8 - keep) keeps the top `keep` bits.
        let mask = if keep == 0 { 0 } else { (0xffu32 << (8 - keep)) as u8 };
        out[i] = addr[i] & mask;
        i += 1;
    }
    out
}

/// Per-service and per-backend traffic counters (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    /// Flows scheduled to it (connection-table misses, TCP SYNs).
    pub new_flows: u64,
}

/// Value of `CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// MAC of the interface the program is attached to: source MAC of forwarded frames.
    pub iface_mac: [u8; 6],
    /// SYN flood threshold: new TCP flows per CPU per second, in thousands, above
    /// which a SYN of a `maglev` or `sh` service without persistence is forwarded
    /// without being recorded (`ct_syn_unrecorded`) for the rest of that
    /// second. 0: always recorded. See docs/connection-table.md, "SYN floods".
    pub syn_flood_kps: u16,
    /// Set to `CONFIG_READY` once the agent has filled the maps.
    pub flags: u32,
    /// Outer source addresses of tunnelled packets (network order).
    pub tunnel_source_v4: [u8; 4],
    pub tunnel_source_v6: [u8; 16],
    /// Largest frame payload (IP packet) the interface sends: an encapsulated
    /// packet that would exceed it is answered with ICMP "too big" (or dropped).
    pub mtu: u32,
    /// Lifetime of a `FRAGS` entry in seconds of `CT_CLOCK`.
    pub frag_timeout_s: u32,
    /// `FIRST_RECORD` slots minus one (a power of two minus one): SYNs of `maglev`
    /// and `sh` services go there instead of `CONNTRACK` (`lb_common::first`).
    /// 0: off (every SYN in `CONNTRACK`), as while `CONFIG_CT_PROTECT` is clear.
    pub first_record_mask: u32,
}

/// `Config::syn_flood_kps` the agent writes: Katran's default rate, 125,000 new
/// flows per CPU per second.
pub const DEFAULT_SYN_FLOOD_KPS: u16 = 125;

pub const CONFIG_READY: u32 = 1;
/// The balancer is attached in generic (skb) mode; without it, native.
pub const CONFIG_GENERIC: u32 = 2;
/// Flows that sent a second packet move from `CONNTRACK` (LRU) to `CT_ESTABLISHED`,
/// where new flows cannot evict them (`established_size` > 0). Without it every
/// flow stays in the LRU table.
pub const CONFIG_CT_PROTECT: u32 = 4;
/// Echo requests to a VIP address are answered from XDP (`answer_ping`).
pub const CONFIG_ANSWER_PING: u32 = 8;
/// ICMP errors about a VIP flow's replies go to the flow's backend (`forward_icmp`).
pub const CONFIG_FORWARD_ICMP: u32 = 16;
/// Prefix services exist: a frame to no exact VIP continues in `lb_prefix`.
pub const CONFIG_PREFIX: u32 = 32;
/// A `nat` service exists: frames to no VIP are looked up in `NAT_REVERSE`
/// (`lb_nat_reply`). Without it they pass at once, as before.
pub const CONFIG_NAT: u32 = 64;
/// A `fullnat` service exists: frames to no VIP are looked up in
/// `FULLNAT_REVERSE` first (`lb_nat_reply`).
pub const CONFIG_FULLNAT: u32 = 128;

pub mod snat;
pub use snat::{snat_check, snat_slot, SnatFwd, SnatPool, MAX_SNAT_ADDRS, SNAT_PROBES};

pub mod trace;
pub use trace::{Decision, TraceBudget, TraceFilter, TraceRecord};

pub mod stat;

const _: () = {
    assert!(core::mem::size_of::<VipAddrKey>() == 16);
    assert!(core::mem::size_of::<VipAddrVal>() == 4);
    assert!(core::mem::size_of::<VipKey>() == 20);
    assert!(core::mem::size_of::<Service>() == 28);
    assert!(core::mem::size_of::<Backend>() == 40);
    assert!(core::mem::size_of::<FlowKey>() == 40);
    assert!(core::mem::size_of::<FlowVal>() == 20);
    assert!(core::mem::size_of::<AffinityKey>() == 20);
    assert!(core::mem::size_of::<AffinityVal>() == 16);
    assert!(core::mem::size_of::<Counters>() == 24);
    assert!(core::mem::size_of::<Config>() == 44);
    assert!(core::mem::size_of::<FragKey>() == 40);
    assert!(core::mem::size_of::<FragVal>() == 20);
    assert!(core::mem::size_of::<BackendConns>() == 16);
    assert!(core::mem::size_of::<NatReverse>() == 60);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), made of integers and byte arrays, with
    // explicit padding fields, so every bit pattern is valid and none is uninit.
    unsafe impl aya::Pod for VipAddrKey {}
    unsafe impl aya::Pod for VipAddrVal {}
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowVal {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for BackendConns {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragVal {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityVal {}
    unsafe impl aya::Pod for NatReverse {}
    unsafe impl aya::Pod for TraceFilter {}
    unsafe impl aya::Pod for TraceBudget {}
    unsafe impl aya::Pod for TraceRecord {}
}
