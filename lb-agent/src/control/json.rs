//! The client's side of a large status: decoded without serde's buffering of
//! internally tagged enums, and for `--json` not decoded at all but re-indented as
//! it came (the status of 10,000 services is some 30 MB of JSON).

use std::io::{self, Write};

use super::Response;
use crate::status::Status;

/// How an agent's status answer begins (`Response::Status`, tag first).
const STATUS_TAG: &str = "{\"result\":\"status\",";

/// Decodes one answer line; a status straight into `Status` (its fields follow the
/// tag, which `Status` ignores as an unknown field).
pub(super) fn decode(line: &str) -> serde_json::Result<Response> {
    if line.starts_with(STATUS_TAG) {
        return serde_json::from_str::<Status>(line).map(Response::Status);
    }
    serde_json::from_str(line)
}

/// Writes the status in an answer line to `w` as pretty JSON (as
/// `serde_json::to_string_pretty` prints a `Status`) and a newline; `None` when the
/// line is not a status.
pub(super) fn write_status_pretty(line: &str, w: &mut impl Write) -> Option<io::Result<()>> {
    let body = line.strip_prefix(STATUS_TAG)?;
    // The tag's `{` opens the status: the body continues at depth 1.
    let mut out = Vec::with_capacity(FLUSH_AT + (1 << 16));
    out.extend_from_slice(b"{\n  ");
    Some(pretty_run(body.as_bytes(), 1, &mut out, w).and_then(|()| {
        out.push(b'\n');
        w.write_all(&out)
    }))
}

/// Re-indents compact JSON with two spaces per level, `": "` after keys and empty
/// arrays and objects kept on one line: serde_json's pretty format.
#[cfg(test)]
fn pretty(compact: &str) -> String {
    let mut out = Vec::with_capacity(compact.len() * 2);
    let mut sink = Vec::new();
    let _ = pretty_run(compact.as_bytes(), 0, &mut out, &mut sink);
    sink.append(&mut out);
    // Only whole UTF-8 sequences were copied (strings as they were, the rest ASCII).
    String::from_utf8(sink).unwrap_or_default()
}

/// Output is handed to the writer in pieces of about this size (a large status is
/// never held twice).
const FLUSH_AT: usize = 1 << 20;

/// The re-indenting loop over `bytes`, starting at `depth`, through `out` into `w`.
fn pretty_run(bytes: &[u8], mut depth: usize, out: &mut Vec<u8>, w: &mut impl Write) -> io::Result<()> {
    let newline = |out: &mut Vec<u8>, depth: usize| {
        out.push(b'\n');
        out.resize(out.len() + 2 * depth, b' ');
    };
    let special = |b: &u8| matches!(b, b'"' | b'{' | b'[' | b'}' | b']' | b',' | b':' | b' ' | b'\n' | b'\t' | b'\r');
    let mut i = 0;
    while i < bytes.len() {
        if out.len() >= FLUSH_AT {
            w.write_all(out)?;
            out.clear();
        }
        let c = bytes[i];
        match c {
            b'"' => {
                // Copy the string, escapes and all, in runs up to the next quote or
                // backslash.
                let start = i;
                i += 1;
                while let Some(n) = bytes[i..].iter().position(|b| matches!(b, b'"' | b'\\')) {
                    i += n;
                    if bytes[i] == b'"' {
                        break;
                    }
                    i += 2;
                }
                i = i.min(bytes.len() - 1);
                out.extend_from_slice(&bytes[start..=i]);
            }
            b'{' | b'[' => {
                let close = if c == b'{' { b'}' } else { b']' };
                if bytes.get(i + 1) == Some(&close) {
                    out.extend_from_slice(&[c, close]);
                    i += 1;
                } else {
                    out.push(c);
                    depth += 1;
                    newline(out, depth);
                }
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                newline(out, depth);
                out.push(c);
            }
            b',' => {
                out.push(c);
                newline(out, depth);
            }
            b':' => out.extend_from_slice(b": "),
            b' ' | b'\n' | b'\t' | b'\r' => {}
            _ => {
                // A number, `true`, `false` or `null`: copied as one run.
                let n = bytes[i..].iter().position(special).unwrap_or(bytes.len() - i);
                out.extend_from_slice(&bytes[i..i + n]);
                i += n;
                continue;
            }
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{BackendStatus, ServiceStatus};

    #[test]
    fn pretty_is_serde_jsons_pretty_format() {
        let status = Status {
            iface: "eth0 \"x\" \\ é".into(),
            outcomes: vec![("tx".into(), 3)],
            services: vec![ServiceStatus {
                name: "web,{:}[]\\".into(),
                vip: Some("2001:db8::1".parse().unwrap()),
                packets_per_sec: 1.5e-7,
                backends: vec![BackendStatus { address: Some("198.18.0.11".parse().unwrap()), ..Default::default() }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let line = serde_json::to_string(&Response::Status(status.clone())).unwrap();
        let mut printed = Vec::new();
        write_status_pretty(&line, &mut printed).unwrap().unwrap();
        assert_eq!(String::from_utf8(printed).unwrap(), serde_json::to_string_pretty(&status).unwrap() + "\n");
        assert_eq!(pretty(&serde_json::to_string(&status).unwrap()), serde_json::to_string_pretty(&status).unwrap());
        assert_eq!(decode(&line).unwrap(), Response::Status(status));
        let done = serde_json::to_string(&Response::Done { message: "ok".into() }).unwrap();
        assert!(write_status_pretty(&done, &mut Vec::new()).is_none());
        assert_eq!(decode(&done).unwrap(), Response::Done { message: "ok".into() });
    }
}
