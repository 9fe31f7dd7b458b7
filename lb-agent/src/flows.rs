//! `lb-agent flows`: the live connection table, like `ipvsadm -Lnc`, read from the
//! maps a running agent pinned (`CT_ESTABLISHED`, `CONNTRACK`; the services and
//! backends from `SERVICES` and `BACKENDS`). One line per flow: protocol, seconds
//! until it expires if idle, state, client, the virtual service, the backend (with
//! the port a `nat` flow goes to), the forwarding mode and the service.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};
use lb_common::{map_names as names, FlowKey, FlowVal, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, PROTO_TCP, PROTO_UDP};
use serde::{Deserialize, Serialize};

use crate::{
    config::{self, Timeouts},
    conntrack::{expired, now_s, timeout_of},
    dataplane,
    plan::Plan,
    report::name_services,
};

/// One flow of the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRow {
    /// `tcp` or `udp`.
    pub proto: String,
    /// Seconds until the entry expires if no packet comes (`None` in `CONNTRACK`,
    /// the LRU table of flows seen once, which evicts rather than expires).
    pub expire_s: Option<u64>,
    /// `new` (seen once), `established`, `closing` (FIN or RST seen).
    pub state: String,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    /// The backend and the port its packets go to (`nat`: the backend's port; the
    /// other modes keep the client's destination port).
    pub backend: Option<SocketAddr>,
    /// `dr`, `ipip`, `gue` or `nat` (the backend's).
    pub forwarding: Option<String>,
    /// The service's name (with `--config`), else its protocol and vip:port.
    pub service: String,
}

fn addr(a: &[u8; 16]) -> IpAddr {
    if a[..12] == lb_common::v4_mapped([0; 4])[..12] {
        IpAddr::from([a[12], a[13], a[14], a[15]])
    } else {
        IpAddr::from(*a)
    }
}

fn mode(forward: u8) -> &'static str {
    match forward {
        lb_common::FORWARD_IPIP => "ipip",
        lb_common::FORWARD_GUE => "gue",
        lb_common::FORWARD_NAT => "nat",
        _ => "dr",
    }
}

/// The row of one entry, `established` when it comes from `CT_ESTABLISHED`.
pub fn row(plan: &Plan, key: &FlowKey, val: &FlowVal, established: bool, now: u32, t: &Timeouts) -> FlowRow {
    let proto = match key.proto {
        PROTO_TCP => "tcp".to_string(),
        PROTO_UDP => "udp".to_string(),
        p => p.to_string(),
    };
    let vip = SocketAddr::new(addr(&key.dst), key.dport);
    let backend = plan.backends.iter().find(|b| b.id == val.backend_id && b.generation == val.generation);
    let service = plan.services.iter().find(|s| s.value.id == val.service_id).map_or_else(
        || format!("{proto} {vip}"),
        |s| if s.name.is_empty() { format!("{} {}", s.protocol, SocketAddr::new(s.vip, s.port)) } else { s.name.clone() },
    );
    let state = match (established, val.state) {
        (false, _) => "new",
        (true, CT_STATE_CLOSING) => "closing",
        (true, CT_STATE_ESTABLISHED) => "established",
        (true, _) => "new",
    };
    let expire_s = established.then(|| {
        let timeout = timeout_of(key, val, t).as_secs();
        timeout.saturating_sub(u64::from(now.wrapping_sub(val.last_seen)))
    });
    FlowRow {
        proto,
        expire_s,
        state: state.to_string(),
        client: SocketAddr::new(addr(&key.src), key.sport),
        vip,
        backend: backend.map(|b| {
            let port = if b.forward == lb_common::FORWARD_NAT && b.port != 0 { b.port } else { key.dport };
            SocketAddr::new(b.address, port)
        }),
        forwarding: backend.map(|b| mode(b.forward).to_string()),
        service,
    }
}

