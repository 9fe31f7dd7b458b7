//! What the agent keeps on bpffs so the balancer outlives it: every map, the
//! program and the XDP link, pinned under one directory (default /sys/fs/bpf/lb).
//!
//! A new agent that finds the link pinned adopts that state: it reuses the maps
//! (so the connection table and the counters carry on) when their layout is the
//! one this build expects and they are large enough for the configuration,
//! rebuilds its ids and table placement from them, and swaps its own program in
//! through the link (one atomic `bpf_link_update`). Otherwise it starts with fresh
//! maps, still swapping the program in atomically, and says why.

use std::{
    mem::size_of,
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapInfo};
use lb_common::{
    map_names as names, AffinityKey, EgressMac, AffinityVal, Backend, BackendConns, Config, Counters, FlowKey, FlowVal, FragKey, FragVal,
    LocalityKey, LocalityVal, NatReverse, PrefixKey, Service, TraceBudget, TraceFilter, VipAddrKey, VipAddrVal, VipKey,
};

/// BPF_F_MMAPABLE.
const MMAPABLE: u32 = 1 << 10;

/// Maps that hold no flow state, written at every start or counting afresh:
/// one that does not fit this build is created anew while the others are
/// adopted (the global counters then restart from 0, as after a fresh start).
const REPLACEABLE: &[&str] =
    &[names::CT_CLOCK, names::TRACE_FILTER, names::TRACE_BUDGET, names::STATS, names::CONFIG, names::EGRESS_MAC];

/// Maps that hold only half-open handshakes (`FIRST_RECORD`): one whose layout
/// is not this build's (an older version's 64-byte records), or whose size is
/// not the one this build gives the configuration (an older version's 4 MB at
/// the default `conntrack_size`, see `lb_common::FIRST_RECORD_MAX_ENTRIES`), is
/// created anew.
/// The handshakes in flight lose their records: each one's ACK is then a
/// midflow miss, scheduled again by the same function (to the same backend
/// while the table is unchanged).
const HALF_OPEN: &[&str] = &[names::FIRST_RECORD];

/// Maps the agent derives from the configuration and writes in full before it
/// swaps the program (`MAGLEV`): one whose layout is not this build's (an
/// older version's 4-byte slots) is created anew and every table placed again.
/// Until the swap the older program still runs with its own `MAGLEV` and the
/// shared `SERVICES`: a new flow that reads a service entry the fill already
/// rewrote reads its old table at the new offset, and lands on a backend of
/// that service or is dropped (`drop_no_backend`, a backend of another one).
const DERIVED: &[&str] = &[names::MAGLEV];

/// Entries of `NAT_REVERSE`, `FULLNAT_REVERSE` and `FULLNAT_FORWARD` as created for
/// a configuration without `nat` or `fullnat` services (`dataplane::Sizes::nat`).
/// Such a map never held a flow: an adopting agent that needs it sized creates
/// it afresh.
pub const NAT_UNSIZED: u32 = 1;

const NAT_MAPS: [&str; 3] = [names::NAT_REVERSE, names::FULLNAT_REVERSE, names::FULLNAT_FORWARD];

/// Maps added after the first version that pinned its maps: pins made by an
/// older version lack them, and they start empty (that version had no such
/// state to keep).
const ADDED: &[&str] = &[
    names::PREFIX_SERVICES,
    names::LOCALITY,
    names::NAT_REVERSE,
    names::EGRESS_MAC,
    names::FULLNAT_REVERSE,
    names::FULLNAT_FORWARD,
    names::SNAT_POOLS,
    names::FIRST_RECORD,
];

/// The pin directory and the paths in it.
#[derive(Debug, Clone)]
pub struct PinDir {
    pub dir: PathBuf,
}

