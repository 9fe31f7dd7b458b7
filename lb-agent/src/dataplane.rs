//! Loading the XDP object with maps sized from the plan, filling the maps,
//! attaching, pinning for bpftool, and reading the counters back.

use std::{
    collections::BTreeMap,
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, Map, MapData},
    programs::{links::FdLink, Xdp},
    Ebpf, EbpfLoader,
};
use lb_common::{
    map_names as names, Backend, Config, Service, VipAddrKey, VipAddrVal, VipKey, CONFIG_CT_PROTECT,
    CONFIG_READY,
};

mod adopt;
mod link;
mod programs;
mod scan;
mod sizes;
mod stats;
mod trace_hook;

use programs::{load_retrying, prog_name, program, set_rare_slot};
pub use sizes::{map_sizes, Opening, Sizes};
pub use stats::{Stats, StatsMaps};

use crate::{
    apply::{self, Capacity, MaglevMap, Placement, Regions, Summary},
    neigh::Mac,
    pinning::{layout, PinDir, NAT_UNSIZED},
    plan::Plan,
};

/// What `Dataplane::open` found.
#[derive(Debug, Clone)]
pub struct Opened {
    /// An earlier agent's balancer was attached (its link pinned).
    pub adopted: bool,
    /// Its maps were reused: connection table and counters carry on.
    pub maps_reused: bool,
    /// Why they were not, when adopted.
    pub why_not: Option<String>,
}

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
    #[error("XDP link {path}: {error}")]
    Link { path: PathBuf, error: String },
    #[error("EGRESS[{index}] (the interfaces of two-arm forwarding): {error}")]
    Egress { index: u8, error: String },
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

/// `CONFIG` flags with the plan's `answer_ping`, `forward_icmp`, whether it has
/// prefix services and `nat` services, and its fragment lifetime.
fn icmp_policy(flags: u32, plan: &Plan) -> (u32, u32) {
    use lb_common::{CONFIG_ANSWER_PING, CONFIG_FORWARD_ICMP, CONFIG_FULLNAT, CONFIG_NAT, CONFIG_PREFIX};
    let mut flags = flags & !(CONFIG_ANSWER_PING | CONFIG_FORWARD_ICMP | CONFIG_PREFIX | CONFIG_NAT | CONFIG_FULLNAT);
    if plan.fullnat {
        flags |= CONFIG_FULLNAT;
    }
    if plan.has_prefix() {
        flags |= CONFIG_PREFIX;
    }
    if plan.nat {
        flags |= CONFIG_NAT;
    }
    if plan.answer_ping {
        flags |= CONFIG_ANSWER_PING;
    }
    if plan.forward_icmp {
        flags |= CONFIG_FORWARD_ICMP;
    }
    (flags, plan.frag_timeout_s)
}

/// The loaded object.
pub struct Dataplane {
    ebpf: Ebpf,
    /// Our handle on the XDP link (pinned at `pins.link()` when `pins` is set).
    link: Option<FdLink>,
    /// Two-arm: the link on the backend interface (`pins.backend_link()`).
    backend_link: Option<FdLink>,
    pins: Option<PinDir>,
    pub(crate) capacity: Capacity,
    pub(crate) regions: Regions,
    pub(crate) placed: BTreeMap<VipKey, Placement>,
    pub(crate) applied: Option<Plan>,
    /// The maps were created by this load and nothing was applied yet: every
    /// counter is still zero, so the first apply need not clear any.
    pub(crate) fresh: bool,
    pub(crate) maglev: MaglevMap,
    /// `MAGLEV` was created afresh under adopted pins (another version's
    /// layout): the tables it is said to hold are not there.
    maglev_fresh: bool,
    /// What `CONFIG[0]` holds (interface MAC, flags).
    config: Config,
    /// `lb_prefix` is loaded and in `RARE_PROGS` (done with the first plan that
    /// has prefix services: its verification costs as much as `lb_xdp`'s).
    prefix_loaded: bool,
    /// `lb_nat` and `lb_nat_reply` are loaded and in `RARE_PROGS`.
    nat_loaded: bool,
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
    dup_map(data, name)
}

