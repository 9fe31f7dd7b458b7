//! The small named choices of a service: forwarding mode, what to do when all
//! backends are down, protocol and scheduler.

use std::fmt;

/// How a service's frames reach its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarding {
    /// LVS-DR: the frame goes to the backend's MAC on the same segment.
    Dr,
    /// IPIP / IP6IP6 to the backend's address, wherever it is routed.
    Ipip,
    /// GUE (the inner packet in UDP); backends may be of the other family.
    Gue,
    /// LVS-NAT: the destination becomes the backend's address (and `port`); the
    /// backends route their replies through the balancer, which sends them from
    /// the VIP.
    Nat,
    /// FULLNAT: the source becomes a SNAT address and port of the balancer's
    /// (`snat_addresses`, `snat_ports`) and the destination the backend's; the
    /// replies come back to the SNAT address and leave from the VIP. Backends
    /// need no route to the clients (and never see their addresses).
    Fullnat,
}

impl Forwarding {
    pub const ALL: [Forwarding; 5] =
        [Forwarding::Dr, Forwarding::Ipip, Forwarding::Gue, Forwarding::Nat, Forwarding::Fullnat];

    pub fn as_str(self) -> &'static str {
        match self {
            Forwarding::Dr => "dr",
            Forwarding::Ipip => "ipip",
            Forwarding::Gue => "gue",
            Forwarding::Nat => "nat",
            Forwarding::Fullnat => "fullnat",
        }
    }

    pub fn from_name(name: &str) -> Option<Forwarding> {
        Forwarding::ALL.into_iter().find(|f| f.as_str() == name)
    }

    /// The data plane's `lb_common::FORWARD_*`.
    pub fn number(self) -> u8 {
        match self {
            Forwarding::Dr => lb_common::FORWARD_DR,
            Forwarding::Ipip => lb_common::FORWARD_IPIP,
            Forwarding::Gue => lb_common::FORWARD_GUE,
            Forwarding::Nat => lb_common::FORWARD_NAT,
            Forwarding::Fullnat => lb_common::FORWARD_FULLNAT,
        }
    }

    /// Whether a backend may give its own `port` (the destination is rewritten).
    pub fn is_nat(self) -> bool {
        matches!(self, Forwarding::Nat | Forwarding::Fullnat)
    }

    pub fn is_tunnel(self) -> bool {
        matches!(self, Forwarding::Ipip | Forwarding::Gue)
    }

    /// Whether the backends are reached through the kernel's routes (their next
    /// hop, `nexthop.rs`) rather than on the segment: every mode but `dr`.
    pub fn is_routed(self) -> bool {
        self != Forwarding::Dr
    }
}

impl fmt::Display for Forwarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Default GUE destination port.
pub const DEFAULT_GUE_PORT: u16 = lb_common::DEFAULT_GUE_PORT;

/// What a service does with new flows while none of its backends is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnAllDown {
    /// Drop them.
    Drop,
    /// Pass them to the balancer's own network stack.
    Pass,
    /// Send them to the backup backends (`backup: true`) while no primary is up.
    Backup,
}

impl OnAllDown {
    /// Every action, in the order used in messages.
    pub const ALL: [OnAllDown; 3] = [OnAllDown::Drop, OnAllDown::Pass, OnAllDown::Backup];

    /// The name used in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            OnAllDown::Drop => "drop",
            OnAllDown::Pass => "pass",
            OnAllDown::Backup => "backup",
        }
    }

    /// Parses the configuration-file name (lower case).
    pub fn from_name(name: &str) -> Option<OnAllDown> {
        OnAllDown::ALL.into_iter().find(|a| a.as_str() == name)
    }
}

impl fmt::Display for OnAllDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Client affinity: new flows from one client (its address masked to a prefix) go to
/// the backend its previous flow went to, while that was less than `timeout` ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Persistence {
    /// How long an affinity lasts after the client's last flow, `1s..=24h`.
    pub timeout: std::time::Duration,
    /// IPv4 client addresses are masked to this prefix length, `1..=32`.
    pub prefix_v4: u8,
    /// IPv6 client addresses are masked to this prefix length, `1..=128`.
    pub prefix_v6: u8,
}

/// Transport protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// Every protocol, in the order used in messages.
    pub const ALL: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

    /// The IP protocol number (6 for TCP, 17 for UDP).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    /// The name used in the configuration file (`tcp` or `udp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// Parses the configuration-file name (`tcp` or `udp`, lower case).
    pub fn from_name(name: &str) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Backend-selection algorithm of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduler {
    /// Maglev consistent hashing.
    Maglev,
    /// Round robin over the backends taking new flows.
    Rr,
    /// nginx's smooth weighted round robin.
    Wrr,
    /// Least connections (`active * 256 + inactive`), as IPVS.
    Lc,
    /// Weighted least connections: the overhead divided by the weight.
    Wlc,
    /// Source hashing: Maglev over the client address masked to these prefix
    /// lengths (`prefix_v4: 24` is nginx's `ip_hash`).
    Sh { prefix_v4: u8, prefix_v6: u8 },
    /// Destination hashing (prefix services): Maglev over the destination address.
    Dh,
    /// IPVS's locality-based least connections (prefix services).
    Lblc,
    /// IPVS's locality-based least connections with replication (prefix services).
    Lblcr,
}

impl Scheduler {
    /// Every supported scheduler.
    pub const ALL: [Scheduler; 9] = [
        Scheduler::Maglev,
        Scheduler::Rr,
        Scheduler::Wrr,
        Scheduler::Lc,
        Scheduler::Wlc,
        Scheduler::Sh { prefix_v4: 32, prefix_v6: 128 },
        Scheduler::Dh,
        Scheduler::Lblc,
        Scheduler::Lblcr,
    ];

    /// The name used in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Maglev => "maglev",
            Scheduler::Rr => "rr",
            Scheduler::Wrr => "wrr",
            Scheduler::Lc => "lc",
            Scheduler::Wlc => "wlc",
            Scheduler::Sh { .. } => "sh",
            Scheduler::Dh => "dh",
            Scheduler::Lblc => "lblc",
            Scheduler::Lblcr => "lblcr",
        }
    }

    /// `Service::scheduler` in the maps.
    pub fn number(self) -> u8 {
        match self {
            Scheduler::Maglev => lb_common::SCHED_MAGLEV,
            Scheduler::Rr => lb_common::SCHED_RR,
            Scheduler::Wrr => lb_common::SCHED_WRR,
            Scheduler::Lc => lb_common::SCHED_LC,
            Scheduler::Wlc => lb_common::SCHED_WLC,
            Scheduler::Sh { .. } => lb_common::SCHED_SH,
            Scheduler::Dh => lb_common::SCHED_DH,
            Scheduler::Lblc => lb_common::SCHED_LBLC,
            Scheduler::Lblcr => lb_common::SCHED_LBLCR,
        }
    }

    /// Whether a flow keeps its backend when its packets move to another
    /// balancer node with the same configuration (the choice depends only on the
    /// packet and the table).
    pub fn node_independent(self) -> bool {
        matches!(self, Scheduler::Maglev | Scheduler::Sh { .. } | Scheduler::Dh)
    }

    /// Whether the scheduler serves prefix services only (it schedules by the
    /// destination address, which an exact VIP does not vary).
    pub fn needs_prefix(self) -> bool {
        matches!(self, Scheduler::Dh | Scheduler::Lblc | Scheduler::Lblcr)
    }

    /// Parses the configuration-file name (lower case).
    pub fn from_name(name: &str) -> Option<Scheduler> {
        Scheduler::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
