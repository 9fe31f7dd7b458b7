//! Probe tests against servers on 127.0.0.1 started by the tests themselves. No timing
//! is asserted: only whether a probe succeeded or failed, with generous timeouts.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use super::*;

mod checker;
mod plain;
mod web;

/// A probe of `kind` with a generous timeout.
fn spec(kind: ProbeKind) -> ProbeSpec {
    ProbeSpec {
        kind,
        interval: Duration::from_secs(10),
        timeout: Duration::from_secs(5),
        ..ProbeSpec::default()
    }
}

fn ctx() -> ProbeContext {
    ProbeContext {
        service: "web".to_string(),
    }
}

/// Runs one probe of `kind` against `target`.
async fn probe(kind: ProbeKind, target: SocketAddr) -> Result<Duration, String> {
    probe_once(&spec(kind), target, &ctx()).await
}

/// An address on 127.0.0.1 where nothing listens (TCP and UDP).
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

/// A unique path in the temporary directory.
fn temp_path(name: &str) -> std::path::PathBuf {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("lb-health-{}-{n}-{name}", std::process::id()))
}

/// What a test HTTP server answers, and the request heads it received.
#[derive(Clone)]
struct HttpReply {
    status: u16,
    body: &'static str,
    requests: Arc<Mutex<Vec<String>>>,
}

impl HttpReply {
    fn new(status: u16, body: &'static str) -> HttpReply {
        HttpReply {
            status,
            body,
            requests: Arc::default(),
        }
    }

    fn last_request(&self) -> String {
        self.requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
    }
}

/// Reads one request head from `stream` and answers it with `reply`.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, reply: HttpReply) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    reply
        .requests
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&head).into_owned());
    let response = format!(
        "HTTP/1.1 {} Test\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
        reply.status,
        reply.body.len(),
        reply.body
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A plain HTTP server on 127.0.0.1 answering every request with `reply`.
async fn http_server(reply: HttpReply) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer(stream, reply.clone()));
        }
    });
    addr
}

/// A UDP server on 127.0.0.1 that answers `ping` with `pong` and echoes anything else.
async fn udp_server() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let reply: &[u8] = if &buf[..n] == b"ping" {
                b"pong"
            } else {
                &buf[..n]
            };
            let _ = socket.send_to(reply, from).await;
        }
    });
    addr
}
