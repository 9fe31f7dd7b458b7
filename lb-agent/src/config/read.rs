//! Reading a configuration file into text: bounded by [`MAX_FILE_SIZE`], and a file
//! that is not UTF-8 is reported at the line and column of its first bad byte.

use std::io::Read;
use std::path::Path;

use super::limits::{MAX_FILE_SIZE, too_large};
use super::{Diagnostic, lower_first};

/// The text of the file at `path`; `origin` names it in diagnostics.
pub(super) fn read(path: &Path, origin: &str) -> Result<String, Diagnostic> {
    let whole_file = |message: String| Diagnostic {
        origin: origin.to_string(),
        line: 0,
        column: 0,
        path: String::new(),
        message,
    };
    let cannot_read = |err: std::io::Error| {
        whole_file(format!(
            "cannot read the file: {}",
            lower_first(&err.to_string())
        ))
    };
    let file = std::fs::File::open(path).map_err(cannot_read)?;
    let length = file.metadata().map_err(cannot_read)?.len();
    if length > MAX_FILE_SIZE {
        return Err(whole_file(too_large(length)));
    }
    // The file may grow between the two calls: never read more than the limit + 1.
    let mut bytes = Vec::with_capacity(usize::try_from(length).unwrap_or(0));
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot_read)?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(whole_file(too_large(bytes.len() as u64)));
    }
    String::from_utf8(bytes).map_err(|err| not_utf8(err.as_bytes(), err.utf8_error(), origin))
}

/// The diagnostic for `bytes`, which are valid UTF-8 up to `err.valid_up_to()`.
fn not_utf8(bytes: &[u8], err: std::str::Utf8Error, origin: &str) -> Diagnostic {
    let at = err.valid_up_to();
    // Valid up to `at` by definition, so this cannot fail.
    let before = std::str::from_utf8(&bytes[..at]).unwrap_or_default();
    // As elsewhere: 1-based lines and columns counted in characters, a leading
    // byte-order mark not counted.
    let before = before.strip_prefix('\u{feff}').unwrap_or(before);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let length = err.error_len().unwrap_or(bytes.len() - at);
    let shown: Vec<String> = bytes[at..at + length]
        .iter()
        .map(|b| format!("0x{b:02x}"))
        .collect();
    let what = if err.error_len().is_some() {
        "invalid"
    } else {
        "truncated"
    };
    Diagnostic {
        origin: origin.to_string(),
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
        path: String::new(),
        message: format!(
            "the file is not UTF-8 text: {what} byte sequence {}",
            shown.join(" ")
        ),
    }
}
