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

use socket2::{Domain, Protocol, SockAddr, SockFilter, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

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

/// What a segment answers: from `from`, to one of `ports`, a SYN-ACK or an RST
/// acknowledging a SYN; its 4-tuple and the sequence number of the SYN it
/// acknowledges. IPv4 segments come with their IP header, IPv6 ones without.
fn parse(data: &[u8], v6: bool, from: IpAddr, ports: &[u16]) -> Option<(Key, u32, Answer)> {
    let tcp = if v6 {
        data
    } else {
        let ihl = usize::from(*data.first()? & 0x0f) * 4;
        data.get(ihl..)?
    };
    let tcp = tcp.get(..14)?;
    let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let flags = tcp[13];
    if !ports.contains(&dport) || flags & ACK == 0 {
        return None;
    }
    let answer = if flags & RST != 0 {
        Answer::Reset
    } else if flags & SYN != 0 {
        Answer::SynAck
    } else {
        return None;
    };
    Some(((from, sport, dport), ack.wrapping_sub(1), answer))
}

const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;
/// TCP header with one option, the MSS.
const TCP_LEN: usize = 24;

/// A SYN's TCP header; with `pseudo` (the IPv4 pseudo-header's sum), its checksum.
fn tcp_syn(sport: u16, dport: u16, isn: u32, pseudo: Option<u32>) -> Vec<u8> {
    let mut h = vec![0u8; TCP_LEN];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..8].copy_from_slice(&isn.to_be_bytes());
    h[12] = ((TCP_LEN / 4) as u8) << 4;
    h[13] = SYN;
    h[14..16].copy_from_slice(&64240u16.to_be_bytes());
    // MSS 1460 (the backend's answer is never used for data).
    h[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]);
    if let Some(pseudo) = pseudo {
        let sum = checksum(&h, pseudo);
        h[16..18].copy_from_slice(&sum.to_be_bytes());
    }
    h
}

/// An IPv4 packet carrying a SYN (for `IP_HDRINCL`: the kernel fills in the total
/// length, the identification and the header checksum).
fn syn_v4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, isn: u32) -> Vec<u8> {
    let mut pseudo = 0u32;
    for a in [src.octets(), dst.octets()] {
        pseudo += u32::from(u16::from_be_bytes([a[0], a[1]]))
            + u32::from(u16::from_be_bytes([a[2], a[3]]));
    }
    pseudo += 6 + TCP_LEN as u32;
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + TCP_LEN) as u16).to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64; // TTL
    p[9] = 6; // TCP
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p.extend_from_slice(&tcp_syn(sport, dport, isn, Some(pseudo)));
    p
}