/// The table as `ipvsadm -Lnc` prints it (expiry as mm:ss).
pub fn format(rows: &[FlowRow]) -> String {
    let mut out = format!("{:<4} {:<6} {:<12} {:<45} {:<45} {:<45} {:<5} {}\n", "pro", "expire", "state", "client", "virtual", "backend", "mode", "service");
    for r in rows {
        let expire = r.expire_s.map_or("-".to_string(), |s| format!("{:02}:{:02}", s / 60, s % 60));
        let backend = r.backend.map_or("-".to_string(), |b| b.to_string());
        let mode = r.forwarding.as_deref().unwrap_or("-");
        out += &format!(
            "{:<4} {:<6} {:<12} {:<45} {:<45} {:<45} {:<5} {}\n",
            r.proto.to_uppercase(),
            expire,
            r.state,
            r.client.to_string(),
            r.vip.to_string(),
            backend,
            mode,
            r.service
        );
    }
    out
}

fn table(pin_dir: &Path, name: &'static str, lru: bool) -> Result<HashMap<MapData, FlowKey, FlowVal>> {
    let data = MapData::from_pin(pin_dir.join(name)).with_context(|| format!("opening the pinned {name}"))?;
    let map = if lru { Map::LruHashMap(data) } else { Map::HashMap(data) };
    HashMap::try_from(map).with_context(|| format!("{name} is not a flow table"))
}

/// Prints the flows of the agent whose maps are pinned under `pin_dir` (only
/// `service`'s, by name or `proto vip:port`, when given).
pub fn print_flows(config_path: Option<&Path>, pin_dir: &Path, service: Option<&str>, json: bool) -> Result<()> {
    let reading = || format!("reading the maps pinned under {} (is the agent running?)", pin_dir.display());
    let mut plan = dataplane::read_pinned_plan(pin_dir).with_context(reading)?;
    let cfg = config_path.map(config::load).transpose().map_err(|e| anyhow::anyhow!("{e}"))?;
    name_services(&mut plan, cfg.as_ref());
    let t = cfg.as_ref().map(|c| c.timeouts).unwrap_or_default();
    let now = now_s();
    let mut rows = Vec::new();
    for (name, established) in [(names::CT_ESTABLISHED, true), (names::CONNTRACK, false)] {
        let m = table(pin_dir, name, !established).with_context(reading)?;
        for (key, val) in m.iter().filter_map(Result::ok) {
            if established && expired(now, val.last_seen, timeout_of(&key, &val, &t)) {
                continue;
            }
            rows.push(row(&plan, &key, &val, established, now, &t));
        }
    }
    rows.retain(|r| service.is_none_or(|s| r.service == s));
    rows.sort_by(|a, b| (&a.service, a.client).cmp(&(&b.service, b.client)));
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", format(&rows));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_nat_flow_shows_its_backend_port() {
        let cfg = config::parse(
            "services:\n  - { name: web, vip: 198.18.1.10, port: 80, forwarding: nat, backends: [{ address: 198.18.5.11, port: 8080 }] }\n",
            "t.yaml",
        )
        .expect("config");
        let macs: BTreeMap<IpAddr, [u8; 6]> = [("198.18.5.11".parse().unwrap(), [2, 0, 0, 0, 0, 1])].into();
        let plan = Plan::build(&cfg, &macs);
        let b = &plan.backends[0];
        let key = FlowKey {
            src: lb_common::v4_mapped([198, 18, 50, 2]),
            dst: lb_common::v4_mapped([198, 18, 1, 10]),
            sport: 40000,
            dport: 80,
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        let val = FlowVal {
            backend_id: b.id,
            service_id: plan.services[0].value.id,
            generation: b.generation,
            last_seen: 100,
            state: CT_STATE_ESTABLISHED,
            _pad: [0; 3],
        };
        let r = row(&plan, &key, &val, true, 160, &Timeouts::default());
        assert_eq!(r.backend, Some("198.18.5.11:8080".parse().unwrap()));
        assert_eq!((r.state.as_str(), r.expire_s, r.forwarding.as_deref()), ("established", Some(840), Some("nat")));
        assert_eq!((r.client, r.vip), ("198.18.50.2:40000".parse().unwrap(), "198.18.1.10:80".parse().unwrap()));
        let text = format(&[r]);
        assert!(text.lines().nth(1).is_some_and(|l| l.starts_with("TCP  14:00  established")), "{text}");
    }
}
