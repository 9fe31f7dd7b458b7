//! A large status on the control socket (the status of 10,000 services is some
//! 25 MB of JSON): the agent encodes it from where it keeps it, with no copy, and
//! renders what `lb-agent status` prints itself (`StatusText`); a client decodes
//! a `Status` answer without serde's buffering of internally tagged enums, and for
//! `--json` from an older agent does not decode it at all but re-indents it as it
//! came.

use std::io::{self, Write};

use super::Response;
use crate::status::{Status, StatusFilter};

/// How an agent's status answer begins (`Response::Status`, tag first).
const STATUS_TAG: &str = "{\"result\":\"status\",";

/// The answer line of `status` (as `Response::Status` encodes it), newline
/// included, encoded from a borrowed status: ten thousand services are not
/// copied to be answered.
pub fn encode_status(status: &Status) -> Response {
    #[derive(serde::Serialize)]
    #[serde(tag = "result", rename_all = "snake_case")]
    enum Line<'a> {
        Status(&'a Status),
    }
    let mut out = Vec::with_capacity(estimate(status));
    // Status holds only strings, numbers, addresses and vectors: encoding cannot
    // fail (NaN rates become null).
    serde_json::to_writer(&mut out, &Line::Status(status)).expect("Status encodes as JSON");
    out.push(b'\n');
    Response::Encoded { line: out, body: Vec::new() }
}

/// The answer to `StatusText`: what `lb-agent status` prints for the services
/// `filter` selects in `status` (the table, or pretty JSON with `json`), as a
/// `Text` answer; an error when the filter names a service that does not exist.
pub fn status_text(status: &Status, filter: &StatusFilter, json: bool) -> Response {
    if let Some(missing) = filter.services.iter().find(|n| !status.services.iter().any(|s| s.name == **n)) {
        return Response::Error { message: format!("no service named {missing}") };
    }
    let selected;
    let status = if *filter == StatusFilter::default() {
        status
    } else {
        selected = filter.select(status);
        &selected
    };
    let mut body = if json {
        let mut out = Vec::with_capacity(2 * estimate(status));
        let mut ser = serde_json::Serializer::with_formatter(&mut out, Pretty::default());
        serde::Serialize::serialize(status, &mut ser).expect("Status encodes as JSON");
        out
    } else {
        super::render_table(status).into_bytes()
    };
    body.push(b'\n');
    let mut line = serde_json::to_vec(&Response::Text { bytes: body.len() as u64 }).expect("a length encodes");
    line.push(b'\n');
    Response::Encoded { line, body }
}

/// serde_json's `PrettyFormatter` (two spaces per level), with each line break and
/// its indentation written at once rather than a write per level.
#[derive(Default)]
struct Pretty {
    depth: usize,
    has_value: bool,
}

impl Pretty {
    /// `,` (unless `first`), a newline and the indentation of the current depth.
    fn line<W: ?Sized + Write>(&self, w: &mut W, first: bool) -> io::Result<()> {
        const BREAK: &[u8; 2 + 2 * 16] = b",\n                                ";
        let from = usize::from(first);
        if self.depth <= 16 {
            return w.write_all(&BREAK[from..2 + 2 * self.depth]);
        }
        w.write_all(&BREAK[from..2])?;
        (0..self.depth).try_for_each(|_| w.write_all(b"  "))
    }

    fn open<W: ?Sized + Write>(&mut self, w: &mut W, c: &[u8]) -> io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        w.write_all(c)
    }

    fn close<W: ?Sized + Write>(&mut self, w: &mut W, c: &[u8]) -> io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.line(w, true)?;
        }
        w.write_all(c)
    }
}

impl serde_json::ser::Formatter for Pretty {
    fn begin_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"[")
    }

    fn end_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"]")
    }

    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.line(w, first)
    }

    fn end_array_value<W: ?Sized + Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn begin_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"{")
    }

    fn end_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"}")
    }

    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.line(w, first)
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn end_object_value<W: ?Sized + Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

/// About how many bytes `status` takes as compact JSON, so buffers seldom grow.
fn estimate(status: &Status) -> usize {
    let backends: usize = status.services.iter().map(|s| s.backends.len()).sum();
    4096 + 400 * status.services.len() + 300 * backends
}

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
        let encoded = Response::Encoded { line: format!("{line}\n").into_bytes(), body: vec![] };
        assert_eq!(encode_status(&status), encoded);
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
