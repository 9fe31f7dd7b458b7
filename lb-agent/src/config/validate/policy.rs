//! A service's behaviour when its backends are down (`on_all_down`), client affinity
//! (`persistence`), and the duration strings both probes and persistence use.

use std::time::Duration;

use super::super::raw::{RawBackend, RawPersistence};
use super::super::{DEFAULT_PERSISTENCE_TIMEOUT, OnAllDown, Persistence};
use super::Checker;

const MIN_PERSISTENCE: Duration = Duration::from_secs(1);
const MAX_PERSISTENCE: Duration = Duration::from_secs(24 * 3600);

/// Parses `500ms`, `2s`, `1m`, `1h` (a whole number and a unit). `None` if the text is
/// not a duration; `Some(None)` if it is one too large to represent.
pub(super) fn parse_duration(text: &str) -> Option<Option<Duration>> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let millis: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    if number.is_empty() {
        return None;
    }
    Some(
        number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(millis))
            .map(Duration::from_millis),
    )
}

/// Writes a duration in the largest unit that keeps it whole (`90s`, `2m`, `1500ms`).
pub(crate) fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
        if millis >= size && millis.is_multiple_of(size) {
            return format!("{}{unit}", millis / size);
        }
    }
    format!("{millis}ms")
}

impl Checker<'_> {
    /// `on_all_down`, defaulting to `backup` if there is a backup backend, else `drop`.
    pub(super) fn on_all_down(
        &mut self,
        raw: Option<&str>,
        path: &str,
        backends: Option<&Vec<RawBackend>>,
    ) -> Option<OnAllDown> {
        let has_backup = backends
            .into_iter()
            .flatten()
            .any(|b| b.backup == Some(true));
        let Some(text) = raw else {
            return Some(if has_backup {
                OnAllDown::Backup
            } else {
                OnAllDown::Drop
            });
        };
        let Some(action) = OnAllDown::from_name(text) else {
            let names: Vec<&str> = OnAllDown::ALL.iter().map(|a| a.as_str()).collect();
            self.at_value(
                path,
                format!(
                    "unknown on_all_down action '{text}'; supported actions: {}",
                    names.join(", ")
                ),
            );
            return None;
        };
        if action == OnAllDown::Backup && !has_backup {
            self.at_value(
                path,
                "on_all_down backup needs a backend with `backup: true`".to_string(),
            );
            return None;
        }
        Some(action)
    }

    pub(super) fn persistence(
        &mut self,
        raw: Option<&RawPersistence>,
        path: &str,
    ) -> Option<Option<Persistence>> {
        let Some(raw) = raw else {
            return Some(None);
        };
        let field = |name: &str| format!("{path}.{name}");
        let timeout = match &raw.timeout {
            None => Some(DEFAULT_PERSISTENCE_TIMEOUT),
            Some(text) => self.duration(
                text,
                &field("timeout"),
                "timeout",
                MIN_PERSISTENCE,
                MAX_PERSISTENCE,
            ),
        };
        let prefix_v4 = match raw.prefix_v4 {
            None => Some(32),
            Some(v) => self.ranged(v, &field("prefix_v4"), "prefix_v4", 1, 32),
        };
        let prefix_v6 = match raw.prefix_v6 {
            None => Some(128),
            Some(v) => self.ranged(v, &field("prefix_v6"), "prefix_v6", 1, 128),
        };
        Some(Some(Persistence {
            timeout: timeout?,
            prefix_v4: prefix_v4?,
            prefix_v6: prefix_v6?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ms = |n| Some(Some(Duration::from_millis(n)));
        assert_eq!(parse_duration("500ms"), ms(500));
        assert_eq!(parse_duration("2s"), ms(2000));
        assert_eq!(parse_duration("2m"), ms(120_000));
        assert_eq!(parse_duration("1h"), ms(3_600_000));
        assert_eq!(parse_duration("0s"), ms(0));
        for bad in ["", "s", "1", "1.5s", "1 s", "-1s", "1S", "1d", "1m30s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        assert_eq!(parse_duration("99999999999999999999h"), Some(None));
        let formats: Vec<String> = [100, 1000, 1500, 60_000, 90_000, 3_600_000, 0]
            .map(|n| format_duration(Duration::from_millis(n)))
            .into();
        assert_eq!(formats, ["100ms", "1s", "1500ms", "1m", "90s", "1h", "0ms"]);
    }
}
