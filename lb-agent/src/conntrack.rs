//! The agent's side of the connection table: expiring idle `CT_ESTABLISHED`
//! entries (the XDP program never evicts them), counting what that table holds,
//! for `status` and `/metrics`, and publishing exact per-backend connection
//! counts (`BACKEND_CONNS`, see `lb_common::BackendConns`).
//!
//! Counting: each sweep reads the program's deltas (`BACKEND_CONN_DELTA`), walks
//! `CT_ESTABLISHED` (TCP established: active; TCP closing and UDP: inactive) and
//! `CONNTRACK` (flows seen once, still within their timeout: inactive), and writes
//! `exact - delta` as each backend's base. Between sweeps the program's own adds
//! move the counts; a sweep at most `MAX_SWEEP` apart resets any drift, so counts
//! are exact within one sweep interval plus the walk (entries that change state
//! while being walked can be off by one until the next sweep).
//!
//! The sweep runs on its own task with its own handle on the map, so a large
//! table never stalls the event loop. An entry is removed when it has been idle
//! (no packet) for longer than its timeout: `tcp`, `tcp_fin` (the client sent FIN
//! or RST) or `udp`. A packet arriving between the read and the delete makes the
//! flow miss both tables once; it is then scheduled again, to the same backend
//! unless the table changed in between.

use std::{
    os::fd::AsFd,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, IterableMap, MapData};
use lb_common::{BackendConns, FlowKey, FlowVal, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, PROTO_TCP, PROTO_UDP};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    config::Timeouts,
    syn_filter::{Rebuild, SynFilter},
};

/// What `CT_ESTABLISHED` held at the last sweep.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TableStatus {
    /// Entries of `CONNTRACK` (new flows, LRU).
    pub new_capacity: u32,
    /// Entries `CT_ESTABLISHED` can hold (0: protection off).
    pub established_capacity: u32,
    /// Established flows by state after the last sweep.
    pub established: u64,
    pub closing: u64,
    /// Entries removed for idleness since the agent started.
    pub expired_total: u64,
    /// How long the last sweep took.
    pub sweep_secs: f64,
    /// Whether the SYN filter is on (`syn_filter.rs`: from the second sweep).
    #[serde(default)]
    pub syn_filter: bool,
}

/// Whole seconds of CLOCK_MONOTONIC: what the agent publishes in `CT_CLOCK` and
/// the program stamps entries with.
pub fn now_s() -> u32 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u32
}

/// Publishes `now_s()` in `CT_CLOCK`; returns the value written.
pub fn publish_clock<T: std::borrow::BorrowMut<MapData>>(clock: &mut Array<T, u32>) -> Result<u32, aya::maps::MapError> {
    let now = now_s();
    clock.set(0, now, 0)?;
    Ok(now)
}

/// The idle timeout of an entry.
pub fn timeout_of(key: &FlowKey, val: &FlowVal, t: &Timeouts) -> Duration {
    if key.proto == PROTO_UDP {
        t.udp
    } else if val.state == CT_STATE_CLOSING {
        t.tcp_fin
    } else {
        t.tcp
    }
}

/// Whether an entry last seen at `last_seen` is past `timeout` at `now` (seconds
/// of the published clock).
pub fn expired(now: u32, last_seen: u32, timeout: Duration) -> bool {
    u64::from(now.wrapping_sub(last_seen)) > timeout.as_secs()
}

/// Longest time between sweeps: the bound on how long per-backend connection
/// counts may drift from the table.
pub const MAX_SWEEP: Duration = Duration::from_secs(2);

/// How often to sweep: a tenth of the shortest timeout, within 1 s..=`MAX_SWEEP`.
pub fn sweep_interval(t: &Timeouts) -> Duration {
    let shortest = t.tcp.min(t.tcp_fin).min(t.udp);
    (shortest / 10).clamp(Duration::from_secs(1), MAX_SWEEP)
}

/// Whether an entry counts as an active connection (`ipvsadm`'s ActiveConn):
/// TCP, established. Everything else live is inactive.
pub fn is_active(key: &FlowKey, val: &FlowVal) -> bool {
    key.proto == PROTO_TCP && val.state == CT_STATE_ESTABLISHED
}

/// Per backend id: (active, inactive).
pub type Counts = std::collections::BTreeMap<u32, (u32, u32)>;

fn tally(counts: &mut Counts, key: &FlowKey, val: &FlowVal) {
    let c = counts.entry(val.backend_id).or_default();
    if is_active(key, val) {
        c.0 += 1;
    } else {
        c.1 += 1;
    }
}