/// The Internet checksum of `data`, starting from the partial sum `initial`.
fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([
            pair[0],
            pair.get(1).copied().unwrap_or(0),
        ]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A classic BPF program passing TCP segments whose destination port is one of
/// `ports`. IPv4 raw sockets see the IP header (of variable length), IPv6 ones do not.
fn filter(v6: bool, ports: &[u16]) -> Vec<SockFilter> {
    const LDX_B_MSH: u16 = 0xb1; // X = 4 * (packet[k] & 0xf)
    const LD_H_IND: u16 = 0x48; // A = u16 at X + k
    const LD_H_ABS: u16 = 0x28; // A = u16 at k
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let mut prog = if v6 {
        vec![SockFilter::new(LD_H_ABS, 0, 0, 2)]
    } else {
        vec![
            SockFilter::new(LDX_B_MSH, 0, 0, 0),
            SockFilter::new(LD_H_IND, 0, 0, 2),
        ]
    };
    let n = ports.len();
    for (i, &port) in ports.iter().enumerate() {
        // On a match jump over the remaining tests and the drop to the accept.
        prog.push(SockFilter::new(JEQ_K, (n - i) as u8, 0, u32::from(port)));
    }
    prog.push(SockFilter::new(RET_K, 0, 0, 0));
    prog.push(SockFilter::new(RET_K, 0, 0, 0xffff));
    prog
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    /// Raw sockets need CAP_NET_RAW: these tests run as root (`cargo xtask test`).
    fn prober() -> SynProber {
        let syn = SynProber::new().expect("open the raw sockets (run the tests as root)");
        assert!(syn.v4.is_some() && syn.v6.is_some(), "both families");
        syn
    }

    async fn probe(syn: &SynProber, target: SocketAddr) -> Result<(), String> {
        probe_turn(syn, target, 0).await
    }

    async fn probe_turn(syn: &SynProber, target: SocketAddr, turn: usize) -> Result<(), String> {
        tokio::time::timeout(Duration::from_secs(5), syn.probe(target, turn))
            .await
            .unwrap_or_else(|_| Some(Err("no answer within 5 s".to_string())))
            .unwrap_or_else(|| Err("no free source port".to_string()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listening_ports_answer_closed_ports_refuse_and_nothing_is_accepted() {
        let syn = Arc::new(prober());
        for local in ["127.0.0.1:0", "[::1]:0"] {
            let listeners: Vec<std::net::TcpListener> = (0..25)
                .map(|_| std::net::TcpListener::bind(local).unwrap())
                .collect();
            let targets: Vec<SocketAddr> =
                listeners.iter().map(|l| l.local_addr().unwrap()).collect();
            // Many at once: each target as many times as the pool has ports.
            let results = futures_join(&syn, &targets, targets.len() * POOL).await;
            assert!(results.iter().all(Result::is_ok), "{local}: {results:?}");
            for l in &listeners {
                l.set_nonblocking(true).unwrap();
                assert!(
                    l.accept().is_err(),
                    "{local}: a probe completed a handshake"
                );
            }
            let closed = {
                let l = std::net::TcpListener::bind(local).unwrap();
                l.local_addr().unwrap()
            };
            let err = probe(&syn, closed).await.unwrap_err();
            assert!(err.contains("refused"), "{local}: {err}");
        }
        // IPv4 sources are kept after a success and looked up again after a failure.
        let sources = syn
            .v4
            .as_ref()
            .and_then(|f| f.route.as_ref())
            .expect("IPv4 sources");
        let known = |dst: &str| {
            let dst: Ipv4Addr = dst.parse().unwrap();
            sources.known.lock().unwrap().get(&dst).map(|(src, _)| *src)
        };
        let listener = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        probe(&syn, listener.local_addr().unwrap()).await.unwrap();
        assert_eq!(known("127.0.0.2"), Some(Ipv4Addr::new(127, 0, 0, 1)));
        let closed = listener.local_addr().unwrap();
        drop(listener);
        probe(&syn, closed).await.unwrap_err();
        assert_eq!(known("127.0.0.2"), None);
    }

    /// `n` probes spread over `targets`, all at once.
    async fn futures_join(
        syn: &Arc<SynProber>,
        targets: &[SocketAddr],
        n: usize,
    ) -> Vec<Result<(), String>> {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            let (syn, target) = (syn.clone(), targets[i % targets.len()]);
            set.spawn(async move { probe_turn(&syn, target, i).await });
        }
        set.join_all().await
    }

    #[test]
    fn probes_in_flight_never_share_a_4_tuple() {
        let pending = Pending::default();
        let ports = [40000, 40001, 40002];
        let a: SocketAddr = "198.18.0.2:80".parse().unwrap();
        let b: SocketAddr = "198.18.0.3:80".parse().unwrap();
        let wait = |target, turn, isn| {
            let (tx, _rx) = oneshot::channel();
            Waiting::new(&pending, &ports, target, turn, isn, tx)
        };
        // Turn 1 starts at the second port; taken ports are skipped, in turn.
        let w1 = wait(a, 1, 1).unwrap();
        let w2 = wait(a, 1, 2).unwrap();
        let w3 = wait(a, 1, 3).unwrap();
        assert_eq!([w1.key.2, w2.key.2, w3.key.2], [40001, 40002, 40000]);
        // Every port in flight to `a`: none left for it; `b` is another 4-tuple.
        assert!(wait(a, 0, 4).is_none());
        assert_eq!(wait(b, 1, 5).unwrap().key.2, 40001);
        // A port comes free when its probe ends.
        drop(w2);
        assert_eq!(wait(a, 0, 6).unwrap().key.2, 40002);
        // An entry another probe took since is not removed by the earlier one's end.
        let w7 = wait(a, 2, 7).unwrap();
        assert_eq!(w7.key.2, 40002);
        let stale = Waiting {
            pending: &pending,
            key: w7.key,
            isn: 99,
        };
        drop(stale);
        assert!(pending.lock().unwrap().contains_key(&w7.key));
    }

    #[test]
    fn syn_v4_checksums_verify() {
        let p = syn_v4(
            Ipv4Addr::new(198, 18, 0, 1),
            Ipv4Addr::new(198, 18, 0, 2),
            40000,
            80,
            0x1234_5678,
        );
        assert_eq!(p.len(), 20 + TCP_LEN);
        let (ip, tcp) = p.split_at(20);
        // The sum over pseudo-header and segment, checksum included, is 0xffff.
        let mut pseudo = 0u32;
        for w in [&ip[12..14], &ip[14..16], &ip[16..18], &ip[18..20]] {
            pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        pseudo += 6 + TCP_LEN as u32;
        assert_eq!(checksum(tcp, pseudo), 0);
        assert_eq!(tcp[13], SYN);
        assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 40000);
        assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 80);
    }

    #[test]
    fn answers_are_matched_to_their_syn() {
        let from: IpAddr = "198.18.0.2".parse().unwrap();
        let mut seg = [0u8; 40];
        seg[0] = 0x45;
        let tcp = &mut seg[20..];
        tcp[0..2].copy_from_slice(&80u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&40000u16.to_be_bytes());
        tcp[8..12].copy_from_slice(&0x1234_5679u32.to_be_bytes());
        tcp[13] = SYN | ACK;
        let key = (from, 80, 40000);
        assert_eq!(
            parse(&seg, false, from, &[40000]),
            Some((key, 0x1234_5678, Answer::SynAck))
        );
        seg[33] = RST | ACK;
        assert_eq!(
            parse(&seg, false, from, &[40000]),
            Some((key, 0x1234_5678, Answer::Reset))
        );
        // Another port, a bare ACK, a SYN without ACK: not answers.
        assert_eq!(parse(&seg, false, from, &[40001]), None);
        seg[33] = ACK;
        assert_eq!(parse(&seg, false, from, &[40000]), None);
        seg[33] = SYN;
        assert_eq!(parse(&seg, false, from, &[40000]), None);
        // IPv6: no IP header; too short: nothing.
        seg[33] = SYN | ACK;
        assert_eq!(
            parse(&seg[20..], true, from, &[40000]),
            Some((key, 0x1234_5678, Answer::SynAck))
        );
        assert_eq!(parse(&seg[20..30], true, from, &[40000]), None);
    }
}
