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

/// Where a file is: before the services, in them, after them.
#[derive(PartialEq)]
enum At {
    Before,
    First,
    Items,
    After,
}

/// Where a text's services are, as offsets into it: the start of the first item
/// (the end of the text before the list), each item's start, and the end of the
/// list. Kept with the text in force, so a reload cuts only the new text.
#[derive(Debug, Clone, PartialEq)]
pub struct Cut {
    first: usize,
    items: Vec<usize>,
    end: usize,
}

impl Cut {
    /// `text` cut where `Cut::of(text)` found its services.
    fn apply<'a>(&self, text: &'a str) -> Option<Layout<'a>> {
        let (first, end) = (self.first, self.end);
        if end > text.len() || first > end {
            return None;
        }
        let mut items = Vec::with_capacity(self.items.len());
        for (k, &s) in self.items.iter().enumerate() {
            items.push(text.get(s..self.items.get(k + 1).copied().unwrap_or(end))?);
        }
        Some(Layout { before: text.get(..first)?, items, after: text.get(end..)? })
    }

    /// The cut of `text`, if it qualifies (see the module documentation).
    pub fn of(text: &str) -> Option<Cut> {
        if text.len() > MAX_BYTES {
            return None;
        }
        Cut::of_any_size(text)
    }

    /// `Cut::of` without its bound on the size.
    fn of_any_size(text: &str) -> Option<Cut> {
        let bytes = text.as_bytes();
        // Searched with SIMD: fast even for megabytes.
        if text.starts_with('\u{feff}')
            || memchr::memchr3(b'&', b'*', b'\t', bytes).is_some()
            || memchr::memchr(b'\r', bytes).is_some()
        {
            return None;
        }
        let mut state = At::Before;
        let (mut first, mut end, mut item_indent) = (0, text.len(), 0);
        let mut item_starts = Vec::new();
        let mut at = 0;
        let mut ends = memchr::memchr_iter(b'\n', bytes);
        while at < text.len() {
            let next = ends.next().map_or(text.len(), |n| n + 1);
            let line = text[at..next].trim_end_matches('\n');
            let bytes = line.as_bytes();
            let indent = bytes.iter().take_while(|&&b| b == b' ').count();
            let filler = indent == bytes.len() || bytes[indent] == b'#';
            let top = !filler && indent == 0;
            if top && state == At::Items {
                (state, end) = (At::After, at);
            }
            match state {
                At::Before | At::After if top => {
                    if line.starts_with("---") || line.starts_with("...") {
                        return None;
                    }
                    let rest = line.strip_prefix("services:").map(|r| r.trim_start_matches(' '));
                    if rest.is_some_and(|r| r.is_empty() || r.starts_with('#')) {
                        if state == At::After {
                            return None;
                        }
                        state = At::First;
                    } else if rest.is_some() {
                        return None; // `services: [...]` and the like
                    }
                }
                At::First | At::Items if !filler => {
                    let item = line[indent..].starts_with("- ");
                    if state == At::First {
                        if indent == 0 || !item {
                            return None;
                        }
                        (state, first, item_indent) = (At::Items, at, indent);
                    }
                    if indent == item_indent && item {
                        item_starts.push(at);
                    } else if indent <= item_indent {
                        return None;
                    }
                }
                _ => {}
            }
            at = next;
        }
        if item_starts.is_empty() {
            return None;
        }
        Some(Cut { first, items: item_starts, end })
    }
}

/// A plain block-style file (as the module documentation describes, of any size)
/// cut at its services: the text before the list (with the `services:` line), each
/// item's text, and the text after the list. For a quick look at a file before it
/// is parsed (`dataplane::Sizes::scan`).
pub fn split_services(text: &str) -> Option<(&str, Vec<&str>, &str)> {
    let layout = Cut::of_any_size(text)?.apply(text)?;
    Some((layout.before, layout.items, layout.after))
}

#[cfg(test)]
fn layout(text: &str) -> Option<Layout<'_>> {
    Cut::of(text)?.apply(text)
}

