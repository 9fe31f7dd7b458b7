//! The agent's configuration file: a YAML list of virtual services and their backends.
//!
//! [`load`] reads a file and [`parse`] parses text; both return either a fully validated
//! [`Config`] or a [`ConfigError`] that lists *every* problem found, each with the file,
//! line, column and field path it refers to, e.g.
//!
//! ```text
//! deploy/examples/demo.yaml:14:17: services[1].backends[0].weight: weight 70000 is out of range 0..=65535
//! ```
//!
//! Parsing happens in four steps:
//! 1. a pre-pass bounds what the text may expand to: size, YAML nodes with aliases
//!    expanded, nesting (`limits.rs`);
//! 2. `serde_yaml` reads the text into private "raw" structs (`raw.rs`) that reject unknown
//!    fields and wrong types but keep every value loose (integers as wide integers,
//!    addresses and enums as strings) so that range and format problems can all be
//!    reported together;
//! 3. a marked YAML event parser builds an index from field path to line and column
//!    (`positions.rs`);
//! 4. `validate.rs` checks every rule, collects all violations and builds the public types.
//!
//! The file format is documented in `docs/config.md`.

use std::fmt;
use std::path::Path;

mod incremental;
mod kinds;
mod limits;
mod positions;
mod raw;
mod read;
mod validate;

#[cfg(test)]
mod tests;

pub use kinds::{Forwarding, OnAllDown, Persistence, Protocol, Scheduler, DEFAULT_GUE_PORT};

pub use std::net::IpAddr;

pub use self::limits::{MAX_DEPTH, MAX_ERRORS, MAX_FILE_SIZE, MAX_NODES};

/// Size of a service's Maglev lookup table when its configuration names none:
/// at least 100 slots per backend, from a fixed list of primes
/// (`crate::maglev::auto_table_size`).
pub fn default_table_size(backends: usize) -> u32 {
    crate::maglev::auto_table_size(backends)
}
/// Smallest accepted Maglev lookup table size.
pub const MIN_TABLE_SIZE: u32 = 7;
/// Largest accepted Maglev lookup table size (the largest prime below 2^20).
pub const MAX_TABLE_SIZE: u32 = 1_048_573;
/// Default number of entries in the connection-tracking table.
pub const DEFAULT_CONNTRACK_SIZE: u32 = 262_144;
/// Smallest accepted connection-tracking table size.
pub const MIN_CONNTRACK_SIZE: u32 = 1024;
/// Largest accepted connection-tracking table size (2^24).
pub const MAX_CONNTRACK_SIZE: u32 = 16_777_216;
/// Largest accepted backend weight.
pub const MAX_WEIGHT: u32 = 65_535;
/// Default backend weight.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Longest accepted service name.
pub const MAX_NAME_LEN: usize = 63;
/// Default persistence timeout (as `ipvsadm -p`).
pub const DEFAULT_PERSISTENCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Number of entries in the (global) connection-tracking table for new flows
    /// (an LRU: new flows evict the least recently used).
    pub conntrack_size: u32,
    /// Number of entries of the table of established flows (those that sent a
    /// second packet), which new flows cannot evict; 0 turns it off.
    pub established_size: u32,
    /// Idle timeouts of established flows.
    pub timeouts: Timeouts,
    /// Outer source addresses of tunnelled packets; `None`: the interface's
    /// primary address of that family (needed only by tunnel services).
    pub tunnel_source_v4: Option<std::net::Ipv4Addr>,
    pub tunnel_source_v6: Option<std::net::Ipv6Addr>,
    /// Largest IP packet the interface sends; `None`: the interface's MTU.
    pub mtu: Option<u32>,
    /// Echo requests to a VIP address are answered by the balancer (default true).
    pub answer_ping: bool,
    /// ICMP errors about a VIP flow's replies go to the flow's backend (default
    /// true); off, they pass to the balancer's own stack (and are lost there).
    pub forward_icmp: bool,
    /// SYN flood threshold, thousands of SYNs per CPU and second: past it a SYN of
    /// a `maglev`/`sh` service is forwarded without a connection-table insert
    /// (docs/connection-table.md, "SYN floods"); 0 records every SYN.
    pub syn_flood_kps: u16,
    /// `snat_addresses` and `snat_ports` as the file gives them at the top level:
    /// the pool of `fullnat` services without their own.
    pub snat: Snat,
    /// The fragment table.
    pub fragments: Fragments,
    /// The virtual services, in file order.
    pub services: Vec<std::sync::Arc<ServiceConfig>>,
}

