//! Two-arm forwarding: clients' frames arrive on one interface, backends are
//! reached by another. A backend's `Backend::egress` says which interface its
//! frames leave by: `EGRESS_SAME` (the one the frame came in on, XDP_TX) or an
//! index into the `EGRESS` devmap (XDP_REDIRECT), whose interface's MAC is the
//! frames' source MAC (`EGRESS_MAC`, same index).

/// `Backend::egress` of a backend reached by the interface the frame came in on:
/// XDP_TX (one-arm, and the client interface's backends two-arm).
pub const EGRESS_SAME: u8 = 0;
/// `EGRESS` index of the client interface (`lb-agent run --iface`): where a
/// frame arriving on the backend interface goes back to the clients by.
pub const EGRESS_CLIENT: u8 = 1;
/// `EGRESS` index of the backend interface (`lb-agent run --backend-iface`).
pub const EGRESS_BACKEND: u8 = 2;
/// Entries of `EGRESS` and `EGRESS_MAC`.
pub const EGRESS_ENTRIES: u32 = 8;

/// Value of `EGRESS_MAC`: the MAC of the interface at the same `EGRESS` index.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EgressMac {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<EgressMac>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), fixed-width fields, explicit padding.
    unsafe impl aya::Pod for super::EgressMac {}
}

pub mod names {
    /// The devmap of the interfaces frames are redirected to (two-arm).
    pub const EGRESS: &str = "EGRESS";
    /// Their MACs, by the same index.
    pub const EGRESS_MAC: &str = "EGRESS_MAC";
}
