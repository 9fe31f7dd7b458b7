//! The control socket: `lb-agent status`, `drain` and `undrain` talk to the running
//! agent over a Unix stream socket (default [`DEFAULT_SOCKET`]).
//!
//! Protocol: the client connects, writes one JSON [`Request`] on one line, and reads
//! one JSON [`Response`] line back; then both sides close. Examples:
//!
//! ```text
//! {"cmd":"status"}
//! {"cmd":"drain","backend":"198.18.0.11","service":"web"}
//! {"result":"done","message":"..."}
//! {"result":"error","message":"..."}
//! ```
//!
//! One answer is followed by more than its line: `{"result":"text","bytes":N}` (to
//! `{"cmd":"status_text",...}`, what `lb-agent status` prints) is followed by N
//! bytes of text as they are.
//!
//! The socket file is mode 0600 and owned by the user the agent runs as (root), so
//! only that user can connect; others get EACCES from `connect` at once. The agent
//! side ([`bind`] + [`run`], or [`serve`]) forwards each request to the agent's event
//! loop as a [`Call`] and writes back whatever the loop answers.

use std::{
    io,
    net::IpAddr,
    os::unix::{
        fs::{FileTypeExt, MetadataExt, PermissionsExt},
        net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
    time::Instant,
};

use crate::status::Status;

mod client;
mod json;
mod table;
mod trace_stream;

pub use client::{call, call_status_json, call_text, call_with_timeout, map_io_error, ControlError};
pub use json::{encode_status, status_text};
pub use table::render_table;
#[cfg(test)]
use table::{human_duration, human_rate};

pub const DEFAULT_SOCKET: &str = "/run/lb-agent.sock";

/// How long one exchange may take, on either side.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// How long a reload may take before the client gives up waiting (it may resolve
/// new backends' MACs, `--resolve-timeout-secs`, and rewrite large tables).
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest request or response line accepted (a status of thousands of backends
/// fits easily).
const MAX_REQUEST: u64 = 64 * 1024;
const MAX_RESPONSE: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Part of the status: some services, or no backends (see `StatusFilter`).
    StatusOf(crate::status::StatusFilter),
    /// What `lb-agent status` prints, rendered by the agent: a `Text` answer with
    /// the table (or with `json`, the pretty JSON) of what `filter` selects. An
    /// agent from before this request answers "invalid request"; the client then
    /// asks with `Status` or `StatusOf` and renders the answer itself.
    StatusText {
        #[serde(default)]
        filter: crate::status::StatusFilter,
        #[serde(default)]
        json: bool,
    },
    /// Set a backend's weight to 0 at run time (in `service`, or in every service
    /// that has it); existing flows stay on it.
    Drain { backend: IpAddr, service: Option<String> },
    /// Give a drained backend its configured weight back.
    Undrain { backend: IpAddr, service: Option<String> },
    /// Re-read the configuration file now (as SIGHUP does) and answer with the
    /// outcome: the summary of what changed, or every error.
    Reload,
    /// Trace matching packets: a `Done` (started) or `Error` line, then one
    /// `TraceLine` per packet and `TraceNote`s, until either side closes.
    Trace(crate::trace::TraceRequest),
    /// End the running trace (sent by the connection task when its client leaves).
    TraceStop,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Status),
    Done { message: String },
    Error { message: String },
    TraceLine(crate::trace::TraceLine),
    TraceNote { message: String },
    /// `bytes` bytes of text follow this line, as they are (to `StatusText`: what
    /// `lb-agent status` prints), so a large text is neither escaped nor decoded.
    Text { bytes: u64 },
    /// An answer already encoded: its line (newline included), then `body` (the
    /// text of a `Text` line). The agent encodes a large status from where it
    /// keeps it instead of copying it into a `Status` answer first. Written as
    /// is; never decoded.
    #[serde(skip)]
    Encoded { line: Vec<u8>, body: Vec<u8> },
}

/// A request from a client with the way to answer it; the agent's event loop
/// receives these. Dropping `reply` without sending makes the client see an error.
#[derive(Debug)]
pub struct Call {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
    /// For `Trace`: where the agent sends the traced packets.
    pub stream: Option<mpsc::Sender<Response>>,
}

