//! `lb-agent flows`: the live connection table, like `ipvsadm -Lnc`, read from the
//! pinned `CONNTRACK` and `CT_ESTABLISHED` maps (so it works while no agent runs):
//! protocol, expiry, state, client, VIP, the backend (with the port a `nat` or
//! `fullnat` flow goes to), the forwarding mode and the service; for a `fullnat`
//! flow also its SNAT address and port (from the pinned `FULLNAT_FORWARD`): the
//! backend sees that, not the client.
//!
//! Which id is which service and backend comes from the pinned `SERVICES` and
//! `BACKENDS` maps, as for `stats`; the configuration file, if given, names the
//! services and gives the timeouts the expiry is computed with (IPVS's defaults
//! otherwise).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::Path,
};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use lb_common::{map_names as names, FlowKey, FlowVal, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW, PROTO_TCP, PROTO_UDP};
use serde::{Deserialize, Serialize};

use crate::{
    config::{self, Timeouts},
    conntrack::timeout_of,
    dataplane,
    plan::Plan,
    report::name_services,
};

/// One entry of the connection table, as printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// `SYN` (TCP, first packet only), `NEW` (UDP, one datagram), `ESTABLISHED`,
    /// `CLOSING` (the client sent FIN or RST).
    pub state: String,
    /// Seconds since the flow's last packet (`CONNTRACK`: since its first).
    pub idle_s: u32,
    /// Seconds left of its idle timeout (0: due): `CT_ESTABLISHED` entries are then
    /// removed by the agent's sweep; `CONNTRACK` entries stop counting as
    /// connections and stay until the LRU evicts them.
    pub expire_s: u64,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    /// The service's name (empty without `--config`, or for an unnamed service).
    pub service: String,
    /// The backend's address (`None`: its id is no longer in `BACKENDS`, or now
    /// names another backend).
    pub backend: Option<IpAddr>,
    /// The port the flow's packets reach the backend on: a `nat` backend's own
    /// port; the VIP's port in the other modes.
    pub backend_port: Option<u16>,
    /// The backend's forwarding mode: `dr`, `ipip`, `gue` or `nat`.
    pub forwarding: Option<String>,
    /// `established` (`CT_ESTABLISHED`, kept against floods) or `new` (`CONNTRACK`).
    pub table: String,
    /// A `fullnat` flow's SNAT address and port (the source its backend sees).
    #[serde(default)]
    pub snat: Option<SocketAddr>,
}

fn mode(forward: u8) -> &'static str {
    match forward {
        lb_common::FORWARD_IPIP => "ipip",
        lb_common::FORWARD_GUE => "gue",
        lb_common::FORWARD_NAT => "nat",
        lb_common::FORWARD_FULLNAT => "fullnat",
        _ => "dr",
    }
}

/// The address of a 16-byte map address (IPv4 as `::ffff:a.b.c.d`).
fn ip_of(addr: [u8; 16]) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(addr)).to_canonical()
}

fn state_name(key: &FlowKey, val: &FlowVal) -> &'static str {
    match val.state {
        CT_STATE_ESTABLISHED => "ESTABLISHED",
        CT_STATE_CLOSING => "CLOSING",
        _ if key.proto == PROTO_TCP => "SYN",
        _ => "NEW",
    }
}

/// The flows of one table, named with `plan`, expiry by `timeouts` at `now`
/// (`CT_CLOCK`).
fn flows_of(
    entries: impl IntoIterator<Item = (FlowKey, FlowVal)>,
    table: &'static str,
    plan: &Plan,
    timeouts: &Timeouts,
    now: u32,
) -> Vec<Flow> {
    let services: HashMap<u32, &str> = plan.services.iter().map(|s| (s.value.id, s.name.as_str())).collect();
    let backends = plan.backends_by_id();
    entries
        .into_iter()
        .map(|(key, val)| {
            let idle_s = now.saturating_sub(val.last_seen);
            // A TCP flow seen once counts as live for the tcp_fin timeout (as the
            // sweep counts it), the rest by their state's timeout.
            let once = key.proto == PROTO_TCP && val.state == CT_STATE_NEW;
            let timeout = if once { timeouts.tcp_fin } else { timeout_of(&key, &val, timeouts) };
            // An entry of a backend id since given to another backend (its
            // generation moved on) names no backend.
            let backend = backends.get(val.backend_id).filter(|b| b.generation == val.generation);
            Flow {
                protocol: if key.proto == PROTO_UDP { "UDP" } else { "TCP" }.to_string(),
                state: state_name(&key, &val).to_string(),
                idle_s,
                expire_s: timeout.as_secs().saturating_sub(u64::from(idle_s)),
                client: SocketAddr::new(ip_of(key.src), key.sport),
                vip: SocketAddr::new(ip_of(key.dst), key.dport),
                service: services.get(&val.service_id).copied().unwrap_or_default().to_string(),
                backend: backend.map(|b| b.address),
                backend_port: backend.map(|b| if (b.forward == lb_common::FORWARD_NAT || b.forward == lb_common::FORWARD_FULLNAT) && b.port != 0 { b.port } else { key.dport }),
                forwarding: backend.map(|b| mode(b.forward).to_string()),
                table: table.to_string(),
                snat: None,
            }
        })
        .collect()
}

