//! The fragment table (`FRAGS`): where a fragmented datagram's first fragment
//! went, so its later fragments (which carry no ports) follow it.

/// Key of `FRAGS`: one fragmented datagram (RFC 791 / RFC 8200 reassembly key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// IPv4 identification (16 bits) or IPv6 fragment identification, host order.
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of `FRAGS`: where the datagram's first fragment went.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragVal {
    pub backend_id: u32,
    pub service_id: u32,
    pub generation: u32,
    /// `CT_CLOCK` when the first fragment was seen; the entry is used for
    /// `Config::frag_timeout_s` seconds after it.
    pub created: u32,
    /// The first fragment's ports (host order): the later fragments are
    /// encapsulated with the same per-flow entropy.
    pub sport: u16,
    pub dport: u16,
}
