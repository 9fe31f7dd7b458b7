//! Reloads off the event loop. Reading the bytes is quick; parsing and validating
//! them (and waiting for new backends' MACs) may not be, so that runs in a task of
//! its own (the parse on tokio's blocking pool) while the loop goes on answering
//! `status`, drains, probes and neighbour events. The result comes back to the loop
//! as an event and is planned and applied there, by the one task that owns the
//! dataplane.
//!
//! At most one parse runs at a time. A request for the bytes being parsed joins
//! that parse. A request for other bytes (the file changed again) supersedes it:
//! its result is dropped unapplied when it arrives, and the newest bytes are parsed
//! next. Every `lb-agent reload` caller waiting then gets the outcome of the parse
//! that is applied (or refused).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::Instant,
};

use tokio::sync::{mpsc, oneshot};

use super::{initial_down, probe_targets, report_unusable, resolve_timeout, Agent};
use crate::{
    nexthop::NextHops,
    config::{self, Config},
    control::Response,
    neigh::Mac,
    plan::Plan,
    reload,
};

/// Bytes of the configuration file to parse, and why.
#[derive(Debug)]
pub(super) struct Job {
    pub bytes: Arc<[u8]>,
    pub why: String,
}

/// What a parse hands back to the loop: the configuration and the MACs found for
/// its backends that were not known when it started, or every error.
pub(super) struct Parsed {
    generation: u64,
    why: String,
    bytes: Arc<[u8]>,
    /// How long the parse and the resolution of new backends took.
    secs: f64,
    /// The configuration, its tunnel backends' next hops, and the MACs of the
    /// neighbours that were not known.
    result: Result<(Config, NextHops, BTreeMap<IpAddr, Mac>), String>,
}

/// What to do with a finished parse.
#[derive(Debug, PartialEq)]
pub(super) enum Finished<W> {
    /// Apply its result and answer these callers.
    Apply(Vec<W>),
    /// Drop its result: newer bytes arrived meanwhile; start this parse of them.
    Superseded(u64, Job),
    /// Not the parse that runs (ignored).
    Unknown,
}

impl PartialEq for Job {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes && self.why == other.why
    }
}

/// Which parse runs, what waits for it, and what comes next. `W` is how a waiting
/// caller is answered.
#[derive(Debug)]
pub(super) struct Queue<W> {
    generation: u64,
    running: Option<(u64, Arc<[u8]>)>,
    queued: Option<Job>,
    waiters: Vec<W>,
}

impl<W> Default for Queue<W> {
    fn default() -> Self {
        Queue { generation: 0, running: None, queued: None, waiters: Vec::new() }
    }
}

impl<W> Queue<W> {
    /// A reload of `job.bytes` is wanted (by `waiter`, if someone waits for the
    /// outcome). Returns the parse to start now, if any.
    pub fn request(&mut self, job: Job, waiter: Option<W>) -> Option<(u64, Job)> {
        self.waiters.extend(waiter);
        match &self.running {
            // The running parse has the latest bytes again: nothing newer to queue.
            Some((_, bytes)) if *bytes == job.bytes => {
                self.queued = None;
                None
            }
            Some(_) => {
                self.queued = Some(job);
                None
            }
            None => Some(self.start(job)),
        }
    }

    /// No parse runs or waits.
    pub fn is_idle(&self) -> bool {
        self.running.is_none() && self.queued.is_none()
    }

    fn start(&mut self, job: Job) -> (u64, Job) {
        self.generation += 1;
        self.running = Some((self.generation, job.bytes.clone()));
        (self.generation, job)
    }

    /// The parse `generation` has finished.
    pub fn finished(&mut self, generation: u64) -> Finished<W> {
        if !matches!(self.running, Some((g, _)) if g == generation) {
            return Finished::Unknown;
        }
        self.running = None;
        match self.queued.take() {
            Some(next) => {
                let (generation, job) = self.start(next);
                Finished::Superseded(generation, job)
            }
            None => Finished::Apply(std::mem::take(&mut self.waiters)),
        }
    }
}

