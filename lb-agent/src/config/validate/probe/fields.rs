//! Parsing each field of a probe block where it is written, reporting invalid values.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::super::super::raw::{Int, RawProbe};
use super::super::Checker;
use super::super::policy::{format_duration, parse_duration};
use super::{Field, Kind, MAX_INTERVAL, MAX_RISE_FALL, MIN_INTERVAL, MIN_TIMEOUT, ProbeFields};
use crate::health::Health;

impl Checker<'_> {
    /// Parses one probe block at `path`, reporting each invalid field.
    pub(in crate::config::validate) fn probe_fields(
        &mut self,
        raw: Option<&RawProbe>,
        path: &str,
        backend: bool,
    ) -> ProbeFields {
        let raw = raw.cloned().unwrap_or_default();
        let mut ctx = FieldCtx {
            checker: self,
            path,
            backend,
        };
        let address = if backend {
            ctx.field(raw.address, "address", |c, text, p| {
                c.address(&text, p, "address", "a probe address")
            })
        } else {
            ctx.field(raw.address, "address", |c, _, p| {
                c.at_value(
                    p,
                    "a probe `address` is only allowed in a backend's probe".to_string(),
                );
                None
            })
        };
        ProbeFields {
            kind: ctx.field(raw.kind, "kind", |c, text, p| c.kind(&text, p)),
            interval: ctx.field(raw.interval, "interval", |c, text, p| {
                c.duration(&text, p, "interval", MIN_INTERVAL, MAX_INTERVAL)
            }),
            timeout: ctx.field(raw.timeout, "timeout", |c, text, p| {
                c.duration(&text, p, "timeout", MIN_TIMEOUT, MAX_INTERVAL)
            }),
            rise: ctx.field(raw.rise, "rise", |c, v: Int, p| {
                c.ranged(v, p, "rise", 1, MAX_RISE_FALL)
            }),
            fall: ctx.field(raw.fall, "fall", |c, v: Int, p| {
                c.ranged(v, p, "fall", 1, MAX_RISE_FALL)
            }),
            initial: ctx.field(raw.initial, "initial", |c, text, p| {
                let health = Health::from_name(&text);
                if health.is_none() {
                    c.at_value(
                        p,
                        format!("unknown initial state '{text}'; supported states: up, down"),
                    );
                }
                health
            }),
            port: ctx.field(raw.port, "port", |c, v: Int, p| {
                c.ranged(v, p, "port", 1, u16::MAX)
            }),
            address,
            path: ctx.field(raw.path, "path", |c, text, p| {
                if !text.starts_with('/') {
                    c.at_value(p, format!("path '{text}' must start with '/'"));
                    return None;
                }
                c.printable(text, p, "path")
            }),
            host: ctx.field(raw.host, "host", |c, text, p| c.printable(text, p, "host")),
            sni: ctx.field(raw.sni, "sni", |c, text, p| c.sni(text, p)),
            expect_status: ctx.field(raw.expect_status, "expect_status", |c, text, p| {
                c.status_range(&text, p)
            }),
            body_contains: ctx.field(raw.body_contains, "body_contains", |c, text, p| {
                if text.is_empty() {
                    c.at_value(p, "body_contains must not be empty".to_string());
                    return None;
                }
                Some(text)
            }),
            verify_tls: ctx.field(raw.verify_tls, "verify_tls", |_, v, _| Some(v)),
            ca_file: ctx.field(raw.ca_file, "ca_file", |c, text: String, p| {
                if text.is_empty() {
                    c.at_value(p, "ca_file must not be empty".to_string());
                    return None;
                }
                Some(PathBuf::from(text))
            }),
            payload: ctx.field(raw.payload, "payload", |_, text: String, _| {
                Some(text.into_bytes())
            }),
            expect: ctx.field(raw.expect, "expect", |_, text: String, _| {
                Some(text.into_bytes())
            }),
            command: ctx.field(raw.command, "command", |c, argv: Vec<String>, p| {
                match argv.first() {
                    None => c.at_value(p, "command must not be empty".to_string()),
                    Some(program) if program.is_empty() => c.at_value(
                        &format!("{p}[0]"),
                        "the program (the first item of command) must not be empty".to_string(),
                    ),
                    Some(_) => return Some(argv),
                }
                None
            }),
        }
    }

    /// Checks the rules between fields and builds the probe. `service_port` is `None`
    /// if the service's port is invalid. Returns `None` if anything is wrong (reported
    /// here, or at the service if `level` is `Backend` and only the service's fields are
    /// involved).
    fn kind(&mut self, text: &str, path: &str) -> Option<Kind> {
        let kind = Kind::ALL.into_iter().find(|k| k.name() == text);
        if kind.is_none() {
            let names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
            self.at_value(
                path,
                format!(
                    "unknown probe kind '{text}'; supported kinds: {}",
                    names.join(", ")
                ),
            );
        }
        kind
    }

    /// A duration in `min..=max`.
    pub(in crate::config::validate) fn duration(
        &mut self,
        text: &str,
        path: &str,
        field: &str,
        min: Duration,
        max: Duration,
    ) -> Option<Duration> {
        let Some(duration) = parse_duration(text) else {
            self.at_value(
                path,
                format!("{field} '{text}' is not a duration such as 500ms, 2s, 1m or 1h"),
            );
            return None;
        };
        if duration.is_some_and(|d| d >= min && d <= max) {
            return duration;
        }
        let range = format!("{}..={}", format_duration(min), format_duration(max));
        self.at_value(path, format!("{field} {text} is out of range {range}"));
        None
    }

    /// A non-empty string without spaces or control characters.
    fn printable(&mut self, text: String, path: &str, field: &str) -> Option<String> {
        let message = if text.is_empty() {
            format!("{field} must not be empty")
        } else if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            format!("{field} '{text}' must not contain spaces or control characters")
        } else {
            return Some(text);
        };
        self.at_value(path, message);
        None
    }

    fn sni(&mut self, text: String, path: &str) -> Option<String> {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        let message = if text.trim_matches(['[', ']']).parse::<IpAddr>().is_ok() {
            format!("sni '{text}' is an address; the server name must be a DNS name")
        } else if text.len() > 253 || !text.split('.').all(label_ok) {
            format!("sni '{text}' is not a valid DNS name")
        } else {
            return Some(text);
        };
        self.at_value(path, message);
        None
    }

    /// `N` or `A-B`, statuses in `100..=599`, `A <= B`.
    fn status_range(&mut self, text: &str, path: &str) -> Option<(u16, u16)> {
        let parse = |s: &str| -> Option<u16> {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u16>().unwrap_or(u16::MAX))
        };
        let (low, high) = match text.split_once('-') {
            Some((a, b)) => (parse(a.trim()), parse(b.trim())),
            None => (parse(text.trim()), parse(text.trim())),
        };
        let message = match (low, high) {
            (Some(low), Some(high))
                if (100..=599).contains(&low) && (100..=599).contains(&high) =>
            {
                if low <= high {
                    return Some((low, high));
                }
                format!("expect_status {text} is an empty range (the first status is larger)")
            }
            (Some(_), Some(_)) => format!("expect_status {text} is out of range 100..=599"),
            _ => format!(
                "expect_status '{text}' is not a status such as 200 or a range such as 200-399"
            ),
        };
        self.at_value(path, message);
        None
    }
}

/// Parses each field of one block with its path and level.
struct FieldCtx<'c, 'a> {
    checker: &'c mut Checker<'a>,
    path: &'c str,
    backend: bool,
}

impl<'a> FieldCtx<'_, 'a> {
    fn field<R, T>(
        &mut self,
        raw: Option<R>,
        name: &str,
        parse: impl FnOnce(&mut Checker<'a>, R, &str) -> Option<T>,
    ) -> Field<T> {
        let Some(raw) = raw else {
            return Field::Absent;
        };
        let path = format!("{}.{name}", self.path);
        match parse(self.checker, raw, &path) {
            Some(value) => Field::Set {
                value,
                path,
                backend: self.backend,
            },
            None => Field::Bad,
        }
    }
}
