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

/// First word of every trace record's message; the second is the [`TraceRecord`]
/// in lower-case hex (its bytes in memory order).
pub const RECORD_TAG: &str = "lbtrace2";

/// What the program decided for one packet, filled in along the way. In `lb_xdp`
/// it is a local the compiler removes; in `lb_xdp_trace` it lives in the per-CPU
/// `TRACE_SCRATCH` record, off the 512-byte stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Service id, `u32::MAX` when none was found.
    pub service: u32,
    /// Maglev slot in the service's table, `u32::MAX` when Maglev did not choose.
    pub slot: u32,
    /// Backend id, `u32::MAX` when none was chosen.
    pub backend: u32,
    /// `ct_step`.
    pub ct: u8,
    /// 1: persistence chose the backend.
    pub persist: u8,
    pub _pad: [u8; 2],
}

impl Decision {
    pub const fn new() -> Self {
        Decision { service: u32::MAX, slot: u32::MAX, backend: u32::MAX, ct: ct_step::NONE, persist: 0, _pad: [0; 2] }
    }
}

impl Default for Decision {
    fn default() -> Self {
        Self::new()
    }
}

/// One trace record: the packet's flow as far as it could be read, the decision,
/// the XDP action and the outcome counter (`stat`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceRecord {
    /// 16-byte form (IPv4 as `::ffff:a.b.c.d`); zero when not read.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub _pad: [u8; 2],
    pub decision: Decision,
    pub action: u32,
    pub counter: u32,
    /// Frame length in bytes.
    pub len: u32,
}

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
    /// An ICMP error found its flow in a table (looked up only, never changed).
    pub const ICMP_HIT: u8 = 8;
    /// An ICMP error whose flow is in no table: scheduled, nothing recorded.
    pub const ICMP_MISS: u8 = 9;
    /// A fragment sent where its datagram's first fragment went (`FRAGS`).
    pub const FRAG_HIT: u8 = 10;

    /// Names, by value: the counters' names where there is one.
    pub const NAMES: [&str; 11] = [
        "none",
        "conn_hit",
        "conn_hit_new_table",
        "ct_promoted",
        "ct_established_full",
        "conn_miss",
        "ct_midflow_miss",
        "rescheduled",
        "icmp_hit",
        "icmp_miss",
        "frag_hit",
    ];
}

const _: () = {
    assert!(core::mem::size_of::<Decision>() == 16);
    assert!(core::mem::size_of::<TraceRecord>() == 68);
    assert!(core::mem::size_of::<TraceFilter>() == 60);
    assert!(core::mem::size_of::<TraceBudget>() == 16);
};
