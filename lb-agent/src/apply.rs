//! Bringing the maps from the last applied plan to a new one without disturbing
//! traffic.
//!
//! Each service owns a region of `MAGLEV` twice its table's size in words
//! (`maglev_map::words`). A changed table is written into the half the kernel
//! is not reading, then the service entry (one
//! hash-map update, atomic for readers) is switched to it: a packet sees the old
//! table or the new one, never a mix. Order of writes: backends that appear or
//! change, tables, services, VIP addresses; only then backends that went away are
//! deactivated and services that went away removed. Regions freed by one apply are
//! reused only from the next one on, after every reader of the old entry is gone.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{Array, HashMap, LpmTrie, PerCpuArray, PerCpuValues};

use lb_common::{map_names as names, Backend, Counters, PrefixKey, Service, VipAddrKey, VipAddrVal, VipKey};

use crate::{
    dataplane::{map_err, map_mut, Dataplane, DataplaneError},
    fullnat_table,
    plan::Plan,
};
pub use crate::maglev_map::MaglevMap;

/// Sizes the maps were created with.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub services: u32,
    pub backends: u32,
    /// `MAGLEV` words (two to an element).
    pub maglev: u32,
    /// The NAT tables were sized (the configuration at start had `nat` or
    /// `fullnat` services, or the adopted maps were sized).
    pub nat: bool,
}

/// First-fit allocator of `MAGLEV` regions.
#[derive(Debug, Clone)]
pub struct Regions {
    free: Vec<(u32, u32)>,
    pending: Vec<(u32, u32)>,
}

impl Regions {
    pub fn new(capacity: u32) -> Self {
        Regions { free: vec![(0, capacity)], pending: Vec::new() }
    }

    /// An allocator for `capacity` words of which `used` (offset, len) are taken.
    pub fn with_used(capacity: u32, used: &[(u32, u32)]) -> Self {
        let mut used = used.to_vec();
        used.sort_unstable();
        let mut free = Vec::new();
        let mut at = 0;
        for (off, len) in used {
            if off > at {
                free.push((at, off - at));
            }
            at = at.max(off + len);
        }
        if at < capacity {
            free.push((at, capacity - at));
        }
        Regions { free, pending: Vec::new() }
    }

    fn alloc(&mut self, len: u32) -> Option<u32> {
        let i = self.free.iter().position(|&(_, l)| l >= len)?;
        let (off, l) = self.free[i];
        if l == len {
            self.free.remove(i);
        } else {
            self.free[i] = (off + len, l - len);
        }
        Some(off)
    }

    fn release_later(&mut self, off: u32, len: u32) {
        if len > 0 {
            self.pending.push((off, len));
        }
    }

    fn settle(&mut self) {
        self.free.append(&mut self.pending);
        self.free.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(self.free.len());
        for (off, len) in self.free.drain(..) {
            match merged.last_mut() {
                Some((o, l)) if *o + *l == off => *l += len,
                _ => merged.push((off, len)),
            }
        }
        self.free = merged;
    }

    fn largest(&self) -> u32 {
        self.free.iter().map(|&(_, l)| l).max().unwrap_or(0)
    }
}

/// Where a service's table lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub region: u32,
    /// Words of one half (`maglev_map::words`); the region holds two.
    pub size: u32,
    /// Which half the service entry points at.
    pub half: u32,
}

impl Placement {
    fn offset(&self) -> u32 {
        self.region + self.half * self.size
    }
}

/// What an apply changed, for the log line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub services_added: usize,
    pub services_removed: usize,
    pub services_changed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    pub backends_changed: usize,
    pub tables_swapped: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts = [
            (self.services_added, "+", "service"),
            (self.services_removed, "-", "service"),
            (self.services_changed, "~", "service"),
            (self.backends_added, "+", "backend"),
            (self.backends_removed, "-", "backend"),
            (self.backends_changed, "~", "backend"),
            (self.tables_swapped, "", "table swapped"),
        ];
        let words: Vec<String> = parts
            .iter()
            .filter(|(n, _, _)| *n > 0)
            .map(|(n, sign, what)| {
                let plural = if *n == 1 || what.ends_with("swapped") { "" } else { "s" };
                let what = if what.ends_with("swapped") && *n > 1 { "tables swapped" } else { what };
                format!("{sign}{n} {what}{plural}")
            })
            .collect();
        if words.is_empty() { f.write_str("no change") } else { f.write_str(&words.join(", ")) }
    }
}

