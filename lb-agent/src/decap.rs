//! `lb-agent decap`: the real servers' side of tunnel forwarding. Loads `lb_decap`
//! from the embedded object (the balancer's maps sized to one entry, so a real
//! server allocates none of its tables), fills `DECAP_ADDRS` with the interface's
//! addresses and `DECAP_CONFIG` with the GUE port, attaches it, keeps the addresses
//! in step with the interface (rtnetlink address events), and on SIGTERM/SIGINT
//! detaches and removes its pins.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use lb_common::{decap_stat, map_names as names, DecapAddrKey, DecapAddrVal, DecapConfig, PROG_DECAP};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    cli::ModeArg,
    dataplane::{map_err, map_mut, AttachMode, DataplaneError},
};

mod addrs;

pub use addrs::{interface_addrs, key_of};

/// Where `lb-agent decap` pins its maps unless told otherwise.
pub const DEFAULT_DECAP_PIN_DIR: &str = "/sys/fs/bpf/lb-decap";

#[derive(Debug, clap::Args)]
pub struct DecapArgs {
    /// Interface the tunnelled packets arrive on; its addresses are the outer
    /// destinations taken apart.
    #[arg(long, required_unless_present = "stats")]
    pub iface: Option<String>,
    /// UDP destination port of GUE packets (0: GUE off, IPIP forms only).
    #[arg(long, default_value_t = lb_common::DEFAULT_GUE_PORT)]
    pub gue_port: u16,
    /// native: in the driver; generic: in the stack; auto: native, falling back to
    /// generic with a warning.
    #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
    pub xdp_mode: ModeArg,
    /// Directory on a bpffs where DECAP_STATS, DECAP_ADDRS and DECAP_CONFIG are
    /// pinned (for bpftool and --stats); "none": pin nothing. Locked while it runs.
    #[arg(long, default_value = DEFAULT_DECAP_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Print the counters of the decapsulator pinned under --pin-dir and exit.
    #[arg(long)]
    pub stats: bool,
}

/// The maps `lb-agent decap` pins.
const PINNED: [&str; 3] = [names::DECAP_STATS, names::DECAP_ADDRS, names::DECAP_CONFIG];

/// The loaded decapsulator.
pub struct Decap {
    ebpf: Ebpf,
    link: Option<aya::programs::xdp::XdpLinkId>,
}

impl Decap {
    /// Loads `lb_decap` from `object` (the agent's embedded object in production)
    /// with every balancer map sized to one entry.
    pub fn load(object: &[u8]) -> Result<Self, DataplaneError> {
        let mut loader = EbpfLoader::new();
        for (name, ..) in crate::pinning::layout() {
            loader.map_max_entries(name, 1);
        }
        let mut ebpf = loader.load(object)?;
        let prog = program(&mut ebpf)?;
        prog.load().map_err(|source| DataplaneError::Program { name: PROG_DECAP, source })?;
        Ok(Self { ebpf, link: None })
    }

    /// The program (for test runs).
    pub fn program(&mut self) -> Result<&mut Xdp, DataplaneError> {
        program(&mut self.ebpf)
    }

    /// Sets the GUE port (0: GUE off).
    pub fn set_gue_port(&mut self, port: u16) -> Result<(), DataplaneError> {
        let name = names::DECAP_CONFIG;
        let mut m: Array<_, DecapConfig> = Array::try_from(map_mut(&mut self.ebpf, name)?).map_err(map_err(name))?;
        m.set(0, DecapConfig { gue_port: port, _pad: [0; 2], flags: 0 }, 0).map_err(map_err(name))
    }

    /// Makes `DECAP_ADDRS` hold exactly `wanted` (16-byte address -> ifindex);
    /// returns how many entries were added and removed.
    pub fn sync_addrs(&mut self, wanted: &BTreeMap<[u8; 16], u32>) -> Result<(usize, usize), DataplaneError> {
        let name = names::DECAP_ADDRS;
        let mut m: HashMap<_, DecapAddrKey, DecapAddrVal> =
            HashMap::try_from(map_mut(&mut self.ebpf, name)?).map_err(map_err(name))?;
        let have: Vec<(DecapAddrKey, DecapAddrVal)> = m.iter().collect::<Result<_, _>>().map_err(map_err(name))?;
        let mut removed = 0;
        for (k, _) in &have {
            if !wanted.contains_key(&k.addr) {
                m.remove(k).map_err(map_err(name))?;
                removed += 1;
            }
        }
        let mut added = 0;
        for (addr, ifindex) in wanted {
            let key = DecapAddrKey { addr: *addr };
            let val = DecapAddrVal { ifindex: *ifindex };
            if !have.iter().any(|(k, v)| *k == key && *v == val) {
                m.insert(key, val, 0).map_err(map_err(name))?;
                added += 1;
            }
        }
        Ok((added, removed))
    }