/// A second handle on map `name`, `data` (a duplicated descriptor).
fn dup_map(data: &MapData, name: &'static str) -> Result<MapData> {
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
        Self::load_with(object, plan, None)
    }

    /// Loads the object with every map pinned under `pins`, the maps sized for
    /// `sizes`. When an earlier agent left a balancer attached there and its maps
    /// fit, they are reused (see `pinning`): `Opened` says which happened and why,
    /// and `adopt` then reads back what they hold.
    pub fn open(sizes: &Sizes, pins: &PinDir) -> Result<(Self, Opened)> {
        fs::create_dir_all(&pins.dir).map_err(|source| DataplaneError::PinDir { path: pins.dir.clone(), source })?;
        // With `nat` or `fullnat` services, NAT tables larger than the unsized ones
        // (`pinning` creates those afresh: they never held a flow).
        let nat = if sizes.nat { NAT_UNSIZED + 1 } else { 0 };
        let needed = [
            (names::SERVICES, sizes.services),
            (names::BACKENDS, sizes.backends),
            (names::MAGLEV, sizes::maglev_elements(sizes, false)),
            (names::FIRST_RECORD, lb_common::first_record_entries(sizes.conntrack)),
            (names::NAT_REVERSE, nat),
            (names::FULLNAT_REVERSE, nat),
            (names::FULLNAT_FORWARD, nat),
        ];
        let mut maglev_fresh = false;
        let opened = if pins.has_link() {
            match pins.reusable(&needed) {
                Ok(replaced) => {
                    maglev_fresh = replaced.contains(&names::MAGLEV);
                    Opened { adopted: true, maps_reused: true, why_not: None }
                }
                Err(why) => Opened { adopted: true, maps_reused: false, why_not: Some(why) },
            }
        } else {
            Opened { adopted: false, maps_reused: false, why_not: None }
        };
        let cleared = if opened.maps_reused { pins.drop_unfit_prog_array() } else { pins.clear_maps() };
        cleared.map_err(|source| DataplaneError::PinDir { path: pins.dir.clone(), source })?;
        let mut dp = Self::load_sized(crate::object::OBJECT, sizes, Some(pins))?;
        dp.maglev_fresh = maglev_fresh;
        Ok((dp, opened))
    }

    /// After `open` reused the maps: rebuilds what the earlier agent applied
    /// (ids, generations, table placement), keeping what `plan` shares with it.
    pub fn adopt(&mut self, plan: &Plan) -> Result<()> {
        self.adopt_state(plan)
    }

    fn load_with(object: &[u8], plan: &Plan, pins: Option<&PinDir>) -> Result<Self> {
        Self::load_sized(object, &Sizes::of(plan), pins)
    }

    fn load_sized(object: &[u8], sizes: &Sizes, pins: Option<&PinDir>) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        // Ignored for pinned maps that are reused: their sizes are read back below.
        for (name, size) in sizes::sized(sizes) {
            loader.map_max_entries(name, size);
        }
        // RARE_PROGS is pinned too: the kernel empties a program array when its last
        // user reference closes, which would cut the rare path off between agents.
        // And EGRESS (two-arm's devmap), for bpftool; neither is in `layout()`.
        let paths: Vec<(&'static str, PathBuf)> = pins
            .map(|p| layout().iter().map(|(n, ..)| *n).chain([names::RARE_PROGS, names::EGRESS]).map(|n| (n, p.map(n))).collect())
            .unwrap_or_default();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let t_maps = std::time::Instant::now();
        let mut ebpf = loader.load(object)?;
        let t_verify = std::time::Instant::now();
        // The balancer with the trace hook is verified when a trace first needs it
        // (`set_tracing`): a third of the start-up time otherwise.
        // With them, the programs the configuration will need (`load_on_demand`
        // otherwise): verified in parallel.
        let mut names = vec![lb_common::PROG_BALANCER, lb_common::PROG_RARE, lb_common::PROG_PASS];
        if sizes.prefix {
            names.push(lb_common::PROG_PREFIX);
        }
        if sizes.nat {
            names.extend([lb_common::PROG_NAT, lb_common::PROG_NAT_REPLY]);
        }
        programs::load_all(&mut ebpf, &names)?;
        tracing::debug!(maps = (t_verify - t_maps).as_secs_f64(), verify = t_verify.elapsed().as_secs_f64(), "open phases");
        // lb_xdp tail-calls lb_rare (ICMP, fragments) through RARE_PROGS[0].
        set_rare_slot(&mut ebpf, lb_common::PROG_RARE, lb_common::RARE_SLOT)?;
        programs::set_on_demand_slots(&mut ebpf, sizes.prefix, sizes.nat)?;
        // lb_nat and lb_nat_reply are loaded with the first `nat` or `fullnat`
        // service (`load_on_demand`).
        let max_entries = |ebpf: &mut Ebpf, name: &'static str| -> Result<u32> {
            let info = map_data(ebpf, name)?.info().map_err(map_err(name))?;
            Ok(info.max_entries())
        };
        let capacity = Capacity {
            services: max_entries(&mut ebpf, names::SERVICES)?,
            backends: max_entries(&mut ebpf, names::BACKENDS)?,
            maglev: max_entries(&mut ebpf, names::MAGLEV)?.saturating_mul(2),
            nat: max_entries(&mut ebpf, names::NAT_REVERSE)? > NAT_UNSIZED,
        };
        let maglev = match map_mut(&mut ebpf, names::MAGLEV)? {
            Map::Array(m) => MaglevMap::new(m.fd().as_fd(), capacity.maglev as usize / 2)
                .map_err(|source| DataplaneError::PinDir { path: "MAGLEV (mmap)".into(), source })?,
            _ => return Err(DataplaneError::MissingMap { name: names::MAGLEV }),
        };
        Ok(Self {
            ebpf,
            maglev,
            maglev_fresh: false,
            link: None,
            backend_link: None,
            pins: pins.cloned(),
            capacity,
            regions: Regions::new(capacity.maglev),
            placed: BTreeMap::new(),
            applied: None,
            fresh: true,
            config: Config { mtu: 1500, ..Config::default() },
            prefix_loaded: sizes.prefix,
            nat_loaded: sizes.nat,
        })
    }

    /// First fill: the interface MAC, then the plan, then the ready flag.
    pub fn write(&mut self, plan: &Plan, iface_mac: Mac) -> Result<Summary> {
        // An adopted data plane stays ready (it is forwarding); a fresh one becomes
        // ready once the maps are filled.
        let protect = if plan.established_size > 0 { CONFIG_CT_PROTECT } else { 0 };
        let flags = (self.config.flags & !CONFIG_CT_PROTECT) | protect;
        let (flags, frag_timeout_s) = icmp_policy(flags, plan);
        // Entries are stamped with the published clock: publish it before any.
        let mut clock: Array<_, u32> =
            Array::try_from(map_mut(&mut self.ebpf, names::CT_CLOCK)?).map_err(map_err(names::CT_CLOCK))?;
        crate::conntrack::publish_clock(&mut clock).map_err(map_err(names::CT_CLOCK))?;
        let syn_flood_kps = plan.syn_flood_kps;
        let first_record_mask = if protect != 0 { self.first_record_mask()? } else { 0 };
        self.set_config(Config { iface_mac, syn_flood_kps, flags, frag_timeout_s, first_record_mask, ..self.config })?;
        self.load_on_demand(plan)?;
        let summary = apply::apply(self, plan)?;
        // A trace an earlier agent left running ends here.
        self.set_trace_filter(lb_common::TraceFilter::default())?;
        self.set_config(Config { flags: flags | CONFIG_READY, ..self.config })?;
        Ok(summary)
    }

    /// `Config::first_record_mask` for `FIRST_RECORD` as it was created (or
    /// adopted): its entries rounded down to a power of two, minus one.
    fn first_record_mask(&mut self) -> Result<u32> {
        let name = names::FIRST_RECORD;
        let entries = map_data(&mut self.ebpf, name)?.info().map_err(map_err(name))?.max_entries();
        Ok(if entries == 0 { 0 } else { (1u32 << (31 - entries.leading_zeros())) - 1 })
    }

    /// The SYN flood threshold (`Config::syn_flood_kps`; 0: every SYN recorded).
    /// `write` and `apply` set the plan's (the file's `syn_flood_kps`); benchmarks
    /// and tests change it afterwards.
    pub fn set_syn_flood_kps(&mut self, kps: u16) -> Result<()> {
        self.set_config(Config { syn_flood_kps: kps, ..self.config })
    }

    /// The interfaces frames may be redirected to (`EGRESS`, `EGRESS_MAC`): the
    /// client interface at `EGRESS_CLIENT` and, two-arm, the backend interface at
    /// `EGRESS_BACKEND`, each as (ifindex, MAC).
    pub fn set_egress(&mut self, client: (u32, Mac), backend: Option<(u32, Mac)>) -> Result<()> {
        use lb_common::{EgressMac, EGRESS_BACKEND, EGRESS_CLIENT};
        let entries = [(EGRESS_CLIENT, Some(client)), (EGRESS_BACKEND, backend)];
        let mut devs: aya::maps::DevMap<_> =
            aya::maps::DevMap::try_from(map_mut(&mut self.ebpf, names::EGRESS)?).map_err(map_err(names::EGRESS))?;
        for (index, entry) in entries {
            if let Some((ifindex, _)) = entry {
                devs.set(u32::from(index), ifindex, None, 0).map_err(|e| DataplaneError::Egress { index, error: e.to_string() })?;
            }
        }
        let mut macs: Array<_, EgressMac> =
            Array::try_from(map_mut(&mut self.ebpf, names::EGRESS_MAC)?).map_err(map_err(names::EGRESS_MAC))?;
        for (index, entry) in entries {
            let mac = entry.map(|(_, mac)| mac).unwrap_or_default();
            macs.set(u32::from(index), EgressMac { mac, _pad: [0; 2] }, 0).map_err(map_err(names::EGRESS_MAC))?;
        }
        Ok(())
    }

    /// The tunnel modes' outer source addresses and the MTU encapsulated packets
    /// must fit (written with the next `write`, or at once when already written).
    pub fn set_tunnel(&mut self, source_v4: [u8; 4], source_v6: [u8; 16], mtu: u32) -> Result<()> {
        let cfg = Config { tunnel_source_v4: source_v4, tunnel_source_v6: source_v6, mtu, ..self.config };
        self.set_config(cfg)
    }

    /// Moves the maps from the last applied plan to `plan` (see `apply`).
    pub fn apply(&mut self, plan: &Plan) -> Result<Summary> {
        self.load_on_demand(plan)?;
        let summary = apply::apply(self, plan)?;
        let (flags, frag_timeout_s) = icmp_policy(self.config.flags, plan);
        let syn_flood_kps = plan.syn_flood_kps;
        let cfg = self.config;
        if flags != cfg.flags || frag_timeout_s != cfg.frag_timeout_s || syn_flood_kps != cfg.syn_flood_kps {
            self.set_config(Config { flags, frag_timeout_s, syn_flood_kps, ..cfg })?;
        }
        Ok(summary)
    }

    /// The plan the maps hold now (after `open` adopted them, or after an apply).
    pub fn applied(&self) -> Option<&Plan> {
        self.applied.as_ref()
    }

    /// Whether `plan` fits the maps as they were created.
    pub fn check_fits(&self, plan: &Plan) -> Result<()> {
        apply::check_fits(self, plan)
    }

    fn set_config(&mut self, cfg: Config) -> Result<()> {
        let mut m: Array<_, Config> =
            Array::try_from(map_mut(&mut self.ebpf, names::CONFIG)?).map_err(map_err(names::CONFIG))?;
        m.set(0, cfg, 0).map_err(map_err(names::CONFIG))?;
        self.config = cfg;
        Ok(())
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

    /// Entries of `CONNTRACK` and `CT_ESTABLISHED` as the maps were created (the
    /// latter 0 when `plan` turns protection off).
    pub fn conntrack_capacity(&mut self, plan: &Plan) -> Result<(u32, u32)> {
        let mut size = |name| -> Result<u32> { Ok(map_data(&mut self.ebpf, name)?.info().map_err(map_err(name))?.max_entries()) };
        let lru = size(names::CONNTRACK)?;
        let est = if plan.established_size > 0 { size(names::CT_ESTABLISHED)? } else { 0 };
        Ok((lru, est))
    }

    /// A handle of its own on map `name` (for a task that reads or sweeps it).
    pub fn map_handle(&mut self, name: &'static str) -> Result<MapData> {
        map_data(&mut self.ebpf, name)
    }

    /// Current counters, summed over CPUs.
    pub fn stats(&mut self) -> Result<Stats> {
        Stats::read_loaded(&mut self.ebpf, None, &[])
    }

    /// The counters of service ids below `services` and backend ids below
    /// `backends` (the ids a plan has handed out), the rest left out; `conn_bases`:
    /// what `BACKEND_CONNS` holds by backend id, if known (`conntrack::Bases`).
    pub fn stats_of(&mut self, services: u32, backends: u32, conn_bases: &[lb_common::BackendConns]) -> Result<Stats> {
        Stats::read_loaded(&mut self.ebpf, Some((services, backends)), conn_bases)
    }

    /// Handles of the counter maps, to read them away from the `Dataplane`.
    pub fn stats_maps(&mut self) -> Result<StatsMaps> {
        StatsMaps::of(&mut self.ebpf)
    }
}

