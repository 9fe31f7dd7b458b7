//! Layouts of `lb_decap`, the real servers' XDP program that takes the
//! balancer's tunnelled packets (IPIP, IP6IP6, their cross forms, GUE) apart.
//!
//! `DECAP_ADDRS` holds the addresses a packet's outer destination must have to be
//! decapsulated (16-byte form, IPv4 as `::ffff:a.b.c.d`), `DECAP_CONFIG[0]` the GUE
//! port, `DECAP_STATS` one per-CPU counter per outcome (indices in `decap_stat`).

/// Names of the decapsulator's maps, as `bpftool map list` shows them.
/// Re-exported in `crate::map_names`.
pub mod names {
    pub const DECAP_ADDRS: &str = "DECAP_ADDRS";
    pub const DECAP_CONFIG: &str = "DECAP_CONFIG";
    pub const DECAP_STATS: &str = "DECAP_STATS";
}

/// Name of the decapsulating XDP program in the object.
pub const PROG_DECAP: &str = "lb_decap";

/// UDP destination port of GUE tunnels unless configured otherwise.
pub const DEFAULT_GUE_PORT: u16 = 6080;

/// Entries of `DECAP_ADDRS` (addresses of the interface the program serves).
pub const DECAP_MAX_ADDRS: u32 = 256;

/// Key of `DECAP_ADDRS`: one of this host's addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct DecapAddrKey {
    pub addr: [u8; 16],
}

/// Value of `DECAP_ADDRS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DecapAddrVal {
    /// Index of the interface that carries the address (for operators).
    pub ifindex: u32,
}

/// Value of `DECAP_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DecapConfig {
    /// UDP destination port of GUE packets, host byte order; 0 turns GUE off.
    pub gue_port: u16,
    pub _pad: [u8; 2],
    /// No flags yet; 0.
    pub flags: u32,
}

/// Indices into the per-CPU `DECAP_STATS` array: one counter per outcome.
pub mod decap_stat {
    /// Not IPv4/IPv6 (ARP, LLDP, ...) or shorter than its L2/L3 header: passed.
    pub const PASS_NOT_IP: u32 = 0;
    /// IP, but no tunnel protocol (nor UDP to the GUE port; IPv6 with extension
    /// headers counts here): passed untouched.
    pub const PASS_NOT_TUNNEL: u32 = 1;
    /// A tunnel packet whose outer destination is not one of this host's
    /// addresses (`DECAP_ADDRS`): passed untouched.
    pub const PASS_NOT_LOCAL: u32 = 2;
    /// IPv4 in IPv4 (protocol 4): decapsulated.
    pub const DECAP_IPIP: u32 = 3;
    /// IPv6 in IPv6 (next header 41): decapsulated.
    pub const DECAP_IP6IP6: u32 = 4;
    /// IPv6 in IPv4 (protocol 41): decapsulated.
    pub const DECAP_IP6_IN_IP4: u32 = 5;
    /// IPv4 in IPv6 (next header 4): decapsulated.
    pub const DECAP_IP4_IN_IP6: u32 = 6;
    /// GUE variant 1 (UDP to the GUE port, IPv4 or IPv6 outside and inside):
    /// decapsulated.
    pub const DECAP_GUE: u32 = 7;
    /// A tunnel packet to this host that is not well formed: outer or inner header
    /// truncated, inner version not the one the protocol says, inner length not
    /// what the outer headers leave, outer IPv4 fragment: dropped.
    pub const DROP_MALFORMED: u32 = 8;
    /// The frame could not be rewritten (`bpf_xdp_adjust_head` refused to move
    /// its start): dropped. Never expected.
    pub const DROP_DECAP_FAILED: u32 = 9;
    /// A tunnel packet to this host whose outer IPv4 header checksum is wrong
    /// (the stack, which checks it, never sees the outer header): dropped.
    pub const DROP_BAD_CHECKSUM: u32 = 10;
    /// Outer header marked CE (congestion experienced) on an inner packet that is
    /// not ECN-capable: dropped, as RFC 6040 section 4.2 requires (the mark cannot
    /// be carried inward, and dropping is what congestion would have done).
    pub const DROP_CE_NOT_ECT: u32 = 11;
    pub const COUNT: u32 = 12;

    /// Names for `lb-agent decap --stats`, by index.
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_ip",
        "pass_not_tunnel",
        "pass_not_local",
        "decap_ipip",
        "decap_ip6ip6",
        "decap_ip6_in_ip4",
        "decap_ip4_in_ip6",
        "decap_gue",
        "drop_malformed",
        "drop_decap_failed",
        "drop_bad_checksum",
        "drop_ce_not_ect",
    ];
}

const _: () = {
    assert!(core::mem::size_of::<DecapAddrKey>() == 16);
    assert!(core::mem::size_of::<DecapAddrVal>() == 4);
    assert!(core::mem::size_of::<DecapConfig>() == 8);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C), integers and byte arrays with explicit padding: every bit
    // pattern is valid and none is uninit.
    unsafe impl aya::Pod for DecapAddrKey {}
    unsafe impl aya::Pod for DecapAddrVal {}
    unsafe impl aya::Pod for DecapConfig {}
}
