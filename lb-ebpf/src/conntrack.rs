//! The connection table, in two parts (see docs/connection-table.md, "Connection
//! table"):
//!
//! - `CONNTRACK`, an LRU hash, holds flows seen once (and the TCP SYNs of
//!   services that do not use `FIRST_RECORD`, `first.rs`: a `maglev`/`sh` SYN is
//!   recorded there with one store, and its ACK takes it). A flood of new flows
//!   churns it; that is what it is for.
//! - `CT_ESTABLISHED`, a plain hash, holds flows that sent a second packet (TCP: a
//!   packet without SYN after the SYN; UDP: a second datagram). New flows never
//!   evict an entry there: entries leave when the agent expires them (idle past
//!   their timeout) or when their backend is gone. When it is full, flows stay in
//!   `CONNTRACK` (counted as `ct_established_full`).
//!
//! Without `CONFIG_CT_PROTECT` (`established_size: 0`) only `CONNTRACK` is used.

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use lb_common::{
    stat, trace::ct_step, Backend, FlowKey, FlowVal, BACKEND_ACTIVE, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW,
    PROTO_TCP, SCHED_MAGLEV, SCHED_SH, SERVICE_PERSIST,
};

use crate::{
    backend::backend,
    conns, first, flood,
    syn_filter,
    maps::{BACKENDS, CONNTRACK, CT_CLOCK, CT_ESTABLISHED},
    stats::count,
    trace::Decision,
};

/// What the tables say about a packet's flow.
pub enum Lookup {
    /// A live entry: forward to this backend. `snat`: the entry's `FlowVal::snat`
    /// as a word (`CT_ESTABLISHED` only; 0 from `CONNTRACK`, whose entries the
    /// agent may outlive with the flow's mapping).
    Hit { service_id: u32, backend_id: u32, backend: &'static Backend, snat: u32 },
    /// Schedule the flow, then `record` the choice where `Slot` says.
    Miss(Slot),
}

/// Where a scheduling decision is recorded. A struct whose fields are defined
/// on every path, not an enum: LLVM merged the returns of two variants and
/// spilled the payload one of them leaves undefined, a register the verifier
/// refuses to read (`lb_prefix`, "R3 !read_ok").
pub struct Slot {
    /// Non-null: in place, in this `CT_ESTABLISHED` entry (its backend went
    /// away, or a SYN reuses its 5-tuple): the flow stays protected on its new
    /// backend. Null: a new entry in `CONNTRACK` (or `FIRST_RECORD`).
    pub established: *mut FlowVal,
    /// Bits 0..32: a TCP SYN's `FIRST_RECORD` tag (`syn_filter::absent`; 0
    /// otherwise); bit 32: `midflow`, a TCP packet without SYN found in neither
    /// table (counted once the packet turns out to be for a service).
    bits: u64,
}

impl Slot {
    /// A new entry.
    #[inline(always)]
    pub const fn new(midflow: bool, tag: u32) -> Slot {
        Slot { established: core::ptr::null_mut(), bits: tag as u64 | (midflow as u64) << 32 }
    }

    /// In place, in `p`.
    #[inline(always)]
    const fn established(p: *mut FlowVal) -> Slot {
        Slot { established: p, bits: 0 }
    }

    #[inline(always)]
    pub const fn midflow(&self) -> bool {
        self.bits >> 32 != 0
    }

