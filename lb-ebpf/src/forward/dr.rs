//! LVS-DR: the IP packet is not changed at all; the frame goes to the backend's MAC
//! from ours. The backend has the VIP on `lo` and answers the client directly.

use aya_ebpf::programs::XdpContext;
use lb_common::{stat, Backend, Config};

use super::bytes_mut;
use crate::parse::Outcome;

#[inline(always)]
pub fn rewrite(ctx: &XdpContext, b: &Backend, cfg: &Config) -> Outcome {
    // Cannot fail after a successful parse; keeps the verifier informed.
    let Some(eth) = bytes_mut::<12>(ctx, 0) else { return Outcome::Pass(stat::PASS_MALFORMED_L2) };
    eth[0..6].copy_from_slice(&b.mac);
    eth[6..12].copy_from_slice(&cfg.iface_mac);
    Outcome::Out(u32::from(b.egress))
}
