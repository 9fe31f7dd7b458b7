//! The counters (`STATS`, `SERVICE_STATS`, `BACKEND_STATS`) and connection
//! counts (`BACKEND_CONNS` + `BACKEND_CONN_DELTA`), summed over CPUs.

use std::{os::fd::AsFd, path::Path};

use aya::{
    maps::{Array, Map, MapData, PerCpuArray, PerCpuValues},
    Ebpf,
};
use lb_common::{map_names as names, stat, BackendConns, Counters};

use super::{dup_map, map_data, map_err, DataplaneError, Result};

/// Counters summed over CPUs.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Indexed by `lb_common::stat`.
    pub global: Vec<u64>,
    /// Indexed by service id.
    pub services: Vec<Counters>,
    /// Indexed by backend id.
    pub backends: Vec<Counters>,
    /// Indexed by backend id: (active, inactive) connections.
    pub conns: Vec<(u32, u32)>,
}

/// Per backend id below `limit` (all when `None`): (active, inactive), the base
/// (`BACKEND_CONNS`, or `bases` when they cover every id: the sweep keeps what it
/// wrote there) plus `BACKEND_CONN_DELTA`, each map read in batches.
fn read_conns(base: MapData, delta: MapData, limit: Option<u32>, bases: &[BackendConns]) -> Result<Vec<(u32, u32)>> {
    let d = read_array::<BackendConns>(delta, names::BACKEND_CONN_DELTA, limit)?;
    let read;
    let b = if bases.len() >= d.len() {
        bases
    } else {
        read = read_array::<BackendConns>(base, names::BACKEND_CONNS, limit)?;
        &read[..]
    };
    Ok(b.iter().zip(&d).map(|(b, d)| BackendConns::count(b, d)).collect())
}

/// Elements `0..limit` of a plain array: in batches where the kernel allows, else
/// element by element (an element that cannot be read reads as the default).
fn read_array<V: aya::Pod + Default>(data: MapData, name: &'static str, limit: Option<u32>) -> Result<Vec<V>> {
    let len = data.info().map_err(map_err(name))?.max_entries().min(limit.unwrap_or(u32::MAX));
    if let Ok(all) = crate::batch::read_array::<V>(data.fd().as_fd(), len) {
        return Ok(all);
    }
    let m: Array<_, V> = Array::try_from(Map::Array(data)).map_err(map_err(name))?;
    Ok(m.iter().take(len as usize).map(|v| v.unwrap_or_default()).collect())
}

fn sum_counters(v: &PerCpuValues<Counters>) -> Counters {
    v.iter().fold(Counters::default(), |a, c| Counters {
        packets: a.packets + c.packets,
        bytes: a.bytes + c.bytes,
        new_flows: a.new_flows + c.new_flows,
    })
}

/// Every element of a per-CPU array of counters, summed over the CPUs: in batches
/// where the kernel allows, else element by element.
fn read_counters(data: MapData, name: &'static str, limit: Option<u32>) -> Result<Vec<Counters>> {
    let len = data.info().map_err(map_err(name))?.max_entries().min(limit.unwrap_or(u32::MAX));
    let ncpu = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::PinDir { path: "possible cpus".into(), source: e })?;
    if let Ok(all) = crate::batch::sum_counters(data.fd().as_fd(), len, ncpu) {
        return Ok(all);
    }
    let m: PerCpuArray<_, Counters> = PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(name))?;
    m.iter().take(len as usize).map(|v| v.map(|v| sum_counters(&v)).map_err(map_err(name))).collect()
}

/// The maps `StatsMaps` holds, in its order.
const MAPS: [&str; 5] =
    [names::STATS, names::SERVICE_STATS, names::BACKEND_STATS, names::BACKEND_CONNS, names::BACKEND_CONN_DELTA];

/// Handles of the counter maps of a loaded object, for reading them away from
/// the `Dataplane` (the agent's status refresh reads them on a thread of its
/// own: at 10,000 services the read takes milliseconds the event loop would
/// otherwise wait for).
pub struct StatsMaps {
    maps: [MapData; 5],
}

impl StatsMaps {
    pub(super) fn of(e: &mut Ebpf) -> Result<StatsMaps> {
        let mut get = |i: usize| map_data(e, MAPS[i]);
        Ok(StatsMaps { maps: [get(0)?, get(1)?, get(2)?, get(3)?, get(4)?] })
    }

    /// As `Dataplane::stats_of`.
    pub fn read(&self, services: u32, backends: u32, bases: &[BackendConns]) -> Result<Stats> {
        let dup = |i: usize| dup_map(&self.maps[i], MAPS[i]);
        let maps = StatsMaps { maps: [dup(0)?, dup(1)?, dup(2)?, dup(3)?, dup(4)?] };
        maps.read_once(Some((services, backends)), bases)
    }

    /// Reads the counters through these handles, which the reading uses up;
    /// `limit` and `bases` as `Stats::read_loaded`.
    ///
    /// The two large reads, the backends' counters and their connection counts
    /// (80,000 elements each at 10,000 services x 8, some 25 ms each, most of
    /// it the kernel's copy per element), run side by side on two threads.
    fn read_once(self, limit: Option<(u32, u32)>, bases: &[BackendConns]) -> Result<Stats> {
        let [global, services, backends, base, delta] = self.maps;
        std::thread::scope(|s| {
            let conns = s.spawn(|| read_conns(base, delta, limit.map(|l| l.1), bases));
            let stats = Stats::read(global, services, backends, limit);
            let conns = conns.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            Ok(Stats { conns: conns?, ..stats? })
        })
    }
}

impl Stats {
    /// From the maps of a loaded object; `limit`: (services, backends) ids to read;
    /// `bases`: what `BACKEND_CONNS` holds, if known (else it is read).
    pub(super) fn read_loaded(e: &mut Ebpf, limit: Option<(u32, u32)>, bases: &[BackendConns]) -> Result<Stats> {
        StatsMaps::of(e)?.read_once(limit, bases)
    }

    fn read(global: MapData, services: MapData, backends: MapData, limit: Option<(u32, u32)>) -> Result<Stats> {
        let g: PerCpuArray<_, u64> =
            PerCpuArray::try_from(Map::PerCpuArray(global)).map_err(map_err(names::STATS))?;
        let mut out = Stats::default();
        for i in 0..stat::COUNT {
            let v = g.get(&i, 0).map_err(map_err(names::STATS))?;
            out.global.push(v.iter().sum());
        }
        out.services = read_counters(services, names::SERVICE_STATS, limit.map(|l| l.0))?;
        out.backends = read_counters(backends, names::BACKEND_STATS, limit.map(|l| l.1))?;
        Ok(out)
    }

    /// Reads the counters from maps pinned by a running agent under `dir`.
    pub fn read_pinned(dir: &Path) -> Result<Stats> {
        let open = |name: &'static str| MapData::from_pin(dir.join(name)).map_err(map_err(name));
        let mut stats = Self::read(open(names::STATS)?, open(names::SERVICE_STATS)?, open(names::BACKEND_STATS)?, None)?;
        // Absent in pins of an older agent.
        if let (Ok(b), Ok(d)) = (open(names::BACKEND_CONNS), open(names::BACKEND_CONN_DELTA)) {
            stats.conns = read_conns(b, d, None, &[])?;
        }
        Ok(stats)
    }

    pub fn get(&self, stat: u32) -> u64 {
        self.global.get(stat as usize).copied().unwrap_or(0)
    }
}
