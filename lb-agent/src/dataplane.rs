//! Loading the XDP object with maps sized from the plan, filling the maps,
//! attaching, pinning for bpftool, and reading the counters back.

use std::{
    collections::BTreeMap,
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, Map, MapData, PerCpuArray, PerCpuValues},
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
    Ebpf, EbpfLoader,
};
use lb_common::{map_names as names, stat, Config, Counters, VipKey, CONFIG_READY};

use crate::{
    apply::{self, Capacity, MaglevMap, Placement, Regions, Summary},
    neigh::Mac,
    plan::Plan,
};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("map {name} is missing from the object")]
    MissingMap { name: &'static str },
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("pinning {path}: {source}")]
    Pin { path: PathBuf, source: aya::pin::PinError },
    #[error("the configuration does not fit the maps created at start: {what}; restart the agent to resize them")]
    Capacity { what: String },
    #[error("pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: std::io::Error },
}

type Result<T> = std::result::Result<T, DataplaneError>;

/// How the program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    Native,
    Generic,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        })
    }
}

/// Map sizes for a plan, with room for the configuration to grow: twice the
/// services and backends, and for `MAGLEV` two tables per service (the double
/// buffer) plus a quarter more and room for one more default-sized service.
pub fn map_sizes(plan: &Plan) -> [(&'static str, u32); 8] {
    let services = (plan.services.len() as u32 * 2).max(16);
    let backends = (plan.backends.len() as u32 * 2).max(64);
    let tables: u64 = plan.services.iter().map(|s| s.table.len() as u64).sum();
    let maglev = (tables * 2 + tables / 2 + 2 * 65537).min(u32::MAX as u64) as u32;
    [
        (names::VIP_ADDRS, services),
        (names::SERVICES, services),
        (names::SERVICE_STATS, services),
        (names::BACKENDS, backends),
        (names::BACKEND_STATS, backends),
        (names::MAGLEV, maglev),
        (names::CONNTRACK, plan.conntrack_size.max(1)),
        (names::AFFINITY, (plan.conntrack_size / 4).max(1024)),
    ]
}

/// The loaded object.
pub struct Dataplane {
    ebpf: Ebpf,
    link: Option<XdpLinkId>,
    pins: Vec<PathBuf>,
    pin_dir: Option<PathBuf>,
    pub(crate) capacity: Capacity,
    pub(crate) regions: Regions,
    pub(crate) placed: BTreeMap<VipKey, Placement>,
    pub(crate) applied: Option<Plan>,
    pub(crate) maglev: MaglevMap,
}

pub(crate) fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Map> {
    ebpf.map_mut(name).ok_or(DataplaneError::MissingMap { name })
}

/// A second handle on a map (for reading counters while the maps stay owned here).
fn map_data(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData> {
    let data = match map_mut(ebpf, name)? {
        Map::HashMap(m) | Map::Array(m) | Map::PerCpuArray(m) | Map::LruHashMap(m) => m,
        _ => return Err(DataplaneError::MissingMap { name }),
    };
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| DataplaneError::PinDir { path: name.into(), source })?;
    MapData::from_fd(fd).map_err(map_err(name))
}

pub(crate) fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

impl Dataplane {
    /// Loads the object embedded in the agent, sizing the maps for `plan`.
    pub fn load(plan: &Plan) -> Result<Self> {
        Self::load_object(crate::object::OBJECT, plan)
    }

    pub fn load_object(object: &[u8], plan: &Plan) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        let sizes = map_sizes(plan);
        let size = |n: &str| sizes.iter().find(|(name, _)| *name == n).map(|(_, s)| *s).unwrap_or(1);
        let capacity =
            Capacity { services: size(names::SERVICES), backends: size(names::BACKENDS), maglev: size(names::MAGLEV) };
        for (name, size) in sizes {
            loader.map_max_entries(name, size);
        }
        let mut ebpf = loader.load(object)?;
        for name in [lb_common::PROG_BALANCER, lb_common::PROG_PASS] {
            let prog: &mut Xdp = program(&mut ebpf, name)?;
            prog.load().map_err(|source| DataplaneError::Program { name: prog_name(name), source })?;
        }
        let maglev = match map_mut(&mut ebpf, names::MAGLEV)? {
            Map::Array(m) => MaglevMap::new(m.fd().as_fd(), capacity.maglev as usize)
                .map_err(|source| DataplaneError::PinDir { path: "MAGLEV (mmap)".into(), source })?,
            _ => return Err(DataplaneError::MissingMap { name: names::MAGLEV }),
        };
        Ok(Self {
            ebpf,
            maglev,
            link: None,
            pins: Vec::new(),
            pin_dir: None,
            capacity,
            regions: Regions::new(capacity.maglev),
            placed: BTreeMap::new(),
            applied: None,
        })
    }

    /// First fill: the interface MAC, then the plan, then the ready flag.
    pub fn write(&mut self, plan: &Plan, iface_mac: Mac) -> Result<Summary> {
        let cfg = Config { iface_mac, _pad: [0; 2], flags: 0 };
        self.set_config(cfg)?;
        let summary = apply::apply(self, plan)?;
        self.set_config(Config { flags: CONFIG_READY, ..cfg })?;
        Ok(summary)
    }

    /// Moves the maps from the last applied plan to `plan` (see `apply`).
    pub fn apply(&mut self, plan: &Plan) -> Result<Summary> {
        apply::apply(self, plan)
    }

    /// Whether `plan` fits the maps as they were created.
    pub fn check_fits(&self, plan: &Plan) -> Result<()> {
        apply::check_fits(self, plan)
    }

    fn set_config(&mut self, cfg: Config) -> Result<()> {
        let mut m: Array<_, Config> =
            Array::try_from(map_mut(&mut self.ebpf, names::CONFIG)?).map_err(map_err(names::CONFIG))?;
        m.set(0, cfg, 0).map_err(map_err(names::CONFIG))
    }

    /// Attaches the balancer to `iface`. `None` means auto: native, falling back to
    /// generic (the caller logs the fallback).
    pub fn attach(&mut self, iface: &str, mode: Option<AttachMode>) -> Result<AttachMode> {
        let prog: &mut Xdp = program(&mut self.ebpf, lb_common::PROG_BALANCER)?;
        let attach = |prog: &mut Xdp, m: AttachMode| {
            let flags = match m {
                AttachMode::Native => XdpMode::Driver,
                AttachMode::Generic => XdpMode::Skb,
            };
            prog.attach(iface, flags)
        };
        let (link, used) = match mode {
            Some(m) => (attach(prog, m), m),
            None => match attach(prog, AttachMode::Native) {
                Ok(link) => (Ok(link), AttachMode::Native),
                Err(e) => {
                    tracing::warn!(iface, error = %e, "native XDP attach failed, falling back to generic mode");
                    (attach(prog, AttachMode::Generic), AttachMode::Generic)
                }
            },
        };
        let link = link.map_err(|source| DataplaneError::Program { name: "lb_xdp", source })?;
        self.link = Some(link);
        Ok(used)
    }

    /// Detaches the balancer if attached.
    pub fn detach(&mut self) -> Result<()> {
        if let Some(link) = self.link.take() {
            let prog: &mut Xdp = program(&mut self.ebpf, lb_common::PROG_BALANCER)?;
            prog.detach(link).map_err(|source| DataplaneError::Program { name: "lb_xdp", source })?;
        }
        Ok(())
    }

    /// Pins every map under `dir` (on a bpffs) so `bpftool map dump pinned DIR/NAME`
    /// and `lb-agent stats` can read them. Stale pins from an earlier run are replaced.
    pub fn pin_maps(&mut self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).map_err(|source| DataplaneError::PinDir { path: dir.into(), source })?;
        self.pin_dir = Some(dir.to_path_buf());
        let names: Vec<String> = self.ebpf.maps().map(|(n, _)| n.to_string()).collect();
        for name in names {
            if name.starts_with('.') {
                continue;
            }
            let path = dir.join(&name);
            if path.exists() {
                fs::remove_file(&path).map_err(|source| DataplaneError::PinDir { path: path.clone(), source })?;
            }
            let map = self.ebpf.map(&name).expect("listed above");
            map.pin(&path).map_err(|source| DataplaneError::Pin { path: path.clone(), source })?;
            self.pins.push(path);
        }
        Ok(())
    }

    /// Removes the pins this agent made, and the directory if that leaves it empty.
    pub fn unpin(&mut self) {
        for p in self.pins.drain(..) {
            if let Err(e) = fs::remove_file(&p) {
                tracing::warn!(path = %p.display(), error = %e, "could not remove pin");
            }
        }
        if let Some(dir) = self.pin_dir.take() {
            let _ = fs::remove_dir(dir);
        }
    }

    pub fn balancer(&mut self) -> Result<&mut Xdp> {
        program(&mut self.ebpf, lb_common::PROG_BALANCER)
    }

    pub fn pass_program(&mut self) -> Result<&mut Xdp> {
        program(&mut self.ebpf, lb_common::PROG_PASS)
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Current counters, summed over CPUs.
    pub fn stats(&mut self) -> Result<Stats> {
        let e = &mut self.ebpf;
        Stats::read(map_data(e, names::STATS)?, map_data(e, names::SERVICE_STATS)?, map_data(e, names::BACKEND_STATS)?)
    }
}