/// Counts the live flows of `CONNTRACK` (flows seen once: a SYN, a first
/// datagram) into `counts`: those within their timeout (`tcp_fin` for TCP, as a
/// half-open connection; `udp`), all inactive.
pub fn count_new(map: &HashMap<MapData, FlowKey, FlowVal>, now: u32, t: &Timeouts, counts: &mut Counts) {
    for entry in map.iter() {
        let Ok((key, val)) = entry else { continue };
        let timeout = if key.proto == PROTO_UDP { t.udp } else { t.tcp_fin };
        if !expired(now, val.last_seen, timeout) {
            counts.entry(val.backend_id).or_default().1 += 1;
        }
    }
}

/// The per-backend count maps: the agent's base and the program's deltas.
pub struct ConnMaps {
    pub base: Array<MapData, BackendConns>,
    pub delta: Array<MapData, BackendConns>,
    /// Bases last written, so unchanged ones are not written again.
    written: Vec<BackendConns>,
}

impl ConnMaps {
    pub fn new(base: MapData, delta: MapData) -> Result<Self, aya::maps::MapError> {
        let base: Array<_, BackendConns> = Array::try_from(aya::maps::Map::Array(base))?;
        let delta = Array::try_from(aya::maps::Map::Array(delta))?;
        // What the map holds already (zeros, or an adopted agent's bases): only
        // what differs from it is written.
        let written = read_all(&base);
        Ok(ConnMaps { written, base, delta })
    }

    /// The program's deltas now, by backend id.
    pub fn deltas(&self) -> Vec<BackendConns> {
        read_all(&self.delta)
    }

    /// Writes the bases for `counts`, exact as of a walk that began after
    /// `deltas` were read.
    pub fn publish(&mut self, counts: &Counts, deltas: &[BackendConns]) {
        self.written.resize(deltas.len(), BackendConns { active: i64::MIN, inactive: i64::MIN });
        for (id, d) in deltas.iter().enumerate() {
            let (a, i) = counts.get(&(id as u32)).copied().unwrap_or_default();
            let base = BackendConns::base_for(a, i, d);
            if self.written[id] != base && self.base.set(id as u32, base, 0).is_ok() {
                self.written[id] = base;
            }
        }
    }
}

/// Every element of a count map: in batches (a few system calls for 100,000
/// backends) where the kernel allows, else element by element.
fn read_all(map: &Array<MapData, BackendConns>) -> Vec<BackendConns> {
    let data = map.map();
    let len = data.info().map(|i| i.max_entries()).unwrap_or(0);
    crate::batch::read_array(data.fd().as_fd(), len).unwrap_or_else(|_| map.iter().map(|d| d.unwrap_or_default()).collect())
}

/// One pass over the table at clock `now` (the value last published, so a clock
/// that stalled never makes entries look idle): counts entries by state, and by
/// backend into `counts`, and removes expired ones. With `filter`, sets the bit
/// of every entry walked in the SYN filter's copy being rebuilt. Returns whether
/// the walk reached the end of the table (an error ends it early).
pub fn sweep(
    map: &mut HashMap<MapData, FlowKey, FlowVal>,
    now: u32,
    t: &Timeouts,
    status: &mut TableStatus,
    counts: &mut Counts,
    filter: Option<(&SynFilter, Rebuild)>,
) -> bool {
    let started = Instant::now();
    let (mut established, mut closing) = (0u64, 0u64);
    let mut stale = Vec::new();
    let mut complete = true;
    // Collect first: deleting while walking makes the kernel restart the walk.
    for entry in map.iter() {
        let Ok((key, val)) = entry else {
            complete = false;
            continue;
        };
        if let Some((f, r)) = filter {
            f.add(r, &key);
        }
        if expired(now, val.last_seen, timeout_of(&key, &val, t)) {
            stale.push(key);
            continue;
        }
        tally(counts, &key, &val);
        if val.state == CT_STATE_CLOSING {
            closing += 1;
        } else {
            established += 1;
        }
    }
    for key in stale {
        // Seen again since the walk read it: keep it.
        let Ok(val) = map.get(&key, 0) else { continue };
        if expired(now, val.last_seen, timeout_of(&key, &val, t)) && map.remove(&key).is_ok() {
            status.expired_total += 1;
            continue;
        }
        tally(counts, &key, &val);
        if val.state == CT_STATE_CLOSING {
            closing += 1;
        } else {
            established += 1;
        }
    }
    status.established = established;
    status.closing = closing;
    status.sweep_secs = started.elapsed().as_secs_f64();
    complete
}