/// The agent's reload machinery: the queue, and the channel parses report on.
pub(super) struct Reloads {
    queue: Queue<oneshot::Sender<Response>>,
    done: mpsc::UnboundedSender<Parsed>,
}

impl Reloads {
    /// The machinery and the receiving end of its events, for the loop.
    pub fn new() -> (Reloads, mpsc::UnboundedReceiver<Parsed>) {
        let (done, events) = mpsc::unbounded_channel();
        (Reloads { queue: Queue::default(), done }, events)
    }
}

impl Agent {
    /// Asks for a reload of the file (SIGHUP, `lb-agent reload`); `reply` gets the
    /// outcome once it is known. Returns at once.
    pub(super) fn request_reload(&mut self, why: &str, reply: Option<oneshot::Sender<Response>>) {
        match std::fs::read(&self.args.config) {
            Ok(bytes) => self.reload_bytes(bytes, why, reply),
            Err(e) => {
                self.seen = Arc::from([]);
                let message = format!("invalid configuration:\n{}: cannot read the file: {e}", self.args.config.display());
                let outcome = self.reload_failed(why, &message);
                if let Some(reply) = reply {
                    let _ = reply.send(response(outcome));
                }
            }
        }
    }

    /// Asks for a reload of `bytes`, the file's content just read.
    pub(super) fn reload_bytes(&mut self, bytes: Vec<u8>, why: &str, reply: Option<oneshot::Sender<Response>>) {
        let started = Instant::now();
        // One copy, shared from here on (what was seen, the job, the text in force).
        let bytes: Arc<[u8]> = bytes.into();
        self.seen = bytes.clone();
        // The bytes in force again, nothing pending, every backend resolved: there
        // is nothing a parse could change.
        if self.reloads.queue.is_idle() && *bytes == *self.in_force && self.plan.unresolved().is_empty() {
            self.reloads_ok += 1;
            tracing::info!(why, reloads = self.reloads_ok, "reload applied: no change (the file is unchanged)");
            if let Some(reply) = reply {
                let _ = reply.send(response(Ok("reload applied: no change (the file is unchanged)".into())));
            }
            return;
        }
        if self.reloads.queue.is_idle()
            && let Some(outcome) = self.reload_incremental(&bytes, why)
        {
            if let Some(reply) = reply {
                let _ = reply.send(response(outcome));
            }
            tracing::debug!(secs = started.elapsed().as_secs_f64(), "incremental reload answered");
            release_freed_memory();
            return;
        }
        let job = Job { bytes, why: why.to_string() };
        if let Some((generation, job)) = self.reloads.queue.request(job, reply) {
            self.spawn_parse(generation, job);
        }
    }

    /// Applies `bytes` at once when only a few services changed and every backend's
    /// MAC is known: those services are parsed here (`config::reparse`), the rest is
    /// the configuration in force. `None`: the whole file is to be parsed.
    fn reload_incremental(&mut self, bytes: &Arc<[u8]>, why: &str) -> Option<Result<String, String>> {
        let (old, new) = (std::str::from_utf8(&self.in_force).ok()?, std::str::from_utf8(bytes).ok()?);
        let origin = self.args.config.display().to_string();
        let started = Instant::now();
        let cut = self.in_force_cut.as_ref().filter(|(text, _)| Arc::ptr_eq(text, &self.in_force)).map(|(_, cut)| cut);
        let (config, parsed, new_cut) = config::reparse(old, cut, &self.config, new, &origin)?;
        tracing::debug!(secs = started.elapsed().as_secs_f64(), "reparse");
        // New backends wait for their MACs in the parse task, and tunnel services
        // for their routes (every backend's, two-arm): those take the full
        // parse, as does a plan with a backend still unresolved (the parse task
        // tries it again). The services taken from the configuration in force are
        // known: only the parsed ones are looked up.
        if NextHops::needed(&config, &self.arms) || self.plan.backends.iter().any(|b| b.mac.is_none()) {
            return None;
        }
        if !parsed.iter().all(|&i| config.services[i].backends.iter().all(|b| self.macs.contains_key(&b.address))) {
            return None;
        }
        tracing::debug!(why, "only the changed services were parsed");
        let outcome = self.apply_reload(why, config, Some(&parsed), self.nexthops.clone(), BTreeMap::new(), bytes.clone());
        if Arc::ptr_eq(&self.in_force, bytes) {
            self.in_force_cut = Some((bytes.clone(), new_cut));
        }
        Some(outcome)
    }

