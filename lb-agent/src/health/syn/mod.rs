//! TCP probes without a socket per probe.
//!
//! A TCP probe is SYN, SYN-ACK, RST (see `tcp` in `probe.rs`). [`SynProber`] sends the
//! SYN from a raw socket, one per address family, and matches the answer there: a
//! SYN-ACK is a success, an RST a refusal. No socket, local port or epoll registration
//! is made per probe, and the RST that ends the half-open connection comes from the
//! kernel itself, which resets any SYN-ACK that no socket owns. The packets on the
//! wire are those of the connect-based probe.
//!
//! - Source ports: a pool of TCP sockets bound to ports of the ephemeral range and never
//!   listening. They keep other sockets off those ports (`connect` skips bound ports)
//!   while no socket takes the SYN-ACKs. Each target's probes take the pool's ports in
//!   turn, so it sees the same 4-tuple again only every [`POOL`] probes, and two probes
//!   in flight never share one (the backend would take the second SYN for a stray
//!   segment of the first connection and not answer it); when every port is in flight
//!   to a target already, the probe opens a socket instead.
//! - IPv4: the raw socket writes the IP header too (`IP_HDRINCL`) with the source
//!   address the route to the target gives, since the TCP checksum covers it. It is
//!   found by connecting a UDP socket (which sends nothing) and kept per destination
//!   until the host's addresses, routes or routing rules change (rtnetlink multicast)
//!   or a probe to that destination fails. IPv6: the kernel picks the source and fills
//!   in the checksum (`IPV6_CHECKSUM`).
//! - A classic BPF filter on each raw socket passes only TCP segments to the pool's
//!   ports: a raw TCP socket otherwise gets a copy of every TCP segment the host
//!   receives.
//!
//! Raw sockets need `CAP_NET_RAW`; without them the probes open a socket each
//! (`probe.rs`).

use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

mod wire;
use wire::{filter, parse, syn_v4, tcp_syn};

/// Source ports per address family.
pub(super) const POOL: usize = 8;

/// How a target answered a SYN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    SynAck,
    Reset,
}

/// A probe in flight: the target's address and port, and the source port.
type Key = (IpAddr, u16, u16);
/// The probe in flight on a 4-tuple: its SYN's sequence number (the answer
/// acknowledges it plus one) and where its answer goes.
type Pending = Arc<Mutex<HashMap<Key, (u32, oneshot::Sender<Answer>)>>>;

/// Sends the SYNs of TCP probes and matches their answers (see the module's text).
/// Must be created within a Tokio runtime; dropping it stops its receiving tasks
/// (each [`Family`]'s).
pub(super) struct SynProber {
    v4: Option<Family>,
    v6: Option<Family>,
}

impl SynProber {
    /// Opens the raw sockets of both families. A family whose socket cannot be opened
    /// is left out (its probes then use `connect`); fails only if neither opens.
    pub(super) fn new() -> io::Result<SynProber> {
        let v4 = Family::open(false);
        let v6 = Family::open(true);
        match (v4, v6) {
            (Err(e), Err(_)) => Err(e),
            (v4, v6) => {
                if let Err(e) = &v6 {
                    tracing::warn!("tcp probes to IPv6 backends open a socket each: {e}");
                }
                if let Err(e) = &v4 {
                    tracing::warn!("tcp probes to IPv4 backends open a socket each: {e}");
                }
                Ok(SynProber {
                    v4: v4.ok(),
                    v6: v6.ok(),
                })
            }
        }
    }

    /// The source ports of each family (IPv4, IPv6), for the log.
    pub(super) fn ports(&self) -> (Vec<u16>, Vec<u16>) {
        let ports = |f: &Option<Family>| f.as_ref().map(|f| f.ports.clone()).unwrap_or_default();
        (ports(&self.v4), ports(&self.v6))
    }

    /// Whether probes to `target` go through this prober.
    pub(super) fn handles(&self, target: SocketAddr) -> bool {
        self.family(target).is_some()
    }

    fn family(&self, target: SocketAddr) -> Option<&Family> {
        match target {
            SocketAddr::V4(_) => self.v4.as_ref(),
            SocketAddr::V6(_) => self.v6.as_ref(),
        }
    }

