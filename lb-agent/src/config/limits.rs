//! Bounds on what a configuration file may expand to, checked by a cheap pre-pass
//! before `serde_yaml` and the positions index see the text.
//!
//! YAML aliases repeat the node their anchor names: an anchored list of 5,000 backends
//! reused by 4,000 services is a 430 KB file that expands to 60 million nodes (and
//! tens of gigabytes once deserialized). `serde_yaml`'s own alias limit counts jumps,
//! not the nodes they repeat, so it does not catch this; the pre-pass counts every node
//! the way a deserializer sees it (an alias counts as the whole node it repeats).
//!
//! The pre-pass walks the events of a marked YAML parser without recursion and stops
//! at the first violation, so it costs one scan of the text at most and its own
//! memory is one frame per open collection (at most [`MAX_DEPTH`]) plus the size of
//! each anchored node.
//!
//! The numbers, and what they allow, are documented in `docs/config.md` ("Limits").

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, ScanError};

use super::positions::Pos;
use super::{Diagnostic, lower_first};

/// Largest accepted file, in bytes (64 MiB). 10,000 services of 32 backends, each
/// backend with a probe block of its own, all in block style, are 44 MB.
pub const MAX_FILE_SIZE: u64 = 64 * 1024 * 1024;

/// Most YAML nodes (scalars, including mapping keys, sequences and mappings) a file
/// may expand to, an alias counting as every node it repeats. 10,000 services of 32
/// backends, each service with a probe block and each backend a probe block of its own
/// (2 fields), are 3.8 million nodes; the alias bomb described above is 60 million.
/// The costliest file within the limits found, 5 million empty services, takes about
/// 2 GB and 11 s (release build) to be refused.
pub const MAX_NODES: u64 = 5_000_000;

/// Deepest accepted nesting of sequences and mappings (the document's own mapping is
/// level 1). The schema needs 7 (`services[].backends[].probe.command[]`).
pub const MAX_DEPTH: usize = 32;

/// Most errors reported for one file; the rest are counted ("N more errors not
/// shown"). Without it, 5,000 invalid backends repeated by 2,000 aliases would be ten
/// million messages.
pub const MAX_ERRORS: usize = 1000;

/// Checks `text` against [`MAX_FILE_SIZE`], [`MAX_NODES`] and [`MAX_DEPTH`].
///
/// A YAML syntax error is reported here too (with its position): a file the
/// pre-pass cannot read to its end has not been bounded, so it is never handed on.
pub(super) fn check(text: &str, origin: &str) -> Result<(), Diagnostic> {
    let diagnostic = |pos: Option<Pos>, path: String, message: String| Diagnostic {
        origin: origin.to_string(),
        line: pos.map_or(0, |p| p.line),
        column: pos.map_or(0, |p| p.column),
        path,
        message,
    };
    let size = text.len() as u64;
    if size > MAX_FILE_SIZE {
        return Err(diagnostic(None, String::new(), too_large(size)));
    }
    // libyaml skips a byte-order mark without counting it; so do we (as positions.rs).
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut walk = Walk::default();
    let mut parser = Parser::new_from_str(text);
    loop {
        let (event, mark) = parser
            .next_token()
            .map_err(|e| diagnostic(Some(pos(*e.marker())), String::new(), syntax(&e)))?;
        let mapping = matches!(event, Event::MappingStart(..));
        match walk.event(event) {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err((path, message)) => {
                let mut at = pos(mark);
                // A block mapping's marker points past its first key: use the key's.
                if let (true, Ok((_, next))) = (mapping, parser.peek()) {
                    at = at.min(pos(*next));
                }
                return Err(diagnostic(Some(at), path, message));
            }
        }
    }
}

/// The message for a file of `size` bytes, larger than [`MAX_FILE_SIZE`].
pub(super) fn too_large(size: u64) -> String {
    format!(
        "the file is {size} bytes, more than the limit of {MAX_FILE_SIZE} bytes ({} MiB)",
        MAX_FILE_SIZE >> 20
    )
}

fn pos(mark: Marker) -> Pos {
    // yaml-rust2 markers have 1-based lines and 0-based columns.
    Pos {
        line: mark.line(),
        column: mark.col() + 1,
    }
}

fn syntax(err: &ScanError) -> String {
    // The scanner reads ahead of the parser and has a limit of its own on flow
    // collections (255 levels), which deeper flow nesting reaches before the parser
    // has reached ours.
    if err.info() == "recursion limit exceeded" {
        return too_deep();
    }
    lower_first(err.info())
}

