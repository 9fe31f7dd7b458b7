//! The agent's side of the connection table: expiring idle `CT_ESTABLISHED`
//! entries (the XDP program never evicts them) and counting what that table
//! holds, for `status` and `/metrics`.
//!
//! The sweep runs on its own task with its own handle on the map, so a large
//! table never stalls the event loop. An entry is removed when it has been idle
//! (no packet) for longer than its timeout: `tcp`, `tcp_fin` (the client sent FIN
//! or RST) or `udp`. A packet arriving between the read and the delete makes the
//! flow miss both tables once; it is then scheduled again, to the same backend
//! unless the table changed in between.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, MapData};
use lb_common::{FlowKey, FlowVal, CT_STATE_CLOSING, PROTO_UDP};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::Timeouts;

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

/// How often to sweep: a tenth of the shortest timeout, within 1..=30 s.
pub fn sweep_interval(t: &Timeouts) -> Duration {
    let shortest = t.tcp.min(t.tcp_fin).min(t.udp);
    (shortest / 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// One pass over the table at clock `now` (the value last published, so a clock
/// that stalled never makes entries look idle): counts entries by state and
/// removes expired ones.
pub fn sweep(map: &mut HashMap<MapData, FlowKey, FlowVal>, now: u32, t: &Timeouts, status: &mut TableStatus) {
    let started = Instant::now();
    let (mut established, mut closing) = (0u64, 0u64);
    let mut stale = Vec::new();
    // Collect first: deleting while walking makes the kernel restart the walk.
    for entry in map.iter() {
        let Ok((key, val)) = entry else { continue };
        if expired(now, val.last_seen, timeout_of(&key, &val, t)) {
            stale.push(key);
        } else if val.state == CT_STATE_CLOSING {
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
        } else if val.state == CT_STATE_CLOSING {
            closing += 1;
        } else {
            established += 1;
        }
    }
    status.established = established;
    status.closing = closing;
    status.sweep_secs = started.elapsed().as_secs_f64();
}

/// Until `shutdown`: publishes the clock every second and sweeps `map` every
/// `sweep_interval`, publishing the table's figures into `shared`; `timeouts`
/// follows reloads.
pub async fn run(
    map: MapData,
    clock: MapData,
    mut timeouts: watch::Receiver<Timeouts>,
    shared: Arc<Mutex<TableStatus>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let map = match HashMap::<_, FlowKey, FlowVal>::try_from(aya::maps::Map::HashMap(map)) {
        Ok(m) => Arc::new(Mutex::new(m)),
        Err(e) => return tracing::error!(error = %e, "CT_ESTABLISHED: cannot sweep, idle entries stay"),
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
        let (m, s) = (map.clone(), shared.clone());
        let mut status = s.lock().map(|g| g.clone()).unwrap_or_default();
        let swept = tokio::task::spawn_blocking(move || {
            if let Ok(mut m) = m.lock() {
                sweep(&mut m, now, &t, &mut status);
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
        assert_eq!(sweep_interval(&t), Duration::from_secs(12));
        let short = Timeouts { tcp_fin: Duration::from_secs(2), ..t };
        assert_eq!(sweep_interval(&short), Duration::from_secs(1));
    }
}