/// Whether `flow` belongs to service `filter`: its name, or `VIP:PORT`.
fn matches(flow: &Flow, filter: &str) -> bool {
    flow.service == filter || filter.parse::<SocketAddr>().is_ok_and(|a| a == flow.vip)
}

/// The table as text: a header line, then one line per flow.
pub fn format(flows: &[Flow]) -> String {
    let mut out = format!(
        "{:<4} {:>7} {:<11} {:<46} {:<46} {:<46} {:<4} {}\n",
        "pro", "expire", "state", "client", "virtual", "backend", "mode", "service"
    );
    let with_snat = flows.iter().any(|f| f.snat.is_some());
    for f in flows {
        let expire = format!("{:02}:{:02}", f.expire_s / 60, f.expire_s % 60);
        let backend = match (f.backend, f.backend_port) {
            (Some(b), Some(port)) => SocketAddr::new(b, port).to_string(),
            _ => "-".to_string(),
        };
        out += &format!(
            "{:<4} {:>7} {:<11} {:<46} {:<46} {:<46} {:<4} {}\n",
            f.protocol,
            expire,
            f.state,
            f.client.to_string(),
            f.vip.to_string(),
            backend,
            f.forwarding.as_deref().unwrap_or("-"),
            f.service
        );
        if let (true, Some(snat)) = (with_snat, f.snat) {
            // client <-> snat: what the backend sees of this client.
            out.pop();
            out += &format!(" snat {snat}\n");
        }
    }
    out
}

/// Reads the pinned tables under `pin_dir`: every flow, the established ones
/// first, each group by client.
pub fn read(pin_dir: &Path, config_path: Option<&Path>) -> Result<Vec<Flow>> {
    let reading = || format!("reading the maps pinned under {} (is the agent running?)", pin_dir.display());
    let mut plan = dataplane::read_pinned_plan(pin_dir).with_context(reading)?;
    let cfg = match config_path {
        Some(path) => Some(config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?),
        None => None,
    };
    name_services(&mut plan, cfg.as_ref());
    let timeouts = cfg.as_ref().map(|c| c.timeouts).unwrap_or_default();
    let open = |name: &'static str| MapData::from_pin(pin_dir.join(name)).with_context(reading);
    let clock: Array<MapData, u32> = Array::try_from(aya::maps::Map::Array(open(names::CT_CLOCK)?))?;
    let now = clock.get(&0, 0).with_context(reading)?;
    let mut flows = Vec::new();
    for (name, table) in [(names::CT_ESTABLISHED, "established"), (names::CONNTRACK, "new")] {
        let map = open(name)?;
        let map = match map.info()?.map_type()? {
            aya::maps::MapType::LruHash => aya::maps::Map::LruHashMap(map),
            _ => aya::maps::Map::HashMap(map),
        };
        let map: BpfHashMap<MapData, FlowKey, FlowVal> = BpfHashMap::try_from(map)?;
        // Entries can go while the table is walked (the sweep, LRU eviction): a key
        // that vanished is skipped.
        let entries: Vec<(FlowKey, FlowVal)> = map.iter().filter_map(|e| e.ok()).collect();
        let mut part = flows_of(entries, table, &plan, &timeouts, now);
        add_snat(&mut part, pin_dir);
        part.sort_by_key(|a| (a.client, a.vip));
        flows.extend(part);
    }
    Ok(flows)
}