    /// One probe: `Ok` on a SYN-ACK, `Err` on an RST or a local failure. Waits until
    /// an answer comes (the caller bounds it with the probe's timeout). `turn` picks
    /// the source port (the caller counts its probes). `None`: no raw socket for the
    /// target's family, or every source port already has a probe in flight to it.
    pub(super) async fn probe(
        &self,
        target: SocketAddr,
        turn: usize,
    ) -> Option<Result<(), String>> {
        self.family(target)?.probe(target, turn).await
    }
}

/// The raw socket of one address family, its source ports and its waiting probes.
struct Family {
    raw: Arc<AsyncFd<Socket>>,
    ports: Vec<u16>,
    /// Keep `ports` bound.
    _reserved: Vec<Socket>,
    pending: Pending,
    /// IPv4: finds and keeps the source address of each destination.
    route: Option<Sources>,
    receiver: JoinHandle<()>,
}

/// The source address of the route to each IPv4 destination, as `connect` would pick
/// it, kept until the routing may have changed.
struct Sources {
    /// Connected to each destination in turn to learn the source.
    udp: Mutex<UdpSocket>,
    /// Destination -> (source, the `changes` count it was found under).
    known: Mutex<HashMap<Ipv4Addr, (Ipv4Addr, u64)>>,
    /// Bumped on every address, route or rule change the kernel announces.
    changes: Arc<AtomicU64>,
    watcher: JoinHandle<()>,
}

/// Most destinations kept (the cache starts over beyond).
const MAX_SOURCES: usize = 1 << 16;

impl Sources {
    fn new() -> io::Result<Sources> {
        use netlink_sys::AsyncSocket;
        let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        let (mut conn, _handle, mut messages) = rtnetlink::new_connection()?;
        let groups = rtnetlink::constants::RTMGRP_IPV4_IFADDR
            | rtnetlink::constants::RTMGRP_IPV4_ROUTE
            | rtnetlink::constants::RTMGRP_IPV4_RULE;
        conn.socket_mut()
            .socket_mut()
            .bind(&netlink_sys::SocketAddr::new(0, groups))?;
        let changes = Arc::new(AtomicU64::new(0));
        let seen = changes.clone();
        let watcher = tokio::spawn(async move {
            use futures::StreamExt;
            let conn = tokio::spawn(conn);
            // Any message at all: an address, route or rule changed.
            while messages.next().await.is_some() {
                seen.fetch_add(1, Ordering::Relaxed);
            }
            // The connection ended (it should not): no longer keep sources.
            seen.store(u64::MAX, Ordering::Relaxed);
            conn.abort();
        });
        Ok(Sources {
            udp: Mutex::new(udp),
            known: Mutex::new(HashMap::new()),
            changes,
            watcher,
        })
    }

    fn source(&self, dst: Ipv4Addr) -> io::Result<Ipv4Addr> {
        let now = self.changes.load(Ordering::Relaxed);
        let known = |map: &HashMap<Ipv4Addr, (Ipv4Addr, u64)>| {
            map.get(&dst)
                .filter(|(_, at)| *at == now && now != u64::MAX)
                .map(|(src, _)| *src)
        };
        if let Some(src) = known(&self.known.lock().unwrap_or_else(PoisonError::into_inner)) {
            return Ok(src);
        }
        let src = {
            let udp = self.udp.lock().unwrap_or_else(PoisonError::into_inner);
            // Dissolve the previous association first: a connected UDP socket keeps the
            // source address it got at its first connect.
            disconnect(&udp)?;
            udp.connect((dst, 9))?;
            match udp.local_addr()?.ip() {
                IpAddr::V4(src) if !src.is_unspecified() => src,
                other => return Err(io::Error::other(format!("source address {other}"))),
            }
        };
        let mut map = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_SOURCES {
            map.clear();
        }
        map.insert(dst, (src, now));
        Ok(src)
    }

    /// A probe to `dst` failed: find its source again next time.
    fn forget(&self, dst: Ipv4Addr) {
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&dst);
    }
}

