//! Adopting the maps an earlier agent filled: what it applied, read back.

use aya::maps::Array;
use lb_common::{map_names as names, Config};

use super::{map_err, map_mut, read_state, Dataplane, DataplaneError, Result, State};
use crate::{
    apply::{Placement, Regions},
    plan::Plan,
};

impl Dataplane {
    /// Rebuilds what was applied (ids, generations, table placement) from maps an
    /// earlier agent filled, so the next apply only writes what changed.
    pub(super) fn adopt_state(&mut self, plan: &Plan) -> Result<()> {
        self.fresh = false;
        let m: Array<_, Config> =
            Array::try_from(map_mut(&mut self.ebpf, names::CONFIG)?).map_err(map_err(names::CONFIG))?;
        self.config = m.get(&0, 0).map_err(map_err(names::CONFIG))?;
        let map = |name| self.ebpf.map(name).ok_or(DataplaneError::MissingMap { name });
        let State { services, backends, vip_addrs } =
            read_state(map(names::SERVICES)?, map(names::BACKENDS)?, map(names::VIP_ADDRS)?, self.ebpf.map(names::PREFIX_SERVICES))?;
        let mut used = Vec::new();
        let mut with_tables = Vec::new();
        for (key, value) in &services {
            let table = if self.maglev_fresh { Vec::new() } else { self.maglev.read(value.table_offset as usize, value.table_size) };
            let size = crate::maglev_map::words(&table, crate::maglev_map::distinct(&table));
            // A table `MAGLEV` does not hold (created afresh: another
            // version's layout) is placed anew by the next apply.
            if let Some(half) = (value.table_offset - value.region).checked_div(size).filter(|h| *h < 2) {
                self.placed.insert(*key, Placement { region: value.region, size, half });
                used.push((value.region, 2 * size));
            }
            with_tables.push((*key, *value, table));
        }
        self.regions = Regions::with_used(self.capacity.maglev, &used);
        self.applied = Some(crate::plan::from_maps(&with_tables, &backends, vip_addrs, plan));
        Ok(())
    }
}
