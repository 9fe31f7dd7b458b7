//! The map sizes read off a configuration's text by a quick scan, before it is
//! parsed: a fresh start creates the maps and verifies the programs with them while
//! the file is parsed and validated (`run`). The full parse decides: when its sizes
//! (`Sizes::of_config`) differ from the scan's, the maps are created again.
//!
//! Only a plain block-style file is scanned (`config::split_services`: no anchors,
//! tabs or flow-style services list); within it, anything the scan does not read
//! for certain (a flow-style service or `backends` list, a number that is not plain
//! digits, `fragments` in flow style) gives up: `None`, and the maps are created
//! after the parse as before.

use super::Sizes;
use crate::config::{default_table_size, split_services, Fragments, DEFAULT_CONNTRACK_SIZE};

/// A line's indentation and its content (`None` for blank and comment lines).
fn content(line: &str) -> Option<(usize, &str)> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    let rest = line[indent..].trim_end();
    (!rest.is_empty() && !rest.starts_with('#')).then_some((indent, rest))
}

/// `key: value` with its value (comment and quotes removed); `None` if `rest` is
/// not that key.
fn value<'a>(rest: &'a str, key: &str) -> Option<&'a str> {
    let v = rest.strip_prefix(key)?.strip_prefix(':')?;
    if !(v.is_empty() || v.starts_with(' ')) {
        return None;
    }
    let v = v.split(" #").next().unwrap_or("").trim();
    let unquoted = v.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
    Some(unquoted.or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\''))).unwrap_or(v))
}

/// A plain decimal number (what a YAML integer usually is); anything else is unsure.
fn number(v: &str) -> Option<u32> {
    (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())).then(|| v.parse().ok())?
}

/// What the scan reads of one service: (backends, table_size, prefix, nat).
fn service(item: &str) -> Option<(u32, u32, bool, bool)> {
    let mut lines = item.lines().filter_map(content);
    let (dash, line) = lines.next()?;
    let first = line.strip_prefix("- ")?.trim_start_matches(' ');
    if first.starts_with(['{', '[', '"', '\'', '?', '|', '>', '!', '&', '-']) {
        return None;
    }
    // The service's keys: the first after the `- `, the others below it.
    let keys = dash + line.len() - first.len();
    let (mut backends, mut table_size, mut prefix, mut nat) = (0u32, None, false, false);
    // While in `backends`: the items' indentation, once seen.
    let mut in_backends: Option<Option<usize>> = None;
    for (indent, rest) in std::iter::once((keys, first)).chain(lines) {
        if indent > keys {
            match in_backends {
                Some(None) if rest.starts_with("- ") || rest == "-" => in_backends = Some(Some(indent)),
                Some(None) => return None,
                _ => {}
            }
            if in_backends == Some(Some(indent)) && (rest.starts_with("- ") || rest == "-") {
                backends += 1;
            }
            continue;
        }
        if indent < keys || rest.starts_with('-') {
            return None;
        }
        if in_backends == Some(None) {
            return None; // `backends:` with nothing below it at a deeper indentation
        }
        in_backends = None;
        if let Some(v) = value(rest, "backends") {
            match v {
                "" => in_backends = Some(None),
                "[]" => {}
                _ => return None,
            }
        } else if let Some(v) = value(rest, "table_size") {
            table_size = Some(number(v)?);
        } else if let Some(v) = value(rest, "vip") {
            prefix = v.contains('/');
        } else if let Some(v) = value(rest, "forwarding") {
            nat = matches!(v, "nat" | "fullnat");
        } else if !rest.contains(':') {
            return None;
        }
    }
    if in_backends == Some(None) {
        return None;
    }
    Some((backends, table_size.unwrap_or_else(|| default_table_size(backends as usize)), prefix, nat))
}

