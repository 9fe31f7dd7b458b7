//! Parsing again only the services whose text changed, for reloads of a large file
//! in which one service was edited: the rest is taken from the configuration in
//! force, which was validated from the same text.
//!
//! Only a plain block-style file qualifies: `services:` at column 0 followed by its
//! items, each starting with `- ` at one indentation above 0, no anchors or aliases
//! (no `&` or `*` anywhere), no tabs, no document markers, and at most
//! [`MAX_BYTES`] (so that, without aliases, the node limit cannot be reached). The
//! text outside the services list must be unchanged. Each changed item is parsed
//! and validated with that text around it, then names and (vip, port, protocol) are
//! checked across all services, the only checks that span services. Anything else,
//! and any error, returns `None`: the caller parses the whole file, which reports
//! errors with their positions.

use std::collections::{HashMap, HashSet};

use super::{limits::MAX_NODES, parse, Config};

/// Largest file handled here: without aliases a file has fewer than two nodes per
/// byte, so it stays within the node limit by its size alone.
const MAX_BYTES: usize = (MAX_NODES / 2 - 1) as usize;

/// A file cut at its services: the text before the list (with the `services:` line),
/// each item's text, and the text after the list.
#[derive(Debug, PartialEq)]
struct Layout<'a> {
    before: &'a str,
    items: Vec<&'a str>,
    after: &'a str,
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// Blank or only a comment.
fn is_filler(line: &str) -> bool {
    let t = line.trim_start_matches(' ');
    t.is_empty() || t.starts_with('#')
}

fn layout(text: &str) -> Option<Layout<'_>> {
    let odd = |b: &u8| matches!(b, b'&' | b'*' | b'\t' | b'\r');
    if text.len() > MAX_BYTES || text.starts_with('\u{feff}') || text.as_bytes().iter().any(odd) {
        return None;
    }
    // Byte offset of every line start.
    let mut starts = vec![0];
    starts.extend(text.bytes().enumerate().filter(|(_, b)| *b == b'\n').map(|(i, _)| i + 1).filter(|&i| i < text.len()));
    let marker = |&i: &usize| text[i..].starts_with("---") || text[i..].starts_with("...");
    if starts.iter().any(marker) {
        return None;
    }
    let line = |i: usize| {
        let end = starts.get(i + 1).copied().unwrap_or(text.len());
        text[starts[i]..end].trim_end_matches('\n')
    };
    let is_services = |l: &str| {
        l.strip_prefix("services:").is_some_and(|rest| {
            let rest = rest.trim_start_matches(' ');
            rest.is_empty() || rest.starts_with('#')
        })
    };
    let header: Vec<usize> = (0..starts.len()).filter(|&i| is_services(line(i))).collect();
    let [at] = header[..] else { return None };
    let first = (at + 1..starts.len()).find(|&i| !is_filler(line(i)))?;
    let item_indent = indent(line(first));
    if item_indent == 0 || !line(first)[item_indent..].starts_with("- ") {
        return None;
    }
    let mut item_starts = Vec::new();
    let mut end = starts.len();
    for i in first..starts.len() {
        let l = line(i);
        if is_filler(l) {
            continue;
        }
        match indent(l) {
            0 => {
                end = i;
                break;
            }
            n if n == item_indent && l[n..].starts_with("- ") => item_starts.push(i),
            n if n <= item_indent => return None,
            _ => {}
        }
    }
    let offset = |i: usize| starts.get(i).copied().unwrap_or(text.len());
    let mut items = Vec::with_capacity(item_starts.len());
    for (k, &s) in item_starts.iter().enumerate() {
        let next = item_starts.get(k + 1).copied().unwrap_or(end);
        items.push(&text[offset(s)..offset(next)]);
    }
    Some(Layout { before: &text[..offset(first)], items, after: &text[offset(end)..] })
}

