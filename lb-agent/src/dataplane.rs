//! Loading the XDP object with maps sized from the plan, filling the maps,
//! attaching, pinning for bpftool, and reading the counters back.

use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues},
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
    Ebpf, EbpfLoader,
};
use lb_common::{map_names as names, stat, Config, Counters, VipAddrKey, VipAddrVal, CONFIG_READY};

use crate::{neigh::Mac, plan::Plan};

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

/// Map sizes for a plan, with room for the configuration to grow.
pub fn map_sizes(plan: &Plan) -> [(&'static str, u32); 7] {
    let services = (plan.services.len() as u32 * 2).max(16);
    let backends = (plan.backends.len() as u32 * 2).max(64);
    [
        (names::VIP_ADDRS, services),
        (names::SERVICES, services),
        (names::SERVICE_STATS, services),
        (names::BACKENDS, backends),
        (names::BACKEND_STATS, backends),
        (names::MAGLEV, (plan.maglev.len() as u32).max(1)),
        (names::CONNTRACK, plan.conntrack_size.max(1)),
    ]
}

/// The loaded object.
pub struct Dataplane {
    ebpf: Ebpf,
    link: Option<XdpLinkId>,
    pins: Vec<PathBuf>,
    pin_dir: Option<PathBuf>,
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Map> {
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

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

impl Dataplane {
    /// Loads the object embedded in the agent, sizing the maps for `plan`.
    pub fn load(plan: &Plan) -> Result<Self> {
        Self::load_object(crate::object::OBJECT, plan)
    }

    pub fn load_object(object: &[u8], plan: &Plan) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        for (name, size) in map_sizes(plan) {
            loader.map_max_entries(name, size);
        }
        let mut ebpf = loader.load(object)?;
        for name in [lb_common::PROG_BALANCER, lb_common::PROG_PASS] {
            let prog: &mut Xdp = program(&mut ebpf, name)?;
            prog.load().map_err(|source| DataplaneError::Program { name: prog_name(name), source })?;
        }
        Ok(Self { ebpf, link: None, pins: Vec::new(), pin_dir: None })
    }

    /// Writes the plan into the maps in an order that is safe while traffic flows:
    /// backends and tables before the services that point at them, the VIP filter
    /// last, then the ready flag.
    pub fn write(&mut self, plan: &Plan, iface_mac: Mac) -> Result<()> {
        let cfg = Config { iface_mac, _pad: [0; 2], flags: 0 };
        self.set_config(cfg)?;
        {
            let mut m: Array<_, lb_common::Backend> =
                Array::try_from(map_mut(&mut self.ebpf, names::BACKENDS)?).map_err(map_err(names::BACKENDS))?;
            for b in &plan.backends {
                m.set(b.id, b.map_value(plan.services[b.service].value.id), 0).map_err(map_err(names::BACKENDS))?;
            }
        }
        {
            let mut m: Array<_, u32> =
                Array::try_from(map_mut(&mut self.ebpf, names::MAGLEV)?).map_err(map_err(names::MAGLEV))?;
            for (i, id) in plan.maglev.iter().enumerate() {
                m.set(i as u32, id, 0).map_err(map_err(names::MAGLEV))?;
            }
        }
        {
            let mut m: HashMap<_, lb_common::VipKey, lb_common::Service> =
                HashMap::try_from(map_mut(&mut self.ebpf, names::SERVICES)?).map_err(map_err(names::SERVICES))?;
            for s in &plan.services {
                m.insert(s.key, s.value, 0).map_err(map_err(names::SERVICES))?;
            }
        }
        {
            let mut m: HashMap<_, VipAddrKey, VipAddrVal> =
                HashMap::try_from(map_mut(&mut self.ebpf, names::VIP_ADDRS)?).map_err(map_err(names::VIP_ADDRS))?;
            for (addr, flags) in &plan.vip_addrs {
                m.insert(VipAddrKey { addr: *addr }, VipAddrVal { flags: *flags }, 0)
                    .map_err(map_err(names::VIP_ADDRS))?;
            }
        }
        self.set_config(Config { flags: CONFIG_READY, ..cfg })
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