    #[inline(always)]
    const fn tag(&self) -> u32 {
        self.bits as u32
    }
}

const EEXIST: i32 = 17;

/// A connection-table value with no SNAT mapping. Built field by field, the
/// `snat` bytes one by one: an array store in a struct literal becomes a call
/// to a byte-loop `memset` (a BPF-to-BPF call and its return).
#[inline(always)]
pub fn flow_val(backend_id: u32, service_id: u32, generation: u32, last_seen: u32, state: u8) -> FlowVal {
    let mut v = core::mem::MaybeUninit::<FlowVal>::uninit();
    let p = v.as_mut_ptr();
    // SAFETY: every field written before `assume_init`.
    unsafe {
        (&raw mut (*p).backend_id).write(backend_id);
        (&raw mut (*p).service_id).write(service_id);
        (&raw mut (*p).generation).write(generation);
        (&raw mut (*p).last_seen).write(last_seen);
        (&raw mut (*p).state).write(state);
        for i in 0..3 {
            (&raw mut (*p).snat[i]).write_volatile(0);
        }
        v.assume_init()
    }
}

/// The agent's clock (`CT_CLOCK`): seconds, as `FlowVal::last_seen` keeps them.
#[inline(always)]
fn now() -> u32 {
    CT_CLOCK.get(0).copied().unwrap_or(0)
}

/// Looks the flow up. `syn`: a TCP SYN without ACK; `fin`: a TCP FIN or RST.
#[inline(always)]
pub fn lookup(flow: &FlowKey, syn: bool, fin: bool, protect: bool, d: &mut Decision) -> Lookup {
    // A SYN whose bit in the SYN filter is clear has no entry there: it skips
    // the lookup (`syn_filter.rs`; the rest of this function is unchanged).
    let filter = if protect && syn { syn_filter::absent(flow) } else { 0 };
    if protect && filter & 1 == 0 {
        if let Some(p) = CT_ESTABLISHED.get_ptr_mut(flow) {
            // SAFETY: a live entry; copied out, fields written back one by one.
            let v = unsafe { *p };
            if syn {
                // A new connection on the 5-tuple of an established one (a reused
                // client port): scheduled afresh, as Katran does, and recorded in
                // this entry so its later packets follow it.
                d.ct = ct_step::RESCHEDULED;
                return Lookup::Miss(Slot::established(p));
            }
            let usable = backend(v.backend_id, v.service_id, Some(v.generation), BACKEND_ACTIVE);
            return match usable {
                Some(b) => {
                    let now = now();
                    // SAFETY: as above; plain stores, only when something changed.
                    unsafe {
                        if v.last_seen != now {
                            (*p).last_seen = now;
                        }
                        if fin && v.state != CT_STATE_CLOSING {
                            (*p).state = CT_STATE_CLOSING;
                            if conns::is_active(flow.proto, v.state) {
                                conns::add(v.backend_id, -1, 1);
                            }
                        }
                    }
                    d.ct = ct_step::HIT_ESTABLISHED;
                    let snat = u32::from_le_bytes([v.snat[0], v.snat[1], v.snat[2], 0]);
                    Lookup::Hit { service_id: v.service_id, backend_id: v.backend_id, backend: b, snat }
                }
                None => {
                    d.ct = ct_step::RESCHEDULED;
                    Lookup::Miss(Slot::established(p))
                }
            };
        }
    }
    if syn {
        // A new connection (maybe on a reused 5-tuple whose LRU entry is still
        // there), scheduled afresh.
        d.ct = ct_step::MISS;
        return Lookup::Miss(Slot::new(false, (filter >> 32) as u32));
    }
    if protect {
        // A TCP packet without SYN: its flow's SYN may be in `FIRST_RECORD`
        // (`first.rs`). Looked at before `CONNTRACK`: a SYN recorded there leaves
        // an older `CONNTRACK` entry of its 5-tuple in place, which must not win.
        let taken = first::take(flow, first::hash_of(flow), fin, now());
        if taken != first::NONE {
            if (taken >> 32) as u8 == ct_step::PROMOTED {
                syn_filter::add(flow);
            }
            if let Some(b) = BACKENDS.get(taken as u32) {
                d.ct = (taken >> 32) as u8;
                return Lookup::Hit { service_id: b.service_id, backend_id: taken as u32, backend: b, snat: 0 };
            }
        }
    }
    // SAFETY: copied out at once.
    let Some(v) = (unsafe { CONNTRACK.get(flow) }).copied() else {
        let midflow = flow.proto == PROTO_TCP;
        d.ct = if midflow { ct_step::MIDFLOW_MISS } else { ct_step::MISS };
        return Lookup::Miss(Slot::new(midflow, 0));
    };
    let Some(b) = backend(v.backend_id, v.service_id, Some(v.generation), BACKEND_ACTIVE) else {
        d.ct = ct_step::RESCHEDULED;
        return Lookup::Miss(Slot::new(false, 0));
    };
    d.ct = if protect { promote(flow, &v, fin) } else { ct_step::HIT_NEW };
    Lookup::Hit { service_id: v.service_id, backend_id: v.backend_id, backend: b, snat: 0 }
}

/// A SYN whose flow is in `CONNTRACK`, seen once, for `service_id` and a backend
/// still usable: a retransmission (its first copy is unanswered or the answer
/// is still on its way), kept on that backend. Only the schedulers whose choice
/// is not a function of the packet ask (rr, wrr, lc, wlc).
#[inline(always)]
pub fn repeated_syn(flow: &FlowKey, service_id: u32) -> Option<(u32, &'static Backend)> {
    // SAFETY: fields copied out at once.
    let v = unsafe { CONNTRACK.get(flow) }?;
    let (id, generation, svc, state) = (v.backend_id, v.generation, v.service_id, v.state);
    if state != CT_STATE_NEW || svc != service_id {
        return None;
    }
    let b = backend(id, service_id, Some(generation), BACKEND_ACTIVE | lb_common::BACKEND_ACCEPTS_NEW)?;
    Some((id, b))
}

/// The flow's second packet: move it to `CT_ESTABLISHED`. Returns the `ct_step`.
#[inline(always)]
fn promote(flow: &FlowKey, v: &FlowVal, fin: bool) -> u8 {
    let state = if fin { CT_STATE_CLOSING } else { CT_STATE_ESTABLISHED };
    // `snat` is not carried over: `lb_nat` writes it once it has checked the
    // mapping (a `CONNTRACK` entry may be older than its flow's mapping).
    let est = flow_val(v.backend_id, v.service_id, v.generation, now(), state);
    match CT_ESTABLISHED.insert(flow, &est, BPF_NOEXIST as u64) {
        Ok(()) => {
            syn_filter::add(flow);
            count(stat::CT_PROMOTED);
            if conns::is_active(flow.proto, state) {
                conns::add(v.backend_id, 1, -1);
            }
            let _ = CONNTRACK.remove(flow);
            ct_step::PROMOTED
        }
        // Another CPU promoted it first.
        Err(e) if e == -EEXIST => {
            let _ = CONNTRACK.remove(flow);
            ct_step::HIT_ESTABLISHED
        }
        Err(_) => {
            count(stat::CT_ESTABLISHED_FULL);
            ct_step::ESTABLISHED_FULL
        }
    }
}

/// The SYN flood check's inputs as one register, built with shifts only (no
/// branch: see `insert_new`): the threshold (`Config::syn_flood_kps`, bits
/// 0..16), whether the packet is a TCP SYN (bit 16), whether the service has
/// persistence (bit 17), its scheduler (bits 24..32), and the hash the flow was
/// scheduled by (bits 32..64; for `maglev` the flow hash, `first::hash_of`).
#[inline(always)]
pub fn flood_inputs(syn: bool, scheduler: u8, flags: u32, kps: u16, hash: u32) -> u64 {
    u64::from(kps)
        | (u64::from(syn) << 16)
        | (u64::from(flags & SERVICE_PERSIST) << 16)
        | (u64::from(scheduler) << 24)
        | (u64::from(hash) << 32)
}

const _: () = assert!(SERVICE_PERSIST == 1 << 1, "flood_inputs shifts the persistence flag to bit 17");

/// Records a scheduling decision; `flood` is `flood_inputs` of the packet and
/// its service.
#[inline(always)]
pub fn record(flow: &FlowKey, slot: Slot, backend_id: u32, service_id: u32, generation: u32, flood: u64) {
    let p = slot.established;
    match p.is_null() {
        true => insert_new(flow, u64::from(backend_id) | (u64::from(generation) << 32), service_id, slot.tag(), flood),
        false => {
            let now = now();
            // SAFETY: the live entry `lookup` found; other CPUs reading it half
            // written see a generation that does not match and schedule the flow
            // themselves, to the same backend.
            unsafe {
                let (old_id, old_state) = ((*p).backend_id, (*p).state);
                let was_active = conns::is_active(flow.proto, old_state) as i64;
                conns::add(old_id, -was_active, was_active - 1);
                let active = conns::is_active(flow.proto, CT_STATE_ESTABLISHED) as i64;
                conns::add(backend_id, active, 1 - active);
                (*p).backend_id = backend_id;
                (*p).service_id = service_id;
                (*p).generation = generation;
                (*p).last_seen = now;
                (*p).state = CT_STATE_ESTABLISHED;
                // A new backend: its SNAT mapping is not known yet.
                // Byte by byte (an array store becomes a call to a byte-loop `memset`).
                (*p).snat[0] = 0;
                (*p).snat[1] = 0;
                (*p).snat[2] = 0;
            }
        }
    }
}

/// A new `CONNTRACK` entry, unless the packet is a TCP SYN of a service whose
/// scheduler is a function of the flow (maglev, sh; no persistence): then, while
/// the first record is on and the backend is not a `nat`/`fullnat` one, a
/// `FIRST_RECORD` store instead (`first.rs`); and when this CPU is past the SYN
/// flood threshold (`flood::over`), nothing: the SYN is only counted
/// (`ct_syn_unrecorded`): its flow's next packet (never a SYN: a midflow miss)
/// finds no entry, is scheduled to the same backend and recorded then; a SYN
/// flood's spoofed SYNs, which have no next packet, then cost no insert and evict
/// nothing. A call of its own that takes its inputs packed (`flood_inputs`): the
/// branches on them stay in here, and both outcomes end here, so the verifier
/// walks the rest of the balancer once.
#[inline(never)]
fn insert_new(flow: &FlowKey, id_generation: u64, service_id: u32, tag: u32, flood: u64) {
    let (backend_id, generation) = (id_generation as u32, (id_generation >> 32) as u32);
    let (kps, syn, persist, scheduler) = (flood as u16, (flood >> 16) & 1, (flood >> 17) & 1, (flood >> 24) as u8);
    let deterministic = (scheduler == SCHED_MAGLEV || scheduler == SCHED_SH) && persist == 0;
    if syn != 0 && deterministic {
        if flood::over(u32::from(kps)) {
            count(stat::CT_SYN_UNRECORDED);
            return;
        }
        let mask = first::mask_for(backend_id);
        if mask != 0 {
            // A `maglev` flow was scheduled by its flow hash: no second hashing
            // (about 30 ns a SYN); `sh` by its masked client's.
            let hash = if scheduler == SCHED_MAGLEV { (flood >> 32) as u32 } else { first::hash_of(flow) };
            // Not counted here: a half-open first record enters the counts
            // at the agent's next sweep (`conns.rs`). The count's atomic add
            // is a locked instruction, a full barrier: after the record's
            // store into a cold line it stalled the rest of the packet.
            first::store(hash, tag, mask, backend_id, generation, now());
            return;
        }
    }
    let val = flow_val(backend_id, service_id, generation, now(), CT_STATE_NEW);
    if CONNTRACK.insert(flow, &val, BPF_ANY as u64).is_err() {
        count(stat::CONN_INSERT_FAILED);
    } else {
        conns::opened(backend_id);
    }
}

/// Whether a reply should call `follow_reply`: a FIN or RST at once, anything
/// else once per second of `CT_CLOCK` (`seen`: the low 16 bits of the second
/// of the last one, a field of the flow's reverse entry, updated here). The
/// client's own packets refresh the entry too; this keeps a flow alive whose
/// client is silent (a UDP stream) for one lookup a second.
#[inline(always)]
pub fn reply_due(seen: *mut u16, fin: bool) -> bool {
    let now = now() as u16;
    // SAFETY: a field of a live map value (plain loads and stores).
    unsafe {
        if *seen == now && !fin {
            return false;
        }
        if *seen != now {
            *seen = now;
        }
    }
    true
}

/// A `nat` flow's reply (`forward/nat_reply.rs`), `flow` in the client-to-VIP
/// direction: keeps the flow's `CT_ESTABLISHED` entry fresh while the backend
/// talks, and closing once the backend sent FIN or RST (`fin`), as the client's
/// own packets do. A flow seen once (still in `CONNTRACK`) is left as it is.
#[inline(always)]
pub fn follow_reply(flow: &FlowKey, fin: bool) {
    let Some(p) = CT_ESTABLISHED.get_ptr_mut(flow) else { return };
    // SAFETY: a live entry; copied out, fields written back one by one.
    let v = unsafe { *p };
    let now = now();
    // SAFETY: as above; plain stores, only when something changed.
    unsafe {
        if v.last_seen != now {
            (*p).last_seen = now;
        }
        if fin && v.state != CT_STATE_CLOSING {
            (*p).state = CT_STATE_CLOSING;
            if conns::is_active(flow.proto, v.state) {
                conns::add(v.backend_id, -1, 1);
            }
        }
    }
}