/// What `SERVICES`, `BACKENDS` (every id ever handed out: generation above 0) and
/// `VIP_ADDRS` hold.
struct State {
    services: Vec<(VipKey, Service)>,
    backends: Vec<(u32, Backend)>,
    vip_addrs: BTreeMap<[u8; 16], u32>,
}

fn read_state(services: &Map, backends: &Map, vip_addrs: &Map, prefix: Option<&Map>) -> Result<State> {
    let m: HashMap<_, VipKey, Service> = HashMap::try_from(services).map_err(map_err(names::SERVICES))?;
    let mut services: Vec<(VipKey, Service)> =
        m.iter().collect::<std::result::Result<_, _>>().map_err(map_err(names::SERVICES))?;
    // Prefix services, keyed as the plan keys them (`_pad`: the prefix length).
    if let Some(prefix) = prefix {
        let err = map_err(names::PREFIX_SERVICES);
        let m: aya::maps::LpmTrie<_, lb_common::PrefixKey, Service> = aya::maps::LpmTrie::try_from(prefix).map_err(&err)?;
        for entry in m.iter() {
            let (key, value) = entry.map_err(&err)?;
            let (len, data) = (key.prefix_len() - lb_common::prefix::PREFIX_KEY_EXACT_BITS, key.data());
            let port = u16::from_be_bytes(data.port);
            services.push((VipKey { addr: data.addr, port, proto: data.proto, _pad: len as u8 }, value));
        }
    }
    let m: HashMap<_, VipAddrKey, VipAddrVal> = HashMap::try_from(vip_addrs).map_err(map_err(names::VIP_ADDRS))?;
    let all: Vec<(VipAddrKey, VipAddrVal)> =
        m.iter().collect::<std::result::Result<_, _>>().map_err(map_err(names::VIP_ADDRS))?;
    let vip_addrs = all.into_iter().map(|(k, v)| (k.addr, v.flags)).collect();
    let m: Array<_, Backend> = Array::try_from(backends).map_err(map_err(names::BACKENDS))?;
    let mut out = Vec::new();
    for (id, b) in m.iter().enumerate() {
        let b = b.map_err(map_err(names::BACKENDS))?;
        if b.generation > 0 {
            out.push((id as u32, b));
        }
    }
    Ok(State { services, backends: out, vip_addrs })
}

/// What a running agent applied, read back from the maps it pinned under `dir` as a
/// restarting agent adopts them (`plan::from_maps`): every service with its id, every
/// backend with its id, address, service and flags. The maps hold no names, weights or
/// conntrack size, and the Maglev tables are not read: names are empty, weights and
/// the conntrack size 0, tables empty.
pub fn read_pinned_plan(dir: &Path) -> Result<Plan> {
    let open = |name: &'static str| MapData::from_pin(dir.join(name)).map_err(map_err(name));
    let State { services, backends, vip_addrs } = read_state(
        &Map::HashMap(open(names::SERVICES)?),
        &Map::Array(open(names::BACKENDS)?),
        &Map::HashMap(open(names::VIP_ADDRS)?),
        open(names::PREFIX_SERVICES).ok().map(Map::LpmTrie).as_ref(),
    )?;
    let services: Vec<_> = services.into_iter().map(|(key, value)| (key, value, Vec::new())).collect();
    Ok(crate::plan::from_maps(&services, &backends, vip_addrs, &Plan::default()))
}
