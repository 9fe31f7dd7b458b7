//! `maglev` (the default): the flow hash's slot in the service's Maglev table.

use lb_common::{maglev_slot, Service};

#[inline(always)]
pub fn slot(hash: u32, svc: &Service) -> u32 {
    maglev_slot(hash, svc.table_size)
}