/// A SNAT pool (`forwarding: fullnat`): the balancer's own addresses new flows
/// leave from (a service uses those of its backends' family) and the source
/// ports given out, `ports.0..=ports.1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snat {
    pub addresses: Vec<IpAddr>,
    pub ports: (u16, u16),
}

/// Default `snat_ports`.
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (1024, 65535);

impl Default for Snat {
    fn default() -> Self {
        Snat { addresses: Vec::new(), ports: DEFAULT_SNAT_PORTS }
    }
}

/// The table that remembers where a fragmented datagram's first fragment went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragments {
    /// Entries (an LRU: datagrams in flight at once).
    pub size: u32,
    /// How long after its first fragment a datagram's later fragments follow it
    /// (whole seconds: the data plane's clock ticks in seconds).
    pub timeout: std::time::Duration,
}

/// Smallest and largest accepted `fragments.size`.
pub const MIN_FRAGMENTS_SIZE: u32 = 64;
pub const MAX_FRAGMENTS_SIZE: u32 = 1_048_576;

impl Default for Fragments {
    /// 8192 entries, 2 s.
    fn default() -> Self {
        Fragments { size: lb_common::DEFAULT_FRAGS_SIZE, timeout: std::time::Duration::from_secs(2) }
    }
}

/// How long an established flow may stay idle before the agent removes its
/// entry (as `ipvsadm --set tcp tcpfin udp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP flows.
    pub tcp: std::time::Duration,
    /// TCP flows whose client sent FIN or RST.
    pub tcp_fin: std::time::Duration,
    /// UDP flows.
    pub udp: std::time::Duration,
}

impl Default for Timeouts {
    /// IPVS's defaults: 900 s, 120 s, 300 s.
    fn default() -> Self {
        use std::time::Duration;
        Timeouts { tcp: Duration::from_secs(900), tcp_fin: Duration::from_secs(120), udp: Duration::from_secs(300) }
    }
}

/// One virtual service: a (vip, port, protocol) triple balanced over a set of backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Unique name, `[A-Za-z0-9_.-]{1,63}`.
    pub name: String,
    /// The virtual IP address, a unicast IPv4 or IPv6 address; with
    /// `vip_prefix`, the first address of the prefix.
    pub vip: IpAddr,
    /// A prefix service (`vip: 198.18.50.0/24`): the prefix length (IPv4 1..=32,
    /// IPv6 1..=128), matched by longest prefix after the exact VIPs.
    pub vip_prefix: Option<u8>,
    /// The destination port; 0 means "any port" for the protocol.
    pub port: u16,
    pub protocol: Protocol,
    pub scheduler: Scheduler,
    /// How frames reach the backends.
    pub forwarding: Forwarding,
    /// GUE destination port (with `Forwarding::Gue`).
    pub gue_port: u16,
    /// The SNAT pool in force (`Forwarding::Fullnat`: the service's own fields,
    /// else the global ones; holds an address of the backends' family); `None`
    /// for the other modes.
    pub snat: Option<Snat>,
    /// Size of the Maglev lookup table: a prime larger than the number of backends
    /// (`default_table_size` of the backend count when the file names none).
    pub table_size: u32,
    /// The backends, in file order; all of the same address family as `vip`.
    pub backends: Vec<BackendConfig>,
    /// What happens to new flows while no backend is up.
    pub on_all_down: OnAllDown,
    /// Client affinity (LVS `-p`), if configured.
    pub persistence: Option<Persistence>,
}

