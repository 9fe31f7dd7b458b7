//! Indices into the per-CPU `STATS` array: one counter per packet outcome.

/// Not IPv4/IPv6 (ARP, LLDP, ...): passed.
pub const PASS_NOT_IP: u32 = 0;
/// Destination is not a VIP address: passed.
pub const PASS_NOT_VIP: u32 = 1;
/// VIP address, but no service for that port and protocol: passed.
pub const PASS_NO_SERVICE: u32 = 2;
/// VIP address, protocol other than TCP/UDP/ICMP (or an IPv6 extension header
/// other than a Fragment header right after the fixed header): passed.
pub const PASS_NOT_L4: u32 = 3;
/// Fragment to a VIP address of neither TCP nor UDP (a fragmented ICMP message):
/// passed. TCP/UDP fragments are followed (`FRAG_*`).
pub const PASS_FRAGMENT: u32 = 4;
/// Frame shorter than its Ethernet / 802.1Q header: passed.
pub const PASS_MALFORMED_L2: u32 = 5;
/// Truncated IP header, IHL < 5, wrong version, total length beyond the frame: passed.
pub const PASS_MALFORMED_L3: u32 = 6;
/// Truncated TCP/UDP header to a VIP address: passed.
pub const PASS_MALFORMED_L4: u32 = 7;
/// Sent to a backend (XDP_TX).
pub const FORWARDED: u32 = 8;
/// Service has no usable backend: dropped.
pub const DROP_NO_BACKEND: u32 = 9;
/// The agent has not finished filling the maps: passed.
pub const PASS_NOT_READY: u32 = 10;
/// Flow found in the connection table.
pub const CONN_HIT: u32 = 11;
/// Flow scheduled by Maglev (new, expired or its backend gone).
pub const CONN_MISS: u32 = 12;
/// Connection table insert failed (flow still forwarded).
pub const CONN_INSERT_FAILED: u32 = 13;
/// Service has no usable backend and `on_all_down: pass`: passed.
pub const PASS_ALL_DOWN: u32 = 14;
/// New flow sent to its client's backend by persistence (`AFFINITY` hit).
pub const PERSIST_HIT: u32 = 15;
/// Flow moved from `CONNTRACK` to `CT_ESTABLISHED` (its second packet).
pub const CT_PROMOTED: u32 = 16;
/// Packet of a flow that should move to `CT_ESTABLISHED` but that table is
/// full: the flow stays in the LRU table (forwarded; evictable by new flows).
pub const CT_ESTABLISHED_FULL: u32 = 17;
/// TCP packet without SYN whose flow is in neither table: the visible sign of
/// an evicted or expired entry (or of a flow that started elsewhere). Scheduled
/// as a new flow.
pub const CT_MIDFLOW_MISS: u32 = 18;
/// Forwarded in an IPIP or IP6IP6 tunnel (also counts `forwarded`).
pub const ENCAP_IPIP: u32 = 19;
/// Forwarded in GUE (also counts `forwarded`).
pub const ENCAP_GUE: u32 = 20;
/// Too large to encapsulate within the MTU, IPv4 with DF or IPv6: answered
/// with ICMP "fragmentation needed" / ICMPv6 "packet too big" (XDP_TX).
pub const ICMP_TOO_BIG: u32 = 21;
/// Too large to encapsulate within the MTU, IPv4 without DF: dropped.
pub const DROP_TOO_BIG: u32 = 22;
/// The outer headers could not be added (the driver leaves XDP too little
/// headroom): dropped.
pub const DROP_ENCAP_FAILED: u32 = 23;
/// ICMP error about a VIP flow's reply (its embedded packet), sent to the
/// flow's backend (also counts `forwarded`).
pub const ICMP_FORWARDED: u32 = 24;
/// ICMP/ICMPv6 to a VIP address that is neither an error about a VIP flow nor
/// an answered echo request (other types, other embedded traffic, forwarding
/// switched off): passed.
pub const PASS_ICMP: u32 = 25;
/// ICMP error too short to hold the embedded IP header and 8 bytes: passed.
pub const PASS_ICMP_SHORT: u32 = 26;
/// Echo request to a VIP address answered from XDP (XDP_TX).
pub const ICMP_ECHO_REPLY: u32 = 27;
/// First fragment of a datagram (offset 0) scheduled and remembered in `FRAGS`
/// (also counts `forwarded`).
pub const FRAG_FIRST: u32 = 28;
/// Fragment sent to the backend its datagram's first fragment went to (also
/// counts `forwarded`).
pub const FRAG_FOLLOWED: u32 = 29;
/// Non-first fragment with no (fresh) first fragment in `FRAGS`: dropped.
pub const DROP_FRAG_UNKNOWN: u32 = 30;
/// A first fragment could not be remembered (`FRAGS` update failed): forwarded,
/// its later fragments will be dropped.
pub const FRAG_INSERT_FAILED: u32 = 31;
/// A TCP SYN forwarded without a `CONNTRACK` insert: this CPU's new flows this
/// second passed `Config::syn_flood_kps` (a SYN flood), and the service's
/// scheduler gives the flow's next packets the same backend by itself.
pub const CT_SYN_UNRECORDED: u32 = 32;
/// Forwarded to a `nat` backend with its destination rewritten (`lb_nat`; also
/// counts `forwarded`).
pub const NAT_FORWARDED: u32 = 33;
/// A `nat` backend's reply, rewritten to come from the VIP and sent back to the
/// client (`lb_nat_reply`, XDP_TX).
pub const NAT_REPLY: u32 = 34;
/// A packet of a `nat` flow (either direction) whose TTL / hop limit would reach
/// 0: dropped (a router would send ICMP "time exceeded").
pub const DROP_NAT_TTL: u32 = 35;
/// A packet of a `nat` or `fullnat` service's flow that could not be rewritten,
/// a later fragment of a `fullnat` flow without a SNAT mapping, or an ICMP
/// error about one whose embedded packet could not be rewritten: dropped.
pub const DROP_NAT_UNSUPPORTED: u32 = 36;
/// Sent to a backend by another interface than the one it came in on
/// (two-arm: XDP_REDIRECT through `EGRESS`; also counts `forwarded`).
pub const REDIRECTED: u32 = 37;
/// For a backend on another interface whose `EGRESS` entry is missing (the
/// agent has not written it): dropped.
pub const DROP_NO_EGRESS: u32 = 38;
/// An ICMP error about a packet sent to a `nat` or `fullnat` backend (from the
/// backend or a router on its path), translated back to the VIP and sent to the
/// client
/// (`lb_nat_reply`, XDP_TX).
pub const NAT_ICMP_REPLY: u32 = 39;
/// Forwarded to a `fullnat` backend, both addresses rewritten (`lb_nat`; also
/// counts `forwarded`).
pub const FULLNAT_FORWARDED: u32 = 40;
/// A `fullnat` backend's reply to a SNAT address, rewritten to go from the VIP
/// to the client (`lb_nat_reply`, XDP_TX).
pub const FULLNAT_REPLY: u32 = 41;
/// A new `fullnat` flow found no free SNAT (address, port) for its backend in
/// its pool (`SNAT_PROBES` probes), or `FULLNAT_REVERSE` was full: dropped. A
/// live port is never reused.
pub const DROP_SNAT_EXHAUSTED: u32 = 42;
pub const COUNT: u32 = 43;

