//! `forwarding: fullnat`'s SNAT mappings and pools (`FULLNAT_FORWARD`,
//! `SNAT_POOLS`; `FULLNAT_REVERSE` holds `NatReverse` values).

/// Value of `FULLNAT_FORWARD`, keyed by a `fullnat` flow (client to VIP, as in
/// `CONNTRACK`): the SNAT address and port it was given, and the backend address
/// and port it goes to, which together are its `FULLNAT_REVERSE` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SnatFwd {
    pub snat: [u8; 16],
    pub backend: [u8; 16],
    /// Host byte order.
    pub snat_port: u16,
    pub backend_port: u16,
    pub backend_id: u32,
    /// `Backend::generation` when the mapping was made: a mapping for an earlier
    /// incarnation of the id is replaced.
    pub generation: u32,
}

/// SNAT addresses of one family a pool holds at most (`SNAT_POOLS`).
pub const MAX_SNAT_ADDRS: usize = 8;

/// Value of `SNAT_POOLS`, indexed by service id: where a `fullnat` service's new
/// flows get their source. Candidates are numbered address-major: candidate `c`
/// is address `c / ports`, port `port_lo + c % ports` (`ports = port_hi -
/// port_lo + 1`), probed from `cursor` on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SnatPool {
    /// IPv4 addresses (network order), the first `n_v4` used.
    pub v4: [[u8; 4]; MAX_SNAT_ADDRS],
    pub v6: [[u8; 16]; MAX_SNAT_ADDRS],
    pub n_v4: u8,
    pub n_v6: u8,
    pub _pad: [u8; 2],
    /// Port range, inclusive, host byte order.
    pub port_lo: u16,
    pub port_hi: u16,
    /// Where the next probe starts (the program moves it; the agent writes 0).
    pub cursor: u32,
}

/// Probes of one new `fullnat` flow for a free (address, port) before it is
/// dropped as exhaustion (`drop_snat_exhausted`).
pub const SNAT_PROBES: u32 = 256;

/// `FlowVal::snat` of a `fullnat` flow whose SNAT address is `pool_index` in its
/// pool's list (`SnatPool::v4` or `v6`) and whose SNAT port is `port`: the port
/// (little-endian, never 0: ports start at 1), then the index (bits 0-2) and
/// `snat_check` of the address (bits 3-7). All zeros: not known (look the
/// mapping up in `FULLNAT_FORWARD`).
#[inline(always)]
pub fn snat_slot(port: u16, pool_index: usize, check: u8) -> [u8; 3] {
    let [lo, hi] = port.to_le_bytes();
    [lo, hi, (pool_index as u8 & 7) | check << 3]
}

/// Five bits of a SNAT address (as `FlowKey` holds it, v4-mapped for IPv4)
/// kept in `FlowVal::snat` next to its pool index: a pool whose list changed
/// since (another address at that index) is noticed, and the flow's mapping is
/// looked up instead.
#[inline(always)]
pub fn snat_check(addr: &[u8; 16]) -> u8 {
    let w = |i: usize| u32::from_le_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    let x = w(0) ^ w(4) ^ w(8) ^ w(12);
    let x = x ^ x >> 16;
    let x = x ^ x >> 8;
    (x ^ x >> 5) as u8 & 0x1f
}

const _: () = {
    assert!(core::mem::size_of::<SnatFwd>() == 44);
    assert!(core::mem::size_of::<SnatPool>() == 172);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C), integers and byte arrays with explicit padding: every bit
    // pattern is valid and none is uninit.
    unsafe impl aya::Pod for SnatFwd {}
    unsafe impl aya::Pod for SnatPool {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_never_zero_and_keeps_port_index_and_check() {
        let addr = crate::v4_mapped([198, 18, 0, 2]);
        let slot = snat_slot(20000, 5, snat_check(&addr));
        assert_eq!(u16::from_le_bytes([slot[0], slot[1]]), 20000);
        assert_eq!((slot[2] & 7, slot[2] >> 3), (5, snat_check(&addr)));
        assert!(snat_check(&addr) < 32);
        // Another address at the same index is noticed (for these two).
        assert_ne!(snat_check(&addr), snat_check(&crate::v4_mapped([198, 18, 0, 3])));
        // The filter bit of a SNAT address is not its VIP bit.
        assert_ne!(crate::snat_filter_bit(&addr), crate::vip_filter_bit(&addr));
    }
}
