//! Backend servers that answer with their own name, and bounded clients that count
//! which backend answered each request.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns;

/// A background thread that runs until asked to stop (or its own bound), in a
/// network namespace; `finish` stops it and returns what it produced, dropping it
/// stops and joins it.
pub struct Worker<T: Send + 'static> {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Worker<T> {
    /// Runs `f` in namespace `ns`; `f` polls the flag it is given and returns once
    /// it is set.
    pub fn spawn_in(ns: &str, f: impl FnOnce(Arc<AtomicBool>) -> T + Send + 'static) -> Worker<T> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        Worker { stop, thread: Some(netns::spawn_in(ns, move || f(flag))) }
    }

    /// Stops the thread and returns its result.
    pub fn finish(mut self) -> T {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().expect("not finished").join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

impl<T: Send + 'static> Drop for Worker<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A running server thread; stopped and joined on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    fd: i32,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // SAFETY: the fd belongs to the socket the thread owns and is still open;
        // shutdown wakes a blocked accept/recv without closing the fd.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP server on `[::]:port` (IPv4 and IPv6) in namespace `ns`, handing each
/// accepted connection to `handle` on the accepting thread.
pub fn tcp_server(ns: &str, port: u16, handle: impl Fn(TcpStream) + Send + 'static) -> Server {
    let listener = netns::run_in(ns, move || TcpListener::bind(("::", port)).expect("bind the TCP server"));
    let fd = listener.as_raw_fd();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        while !stop2.load(Ordering::SeqCst) {
            if let Ok((conn, _)) = listener.accept() {
                handle(conn);
            }
        }
    });
    Server { stop, fd, thread: Some(thread) }
}

/// HTTP/1.0 server on `[::]:port` (IPv4 and IPv6) in namespace `ns`: each request
/// gets `200 OK` with the body `name\n`.
pub fn http_server(ns: &str, port: u16, name: &str) -> Server {
    let body = format!("{name}\n");
    let resp = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    tcp_server(ns, port, move |mut conn| {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let _ = conn.write_all(resp.as_bytes());
    })
}

/// UDP server bound to each of `addrs` (the VIPs, so replies leave from the VIP as
/// DR needs) answering every datagram with `name`.
pub fn udp_server(ns: &str, addrs: &[SocketAddr], name: &str) -> Vec<Server> {
    udp_serve(ns, addrs, Some(name))
}

/// A UDP server on each of `addrs` in `ns` that sends every datagram back whole
/// (up to 64 KiB: large ones leave in fragments).
pub fn udp_echo_server(ns: &str, addrs: &[SocketAddr]) -> Vec<Server> {
    udp_serve(ns, addrs, None)
}

/// Answers each datagram with `name`, or (`None`) with the datagram itself.
fn udp_serve(ns: &str, addrs: &[SocketAddr], name: Option<&str>) -> Vec<Server> {
    addrs
        .iter()
        .map(|addr| {
            let addr = *addr;
            let sock = netns::run_in(ns, move || UdpSocket::bind(addr).expect("bind the UDP server"));
            sock.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
            let fd = sock.as_raw_fd();
            let stop = Arc::new(AtomicBool::new(false));
            let stop2 = stop.clone();
            let name = name.map(str::to_string);
            let thread = std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop2.load(Ordering::SeqCst) {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        let answer = name.as_ref().map_or(&buf[..n], |name| name.as_bytes());
                        let _ = sock.send_to(answer, from);
                    }
                }
            });
            Server { stop, fd, thread: Some(thread) }
        })
        .collect()
}

/// What a batch of requests saw.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Backend name -> requests it answered.
    pub by_backend: BTreeMap<String, u64>,
    pub failures: u64,
    pub first_errors: Vec<String>,
}