/// Checks that `plan` fits the maps as they were created.
pub fn check_fits(dp: &Dataplane, plan: &Plan) -> Result<(), DataplaneError> {
    let cap = dp.capacity;
    if (plan.nat || plan.fullnat) && !cap.nat {
        return Err(DataplaneError::Capacity {
            what: "the first nat or fullnat service needs the NAT tables (NAT_REVERSE, FULLNAT_REVERSE, \
                   FULLNAT_FORWARD), created with one entry each as the configuration at start had none"
                .into(),
        });
    }
    let need_services = plan.service_ids.high_water();
    let need_backends = plan.backend_ids.high_water();
    if need_services > cap.services || need_backends > cap.backends {
        return Err(DataplaneError::Capacity {
            what: format!(
                "{need_services} service ids and {need_backends} backend ids needed, the maps hold {} and {}",
                cap.services, cap.backends
            ),
        });
    }
    let mut regions = dp.regions.clone();
    regions.settle();
    for s in &plan.services {
        let size = crate::maglev_map::words(&s.table, s.table_ids);
        let fits_in_place = dp.placed.get(&s.key).is_some_and(|p| p.size == size);
        if size > 0 && !fits_in_place && regions.alloc(2 * size).is_none() {
            return Err(DataplaneError::Capacity {
                what: format!(
                    "MAGLEV has no free region of {} words for service {} (largest free: {})",
                    2 * size,
                    s.name,
                    regions.largest()
                ),
            });
        }
    }
    Ok(())
}

fn zero_counters(dp: &mut Dataplane, name: &'static str, id: u32) -> Result<(), DataplaneError> {
    let ncpu = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::PinDir { path: "possible cpus".into(), source: e })?;
    let mut m: PerCpuArray<_, Counters> =
        PerCpuArray::try_from(map_mut(dp.ebpf_mut(), name)?).map_err(map_err(name))?;
    let zeros = PerCpuValues::try_from(vec![Counters::default(); ncpu])
        .map_err(|source| DataplaneError::PinDir { path: "per-CPU values".into(), source })?;
    m.set(id, zeros, 0).map_err(map_err(name))
}

/// Sets `VIP_FILTER` to exactly the bits of `addrs` and of the SNAT addresses
/// `snat` (`lb_common::snat_filter_bit`).
fn write_filter<'a>(
    dp: &mut Dataplane,
    addrs: impl Iterator<Item = &'a [u8; 16]>,
    snat: impl Iterator<Item = &'a [u8; 16]>,
) -> Result<(), DataplaneError> {
    let mut words = [0u64; lb_common::VIP_FILTER_WORDS as usize];
    for bit in addrs.map(lb_common::vip_filter_bit).chain(snat.map(lb_common::snat_filter_bit)) {
        words[(bit >> 6) as usize] |= 1 << (bit & 63);
    }
    let mut m: Array<_, u64> =
        Array::try_from(map_mut(dp.ebpf_mut(), names::VIP_FILTER)?).map_err(map_err(names::VIP_FILTER))?;
    for (i, w) in words.iter().enumerate() {
        m.set(i as u32, w, 0).map_err(map_err(names::VIP_FILTER))?;
    }
    Ok(())
}

/// The SNAT addresses of `plan`'s pools (16-byte form).
fn snat_addrs(plan: &Plan) -> BTreeSet<[u8; 16]> {
    let mut out = BTreeSet::new();
    for p in plan.snat_pools.values() {
        out.extend(p.v4[..usize::from(p.n_v4).min(p.v4.len())].iter().map(|a| lb_common::v4_mapped(*a)));
        out.extend(p.v6[..usize::from(p.n_v6).min(p.v6.len())].iter().copied());
    }
    out
}

/// Applies `plan`; see the module documentation for the order of writes.
/// The `PREFIX_SERVICES` key of a prefix service's plan key (`_pad`: its
/// prefix length in the 16-byte form).
fn prefix_key(key: &VipKey) -> aya::maps::lpm_trie::Key<PrefixKey> {
    let len = lb_common::prefix::prefix_bits(u32::from(key._pad));
    aya::maps::lpm_trie::Key::new(len, PrefixKey::new(key.proto, key.port, key.addr))
}