    /// Counters summed over CPUs, indexed by `lb_common::decap_stat`.
    pub fn stats(&mut self) -> Result<Vec<u64>, DataplaneError> {
        let name = names::DECAP_STATS;
        read_stats(PerCpuArray::try_from(map_mut(&mut self.ebpf, name)?).map_err(map_err(name))?)
    }

    /// Entries of map `name` as created (every balancer map: 1).
    pub fn max_entries(&mut self, name: &'static str) -> Result<u32, DataplaneError> {
        let data: &MapData = match map_mut(&mut self.ebpf, name)? {
            Map::HashMap(m) | Map::Array(m) | Map::PerCpuArray(m) | Map::LruHashMap(m) | Map::LpmTrie(m) => m,
            _ => return Err(DataplaneError::MissingMap { name }),
        };
        Ok(data.info().map_err(map_err(name))?.max_entries())
    }

    /// Pins the decapsulator's maps under `dir` (replacing stale pins).
    pub fn pin(&mut self, dir: &Path) -> Result<(), DataplaneError> {
        for name in PINNED {
            let path = dir.join(name);
            let _ = std::fs::remove_file(&path);
            let data: &MapData = match map_mut(&mut self.ebpf, name)? {
                Map::HashMap(m) | Map::Array(m) | Map::PerCpuArray(m) => m,
                _ => return Err(DataplaneError::MissingMap { name }),
            };
            data.pin(&path).map_err(|source| DataplaneError::Pin { path, source })?;
        }
        Ok(())
    }

    /// Attaches to `iface`; `None` means auto (native, else generic).
    pub fn attach(&mut self, iface: &str, mode: Option<AttachMode>) -> Result<AttachMode, DataplaneError> {
        let prog = program(&mut self.ebpf)?;
        let flags = |m| if m == AttachMode::Native { XdpMode::Driver } else { XdpMode::Skb };
        let err = |source| DataplaneError::Program { name: PROG_DECAP, source };
        let (id, used) = match mode {
            Some(m) => (prog.attach(iface, flags(m)).map_err(err)?, m),
            None => match prog.attach(iface, XdpMode::Driver) {
                Ok(id) => (id, AttachMode::Native),
                Err(e) => {
                    tracing::warn!(iface, error = %e, "native XDP attach failed, falling back to generic mode");
                    (prog.attach(iface, XdpMode::Skb).map_err(err)?, AttachMode::Generic)
                }
            },
        };
        self.link = Some(id);
        Ok(used)
    }