impl Sizes {
    /// The sizes `Sizes::of_config` gives `text`'s configuration, read by a quick
    /// scan of a plain file (see the module documentation); `None` when unsure.
    /// Not a validation: an invalid file may be scanned, its parse then fails.
    pub fn scan(text: &str) -> Option<Sizes> {
        let (before, items, after) = split_services(text)?;
        let (mut conntrack, mut established, mut frags) = (DEFAULT_CONNTRACK_SIZE, None, Fragments::default().size);
        let mut lines = before.lines().chain(after.lines()).filter_map(content).peekable();
        while let Some((indent, rest)) = lines.next() {
            if indent > 0 {
                continue;
            }
            if let Some(v) = value(rest, "conntrack_size") {
                conntrack = number(v)?;
            } else if let Some(v) = value(rest, "established_size") {
                established = Some(number(v)?);
            } else if let Some(v) = value(rest, "fragments") {
                if !v.is_empty() {
                    return None;
                }
                while let Some((_, rest)) = lines.next_if(|(indent, _)| *indent > 0) {
                    if let Some(v) = value(rest, "size") {
                        frags = number(v)?;
                    }
                }
            }
        }
        let mut sizes = Sizes {
            services: items.len() as u32,
            backends: 0,
            tables: 0,
            conntrack,
            established: established.unwrap_or(conntrack),
            frags,
            prefix: false,
            nat: false,
        };
        for item in items {
            let (backends, table_size, prefix, nat) = service(item)?;
            sizes.backends += backends;
            sizes.tables += u64::from(table_size);
            sizes.prefix |= prefix;
            sizes.nat |= nat;
        }
        Some(sizes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Sizes {
        Sizes::of_config(&crate::config::parse(text, "t").unwrap_or_else(|e| panic!("{text}: {e}")))
    }

    /// Wherever the scan reads sizes, they are the parse's.
    #[test]
    fn the_scan_reads_the_parses_sizes() {
        let texts = [
            // As lb-bench writes it.
            "# variant 0\nservices:\n  - name: svc0\n    vip: 198.19.0.1\n    port: 80\n    backends:\n      - address: \"198.18.16.10\"\n        weight: 1\n      - address: \"198.18.16.23\"\n        weight: 2\n  - name: svc1\n    vip: 198.19.0.2\n    port: 80\n    backends:\n      - address: \"198.18.16.17\"\n        weight: 1\n",
            "conntrack_size: 5000   # small\nestablished_size: 0\nfragments:\n  size: 700\n  timeout: 3s\nservices:
  - name: a
    vip: '198.18.1.0/24'
    port: 80
    table_size: 4099
    probe:
      kind: tcp
    backends:
      - { address: 198.18.0.11 }
      -   address: 198.18.0.12

        # a comment
      - address: 198.18.0.13
        probe:
          kind: none
  - vip: \"2001:db8::1\"
    name: b
    port: 53
    protocol: udp
    backends:   # one
      - address: \"2001:db8::11\"
answer_ping: false
",
            "snat_addresses:\n- 198.18.0.2\nestablished_size: 3000\nservices:
  - name: a
    vip: 198.18.2.1
    port: 80
    forwarding: fullnat
    backends:
      - address: 198.18.0.12
        port: 8080
  - name: b
    vip: 198.18.2.2
    port: 80
    forwarding: \"nat\"
    table_size: 251
    backends:
      - address: 198.18.0.13
        port: 8080
      - address: 198.18.0.14
        port: 8080
",
        ];
        for text in texts {
            assert_eq!(Sizes::scan(text), Some(parsed(text)), "{text}");
        }
    }

    /// What the scan does not read for certain, it leaves to the parse.
    #[test]
    fn the_scan_gives_up_where_unsure() {
        let service = "  - name: a\n    vip: 198.18.1.1\n    port: 80\n";
        let unsure = [
            format!("services:\n  - {{ name: a, vip: 198.18.1.1, port: 80, backends: [{{address: 198.18.0.11}}] }}\n"),
            format!("services:\n{service}    backends: [{{address: 198.18.0.11}}]\n"),
            format!("services:\n{service}    backends:\n    - address: 198.18.0.11\n"),
            format!("services:\n{service}    table_size: 0x1003\n    backends:\n      - address: 198.18.0.11\n"),
            format!("conntrack_size: 1_000\nservices:\n{service}"),
            format!("fragments: {{ size: 700 }}\nservices:\n{service}"),
            format!("services: [{{ name: a, vip: 198.18.1.1, port: 80 }}]\n"),
            format!("base: &b {{ address: 198.18.0.11 }}\nservices:\n{service}    backends:\n      - *b\n"),
        ];
        for text in unsure {
            assert_eq!(Sizes::scan(&text), None, "{text}");
        }
    }
}

#[cfg(test)]
mod examples {
    use super::*;

    /// The shipped examples and a file of 1,000 services x 32 backends (as lb-bench
    /// writes it) are scanned, to the parse's sizes.
    #[test]
    fn the_examples_scan_to_their_sizes() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        let mut texts: Vec<String> = ["demo.yaml", "full.yaml"]
            .iter()
            .map(|f| std::fs::read_to_string(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}")))
            .collect();
        let mut big = String::from("services:\n");
        for s in 0..1000 {
            big += &format!("  - name: svc{s}\n    vip: 198.19.{}.{}\n    port: 80\n    backends:\n", s / 250, s % 250 + 1);
            for b in 0..32 {
                big += &format!("      - address: \"198.18.{}.{}\"\n        weight: 1\n", 16 + b, s % 200 + 10);
            }
        }
        texts.push(big);
        for text in &texts {
            let scanned = Sizes::scan(text).unwrap_or_else(|| panic!("not scanned:\n{}", &text[..text.len().min(2000)]));
            let config = crate::config::parse(text, "t").expect("valid");
            assert_eq!(scanned, Sizes::of_config(&config));
        }
    }
}
