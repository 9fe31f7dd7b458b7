//! The client side of `lb-agent trace`: sends the request, prints each traced
//! packet as it comes (a line, or a JSON object with `--json`), and stops when the
//! agent ends the trace (`--count` reached) or on Ctrl-C, which closes the socket
//! and makes the agent clear the filter.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    process::ExitCode,
};

use super::{render_text, TraceRequest};
use crate::control::{Request, Response};

pub fn run(socket: &Path, request: TraceRequest, json: bool) -> ExitCode {
    match stream(socket, request, json) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn stream(socket: &Path, request: TraceRequest, json: bool) -> Result<ExitCode, String> {
    let mut conn = UnixStream::connect(socket).map_err(|e| crate::control::map_io_error(socket, e).to_string())?;
    let mut line = serde_json::to_string(&Request::Trace(request)).map_err(|e| e.to_string())?;
    line.push('\n');
    conn.write_all(line.as_bytes()).map_err(|e| format!("sending the request: {e}"))?;
    let reader = BufReader::new(conn.try_clone().map_err(|e| e.to_string())?);
    let stdout = std::io::stdout();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| format!("reading from the agent: {e}"))?;
        let response: Response = serde_json::from_str(&line).map_err(|e| format!("unexpected answer from the agent: {e}"))?;
        match response {
            Response::Done { message } if i == 0 => eprintln!("{message}"),
            Response::Done { message } | Response::TraceNote { message } => eprintln!("{message}"),
            Response::Error { message } => {
                eprintln!("error: {message}");
                return Ok(ExitCode::FAILURE);
            }
            Response::TraceLine(l) => {
                let text = if json { serde_json::to_string(&l).map_err(|e| e.to_string())? } else { render_text(&l) };
                let mut out = stdout.lock();
                // A closed pipe (`| head`) ends the trace like Ctrl-C.
                if writeln!(out, "{text}").and_then(|_| out.flush()).is_err() {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            Response::Status(_) | Response::Text { .. } | Response::Encoded { .. } => return Err("unexpected answer from the agent".into()),
        }
    }
    Ok(ExitCode::SUCCESS)
}
