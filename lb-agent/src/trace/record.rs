//! The program's trace record (`lb_common::trace::RECORD_TAG`), parsed and named.

use std::net::IpAddr;

use lb_common::{
    stat,
    trace::{ct_step, RECORD_TAG},
    TraceRecord,
};

use super::TraceLine;
use crate::{neigh::format_mac, plan::Plan};

/// A record as the program wrote it: ids, not names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    pub proto: u8,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub tcp_flags: u8,
    pub service: u32,
    pub ct: u8,
    pub slot: u32,
    pub persist: u8,
    pub backend: u32,
    pub action: u32,
    pub counter: u32,
    pub len: u32,
}

/// Parses a record's message (`RECORD_TAG` and the record in hex); `None` for any
/// other log message.
pub fn parse_record(text: &str) -> Option<RawRecord> {
    let mut w = text.split_ascii_whitespace();
    if w.next()? != RECORD_TAG {
        return None;
    }
    let hex = w.next()?;
    let size = std::mem::size_of::<TraceRecord>();
    if hex.len() != 2 * size || w.next().is_some() {
        return None;
    }
    let mut bytes = vec![0u8; size];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    // SAFETY: `bytes` holds exactly one TraceRecord, a plain-data repr(C) struct
    // (every bit pattern valid); read unaligned.
    let r: TraceRecord = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const TraceRecord) };
    let addr = |a: [u8; 16]| IpAddr::from(a).to_canonical();
    Some(RawRecord {
        proto: r.proto,
        src: addr(r.src),
        sport: r.sport,
        dst: addr(r.dst),
        dport: r.dport,
        tcp_flags: r.tcp_flags,
        service: r.decision.service,
        ct: r.decision.ct,
        slot: r.decision.slot,
        persist: r.decision.persist,
        backend: r.decision.backend,
        action: r.action,
        counter: r.counter,
        len: r.len,
    })
}

/// The message the program writes for `r` (for tests).
#[cfg(test)]
pub fn format_record(r: &TraceRecord) -> String {
    // SAFETY: a plain-data struct viewed as its bytes.
    let bytes = unsafe { std::slice::from_raw_parts(r as *const TraceRecord as *const u8, std::mem::size_of::<TraceRecord>()) };
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{RECORD_TAG} {hex}")
}

fn flags(f: u8) -> String {
    let letters = [(0x02, 'S'), (0x10, 'A'), (0x01, 'F'), (0x04, 'R'), (0x08, 'P')];
    letters.iter().filter(|(bit, _)| f & bit != 0).map(|(_, c)| *c).collect()
}

/// Puts names on a record's ids from `plan` (the one the maps hold): the service,
/// the backend's address, MAC and state; `drained` says which backends are
/// drained at run time.
pub fn describe(r: &RawRecord, plan: &Plan, drained: &dyn Fn(&str, IpAddr) -> bool, time: f64) -> TraceLine {
    let known = |a: IpAddr| (!a.is_unspecified()).then_some(a);
    let service = plan.services.iter().find(|s| s.value.id == r.service);
    let backend = (r.backend != u32::MAX).then(|| plan.backend(r.backend)).flatten();
    let state = backend.map(|b| {
        let svc = &plan.services[b.service];
        if b.mac.is_none() {
            "unresolved"
        } else if !b.up {
            "down"
        } else if drained(&svc.name, b.address) || b.weight == 0 {
            "draining"
        } else {
            "up"
        }
        .to_string()
    });
    TraceLine {
        time,
        proto: match r.proto {
            lb_common::PROTO_TCP => "tcp".into(),
            lb_common::PROTO_UDP => "udp".into(),
            0 => String::new(),
            p => p.to_string(),
        },
        client: known(r.src),
        client_port: r.sport,
        vip: known(r.dst),
        vip_port: r.dport,
        tcp_flags: if r.proto == lb_common::PROTO_TCP { flags(r.tcp_flags) } else { String::new() },
        service: service.map(|s| s.name.clone()),
        conntrack: ct_step::NAMES.get(r.ct as usize).unwrap_or(&"?").to_string(),
        maglev_slot: (r.slot != u32::MAX).then_some(r.slot),
        persistence: r.persist != 0,
        backend: backend.map(|b| b.address),
        backend_mac: backend.and_then(|b| b.mac).map(|m| format_mac(&m)),
        backend_state: state,
        forwarding: backend.map(|b| {
            match b.forward {
                lb_common::FORWARD_IPIP => "ipip",
                lb_common::FORWARD_GUE => "gue",
                lb_common::FORWARD_NAT => "nat",
                lb_common::FORWARD_FULLNAT => "fullnat",
                _ => "dr",
            }
            .to_string()
        }),
        verdict: match r.action {
            1 => "drop",
            2 => "pass",
            3 => "tx",
            4 => "redirect",
            _ => "?",
        }
        .into(),
        outcome: stat::NAMES.get(r.counter as usize).unwrap_or(&"?").to_string(),
        bytes: r.len,
    }
}

