//! The control socket's calls as the agent answers them: status, drain and
//! undrain at run time, reload and trace requests (handed to their owners).

use std::net::IpAddr;

use crate::control::{Call, Request, Response};

use super::Agent;

impl Agent {
    /// Answers a control-socket call; a reload is answered once its file has been
    /// parsed and applied (`reloading`).
    pub(super) fn on_call(&mut self, call: Call) {
        let response = match call.request {
            Request::Status => {
                self.refresh_status();
                // Encoded from the shared status, beside the event loop.
                let (status, reply) = (self.status.clone(), call.reply);
                tokio::task::spawn_blocking(move || {
                    let _ = reply.send(crate::control::encode_status(&status.read().unwrap_or_else(|e| e.into_inner())));
                });
                return;
            }
            Request::StatusText { filter, json } => {
                self.refresh_status();
                // Rendered from the shared status, beside the event loop.
                let (status, reply) = (self.status.clone(), call.reply);
                tokio::task::spawn_blocking(move || {
                    let status = status.read().unwrap_or_else(|e| e.into_inner());
                    let _ = reply.send(crate::control::status_text(&status, &filter, json));
                });
                return;
            }
            Request::StatusOf(filter) => {
                self.refresh_status();
                Response::Status(self.status.read().map(|s| filter.select(&s)).unwrap_or_default())
            }
            Request::Drain { backend, service } => self.set_drain(backend, service, true),
            Request::Undrain { backend, service } => self.set_drain(backend, service, false),
            Request::Reload => return self.request_reload("lb-agent reload", Some(call.reply)),
            Request::Trace(request) => self.trace_start(request, call.stream),
            Request::TraceStop => {
                self.trace_client_left();
                Response::Done { message: "trace stopped".into() }
            }
        };
        let _ = call.reply.send(response);
    }

    fn set_drain(&mut self, backend: IpAddr, service: Option<String>, drain: bool) -> Response {
        // `::ffff:198.18.0.12` names the backend 198.18.0.12 (the file cannot hold
        // the mapped form).
        let backend = backend.to_canonical();
        let hits: Vec<(String, u32)> = self
            .config
            .services
            .iter()
            .filter(|s| service.as_ref().is_none_or(|n| *n == s.name))
            .filter_map(|s| s.backends.iter().find(|b| b.address == backend).map(|b| (s.name.clone(), b.weight)))
            .collect();
        if hits.is_empty() {
            let scope = service.map(|s| format!("service {s}")).unwrap_or_else(|| "any service".into());
            return Response::Error { message: format!("{backend} is not a backend of {scope}") };
        }
        for (name, _) in &hits {
            if drain {
                self.drained.insert((name.clone(), backend));
            } else {
                self.drained.remove(&(name.clone(), backend));
            }
        }
        if !self.replan(if drain { "drain" } else { "undrain" }) {
            return Response::Error { message: "the maps could not be updated (see the agent's log)".into() };
        }
        let what = if drain { "drained" } else { "undrained" };
        let lines: Vec<String> = hits
            .iter()
            .map(|(name, w)| {
                if drain {
                    format!("{what} {backend} in {name}: weight 0 now, established flows continue; the file still says weight {w}")
                } else {
                    format!("{what} {backend} in {name}: weight {w} (from the file)")
                }
            })
            .collect();
        tracing::warn!(backend = %backend, services = hits.len(), "{what} at run time");
        self.refresh_status();
        Response::Done { message: lines.join("\n") }
    }
}
