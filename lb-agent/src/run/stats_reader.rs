//! The once-a-second status refresh reads the counters on a thread of its own:
//! at 1,000 services x 32 backends the per-CPU reads take milliseconds, and on
//! the event loop a reload or a control call arriving meanwhile waited for them
//! (the one-service reload's time varied by that much). The loop asks
//! (`request`), the thread reads and sends the counters back, and the loop
//! builds the status from them (`Agent::refresh_with`). Calls that show the
//! status (`lb-agent status`) still read at once, on the loop: their caller
//! waits for fresh figures anyway.

use std::sync::mpsc;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::dataplane::{Stats, StatsMaps};

/// The loop's end: asks for a read unless one is under way.
pub(super) struct StatsReader {
    ask: mpsc::Sender<(u32, u32)>,
    pending: bool,
}

impl StatsReader {
    /// Starts the thread; the receiver gets each read's counters (`None`: the
    /// read failed, logged there).
    pub fn start(maps: StatsMaps, bases: crate::conntrack::Bases) -> (StatsReader, UnboundedReceiver<Option<Stats>>) {
        let (ask, asked) = mpsc::channel::<(u32, u32)>();
        let (send, read) = unbounded_channel();
        std::thread::Builder::new()
            .name("lb-stats".into())
            .spawn(move || {
                // Ends when the agent drops its `StatsReader` or stops receiving.
                while let Ok((services, backends)) = asked.recv() {
                    let result = {
                        let bases = bases.read().unwrap_or_else(|e| e.into_inner());
                        maps.read(services, backends, &bases)
                    };
                    let stats = result.inspect_err(|e| tracing::warn!(error = %e, "reading the counters")).ok();
                    if send.send(stats).is_err() {
                        return;
                    }
                }
            })
            .expect("spawning the counter reader thread");
        (StatsReader { ask, pending: false }, read)
    }

    /// Asks for the counters of ids below (`services`, `backends`); nothing if a
    /// read is still under way (its answer is as good).
    pub fn request(&mut self, services: u32, backends: u32) {
        if !self.pending {
            self.pending = self.ask.send((services, backends)).is_ok();
        }
    }

    /// A read's answer arrived.
    pub fn answered(&mut self) {
        self.pending = false;
    }
}
