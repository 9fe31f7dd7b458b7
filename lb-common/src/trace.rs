//! `lb-agent trace`: which packets the XDP program describes, and the record it
//! writes for each (through aya-log), shared so that both sides agree.
//!
//! While no trace runs the agent keeps `lb_xdp` in the XDP link: no trace code at
//! all. While one runs it swaps in `lb_xdp_trace`, which reads `TRACE_FILTER[0]`
//! and describes every packet that matches it and fits the per-second budget in
//! one record (see [`RECORD_TAG`]).

/// Value of `TRACE_FILTER[0]`, written by the agent while a trace runs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceFilter {
    /// `TRACE_ON` and the `TRACE_MATCH_*` bits of the conditions that apply.
    pub flags: u32,
    /// Records per second and CPU at most; the rest are counted in `TRACE_BUDGET`.
    pub budget_per_sec: u32,
    /// Client (source) address, already masked to `client_prefix` (16-byte form;
    /// an IPv4 prefix is given as 96 + its length).
    pub client: [u8; 16],
    pub client_prefix: u8,
    /// IP protocol (6 or 17).
    pub proto: u8,
    /// Destination port, host byte order.
    pub port: u16,
    /// Destination address (the VIP).
    pub vip: [u8; 16],
    /// The chosen backend's address.
    pub backend: [u8; 16],
}

pub const TRACE_ON: u32 = 1;
pub const TRACE_MATCH_CLIENT: u32 = 2;
pub const TRACE_MATCH_VIP: u32 = 4;
pub const TRACE_MATCH_PORT: u32 = 8;
pub const TRACE_MATCH_PROTO: u32 = 16;
pub const TRACE_MATCH_BACKEND: u32 = 32;

/// Value of the per-CPU `TRACE_BUDGET[0]`: this CPU's records in the current
/// second (of `CT_CLOCK`), and the records the budget refused since the agent last
/// reset it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceBudget {
    pub second: u32,
    pub used: u32,
    pub dropped: u64,
}

/// First word of every trace record's message. The record then carries, separated
/// by single spaces: protocol, source address, source port, destination address,
/// destination port, TCP flags, service id, connection-table step (`CtStep`), Maglev
/// slot, persistence hit (0/1), backend id, XDP action, outcome counter (`stat`),
/// frame length. Ids and the slot are `u32::MAX` when there is none; addresses are
/// 16-byte (IPv4-mapped) and printed as IPv6.
pub const RECORD_TAG: &str = "lbtrace1";
/// Fields after the tag.
pub const RECORD_WORDS: usize = 14;

/// What the connection table said about a packet (`ct` field of a record).
pub mod ct_step {
    /// Not looked up (the packet stopped earlier).
    pub const NONE: u8 = 0;
    /// Found in `CT_ESTABLISHED`.
    pub const HIT_ESTABLISHED: u8 = 1;
    /// Found in `CONNTRACK` (the LRU part); established tables off or full.
    pub const HIT_NEW: u8 = 2;
    /// Found in `CONNTRACK` and moved to `CT_ESTABLISHED` (`ct_promoted`).
    pub const PROMOTED: u8 = 3;
    /// Found in `CONNTRACK`; `CT_ESTABLISHED` full (`ct_established_full`).
    pub const ESTABLISHED_FULL: u8 = 4;
    /// Not found: scheduled as a new flow (`conn_miss`).
    pub const MISS: u8 = 5;
    /// TCP without SYN, not found (`ct_midflow_miss`).
    pub const MIDFLOW_MISS: u8 = 6;
    /// Its entry's backend is gone, or a SYN reuses its 5-tuple: scheduled again.
    pub const RESCHEDULED: u8 = 7;

    /// Names, by value: the counters' names where there is one.
    pub const NAMES: [&str; 8] =
        ["none", "conn_hit", "conn_hit_new_table", "ct_promoted", "ct_established_full", "conn_miss", "ct_midflow_miss", "rescheduled"];
}

const _: () = {
    assert!(core::mem::size_of::<TraceFilter>() == 60);
    assert!(core::mem::size_of::<TraceBudget>() == 16);
};
