//! The `probe:` blocks: each field is parsed where it is written (service or backend),
//! a backend's fields are merged over the service's, and the merged probe is checked.
//!
//! The service's probe is checked on its own, with every problem reported at the
//! service. A backend's merged probe is checked again, but only problems that involve
//! a field written in the backend's block are reported (at the backend), so nothing is
//! reported twice. A backend that sets `kind` does not inherit the service's fields that
//! do not apply to that kind (with `kind: none`, nothing is inherited).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::Checker;
use super::policy::format_duration;
use crate::health::{
    DEFAULT_EXPECT_STATUS, ExecProbe, Health, HttpProbe, ProbeKind, ProbeSpec, UdpProbe,
};

const MIN_INTERVAL: Duration = Duration::from_millis(100);
const MAX_INTERVAL: Duration = Duration::from_secs(3600);
const MIN_TIMEOUT: Duration = Duration::from_millis(1);
const MAX_RISE_FALL: u32 = 100;

mod fields;

/// A probe kind, as named in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    None,
    Tcp,
    Http,
    Https,
    Udp,
    Exec,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::None,
        Kind::Tcp,
        Kind::Http,
        Kind::Https,
        Kind::Udp,
        Kind::Exec,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::None => "none",
            Kind::Tcp => "tcp",
            Kind::Http => "http",
            Kind::Https => "https",
            Kind::Udp => "udp",
            Kind::Exec => "exec",
        }
    }

    fn needs_port(self) -> bool {
        matches!(self, Kind::Tcp | Kind::Http | Kind::Https | Kind::Udp)
    }
}

/// The kinds each field other than `kind` applies to.
fn kinds_of(field: &str) -> &'static [Kind] {
    match field {
        "path" | "host" | "expect_status" | "body_contains" => &[Kind::Http, Kind::Https],
        "sni" | "verify_tls" | "ca_file" => &[Kind::Https],
        "payload" | "expect" => &[Kind::Udp],
        "command" => &[Kind::Exec],
        _ => &[Kind::Tcp, Kind::Http, Kind::Https, Kind::Udp, Kind::Exec],
    }
}

/// One field of a probe block: absent, invalid (already reported) or set somewhere.
#[derive(Debug, Clone)]
enum Field<T> {
    Absent,
    Bad,
    Set {
        value: T,
        path: String,
        backend: bool,
    },
}

impl<T: Clone> Field<T> {
    /// This field if the backend's block has it, else `base` (the service's).
    fn over(&self, base: &Field<T>) -> Field<T> {
        match self {
            Field::Absent => base.clone(),
            _ => self.clone(),
        }
    }

    /// The value; `Err` if the field is invalid.
    fn get(&self) -> Result<Option<&T>, ()> {
        match self {
            Field::Absent => Ok(None),
            Field::Bad => Err(()),
            Field::Set { value, .. } => Ok(Some(value)),
        }
    }

    /// Where the field is written and whether that is in a backend's block.
    fn origin(&self) -> Option<(&str, bool)> {
        match self {
            Field::Set { path, backend, .. } => Some((path, *backend)),
            _ => None,
        }
    }
}

/// Every field of a probe block.
#[derive(Debug, Clone)]
pub(super) struct ProbeFields {
    kind: Field<Kind>,
    interval: Field<Duration>,
    timeout: Field<Duration>,
    rise: Field<u32>,
    fall: Field<u32>,
    initial: Field<Health>,
    port: Field<u16>,
    address: Field<IpAddr>,
    path: Field<String>,
    host: Field<String>,
    sni: Field<String>,
    expect_status: Field<(u16, u16)>,
    body_contains: Field<String>,
    verify_tls: Field<bool>,
    ca_file: Field<PathBuf>,
    payload: Field<Vec<u8>>,
    expect: Field<Vec<u8>>,
    command: Field<Vec<String>>,
}

