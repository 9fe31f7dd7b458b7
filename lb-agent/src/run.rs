//! `lb-agent run`: resolve, plan, load, fill, attach; on SIGINT/SIGTERM detach and
//! remove what was created.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    cli::RunArgs,
    config,
    dataplane::Dataplane,
    neigh::{format_mac, Neighbours},
    plan::Plan,
};

pub fn run(args: RunArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")?;
    rt.block_on(run_async(args))
}

async fn run_async(args: RunArgs) -> Result<()> {
    let cfg = config::load(&args.config).map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
    let nl = Neighbours::connect()?;
    let iface = nl.interface(&args.iface).await?;
    tracing::info!(iface = %iface.name, index = iface.index, mac = %format_mac(&iface.mac), "interface");

    let wanted = Plan::backend_addresses(&cfg);
    let timeout = Duration::from_secs_f64(args.resolve_timeout_secs.max(0.0));
    let macs = nl.resolve(&iface, &wanted, timeout).await?;
    let plan = Plan::build(&cfg, &macs);
    for (service, addr) in plan.unresolved() {
        tracing::error!(service, backend = %addr, iface = %iface.name,
            "backend MAC not resolved (no ARP/ND answer on the interface): left out of the table");
    }
    for s in &plan.services {
        if s.value.table_size == 0 {
            tracing::error!(service = %s.name, "service has no usable backend: its packets are dropped (counter drop_no_backend)");
        }
    }

    let mut dp = Dataplane::load(&plan).context("loading the XDP program")?;
    dp.write(&plan, iface.mac).context("filling the maps")?;
    ensure_bpffs(&args.pin_dir)?;
    dp.pin_maps(&args.pin_dir).context("pinning the maps")?;
    let mode = match dp.attach(&iface.name, args.xdp_mode.mode()) {
        Ok(mode) => mode,
        Err(e) => {
            dp.unpin();
            return Err(e).with_context(|| format!("attaching to {}", iface.name));
        }
    };
    tracing::info!(iface = %iface.name, %mode, services = plan.services.len(),
        backends = plan.backends.len(), pin_dir = %args.pin_dir.display(), "attached");

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
    let stats = dp.stats();
    let detached = dp.detach();
    dp.unpin();
    if let Ok(stats) = stats {
        crate::report::log_totals(&plan, &stats);
    }
    detached.context("detaching")?;
    tracing::info!(iface = %iface.name, "detached");
    Ok(())
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Makes sure the pin directory's parent is on a bpffs, mounting one at
/// /sys/fs/bpf when none is mounted there (as systemd would).
fn ensure_bpffs(dir: &Path) -> Result<()> {
    let base = Path::new("/sys/fs/bpf");
    if !dir.starts_with(base) || is_bpffs(base) {
        return Ok(());
    }
    std::fs::create_dir_all(base).with_context(|| format!("creating {}", base.display()))?;
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()
        .context("running mount -t bpf")?;
    anyhow::ensure!(status.success() && is_bpffs(base), "could not mount a bpffs on /sys/fs/bpf");
    tracing::info!("mounted bpffs on /sys/fs/bpf");
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: statfs writes into the zeroed struct; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}
