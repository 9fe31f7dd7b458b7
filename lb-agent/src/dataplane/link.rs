//! Attaching the balancer to an interface (or into an earlier agent's pinned
//! link), two-arm to the backend interface too, detaching, and leaving or
//! removing the pins.

use std::fs;

use aya::programs::{links::FdLink, links::PinnedLink, xdp::XdpLink, Xdp, XdpMode};
use lb_common::Config;

use super::{programs::program, AttachMode, Dataplane, DataplaneError, Result};

impl Dataplane {
    /// Attaches the balancer to `iface` and returns the mode. `None` means auto:
    /// native, falling back to generic. With a pin directory holding a link (an
    /// earlier agent's), the new program replaces the old one in that link
    /// atomically instead, in the mode the link has.
    pub fn attach(&mut self, iface: &str, mode: Option<AttachMode>) -> Result<AttachMode> {
        let used = self.attach_inner(iface, mode)?;
        let flag = if used == AttachMode::Generic { lb_common::CONFIG_GENERIC } else { 0 };
        let flags = (self.config.flags & !lb_common::CONFIG_GENERIC) | flag;
        self.set_config(Config { flags, ..self.config })?;
        Ok(used)
    }

    fn attach_inner(&mut self, iface: &str, mode: Option<AttachMode>) -> Result<AttachMode> {
        let prog_err = |source| DataplaneError::Program { name: lb_common::PROG_BALANCER, source };
        let pins = self.pins.clone();
        let prog: &mut Xdp = program(&mut self.ebpf, lb_common::PROG_BALANCER)?;
        if let Some(pins) = pins.as_ref().filter(|p| p.has_link()) {
            let pinned = PinnedLink::from_pin(pins.link()).map_err(|e| DataplaneError::Link { path: pins.link(), error: e.to_string() })?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .map_err(|e| DataplaneError::Link { path: pins.link(), error: e.to_string() })?;
            let id = prog.attach_to_link(link).map_err(prog_err)?;
            let link = prog.take_link(id).map_err(prog_err)?;
            self.link = Some(FdLink::try_from(link).map_err(|e| DataplaneError::Link { path: pins.link(), error: e.to_string() })?);
            self.pin_program()?;
            let generic = self.config.flags & lb_common::CONFIG_GENERIC != 0;
            return Ok(if generic { AttachMode::Generic } else { AttachMode::Native });
        }
        let attach = |prog: &mut Xdp, m: AttachMode| {
            let flags = match m {
                AttachMode::Native => XdpMode::Driver,
                AttachMode::Generic => XdpMode::Skb,
            };
            prog.attach(iface, flags)
        };
        let (id, used) = match mode {
            Some(m) => (attach(prog, m), m),
            None => match attach(prog, AttachMode::Native) {
                Ok(id) => (Ok(id), AttachMode::Native),
                Err(e) => {
                    tracing::warn!(iface, error = %e, "native XDP attach failed, falling back to generic mode");
                    (attach(prog, AttachMode::Generic), AttachMode::Generic)
                }
            },
        };
        let link = prog.take_link(id.map_err(prog_err)?).map_err(prog_err)?;
        let link = FdLink::try_from(link).map_err(|e| DataplaneError::Link { path: "XDP link".into(), error: e.to_string() })?;
        self.link = Some(match &pins {
            Some(p) => FdLink::from(
                link.pin(p.link()).map_err(|source| DataplaneError::Pin { path: p.link(), source })?,
            ),
            None => link,
        });
        if pins.is_some() {
            self.pin_program()?;
        }
        Ok(used)
    }

    /// Two-arm: attaches the balancer to the backend interface `iface` too, in
    /// `mode` (the client interface's), pinned beside the first link (or swapped
    /// into the link an earlier agent pinned there). Frames arriving there are
    /// balanced like the others; and some drivers (veth among them) take
    /// redirected frames only on an interface with an XDP program.
    pub fn attach_backend(&mut self, iface: &str, mode: AttachMode) -> Result<()> {
        let prog_err = |source| DataplaneError::Program { name: lb_common::PROG_BALANCER, source };
        let pins = self.pins.clone();
        let prog: &mut Xdp = program(&mut self.ebpf, lb_common::PROG_BALANCER)?;
        let link_err = |path: std::path::PathBuf| move |e: String| DataplaneError::Link { path: path.clone(), error: e };
        if let Some(path) = pins.as_ref().map(|p| p.backend_link()).filter(|p| p.exists()) {
            let err = link_err(path.clone());
            let pinned = PinnedLink::from_pin(&path).map_err(|e| err(e.to_string()))?;
            let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| err(e.to_string()))?;
            let id = prog.attach_to_link(link).map_err(prog_err)?;
            let link = prog.take_link(id).map_err(prog_err)?;
            self.backend_link = Some(FdLink::try_from(link).map_err(|e| err(e.to_string()))?);
            return Ok(());
        }
        let flags = match mode {
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Generic => XdpMode::Skb,
        };
        let id = prog.attach(iface, flags).map_err(prog_err)?;
        let link = prog.take_link(id).map_err(prog_err)?;
        let link = FdLink::try_from(link).map_err(|e| DataplaneError::Link { path: "XDP link".into(), error: e.to_string() })?;
        self.backend_link = Some(match &pins {
            Some(p) => FdLink::from(
                link.pin(p.backend_link()).map_err(|source| DataplaneError::Pin { path: p.backend_link(), source })?,
            ),
            None => link,
        });
        Ok(())
    }

    /// One-arm: detaches the balancer from a backend interface an earlier
    /// (two-arm) agent left it on, by removing that link's pin.
    pub fn detach_stale_backend(&mut self) -> Result<Option<std::path::PathBuf>> {
        self.backend_link = None;
        let Some(path) = self.pins.as_ref().map(|p| p.backend_link()).filter(|p| p.exists()) else { return Ok(None) };
        fs::remove_file(&path).map_err(|source| DataplaneError::PinDir { path: path.clone(), source })?;
        Ok(Some(path))
    }

    fn pin_program(&mut self) -> Result<()> {
        let Some(pins) = self.pins.clone() else { return Ok(()) };
        let path = pins.program();
        let _ = fs::remove_file(&path);
        let prog: &mut Xdp = program(&mut self.ebpf, lb_common::PROG_BALANCER)?;
        prog.pin(&path).map_err(|source| DataplaneError::Pin { path, source })
    }

    /// Detaches the balancer: removes the link pin and closes our handle, the last
    /// reference to the link.
    pub fn detach(&mut self) -> Result<()> {
        if let Some(pins) = &self.pins {
            for path in [pins.link(), pins.backend_link()] {
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(DataplaneError::PinDir { path, source: e });
                    }
                    _ => {}
                }
            }
        }
        self.link = None;
        self.backend_link = None;
        Ok(())
    }

    /// Removes the maps' and the program's pins (after `detach`).
    pub fn unpin(&mut self) {
        if let Some(pins) = self.pins.take() {
            if let Err(e) = pins.remove_all() {
                tracing::warn!(dir = %pins.dir.display(), error = %e, "could not remove the pins");
            }
        }
    }

    /// Leaves the balancer attached and every pin in place (the agent exits, the
    /// data plane carries on; the next agent adopts it).
    pub fn keep(mut self) {
        self.link = None;
        self.backend_link = None;
        self.pins = None;
    }
}