impl Tally {
    fn add(&mut self, r: Result<String, String>) {
        match r {
            Ok(name) => *self.by_backend.entry(name).or_default() += 1,
            Err(e) => {
                self.failures += 1;
                if self.first_errors.len() < 5 {
                    self.first_errors.push(e);
                }
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        for (k, v) in other.by_backend {
            *self.by_backend.entry(k).or_default() += v;
        }
        self.failures += other.failures;
        self.first_errors.extend(other.first_errors.into_iter().take(5));
        self.first_errors.truncate(5);
    }

    pub fn successes(&self) -> u64 {
        self.by_backend.values().sum()
    }
}

fn http_get(vip: IpAddr, port: u16, timeout: Duration) -> Result<String, String> {
    let addr = SocketAddr::new(vip, port);
    let mut c = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    c.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    c.write_all(format!("GET / HTTP/1.0\r\nHost: {vip}\r\n\r\n").as_bytes()).map_err(|e| format!("send: {e}"))?;
    let mut resp = String::new();
    c.read_to_string(&mut resp).map_err(|e| format!("read: {e}"))?;
    if !resp.starts_with("HTTP/1.0 200") {
        return Err(format!("bad response {resp:?}"));
    }
    let body = resp.split("\r\n\r\n").nth(1).ok_or("no body")?;
    Ok(body.trim().to_string())
}

fn udp_ask(vip: IpAddr, port: u16, timeout: Duration) -> Result<String, String> {
    let bind: SocketAddr = if vip.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
    let s = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    // Connected: only a reply from the VIP itself is accepted.
    s.connect((vip, port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 256];
    for _ in 0..3 {
        s.send(b"who").map_err(|e| format!("send: {e}"))?;
        if let Ok(n) = s.recv(&mut buf) {
            return Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string());
        }
    }
    Err(format!("no UDP reply from {vip}:{port}"))
}

#[derive(Debug, Clone, Copy)]
pub enum Proto {
    Http,
    Udp,
}

/// Sends `count` requests (each a new connection or a new UDP socket, so a new
/// source port) from namespace `ns` on `workers` threads, bounded by `deadline`.
pub fn requests(ns: &str, proto: Proto, vip: IpAddr, port: u16, count: u64, workers: u64, deadline: Duration) -> Tally {
    let end = Instant::now() + deadline;
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let n = count / workers + u64::from(w < count % workers);
            netns::spawn_in(ns, move || {
                let mut t = Tally::default();
                for _ in 0..n {
                    if Instant::now() > end {
                        t.add(Err("deadline reached".into()));
                        continue;
                    }
                    let timeout = Duration::from_secs(2);
                    t.add(match proto {
                        Proto::Http => http_get(vip, port, timeout),
                        Proto::Udp => udp_ask(vip, port, timeout),
                    });
                }
                t
            })
        })
        .collect();
    let mut total = Tally::default();
    for h in handles {
        total.merge(h.join().expect("client thread panicked"));
    }
    total
}

