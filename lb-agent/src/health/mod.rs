//! Liveness probes for backends.
//!
//! - [`ProbeSpec`] describes one probe (what the configuration's `probe:` blocks turn
//!   into, after the backend's fields have been merged over the service's);
//! - [`probe_once`] runs one attempt against an address (`probe.rs`, `http.rs`);
//! - [`Tracker`] is the rise/fall state machine (`tracker.rs`);
//! - [`Checker`] runs the probes of many targets, one task each, and reports every
//!   change of state on a channel (`checker.rs`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

mod checker;
mod http;
mod probe;
mod syn;
mod tracker;

#[cfg(test)]
mod tests;

pub use checker::{Checker, HealthEvent, ProbeStats, Target, TargetKey};
pub use probe::{ProbeContext, probe_once};
pub use tracker::Tracker;

/// Default time between two probes of one target.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// Default time one probe may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default number of consecutive successes that bring a target up.
pub const DEFAULT_RISE: u32 = 2;
/// Default number of consecutive failures that bring a target down.
pub const DEFAULT_FALL: u32 = 3;
/// Default accepted HTTP status range (as Kubernetes' `httpGet`).
pub const DEFAULT_EXPECT_STATUS: (u16, u16) = (200, 399);
/// Default number of probes running at once in a [`Checker`].
pub const DEFAULT_MAX_CONCURRENT: usize = 256;

/// One liveness probe, as configured (defaults filled in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    pub kind: ProbeKind,
    /// Time between the starts of two probes (±10% jitter).
    pub interval: Duration,
    /// Time one probe may take; at most `interval`.
    pub timeout: Duration,
    /// Consecutive successes that bring a down target up.
    pub rise: u32,
    /// Consecutive failures that bring an up target down.
    pub fall: u32,
    /// State before the first probe has decided anything.
    pub initial: Health,
    /// Port to probe; `None` means the service's port.
    pub port: Option<u16>,
    /// Address to probe; `None` means the backend's address.
    pub address: Option<IpAddr>,
}

impl Default for ProbeSpec {
    fn default() -> Self {
        ProbeSpec {
            kind: ProbeKind::None,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            initial: Health::Up,
            port: None,
            address: None,
        }
    }
}

impl ProbeSpec {
    /// The address to probe for a backend at `backend` of a service on `service_port`:
    /// `address` and `port` if set, else the backend's address and the service's port.
    pub fn target(&self, backend: IpAddr, service_port: u16) -> SocketAddr {
        SocketAddr::new(
            self.address.unwrap_or(backend),
            self.port.unwrap_or(service_port),
        )
    }
}

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    /// No probing: the backend is always up.
    None,
    /// A TCP connection must be accepted.
    Tcp,
    /// An HTTP GET must be answered with an expected status (and body).
    Http(HttpProbe),
    /// The same over TLS.
    Https(HttpProbe),
    /// A UDP datagram must be answered.
    Udp(UdpProbe),
    /// A command must exit with status 0.
    Exec(ExecProbe),
}

impl ProbeKind {
    /// Every kind's name, in the order used in messages.
    pub const NAMES: [&'static str; 6] = ["none", "tcp", "http", "https", "udp", "exec"];

    /// The name used in the configuration file.
    pub fn name(&self) -> &'static str {
        match self {
            ProbeKind::None => "none",
            ProbeKind::Tcp => "tcp",
            ProbeKind::Http(_) => "http",
            ProbeKind::Https(_) => "https",
            ProbeKind::Udp(_) => "udp",
            ProbeKind::Exec(_) => "exec",
        }
    }
}

/// An HTTP or HTTPS GET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpProbe {
    /// Request path, starting with `/`.
    pub path: String,
    /// `Host` header; `None` means the target address.
    pub host: Option<String>,
    /// TLS server name (https only); `None` means `host` if set, else no SNI.
    pub sni: Option<String>,
    /// Accepted status codes, inclusive.
    pub expect_status: (u16, u16),
    /// A substring the response body must contain.
    pub body_contains: Option<String>,
    /// Whether the server's certificate is verified (https only).
    pub verify_tls: bool,
    /// PEM bundle of trusted roots (https only); `None` means the webpki roots.
    pub ca_file: Option<PathBuf>,
}

impl Default for HttpProbe {
    fn default() -> Self {
        HttpProbe {
            path: "/".to_string(),
            host: None,
            sni: None,
            expect_status: DEFAULT_EXPECT_STATUS,
            body_contains: None,
            verify_tls: true,
            ca_file: None,
        }
    }
}

/// A UDP request and its expected answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpProbe {
    /// The datagram sent.
    pub payload: Vec<u8>,
    /// The expected reply; `None` accepts any reply.
    pub expect: Option<Vec<u8>>,
}

/// A command run on the balancer.
///
/// It runs with `LB_SERVICE`, `LB_BACKEND_ADDRESS` and `LB_BACKEND_PORT` set, and is
/// killed when the probe's timeout expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecProbe {
    /// Program and arguments (not run through a shell).
    pub command: Vec<String>,
}

/// Whether a backend may receive traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    Up,
    Down,
}

impl Health {
    /// `up` or `down`, as in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Down => "down",
        }
    }

    /// Parses `up` or `down`.
    pub fn from_name(name: &str) -> Option<Health> {
        [Health::Up, Health::Down]
            .into_iter()
            .find(|h| h.as_str() == name)
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
