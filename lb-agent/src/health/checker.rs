//! Runs the probes of many targets: one Tokio task per target, a semaphore bounding
//! how many probes run at once, jittered schedules, and the rise/fall state machine.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::probe::{ProbeContext, Prober};
use super::syn::SynProber;
use super::tracker::Tracker;
use super::{Health, ProbeKind, ProbeSpec};

/// Identifies a probed backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetKey {
    pub service: String,
    pub backend: IpAddr,
}

/// One backend to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub key: TargetKey,
    pub spec: ProbeSpec,
    /// Where to send the probe (see [`ProbeSpec::target`]).
    pub addr: SocketAddr,
    /// The service's name, for `exec` probes.
    pub service: String,
}

/// What the probes of one target have done so far (see [`Checker::probe_stats`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProbeStats {
    /// Probe attempts that succeeded.
    pub successes: u64,
    /// Probe attempts that failed (timeouts included).
    pub failures: u64,
    /// How long the last successful attempt took; `None` before the first success.
    pub last_latency: Option<Duration>,
}

impl ProbeStats {
    fn record(&mut self, result: &Result<Duration, String>) {
        match result {
            Ok(latency) => {
                self.successes += 1;
                self.last_latency = Some(*latency);
            }
            Err(_) => self.failures += 1,
        }
    }
}

/// A target changed state.
#[derive(Debug, Clone)]
pub struct HealthEvent {
    pub key: TargetKey,
    pub health: Health,
    /// Why, e.g. `3 consecutive probes failed, the last: tcp: connect to ...`.
    pub reason: String,
}

struct Running {
    target: Target,
    up: Arc<AtomicBool>,
    /// Updated by the probe task after each attempt.
    stats: Arc<Mutex<ProbeStats>>,
    /// `None` for kind `none`, which needs no task.
    task: Option<JoinHandle<()>>,
}

impl Running {
    fn health(&self) -> Health {
        if self.up.load(Ordering::Relaxed) {
            Health::Up
        } else {
            Health::Down
        }
    }

    fn stats(&self) -> ProbeStats {
        self.stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            // Dropping the probe in flight kills an `exec` probe's command.
            task.abort();
        }
    }
}

/// Probes a set of targets and reports every change of state.
///
/// A target starts in its spec's `initial` state (no event is sent for that); each
/// state change afterwards is sent on the events channel. [`Checker::set_targets`] and
/// [`Checker::new`] must be called within a Tokio runtime. Dropping the checker stops
/// every probe.
pub struct Checker {
    /// Where the grid of probe start times begins (see [`TICK`]).
    origin: Instant,
    semaphore: Arc<Semaphore>,
    events: UnboundedSender<HealthEvent>,
    running: HashMap<TargetKey, Running>,
    /// Sends the SYNs of tcp probes (opened with the first tcp target); `None` if raw
    /// sockets are not available, and tcp probes open a socket each.
    syn: OnceLock<Option<Arc<SynProber>>>,
}

impl Checker {
    /// A checker with no targets that runs at most `max_concurrent` probes at once
    /// (at least 1; [`super::DEFAULT_MAX_CONCURRENT`] is a reasonable choice).
    pub fn new(max_concurrent: usize, events: UnboundedSender<HealthEvent>) -> Self {
        Checker {
            origin: Instant::now(),
            semaphore: Arc::new(Semaphore::new(max_concurrent.max(1))),
            events,
            running: HashMap::new(),
            syn: OnceLock::new(),
        }
    }

    /// Replaces the target set. Targets whose key, spec, address and service are
    /// unchanged keep running with their state; removed ones stop; new ones start at
    /// their initial state. A target whose spec or address changed starts again at its
    /// initial state, and if that differs from its state so far an event says so.
    /// Of several targets with the same key, the last one counts.
    ///
    /// Probe statistics ([`Checker::probe_stats`]) belong to the key: a target that
    /// keeps running or is restarted with a changed spec or address keeps counting on
    /// from its totals so far; a removed target's are forgotten.
    pub fn set_targets(&mut self, targets: Vec<Target>) {
        let mut wanted: HashMap<TargetKey, Target> = HashMap::with_capacity(targets.len());
        for target in targets {
            wanted.insert(target.key.clone(), target);
        }
        // The state of each target whose spec or address changed, before the change.
        let mut previous: HashMap<TargetKey, (Health, Arc<Mutex<ProbeStats>>)> = HashMap::new();
        self.running.retain(|key, running| match wanted.get(key) {
            Some(target) if *target == running.target => {
                wanted.remove(key);
                true
            }
            changed => {
                if changed.is_some() {
                    previous.insert(key.clone(), (running.health(), running.stats.clone()));
                }
                running.stop();
                false
            }
        });
        for (key, target) in wanted {
            let (previous, stats) = match previous.remove(&key) {
                Some((health, stats)) => (Some(health), stats),
                None => (None, Arc::default()),
            };
            let running = self.start(target, stats);
            if let Some(previous) = previous.filter(|&h| h != running.health()) {
                let _ = self.events.send(HealthEvent {
                    key: key.clone(),
                    health: running.health(),
                    reason: format!(
                        "probe changed (was {previous}); starting again at its initial state"
                    ),
                });
            }
            self.running.insert(key, running);
        }
    }

    /// The current state of the target `key`, if it is probed.
    pub fn health(&self, key: &TargetKey) -> Option<Health> {
        self.running.get(key).map(Running::health)
    }