/// `new_text`'s configuration built from `old` (the configuration `old_text`
/// gave) and a parse of only the services whose text changed, with the indices
/// (in the new configuration) of those services; `None` when that is not
/// possible or not valid (see the module documentation).
/// `old_cut` is `old_text`'s cut when known (else it is cut here); the new
/// text's cut is returned, to be passed with it next time.
pub fn reparse(old_text: &str, old_cut: Option<&Cut>, old: &Config, new_text: &str, origin: &str) -> Option<(Config, Vec<usize>, Cut)> {
    let was = match old_cut {
        Some(cut) => cut.apply(old_text)?,
        None => Cut::of(old_text)?.apply(old_text)?,
    };
    let cut = Cut::of(new_text)?;
    let now = cut.apply(new_text)?;
    if was.before != now.before || was.after != now.after || was.items.len() != old.services.len() {
        return None;
    }
    // Most items are where they were; the others are looked up by their text:
    // with as many items as before, an item that moved left a place that differs
    // too (names are unique: no two items have the same text), so only those
    // places are candidates; else every item is.
    let moved: Vec<usize> = (0..now.items.len()).filter(|&i| was.items.get(i) != Some(&now.items[i])).collect();
    let known: HashMap<&str, usize> = if moved.is_empty() {
        HashMap::new()
    } else if was.items.len() == now.items.len() {
        moved.iter().map(|&i| (was.items[i], i)).collect()
    } else {
        was.items.iter().enumerate().map(|(i, t)| (*t, i)).collect()
    };
    let find = |i: usize| if was.items.get(i) == Some(&now.items[i]) { Some(i) } else { known.get(now.items[i]).copied() };
    let changed = moved.iter().filter(|&&i| find(i).is_none()).count();
    // Many changes: one parse of the whole file is as cheap and reports them all.
    if changed > 16.max(now.items.len() / 8) {
        return None;
    }
    let mut services = Vec::with_capacity(now.items.len());
    let mut parsed = Vec::new();
    for (k, item) in now.items.iter().enumerate() {
        match find(k) {
            Some(i) => services.push(old.services[i].clone()),
            None => {
                parsed.push(k);
                let alone = parse(&format!("{}{item}{}", now.before, now.after), origin).ok()?;
                let [service] = <[_; 1]>::try_from(alone.services).ok()?;
                services.push(service);
            }
        }
    }
    let mut names = HashSet::new();
    let mut triples = HashSet::new();
    for s in &services {
        if !names.insert(s.name.as_str()) || !triples.insert((s.vip, s.vip_prefix, s.port, s.protocol)) {
            return None;
        }
    }
    // The text around the services is unchanged: so are the global fields.
    let config = Config {
        conntrack_size: old.conntrack_size,
        established_size: old.established_size,
        timeouts: old.timeouts,
        tunnel_source_v4: old.tunnel_source_v4,
        tunnel_source_v6: old.tunnel_source_v6,
        mtu: old.mtu,
        answer_ping: old.answer_ping,
        forward_icmp: old.forward_icmp,
        syn_flood_kps: old.syn_flood_kps,
        snat: old.snat.clone(),
        fragments: old.fragments,
        services,
    };
    Some((config, parsed, cut))
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
            // As many items, two swapped and one changed: only the changed one parsed.
            file(&[("c", "198.18.1.3", 1), ("b", "198.18.1.2", 7), ("a", "198.18.1.1", 1)]),
        ];
        for (n, new_text) in edits.into_iter().enumerate() {
            let (config, parsed, _) = reparse(&old_text, None, &old, &new_text, "t").expect("reparsed");
            assert_eq!(config, parse(&new_text, "t").unwrap(), "{new_text}");
            assert_eq!(parsed, [vec![1], vec![], vec![3], vec![1]][n], "{new_text}: the services parsed");
            // With the old text's cut given, the same.
            let cut = Cut::of(&old_text);
            assert_eq!(reparse(&old_text, cut.as_ref(), &old, &new_text, "t").map(|(c, ..)| c), Some(parse(&new_text, "t").unwrap()));
        }
        // Errors, and what spans services, are left to the full parse.
        let invalid = [
            file(&[("a", "198.18.1.1", 1), ("b", "198.18.1.2", 70000), ("c", "198.18.1.3", 1)]),
            file(&[("a", "198.18.1.1", 1), ("a", "198.18.1.2", 1), ("c", "198.18.1.3", 1)]),
            file(&[("a", "198.18.1.1", 1), ("b", "198.18.1.1", 1), ("c", "198.18.1.3", 1)]),
            old_text.replace("conntrack_size: 65536", "conntrack_size: 1"),
        ];
        for new_text in invalid {
            assert_eq!(reparse(&old_text, None, &old, &new_text, "t"), None, "{new_text}");
        }
    }
}
