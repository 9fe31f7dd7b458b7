//! The `BACKENDS` array: which backend an id names, and whether it may be used.

use lb_common::Backend;

use crate::maps::BACKENDS;

/// The backend of `id` if it belongs to `service_id`, is in incarnation
/// `generation` (when given) and has all of `need` flags: a reference into the
/// map (no copy on the stack, which the verifier limits to 512 bytes).
#[inline(always)]
pub fn backend(id: u32, service_id: u32, generation: Option<u32>, need: u32) -> Option<&'static Backend> {
    let b = BACKENDS.get(id)?;
    if b.flags & need != need || b.service_id != service_id {
        return None;
    }
    if let Some(g) = generation {
        if b.generation != g {
            return None;
        }
    }
    Some(b)
}
