//! `nat` and `fullnat` forwarding: their programs' names and `RARE_PROGS`
//! slots, and the reply translation both keep (`NAT_REVERSE`, `FULLNAT_REVERSE`).

/// Name of the `nat` forward direction (DNAT to the backend), tail-called from
/// `lb_xdp` and `lb_xdp_trace` through `RARE_PROGS[NAT_SLOT]`.
pub const PROG_NAT: &str = "lb_nat";
/// Name of the `nat` reply direction (backend to client, from the VIP), tail-called
/// for frames to no VIP while `CONFIG_NAT` is set.
pub const PROG_NAT_REPLY: &str = "lb_nat_reply";
/// `RARE_PROGS` index of `lb_nat`.
pub const NAT_SLOT: u32 = 3;
/// `RARE_PROGS` index of `lb_nat_reply`.
pub const NAT_REPLY_SLOT: u32 = 4;

/// Value of `NAT_REVERSE`, keyed by a `nat` flow's reply as it leaves the backend
/// (`FlowKey` with src = backend address and port, dst = client address and port):
/// what the reply becomes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatReverse {
    /// The VIP and port the client sent to (host byte order): the reply's source.
    pub vip: [u8; 16],
    pub vport: u16,
    /// The source MAC of the client's first frame (its next hop): the reply's
    /// destination MAC.
    pub mac: [u8; 6],
    pub backend_id: u32,
    pub service_id: u32,
    /// The client's address and port (host byte order): a `fullnat` reply's
    /// destination (a `nat` reply's is the client already).
    pub client: [u8; 16],
    pub cport: u16,
    /// Low 16 bits of `CT_CLOCK` when a reply last refreshed the flow's
    /// connection-table entry: replies refresh it once a second, not each one.
    pub seen: u16,
    /// `CT_CLOCK` when the entry was written: the agent's sweep leaves entries of
    /// the last seconds alone (their `FULLNAT_FORWARD` entry may be on its way).
    pub created: u32,
    /// The interface the reply leaves by: `EGRESS_SAME` (0, the one it came in
    /// on: XDP_TX, one-arm) or the `EGRESS` index of the interface the client's
    /// first frame came in on, when its backend is reached by another (two-arm:
    /// the reply arrives there and is redirected back, from that interface's MAC).
    pub egress: u8,
    pub _pad: [u8; 3],
}