/// `sweep` with the SYN filter's rebuild around it (`syn_filter.rs`): the
/// walk fills the copy not being read, which is read from then on if the walk
/// was complete; `status.syn_filter` says whether the filter is on. Returns
/// whether the walk was complete.
pub fn sweep_with_filter(
    map: &mut HashMap<MapData, FlowKey, FlowVal>,
    now: u32,
    t: &Timeouts,
    status: &mut TableStatus,
    counts: &mut Counts,
    filter: &mut SynFilter,
) -> bool {
    let rebuild = filter.begin();
    let complete = sweep(map, now, t, status, counts, rebuild.map(|r| (&*filter, r)));
    if let (Some(r), true) = (rebuild, complete) {
        if !filter.is_on() {
            tracing::info!("SYN filter on: SYNs of new 5-tuples skip the CT_ESTABLISHED lookup");
        }
        filter.finish(r);
    }
    status.syn_filter = filter.is_on();
    complete
}

/// The maps the sweep works on (second handles; the dataplane keeps its own).
pub struct SweepMaps {
    pub established: MapData,
    pub new: MapData,
    /// `FIRST_RECORD`, counted with `CONNTRACK` (`first_record.rs`).
    pub first: MapData,
    pub clock: MapData,
    pub conns: MapData,
    pub conn_delta: MapData,
    /// `NAT_REVERSE`, swept after the tables (`nat_table.rs`).
    pub nat_reverse: MapData,
    /// `FULLNAT_FORWARD` and `FULLNAT_REVERSE`, swept after them
    /// (`fullnat_table.rs`).
    pub fullnat_forward: MapData,
    pub fullnat_reverse: MapData,
    /// `CT_SYN_FILTER`, rebuilt by each walk of `CT_ESTABLISHED`
    /// (`syn_filter.rs`).
    pub syn_filter: MapData,
}

/// What one sweep task holds between sweeps.
struct Sweeper {
    established: HashMap<MapData, FlowKey, FlowVal>,
    new: HashMap<MapData, FlowKey, FlowVal>,
    first: crate::first_record::FirstRecords,
    conns: ConnMaps,
    nat: HashMap<MapData, FlowKey, lb_common::NatReverse>,
    fullnat_forward: HashMap<MapData, FlowKey, lb_common::SnatFwd>,
    fullnat_reverse: HashMap<MapData, FlowKey, lb_common::NatReverse>,
    /// `None` when it could not be mapped: the filter then stays off.
    syn_filter: Option<SynFilter>,
}

/// The bases in `BACKEND_CONNS` by backend id, as the sweep last wrote them: the
/// status adds the program's deltas to these and so reads one map, not two.
/// Empty until the sweep has read the map.
pub type Bases = Arc<std::sync::RwLock<Vec<BackendConns>>>;

