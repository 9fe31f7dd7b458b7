//! Prefix services (a `vip` that is a prefix, matched by longest prefix after
//! the exact VIPs) and the locality schedulers' state (`dh`, `lblc`, `lblcr`).

/// Name of the prefix-service program, tail-called from `lb_xdp` (and
/// `lb_xdp_trace`) when a frame's destination is no exact VIP and
/// `CONFIG_PREFIX` says prefix services exist.
pub const PROG_PREFIX: &str = "lb_prefix";
/// `RARE_PROGS` index of `lb_prefix`.
pub const PREFIX_SLOT: u32 = 2;

/// Map names.
pub mod names {
    pub const PREFIX_SERVICES: &str = "PREFIX_SERVICES";
    pub const LOCALITY: &str = "LOCALITY";
}

/// Key data of `PREFIX_SERVICES`, an LPM trie (its key is the prefix length in
/// bits, then this). The trie matches that many leading bits: protocol, a zero
/// byte and the port come first (`PREFIX_KEY_EXACT_BITS`), so they always match
/// exactly, then the address (16-byte form; an IPv4 /24 is 96 + 24 bits).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PrefixKey {
    pub proto: u8,
    pub _pad: u8,
    /// Network byte order (the trie compares bytes most significant first).
    pub port: [u8; 2],
    pub addr: [u8; 16],
}

/// Bits of `PrefixKey` before the address (protocol, pad, port).
pub const PREFIX_KEY_EXACT_BITS: u32 = 32;

impl PrefixKey {
    pub const fn new(proto: u8, port: u16, addr: [u8; 16]) -> PrefixKey {
        PrefixKey { proto, _pad: 0, port: port.to_be_bytes(), addr }
    }
}

/// The trie prefix length of a service on an address prefix of `len` bits in
/// the 16-byte form (96 + the IPv4 length for IPv4); 128 for a frame.
pub const fn prefix_bits(len: u32) -> u32 {
    PREFIX_KEY_EXACT_BITS + len
}

/// Key of `LOCALITY`: (service, destination address), as IPVS's lblc/lblcr
/// tables are per service and keyed by destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LocalityKey {
    pub service_id: u32,
    pub addr: [u8; 16],
}

/// Most backends an `lblcr` destination's set holds (`lblc`: one).
pub const LOCALITY_SET_MAX: usize = 4;

/// Seconds (of `CT_CLOCK`) after which an `lblc`/`lblcr` entry unused that long
/// is forgotten, and an `lblcr` set unchanged that long loses its most loaded
/// member: IPVS's `lblc_expiration`/`lblcr_expiration` default, 24 hours.
pub const LOCALITY_EXPIRE_S: u32 = 24 * 60 * 60;

/// Value of `LOCALITY`: the destination's backend (`lblc`) or set (`lblcr`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LocalityVal {
    /// Backend ids; the first `len` are members.
    pub ids: [u32; LOCALITY_SET_MAX],
    /// Each member's `Backend::generation` when it joined.
    pub generations: [u32; LOCALITY_SET_MAX],
    pub len: u32,
    /// `CT_CLOCK` when a member was last added or removed.
    pub modified: u32,
    /// `CT_CLOCK` when the entry last scheduled a flow.
    pub used: u32,
    pub _pad: u32,
}

const _: () = {
    assert!(core::mem::size_of::<PrefixKey>() == 20);
    assert!(core::mem::size_of::<LocalityKey>() == 20);
    assert!(core::mem::size_of::<LocalityVal>() == 48);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C), integers and byte arrays, explicit padding.
    unsafe impl aya::Pod for PrefixKey {}
    unsafe impl aya::Pod for LocalityKey {}
    unsafe impl aya::Pod for LocalityVal {}
}