    /// Parses `job` on the blocking pool, then resolves the new backends' MACs,
    /// and reports to the loop.
    fn spawn_parse(&self, generation: u64, job: Job) {
        let origin = self.args.config.display().to_string();
        let known: BTreeSet<IpAddr> = self.macs.keys().copied().collect();
        let (nl, arms, timeout, done) =
            (self.nl.clone(), self.arms.clone(), resolve_timeout(&self.args), self.reloads.done.clone());
        tracing::debug!(why = job.why, bytes = job.bytes.len(), "parsing the configuration");
        tokio::spawn(async move {
            let started = Instant::now();
            let Job { bytes, why } = job;
            let parse_origin = origin.clone();
            let kept = bytes.clone();
            let parsed = tokio::task::spawn_blocking(move || match std::str::from_utf8(&bytes) {
                Ok(text) => config::parse(text, &parse_origin).map_err(|e| format!("invalid configuration:\n{e}")),
                Err(e) => Err(format!("invalid configuration:\n{parse_origin}: cannot read the file: {e}")),
            })
            .await
            .unwrap_or_else(|e| Err(format!("parsing {origin} failed: {e}")));
            if started.elapsed().as_secs_f64() >= 1.0 {
                tracing::info!(why, secs = started.elapsed().as_secs_f64(), "parsing {origin} took a while (off the event loop)");
            }
            let result = match parsed {
                Ok(config) => {
                    let nexthops = NextHops::lookup(&nl, &arms, &config).await;
                    let missing: Vec<IpAddr> = nexthops
                        .neighbours(&Plan::backend_addresses(&config))
                        .into_iter()
                        .filter(|a| !known.contains(a))
                        .collect();
                    let found = if missing.is_empty() {
                        BTreeMap::new()
                    } else {
                        nexthops.resolve(&nl, &arms, &missing, timeout).await.unwrap_or_else(|e| {
                            tracing::warn!(error = %e, "resolving new backends");
                            BTreeMap::new()
                        })
                    };
                    Ok((config, nexthops, found))
                }
                Err(e) => Err(e),
            };
            // The loop is gone when the agent stops: nothing to report to.
            let secs = started.elapsed().as_secs_f64();
            let _ = done.send(Parsed { generation, why, bytes: kept, secs, result });
        });
    }

    /// A parse finished: applied (or refused) unless newer bytes superseded it.
    pub(super) fn on_parsed(&mut self, parsed: Parsed) {
        match self.reloads.queue.finished(parsed.generation) {
            Finished::Unknown => {}
            Finished::Superseded(generation, job) => {
                tracing::info!(why = job.why, "the file changed while it was parsed: parsing it again");
                self.spawn_parse(generation, job);
            }
            Finished::Apply(waiters) => {
                let outcome = match parsed.result {
                    Ok((config, nexthops, found)) => {
                        let started = Instant::now();
                        let outcome = self.apply_reload(&parsed.why, config, None, nexthops, found, parsed.bytes);
                        tracing::debug!(parse_secs = parsed.secs, apply_secs = started.elapsed().as_secs_f64(), "reload timing");
                        outcome
                    }
                    Err(e) => self.reload_failed(&parsed.why, &e),
                };
                let answer = response(outcome);
                for w in waiters {
                    let _ = w.send(answer.clone());
                }
                // The parse ran on a blocking-pool thread, whose malloc arena keeps
                // the freed text and tree: hand them back (after answering), so the
                // agent's memory stays flat across reloads.
                release_freed_memory();
            }
        }
    }

