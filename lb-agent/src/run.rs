//! `lb-agent run`: resolve, plan, load, fill, attach; then keep the maps in step
//! with the configuration file (SIGHUP or a change of the file), the backends'
//! health (probes) and their MACs (neighbour table), until SIGINT/SIGTERM, when it
//! detaches and removes what it created.
//!
//! One task owns the dataplane and handles every event in turn, so map updates
//! never interleave.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    cli::RunArgs,
    config::{self, Config},
    conntrack::TableStatus,
    dataplane::{Dataplane, Opening, Sizes},
    health::{Checker, Health, HealthEvent, ProbeKind, Target, TargetKey},
    neigh::{format_mac, Mac, Neighbours},
    nexthop::{Arms, NextHops, TunnelParams},
    pinning::PinDir,
    plan::{DownSet, Plan},
    control::Call,
    observe::Sampler,
    status::Status,
};

mod arms;
mod calls;
mod events;
mod reloading;
mod routes;
mod stats_reader;
use routes::report_unusable;
mod trace_session;

pub fn run(args: RunArgs) -> Result<()> {
    // Two malloc arenas, not one per thread that ever allocated: the parse of a
    // reload runs on a blocking-pool thread, and its arena would keep the memory.
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting tokio")?;
    let result = rt.block_on(run_async(args));
    // A parse still running on the blocking pool (the agent stopped during a
    // reload) is not waited for.
    rt.shutdown_timeout(Duration::from_millis(100));
    result
}

/// Concurrent probes at most (the rest wait their turn).
const MAX_CONCURRENT_PROBES: usize = 256;

struct Agent {
    args: RunArgs,
    config: Config,
    /// The file's bytes when last read, to notice edits (shared with
    /// `in_force` and the reload that read them: no copy).
    seen: Arc<[u8]>,
    /// The file's length and modification time when last read (`file_tick`).
    seen_meta: Option<(u64, Option<std::time::SystemTime>)>,
    /// The bytes of the configuration in force: a reload of the same bytes is a no-op.
    in_force: Arc<[u8]>,
    /// Where the services are in a text (the one in force, if the pointers are
    /// equal), so an incremental reload cuts only the new text.
    in_force_cut: Option<(Arc<[u8]>, config::Cut)>,
    /// The interface clients' frames arrive on and, two-arm, the backends'.
    arms: Arms,
    nl: Neighbours,
    /// MACs of the neighbours frames go to (DR backends, tunnel next hops).
    macs: BTreeMap<IpAddr, Mac>,
    /// Each tunnel backend's next hop (from the kernel's routes).
    nexthops: NextHops,
    /// Tunnel sources and MTU in force, and the interface's addresses they
    /// default to.
    tunnel: TunnelParams,
    addresses: Vec<IpAddr>,
    /// When the tunnel backends' routes were last looked up.
    routes_checked: std::time::Instant,
    down: DownSet,
    plan: Plan,
    dp: Dataplane,
    checker: Checker,
    reloads_ok: u64,
    reloads_failed: u64,
    mode: crate::dataplane::AttachMode,
    started: std::time::Instant,
    /// Backends drained at run time: (service, address).
    drained: BTreeSet<(String, IpAddr)>,
    status: Arc<RwLock<Status>>,
    sampler: Sampler,
    /// Reads the counters for the periodic status refresh off the loop.
    stats_reader: stats_reader::StatsReader,
    /// Published by the connection-table sweeper.
    conntrack: Arc<Mutex<TableStatus>>,
    /// What the sweeper last wrote into `BACKEND_CONNS`.
    conn_bases: crate::conntrack::Bases,
    timeouts: tokio::sync::watch::Sender<config::Timeouts>,
    /// Entries of CONNTRACK and CT_ESTABLISHED as created (0: protection off).
    ct_capacity: (u32, u32),
    /// Retry schedule of the backends whose MAC is not known.
    backoff: crate::resolve::Backoff,
    /// The running `lb-agent trace`, if any.
    trace: Option<trace_session::Session>,
    /// Reloads in progress (parsed off the loop).
    reloads: reloading::Reloads,
    /// VIP routes for the BGP speaker (`--announce-table`).
    announce: crate::announce::Announcer,
}

