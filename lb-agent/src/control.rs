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
//! The socket file is mode 0600 and owned by the user the agent runs as (root), so
//! only that user can connect; others get EACCES from `connect` at once. The agent
//! side ([`bind`] + [`run`], or [`serve`]) forwards each request to the agent's event
//! loop as a [`Call`] and writes back whatever the loop answers.

use std::{
    fmt::Write as _,
    io::{self, BufRead, BufReader, Read, Write},
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

use crate::status::{BackendStatus, ServiceStatus, Status};

mod json;
mod trace_stream;

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
    let mut text = match serde_json::to_string(response) {
        Ok(text) => text,
        Err(e) => serde_json::to_string(&Response::Error { message: format!("encoding the answer: {e}") })
            .expect("a plain error encodes"),
    };
    text.push('\n');
    let write = async {
        stream.write_all(text.as_bytes()).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout_at(deadline, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("control socket: writing the answer: {e}"),
        Err(_) => tracing::debug!("control socket: the client did not take the answer in time"),
    }
}

// ---------------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------------

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

/// Sends `request` and returns the answer line as it came.
fn call_line(path: &Path, request: &Request, timeout: Duration) -> Result<String, ControlError> {
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
    BufReader::new((&stream).take(MAX_RESPONSE)).read_line(&mut answer).map_err(|e| match e.kind() {
        // The agent closed on us (e.g. its own timeout) while we were still writing.
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => ControlError::NoAnswer { path: path.to_path_buf() },
        io::ErrorKind::InvalidData => ControlError::Protocol { path: path.to_path_buf(), message: "not UTF-8".into() },
        _ => io_err(e),
    })?;
    if answer.is_empty() {
        return Err(ControlError::NoAnswer { path: path.to_path_buf() });
    }
    Ok(answer)
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

/// A table in the manner of `ipvsadm -Ln --rate`:
///
/// ```text
/// lb-agent on eth0 (native XDP), up 1h 2m 3s, reloads 2 ok, 0 failed, config /etc/lb/lb.yaml
/// Prot LocalAddress:Port Scheduler (Name)  Weight  Health  ActiveConn  InActConn  Pkts/s  Bytes/s
///   -> RemoteAddress:Port
/// TCP  198.18.1.10:80 maglev (web)                                  13          4    1.5K     1.2M
///   -> 198.18.0.11:80                           1  up              12          3    1.2K   980.0K
///   -> 198.18.0.12:80                           0  up               1          1     300   240.0K  drained (file: 3)
/// ```
///
/// Ports show as `*` for "any port" services, IPv6 addresses in brackets.
/// ActiveConn and InActConn are `ipvsadm`'s: established TCP connections and the
/// other live flows, from the connection table (see `conntrack.rs`); the service
/// line sums its backends'. Rates use K/M/G (powers of 1000). Notes after
/// the numbers: `backup`, `drained (file: W)`, `weight W in file` when the weight in
/// force differs from the file for another reason, and on a service line
/// `backups serving`.
pub fn render_table(status: &Status) -> String {
    let mut out = String::new();
    let mode = if status.attach_mode.is_empty() { "unknown".to_string() } else { status.attach_mode.clone() };
    let _ = write!(
        out,
        "lb-agent on {} ({} XDP), up {}, reloads {} ok, {} failed",
        if status.iface.is_empty() { "?" } else { &status.iface },
        mode,
        human_duration(status.uptime_secs),
        status.reloads_ok,
        status.reloads_failed
    );
    if !status.config_path.is_empty() {
        let _ = write!(out, ", config {}", status.config_path);
    }
    out.push('\n');
    if let Some(a) = &status.announce {
        let vips: Vec<String> = a.vips.iter().map(|v| v.to_string()).collect();
        let vips = if vips.is_empty() { "nothing (no VIP has a usable backend)".to_string() } else { vips.join(", ") };
        let _ = writeln!(out, "announcing in routing table {}: {vips}", a.table);
    }

    struct Row {
        first: String,
        weight: String,
        health: String,
        active: String,
        inactive: String,
        pps: String,
        bps: String,
        notes: Vec<String>,
    }
    let header = Row {
        first: "Prot LocalAddress:Port Scheduler (Name)".into(),
        weight: "Weight".into(),
        health: "Health".into(),
        active: "ActiveConn".into(),
        inactive: "InActConn".into(),
        pps: "Pkts/s".into(),
        bps: "Bytes/s".into(),
        notes: vec![],
    };
    let mut rows = vec![header];
    for s in &status.services {
        rows.push(service_row(s));
        for b in &s.backends {
            rows.push(backend_row(s, b));
        }
    }
    fn service_row(s: &ServiceStatus) -> Row {
        let proto = if s.protocol.is_empty() { "?".to_string() } else { s.protocol.to_uppercase() };
        let mut first = format!("{proto:<4} {}", endpoint(s.vip, s.port));
        if let (Some(len), Some(pos)) = (s.vip_prefix, first.rfind(':')) {
            // A prefix service: `198.18.50.0/24:80`, `[2001:db8:100::/56]:80`.
            let at = if first[..pos].ends_with(']') { pos - 1 } else { pos };
            first.insert_str(at, &format!("/{len}"));
        }
        if !s.scheduler.is_empty() {
            let _ = write!(first, " {}", s.scheduler);
        }
        if !s.name.is_empty() {
            let _ = write!(first, " ({})", s.name);
        }
        let mut notes = vec![];
        if !s.forwarding.is_empty() && s.forwarding != "dr" {
            notes.push(format!("forwarding {}", s.forwarding));
        }
        if s.using_backups {
            notes.push("backups serving".to_string());
        }
        Row {
            first,
            weight: String::new(),
            health: String::new(),
            active: s.backends.iter().map(|b| u64::from(b.active_conns)).sum::<u64>().to_string(),
            inactive: s.backends.iter().map(|b| u64::from(b.inactive_conns)).sum::<u64>().to_string(),
            pps: human_rate(s.packets_per_sec),
            bps: human_rate(s.bytes_per_sec),
            notes,
        }
    }
    fn backend_row(s: &ServiceStatus, b: &BackendStatus) -> Row {
        let mut notes = vec![];
        if b.backup {
            notes.push("backup".to_string());
        }
        if b.drained {
            notes.push(format!("drained (file: {})", b.config_weight));
        } else if b.weight != b.config_weight {
            notes.push(format!("weight {} in file", b.config_weight));
        }
        Row {
            first: format!("  -> {}", endpoint(b.address, s.port)),
            weight: b.weight.to_string(),
            health: if b.health.is_empty() { "?".into() } else { b.health.clone() },
            active: b.active_conns.to_string(),
            inactive: b.inactive_conns.to_string(),
            pps: human_rate(b.packets_per_sec),
            bps: human_rate(b.bytes_per_sec),
            notes,
        }
    }

    let width = |f: fn(&Row) -> &str| rows.iter().map(|r| f(r).chars().count()).max().unwrap_or(0);
    let w_first = width(|r| &r.first).max("  -> RemoteAddress:Port".len());
    let w_weight = width(|r| &r.weight);
    let w_health = width(|r| &r.health);
    let w_active = width(|r| &r.active);
    let w_inactive = width(|r| &r.inactive);
    let w_pps = width(|r| &r.pps);
    let w_bps = width(|r| &r.bps);
    for (i, r) in rows.iter().enumerate() {
        let mut line = format!(
            "{:<w_first$}  {:>w_weight$}  {:<w_health$}  {:>w_active$}  {:>w_inactive$}  {:>w_pps$}  {:>w_bps$}",
            r.first, r.weight, r.health, r.active, r.inactive, r.pps, r.bps
        );
        if !r.notes.is_empty() {
            line.push_str("  ");
            line.push_str(&r.notes.join(", "));
        }
        out.push_str(line.trim_end());
        out.push('\n');
        if i == 0 {
            out.push_str("  -> RemoteAddress:Port\n");
        }
    }
    if status.services.is_empty() {
        out.push_str("(no services)\n");
    }

    let ct = &status.conntrack;
    if ct.new_capacity > 0 {
        let protected = if ct.established_capacity == 0 {
            "established table off".to_string()
        } else {
            format!(
                "established {}/{} ({} closing), expired {}",
                ct.established + ct.closing,
                ct.established_capacity,
                ct.closing,
                ct.expired_total
            )
        };
        let _ = writeln!(out, "conntrack: new-flow LRU {} entries; {protected}", ct.new_capacity);
    }
    let outcomes: Vec<String> = status.outcomes.iter().filter(|(_, v)| *v != 0).map(|(k, v)| format!("{k}={v}")).collect();
    if !outcomes.is_empty() {
        let _ = writeln!(out, "outcomes: {}", outcomes.join(" "));
    }
    out
}

/// `198.18.1.10:80`, `[2001:db8::10]:80`, `198.18.1.10:*` for port 0 (any port),
/// `-` for a missing address.
fn endpoint(address: Option<IpAddr>, port: u16) -> String {
    let port = if port == 0 { "*".to_string() } else { port.to_string() };
    match address {
        Some(IpAddr::V4(a)) => format!("{a}:{port}"),
        Some(IpAddr::V6(a)) => format!("[{a}]:{port}"),
        None => format!("-:{port}"),
    }
}

/// `950`, `1.2K`, `45.0M`, `3.1G` (powers of 1000, one decimal above 1000).
fn human_rate(v: f64) -> String {
    if !v.is_finite() || v < 0.0 {
        return "-".into();
    }
    if v.round() < 1000.0 {
        return format!("{}", v.round() as u64);
    }
    let mut scaled = v;
    for unit in ["K", "M", "G", "T"] {
        scaled /= 1000.0;
        if (scaled * 10.0).round() / 10.0 < 1000.0 || unit == "T" {
            return format!("{scaled:.1}{unit}");
        }
    }
    unreachable!()
}

/// `42s`, `5m 3s`, `2h 0m 7s`, `3d 4h 5m`.
fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m"),
    }
}

#[cfg(test)]
mod tests;