    /// Applies a parsed configuration: returns the log line's summary, or why the
    /// running configuration stays in force. `parsed`: from `config::reparse`,
    /// the services that may differ from the configuration in force (the
    /// others are its copies, not compared again).
    fn apply_reload(
        &mut self,
        why: &str,
        new: Config,
        parsed: Option<&[usize]>,
        nexthops: NextHops,
        found: BTreeMap<IpAddr, Mac>,
        bytes: Arc<[u8]>,
    ) -> Result<String, String> {
        // Other bytes, the same configuration (a comment, the order of keys), no
        // backend newly resolved and no route changed: no plan, no map writes.
        let same = match parsed {
            Some(parsed) => reload::same_among(&self.config, &new, parsed),
            None => new == self.config,
        };
        if same && found.is_empty() && nexthops == self.nexthops {
            self.in_force = bytes;
            self.reloads_ok += 1;
            tracing::info!(why, reloads = self.reloads_ok, "reload applied: no change");
            return Ok("reload applied: no change".into());
        }
        if new.conntrack_size != self.config.conntrack_size || new.established_size != self.config.established_size {
            tracing::warn!("conntrack_size and established_size changes take effect at the next start");
        }
        // A neighbour event handled during the parse is newer than the table read.
        for (addr, mac) in found {
            self.macs.entry(addr).or_insert(mac);
        }
        let t_probes = Instant::now();
        // Unchanged probes keep their state; new ones start in their initial state.
        self.checker.set_targets(probe_targets(&new));
        let down = initial_down(&new, &self.checker);
        // Run-time drains of backends that are still there stay in force.
        self.drained.retain(|(svc, addr)| {
            new.services.iter().any(|s| s.name == *svc && s.backends.iter().any(|b| b.address == *addr))
        });
        let tunnel = match self.tunnel_params(&new) {
            Ok(t) => t,
            Err(e) => {
                self.checker.set_targets(probe_targets(&self.config));
                return self.reload_failed(why, &e);
            }
        };
        let old_hops = std::mem::replace(&mut self.nexthops, nexthops);
        let t_macs = Instant::now();
        let macs = self.backend_macs(&new);
        let t_plan = Instant::now();
        let plan = Plan::next(&self.effective(&new), &macs, &down, Some(&self.plan)).set_egress(|a| self.nexthops.egress(a));
        let plan_secs = t_plan.elapsed().as_secs_f64();
        let t_fits = Instant::now();
        if let Err(e) = self.dp.check_fits(&plan) {
            self.checker.set_targets(probe_targets(&self.config));
            self.nexthops = old_hops;
            return self.reload_failed(why, &e.to_string());
        }
        if tunnel != self.tunnel {
            let (v4, v6, mtu) = tunnel.for_dataplane();
            if let Err(e) = self.dp.set_tunnel(v4, v6, mtu) {
                self.checker.set_targets(probe_targets(&self.config));
                self.nexthops = old_hops;
                return self.reload_failed(why, &format!("writing the tunnel settings: {e}"));
            }
            self.tunnel = tunnel;
        }
        let t_apply = Instant::now();
        match self.dp.apply(&plan) {
            Ok(_) => {
                let apply_secs = t_apply.elapsed().as_secs_f64();
                let t_describe = Instant::now();
                let diff = reload::describe_among(&self.config, &new, parsed);
                tracing::debug!(
                    probes = (t_macs - t_probes).as_secs_f64(),
                    macs = (t_plan - t_macs).as_secs_f64(),
                    plan_secs,
                    fits = (t_apply - t_fits).as_secs_f64(),
                    apply_secs,
                    describe = t_describe.elapsed().as_secs_f64(),
                    "reload phases"
                );
                self.reloads_ok += 1;
                tracing::info!(why, reloads = self.reloads_ok, "reload applied: {diff}");
                self.timeouts.send_replace(new.timeouts);
                self.config = new;
                self.in_force = bytes;
                self.down = down;
                self.plan = plan;
                report_unusable(&self.plan, &self.arms.client, &self.nexthops);
                Ok(format!("reload applied: {diff}"))
            }
            Err(e) => {
                self.checker.set_targets(probe_targets(&self.config));
                self.nexthops = old_hops;
                self.reload_failed(why, &e.to_string())
            }
        }
    }

