//! `lb-agent status` as a table, in the manner of `ipvsadm -Ln --rate`. Rendered
//! by the agent for the status of ten thousand services (90,000 rows): every cell
//! is written into one text, with no string per cell.

use std::{fmt::Write as _, net::IpAddr, ops::Range};

use crate::status::{BackendStatus, ServiceStatus, Status};

/// The columns between the first one and the notes.
const COLUMNS: usize = 6;

/// A row: its cells as ranges of the shared text.
struct Row {
    first: Range<usize>,
    /// Weight, Health, ActiveConn, InActConn, Pkts/s, Bytes/s.
    cells: [Range<usize>; COLUMNS],
    notes: Range<usize>,
}

/// Whether each of the `COLUMNS` is right-aligned.
const RIGHT: [bool; COLUMNS] = [true, false, true, true, true, true];

/// Rows written into one text.
struct Rows {
    text: String,
    rows: Vec<Row>,
}

impl Rows {
    /// Appends what `f` writes to the text; its range.
    fn cell(&mut self, f: impl FnOnce(&mut String)) -> Range<usize> {
        let start = self.text.len();
        f(&mut self.text);
        start..self.text.len()
    }

    fn width(&self, r: &Range<usize>) -> usize {
        let s = &self.text[r.clone()];
        if s.is_ascii() { s.len() } else { s.chars().count() }
    }
}