    /// What the probes of the target `key` have done so far, if it is probed (all
    /// zero for kind `none`, which never probes). Each attempt's result is counted
    /// as soon as it is known.
    pub fn probe_stats(&self, key: &TargetKey) -> Option<ProbeStats> {
        self.running.get(key).map(Running::stats)
    }

    /// Stops every probe and forgets every target.
    pub fn shutdown(&mut self) {
        for running in self.running.values_mut() {
            running.stop();
        }
        self.running.clear();
    }

    /// The raw-socket SYN sender for a probe of `kind`, opened on first use.
    fn syn_prober(&self, kind: &ProbeKind) -> Option<Arc<SynProber>> {
        if !matches!(kind, ProbeKind::Tcp) {
            return None;
        }
        self.syn
            .get_or_init(|| match SynProber::new() {
                Ok(syn) => {
                    let (v4, v6) = syn.ports();
                    tracing::info!(
                        "tcp probes send their SYNs from raw sockets (source ports: IPv4 {v4:?}, IPv6 {v6:?})"
                    );
                    Some(Arc::new(syn))
                }
                Err(e) => {
                    tracing::warn!("tcp probes open a socket each: {e}");
                    None
                }
            })
            .clone()
    }

    fn start(&self, target: Target, stats: Arc<Mutex<ProbeStats>>) -> Running {
        let up = Arc::new(AtomicBool::new(target.spec.initial == Health::Up));
        let task = match target.spec.kind {
            ProbeKind::None => {
                up.store(true, Ordering::Relaxed);
                None
            }
            _ => Some(tokio::spawn(probe_loop(
                self.origin,
                Prober::new(&target.spec, target.addr, self.syn_prober(&target.spec.kind)),
                target.clone(),
                self.semaphore.clone(),
                self.events.clone(),
                up.clone(),
                stats.clone(),
            ))),
        };
        Running {
            target,
            up,
            stats,
            task,
        }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Probes one target forever: a random first delay in `[0, interval)`, then one probe
/// every `interval` ±10%, each holding a semaphore permit while it runs; each start
/// rounded up to the checker's grid of [`TICK`].
async fn probe_loop(
    origin: Instant,
    prober: Prober,
    target: Target,
    semaphore: Arc<Semaphore>,
    events: UnboundedSender<HealthEvent>,
    up: Arc<AtomicBool>,
    stats: Arc<Mutex<ProbeStats>>,
) {
    let spec = &target.spec;
    let ctx = ProbeContext {
        service: target.service.clone(),
    };
    let mut tracker = Tracker::new(spec.initial, spec.rise, spec.fall);
    tokio::time::sleep_until(on_tick(origin, Instant::now() + spec.interval.mul_f64(random_unit()))).await;
    loop {
        let started = Instant::now();
        let result = {
            let Ok(_permit) = semaphore.acquire().await else {
                return;
            };
            prober.run(&ctx).await
        };
        stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(&result);
        if let Some(health) = tracker.record(result.is_ok()) {
            up.store(health == Health::Up, Ordering::Relaxed);
            let reason = match (&result, health) {
                (Err(e), _) => format!("{} consecutive probes failed, the last: {e}", spec.fall),
                (Ok(latency), _) => format!(
                    "{} consecutive probes succeeded, the last in {latency:?}",
                    spec.rise
                ),
            };
            // A closed channel only means nobody listens; keep the state current.
            let _ = events.send(HealthEvent {
                key: target.key.clone(),
                health,
                reason,
            });
        }
        let next = spec.interval.mul_f64(0.9 + 0.2 * random_unit());
        tokio::time::sleep_until(on_tick(origin, started + next.max(TICK))).await;
    }
}

/// Probes start on a grid of this step: the targets whose probes fall due within
/// one step start together, on one wake-up of the runtime, instead of each on its
/// own (5,000 targets at 1 s: 100 wake-ups a second rather than up to 1,000).
const TICK: Duration = Duration::from_millis(10);

/// The first point of the grid of step [`TICK`] from `origin` at or after `t`.
fn on_tick(origin: Instant, t: Instant) -> Instant {
    let since = t.saturating_duration_since(origin).as_nanos();
    let step = TICK.as_nanos();
    let ticks = since.div_ceil(step);
    u64::try_from(ticks * step).map_or(t, |n| (origin + Duration::from_nanos(n)).max(t))
}

/// A random number in `[0, 1)`.
fn random_unit() -> f64 {
    rand::random()
}

#[cfg(test)]
mod grid_tests {
    use super::*;

    #[test]
    fn starts_are_rounded_up_to_the_grid() {
        let origin = Instant::now();
        for ms in [0u64, 1, 9, 10, 11, 999, 1000, 1234] {
            for extra_ns in [0u64, 1, 500_000] {
                let t = origin + Duration::from_millis(ms) + Duration::from_nanos(extra_ns);
                let g = on_tick(origin, t);
                let since = g.duration_since(origin).as_nanos();
                assert!(g >= t && g - t < TICK, "{ms} ms + {extra_ns} ns -> {since} ns");
                assert_eq!(since % TICK.as_nanos(), 0, "{ms} ms + {extra_ns} ns -> {since} ns");
            }
        }
        // Before the origin (never in use): not moved earlier.
        let early = origin.checked_sub(Duration::from_millis(5)).unwrap_or(origin);
        assert!(on_tick(origin, early) >= early);
        // Many random times share few grid points.
        let points: std::collections::BTreeSet<Instant> = (0..5000)
            .map(|_| on_tick(origin, origin + Duration::from_secs(1).mul_f64(random_unit())))
            .collect();
        assert!(points.len() <= 101, "{} distinct start times", points.len());
    }
}
