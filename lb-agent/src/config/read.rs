//! Reading a configuration file into text, bounded by [`MAX_FILE_SIZE`].

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
    String::from_utf8(bytes)
        .map_err(|err| cannot_read(std::io::Error::new(std::io::ErrorKind::InvalidData, err)))
}