/// The half-open handshakes recorded in `FIRST_RECORD` (SYNs of `maglev`/`sh`
/// services), which `read` cannot list (a record keeps a tag of its flow, not
/// the 5-tuple): their number per backend, as text lines, the backend named
/// when the plan knows its id. Empty when there are none (or the map is absent:
/// an older pin directory).
pub fn half_open(pin_dir: &Path, config_path: Option<&Path>) -> Result<String> {
    let open = |name: &'static str| MapData::from_pin(pin_dir.join(name));
    let Ok(first) = open(names::FIRST_RECORD) else { return Ok(String::new()) };
    let first = crate::first_record::FirstRecords::new(first)?;
    let timeouts = match config_path {
        Some(path) => config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?.timeouts,
        None => Timeouts::default(),
    };
    let clock: Array<MapData, u32> = Array::try_from(aya::maps::Map::Array(open(names::CT_CLOCK)?))?;
    let now = clock.get(&0, 0)?;
    let per = first.per_backend(now, &timeouts);
    if per.is_empty() {
        return Ok(String::new());
    }
    Ok(format_half_open(&per, &dataplane::read_pinned_plan(pin_dir)?))
}

/// `half_open`'s lines for the live records per backend id.
fn format_half_open(per: &std::collections::BTreeMap<u32, u64>, plan: &Plan) -> String {
    let backends = plan.backends_by_id();
    let total: u64 = per.values().sum();
    let mut out = format!(
        "# {total} more half-open TCP flows (SYN seen, in FIRST_RECORD: counted, not listed, the record keeps no 5-tuple):\n"
    );
    for (id, n) in per {
        let name = backends.get(*id).map_or(format!("backend id {id}"), |b| format!("backend {}", b.address));
        out += &format!("#   {name}: {n}\n");
    }
    out
}

/// Fills `snat` of the `fullnat` flows from the pinned `FULLNAT_FORWARD` (absent
/// on an older pin directory: nothing to fill).
fn add_snat(flows: &mut [Flow], pin_dir: &Path) {
    if !flows.iter().any(|f| f.forwarding.as_deref() == Some("fullnat")) {
        return;
    }
    let Ok(map) = MapData::from_pin(pin_dir.join(names::FULLNAT_FORWARD)) else { return };
    let Ok(map) = BpfHashMap::<MapData, FlowKey, lb_common::SnatFwd>::try_from(aya::maps::Map::HashMap(map)) else { return };
    for f in flows.iter_mut().filter(|f| f.forwarding.as_deref() == Some("fullnat")) {
        let key = FlowKey {
            src: addr16(f.client.ip()),
            dst: addr16(f.vip.ip()),
            sport: f.client.port(),
            dport: f.vip.port(),
            proto: if f.protocol == "UDP" { PROTO_UDP } else { PROTO_TCP },
            _pad: [0; 3],
        };
        if let Ok(m) = map.get(&key, 0) {
            f.snat = Some(SocketAddr::new(ip_of(m.snat), m.snat_port));
        }
    }
}