/// `12:00:01.123456 tcp 198.51.100.7:40312 > 198.18.1.10:80 [S] web: conn_miss,
/// maglev slot 1234 -> 198.18.0.12 (02:..) up: tx forwarded, 74 bytes`
pub fn render_text(l: &TraceLine) -> String {
    let secs = l.time.rem_euclid(86400.0);
    let (h, m, s) = ((secs / 3600.0) as u32, ((secs % 3600.0) / 60.0) as u32, secs % 60.0);
    let ep = |a: Option<IpAddr>, p: u16| match a {
        Some(IpAddr::V6(v)) => format!("[{v}]:{p}"),
        Some(a) => format!("{a}:{p}"),
        None => "?".into(),
    };
    let mut out = format!("{h:02}:{m:02}:{s:09.6} {} {} > {}", l.proto, ep(l.client, l.client_port), ep(l.vip, l.vip_port));
    if !l.tcp_flags.is_empty() {
        out += &format!(" [{}]", l.tcp_flags);
    }
    match &l.service {
        Some(s) => out += &format!(" service {s}"),
        None => out += " no service",
    }
    if l.conntrack != "none" {
        out += &format!(", {}", l.conntrack);
    }
    if let Some(slot) = l.maglev_slot {
        out += &format!(", maglev slot {slot}");
    }
    if l.persistence {
        out += ", persistence";
    }
    if let Some(b) = l.backend {
        out += &format!(" -> {b}");
        if let Some(mac) = &l.backend_mac {
            out += &format!(" ({mac})");
        }
        if let Some(st) = &l.backend_state {
            out += &format!(" {st}");
        }
        if let Some(f) = l.forwarding.as_deref().filter(|f| *f != "dr") {
            out += &format!(" via {f}");
        }
    }
    out += &format!(": {} {}, {} bytes", l.verdict, l.outcome, l.bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::trace::Decision;

    #[test]
    fn records_parse_and_other_messages_do_not() {
        let rec = TraceRecord {
            src: lb_common::v4_mapped([198, 51, 100, 7]),
            dst: lb_common::v4_mapped([198, 18, 1, 10]),
            sport: 40312,
            dport: 80,
            proto: 6,
            tcp_flags: 2,
            decision: Decision { service: 0, slot: 1234, backend: 3, ct: 5, persist: 0, _pad: [0; 2] },
            action: 3,
            counter: 8,
            len: 74,
            ..Default::default()
        };
        let text = format_record(&rec);
        let r = parse_record(&text).expect("a record");
        assert_eq!(r.src, "198.51.100.7".parse::<IpAddr>().unwrap());
        assert_eq!((r.sport, r.dport, r.tcp_flags, r.ct, r.slot, r.backend, r.counter), (40312, 80, 2, 5, 1234, 3, 8));
        assert!(parse_record("lbtrace2 0011").is_none());
        assert!(parse_record("something else").is_none());
        let line = describe(&r, &Plan::default(), &|_, _| false, 0.5);
        assert_eq!((line.conntrack.as_str(), line.outcome.as_str(), line.verdict.as_str()), ("conn_miss", "forwarded", "tx"));
        assert_eq!(line.tcp_flags, "S");
        let text = render_text(&line);
        assert!(text.starts_with("00:00:00.500000 tcp 198.51.100.7:40312 > 198.18.1.10:80 [S] no service, conn_miss, maglev slot 1234: tx forwarded"), "{text}");
    }
}
