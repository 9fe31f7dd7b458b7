//! The maps, by the names `bpftool map list` shows. Sizes here are defaults: the
//! agent sets each map's size from its configuration at load time.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    btf_maps::{Array, DevMap, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    stat, AffinityKey, EgressMac, EGRESS_ENTRIES, AffinityVal, LocalityKey, LocalityVal, NatReverse, SnatFwd, SnatPool, PrefixKey, Backend, BackendConns, Config, Counters, FirstRecord, FlowKey, FlowVal, FragKey, FragVal, Service, TraceBudget, TraceFilter, TraceRecord,
    VipAddrKey, VipAddrVal, VipKey, DEFAULT_CONNTRACK_SIZE as CT, DEFAULT_MAX_BACKENDS as MB,
    DEFAULT_FRAGS_SIZE, DEFAULT_MAX_SERVICES as MS, VIP_FILTER_WORDS,
};

/// Bloom filter over the VIP addresses (`lb_common::vip_filter_bit`): checked
/// before `VIP_ADDRS`, so most traffic that is not ours costs an array read.
#[btf_map]
pub static VIP_FILTER: Array<u64, { VIP_FILTER_WORDS as usize }> = Array::new();

/// Destination addresses that carry at least one service.
#[btf_map]
pub static VIP_ADDRS: HashMap<VipAddrKey, VipAddrVal, { MS as usize }> = HashMap::new();

/// (VIP, port, protocol) -> service.
#[btf_map]
pub static SERVICES: HashMap<VipKey, Service, { MS as usize }> = HashMap::new();

/// Prefix services: (protocol, port, address prefix) -> service, looked up by
/// longest prefix (`lb_common::PrefixKey`) in `lb_prefix` only.
#[btf_map]
pub static PREFIX_SERVICES: LpmTrie<PrefixKey, Service, { MS as usize }> = LpmTrie::new();

/// (service, destination address) -> its backend (`lblc`) or set (`lblcr`),
/// written by the program (`sched/locality.rs`).
#[btf_map]
pub static LOCALITY: LruHashMap<LocalityKey, LocalityVal, 65536> = LruHashMap::new();

/// Per CPU: the key and new entry of `LOCALITY` being built (off the stack).
#[btf_map]
pub static LOCALITY_SCRATCH: PerCpuArray<crate::sched::LocalityScratch, 1> = PerCpuArray::new();

/// All services' tables back to back, as 32-bit words two to an element: each
/// table's 16-bit slots, then the backend ids they index (`lb_common::table`;
/// read through `sched::table_id`). Memory-mappable, so the agent writes a
/// whole table with one copy.
#[btf_map]
pub static MAGLEV: Array<u64, 65537, { BPF_F_MMAPABLE as usize }> = Array::new();

/// Backend id -> MAC and state.
#[btf_map]
pub static BACKENDS: Array<Backend, { MB as usize }> = Array::new();

/// Flow -> backend, shared by all CPUs (a flow's packets may arrive on any CPU).
#[btf_map]
pub static CONNTRACK: LruHashMap<FlowKey, FlowVal, { CT as usize }> = LruHashMap::new();

/// Slot (`lb_common::first_record_slot`) -> where a TCP SYN of a `maglev` or
/// `sh` service went (`first.rs`): one store per SYN instead of a `CONNTRACK`
/// insert; collisions overwrite. Shared by all CPUs (the flow's ACK may arrive on
/// another); memory-mappable, so the agent's sweep reads it with one copy.
#[btf_map]
pub static FIRST_RECORD: Array<FirstRecord, { CT as usize }, { BPF_F_MMAPABLE as usize }> = Array::new();

/// Flows that sent a second packet: a plain hash, so new flows cannot evict them
/// (see `conntrack.rs`). The agent expires idle entries.
#[btf_map]
pub static CT_ESTABLISHED: HashMap<FlowKey, FlowVal, { CT as usize }> = HashMap::new();

/// The connection table's clock: whole seconds of CLOCK_MONOTONIC, written by the
/// agent every second (one array read per packet, where a clock helper costs
/// more than the rest of an established packet's table work).
#[btf_map]
pub static CT_CLOCK: Array<u32, 1> = Array::new();

