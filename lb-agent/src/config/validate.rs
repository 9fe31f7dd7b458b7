//! Checks every rule on the raw configuration, collecting all violations, and builds
//! the validated [`Config`].

use std::collections::HashMap;
use std::net::IpAddr;

mod address;
mod conntrack;
mod forwarding;
mod policy;
mod prefix;
mod probe;
mod sched;
mod snat;
mod table;

pub(super) use crate::maglev::is_prime;

use self::probe::{Level, ProbeFields};
use super::limits::MAX_ERRORS;
use super::positions::{LazyPositions as Positions, Pos};
use super::raw::{Int, RawBackend, RawConfig, RawService};
use super::{
    BackendConfig, Config, DEFAULT_CONNTRACK_SIZE, DEFAULT_WEIGHT, Diagnostic,
    MAX_CONNTRACK_SIZE, MAX_NAME_LEN, MAX_WEIGHT, MIN_CONNTRACK_SIZE,
    Forwarding, Protocol, Scheduler, ServiceConfig,
};

/// Validates `raw`, returning every violation sorted by position.
pub(super) fn validate(
    raw: RawConfig,
    positions: &Positions<'_>,
    origin: &str,
) -> Result<Config, Vec<Diagnostic>> {
    let mut checker = Checker {
        positions,
        origin,
        errors: Vec::new(),
        names: HashMap::new(),
        triples: HashMap::new(),
        not_shown: 0,
    };
    let config = checker.config(raw);
    let mut errors = checker.errors;
    if errors.is_empty() {
        // Every `None` is reported as an error, so this cannot fail.
        if let Some(config) = config {
            return Ok(config);
        }
    }
    errors.sort_by_key(|d| (d.line, d.column));
    if checker.not_shown > 0 {
        errors.push(Diagnostic {
            origin: origin.to_string(),
            line: 0,
            column: 0,
            path: String::new(),
            message: format!(
                "{} more errors not shown (at most {MAX_ERRORS} are reported)",
                checker.not_shown
            ),
        });
    }
    Err(errors)
}

/// A service's (vip, prefix length, port, protocol): unique across services.
type Triple = (IpAddr, Option<u8>, u16, Protocol);

struct Checker<'a> {
    positions: &'a Positions<'a>,
    origin: &'a str,
    errors: Vec<Diagnostic>,
    /// First use of each service name: the service's index.
    names: HashMap<String, usize>,
    /// First use of each (vip, port, protocol): that service's path and name
    /// (its line is looked up only when a duplicate needs it).
    triples: HashMap<Triple, (String, Option<String>)>,
    /// Errors found after the first [`MAX_ERRORS`], only counted.
    not_shown: usize,
}