pub fn apply(dp: &mut Dataplane, plan: &Plan) -> Result<Summary, DataplaneError> {
    check_fits(dp, plan)?;
    dp.regions.settle();
    let prev = dp.applied.take().unwrap_or_default();
    // Counters of new ids are cleared (an id may have served before), except in
    // maps just created.
    let clear = !std::mem::take(&mut dp.fresh);
    let mut sum = Summary::default();
    // By id (ids are small and dense): the map value and weight of each backend.
    let mut prev_backends: Vec<Option<(Backend, u32)>> = Vec::new();
    for b in &prev.backends {
        if prev_backends.len() <= b.id as usize {
            prev_backends.resize(b.id as usize + 1, None);
        }
        prev_backends[b.id as usize] = Some((b.map_value(prev.services[b.service].value.id), b.weight));
    }

    // 1. Backends that are new or changed.
    let mut new_backends = Vec::new();
    {
        let mut m: Array<_, Backend> =
            Array::try_from(map_mut(dp.ebpf_mut(), names::BACKENDS)?).map_err(map_err(names::BACKENDS))?;
        for b in &plan.backends {
            let v = b.map_value(plan.services[b.service].value.id);
            match prev_backends.get(b.id as usize).copied().flatten().as_ref() {
                Some((old, _)) if old.generation != v.generation => {
                    sum.backends_added += 1;
                    new_backends.push(b.id);
                }
                None => {
                    sum.backends_added += 1;
                    new_backends.push(b.id);
                }
                Some((old, w)) if *old != v || *w != b.weight => sum.backends_changed += 1,
                Some(_) => continue,
            }
            m.set(b.id, v, 0).map_err(map_err(names::BACKENDS))?;
        }
    }
    for id in new_backends.into_iter().filter(|_| clear) {
        zero_counters(dp, names::BACKEND_STATS, id)?;
    }

    // 1b. SNAT pools of `fullnat` services, before their entries (a pool that did
    // not change is not written: that would reset its cursor); their addresses'
    // filter bits first (replies to them are looked up: `snat_filter_bit`).
    let (prev_snat, plan_snat) = (snat_addrs(&prev), snat_addrs(plan));
    if prev_snat != plan_snat {
        write_filter(dp, prev.vip_addrs.keys().chain(plan.vip_addrs.keys()), prev_snat.iter().chain(&plan_snat))?;
    }
    fullnat_table::write_pools(dp, &prev, plan)?;

    // 2. Tables into the idle half (or a new region), 3. then the service entries.
    let prev_services: BTreeMap<VipKey, &crate::plan::PlannedService> =
        prev.services.iter().map(|s| (s.key, s)).collect();
    let mut entries: Vec<(VipKey, Service)> = Vec::new();
    let mut new_services = Vec::new();
    for s in &plan.services {
        let size = crate::maglev_map::words(&s.table, s.table_ids);
        let old = prev_services.get(&s.key);
        let placed = dp.placed.get(&s.key).copied();
        let same_table = old.is_some_and(|o| std::sync::Arc::ptr_eq(&o.table, &s.table) || o.table == s.table);
        let placement = match placed {
            Some(p) if p.size == size && same_table => p,
            Some(p) if p.size == size => Placement { half: 1 - p.half, ..p },
            other => {
                if let Some(p) = other {
                    dp.regions.release_later(p.region, 2 * p.size);
                }
                let region = if size == 0 { 0 } else { dp.regions.alloc(2 * size).expect("checked by check_fits") };
                Placement { region, size, half: 0 }
            }
        };
        if Some(placement) != placed || !same_table {
            if size > 0 {
                dp.maglev.write(placement.offset() as usize, &s.table);
            }
            if old.is_some() {
                sum.tables_swapped += 1;
            }
        }
        dp.placed.insert(s.key, placement);
        let value = Service { table_offset: placement.offset(), region: placement.region, ..s.value };
        let placed_value = |o: &crate::plan::PlannedService, p: Placement| Service {
            table_offset: p.offset(),
            region: p.region,
            ..o.value
        };
        let unchanged = old.zip(placed).is_some_and(|(o, p)| placed_value(o, p) == value);
        match old {
            None => {
                sum.services_added += 1;
                new_services.push(value.id);
            }
            Some(o) if o.value.id != value.id => new_services.push(value.id),
            Some(o) if o.value.flags != value.flags || o.value.persist_timeout_s != value.persist_timeout_s
                || o.value.scheduler != value.scheduler
                || o.value.persist_prefix_v4 != value.persist_prefix_v4
                || o.value.persist_prefix_v6 != value.persist_prefix_v6 =>
            {
                sum.services_changed += 1
            }
            Some(_) => {}
        }
        if !unchanged {
            entries.push((s.key, value));
        }
    }
    for id in new_services.into_iter().filter(|_| clear) {
        zero_counters(dp, names::SERVICE_STATS, id)?;
    }
    {
        let mut m: HashMap<_, VipKey, Service> =
            HashMap::try_from(map_mut(dp.ebpf_mut(), names::SERVICES)?).map_err(map_err(names::SERVICES))?;
        for (key, value) in entries.iter().filter(|(k, _)| k._pad == 0) {
            m.insert(key, value, 0).map_err(map_err(names::SERVICES))?;
        }
    }
    // Opened only when needed: an object without prefix support (`lb-bench`'s
    // comparison with an older build) then still loads and fills.
    if entries.iter().any(|(k, _)| k._pad != 0) {
        let mut m: LpmTrie<_, PrefixKey, Service> =
            LpmTrie::try_from(map_mut(dp.ebpf_mut(), names::PREFIX_SERVICES)?).map_err(map_err(names::PREFIX_SERVICES))?;
        for (key, value) in entries.iter().filter(|(k, _)| k._pad != 0) {
            m.insert(&prefix_key(key), value, 0).map_err(map_err(names::PREFIX_SERVICES))?;
        }
    }

    // 4. The VIP address filter: the Bloom bits of old and new addresses first (a
    // new VIP is never filtered out), then the exact map, then the new bits alone.
    let same_addrs = prev.vip_addrs.len() == plan.vip_addrs.len()
        && prev.vip_addrs.keys().eq(plan.vip_addrs.keys())
        && prev_snat == plan_snat;
    if !same_addrs {
        write_filter(dp, prev.vip_addrs.keys().chain(plan.vip_addrs.keys()), prev_snat.iter().chain(&plan_snat))?;
    }
    {
        let mut m: HashMap<_, VipAddrKey, VipAddrVal> =
            HashMap::try_from(map_mut(dp.ebpf_mut(), names::VIP_ADDRS)?).map_err(map_err(names::VIP_ADDRS))?;
        for (addr, flags) in &plan.vip_addrs {
            if prev.vip_addrs.get(addr) != Some(flags) {
                m.insert(VipAddrKey { addr: *addr }, VipAddrVal { flags: *flags }, 0)
                    .map_err(map_err(names::VIP_ADDRS))?;
            }
        }
        for addr in prev.vip_addrs.keys().filter(|a| !plan.vip_addrs.contains_key(*a)) {
            m.remove(&VipAddrKey { addr: *addr }).map_err(map_err(names::VIP_ADDRS))?;
        }
    }

    if !same_addrs || prev.services.is_empty() {
        write_filter(dp, plan.vip_addrs.keys(), plan_snat.iter())?;
    }

    // 5. What went away: service entries, then their backends.
    let keys: BTreeSet<VipKey> = plan.services.iter().map(|s| s.key).collect();
    {
        let mut m: HashMap<_, VipKey, Service> =
            HashMap::try_from(map_mut(dp.ebpf_mut(), names::SERVICES)?).map_err(map_err(names::SERVICES))?;
        for s in prev.services.iter().filter(|s| !keys.contains(&s.key) && s.key._pad == 0) {
            m.remove(&s.key).map_err(map_err(names::SERVICES))?;
            sum.services_removed += 1;
        }
    }
    if prev.services.iter().any(|s| !keys.contains(&s.key) && s.key._pad != 0) {
        let mut m: LpmTrie<_, PrefixKey, Service> =
            LpmTrie::try_from(map_mut(dp.ebpf_mut(), names::PREFIX_SERVICES)?).map_err(map_err(names::PREFIX_SERVICES))?;
        for s in prev.services.iter().filter(|s| !keys.contains(&s.key) && s.key._pad != 0) {
            m.remove(&prefix_key(&s.key)).map_err(map_err(names::PREFIX_SERVICES))?;
            sum.services_removed += 1;
        }
    }
    for s in prev.services.iter().filter(|s| !keys.contains(&s.key)) {
        if let Some(p) = dp.placed.remove(&s.key) {
            dp.regions.release_later(p.region, 2 * p.size);
        }
    }
    for b in &plan.backends {
        if let Some(slot) = prev_backends.get_mut(b.id as usize) {
            *slot = None;
        }
    }
    {
        let mut m: Array<_, Backend> =
            Array::try_from(map_mut(dp.ebpf_mut(), names::BACKENDS)?).map_err(map_err(names::BACKENDS))?;
        // What is left: backends that went away.
        for (id, (old, _)) in prev_backends.iter().enumerate().filter_map(|(id, v)| Some((id as u32, (*v)?))) {
            m.set(id, Backend { flags: 0, ..old }, 0).map_err(map_err(names::BACKENDS))?;
            sum.backends_removed += 1;
        }
    }
    dp.applied = Some(plan.clone());
    Ok(sum)
}