/// The 16-byte map form of an address.
fn addr16(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => lb_common::v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// `lb-agent flows`.
pub fn print(pin_dir: &Path, config_path: Option<&Path>, service: Option<&str>, json: bool) -> Result<()> {
    let mut flows = read(pin_dir, config_path)?;
    if let Some(filter) = service {
        if filter.parse::<SocketAddr>().is_err() && config_path.is_none() {
            bail!("--service {filter}: services are named by the configuration: give --config, or VIP:PORT");
        }
        flows.retain(|f| matches(f, filter));
    }
    if json {
        println!("{}", serde_json::to_string(&flows)?);
    } else {
        print!("{}", format(&flows));
        if service.is_none() {
            print!("{}", half_open(pin_dir, config_path)?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(proto: u8) -> FlowKey {
        FlowKey {
            src: lb_common::v4_mapped([198, 18, 0, 100]),
            dst: lb_common::v4_mapped([198, 18, 1, 10]),
            sport: 40000,
            dport: 80,
            proto,
            _pad: [0; 3],
        }
    }

    #[test]
    fn half_open_records_are_counted_per_backend_not_listed() {
        let per = std::collections::BTreeMap::from([(3, 2), (9, 1)]);
        let text = format_half_open(&per, &Plan::default());
        assert_eq!(
            text,
            "# 3 more half-open TCP flows (SYN seen, in FIRST_RECORD: counted, not listed, the record keeps no 5-tuple):\n\
             #   backend id 3: 2\n#   backend id 9: 1\n"
        );
    }

    #[test]
    fn states_expiry_and_addresses() {
        let t = Timeouts::default();
        let est = FlowVal { state: CT_STATE_ESTABLISHED, last_seen: 90, ..Default::default() };
        let syn = FlowVal { state: 0, last_seen: 99, ..Default::default() };
        let plan = Plan::default();
        let f = flows_of([(key(PROTO_TCP), est), (key(PROTO_UDP), syn)], "established", &plan, &t, 100);
        assert_eq!(f[0].state, "ESTABLISHED");
        assert_eq!(f[0].idle_s, 10);
        assert_eq!(f[0].expire_s, 890);
        assert_eq!(f[0].client, "198.18.0.100:40000".parse().unwrap());
        assert_eq!(f[0].vip, "198.18.1.10:80".parse().unwrap());
        assert_eq!(f[0].backend, None);
        assert_eq!(f[1].state, "NEW");
        assert_eq!(f[1].protocol, "UDP");
        let n = flows_of([(key(PROTO_TCP), syn)], "new", &plan, &t, 100);
        assert_eq!((n[0].state.as_str(), n[0].expire_s), ("SYN", 119));
        let text = format(&f);
        assert!(text.lines().nth(1).unwrap().starts_with("TCP    14:50 ESTABLISHED 198.18.0.100:40000"), "{text}");
        assert!(matches(&f[0], "198.18.1.10:80") && !matches(&f[0], "198.18.1.10:81"));
    }

    #[test]
    fn a_nat_flow_shows_its_backend_port_and_mode() {
        let cfg = config::parse(
            "services:\n  - { name: web, vip: 198.18.1.10, port: 80, forwarding: nat, backends: [{ address: 198.18.5.11, port: 8080 }] }\n",
            "t.yaml",
        )
        .expect("config");
        let macs: std::collections::BTreeMap<IpAddr, [u8; 6]> = [("198.18.5.11".parse().unwrap(), [2, 0, 0, 0, 0, 1])].into();
        let plan = Plan::build(&cfg, &macs);
        let b = &plan.backends[0];
        let val = FlowVal {
            backend_id: b.id,
            service_id: plan.services[0].value.id,
            generation: b.generation,
            last_seen: 100,
            state: CT_STATE_ESTABLISHED,
            snat: [0; 3],
        };
        let f = flows_of([(key(PROTO_TCP), val)], "established", &plan, &Timeouts::default(), 160);
        assert_eq!((f[0].backend, f[0].backend_port), (Some("198.18.5.11".parse().unwrap()), Some(8080)));
        assert_eq!((f[0].forwarding.as_deref(), f[0].service.as_str(), f[0].expire_s), (Some("nat"), "web", 840));
        let stale = FlowVal { generation: b.generation + 1, ..val };
        let f = flows_of([(key(PROTO_TCP), stale)], "established", &plan, &Timeouts::default(), 160);
        assert_eq!((f[0].backend, f[0].forwarding.as_deref()), (None, None), "another generation is another backend");
    }

    #[test]
    fn a_fullnat_flow_shows_its_snat_address_and_port() {
        let t = Timeouts::default();
        let est = FlowVal { state: CT_STATE_ESTABLISHED, last_seen: 90, ..Default::default() };
        let plan = Plan::default();
        let mut f = flows_of([(key(PROTO_TCP), est), (key(PROTO_UDP), est)], "established", &plan, &t, 100);
        f[0].snat = Some("198.18.51.3:20001".parse().unwrap());
        let text = format(&f);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].ends_with(" snat 198.18.51.3:20001"), "{text}");
        assert!(!lines[2].contains("snat"), "{text}");
        let json = serde_json::to_string(&f[0]).unwrap();
        assert!(json.contains("\"snat\":\"198.18.51.3:20001\""), "{json}");
    }

    #[test]
    fn ipv6_addresses_stay_ipv6() {
        let a: Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(ip_of(a.octets()), IpAddr::V6(a));
    }
}