/// Backend id -> connection counts found by the agent's last sweep, minus the
/// delta it read before sweeping (`lb_common::BackendConns`). Agent-written.
#[btf_map]
pub static BACKEND_CONNS: Array<BackendConns, { MB as usize }> = Array::new();

/// Backend id -> connection count changes seen by the program (atomic adds, never
/// reset). Program-written.
#[btf_map]
pub static BACKEND_CONN_DELTA: Array<BackendConns, { MB as usize }> = Array::new();

/// Service id -> rotation cursor (`rr`, `wrr`): new flows of the service so far,
/// advanced with atomic adds by every CPU.
#[btf_map]
pub static ROTATION: Array<u64, { MS as usize }> = Array::new();

#[btf_map]
pub static SERVICE_STATS: PerCpuArray<Counters, { MS as usize }> = PerCpuArray::new();

#[btf_map]
pub static BACKEND_STATS: PerCpuArray<Counters, { MB as usize }> = PerCpuArray::new();

/// One counter per packet outcome, indexed by `lb_common::stat`.
#[btf_map]
pub static STATS: PerCpuArray<u64, { stat::COUNT as usize }> = PerCpuArray::new();

/// Fragmented datagram -> where its first fragment went (`frag.rs`).
#[btf_map]
pub static FRAGS: LruHashMap<FragKey, FragVal, { DEFAULT_FRAGS_SIZE as usize }> = LruHashMap::new();

/// (service, masked client address) -> backend, for services with persistence.
#[btf_map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityVal, { CT as usize }> = LruHashMap::new();

/// A `nat` flow's reply (backend -> client, `FlowKey` as it leaves the backend) ->
/// what it becomes (`forward/nat.rs`). Written by `lb_nat` when a flow is
/// scheduled; sized by the agent as both connection tables together.
#[btf_map]
pub static NAT_REVERSE: LruHashMap<FlowKey, NatReverse, { CT as usize }> = LruHashMap::new();

/// A `fullnat` flow's reply (backend -> SNAT address and port, as it leaves the
/// backend) -> what it becomes (`forward/fullnat.rs`). A plain hash: inserted with
/// `BPF_NOEXIST` when a flow gets its SNAT port, it is what keeps two live flows
/// from sharing one, and nothing evicts it; the agent's sweep removes the entries
/// of flows gone from the connection table. Sized as `NAT_REVERSE`.
#[btf_map]
pub static FULLNAT_REVERSE: HashMap<FlowKey, NatReverse, { CT as usize }> = HashMap::new();

/// A `fullnat` flow (client -> VIP, as in `CONNTRACK`) -> its SNAT address and
/// port and its backend's (`forward/fullnat.rs`). Swept with `FULLNAT_REVERSE`.
#[btf_map]
pub static FULLNAT_FORWARD: HashMap<FlowKey, SnatFwd, { CT as usize }> = HashMap::new();

/// Service id -> the SNAT addresses and ports of a `fullnat` service, and the
/// cursor its new flows probe from. Agent-written (the cursor: program-moved).
#[btf_map]
pub static SNAT_POOLS: Array<SnatPool, { MS as usize }> = Array::new();

/// Per CPU: `lb_nat`'s working space for a `fullnat` packet (off the stack).
#[btf_map]
pub static FULLNAT_SCRATCH: PerCpuArray<crate::forward::FullnatScratch, 1> = PerCpuArray::new();

/// Per CPU: what `lb_xdp` decided for a `nat` flow's packet, for `lb_nat` (the
/// program it tail-calls) to carry out.
#[btf_map]
pub static NAT_STASH: PerCpuArray<NatStash, 1> = PerCpuArray::new();

/// Value of `NAT_STASH` (never pinned).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NatStash {
    pub backend_id: u32,
    /// 1: the flow was scheduled by this packet (write its `NAT_REVERSE` entry).
    pub new_flow: u32,
    /// The flow's `FlowVal::snat` (`lb_common::snat_slot`) as a word: a
    /// `fullnat` flow's known SNAT address and port, or 0; bit 24:
    /// `forward::nat::FULLNAT_MARK`.
    pub snat: u32,
}

