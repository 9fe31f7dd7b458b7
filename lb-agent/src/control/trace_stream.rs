//! A `trace` connection: unlike the other requests it stays open, streaming one
//! JSON line per traced packet until the client closes it (Ctrl-C) or the agent
//! ends the trace; either way the agent is told, so it clears the filter.

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
    sync::{mpsc, oneshot},
};

use super::{Call, Request, Response};
use crate::trace::TraceRequest;

/// Lines the agent may queue for a slow client before it drops some.
const QUEUE: usize = 1024;

pub(super) async fn serve(stream: UnixStream, calls: mpsc::Sender<Call>, req: TraceRequest) {
    let (tx, mut rx) = mpsc::channel(QUEUE);
    let (reply, answer) = oneshot::channel();
    let (mut read, mut write) = stream.into_split();
    let first = if calls.send(Call { request: Request::Trace(req), reply, stream: Some(tx) }).await.is_err() {
        Response::Error { message: "the agent is shutting down".into() }
    } else {
        answer.await.unwrap_or_else(|_| Response::Error { message: "the agent dropped the request".into() })
    };
    let started = matches!(first, Response::Done { .. });
    if send(&mut write, &first).await && started {
        let mut buf = [0u8; 64];
        loop {
            tokio::select! {
                line = rx.recv() => match line {
                    Some(line) => if !send(&mut write, &line).await { break },
                    None => break,
                },
                // The client sends nothing after its request: a read that ends means
                // it went away (Ctrl-C).
                n = read.read(&mut buf) => if !matches!(n, Ok(n) if n > 0) { break },
            }
        }
    }
    // Closed first: the agent ends the trace whose queue is closed, not a newer one.
    drop(rx);
    if started {
        let (reply, _) = oneshot::channel();
        let _ = calls.send(Call { request: Request::TraceStop, reply, stream: None }).await;
    }
    let _ = write.shutdown().await;
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, response: &Response) -> bool {
    let Ok(mut text) = serde_json::to_string(response) else { return false };
    text.push('\n');
    write.write_all(text.as_bytes()).await.is_ok()
}
