//! Two-arm start-up (`--backend-iface`): the backend interface looked up and
//! checked, the balancer attached to it (or detached from an earlier agent's), and
//! the addresses tunnel sources default to.

use std::net::IpAddr;

use anyhow::{Context, Result};

use crate::{
    cli::RunArgs,
    dataplane::{AttachMode, Dataplane},
    neigh::{format_mac, Interface, Neighbours},
    nexthop::Arms,
    pinning::PinDir,
};

/// The client interface `iface` and, with `--backend-iface`, the backend one:
/// it must exist, differ from `iface` and carry no foreign XDP program.
pub(super) async fn interfaces(nl: &Neighbours, args: &RunArgs, iface: &Interface, pins: &PinDir) -> Result<Arms> {
    let backend = match &args.backend_iface {
        None => None,
        Some(name) if *name == iface.name => anyhow::bail!("--backend-iface {name} is --iface: leave it out for one-arm"),
        Some(name) => {
            let b = nl.interface(name).await.with_context(|| format!("--backend-iface {name}"))?;
            tracing::info!(backend_iface = %b.name, index = b.index, mac = %format_mac(&b.mac), "backend interface (two-arm)");
            crate::ownership::check_backend_interface(&b, pins)?;
            Some(b)
        }
    };
    Ok(Arms { client: iface.clone(), backend })
}

/// Attaches the balancer to the backend interface in `mode` (the client
/// interface's), or, one-arm, detaches it from the one an earlier agent left
/// pinned. On failure a balancer this agent attached is removed again; an
/// adopted one keeps forwarding from its pins.
pub(super) fn attach_backend(dp: &mut Dataplane, arms: &Arms, mode: AttachMode, adopted: bool) -> Result<()> {
    let done = match &arms.backend {
        Some(b) => dp
            .attach_backend(&b.name, mode)
            .map(|()| None)
            .with_context(|| format!("attaching to {} (--backend-iface)", b.name)),
        None => dp.detach_stale_backend().context("detaching from the backend interface of an earlier agent"),
    };
    match done {
        Ok(Some(path)) => {
            tracing::info!(link = %path.display(), "one-arm now: detached from the earlier agent's backend interface");
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => {
            if !adopted {
                let _ = dp.detach();
                dp.unpin();
            }
            Err(e)
        }
    }
}

/// The addresses tunnel sources default to: the backend interface's first
/// (two-arm: encapsulated frames leave by it), then the client interface's.
pub(super) async fn tunnel_addresses(nl: &Neighbours, arms: &Arms) -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    if let Some(b) = &arms.backend {
        out = nl.addresses(b.index).await?;
    }
    out.extend(nl.addresses(arms.client.index).await?);
    Ok(out)
}