/// The running trace's filter (`lb-agent trace`); flags 0 while none runs.
#[btf_map]
pub static TRACE_FILTER: Array<TraceFilter, 1> = Array::new();

/// Per CPU: trace records written this second, and those the budget refused.
#[btf_map]
pub static TRACE_BUDGET: PerCpuArray<TraceBudget, 1> = PerCpuArray::new();

/// Per CPU: the record `lb_xdp_trace` fills for the packet at hand (kept off the
/// stack).
#[btf_map]
pub static TRACE_SCRATCH: PerCpuArray<TraceRecord, 1> = PerCpuArray::new();

/// Per CPU: working space of the rare paths (`icmp.rs`, `frag.rs`), so that
/// their keys and results stay off the 512-byte stack.
#[btf_map]
pub static SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();

/// Per CPU: SYNs that could skip their `CONNTRACK` insert, counted since the
/// current window began (`flood.rs`). Never pinned: a new program starts counting afresh.
#[btf_map]
pub static SYN_RATE: PerCpuArray<SynRate, 1> = PerCpuArray::new();

/// Value of `SYN_RATE`.
#[repr(C)]
pub struct SynRate {
    /// `bpf_ktime_get_coarse_ns` when the current window began (read only once
    /// the count passes the threshold: see `flood::over`).
    pub start_ns: u64,
    pub count: u64,
}

/// Per CPU: the rare path's packet and flow (`main.rs`), off the stack.
#[btf_map]
pub static RARE: PerCpuArray<RareFrame, 1> = PerCpuArray::new();

/// Value of `RARE`.
#[repr(C)]
pub struct RareFrame {
    pub pkt: core::mem::MaybeUninit<crate::parse::Packet>,
    pub flow: core::mem::MaybeUninit<FlowKey>,
}

/// Value of `SCRATCH` (never pinned, never read by the agent).
#[repr(C)]
pub struct Scratch {
    /// The VIP an ICMP message was sent to, then the flow its error embeds
    /// (client-to-VIP direction).
    pub vip: [u8; 16],
    pub client: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
    pub frag_key: FragKey,
    pub frag_val: FragVal,
}

/// Two-arm: the interfaces frames are redirected to (`lb_common::EGRESS_*`
/// indices; `Backend::egress`), written by the agent (`forward/egress.rs`).
#[btf_map]
pub static EGRESS: DevMap<{ EGRESS_ENTRIES as usize }> = DevMap::new();

/// The MAC of each `EGRESS` interface (same index): redirected frames' source.
#[btf_map]
pub static EGRESS_MAC: Array<EgressMac, { EGRESS_ENTRIES as usize }> = Array::new();

/// Interface MAC and readiness, written by the agent.
#[btf_map]
pub static CONFIG: Array<Config, 1> = Array::new();

/// Slots (`lb_common::*_SLOT`): 0 `lb_rare`, 1 `lb_rare_trace`, 2 `lb_prefix`,
/// 3 `lb_nat`, 4 `lb_nat_reply`. The rare path (`lb_rare`: ICMP and fragments to a VIP), reached from `lb_xdp`
/// by a tail call so that its stack frame is its own (the verifier allows 512
/// bytes per call chain) and the fast path pays no call. Filled by the agent at
/// load and pinned with the other maps: the kernel empties a program array when
/// its last user reference goes, and the pin keeps the rare path alive between
/// one agent and the next.
#[aya_ebpf::macros::map]
pub static RARE_PROGS: aya_ebpf::maps::ProgramArray =
    aya_ebpf::maps::ProgramArray::with_max_entries(lb_common::RARE_PROGS_ENTRIES, 0);

/// The SYN filter (`lb_common::syn_filter`, `syn_filter.rs`): the head word,
/// then two copies of one bit per hash of every `CT_ESTABLISHED` flow. Set by
/// the program, rebuilt by the agent's sweep (memory-mapped); not pinned (an
/// agent starts it off and turns it on after its own walks).
#[btf_map]
pub static CT_SYN_FILTER: Array<u64, { 1 + 2 * 64 }, { BPF_F_MMAPABLE as usize }> = Array::new();
