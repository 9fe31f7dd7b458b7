//! The agent's end of `lb-agent trace`: one session at a time; while it runs the
//! filter is set and `lb_xdp_trace` is in the XDP link, and when it ends `lb_xdp`
//! (no trace code) goes back and the filter is cleared; the program's records are
//! named and streamed to the client, and the budget's refusals reported.

use std::{
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use tokio::{io::unix::AsyncFd, sync::mpsc, task::JoinHandle};

use super::Agent;
use crate::{
    control::Response,
    dataplane::Dataplane,
    trace::{self, RawRecord, Sink, TraceRequest},
};

/// Records the logger task may queue for the event loop.
const RECORDS: usize = 4096;

/// The running trace.
pub(super) struct Session {
    request: TraceRequest,
    out: mpsc::Sender<Response>,
    sent: u64,
    /// Budget refusals already reported.
    dropped: u64,
    /// Lines the client's queue could not take.
    lost: u64,
}

/// Starts reading the program's aya-log records; they arrive on the receiver.
pub(super) fn start_reader(
    dp: &mut Dataplane,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(mpsc::Receiver<RawRecord>, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(RECORDS);
    let sink = Sink { to_agent: Arc::new(Mutex::new(Some(tx))) };
    let logger = dp.trace_logger(sink).context("reading the program's trace records (AYA_LOGS)")?;
    // SAFETY: the logger owns the ring buffer's descriptor and moves into the
    // AsyncFd, which deregisters it before dropping the logger (closing the fd).
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling AYA_LOGS: {e}"))?;
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                ready = fd.readable_mut() => match ready {
                    Ok(mut guard) => {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                    Err(e) => return tracing::error!(error = %e, "trace records: polling AYA_LOGS"),
                },
                _ = shutdown.changed() => return,
            }
        }
    });
    Ok((rx, task))
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl Agent {
    /// A `trace` request: sets the filter and answers `Done`, or says why not.
    pub(super) fn trace_start(&mut self, request: TraceRequest, out: Option<mpsc::Sender<Response>>) -> Response {
        let Some(out) = out else { return Response::Error { message: "trace needs a streaming connection".into() } };
        if let Some(s) = &self.trace {
            if !s.out.is_closed() {
                return Response::Error {
                    message: format!(
                        "a trace is already running ({}); one trace at a time: stop it first (Ctrl-C where it runs)",
                        s.request.describe()
                    ),
                };
            }
            self.trace_stop("its client went away");
        }
        let filter = match trace::filter(&request) {
            Ok(f) => f,
            Err(message) => return Response::Error { message },
        };
        // The filter first, then the program that reads it.
        let set = self.dp.trace_dropped(true).and_then(|_| self.dp.set_trace_filter(filter));
        if let Err(e) = set.and_then(|_| self.dp.set_tracing(true)) {
            let _ = self.dp.set_trace_filter(Default::default());
            return Response::Error { message: format!("starting the trace: {e}") };
        }
        let what = request.describe();
        tracing::info!(filter = %what, "trace started");
        let message = format!(
            "tracing {what} (at most {} records/s per CPU{}); Ctrl-C to stop",
            filter.budget_per_sec,
            request.count.map(|n| format!(", {n} packets")).unwrap_or_default()
        );
        self.trace = Some(Session { request, out, sent: 0, dropped: 0, lost: 0 });
        Response::Done { message }
    }

    /// Ends the running trace: the filter is cleared (zero cost again).
    pub(super) fn trace_stop(&mut self, why: &str) {
        let Some(s) = self.trace.take() else { return };
        // The program without the hook first: from then on tracing costs nothing.
        if let Err(e) = self.dp.set_tracing(false) {
            tracing::error!(error = %e, "putting the balancer without the trace hook back: the traced one stays attached");
        }
        if let Err(e) = self.dp.set_trace_filter(Default::default()) {
            tracing::error!(error = %e, "clearing the trace filter");
        }
        tracing::info!(filter = %s.request.describe(), packets = s.sent, "trace stopped: {why}");
    }

    /// `TraceStop` from a connection whose client left: ends the trace if it is
    /// that connection's (its queue is closed).
    pub(super) fn trace_client_left(&mut self) {
        if self.trace.as_ref().is_some_and(|s| s.out.is_closed()) {
            self.trace_stop("its client went away");
        }
    }

    /// A record from the program: named and sent to the client.
    pub(super) fn on_trace_record(&mut self, raw: RawRecord) {
        let Some(s) = self.trace.as_mut() else { return };
        let drained = |svc: &str, addr| self.drained.contains(&(svc.to_string(), addr));
        let line = trace::describe(&raw, &self.plan, &drained, now());
        match s.out.try_send(Response::TraceLine(line)) {
            Ok(()) => s.sent += 1,
            Err(mpsc::error::TrySendError::Full(_)) => s.lost += 1,
            Err(mpsc::error::TrySendError::Closed(_)) => return self.trace_stop("its client went away"),
        }
        if s.request.count.is_some_and(|n| s.sent >= n) {
            let note = format!("{} packets traced", s.sent);
            let _ = s.out.try_send(Response::TraceNote { message: note });
            self.trace_stop("--count reached");
        }
    }

    /// Every second: notices a client that left, and reports records the budget
    /// refused (or the client's queue could not take) since the last report.
    pub(super) fn trace_tick(&mut self) {
        if self.trace.as_ref().is_some_and(|s| s.out.is_closed()) {
            return self.trace_stop("its client went away");
        }
        let Ok(dropped) = self.dp.trace_dropped(false) else { return };
        let Some(s) = self.trace.as_mut() else { return };
        if dropped > s.dropped || s.lost > 0 {
            let message = format!(
                "trace: {} records over the per-second budget not written, {} lines not delivered (client too slow)",
                dropped - s.dropped,
                s.lost
            );
            s.dropped = dropped;
            s.lost = 0;
            let _ = s.out.try_send(Response::TraceNote { message });
        }
    }
}