/// `new_text`'s configuration built from `old` (the configuration `old_text`
/// gave) and a parse of only the services whose text changed; `None` when that is
/// not possible or not valid (see the module documentation).
pub fn reparse(old_text: &str, old: &Config, new_text: &str, origin: &str) -> Option<Config> {
    let (was, now) = (layout(old_text)?, layout(new_text)?);
    if was.before != now.before || was.after != now.after || was.items.len() != old.services.len() {
        return None;
    }
    // Most items are where they were; the others are looked up by their text.
    let moved: Vec<usize> = (0..now.items.len()).filter(|&i| was.items.get(i) != Some(&now.items[i])).collect();
    let known: HashMap<&str, usize> =
        if moved.is_empty() { HashMap::new() } else { was.items.iter().enumerate().map(|(i, t)| (*t, i)).collect() };
    let find = |i: usize| if was.items.get(i) == Some(&now.items[i]) { Some(i) } else { known.get(now.items[i]).copied() };
    let changed = moved.iter().filter(|&&i| find(i).is_none()).count();
    // Many changes: one parse of the whole file is as cheap and reports them all.
    if changed > 16.max(now.items.len() / 8) {
        return None;
    }
    let mut services = Vec::with_capacity(now.items.len());
    for (k, item) in now.items.iter().enumerate() {
        match find(k) {
            Some(i) => services.push(old.services[i].clone()),
            None => {
                let alone = parse(&format!("{}{item}{}", now.before, now.after), origin).ok()?;
                let [service] = <[_; 1]>::try_from(alone.services).ok()?;
                services.push(service);
            }
        }
    }
    let mut names = HashSet::new();
    let mut triples = HashSet::new();
    for s in &services {
        if !names.insert(s.name.as_str()) || !triples.insert((s.vip, s.port, s.protocol)) {
            return None;
        }
    }
    Some(Config {
        conntrack_size: old.conntrack_size,
        established_size: old.established_size,
        timeouts: old.timeouts,
        services,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(services: &[(&str, &str, u32)]) -> String {
        let mut y = String::from("conntrack_size: 65536\nservices:\n");
        for (name, vip, weight) in services {
            y += &format!("  - name: {name}\n    vip: {vip}\n    port: 80\n    backends:\n      - address: 198.18.0.11\n        weight: {weight}\n      # a comment\n\n");
        }
        y + "timeouts:\n  tcp: 60s\n"
    }

    #[test]
    fn a_file_is_cut_at_its_services() {
        let text = file(&[("a", "198.18.1.1", 1), ("b", "198.18.1.2", 1)]);
        let l = layout(&text).unwrap();
        assert_eq!(l.before, "conntrack_size: 65536\nservices:\n");
        assert_eq!(l.items.len(), 2);
        assert!(l.items[1].starts_with("  - name: b\n") && l.items[1].ends_with("# a comment\n\n"));
        assert_eq!(l.after, "timeouts:\n  tcp: 60s\n");
        assert_eq!(format!("{}{}{}", l.before, l.items.concat(), l.after), text);
        for odd in ["services: []\n", "x: &a 1\nservices:\n  - name: a\n", "services:\n- name: a\n", "services:\n  - a\n services: 1\n"] {
            assert_eq!(layout(odd), None, "{odd:?}");
        }
    }

    #[test]
    fn only_changed_services_are_parsed_and_the_result_is_the_full_parse() {
        let old_text = file(&[("a", "198.18.1.1", 1), ("b", "198.18.1.2", 1), ("c", "198.18.1.3", 1)]);
        let old = parse(&old_text, "t").unwrap();
        let edits = [
            file(&[("a", "198.18.1.1", 1), ("b", "198.18.1.2", 5), ("c", "198.18.1.3", 1)]),
            file(&[("c", "198.18.1.3", 1), ("a", "198.18.1.1", 1)]),
            file(&[("a", "198.18.1.1", 1), ("b", "198.18.1.2", 1), ("c", "198.18.1.3", 1), ("d", "198.18.1.4", 2)]),
        ];
        for new_text in edits {
            assert_eq!(reparse(&old_text, &old, &new_text, "t"), Some(parse(&new_text, "t").unwrap()), "{new_text}");
        }
        // Errors, and what spans services, are left to the full parse.
        let invalid = [
            file(&[("a", "198.18.1.1", 1), ("b", "198.18.1.2", 70000), ("c", "198.18.1.3", 1)]),
            file(&[("a", "198.18.1.1", 1), ("a", "198.18.1.2", 1), ("c", "198.18.1.3", 1)]),
            file(&[("a", "198.18.1.1", 1), ("b", "198.18.1.1", 1), ("c", "198.18.1.3", 1)]),
            old_text.replace("conntrack_size: 65536", "conntrack_size: 1"),
        ];
        for new_text in invalid {
            assert_eq!(reparse(&old_text, &old, &new_text, "t"), None, "{new_text}");
        }
    }
}