macro_rules! each_field {
    ($fields:expr, $f:ident => $body:expr) => {{
        let fields = $fields;
        [
            ("interval", {
                let $f = &fields.interval;
                $body
            }),
            ("timeout", {
                let $f = &fields.timeout;
                $body
            }),
            ("rise", {
                let $f = &fields.rise;
                $body
            }),
            ("fall", {
                let $f = &fields.fall;
                $body
            }),
            ("initial", {
                let $f = &fields.initial;
                $body
            }),
            ("port", {
                let $f = &fields.port;
                $body
            }),
            ("address", {
                let $f = &fields.address;
                $body
            }),
            ("path", {
                let $f = &fields.path;
                $body
            }),
            ("host", {
                let $f = &fields.host;
                $body
            }),
            ("sni", {
                let $f = &fields.sni;
                $body
            }),
            ("expect_status", {
                let $f = &fields.expect_status;
                $body
            }),
            ("body_contains", {
                let $f = &fields.body_contains;
                $body
            }),
            ("verify_tls", {
                let $f = &fields.verify_tls;
                $body
            }),
            ("ca_file", {
                let $f = &fields.ca_file;
                $body
            }),
            ("payload", {
                let $f = &fields.payload;
                $body
            }),
            ("expect", {
                let $f = &fields.expect;
                $body
            }),
            ("command", {
                let $f = &fields.command;
                $body
            }),
        ]
    }};
}

impl ProbeFields {
    /// The backend's block `self` merged over the service's block `base`.
    pub(super) fn over(&self, base: &ProbeFields) -> ProbeFields {
        let mut merged = ProbeFields {
            kind: self.kind.over(&base.kind),
            interval: self.interval.over(&base.interval),
            timeout: self.timeout.over(&base.timeout),
            rise: self.rise.over(&base.rise),
            fall: self.fall.over(&base.fall),
            initial: self.initial.over(&base.initial),
            port: self.port.over(&base.port),
            address: self.address.over(&base.address),
            path: self.path.over(&base.path),
            host: self.host.over(&base.host),
            sni: self.sni.over(&base.sni),
            expect_status: self.expect_status.over(&base.expect_status),
            body_contains: self.body_contains.over(&base.body_contains),
            verify_tls: self.verify_tls.over(&base.verify_tls),
            ca_file: self.ca_file.over(&base.ca_file),
            payload: self.payload.over(&base.payload),
            expect: self.expect.over(&base.expect),
            command: self.command.over(&base.command),
        };
        // A backend that chooses its kind drops what the service set for another kind.
        if let Field::Set {
            value: kind,
            backend: true,
            ..
        } = merged.kind
        {
            let inherited: Vec<&'static str> = each_field!(&merged, f => f.origin())
                .into_iter()
                .filter(|(name, origin)| {
                    matches!(origin, Some((_, false))) && !kinds_of(name).contains(&kind)
                })
                .map(|(name, _)| name)
                .collect();
            for name in inherited {
                merged.clear(name);
            }
        }
        merged
    }

    fn clear(&mut self, name: &str) {
        match name {
            "interval" => self.interval = Field::Absent,
            "timeout" => self.timeout = Field::Absent,
            "rise" => self.rise = Field::Absent,
            "fall" => self.fall = Field::Absent,
            "initial" => self.initial = Field::Absent,
            "port" => self.port = Field::Absent,
            "address" => self.address = Field::Absent,
            "path" => self.path = Field::Absent,
            "host" => self.host = Field::Absent,
            "sni" => self.sni = Field::Absent,
            "expect_status" => self.expect_status = Field::Absent,
            "body_contains" => self.body_contains = Field::Absent,
            "verify_tls" => self.verify_tls = Field::Absent,
            "ca_file" => self.ca_file = Field::Absent,
            "payload" => self.payload = Field::Absent,
            "expect" => self.expect = Field::Absent,
            _ => self.command = Field::Absent,
        }
    }
}

/// Whose probe is being checked: the service's (report everything) or a backend's
/// merged probe (report only what involves the backend's own fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Level {
    Service,
    Backend,
}

impl Level {
    /// Where to report a problem involving `fields` (in order of preference), if at all.
    fn site<'f>(self, fields: &[Option<(&'f str, bool)>]) -> Option<&'f str> {
        fields
            .iter()
            .flatten()
            .find(|(_, backend)| self == Level::Service || *backend)
            .map(|(path, _)| *path)
    }
}