    fn reload_failed(&mut self, why: &str, error: &str) -> Result<String, String> {
        self.reloads_failed += 1;
        tracing::error!(why, failed_reloads = self.reloads_failed,
            "reload failed, the running configuration stays in force: {error}");
        Err(format!("reload failed, the running configuration stays in force: {error}"))
    }
}

/// Free heap above which a reload hands memory back to the kernel.
const KEEP_FREE: usize = 32 << 20;

/// Returns the heap's free pages to the kernel (every malloc arena) once more than
/// `KEEP_FREE` bytes are free: often enough to keep the agent's memory flat, rarely
/// enough that the next reload does not fault the same pages back in each time.
pub(super) fn release_freed_memory() {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let free = unsafe { libc::mallinfo2() }.fordblks;
    if free > KEEP_FREE {
        // SAFETY: malloc_trim only releases free memory; it has no preconditions.
        unsafe { libc::malloc_trim(0) };
    }
}

fn response(outcome: Result<String, String>) -> Response {
    match outcome {
        Ok(message) => Response::Done { message },
        Err(message) => Response::Error { message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(text: &str, why: &str) -> Job {
        Job { bytes: text.as_bytes().into(), why: why.into() }
    }

    #[test]
    fn one_parse_at_a_time_and_callers_answered_when_it_is_applied() {
        let mut q = Queue::default();
        assert_eq!(q.request(job("a", "SIGHUP"), None), Some((1, job("a", "SIGHUP"))));
        // The same bytes again (the file watch, a caller): join the running parse.
        assert_eq!(q.request(job("a", "the file changed"), Some(1)), None);
        assert_eq!(q.request(job("a", "lb-agent reload"), Some(2)), None);
        assert_eq!(q.finished(1), Finished::Apply(vec![1, 2]));
        assert_eq!(q.finished(1), Finished::Unknown, "reported once");
        // Idle again: the next request starts at once.
        assert_eq!(q.request(job("b", "SIGHUP"), Some(3)), Some((2, job("b", "SIGHUP"))));
        assert_eq!(q.finished(2), Finished::Apply(vec![3]));
    }

    #[test]
    fn newer_bytes_supersede_the_running_parse() {
        let mut q = Queue::default();
        assert_eq!(q.request(job("slow", "the file changed"), Some(1)), Some((1, job("slow", "the file changed"))));
        // Two more edits while it runs: only the latest is parsed next.
        assert_eq!(q.request(job("b", "the file changed"), None), None);
        assert_eq!(q.request(job("c", "lb-agent reload"), Some(2)), None);
        assert_eq!(q.finished(1), Finished::Superseded(2, job("c", "lb-agent reload")));
        // Every caller, including the one that asked before the edits, gets the
        // outcome of the parse that counts.
        assert_eq!(q.finished(2), Finished::Apply(vec![1, 2]));
    }

    #[test]
    fn a_file_changed_back_to_the_bytes_being_parsed_queues_nothing() {
        let mut q: Queue<u8> = Queue::default();
        q.request(job("a", "x"), None);
        q.request(job("b", "x"), None);
        q.request(job("a", "x"), None);
        assert_eq!(q.finished(1), Finished::Apply(vec![]));
    }
}