/// TCP server on `[::]:port` that greets each connection with `name\n` and then
/// echoes what it receives, until the peer closes. Stopping the server (drop) stops
/// accepting; connections already open keep being served.
pub fn echo_server(ns: &str, port: u16, name: &str) -> Server {
    let greeting = format!("{name}\n");
    tcp_server(ns, port, move |mut conn| {
        let greeting = greeting.clone();
        std::thread::spawn(move || {
            if conn.write_all(greeting.as_bytes()).is_err() {
                return;
            }
            let mut buf = [0u8; 256];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if conn.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    })
}

/// A long-lived connection exchanging a few bytes every 100 ms (or, idle, only
/// once when it is finished).
pub struct LongLived {
    pub backend: String,
    worker: Worker<LongLivedResult>,
}

#[derive(Debug, Clone)]
pub struct LongLivedResult {
    pub backend: String,
    pub exchanges: u64,
    /// First failure, if any: the connection broke.
    pub error: Option<String>,
}

impl LongLived {
    /// Connects from namespace `ns` to `vip:port` (an echo server) and starts the
    /// exchanges in the background.
    pub fn open(ns: &str, vip: IpAddr, port: u16) -> LongLived {
        Self::open_every(ns, vip, port, Some(Duration::from_millis(100)))
    }

    /// An idle connection: after the greeting it sends nothing until `finish`,
    /// which makes one exchange (so an entry lost meanwhile shows).
    pub fn open_idle(ns: &str, vip: IpAddr, port: u16) -> LongLived {
        Self::open_every(ns, vip, port, None)
    }

    /// A connection that exchanges every `period` (`None`: only at the end).
    pub fn open_every(ns: &str, vip: IpAddr, port: u16, period: Option<Duration>) -> LongLived {
        let conn = netns::run_in(ns, move || TcpStream::connect_timeout(&SocketAddr::new(vip, port), Duration::from_secs(3)));
        let mut conn = conn.unwrap_or_else(|e| panic!("long-lived connection to {vip}:{port}: {e}"));
        conn.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        let mut name = Vec::new();
        let mut byte = [0u8; 1];
        while conn.read_exact(&mut byte).is_ok() && byte[0] != b'\n' {
            name.push(byte[0]);
        }
        let backend = String::from_utf8_lossy(&name).into_owned();
        assert!(!backend.is_empty(), "no greeting on the long-lived connection to {vip}:{port}");
        let who = backend.clone();
        let worker = Worker::spawn_in(ns, move |stop| {
            let mut r = LongLivedResult { backend: who, exchanges: 0, error: None };
            // Bounded: at most 10 minutes of exchanges.
            let end = Instant::now() + Duration::from_secs(600);
            let mut last = false;
            while !last && Instant::now() < end {
                last = stop.load(Ordering::SeqCst);
                if last && period.is_some() {
                    break;
                }
                if period.is_none() && !last {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                let msg = r.exchanges.to_be_bytes();
                let mut back = [0u8; 8];
                let res = conn.write_all(&msg).and_then(|_| conn.read_exact(&mut back));
                match res {
                    Ok(()) if back == msg => r.exchanges += 1,
                    Ok(()) => {
                        r.error = Some(format!("echo mismatch after {} exchanges", r.exchanges));
                        break;
                    }
                    Err(e) => {
                        r.error = Some(format!("after {} exchanges: {e}", r.exchanges));
                        break;
                    }
                }
                std::thread::sleep(period.unwrap_or_default());
            }
            r
        });
        LongLived { backend, worker }
    }

    /// Stops the exchanges and returns what happened.
    pub fn finish(self) -> LongLivedResult {
        self.worker.finish()
    }
}

/// Like `requests`, but every request leaves from one of `sources` in turn (the
/// client namespace must hold those addresses).
pub fn requests_from(ns: &str, sources: &[IpAddr], vip: IpAddr, port: u16, per_source: u64) -> Tally {
    let sources = sources.to_vec();
    netns::run_in(ns, move || {
        let mut t = Tally::default();
        for src in sources {
            for _ in 0..per_source {
                t.add(http_get_from(src, vip, port, Duration::from_secs(2)));
            }
        }
        t
    })
}

fn http_get_from(src: IpAddr, vip: IpAddr, port: u16, timeout: Duration) -> Result<String, String> {
    use socket2::{Domain, Socket, Type};
    let remote = SocketAddr::new(vip, port);
    let sock = Socket::new(Domain::for_address(remote), Type::STREAM, None).map_err(|e| e.to_string())?;
    sock.bind(&SocketAddr::new(src, 0).into()).map_err(|e| format!("bind {src}: {e}"))?;
    sock.connect_timeout(&remote.into(), timeout).map_err(|e| format!("connect {remote} from {src}: {e}"))?;
    let mut c: TcpStream = sock.into();
    c.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    c.write_all(format!("GET / HTTP/1.0\r\nHost: {vip}\r\n\r\n").as_bytes()).map_err(|e| format!("send: {e}"))?;
    let mut resp = String::new();
    c.read_to_string(&mut resp).map_err(|e| format!("read: {e}"))?;
    let body = resp.split("\r\n\r\n").nth(1).ok_or("no body")?;
    Ok(body.trim().to_string())
}

/// When a request started, and its answer (the backend's name) or error.
pub type Record = (Instant, Result<String, String>);

/// Steady background load: HTTP requests one after another from namespace `ns`
/// until stopped (bounded to 10 minutes), each recorded with its time.
pub struct Load(Worker<Vec<Record>>);

impl Load {
    pub fn start(ns: &str, vip: IpAddr, port: u16) -> Load {
        Load(Worker::spawn_in(ns, move |stop| {
            let mut out = Vec::new();
            let end = Instant::now() + Duration::from_secs(600);
            while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                out.push((Instant::now(), http_get(vip, port, Duration::from_secs(1))));
                std::thread::sleep(Duration::from_millis(5));
            }
            out
        }))
    }

    /// Stops and returns every request's start time and result.
    pub fn finish(self) -> Vec<Record> {
        self.0.finish()
    }
}