/// Names for metrics and `lb-agent`, by index.
pub const NAMES: [&str; COUNT as usize] = [
    "pass_not_ip",
    "pass_not_vip",
    "pass_no_service",
    "pass_not_l4",
    "pass_fragment",
    "pass_malformed_l2",
    "pass_malformed_l3",
    "pass_malformed_l4",
    "forwarded",
    "drop_no_backend",
    "pass_not_ready",
    "conn_hit",
    "conn_miss",
    "conn_insert_failed",
    "pass_all_down",
    "persist_hit",
    "ct_promoted",
    "ct_established_full",
    "ct_midflow_miss",
    "encap_ipip",
    "encap_gue",
    "icmp_too_big",
    "drop_too_big",
    "drop_encap_failed",
    "icmp_forwarded",
    "pass_icmp",
    "pass_icmp_short",
    "icmp_echo_reply",
    "frag_first",
    "frag_followed",
    "drop_frag_unknown",
    "frag_insert_failed",
    "ct_syn_unrecorded",
    "nat_forwarded",
    "nat_reply",
    "drop_nat_ttl",
    "drop_nat_unsupported",
    "redirected",
    "drop_no_egress",
    "nat_icmp_reply",
    "fullnat_forwarded",
    "fullnat_reply",
    "drop_snat_exhausted",
];