/// Every map of the object: name, key size, value size, required flags.
pub fn layout() -> [(&'static str, usize, usize, u32); 27] {
    [
        (names::VIP_FILTER, 4, 8, 0),
        (names::VIP_ADDRS, size_of::<VipAddrKey>(), size_of::<VipAddrVal>(), 0),
        (names::SERVICES, size_of::<VipKey>(), size_of::<Service>(), 0),
        (names::PREFIX_SERVICES, 4 + size_of::<PrefixKey>(), size_of::<Service>(), 0),
        (names::LOCALITY, size_of::<LocalityKey>(), size_of::<LocalityVal>(), 0),
        (names::MAGLEV, 4, 8, MMAPABLE),
        (names::BACKENDS, 4, size_of::<Backend>(), 0),
        (names::CONNTRACK, size_of::<FlowKey>(), size_of::<FlowVal>(), 0),
        (names::CT_ESTABLISHED, size_of::<FlowKey>(), size_of::<FlowVal>(), 0),
        (names::FIRST_RECORD, 4, size_of::<lb_common::FirstRecord>(), MMAPABLE),
        (names::CT_CLOCK, 4, 4, 0),
        (names::TRACE_FILTER, 4, size_of::<TraceFilter>(), 0),
        (names::TRACE_BUDGET, 4, size_of::<TraceBudget>(), 0),
        (names::AFFINITY, size_of::<AffinityKey>(), size_of::<AffinityVal>(), 0),
        (names::SERVICE_STATS, 4, size_of::<Counters>(), 0),
        (names::BACKEND_STATS, 4, size_of::<Counters>(), 0),
        (names::BACKEND_CONNS, 4, size_of::<BackendConns>(), 0),
        (names::BACKEND_CONN_DELTA, 4, size_of::<BackendConns>(), 0),
        (names::ROTATION, 4, 8, 0),
        (names::STATS, 4, 8, 0),
        (names::CONFIG, 4, size_of::<Config>(), 0),
        (names::FRAGS, size_of::<FragKey>(), size_of::<FragVal>(), 0),
        (names::NAT_REVERSE, size_of::<FlowKey>(), size_of::<NatReverse>(), 0),
        (names::EGRESS_MAC, 4, size_of::<EgressMac>(), 0),
        (names::FULLNAT_REVERSE, size_of::<FlowKey>(), size_of::<NatReverse>(), 0),
        (names::FULLNAT_FORWARD, size_of::<FlowKey>(), size_of::<lb_common::SnatFwd>(), 0),
        (names::SNAT_POOLS, 4, size_of::<lb_common::SnatPool>(), 0),
    ]
}

impl PinDir {
    pub fn new(dir: &Path) -> Self {
        PinDir { dir: dir.to_path_buf() }
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The pinned XDP link: present while a balancer is attached from here.
    pub fn link(&self) -> PathBuf {
        self.dir.join("link")
    }

    /// The pinned XDP link on the backend interface (two-arm).
    pub fn backend_link(&self) -> PathBuf {
        self.dir.join("link_backend")
    }

    pub fn program(&self) -> PathBuf {
        self.dir.join(lb_common::PROG_BALANCER)
    }

    pub fn has_link(&self) -> bool {
        self.link().exists()
    }

    fn info(&self, name: &str) -> Option<MapInfo> {
        MapData::from_pin(self.map(name)).ok()?.info().ok()
    }

    /// Whether the pinned maps can be reused for maps of at least `needed`
    /// entries: `Err` says why not. `Ok` lists the pinned maps to create afresh
    /// (removed here): maps that hold no flow state and do not fit this build
    /// (see [`REPLACEABLE`]). A map this build has and the pins lack (one an older
    /// version did not have, see [`ADDED`]) is created empty by the load.
    pub fn reusable(&self, needed: &[(&'static str, u32)]) -> Result<Vec<&'static str>, String> {
        let mut replace = Vec::new();
        for (name, key, value, flags) in layout() {
            let Some(info) = self.info(name) else {
                if ADDED.contains(&name) || REPLACEABLE.contains(&name) {
                    continue;
                }
                return Err(format!("map {name} is not pinned"));
            };
            let mut unfit = None;
            let mut replaceable = REPLACEABLE.contains(&name);
            if info.key_size() as usize != key || info.value_size() as usize != value {
                replaceable |= HALF_OPEN.contains(&name) || DERIVED.contains(&name);
                unfit = Some(format!(
                    "map {name} has the layout of another version (key {} / value {} bytes, this build: {key} / {value})",
                    info.key_size(),
                    info.value_size()
                ));
            } else if info.map_flags() & flags != flags {
                unfit = Some(format!("map {name} was created with other flags"));
            } else if name == names::STATS && info.max_entries() < lb_common::stat::COUNT {
                unfit = Some(format!("map {name} holds {} counters, this build {}", info.max_entries(), lb_common::stat::COUNT));
            } else if let Some((_, need)) = needed.iter().find(|(n, _)| *n == name) {
                if info.max_entries() != *need && HALF_OPEN.contains(&name) {
                    unfit = Some(format!("map {name} holds {} entries, this configuration {need}", info.max_entries()));
                    replaceable = true;
                } else if info.max_entries() < *need && NAT_MAPS.contains(&name) && info.max_entries() <= NAT_UNSIZED {
                    unfit = Some(format!("map {name} was created unsized (no nat or fullnat service)"));
                    replaceable = true;
                } else if info.max_entries() < *need {
                    return Err(format!(
                        "map {name} holds {} entries, the configuration needs {need}",
                        info.max_entries()
                    ));
                }
            }
            match unfit {
                Some(why) if replaceable => replace.push((name, why)),
                Some(why) => return Err(why),
                None => {}
            }
        }
        for (name, why) in &replace {
            tracing::info!(map = name, why = why.as_str(), "the pinned map does not fit this build or configuration and holds no flow state: creating it afresh");
            remove_if_present(&self.map(name)).map_err(|e| format!("removing the pinned map {name}: {e}"))?;
        }
        Ok(replace.into_iter().map(|(name, _)| name).collect())
    }

    /// Drops a pinned `RARE_PROGS` that is not the program array this build
    /// expects (another size), so that loading creates a fresh one. A program
    /// array takes part in neither `layout()` nor `reusable`: it holds programs,
    /// not state, and the agent fills it at every load.
    pub fn drop_unfit_prog_array(&self) -> std::io::Result<()> {
        use aya::maps::MapType;
        self.drop_unfit(names::RARE_PROGS, MapType::ProgramArray, 4, lb_common::RARE_PROGS_ENTRIES, "program array")?;
        // The devmap of two-arm forwarding: pinned apart from `layout()` too (the
        // kernel takes no BTF for a devmap), and written at every start.
        self.drop_unfit(names::EGRESS, MapType::DevMap, 8, lb_common::EGRESS_ENTRIES, "devmap")
    }

    /// Removes the pinned map `name` unless it is a `kind` of 4-byte keys,
    /// `value`-byte values and `entries` entries.
    fn drop_unfit(&self, name: &str, kind: aya::maps::MapType, value: u32, entries: u32, what: &str) -> std::io::Result<()> {
        let path = self.map(name);
        let fits = match MapData::from_pin(&path).ok().and_then(|m| m.info().ok()) {
            None => return Ok(()),
            Some(info) => {
                info.map_type().is_ok_and(|t| t == kind)
                    && info.key_size() == 4
                    && info.value_size() == value
                    && info.max_entries() == entries
            }
        };
        if fits {
            return Ok(());
        }
        tracing::info!(path = %path.display(), "the pinned {what} is another version's: replacing it");
        remove_if_present(&path)
    }

    /// Removes pinned maps (before creating fresh ones) and the program pin.
    pub fn clear_maps(&self) -> std::io::Result<()> {
        remove_if_present(&self.map(names::RARE_PROGS))?;
        remove_if_present(&self.map(names::EGRESS))?;
        for (name, ..) in layout() {
            match std::fs::remove_file(self.map(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        match std::fs::remove_file(self.program()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes everything this directory holds for the balancer, then the
    /// directory if it is empty.
    pub fn remove_all(&self) -> std::io::Result<()> {
        let _ = std::fs::remove_file(self.link());
        let _ = std::fs::remove_file(self.backend_link());
        self.clear_maps()?;
        let _ = std::fs::remove_dir(&self.dir);
        Ok(())
    }
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Makes sure the pin directory's parent is on a bpffs, mounting one at
/// /sys/fs/bpf when none is mounted there (as systemd would).
pub fn ensure_bpffs(dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
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