impl Drop for Sources {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl Drop for Family {
    fn drop(&mut self) {
        self.receiver.abort();
    }
}

impl Family {
    fn open(v6: bool) -> io::Result<Family> {
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        let what = if v6 { "IPv6" } else { "IPv4" };
        let context = |step: &'static str| {
            move |e: io::Error| {
                let hint = if e.kind() == io::ErrorKind::PermissionDenied {
                    " (raw sockets need CAP_NET_RAW)"
                } else {
                    ""
                };
                io::Error::new(e.kind(), format!("{step} ({what}): {e}{hint}"))
            }
        };
        let raw = Socket::new(domain, Type::RAW, Some(Protocol::TCP))
            .map_err(context("cannot open a raw TCP socket"))?;
        let mut reserved = Vec::with_capacity(POOL);
        let mut ports = Vec::with_capacity(POOL);
        for _ in 0..POOL {
            let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))
                .map_err(context("cannot open a TCP socket"))?;
            let any = if v6 {
                s.set_only_v6(true).map_err(context("IPV6_V6ONLY"))?;
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
            } else {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
            };
            s.bind(&any.into())
                .map_err(context("cannot reserve a source port"))?;
            let port = s
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .map(|a| a.port())
                .ok_or_else(|| io::Error::other("a reserved port without an address"))?;
            ports.push(port);
            reserved.push(s);
        }
        raw.attach_filter(&filter(v6, &ports))
            .map_err(context("cannot attach the socket filter"))?;
        if v6 {
            // The offset of the TCP checksum.
            set_int_option(&raw, libc::IPPROTO_IPV6, libc::IPV6_CHECKSUM, 16)
                .map_err(context("IPV6_CHECKSUM"))?;
        } else {
            raw.set_header_included_v4(true)
                .map_err(context("IP_HDRINCL"))?;
        }
        // Room for the answers to a burst of SYNs (up to the checker's concurrency,
        // 256 at once by default): a full receive buffer drops answers, and their
        // probes fail. Beyond net.core.rmem_max/wmem_max where CAP_NET_ADMIN allows.
        if set_int_option(&raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, BUFFER).is_err() {
            let _ = raw.set_recv_buffer_size(BUFFER as usize);
        }
        if set_int_option(&raw, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, BUFFER).is_err() {
            let _ = raw.set_send_buffer_size(BUFFER as usize);
        }
        raw.set_nonblocking(true).map_err(context("O_NONBLOCK"))?;
        let route = if v6 {
            None
        } else {
            Some(Sources::new().map_err(context("cannot watch the routes"))?)
        };
        // SAFETY: the AsyncFd owns the socket, whose fd stays open and the same until
        // the AsyncFd is dropped.
        let raw = unsafe { AsyncFd::register(raw) }
            .map_err(|e| context("cannot register the raw socket")(io::Error::from(e)))?;
        let raw = Arc::new(raw);
        let pending = Pending::default();
        let receiver = tokio::spawn(receive(raw.clone(), v6, ports.clone(), pending.clone()));
        Ok(Family {
            raw,
            ports,
            _reserved: reserved,
            pending,
            route,
            receiver,
        })
    }

    async fn probe(&self, target: SocketAddr, turn: usize) -> Option<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        let isn: u32 = rand::random();
        let waiting = Waiting::new(&self.pending, &self.ports, target, turn, isn, tx)?;
        // Unless the probe succeeds (it may also be dropped at its timeout), look the
        // source address up again next time.
        let mut forget = match (&self.route, target.ip()) {
            (Some(sources), IpAddr::V4(dst)) => Some(Forget {
                sources,
                dst,
                armed: true,
            }),
            _ => None,
        };
        let result = self.attempt(target, waiting.key.2, isn, rx).await;
        if let (Ok(()), Some(forget)) = (&result, &mut forget) {
            forget.armed = false;
        }
        Some(result)
    }

    async fn attempt(
        &self,
        target: SocketAddr,
        port: u16,
        isn: u32,
        answer: oneshot::Receiver<Answer>,
    ) -> Result<(), String> {
        let syn = match target.ip() {
            IpAddr::V4(dst) => {
                let src = self
                    .source_v4(dst)
                    .map_err(|e| format!("no route to {dst}: {e}"))?;
                syn_v4(src, dst, port, target.port(), isn)
            }
            IpAddr::V6(_) => tcp_syn(port, target.port(), isn, None),
        };
        // The port of a raw socket's destination must be 0 (or the protocol).
        let to = SockAddr::from(match target {
            SocketAddr::V4(t) => SocketAddr::V4(SocketAddrV4::new(*t.ip(), 0)),
            SocketAddr::V6(t) => SocketAddr::V6(SocketAddrV6::new(*t.ip(), 0, 0, t.scope_id())),
        });
        self.raw
            .async_io(Interest::WRITABLE, |raw| raw.send_to(&syn, &to))
            .await
            .map_err(|e| format!("send a SYN to {target}: {e}"))?;
        match answer.await {
            Ok(Answer::SynAck) => Ok(()),
            Ok(Answer::Reset) => Err(format!(
                "connect to {target}: refused (the SYN was answered with an RST)"
            )),
            Err(_) => Err("the probe's receiver stopped".to_string()),
        }
    }

    /// The source address the route to `dst` gives (as `connect` would pick it).
    fn source_v4(&self, dst: Ipv4Addr) -> io::Result<Ipv4Addr> {
        self.route
            .as_ref()
            .ok_or_else(|| io::Error::other("no route socket"))?
            .source(dst)
    }
}

