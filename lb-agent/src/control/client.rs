//! The client side of the control socket: one request, one answer (see the
//! protocol in `control.rs`), with errors worded for the user.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream as StdUnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{json, Request, Response, MAX_RESPONSE, TIMEOUT};

/// What can go wrong talking to the agent; the messages are meant for the user.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the agent is not running: no control socket at {}", path.display())]
    NotRunning { path: PathBuf },
    #[error("the agent is not running: nothing listens on {} (a stale socket file)", path.display())]
    Stale { path: PathBuf },
    #[error("permission denied on {}: run as root", path.display())]
    PermissionDenied { path: PathBuf },
    #[error("the agent did not answer on {} within {} s", path.display(), timeout.as_secs_f64())]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("the agent closed the control connection on {} without answering", path.display())]
    NoAnswer { path: PathBuf },
    #[error("unexpected answer from the agent on {}: {message}", path.display())]
    Protocol { path: PathBuf, message: String },
    #[error("control socket {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// Maps an I/O error on the control socket at `path` to what the user should read.
pub fn map_io_error(path: &Path, e: io::Error) -> ControlError {
    let path = path.to_path_buf();
    match e.kind() {
        io::ErrorKind::NotFound => ControlError::NotRunning { path },
        io::ErrorKind::ConnectionRefused => ControlError::Stale { path },
        io::ErrorKind::PermissionDenied => ControlError::PermissionDenied { path },
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ControlError::Timeout { path, timeout: TIMEOUT },
        _ if e.raw_os_error() == Some(libc::EPERM) => ControlError::PermissionDenied { path },
        _ => ControlError::Io { path, source: e },
    }
}

/// Sends one request to the agent listening on `path` and returns its answer (an
/// agent-side failure is `Ok(Response::Error { .. })`). Blocking; gives up after
/// [`TIMEOUT`].
pub fn call(path: &Path, request: &Request) -> Result<Response, ControlError> {
    call_with_timeout(path, request, TIMEOUT)
}

/// [`call`] with another time limit (for each of connect+write and read).
pub fn call_with_timeout(path: &Path, request: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let answer = call_line(path, request, timeout)?;
    json::decode(answer.trim_end()).map_err(|e| ControlError::Protocol { path: path.to_path_buf(), message: e.to_string() })
}

/// [`call`] for `lb-agent status --json`: a status answer is written to `out` as
/// pretty JSON, re-indented from the agent's line without decoding it (`None`);
/// any other answer is decoded and returned.
pub fn call_status_json(path: &Path, request: &Request, out: &mut impl Write) -> Result<Option<Response>, ControlError> {
    let answer = call_line(path, request, TIMEOUT)?;
    match json::write_status_pretty(answer.trim_end(), out) {
        Some(written) => written.map(|()| None).map_err(|e| ControlError::Protocol {
            path: path.to_path_buf(),
            message: format!("writing the status: {e}"),
        }),
        None => json::decode(answer.trim_end())
            .map(Some)
            .map_err(|e| ControlError::Protocol { path: path.to_path_buf(), message: e.to_string() }),
    }
}

/// [`call`] for a `StatusText` request: the text of a `Text` answer is copied to
/// `out` (`None`); any other answer is decoded and returned.
pub fn call_text(path: &Path, request: &Request, out: &mut impl Write) -> Result<Option<Response>, ControlError> {
    let (answer, mut rest) = exchange(path, request, TIMEOUT)?;
    let protocol = |message: String| ControlError::Protocol { path: path.to_path_buf(), message };
    let response = json::decode(answer.trim_end()).map_err(|e| protocol(e.to_string()))?;
    let Response::Text { bytes } = response else { return Ok(Some(response)) };
    let copied = io::copy(&mut (&mut rest).take(bytes), out).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => map_io_error(path, e),
        _ => protocol(format!("copying the agent's text: {e}")),
    })?;
    if copied != bytes {
        return Err(protocol(format!("the agent's text ended after {copied} of {bytes} bytes")));
    }
    Ok(None)
}

/// Sends `request` and returns the answer line as it came.
fn call_line(path: &Path, request: &Request, timeout: Duration) -> Result<String, ControlError> {
    exchange(path, request, timeout).map(|(line, _)| line)
}

/// Sends `request`; the answer line as it came and the rest of the answer.
fn exchange(path: &Path, request: &Request, timeout: Duration) -> Result<(String, BufReader<io::Take<StdUnixStream>>), ControlError> {
    let io_err = |e: io::Error| match map_io_error(path, e) {
        ControlError::Timeout { path, .. } => ControlError::Timeout { path, timeout },
        other => other,
    };
    let mut stream = StdUnixStream::connect(path).map_err(io_err)?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let mut line = serde_json::to_string(request)
        .map_err(|e| ControlError::Protocol { path: path.to_path_buf(), message: format!("encoding the request: {e}") })?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io_err)?;
    let _ = stream.shutdown(std::net::Shutdown::Write);

    let mut answer = String::new();
    let mut reader = BufReader::new(stream.take(MAX_RESPONSE));
    reader.read_line(&mut answer).map_err(|e| match e.kind() {
        // The agent closed on us (e.g. its own timeout) while we were still writing.
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => ControlError::NoAnswer { path: path.to_path_buf() },
        io::ErrorKind::InvalidData => ControlError::Protocol { path: path.to_path_buf(), message: "not UTF-8".into() },
        _ => io_err(e),
    })?;
    if answer.is_empty() {
        return Err(ControlError::NoAnswer { path: path.to_path_buf() });
    }
    // The text after a line is limited by its announced length, not MAX_RESPONSE.
    reader.get_mut().set_limit(u64::MAX);
    Ok((answer, reader))
}