// ---------------------------------------------------------------------------------
// Agent side
// ---------------------------------------------------------------------------------

/// A bound control socket, not yet serving. Dropping it (or [`run`] returning)
/// removes the socket file, if the file is still this socket.
#[derive(Debug)]
pub struct Listener {
    listener: Option<StdUnixListener>,
    path: PathBuf,
    /// (st_dev, st_ino) of the socket file this listener created.
    id: (u64, u64),
}

impl Listener {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        remove_if_ours(&self.path, self.id);
    }
}

fn remove_if_ours(path: &Path, id: (u64, u64)) {
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && (meta.dev(), meta.ino()) == id
        && let Err(e) = std::fs::remove_file(path)
    {
        tracing::warn!("removing the control socket {}: {e}", path.display());
    }
}

/// Binds the control socket at `path`: mode 0600, owned by the running user.
///
/// A socket file nobody listens on (left by an agent that was killed) is removed
/// first. If an agent answers at `path`, or `path` is something other than a socket,
/// this fails (the first with `ErrorKind::AddrInUse`) and touches nothing.
///
/// The socket is bound under a temporary name in the same directory, given mode
/// 0600, and then hard-linked to `path`, so it is never reachable with looser
/// permissions and two agents starting at once cannot both take `path`.
/// Does not need a tokio runtime.
pub fn bind(path: &Path) -> io::Result<Listener> {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match StdUnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another lb-agent is already listening on the control socket {shown}; stop it first"),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!("removing the stale control socket {shown}");
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(with_context(e, format!("removing the stale control socket {shown}"))),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(with_context(e, format!("checking the existing control socket {shown}"))),
        },
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{shown} exists and is not a socket; refusing to replace it with the control socket"),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(with_context(e, format!("control socket {shown}"))),
    }

    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("control socket path {shown} has no file name")))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    // Leftover from an earlier crash of a process with our pid.
    let _ = std::fs::remove_file(&tmp);

    let listener = StdUnixListener::bind(&tmp).map_err(|e| with_context(e, format!("binding the control socket {}", tmp.display())))?;
    let result = (|| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another lb-agent created the control socket {shown} at the same time"),
            ));
        }
        Err(e) => return Err(with_context(e, format!("creating the control socket {shown}"))),
    }
    let meta = std::fs::symlink_metadata(path).map_err(|e| with_context(e, format!("control socket {shown}")))?;
    listener.set_nonblocking(true)?;
    Ok(Listener { listener: Some(listener), path: path.to_path_buf(), id: (meta.dev(), meta.ino()) })
}

fn with_context(e: io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Serves `listener` until `shutdown` turns true (or its sender is dropped), then
/// removes the socket file. Each connection is handled in its own task (aborted at
/// shutdown) and may take at most [`TIMEOUT`]; each request goes to `calls` as a
/// [`Call`]. Must run inside a tokio runtime.
pub async fn run(listener: Listener, calls: mpsc::Sender<Call>, shutdown: watch::Receiver<bool>) -> io::Result<()> {
    run_with_timeout(listener, calls, shutdown, TIMEOUT).await
}

/// [`bind`] then [`run`].
pub async fn serve(path: &Path, calls: mpsc::Sender<Call>, shutdown: watch::Receiver<bool>) -> io::Result<()> {
    run(bind(path)?, calls, shutdown).await
}

async fn run_with_timeout(
    mut listener: Listener,
    calls: mpsc::Sender<Call>,
    mut shutdown: watch::Receiver<bool>,
    timeout: Duration,
) -> io::Result<()> {
    let std_listener = listener.listener.take().expect("listener present until run");
    let socket = UnixListener::from_std(std_listener)?;
    tracing::info!("control socket listening on {}", listener.path.display());
    let mut tasks = JoinSet::new();
    let result = loop {
        if *shutdown.borrow_and_update() {
            break Ok(());
        }
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break Ok(());
                }
            }
            accepted = socket.accept() => match accepted {
                Ok((stream, _)) => {
                    tasks.spawn(handle(stream, calls.clone(), timeout));
                }
                Err(e) if is_transient_accept_error(&e) => {
                    tracing::warn!("control socket {}: accept: {e}", listener.path.display());
                    // EMFILE and the like: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => break Err(with_context(e, format!("control socket {}: accept", listener.path.display()))),
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    };
    tasks.abort_all();
    drop(socket);
    drop(listener); // removes the socket file
    result
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED | libc::EINTR | libc::EPROTO))
        || matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock)
}