    /// Detaches the program (if attached).
    pub fn detach(&mut self) -> Result<(), DataplaneError> {
        if let Some(id) = self.link.take() {
            program(&mut self.ebpf)?.detach(id).map_err(|source| DataplaneError::Program { name: PROG_DECAP, source })?;
        }
        Ok(())
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp, DataplaneError> {
    let missing = || DataplaneError::Program { name: PROG_DECAP, source: aya::programs::ProgramError::UnexpectedProgramType };
    ebpf.program_mut(PROG_DECAP).ok_or_else(missing)?.try_into().map_err(|_| missing())
}

fn read_stats<T: std::borrow::Borrow<MapData>>(m: PerCpuArray<T, u64>) -> Result<Vec<u64>, DataplaneError> {
    let name = names::DECAP_STATS;
    (0..decap_stat::COUNT).map(|i| Ok(m.get(&i, 0).map_err(map_err(name))?.iter().sum())).collect()
}

/// Counters of the decapsulator pinned under `dir`, indexed by `decap_stat`.
pub fn read_pinned_stats(dir: &Path) -> Result<Vec<u64>, DataplaneError> {
    let name = names::DECAP_STATS;
    let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
    read_stats(PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(name))?)
}

/// `lb-agent decap`.
pub fn main(args: DecapArgs) -> Result<()> {
    if args.stats {
        let stats = read_pinned_stats(&args.pin_dir)
            .with_context(|| format!("reading the decapsulator's counters under {}", args.pin_dir.display()))?;
        for (name, value) in decap_stat::NAMES.iter().zip(stats) {
            println!("{name:<20} {value}");
        }
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")?;
    rt.block_on(run(args))
}

async fn run(args: DecapArgs) -> Result<()> {
    let iface_name = args.iface.clone().context("--iface is required")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let pin_dir = (args.pin_dir.as_os_str() != "none").then(|| args.pin_dir.clone());
    let _lock = pin_dir.as_deref().map(crate::ownership::lock_pin_dir).transpose()?;
    let nl = crate::neigh::Neighbours::connect()?;
    let iface = nl.interface(&iface_name).await?;
    if let Some(id) = iface.xdp_prog {
        anyhow::bail!("interface {iface_name} already carries XDP program {id}: detach it first (ip link set dev {iface_name} xdp off)");
    }
    let mut events = addrs::watch().context("subscribing to address changes")?;
    let mut dp = Decap::load(crate::object::OBJECT).context("loading the decapsulator")?;
    dp.set_gue_port(args.gue_port).context("setting the GUE port")?;
    let wanted = interface_addrs(&nl, iface.index).await.with_context(|| format!("reading the addresses of {iface_name}"))?;
    dp.sync_addrs(&wanted).context("filling DECAP_ADDRS")?;
    if let Some(dir) = &pin_dir {
        dp.pin(dir).with_context(|| format!("pinning the maps under {}", dir.display()))?;
    }
    let mode = match dp.attach(&iface_name, args.xdp_mode.mode()) {
        Ok(m) => m,
        Err(e) => {
            unpin(pin_dir.as_deref());
            return Err(e).with_context(|| format!("attaching to {iface_name}"));
        }
    };
    let gue = if args.gue_port == 0 { "off".to_string() } else { args.gue_port.to_string() };
    tracing::info!(iface = %iface_name, %mode, gue_port = %gue, addresses = %addrs::describe(&wanted),
        pin_dir = %pin_dir.as_deref().map_or("none".into(), |d| d.display().to_string()), "decapsulator attached");
    warn_strict_rp_filter(&iface_name);
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "could not notify systemd of readiness");
    }
    let mut poll = tokio::time::interval(Duration::from_secs(10));
    let result = loop {
        tokio::select! {
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break Ok(()); }
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break Ok(()); }
            ev = events.recv() => match ev {
                Some(ifindex) if ifindex != iface.index => continue,
                Some(_) => {}
                None => break Err(anyhow::anyhow!("the rtnetlink address subscription ended")),
            },
            _ = poll.tick() => {}
        }
        match interface_addrs(&nl, iface.index).await {
            Ok(now) => match dp.sync_addrs(&now) {
                Ok((0, 0)) => {}
                Ok((added, removed)) => {
                    tracing::info!(iface = %iface_name, added, removed, addresses = %addrs::describe(&now), "addresses changed")
                }
                Err(e) => tracing::warn!(error = %e, "updating DECAP_ADDRS"),
            },
            Err(e) => tracing::warn!(iface = %iface_name, error = %e, "reading the interface addresses"),
        }
    };
    dp.detach().with_context(|| format!("detaching from {iface_name}"))?;
    unpin(pin_dir.as_deref());
    tracing::info!(iface = %iface_name, "detached");
    result
}

/// Strict reverse-path filtering (1, the larger of `all` and the interface's
/// setting) drops decapsulated packets from clients this host does not route back
/// through the interface: say so.
fn warn_strict_rp_filter(iface: &str) {
    let read = |dev: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{dev}/rp_filter")).ok()?.trim().parse::<u8>().ok();
    if read("all").max(read(iface)) == Some(1) {
        tracing::warn!(iface, "rp_filter is strict on {iface}: decapsulated packets from clients not routed back through it \
            are dropped; set net.ipv4.conf.all.rp_filter and net.ipv4.conf.{iface}.rp_filter to 2 (lb-realserver.sh up-tunnel does)");
    }
}

fn unpin(dir: Option<&Path>) {
    if let Some(dir) = dir {
        for name in PINNED {
            let _ = std::fs::remove_file(dir.join(name));
        }
    }
}