/// Until `shutdown`: publishes the clock every second and sweeps the table every
/// `sweep_interval`, publishing the table's figures into `shared`, the
/// per-backend counts into `BACKEND_CONNS` and the bases written there into
/// `bases`; `timeouts` follows reloads.
pub async fn run(
    maps: SweepMaps,
    mut timeouts: watch::Receiver<Timeouts>,
    shared: Arc<Mutex<TableStatus>>,
    bases: Bases,
    mut shutdown: watch::Receiver<bool>,
) {
    let SweepMaps { established, new, first, clock, conns, conn_delta, nat_reverse, fullnat_forward, fullnat_reverse, syn_filter } =
        maps;
    let syn_filter = SynFilter::new(syn_filter)
        .inspect_err(|e| tracing::warn!(error = %e, "CT_SYN_FILTER: cannot map it; the SYN filter stays off"))
        .ok();
    let sweeper = (|| {
        Ok::<_, aya::maps::MapError>(Sweeper {
            established: HashMap::try_from(aya::maps::Map::HashMap(established))?,
            new: HashMap::try_from(aya::maps::Map::LruHashMap(new))?,
            first: crate::first_record::FirstRecords::new(first).map_err(|e| aya::maps::MapError::SyscallError(
                aya::sys::SyscallError { call: "mmap FIRST_RECORD", io_error: e },
            ))?,
            conns: ConnMaps::new(conns, conn_delta)?,
            nat: HashMap::try_from(aya::maps::Map::LruHashMap(nat_reverse))?,
            fullnat_forward: HashMap::try_from(aya::maps::Map::HashMap(fullnat_forward))?,
            fullnat_reverse: HashMap::try_from(aya::maps::Map::HashMap(fullnat_reverse))?,
            syn_filter,
        })
    })();
    let map = match sweeper {
        Ok(m) => {
            if let Ok(mut b) = bases.write() {
                b.clone_from(&m.conns.written);
            }
            Arc::new(Mutex::new(m))
        }
        Err(e) => return tracing::error!(error = %e, "connection table: cannot sweep, idle entries stay and counts are not kept"),
    };
    let mut clock = match Array::<_, u32>::try_from(aya::maps::Map::Array(clock)) {
        Ok(c) => c,
        Err(e) => return tracing::error!(error = %e, "CT_CLOCK: cannot publish the clock, entries keep their time"),
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // The first sweep comes at once, so `status` has figures from the start.
    let mut next_sweep = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = timeouts.changed() => {}
            _ = shutdown.changed() => return,
        }
        let now = match publish_clock(&mut clock) {
            Ok(now) => now,
            Err(e) => {
                tracing::warn!(error = %e, "CT_CLOCK: publishing the clock");
                continue;
            }
        };
        let t = *timeouts.borrow_and_update();
        if Instant::now() < next_sweep {
            continue;
        }
        next_sweep = Instant::now() + sweep_interval(&t);
        let (m, s, b) = (map.clone(), shared.clone(), bases.clone());
        let mut status = s.lock().map(|g| g.clone()).unwrap_or_default();
        let swept = tokio::task::spawn_blocking(move || {
            if let Ok(mut m) = m.lock() {
                let m = &mut *m;
                let deltas = m.conns.deltas();
                let mut counts = Counts::new();
                match m.syn_filter.as_mut() {
                    Some(f) => sweep_with_filter(&mut m.established, now, &t, &mut status, &mut counts, f),
                    None => sweep(&mut m.established, now, &t, &mut status, &mut counts, None),
                };
                count_new(&m.new, now, &t, &mut counts);
                m.first.count(now, &t, &mut counts);
                m.conns.publish(&counts, &deltas);
                crate::nat_table::sweep(&mut m.nat, &m.established, &m.new);
                let mut tables = crate::fullnat_table::Tables {
                    forward: &mut m.fullnat_forward,
                    reverse: &mut m.fullnat_reverse,
                    established: &m.established,
                    new: &m.new,
                };
                crate::fullnat_table::sweep(&mut tables, now, &t);
                if let Ok(mut b) = b.write() {
                    b.clone_from(&m.conns.written);
                }
            }
            status
        })
        .await;
        match swept {
            Ok(status) => {
                if let Ok(mut g) = shared.lock() {
                    *g = status;
                }
            }
            Err(e) => return tracing::error!(error = %e, "connection-table sweep failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_by_state_and_protocol() {
        let t = Timeouts::default();
        let tcp = FlowKey { proto: lb_common::PROTO_TCP, ..Default::default() };
        let udp = FlowKey { proto: PROTO_UDP, ..Default::default() };
        let est = FlowVal { state: lb_common::CT_STATE_ESTABLISHED, ..Default::default() };
        let fin = FlowVal { state: CT_STATE_CLOSING, ..Default::default() };
        assert_eq!(timeout_of(&tcp, &est, &t), Duration::from_secs(900));
        assert_eq!(timeout_of(&tcp, &fin, &t), Duration::from_secs(120));
        assert_eq!(timeout_of(&udp, &est, &t), Duration::from_secs(300));
        assert!(!expired(1000, 100, Duration::from_secs(900)));
        assert!(expired(1001, 100, Duration::from_secs(900)));
        // Across the 32-bit wrap of the seconds clock.
        assert!(!expired(5, u32::MAX - 5, Duration::from_secs(900)));
        assert_eq!(sweep_interval(&t), MAX_SWEEP);
        let short = Timeouts { tcp_fin: Duration::from_secs(2), ..t };
        assert_eq!(sweep_interval(&short), Duration::from_secs(1));
    }

    #[test]
    fn counts_by_state_and_base_plus_delta() {
        let tcp = FlowKey { proto: PROTO_TCP, ..Default::default() };
        let udp = FlowKey { proto: PROTO_UDP, ..Default::default() };
        let val = |backend_id, state| FlowVal { backend_id, state, ..Default::default() };
        let mut counts = Counts::new();
        tally(&mut counts, &tcp, &val(1, CT_STATE_ESTABLISHED));
        tally(&mut counts, &tcp, &val(1, CT_STATE_ESTABLISHED));
        tally(&mut counts, &tcp, &val(1, CT_STATE_CLOSING));
        tally(&mut counts, &udp, &val(2, CT_STATE_ESTABLISHED));
        assert_eq!(counts.get(&1), Some(&(2, 1)));
        assert_eq!(counts.get(&2), Some(&(0, 1)), "UDP is inactive");
        // The program had moved the delta before the sweep; the base makes the sum
        // the sweep's figure, and later program adds move it from there.
        let delta = BackendConns { active: 40, inactive: -7 };
        let base = BackendConns::base_for(2, 1, &delta);
        assert_eq!(BackendConns::count(&base, &delta), (2, 1));
        let later = BackendConns { active: 41, inactive: -8 };
        assert_eq!(BackendConns::count(&base, &later), (3, 0));
        // A transient negative reads as 0.
        let racing = BackendConns { active: 38, inactive: -9 };
        assert_eq!(BackendConns::count(&base, &racing), (0, 0));
    }
}
