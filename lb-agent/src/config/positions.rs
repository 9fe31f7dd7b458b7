//! An index from field path (`services[1].backends[0].weight`) to the line and column
//! of that field's key and value, built by walking the YAML with a marked event parser.
//!
//! Paths use the same syntax as `serde_yaml` and the diagnostics: mapping keys joined
//! with `.`, sequence items as `[index]`; the document itself is the empty path. A
//! path that is not in the index (a missing field, or a field under an alias) resolves
//! to its nearest ancestor that is.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    const START: Pos = Pos { line: 1, column: 1 };

    fn from_marker(mark: Marker) -> Pos {
        // yaml-rust2 markers have 1-based lines and 0-based columns.
        Pos {
            line: mark.line(),
            column: mark.col() + 1,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Where the mapping key naming this node starts (none for sequence items and the
    /// document).
    key: Option<Pos>,
    /// Where the node itself starts; for a block mapping, its first key.
    value: Pos,
}

#[derive(Debug, Default)]
pub(super) struct Positions {
    entries: HashMap<String, Entry>,
}

/// The index of a text, built on the first lookup: a valid file (no diagnostic
/// to place) never pays for it, which is a third of a large file's parse.
#[derive(Debug)]
pub(super) struct LazyPositions<'a> {
    text: &'a str,
    index: std::cell::OnceCell<Positions>,
}

impl<'a> LazyPositions<'a> {
    pub fn new(text: &'a str) -> Self {
        LazyPositions { text, index: std::cell::OnceCell::new() }
    }

    fn get(&self) -> &Positions {
        self.index.get_or_init(|| Positions::build(self.text))
    }

    pub fn value(&self, path: &str) -> Pos {
        self.get().value(path)
    }

    pub fn key(&self, path: &str) -> Pos {
        self.get().key(path)
    }
}

impl Positions {
    /// Indexes `text`. Whatever cannot be parsed is simply left out of the index (the
    /// text has already been accepted by `serde_yaml`, so this should not happen).
    pub fn build(text: &str) -> Positions {
        let mut walker = Walker::default();
        // libyaml skips a byte-order mark without counting it; so do we.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut parser = Parser::new_from_str(text);
        // Only the first document is indexed; `serde_yaml` rejects files with more.
        let _ = parser.load(&mut walker, false);
        Positions {
            entries: walker.entries,
        }
    }

    /// Position of the value at `path`, or of its nearest indexed ancestor.
    pub fn value(&self, path: &str) -> Pos {
        let mut path = path;
        loop {
            if let Some(entry) = self.entries.get(path) {
                return entry.value;
            }
            if path.is_empty() {
                return Pos::START;
            }
            path = parent(path);
        }
    }

    /// Position of the key naming the field at `path`; falls back like [`Self::value`].
    pub fn key(&self, path: &str) -> Pos {
        match self.entries.get(path) {
            Some(Entry { key: Some(key), .. }) => *key,
            _ => self.value(path),
        }
    }
}

/// The path of the node containing `path` (`a.b[2]` -> `a.b` -> `a` -> ``).
fn parent(path: &str) -> &str {
    let cut = if path.ends_with(']') {
        path.rfind('[')
    } else {
        path.rfind('.')
    };
    &path[..cut.unwrap_or(0)]
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

enum Frame {
    /// `path` is `None` inside nodes that are not indexed (complex mapping keys).
    Mapping {
        path: Option<String>,
        /// The key just read, waiting for its value: its text (`None` if it is not a
        /// scalar) and position.
        pending_key: Option<(Option<String>, Pos)>,
        seen_key: bool,
    },
    Sequence {
        path: Option<String>,
        next_index: usize,
    },
}

#[derive(Default)]
struct Walker {
    stack: Vec<Frame>,
    entries: HashMap<String, Entry>,
    /// Set once the first document is complete.
    done: bool,
}

impl Walker {
    /// Handles the start of any node (scalar, alias, mapping or sequence) at `pos`,
    /// returning its path if it is indexed. `scalar` is the node's text if it is a scalar.
    fn begin_node(&mut self, pos: Pos, scalar: Option<&str>) -> Option<String> {
        let (path, key) = match self.stack.last_mut() {
            None => (String::new(), None),
            Some(Frame::Sequence { path, next_index }) => {
                let index = *next_index;
                *next_index += 1;
                (format!("{}[{index}]", path.as_ref()?), None)
            }
            Some(Frame::Mapping {
                path,
                pending_key,
                seen_key,
            }) => match pending_key.take() {
                Some((key, key_pos)) => (child(path.as_ref()?, key.as_ref()?), Some(key_pos)),
                None => {
                    // This node is a key. In a block mapping the mapping's own marker
                    // points past its first key, so the first key marks the mapping.
                    *pending_key = Some((scalar.map(str::to_string), pos));
                    if !std::mem::replace(seen_key, true) {
                        if let Some(entry) = path.as_ref().and_then(|p| self.entries.get_mut(p)) {
                            entry.value = entry.value.min(pos);
                        }
                    }
                    return None;
                }
            },
        };
        self.entries.insert(path.clone(), Entry { key, value: pos });
        Some(path)
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, event: Event, mark: Marker) {
        if self.done {
            return;
        }
        let pos = Pos::from_marker(mark);
        match event {
            Event::Scalar(text, ..) => {
                self.begin_node(pos, Some(&text));
            }
            Event::Alias(_) => {
                self.begin_node(pos, None);
            }
            Event::MappingStart(..) => {
                let path = self.begin_node(pos, None);
                self.stack.push(Frame::Mapping {
                    path,
                    pending_key: None,
                    seen_key: false,
                });
            }
            Event::SequenceStart(..) => {
                let path = self.begin_node(pos, None);
                self.stack.push(Frame::Sequence {
                    path,
                    next_index: 0,
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::DocumentEnd => self.done = true,
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentStart => {}
        }
    }
}