/// Probe targets of a configuration.
pub fn probe_targets(config: &Config) -> Vec<Target> {
    let mut out = Vec::new();
    for s in &config.services {
        for b in &s.backends {
            if b.probe.kind == ProbeKind::None {
                continue;
            }
            let addr = b.probe.address.unwrap_or(b.address);
            // A `nat` backend's own port is where its service listens.
            let port = b.probe.port.or(b.port).unwrap_or(s.port);
            out.push(Target {
                key: TargetKey { service: s.name.clone(), backend: b.address },
                spec: b.probe.clone(),
                addr: std::net::SocketAddr::new(addr, port),
                service: s.name.clone(),
            });
        }
    }
    out
}

/// Backends that start down (probe `initial: down`) and have no state yet.
fn initial_down(config: &Config, checker: &Checker) -> DownSet {
    let mut down = DownSet::new();
    for t in probe_targets(config) {
        let health = checker.health(&t.key).unwrap_or(t.spec.initial);
        if health == Health::Down {
            down.insert((t.key.service, t.key.backend));
        }
    }
    down
}

async fn run_async(args: RunArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let seen = std::fs::read(&args.config).with_context(|| format!("reading {}", args.config.display()))?;
    // Before touching the kernel: a second agent on the same pin directory, socket or
    // port, or a bad address, stops here. The pin directory stays ours until we exit.
    crate::pinning::ensure_bpffs(&args.pin_dir)?;
    let _owner = crate::ownership::lock_pin_dir(&args.pin_dir)?;
    let pins = PinDir::new(&args.pin_dir);
    // A fresh start verifies the programs (most of the start-up time) while the
    // file is parsed, the backends resolved and the tables built: with the sizes a
    // quick scan of the text reads (`Sizes::scan`), checked against the parse's
    // below. Adopting waits: whether the pinned maps can be kept decides what is
    // cleared, and a start that fails before then must leave the running balancer's
    // pins as they are.
    let scanned = match std::str::from_utf8(&seen).ok().and_then(Sizes::scan) {
        Some(sizes) if !pins.has_link() => Some((sizes, Opening::start(sizes, pins.clone()))),
        _ => None,
    };
    let t_scanned = std::time::Instant::now();
    // An invalid file: the scan's maps (if any) are removed as `Opening` drops.
    let cfg = config::load(&args.config).map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
    let t_read = std::time::Instant::now();
    let listener = crate::control::bind(&args.control_socket)
        .with_context(|| format!("control socket {}", args.control_socket.display()))?;
    let metrics_listener = match args.metrics_listen.as_str() {
        "off" => None,
        addr => {
            let addr: std::net::SocketAddr =
                addr.parse().with_context(|| format!("--metrics-listen {addr}: not an address:port"))?;
            let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("metrics endpoint {addr}"))?;
            tracing::info!(%addr, "metrics at http://{addr}/metrics");
            Some(l)
        }
    };
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let nl = Neighbours::connect()?;
    let iface = nl.interface(&args.iface).await?;
    tracing::info!(iface = %iface.name, index = iface.index, mac = %format_mac(&iface.mac), "interface");
    crate::ownership::check_interface(&iface, &pins)?;
    let arms = arms::interfaces(&nl, &args, &iface, &pins).await?;
    let mut neigh_events = crate::neigh::watch()?;
    let mut announce = crate::announce::Announcer::start(args.announce_table).context("starting the announcements")?;

    // The bytes `cfg` came from, if the file did not change while it was loaded.
    let in_force: Arc<[u8]> =
        if std::fs::read(&args.config).is_ok_and(|again| again == seen) { seen.as_slice().into() } else { Arc::from([]) };
    let addresses = arms::tunnel_addresses(&nl, &arms).await?;
    let tunnel = TunnelParams::resolve(&cfg, arms.tunnel_iface(), &addresses).map_err(|e| anyhow::anyhow!("{e}"))?;
    // The parse decides the sizes: a scan that read other ones (or none) is opened
    // again (or now) with the parse's.
    let sizes = Sizes::of_config(&cfg);
    let early = match scanned {
        Some((scan, opening)) if scan == sizes => Some(opening),
        scanned => {
            if let Some((scan, opening)) = scanned {
                tracing::warn!(?scan, parsed = ?sizes, "the quick scan of the file read other map sizes than its parse: creating the maps again");
                drop(opening);
            }
            (!pins.has_link()).then(|| Opening::start(sizes, pins.clone()))
        }
    };
    let t_early = std::time::Instant::now();
    let nexthops = NextHops::lookup(&nl, &arms, &cfg).await;
    let backends = Plan::backend_addresses(&cfg);
    let macs = nexthops.resolve(&nl, &arms, &nexthops.neighbours(&backends), resolve_timeout(&args)).await?;
    let (health_tx, mut health_rx) = mpsc::unbounded_channel::<HealthEvent>();
    let mut checker = Checker::new(MAX_CONCURRENT_PROBES, health_tx);
    checker.set_targets(probe_targets(&cfg));
    let down = initial_down(&cfg, &checker);
    let t_plan = std::time::Instant::now();
    let plan = Plan::next(&cfg, &nexthops.backend_macs(&backends, &macs), &down, None).set_egress(|a| nexthops.egress(a));
    report_unusable(&plan, &iface, &nexthops);

    let t_open = std::time::Instant::now();
    let (mut dp, opened) = match early {
        Some(opening) => opening.finish(),
        None => Dataplane::open(&Sizes::of(&plan), &pins),
    }
    .context("loading the XDP program")?;
    if opened.maps_reused {
        dp.adopt(&plan).context("reading the adopted maps")?;
    }
    let t_write = std::time::Instant::now();
    match (&opened.maps_reused, &opened.why_not) {
        (true, _) => tracing::info!(pin_dir = %args.pin_dir.display(),
            "adopting the balancer left attached here: maps reused, connection table kept"),
        (false, Some(why)) => tracing::warn!(pin_dir = %args.pin_dir.display(),
            "adopting the balancer left attached here with fresh maps ({why}): flows are scheduled again"),
        _ => {}
    }
    // Adopting: keep the ids the running balancer's maps use (its connection table
    // refers to them).
    let plan = match dp.applied() {
        Some(running) => {
            Plan::next(&cfg, &nexthops.backend_macs(&backends, &macs), &down, Some(running)).set_egress(|a| nexthops.egress(a))
        }
        None => plan,
    };
    let (source_v4, source_v6, mtu) = tunnel.for_dataplane();
    dp.set_tunnel(source_v4, source_v6, mtu).context("writing the tunnel settings")?;
    let backend_egress = arms.backend.as_ref().map(|b| (b.index, b.mac));
    dp.set_egress((iface.index, iface.mac), backend_egress).context("writing the egress interfaces")?;
    dp.write(&plan, iface.mac).context("filling the maps")?;
    let t_attach = std::time::Instant::now();
    let mode = match dp.attach(&iface.name, args.xdp_mode.mode()) {
        Ok(mode) => mode,
        Err(e) => {
            if !opened.adopted {
                dp.unpin();
            }
            return Err(e).with_context(|| format!("attaching to {}", iface.name));
        }
    };
    arms::attach_backend(&mut dp, &arms, mode, opened.adopted)?;
    let how = if opened.adopted { "replaced the program in the pinned link" } else { "attached" };
    let secs = |from: std::time::Instant, to: std::time::Instant| (to - from).as_secs_f64();
    tracing::debug!(
        scan = secs(t0, t_scanned),
        read = secs(t0, t_read),
        sizes_checked = secs(t0, t_early),
        read_and_resolve = secs(t0, t_plan),
        plan = secs(t_plan, t_open),
        load = secs(t_open, t_write),
        fill = secs(t_write, t_attach),
        attach = t_attach.elapsed().as_secs_f64(),
        "start phases"
    );
    tracing::info!(iface = %iface.name, %mode, services = plan.services.len(),
        backends = plan.backends.len(), pin_dir = %args.pin_dir.display(), "{how}");

    let handle = |dp: &mut Dataplane, name| dp.map_handle(name).with_context(|| format!("opening {name}"));
    let sweep_maps = crate::conntrack::SweepMaps {
        established: handle(&mut dp, lb_common::map_names::CT_ESTABLISHED)?,
        new: handle(&mut dp, lb_common::map_names::CONNTRACK)?,
        first: handle(&mut dp, lb_common::map_names::FIRST_RECORD)?,
        clock: handle(&mut dp, lb_common::map_names::CT_CLOCK)?,
        conns: handle(&mut dp, lb_common::map_names::BACKEND_CONNS)?,
        conn_delta: handle(&mut dp, lb_common::map_names::BACKEND_CONN_DELTA)?,
        nat_reverse: handle(&mut dp, lb_common::map_names::NAT_REVERSE)?,
        fullnat_forward: handle(&mut dp, lb_common::map_names::FULLNAT_FORWARD)?,
        fullnat_reverse: handle(&mut dp, lb_common::map_names::FULLNAT_REVERSE)?,
        syn_filter: handle(&mut dp, lb_common::map_names::CT_SYN_FILTER)?,
    };
    let ct_capacity = dp.conntrack_capacity(&plan).context("reading the connection-table sizes")?;
    let (timeouts, timeouts_rx) = tokio::sync::watch::channel(cfg.timeouts);
    let conntrack = Arc::new(Mutex::new(TableStatus::default()));
    let conn_bases = crate::conntrack::Bases::default();
    let (reloads, mut parsed) = reloading::Reloads::new();
    let (stats_reader, mut stats_read) =
        stats_reader::StatsReader::start(dp.stats_maps().context("opening the counter maps")?, conn_bases.clone());
    // Announced only now that the program is attached and the maps filled.
    announce.update(&plan);
    let mut agent = Agent {
        args,
        config: cfg,
        seen: in_force.clone(),
        seen_meta: None,
        in_force,
        in_force_cut: None,
        arms,
        nl,
        macs,
        nexthops,
        tunnel,
        addresses,
        routes_checked: std::time::Instant::now(),
        down,
        plan,
        dp,
        checker,
        reloads_ok: 0,
        reloads_failed: 0,
        mode,
        started: std::time::Instant::now(),
        drained: BTreeSet::new(),
        status: Arc::new(RwLock::new(Status::default())),
        sampler: Sampler::default(),
        stats_reader,
        conntrack: conntrack.clone(),
        conn_bases: conn_bases.clone(),
        timeouts,
        ct_capacity,
        backoff: Default::default(),
        trace: None,
        reloads,
        announce,
    };
    agent.refresh_status();
    reloading::release_freed_memory();
    // systemd Type=notify: ready once the maps are filled and the program attached.
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "could not notify systemd of readiness");
    }
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let (calls_tx, mut calls) = mpsc::channel::<Call>(16);
    let control = tokio::spawn(crate::control::run(listener, calls_tx, shutdown_rx.clone()));
    let sweeper = tokio::spawn(crate::conntrack::run(sweep_maps, timeouts_rx, conntrack, conn_bases, shutdown_rx.clone()));
    let (mut trace_records, trace_reader) = trace_session::start_reader(&mut agent.dp, shutdown_rx.clone())?;
    let metrics = metrics_listener
        .map(|l| tokio::spawn(crate::metrics::serve_listener(l, agent.status.clone(), shutdown_rx.clone())));
    let mut status_tick = tokio::time::interval(Duration::from_secs(1));
    let mut file_tick = tokio::time::interval(Duration::from_secs(1));
    let mut resolve_tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = hup.recv() => agent.request_reload("SIGHUP", None),
            _ = file_tick.tick() => agent.file_tick(),
            Some(p) = parsed.recv() => agent.on_parsed(p),
            Some(ev) = health_rx.recv() => agent.on_health(ev),
            Some(ev) = neigh_events.recv() => agent.on_neighbour(ev),
            _ = resolve_tick.tick() => agent.resolve_missing().await,
            _ = status_tick.tick() => {
                agent.request_stats();
                agent.trace_tick();
            }
            Some(stats) = stats_read.recv() => agent.on_stats(stats),
            Some(call) = calls.recv() => agent.on_call(call),
            Some(raw) = trace_records.recv() => agent.on_trace_record(raw),
        }
        // Whatever the event, the announcements follow the plan now in the maps.
        agent.announce.update(&agent.plan);
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let _ = shutdown_tx.send(true);
    let _ = control.await;
    let _ = sweeper.await;
    let _ = trace_reader.await;
    agent.trace_stop("the agent is stopping");
    if let Some(m) = metrics {
        let _ = m.await;
    }
    agent.checker.shutdown();
    let stats = agent.dp.stats();
    if let Ok(stats) = &stats {
        crate::report::log_totals(&agent.plan, stats);
    }
    let converge = Duration::from_secs_f64(agent.args.withdraw_wait_secs.max(0.0));
    std::mem::take(&mut agent.announce).stop(!agent.args.keep_on_exit, converge).await;
    if agent.args.keep_on_exit {
        tracing::info!(iface = %agent.arms.client.name, pin_dir = %agent.args.pin_dir.display(),
            "exiting with the balancer left attached (--keep-on-exit): the next agent adopts it");
        agent.dp.keep();
        return Ok(());
    }
    let detached = agent.dp.detach();
    agent.dp.unpin();
    detached.context("detaching")?;
    tracing::info!(iface = %agent.arms.client.name, "detached");
    Ok(())
}

fn resolve_timeout(args: &RunArgs) -> Duration {
    Duration::from_secs_f64(args.resolve_timeout_secs.max(0.0))
}