impl Checker<'_> {
    pub(super) fn probe_spec(
        &mut self,
        fields: &ProbeFields,
        service_port: Option<u16>,
        level: Level,
    ) -> Option<ProbeSpec> {
        let mut ok = true;
        let kind = fields
            .kind
            .get()
            .ok()
            .map(|k| k.copied().unwrap_or(Kind::None));
        let kind_site = fields.kind.origin();

        if let Some(kind) = kind {
            for (name, origin) in each_field!(fields, f => f.origin()) {
                if origin.is_some() && !kinds_of(name).contains(&kind) {
                    ok = false;
                    let only: Vec<&str> = kinds_of(name).iter().map(|k| k.name()).collect();
                    if let Some(site) = level.site(&[origin]) {
                        let message = format!(
                            "`{name}` does not apply to probe kind {} (only to {})",
                            kind.name(),
                            only.join(", ")
                        );
                        self.at_value(site, message);
                    }
                }
            }
            let missing = match kind {
                Kind::Udp if matches!(fields.payload, Field::Absent) => Some("payload"),
                Kind::Exec if matches!(fields.command, Field::Absent) => Some("command"),
                _ => None,
            };
            if let Some(missing) = missing {
                ok = false;
                if let Some(site) = level.site(&[kind_site]) {
                    let message = format!("probe kind {} needs `{missing}`", kind.name());
                    self.at_value(site, message);
                }
            }
            if kind.needs_port() && service_port == Some(0) && matches!(fields.port, Field::Absent)
            {
                ok = false;
                if let Some(site) = level.site(&[kind_site]) {
                    let message = format!(
                        "probe kind {} needs `port`: the service's port is 0 (any port)",
                        kind.name()
                    );
                    self.at_value(site, message);
                }
            }
        }

        let interval = fields.interval.get().ok()?.copied();
        let timeout = fields.timeout.get().ok()?.copied();
        let spec_default = ProbeSpec::default();
        let (interval_value, timeout_value) = (
            interval.unwrap_or(spec_default.interval),
            timeout.unwrap_or(spec_default.timeout),
        );
        if timeout_value > interval_value && kind != Some(Kind::None) {
            ok = false;
            let timeout_site = fields.timeout.origin();
            let interval_site = fields.interval.origin();
            if let Some(site) = level.site(&[timeout_site, interval_site]) {
                let (t, i) = (
                    format_duration(timeout_value),
                    format_duration(interval_value),
                );
                let default = |set: Option<_>| if set.is_some() { "" } else { " (the default)" };
                let message = if timeout_site.is_some_and(|(p, _)| p == site) {
                    format!(
                        "timeout {t} is longer than the interval {i}{}",
                        default(interval)
                    )
                } else {
                    format!(
                        "interval {i} is shorter than the timeout {t}{}",
                        default(timeout)
                    )
                };
                self.at_value(site, message);
            }
        }

        let kind = kind?;
        let value = |f: &Field<String>| f.get().ok().flatten().cloned();
        let http = || -> Option<HttpProbe> {
            Some(HttpProbe {
                path: value(&fields.path).unwrap_or_else(|| "/".to_string()),
                host: fields.host.get().ok()?.cloned(),
                sni: fields.sni.get().ok()?.cloned(),
                expect_status: fields
                    .expect_status
                    .get()
                    .ok()?
                    .copied()
                    .unwrap_or(DEFAULT_EXPECT_STATUS),
                body_contains: fields.body_contains.get().ok()?.cloned(),
                verify_tls: fields.verify_tls.get().ok()?.copied().unwrap_or(true),
                ca_file: fields.ca_file.get().ok()?.cloned(),
            })
        };
        let probe_kind = match kind {
            Kind::None => ProbeKind::None,
            Kind::Tcp => ProbeKind::Tcp,
            Kind::Http => ProbeKind::Http(http()?),
            Kind::Https => ProbeKind::Https(http()?),
            Kind::Udp => ProbeKind::Udp(UdpProbe {
                payload: fields.payload.get().ok()??.clone(),
                expect: fields.expect.get().ok()?.cloned(),
            }),
            Kind::Exec => ProbeKind::Exec(ExecProbe {
                command: fields.command.get().ok()??.clone(),
            }),
        };
        let spec = ProbeSpec {
            kind: probe_kind,
            interval: interval_value,
            timeout: timeout_value,
            rise: fields
                .rise
                .get()
                .ok()?
                .copied()
                .unwrap_or(spec_default.rise),
            fall: fields
                .fall
                .get()
                .ok()?
                .copied()
                .unwrap_or(spec_default.fall),
            initial: fields
                .initial
                .get()
                .ok()?
                .copied()
                .unwrap_or(spec_default.initial),
            port: fields.port.get().ok()?.copied(),
            address: fields.address.get().ok()?.copied(),
        };
        ok.then_some(spec)
    }
}
