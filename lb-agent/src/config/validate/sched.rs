//! Scheduler-specific service fields: `prefix_v4`/`prefix_v6` of `sh`.

use super::super::raw::Int;
use super::super::Scheduler;
use super::Checker;

impl Checker<'_> {
    /// Fills `sh`'s prefix lengths (default 32 and 128: the whole address) and
    /// rejects them under other schedulers, and `sh` with `persistence` (both keep
    /// a client's flows together; one must say how).
    pub(super) fn scheduler_fields(
        &mut self,
        scheduler: Option<Scheduler>,
        (prefix_v4, prefix_v6, persistence): (Option<Int>, Option<Int>, bool),
        path: &str,
    ) -> Option<Scheduler> {
        let field = |name: &str| format!("{path}.{name}");
        let is_sh = matches!(scheduler, Some(Scheduler::Sh { .. }));
        if !is_sh {
            for (name, given) in [("prefix_v4", prefix_v4.is_some()), ("prefix_v6", prefix_v6.is_some())] {
                if given && scheduler.is_some() {
                    self.at_key(&field(name), format!("{name} applies to scheduler sh only"));
                }
            }
            return scheduler;
        }
        if persistence {
            self.at_value(
                &field("scheduler"),
                "scheduler sh with persistence: both keep a client's flows on one backend; use \
                 persistence's prefixes or sh's, not both"
                    .to_string(),
            );
            return None;
        }
        let prefix_v4 = match prefix_v4 {
            None => Some(32),
            Some(v) => self.ranged(v, &field("prefix_v4"), "prefix_v4", 1, 32),
        };
        let prefix_v6 = match prefix_v6 {
            None => Some(128),
            Some(v) => self.ranged(v, &field("prefix_v6"), "prefix_v6", 1, 128),
        };
        Some(Scheduler::Sh { prefix_v4: prefix_v4?, prefix_v6: prefix_v6? })
    }
}
