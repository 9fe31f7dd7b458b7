//! One probe attempt: TCP connect, UDP request/reply, a command (HTTP is in `http.rs`).

use std::error::Error;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use socket2::SockRef;
use tokio::net::{TcpSocket, UdpSocket};
use tokio::process::Command;

use super::http::HttpClient;
use super::syn::SynProber;
use super::{ExecProbe, ProbeKind, ProbeSpec, UdpProbe};

/// What a probe needs to know besides its target.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProbeContext {
    /// The service's name, given to `exec` probes as `LB_SERVICE`.
    pub service: String,
}

/// Runs one probe attempt against `target` (address and port already resolved by the
/// caller, e.g. with [`ProbeSpec::target`]).
///
/// Returns how long the probe took, or why it failed. A probe that takes longer than
/// `spec.timeout` fails (an `exec` probe's command is then killed). Kind `none` always
/// succeeds.
pub async fn probe_once(
    spec: &ProbeSpec,
    target: SocketAddr,
    ctx: &ProbeContext,
) -> Result<Duration, String> {
    Prober::new(spec, target, None).run(ctx).await
}

/// A probe prepared for repeated use against one target (an HTTP client is built once).
pub(super) struct Prober {
    spec: ProbeSpec,
    target: SocketAddr,
    /// The HTTP client for http/https probes, or why it could not be built.
    http: Option<Result<HttpClient, String>>,
    /// For tcp probes: sends the SYNs from a raw socket, if it can reach `target`.
    syn: Option<Arc<SynProber>>,
    /// Counts the probes through `syn` (picks their source ports in turn); starts
    /// anywhere, so that targets spread over the ports.
    turn: AtomicUsize,
}

impl Prober {
    /// With `syn`, tcp probes to the families it handles go through it; others open a
    /// socket each.
    pub(super) fn new(spec: &ProbeSpec, target: SocketAddr, syn: Option<Arc<SynProber>>) -> Prober {
        let http = match &spec.kind {
            ProbeKind::Http(http) => Some(HttpClient::new(http, false, target, spec.timeout)),
            ProbeKind::Https(http) => Some(HttpClient::new(http, true, target, spec.timeout)),
            _ => None,
        };
        let syn = syn.filter(|syn| matches!(spec.kind, ProbeKind::Tcp) && syn.handles(target));
        Prober {
            spec: spec.clone(),
            target,
            http,
            syn,
            turn: AtomicUsize::new(rand::random::<u8>().into()),
        }
    }

    /// One attempt: `Ok(latency)` or `Err(reason)`, the reason starting with the kind.
    pub(super) async fn run(&self, ctx: &ProbeContext) -> Result<Duration, String> {
        let started = Instant::now();
        let timeout = self.spec.timeout;
        let kind = self.spec.kind.name();
        let result = match &self.spec.kind {
            ProbeKind::None => Ok(()),
            // The command is killed on timeout by `exec` itself.
            ProbeKind::Exec(exec) => run_exec(exec, self.target, ctx, timeout).await,
            other => {
                let attempt = async {
                    match other {
                        ProbeKind::Tcp => {
                            let raw = match &self.syn {
                                Some(syn) => {
                                    let turn = self.turn.fetch_add(1, Ordering::Relaxed);
                                    syn.probe(self.target, turn).await
                                }
                                None => None,
                            };
                            match raw {
                                Some(result) => result,
                                None => tcp(self.target).await,
                            }
                        }
                        ProbeKind::Udp(udp) => run_udp(udp, self.target).await,
                        ProbeKind::Http(_) | ProbeKind::Https(_) => match &self.http {
                            Some(Ok(client)) => client.get().await,
                            Some(Err(e)) => Err(e.clone()),
                            None => Err("no HTTP client".to_string()),
                        },
                        ProbeKind::None | ProbeKind::Exec(_) => Ok(()),
                    }
                };
                tokio::time::timeout(timeout, attempt)
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
            }
        };
        result
            .map(|()| started.elapsed())
            .map_err(|e| format!("{kind}: {e}"))
    }
}

/// A TCP probe: the backend's kernel answers the SYN with a SYN-ACK, and the probe
/// ends the connection with an RST at once, without completing the handshake. (This
/// is the probe with a socket of its own; `syn.rs` sends the same packets without.)
///
/// The SYN-ACK shows what a full connect would: a socket listens on the port and its
/// accept queue has room (Linux drops SYNs to a listener whose queue is full). Ending
/// there costs each side two packets fewer, the backend's application never sees the
/// probe, and the agent keeps no TIME-WAIT socket per probe (5,000 probes/s would
/// otherwise hold 300,000, beyond the kernel's default limit). How: with quick ACKs
/// off, Linux sends the handshake's last ACK only with data or after a delayed-ACK
/// timeout (200 ms); the probe closes well before that, with `SO_LINGER` 0, which
/// sends an RST, which the backend's kernel takes as the end of the half-open
/// connection. Should the ACK be sent first, the handshake completes and the RST
/// closes an established connection: the probe succeeds either way.
async fn tcp(target: SocketAddr) -> Result<(), String> {
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| format!("cannot open a socket: {e}"))?;
    let options = SockRef::from(&socket);
    options
        .set_tcp_quickack(false)
        .and_then(|()| options.set_linger(Some(Duration::ZERO)))
        .map_err(|e| format!("cannot set the socket's options: {e}"))?;
    let stream = socket
        .connect(target)
        .await
        .map_err(|e| format!("connect to {target}: {e}"))?;
    drop(stream);
    Ok(())
}

async fn run_udp(udp: &UdpProbe, target: SocketAddr) -> Result<(), String> {
    let local: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|e| format!("cannot open a socket: {e}"))?;
    // A connected socket receives only the target's replies, and its ICMP errors.
    socket
        .connect(target)
        .await
        .map_err(|e| format!("connect to {target}: {e}"))?;
    socket
        .send(&udp.payload)
        .await
        .map_err(|e| format!("send to {target}: {e}"))?;
    let mut reply = vec![0u8; 65536];
    let n = socket.recv(&mut reply).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            format!("{target} is unreachable (ICMP port unreachable)")
        } else {
            format!("receive from {target}: {e}")
        }
    })?;
    let reply = &reply[..n];
    match &udp.expect {
        Some(expect) if reply != expect.as_slice() => Err(format!(
            "unexpected reply {:?} (expected {:?})",
            String::from_utf8_lossy(&reply[..reply.len().min(64)]),
            String::from_utf8_lossy(expect)
        )),
        _ => Ok(()),
    }
}

/// Runs the command in its own process group; kills the group if it outlives `timeout`.
async fn run_exec(
    exec: &ExecProbe,
    target: SocketAddr,
    ctx: &ProbeContext,
    timeout: Duration,
) -> Result<(), String> {
    let Some((program, args)) = exec.command.split_first() else {
        return Err("empty command".to_string());
    };
    let mut child = Command::new(program)
        .args(args)
        .env("LB_SERVICE", &ctx.service)
        .env("LB_BACKEND_ADDRESS", target.ip().to_string())
        .env("LB_BACKEND_PORT", target.port().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{program} failed: {status}")),
        Ok(Err(e)) => Err(format!("waiting for {program}: {e}")),
        Err(_) => {
            if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
                // The command leads its own process group: end whatever it started too.
                // SAFETY: kill(2) with a negative pid signals that process group only.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
            }
            // Kills the child (if the group kill missed it) and reaps it.
            let _ = child.kill().await;
            Err(format!(
                "{program} did not finish within {timeout:?} and was killed"
            ))
        }
    }
}

/// An error and its sources, joined with ": ".
pub(super) fn error_chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}