/// One connection: one request line in, one response line out, within `timeout`.
async fn handle(stream: UnixStream, calls: mpsc::Sender<Call>, timeout: Duration) {
    let started = Instant::now();
    let deadline = started + timeout;
    // The socket file's mode already keeps other users out; this is a second check.
    if let Ok(cred) = stream.peer_cred() {
        let me = unsafe { libc::geteuid() };
        if cred.uid() != 0 && cred.uid() != me {
            let message = format!("permission denied: uid {} may not use the control socket", cred.uid());
            write_response(stream, &Response::Error { message }, deadline).await;
            return;
        }
    }
    let (read, write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST);
    match tokio::time::timeout_at(deadline, reader.read_line(&mut line)).await {
        Err(_) => {
            tracing::debug!("control socket: no request within {timeout:?}");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!("control socket: reading the request: {e}");
            return;
        }
        Ok(Ok(0)) => return,
        Ok(Ok(_)) => {}
    }
    let stream = match reader.into_inner().into_inner().reunite(write) {
        Ok(stream) => stream,
        Err(_) => return,
    };
    let response = match serde_json::from_str::<Request>(line.trim_end()) {
        Err(e) if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST => {
            Response::Error { message: format!("request longer than {MAX_REQUEST} bytes ({e})") }
        }
        Err(e) => Response::Error { message: format!("invalid request: {e}") },
        Ok(Request::Trace(req)) => return trace_stream::serve(stream, calls, req).await,
        Ok(request) => {
            tracing::debug!("control socket: {request:?}");
            let deadline = match request {
                Request::Reload => Instant::now() + RELOAD_TIMEOUT,
                _ => deadline,
            };
            let (reply, answer) = oneshot::channel();
            let exchange = async {
                if calls.send(Call { request, reply, stream: None }).await.is_err() {
                    return Response::Error { message: "the agent is shutting down".into() };
                }
                answer.await.unwrap_or_else(|_| Response::Error { message: "the agent dropped the request".into() })
            };
            match tokio::time::timeout_at(deadline, exchange).await {
                Ok(response) => response,
                Err(_) => Response::Error {
                    message: format!("the agent did not answer within {} s", deadline.duration_since(started).as_secs_f64()),
                },
            }
        }
    };
    // Leave a moment to deliver a timeout error even when the deadline has passed.
    write_response(stream, &response, deadline.max(Instant::now() + Duration::from_millis(500))).await;
}

async fn write_response(mut stream: UnixStream, response: &Response, deadline: Instant) {
    let (text, body) = match response {
        Response::Encoded { line, body } => (std::borrow::Cow::Borrowed(&line[..]), &body[..]),
        _ => {
            let mut text = match serde_json::to_vec(response) {
                Ok(text) => text,
                Err(e) => serde_json::to_vec(&Response::Error { message: format!("encoding the answer: {e}") })
                    .expect("a plain error encodes"),
            };
            text.push(b'\n');
            (std::borrow::Cow::Owned(text), &[][..])
        }
    };
    let write = async {
        stream.write_all(&text).await?;
        stream.write_all(body).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout_at(deadline, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("control socket: writing the answer: {e}"),
        Err(_) => tracing::debug!("control socket: the client did not take the answer in time"),
    }
}

// ---------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------

/// Pretty JSON of the whole status (for `lb-agent status --json`).
pub fn render_json(status: &Status) -> String {
    // Status holds only strings, numbers, addresses and vectors: encoding cannot fail
    // (NaN rates become null).
    serde_json::to_string_pretty(status).expect("Status encodes as JSON")
}

#[cfg(test)]
mod tests;