fn too_deep() -> String {
    format!("this node is nested more than {MAX_DEPTH} levels deep (the limit)")
}

/// Where a node sits in its parent, for the field path of a diagnostic.
enum Step {
    /// The document itself, a mapping key, or the value of a key that is not a scalar.
    Here,
    Index(usize),
    Key(String),
}

enum Kind {
    Sequence {
        next_index: usize,
    },
    /// `key` holds the key just read (`Some(None)` if it is not a scalar) until its
    /// value starts.
    Mapping {
        key: Option<Option<String>>,
    },
}

struct Open {
    kind: Kind,
    /// How this collection sits in its parent.
    step: Step,
    /// Its anchor id (0: none) and the node count when it started.
    anchor: usize,
    start: u64,
}

#[derive(Default)]
struct Walk {
    stack: Vec<Open>,
    /// Nodes so far, aliases expanded.
    total: u64,
    /// Expanded size of each complete anchored node, by anchor id (0: unknown).
    sizes: Vec<u64>,
}

impl Walk {
    /// Takes one event: `Ok(false)` at the end of the stream, `Err((path, message))`
    /// at the first node past a limit.
    fn event(&mut self, event: Event) -> Result<bool, (String, String)> {
        let (adds, anchor, opens) = match event {
            Event::StreamEnd => return Ok(false),
            Event::Scalar(text, _, anchor, _) => {
                let step = self.step(Some(text));
                self.count(1, &step, None)?;
                self.record(anchor, 1);
                return Ok(true);
            }
            Event::Alias(anchor) => (self.sizes.get(anchor).copied().unwrap_or(0).max(1), 0, None),
            Event::SequenceStart(anchor, _) => (1, anchor, Some(Kind::Sequence { next_index: 0 })),
            Event::MappingStart(anchor, _) => (1, anchor, Some(Kind::Mapping { key: None })),
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(open) = self.stack.pop() {
                    self.record(open.anchor, self.total - open.start);
                }
                return Ok(true);
            }
            Event::Nothing | Event::StreamStart | Event::DocumentStart | Event::DocumentEnd => {
                return Ok(true);
            }
        };
        let step = self.step(None);
        match opens {
            None => self.count(adds, &step, Some(adds))?,
            Some(kind) => {
                if self.stack.len() >= MAX_DEPTH {
                    return Err((self.path(&step), too_deep()));
                }
                let start = self.total;
                self.count(1, &step, None)?;
                self.stack.push(Open {
                    kind,
                    step,
                    anchor,
                    start,
                });
            }
        }
        Ok(true)
    }

    /// Adds `nodes` to the total; `alias` is the size an alias repeats.
    fn count(
        &mut self,
        nodes: u64,
        step: &Step,
        alias: Option<u64>,
    ) -> Result<(), (String, String)> {
        self.total = self.total.saturating_add(nodes);
        if self.total <= MAX_NODES {
            return Ok(());
        }
        let message = match alias {
            Some(size) => format!(
                "this alias repeats {size} nodes and takes the file past the limit of \
                 {MAX_NODES} YAML nodes (an alias counts as every node it repeats)"
            ),
            None => format!("the file has more than {MAX_NODES} YAML nodes (the limit)"),
        };
        Err((self.path(step), message))
    }

    fn record(&mut self, anchor: usize, size: u64) {
        if anchor == 0 {
            return;
        }
        if self.sizes.len() <= anchor {
            self.sizes.resize(anchor + 1, 0);
        }
        self.sizes[anchor] = size;
    }

    /// Places a new node in the innermost open collection; `scalar` is its text if it
    /// is a scalar (needed when it is a mapping key).
    fn step(&mut self, scalar: Option<String>) -> Step {
        match self.stack.last_mut().map(|open| &mut open.kind) {
            None => Step::Here,
            Some(Kind::Sequence { next_index }) => {
                *next_index += 1;
                Step::Index(*next_index - 1)
            }
            Some(Kind::Mapping { key }) => match key.take() {
                None => {
                    *key = Some(scalar);
                    Step::Here
                }
                Some(Some(name)) => Step::Key(name),
                Some(None) => Step::Here,
            },
        }
    }

    /// The field path of a node placed at `last` in the innermost open collection.
    fn path(&self, last: &Step) -> String {
        let mut path = String::new();
        for step in self.stack.iter().map(|open| &open.step).chain([last]) {
            match step {
                Step::Here => {}
                Step::Index(index) => path.push_str(&format!("[{index}]")),
                Step::Key(key) if path.is_empty() => path.push_str(key),
                Step::Key(key) => path.push_str(&format!(".{key}")),
            }
        }
        path
    }
}
