//! The rise/fall state machine: a target goes down after `fall` consecutive failed
//! probes and up after `rise` consecutive successful ones (as keepalived and HAProxy).

use super::Health;

/// Turns a stream of probe results into a state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    state: Health,
    /// Consecutive results that contradict `state` so far.
    streak: u32,
}

impl Tracker {
    /// A tracker in state `initial`. `rise` and `fall` below 1 are treated as 1.
    pub fn new(initial: Health, rise: u32, fall: u32) -> Tracker {
        Tracker {
            rise: rise.max(1),
            fall: fall.max(1),
            state: initial,
            streak: 0,
        }
    }

    /// The current state.
    pub fn state(&self) -> Health {
        self.state
    }

    /// Consecutive results against the current state seen so far (successes while
    /// down, failures while up).
    pub fn streak(&self) -> u32 {
        self.streak
    }

    /// Records one probe result; returns the new state if it changed.
    pub fn record(&mut self, success: bool) -> Option<Health> {
        let (against, needed, next) = match self.state {
            Health::Up => (!success, self.fall, Health::Down),
            Health::Down => (success, self.rise, Health::Up),
        };
        if !against {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        if self.streak < needed {
            return None;
        }
        self.state = next;
        self.streak = 0;
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(tracker: &mut Tracker, results: &str) -> Vec<Option<Health>> {
        results.chars().map(|c| tracker.record(c == '+')).collect()
    }

    #[test]
    fn goes_down_after_fall_consecutive_failures() {
        let mut t = Tracker::new(Health::Up, 2, 3);
        assert_eq!(
            feed(&mut t, "--+--"),
            [None, None, None, None, None],
            "a success resets the failure count"
        );
        assert_eq!(t.state(), Health::Up);
        assert_eq!(t.streak(), 2);
        assert_eq!(t.record(false), Some(Health::Down));
        assert_eq!((t.state(), t.streak()), (Health::Down, 0));
        assert_eq!(t.record(false), None, "no event while staying down");
    }

    #[test]
    fn goes_up_after_rise_consecutive_successes() {
        let mut t = Tracker::new(Health::Down, 2, 3);
        assert_eq!(feed(&mut t, "+-+"), [None, None, None]);
        assert_eq!(t.record(true), Some(Health::Up));
        assert_eq!(t.state(), Health::Up);
        assert_eq!(feed(&mut t, "+++"), [None, None, None]);
    }

    #[test]
    fn rise_and_fall_of_one_flip_at_once() {
        let mut t = Tracker::new(Health::Up, 1, 1);
        assert_eq!(
            feed(&mut t, "-+-+"),
            [
                Some(Health::Down),
                Some(Health::Up),
                Some(Health::Down),
                Some(Health::Up)
            ]
        );
        let mut zero = Tracker::new(Health::Down, 0, 0);
        assert_eq!(zero.record(true), Some(Health::Up));
    }

    #[test]
    fn full_cycle() {
        let mut t = Tracker::new(Health::Up, 2, 2);
        let changes: Vec<Health> = feed(&mut t, "+--+-++-+--").into_iter().flatten().collect();
        // "--" down at 3, "+-" no, "++" up at 7, "-+" no, "--" down at 11.
        assert_eq!(changes, [Health::Down, Health::Up, Health::Down]);
    }
}