/// A table in the manner of `ipvsadm -Ln --rate`:
///
/// ```text
/// lb-agent on eth0 (native XDP), up 1h 2m 3s, reloads 2 ok, 0 failed, config /etc/lb/lb.yaml
/// Prot LocalAddress:Port Scheduler (Name)  Weight  Health  ActiveConn  InActConn  Pkts/s  Bytes/s
///   -> RemoteAddress:Port
/// TCP  198.18.1.10:80 maglev (web)                                  13          4    1.5K     1.2M
///   -> 198.18.0.11:80                           1  up              12          3    1.2K   980.0K
///   -> 198.18.0.12:80                           0  up               1          1     300   240.0K  drained (file: 3)
/// ```
///
/// Ports show as `*` for "any port" services, IPv6 addresses in brackets.
/// ActiveConn and InActConn are `ipvsadm`'s: established TCP connections and the
/// other live flows, from the connection table (see `conntrack.rs`); the service
/// line sums its backends'. Rates use K/M/G (powers of 1000). Notes after
/// the numbers: `backup`, `drained (file: W)`, `weight W in file` when the weight in
/// force differs from the file for another reason, and on a service line
/// `backups serving`.
pub fn render_table(status: &Status) -> String {
    let mut out = String::new();
    let mode = if status.attach_mode.is_empty() { "unknown" } else { &status.attach_mode };
    let _ = write!(
        out,
        "lb-agent on {} ({} XDP), up {}, reloads {} ok, {} failed",
        if status.iface.is_empty() { "?" } else { &status.iface },
        mode,
        human_duration(status.uptime_secs),
        status.reloads_ok,
        status.reloads_failed
    );
    if !status.config_path.is_empty() {
        let _ = write!(out, ", config {}", status.config_path);
    }
    out.push('\n');
    if let Some(a) = &status.announce {
        let vips: Vec<String> = a.vips.iter().map(|v| v.to_string()).collect();
        let vips = if vips.is_empty() { "nothing (no VIP has a usable backend)".to_string() } else { vips.join(", ") };
        let _ = writeln!(out, "announcing in routing table {}: {vips}", a.table);
    }

    let backends: usize = status.services.iter().map(|s| s.backends.len()).sum();
    let n = 1 + status.services.len() + backends;
    let mut rows = Rows { text: String::with_capacity(n * 48), rows: Vec::with_capacity(n) };
    let header = ["Weight", "Health", "ActiveConn", "InActConn", "Pkts/s", "Bytes/s"];
    let first = rows.cell(|t| t.push_str("Prot LocalAddress:Port Scheduler (Name)"));
    let cells = header.map(|h| rows.cell(|t| t.push_str(h)));
    let notes = rows.cell(|_| {});
    rows.rows.push(Row { first, cells, notes });
    for s in &status.services {
        service_row(&mut rows, s);
        for b in &s.backends {
            backend_row(&mut rows, s, b);
        }
    }

    let mut w_first = "  -> RemoteAddress:Port".len();
    let mut widths = [0; COLUMNS];
    for r in &rows.rows {
        w_first = w_first.max(rows.width(&r.first));
        for (w, c) in widths.iter_mut().zip(&r.cells) {
            *w = (*w).max(rows.width(c));
        }
    }
    out.reserve(rows.rows.len() * (w_first + widths.iter().sum::<usize>() + 2 * COLUMNS + 1) + rows.text.len() / 4);
    let pad = |out: &mut String, n: usize| out.extend(std::iter::repeat_n(' ', n));
    for (i, r) in rows.rows.iter().enumerate() {
        let start = out.len();
        out.push_str(&rows.text[r.first.clone()]);
        pad(&mut out, w_first - rows.width(&r.first));
        for ((c, w), right) in r.cells.iter().zip(widths).zip(RIGHT) {
            out.push_str("  ");
            let gap = w - rows.width(c);
            if right {
                pad(&mut out, gap);
            }
            out.push_str(&rows.text[c.clone()]);
            if !right {
                pad(&mut out, gap);
            }
        }
        if !r.notes.is_empty() {
            out.push_str("  ");
            out.push_str(&rows.text[r.notes.clone()]);
        }
        let kept = out[start..].trim_end().len();
        out.truncate(start + kept);
        out.push('\n');
        if i == 0 {
            out.push_str("  -> RemoteAddress:Port\n");
        }
    }
    if status.services.is_empty() {
        out.push_str("(no services)\n");
    }

    let ct = &status.conntrack;
    if ct.new_capacity > 0 {
        let protected = if ct.established_capacity == 0 {
            "established table off".to_string()
        } else {
            format!(
                "established {}/{} ({} closing), expired {}; SYN filter {}",
                ct.established + ct.closing,
                ct.established_capacity,
                ct.closing,
                ct.expired_total,
                if ct.syn_filter { "on" } else { "off" }
            )
        };
        let _ = writeln!(out, "conntrack: new-flow LRU {} entries; {protected}", ct.new_capacity);
    }
    let outcomes: Vec<String> = status.outcomes.iter().filter(|(_, v)| *v != 0).map(|(k, v)| format!("{k}={v}")).collect();
    if !outcomes.is_empty() {
        let _ = writeln!(out, "outcomes: {}", outcomes.join(" "));
    }
    out
}

fn service_row(rows: &mut Rows, s: &ServiceStatus) {
    let first = rows.cell(|t| {
        let start = t.len();
        if s.protocol.is_empty() {
            t.push('?');
        } else {
            t.extend(s.protocol.chars().flat_map(char::to_uppercase));
        }
        let len = t[start..].chars().count();
        t.extend(std::iter::repeat_n(' ', 4usize.saturating_sub(len) + 1));
        let at = t.len();
        write_endpoint(t, s.vip, s.port);
        if let (Some(len), Some(pos)) = (s.vip_prefix, t[at..].rfind(':')) {
            // A prefix service: `198.18.50.0/24:80`, `[2001:db8:100::/56]:80`.
            let pos = at + pos;
            let pos = if t[..pos].ends_with(']') { pos - 1 } else { pos };
            t.insert_str(pos, &format!("/{len}"));
        }
        if !s.scheduler.is_empty() {
            t.push(' ');
            t.push_str(&s.scheduler);
        }
        if !s.name.is_empty() {
            let _ = write!(t, " ({})", s.name);
        }
    });
    let active: u64 = s.backends.iter().map(|b| u64::from(b.active_conns)).sum();
    let inactive: u64 = s.backends.iter().map(|b| u64::from(b.inactive_conns)).sum();
    let cells = [
        rows.cell(|_| {}),
        rows.cell(|_| {}),
        rows.cell(|t| write_int(t, active)),
        rows.cell(|t| write_int(t, inactive)),
        rows.cell(|t| write_rate(t, s.packets_per_sec)),
        rows.cell(|t| write_rate(t, s.bytes_per_sec)),
    ];
    let notes = rows.cell(|t| {
        let mut sep = Notes { start: t.len(), text: t };
        if !s.forwarding.is_empty() && s.forwarding != "dr" {
            let _ = write!(sep.next(), "forwarding {}", s.forwarding);
        }
        if s.using_backups {
            sep.next().push_str("backups serving");
        }
    });
    rows.rows.push(Row { first, cells, notes });
}