/// Socket buffer size of the raw sockets.
const BUFFER: libc::c_int = 4 << 20;

/// `setsockopt` of an integer option (one socket2 does not offer).
fn set_int_option(
    socket: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt with a pointer to a c_int and its size, on an open fd.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `connect(AF_UNSPEC)`: forgets a UDP socket's peer and the source address it chose.
fn disconnect(udp: &UdpSocket) -> io::Result<()> {
    // SAFETY: a zeroed sockaddr with family AF_UNSPEC and its size, on an open fd.
    let rc = unsafe {
        let mut unspec: libc::sockaddr = std::mem::zeroed();
        unspec.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(udp),
            &raw const unspec,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Forgets the source address of `dst` when dropped armed.
struct Forget<'a> {
    sources: &'a Sources,
    dst: Ipv4Addr,
    armed: bool,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.sources.forget(self.dst);
        }
    }
}

/// A probe's entry in the pending table, removed when the probe ends (answered,
/// timed out or cancelled).
struct Waiting<'a> {
    pending: &'a Pending,
    key: Key,
    isn: u32,
}

impl<'a> Waiting<'a> {
    /// Takes the first of `ports`, from `turn` on, with no probe in flight to
    /// `target`; `None` if there is none.
    fn new(
        pending: &'a Pending,
        ports: &[u16],
        target: SocketAddr,
        turn: usize,
        isn: u32,
        tx: oneshot::Sender<Answer>,
    ) -> Option<Waiting<'a>> {
        let mut map = pending.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (0..ports.len())
            .map(|i| (target.ip(), target.port(), ports[(turn + i) % ports.len()]))
            .find(|key| !map.contains_key(key))?;
        map.insert(key, (isn, tx));
        Some(Waiting { pending, key, isn })
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut map = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        // Unless the answer took it, and another probe has the 4-tuple since.
        if map.get(&self.key).is_some_and(|(isn, _)| *isn == self.isn) {
            map.remove(&self.key);
        }
    }
}

/// Reads the raw socket and hands each answer to its probe.
async fn receive(raw: Arc<AsyncFd<Socket>>, v6: bool, ports: Vec<u16>, pending: Pending) {
    // Enough for the IPv4 header with options and the TCP header's first 20 bytes;
    // the rest of a segment is cut off.
    let mut buf = [MaybeUninit::<u8>::uninit(); 128];
    loop {
        let Ok(mut ready) = raw.readable().await else {
            return;
        };
        loop {
            match ready.try_io(|raw| raw.get_ref().recv_from(&mut buf)) {
                Ok(Ok((n, from))) => {
                    // SAFETY: recv_from initialised the first n bytes.
                    let data = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
                    let Some(from) = from.as_socket() else {
                        continue;
                    };
                    if let Some((key, acked, answer)) = parse(data, v6, from.ip(), &ports) {
                        let mut map = pending.lock().unwrap_or_else(PoisonError::into_inner);
                        // An answer to this probe's SYN, not to an earlier one's.
                        if map.get(&key).is_some_and(|(isn, _)| *isn == acked) {
                            if let Some((_, tx)) = map.remove(&key) {
                                let _ = tx.send(answer);
                            }
                        }
                    }
                }
                Ok(Err(e)) => {
                    // Wait for the next readiness rather than spin on the error.
                    tracing::debug!("tcp probes: receive: {e}");
                    ready.clear_ready();
                    break;
                }
                Err(_would_block) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests;