fn prog_name(name: &str) -> &'static str {
    if name == lb_common::PROG_PASS { lb_common::PROG_PASS } else { lb_common::PROG_BALANCER }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let missing = || DataplaneError::Program {
        name: prog_name(name),
        source: aya::programs::ProgramError::UnexpectedProgramType,
    };
    let prog = ebpf.program_mut(name).ok_or_else(missing)?;
    prog.try_into().map_err(|_| missing())
}

/// Counters summed over CPUs.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Indexed by `lb_common::stat`.
    pub global: Vec<u64>,
    /// Indexed by service id.
    pub services: Vec<Counters>,
    /// Indexed by backend id.
    pub backends: Vec<Counters>,
}

fn sum_counters(v: &PerCpuValues<Counters>) -> Counters {
    v.iter().fold(Counters::default(), |a, c| Counters { packets: a.packets + c.packets, bytes: a.bytes + c.bytes })
}

impl Stats {
    fn read(global: MapData, services: MapData, backends: MapData) -> Result<Stats> {
        let g: PerCpuArray<_, u64> =
            PerCpuArray::try_from(Map::PerCpuArray(global)).map_err(map_err(names::STATS))?;
        let s: PerCpuArray<_, Counters> =
            PerCpuArray::try_from(Map::PerCpuArray(services)).map_err(map_err(names::SERVICE_STATS))?;
        let b: PerCpuArray<_, Counters> =
            PerCpuArray::try_from(Map::PerCpuArray(backends)).map_err(map_err(names::BACKEND_STATS))?;
        let mut out = Stats::default();
        for i in 0..stat::COUNT {
            let v = g.get(&i, 0).map_err(map_err(names::STATS))?;
            out.global.push(v.iter().sum());
        }
        for v in s.iter() {
            out.services.push(sum_counters(&v.map_err(map_err(names::SERVICE_STATS))?));
        }
        for v in b.iter() {
            out.backends.push(sum_counters(&v.map_err(map_err(names::BACKEND_STATS))?));
        }
        Ok(out)
    }

    /// Reads the counters from maps pinned by a running agent under `dir`.
    pub fn read_pinned(dir: &Path) -> Result<Stats> {
        let open = |name: &'static str| MapData::from_pin(dir.join(name)).map_err(map_err(name));
        Self::read(open(names::STATS)?, open(names::SERVICE_STATS)?, open(names::BACKEND_STATS)?)
    }

    pub fn get(&self, stat: u32) -> u64 {
        self.global.get(stat as usize).copied().unwrap_or(0)
    }
}