/// A real server behind a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub address: IpAddr,
    /// Relative weight, `0..=65535`; 0 means drained (no new flows).
    pub weight: u32,
    /// A backup receives traffic only while no primary (non-backup) backend is up.
    pub backup: bool,
    /// The port `forwarding: nat` / `fullnat` sends to (`None`: the service's port).
    pub port: Option<u16>,
    /// The backend's liveness probe: the service's `probe`, with the fields of the
    /// backend's own `probe` replacing the service's, defaults filled in.
    pub probe: crate::health::ProbeSpec,
}

/// One problem found in a configuration file.
///
/// `line` and `column` are 1-based; both are 0 for problems that concern the whole file
/// (e.g. it cannot be read), which are then displayed as `origin: message`.
/// `path` is the field path (e.g. `services[1].backends[0].weight`), empty for the
/// document itself.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub origin: String,
    pub line: usize,
    pub column: usize,
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.origin)?;
        if self.line > 0 {
            write!(f, "{}:{}:", self.line, self.column)?;
        }
        if !self.path.is_empty() {
            write!(f, " {}:", self.path)?;
        }
        write!(f, " {}", self.message)
    }
}

/// Every problem found in a configuration file, sorted by position.
///
/// Displayed as one diagnostic per line.
#[derive(Debug, thiserror::Error)]
#[error("{}", display_lines(.errors))]
pub struct ConfigError {
    pub errors: Vec<Diagnostic>,
}

impl From<Diagnostic> for ConfigError {
    fn from(diagnostic: Diagnostic) -> Self {
        ConfigError {
            errors: vec![diagnostic],
        }
    }
}

fn display_lines(errors: &[Diagnostic]) -> String {
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

/// Reads and validates the configuration file at `path`.
///
/// The path, as given, is the origin named in every diagnostic; a file that cannot be
/// read, or is larger than [`MAX_FILE_SIZE`], is reported as a diagnostic without a
/// position; a file that is not UTF-8 at the line and column of its first bad byte.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let text = read::read(path, &origin)?;
    parse(&text, &origin)
}

pub use self::incremental::{reparse, split_services, Cut};

/// Parses and validates configuration text; `origin` is the file name used in messages.
///
/// The text is first checked against the limits of `limits.rs` (size, nodes with
/// aliases expanded, nesting), so that no file can make parsing slow or large.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    limits::check(text, origin)?;
    let raw: raw::RawConfig = serde_yaml::from_str(text).map_err(|e| serde_error(&e, origin))?;
    let positions = positions::LazyPositions::new(text);
    validate::validate(raw, &positions, origin).map_err(|errors| ConfigError { errors })
}

/// Converts a `serde_yaml` error (syntax, unknown field, wrong type, ...) into a
/// diagnostic, moving its location and field path out of the message.
fn serde_error(err: &serde_yaml::Error, origin: &str) -> Diagnostic {
    let mut message = err.to_string();
    let (line, column) = match err.location() {
        Some(loc) => {
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            if let Some(at) = message.find(&suffix) {
                message.replace_range(at..at + suffix.len(), "");
            }
            (loc.line(), loc.column())
        }
        None => (1, 1),
    };
    let (path, message) = match message.split_once(": ") {
        Some((path, rest)) if is_field_path(path) => (path.to_string(), rest.to_string()),
        _ => (String::new(), message),
    };
    Diagnostic {
        origin: origin.to_string(),
        line,
        column,
        path,
        message: lower_first(&message),
    }
}

/// Whether `s` looks like a field path as `serde_yaml` prints it (`services[0].port`).
fn is_field_path(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']' | '-'))
}

/// Lower-cases the first letter of a message, unless it starts an acronym ("EOF").
fn lower_first(s: &str) -> String {
    let mut chars = s.chars();
    match (chars.next(), chars.next()) {
        (Some(first), second) if !second.is_some_and(char::is_uppercase) => first
            .to_lowercase()
            .chain(s[first.len_utf8()..].chars())
            .collect(),
        _ => s.to_string(),
    }
}