impl Checker<'_> {
    /// Reports `message` about the field at `path`, located at `pos`.
    fn report(&mut self, path: &str, pos: Pos, message: String) {
        if self.full() {
            return;
        }
        self.errors.push(Diagnostic {
            origin: self.origin.to_string(),
            line: pos.line,
            column: pos.column,
            path: path.to_string(),
            message,
        });
    }

    /// Whether [`MAX_ERRORS`] have been reported; if so, counts one more not shown.
    fn full(&mut self) -> bool {
        let full = self.errors.len() >= MAX_ERRORS;
        self.not_shown += usize::from(full);
        full
    }

    /// Reports a problem with the value at `path`.
    fn at_value(&mut self, path: &str, message: String) {
        if !self.full() {
            let pos = self.positions.value(path);
            self.report(path, pos, message);
        }
    }

    /// Reports a problem with the field at `path` as a whole (at its key).
    fn at_key(&mut self, path: &str, message: String) {
        if !self.full() {
            let pos = self.positions.key(path);
            self.report(path, pos, message);
        }
    }

    /// A required field: reports it missing (at its key if it is there but empty, else at
    /// the enclosing item).
    fn required<T>(&mut self, value: Option<T>, path: &str, field: &str) -> Option<T> {
        if value.is_none() {
            self.at_key(path, format!("missing required field `{field}`"));
        }
        value
    }

    /// An integer field that must lie in `min..=max`.
    fn ranged<T>(&mut self, value: Int, path: &str, field: &str, min: T, max: T) -> Option<T>
    where
        T: TryFrom<i128> + Into<i128> + Copy + std::fmt::Display,
    {
        let checked = value.within(min, max);
        if checked.is_none() {
            self.at_value(
                path,
                format!("{field} {value} is out of range {min}..={max}"),
            );
        }
        checked
    }

    fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let conntrack_size = match raw.conntrack_size {
            None => Some(DEFAULT_CONNTRACK_SIZE),
            Some(v) => self.ranged(
                v,
                "conntrack_size",
                "conntrack_size",
                MIN_CONNTRACK_SIZE,
                MAX_CONNTRACK_SIZE,
            ),
        };
        let established_size = self.established_size(raw.established_size, conntrack_size);
        let tunnel_source_v4 = self.tunnel_source_v4(raw.tunnel_source_v4.as_deref());
        let tunnel_source_v6 = self.tunnel_source_v6(raw.tunnel_source_v6.as_deref());
        let mtu = self.mtu(raw.mtu);
        let timeouts = self.timeouts(raw.timeouts.as_ref());
        let fragments = self.fragments(raw.fragments.as_ref());
        let syn_flood_kps = match raw.syn_flood_kps {
            None => Some(lb_common::DEFAULT_SYN_FLOOD_KPS),
            Some(v) => self.ranged(v, "syn_flood_kps", "syn_flood_kps", 0u16, u16::MAX),
        };
        let snat = self.global_snat(raw.snat_addresses.as_deref(), raw.snat_ports.as_deref());
        let raw_services = self.required(raw.services, "services", "services");
        let mut services = Some(Vec::new());
        let global_snat = snat.clone();
        for (index, raw_service) in raw_services.into_iter().flatten().enumerate() {
            let service = self.service(index, raw_service, global_snat.as_ref());
            services = services.zip(service).map(|(mut all, s)| {
                all.push(s);
                all
            });
        }
        if !self.fullnat_table(services.as_deref(), established_size) {
            return None;
        }
        Some(Config {
            conntrack_size: conntrack_size?,
            established_size: established_size?,
            timeouts: timeouts?,
            tunnel_source_v4: tunnel_source_v4?,
            tunnel_source_v6: tunnel_source_v6?,
            mtu: mtu?,
            answer_ping: raw.answer_ping.unwrap_or(true),
            forward_icmp: raw.forward_icmp.unwrap_or(true),
            syn_flood_kps: syn_flood_kps?,
            snat: snat?,
            fragments: fragments?,
            services: services?.into_iter().map(std::sync::Arc::new).collect(),
        })
    }

    fn service(&mut self, index: usize, raw: RawService, global_snat: Option<&super::Snat>) -> Option<ServiceConfig> {
        let path = format!("services[{index}]");
        let field = |name: &str| format!("{path}.{name}");

        let name = self.name(index, raw.name, &field("name"));
        let label = match &name {
            Some(name) => format!("service '{name}'"),
            None => "this service".to_string(),
        };
        let sched_fields = (raw.prefix_v4, raw.prefix_v6, raw.persistence.is_some());
        let vip_and_prefix = self
            .required(raw.vip, &field("vip"), "vip")
            .and_then(|vip| self.vip(&vip, &field("vip")));
        let vip = vip_and_prefix.map(|v| v.0);
        let port = self
            .required(raw.port, &field("port"), "port")
            .and_then(|port| self.ranged(port, &field("port"), "port", 0, u16::MAX));
        let protocol = match raw.protocol {
            None => Some(Protocol::Tcp),
            Some(text) => self.protocol(&text, &field("protocol")),
        };
        let scheduler = match raw.scheduler {
            None => Some(Scheduler::Maglev),
            Some(ref text) => self.scheduler(text, &field("scheduler")),
        };
        let scheduler = self.scheduler_fields(scheduler, sched_fields, &path);
        let scheduler = self.scheduler_needs_prefix(scheduler, vip_and_prefix, &field("scheduler"));
        let forwarding = self.forwarding(raw.forwarding.as_deref(), &field("forwarding"));
        let gue_port = self.gue_port(raw.gue_port, forwarding, &field("gue_port"));
        let own_snat = (raw.snat_addresses.as_deref(), raw.snat_ports.as_deref());
        let snat = self.service_snat(own_snat, global_snat, forwarding, vip, &path);

        if let (Some((vip, prefix)), Some(port), Some(protocol)) = (vip_and_prefix, port, protocol) {
            if let Some((first_path, first_name)) = self.triples.get(&(vip, prefix, port, protocol)) {
                let line = self.positions.value(first_path).line;
                let first = match first_name {
                    Some(name) => format!("service '{name}' ({first_path}, line {line})"),
                    None => format!("{first_path} (line {line})"),
                };
                let message = format!(
                    "duplicate service: vip {} port {port} protocol {protocol} is already \
                     used by {first}",
                    prefix::vip_text(vip, prefix)
                );
                self.at_value(&field("vip"), message);
            } else {
                self.triples.insert((vip, prefix, port, protocol), (path.clone(), name.clone()));
            }
        }

        let count = raw.backends.as_ref().map_or(0, Vec::len);
        let probe = self.probe_fields(raw.probe.as_deref(), &field("probe"), false);
        // The service's own probe must be valid (it is every backend's default).
        let probe_ok = self.probe_spec(&probe, port, Level::Service).is_some();
        let on_all_down = self.on_all_down(
            raw.on_all_down.as_deref(),
            &field("on_all_down"),
            raw.backends.as_ref(),
        );
        let persistence = self.persistence(raw.persistence.as_deref(), &field("persistence"));
        // GUE carries either family in either: its backends may be of the other
        // family than the vip.
        let family_of = vip.filter(|_| forwarding != Some(Forwarding::Gue));
        let backends = self
            .backends(raw.backends, &path, &label, family_of, (&probe, forwarding), port)
            .filter(|_| probe_ok);
        let table_size = self.table(raw.table_size, count, &path);

        if let Some(mode) = forwarding.filter(|f| f.is_nat()) {
            if vip_and_prefix.is_some_and(|(_, p)| p.is_some()) {
                // lb_prefix hands no frame to lb_nat; refused rather than passed.
                self.at_value(&field("forwarding"), format!("forwarding: {mode} needs an exact vip, not a prefix"));
                return None;
            }
        }
        Some(ServiceConfig {
            name: name?,
            vip: vip?,
            vip_prefix: vip_and_prefix?.1,
            port: port?,
            protocol: protocol?,
            scheduler: scheduler?,
            forwarding: forwarding?,
            gue_port: gue_port?,
            snat: snat?,
            table_size: table_size?,
            backends: backends?,
            on_all_down: on_all_down?,
            persistence: persistence?,
        })
    }

    fn name(&mut self, index: usize, raw: Option<String>, path: &str) -> Option<String> {
        let name = self.required(raw, path, "name")?;
        let length = name.chars().count();
        let message = if name.is_empty() {
            "service name must not be empty".to_string()
        } else if length > MAX_NAME_LEN {
            format!(
                "service name '{name}' is too long ({length} characters, at most {MAX_NAME_LEN})"
            )
        } else if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            format!("service name '{name}' may only contain the characters A-Z a-z 0-9 _ . -")
        } else if let Some(&first) = self.names.get(&name) {
            let line = self
                .positions
                .value(&format!("services[{first}].name"))
                .line;
            format!(
                "duplicate service name '{name}' (first used by services[{first}] at line {line})"
            )
        } else {
            self.names.insert(name.clone(), index);
            return Some(name);
        };
        self.at_value(path, message);
        None
    }

    fn protocol(&mut self, text: &str, path: &str) -> Option<Protocol> {
        let protocol = Protocol::from_name(text);
        if protocol.is_none() {
            let supported: Vec<&str> = Protocol::ALL.iter().map(|p| p.as_str()).collect();
            self.at_value(
                path,
                format!(
                    "unknown protocol '{text}'; supported protocols: {}",
                    supported.join(", ")
                ),
            );
        }
        protocol
    }

    fn scheduler(&mut self, text: &str, path: &str) -> Option<Scheduler> {
        let scheduler = Scheduler::from_name(text);
        if scheduler.is_none() {
            let supported: Vec<&str> = Scheduler::ALL.iter().map(|s| s.as_str()).collect();
            self.at_value(
                path,
                format!(
                    "unknown scheduler '{text}'; supported schedulers: {}",
                    supported.join(", ")
                ),
            );
        }
        scheduler
    }

    fn backends(
        &mut self,
        raw: Option<Vec<RawBackend>>,
        service_path: &str,
        label: &str,
        vip: Option<IpAddr>,
        (probe, forwarding): (&ProbeFields, Option<Forwarding>),
        port: Option<u16>,
    ) -> Option<Vec<BackendConfig>> {
        let path = format!("{service_path}.backends");
        let raw = raw.unwrap_or_default();
        let mut seen: HashMap<IpAddr, usize> = HashMap::new();
        let mut backends = Some(Vec::with_capacity(raw.len()));
        for (index, backend) in raw.iter().enumerate() {
            let item = format!("{path}[{index}]");
            let backend = self.backend(backend, &item, vip, &mut seen, index, (probe, port, forwarding));
            backends = backends.zip(backend).map(|(mut all, b)| {
                all.push(b);
                all
            });
        }
        let is_backup = |b: &&RawBackend| b.backup == Some(true);
        let usable = raw
            .iter()
            .any(|b| !is_backup(&b) && b.weight.is_none_or(|w| w.0 != 0));
        if !usable {
            let why = if raw.is_empty() {
                "none are listed"
            } else if raw.iter().all(|b| is_backup(&b)) {
                "every backend is a backup"
            } else if raw.iter().any(|b| is_backup(&b)) {
                "every primary (non-backup) backend has weight 0"
            } else {
                "every weight is 0"
            };
            self.at_key(&path, format!("{label} has no usable backends: {why}"));
            return None;
        }
        backends
    }

    fn backend(
        &mut self,
        raw: &RawBackend,
        path: &str,
        vip: Option<IpAddr>,
        seen: &mut HashMap<IpAddr, usize>,
        index: usize,
        (service_probe, service_port, forwarding): (&ProbeFields, Option<u16>, Option<Forwarding>),
    ) -> Option<BackendConfig> {
        let nat_port = self.backend_port(raw.port, forwarding, &format!("{path}.port"));
        let own_probe = self.probe_fields(raw.probe.as_deref(), &format!("{path}.probe"), true);
        let probe = self.probe_spec(&own_probe.over(service_probe), service_port, Level::Backend);
        let address_path = format!("{path}.address");
        let address = self
            .required(raw.address.as_deref(), &address_path, "address")
            .and_then(|text| self.address(text, &address_path, "address", "a backend"));
        let weight = match raw.weight {
            None => Some(DEFAULT_WEIGHT),
            Some(w) => self.ranged(w, &format!("{path}.weight"), "weight", 0, MAX_WEIGHT),
        };
        let address = address.filter(|&address| {
            let family_ok = vip.is_none_or(|vip| vip.is_ipv4() == address.is_ipv4());
            if let (false, Some(vip)) = (family_ok, vip) {
                self.at_value(
                    &address_path,
                    format!(
                        "backend {address} is {} but the vip {vip} is {}; a service's \
                         backends must have the vip's address family (only forwarding: gue \
                         carries one family in the other)",
                        family(address),
                        family(vip)
                    ),
                );
            }
            family_ok
        });
        let address = address.filter(|&address| match seen.get(&address) {
            Some(&first) => {
                let service = &path[..path.rfind('[').unwrap_or(0)];
                let line = self
                    .positions
                    .value(&format!("{service}[{first}].address"))
                    .line;
                self.at_value(
                    &address_path,
                    format!("duplicate backend {address} (first listed at line {line})"),
                );
                false
            }
            None => {
                seen.insert(address, index);
                true
            }
        });
        Some(BackendConfig {
            address: address?,
            weight: weight?,
            backup: raw.backup.unwrap_or(false),
            port: nat_port?,
            probe: probe?,
        })
    }
}

fn family(address: IpAddr) -> &'static str {
    if address.is_ipv4() { "IPv4" } else { "IPv6" }
}