fn backend_row(rows: &mut Rows, s: &ServiceStatus, b: &BackendStatus) {
    let first = rows.cell(|t| {
        t.push_str("  -> ");
        write_endpoint(t, b.address, s.port);
    });
    let cells = [
        rows.cell(|t| write_int(t, u64::from(b.weight))),
        rows.cell(|t| t.push_str(if b.health.is_empty() { "?" } else { &b.health })),
        rows.cell(|t| write_int(t, u64::from(b.active_conns))),
        rows.cell(|t| write_int(t, u64::from(b.inactive_conns))),
        rows.cell(|t| write_rate(t, b.packets_per_sec)),
        rows.cell(|t| write_rate(t, b.bytes_per_sec)),
    ];
    let notes = rows.cell(|t| {
        let mut sep = Notes { start: t.len(), text: t };
        if b.backup {
            sep.next().push_str("backup");
        }
        if b.drained {
            let _ = write!(sep.next(), "drained (file: {})", b.config_weight);
        } else if b.weight != b.config_weight {
            let _ = write!(sep.next(), "weight {} in file", b.config_weight);
        }
    });
    rows.rows.push(Row { first, cells, notes });
}

/// Notes written one after the other into `text` from `start`, `, ` between them.
struct Notes<'a> {
    text: &'a mut String,
    start: usize,
}

impl Notes<'_> {
    /// The text, ready for the next note.
    fn next(&mut self) -> &mut String {
        if self.text.len() > self.start {
            self.text.push_str(", ");
        }
        self.text
    }
}

fn write_int(t: &mut String, v: u64) {
    let _ = write!(t, "{v}");
}

/// `198.18.1.10:80`, `[2001:db8::10]:80`, `198.18.1.10:*` for port 0 (any port),
/// `-` for a missing address.
fn write_endpoint(t: &mut String, address: Option<IpAddr>, port: u16) {
    let _ = match address {
        Some(IpAddr::V4(a)) => write!(t, "{a}:"),
        Some(IpAddr::V6(a)) => write!(t, "[{a}]:"),
        None => write!(t, "-:"),
    };
    if port == 0 {
        t.push('*');
    } else {
        write_int(t, u64::from(port));
    }
}

/// `950`, `1.2K`, `45.0M`, `3.1G` (powers of 1000, one decimal above 1000).
#[cfg(test)]
pub fn human_rate(v: f64) -> String {
    let mut t = String::new();
    write_rate(&mut t, v);
    t
}

/// Appends `human_rate(v)`.
fn write_rate(t: &mut String, v: f64) {
    if !v.is_finite() || v < 0.0 {
        return t.push('-');
    }
    if v.round() < 1000.0 {
        return write_int(t, v.round() as u64);
    }
    let mut scaled = v;
    for unit in ["K", "M", "G", "T"] {
        scaled /= 1000.0;
        if (scaled * 10.0).round() / 10.0 < 1000.0 || unit == "T" {
            let _ = write!(t, "{scaled:.1}{unit}");
            return;
        }
    }
}

/// `42s`, `5m 3s`, `2h 0m 7s`, `3d 4h 5m`.
pub fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m"),
    }
}
