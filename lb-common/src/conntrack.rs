//! The connection table's layouts (`CONNTRACK`, `CT_ESTABLISHED`), the
//! per-backend connection counts and the persistence table (`AFFINITY`).

/// Key of `CONNTRACK` and input of the flow hash. Aligned to 8 bytes (its
/// size, 40, and its fields' offsets are those of `repr(C)` alone): the
/// balancer writes a key as five 64-bit words, so that the hashes that read it
/// back in wider words than bytes (the kernel's on every table lookup, the
/// program's own) are not stalled on byte stores (`lb_xdp`'s `balance`).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host byte order.
    pub sport: u16,
    /// Host byte order.
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

// The balancer's five-word write of a key relies on this layout.
const _: () = assert!(
    core::mem::size_of::<FlowKey>() == 40
        && core::mem::offset_of!(FlowKey, dst) == 16
        && core::mem::offset_of!(FlowKey, sport) == 32
        && core::mem::offset_of!(FlowKey, dport) == 34
        && core::mem::offset_of!(FlowKey, proto) == 36
);

/// Value of `CONNTRACK` (flows not yet proven) and `CT_ESTABLISHED` (flows that
/// showed a second packet: floods of new flows cannot evict them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowVal {
    pub backend_id: u32,
    /// Service the flow was scheduled for; a hit whose service differs (the id was
    /// reused by a new configuration) is scheduled again.
    pub service_id: u32,
    /// `Backend::generation` when the flow was scheduled.
    pub generation: u32,
    /// `CT_CLOCK` (whole seconds of CLOCK_MONOTONIC, published by the agent) at the
    /// flow's last packet; in `CONNTRACK`, at its first. The agent expires idle
    /// `CT_ESTABLISHED` entries by it.
    pub last_seen: u32,
    /// `CT_STATE_*`.
    pub state: u8,
    /// A `fullnat` flow's SNAT address and port (`snat::snat_slot`), written by
    /// `lb_nat` into its `CT_ESTABLISHED` entry once its mapping is known, so that
    /// its packets skip the `FULLNAT_FORWARD` lookup; zeros elsewhere.
    pub snat: [u8; 3],
}

/// A flow seen once (or a TCP SYN of a service that does not use `FIRST_RECORD`):
/// in `CONNTRACK`, the LRU table.
pub const CT_STATE_NEW: u8 = 0;
/// A flow that sent a second packet (TCP: a non-SYN after the SYN; UDP: any):
/// in `CT_ESTABLISHED`, expired by the agent after the `tcp`/`udp` timeout.
pub const CT_STATE_ESTABLISHED: u8 = 1;
/// A TCP flow whose client sent FIN or RST: expired after the `tcp_fin` timeout,
/// and a SYN on its 5-tuple starts a new connection (scheduled afresh).
pub const CT_STATE_CLOSING: u8 = 2;

/// Connection counts of one backend, as `ipvsadm -Ln` shows them: `active`
/// (TCP established) and `inactive` (every other live flow: TCP SYN seen or
/// closing, UDP). Two arrays indexed by backend id hold them:
///
/// - `BACKEND_CONN_DELTA`: moved by the program only, with atomic adds, when a
///   flow is scheduled, promoted or closes. Never reset.
/// - `BACKEND_CONNS`: written by the agent only, after each sweep of the
///   connection table: the exact count it found minus the delta read just before
///   the sweep.
///
/// The count is `base + delta` (`BackendConns::count`): the sweep's exact figure
/// plus what the program saw since. See docs/architecture.md, "Connection counts".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendConns {
    /// i64: the BPF target has 64-bit atomic adds only.
    pub active: i64,
    pub inactive: i64,
}

impl BackendConns {
    /// The counts of a backend: `base + delta`, never below zero (a transient
    /// negative sum, from a flow that changed state while the sweep read it, reads
    /// as 0 until the next sweep).
    #[inline(always)]
    pub fn count(base: &BackendConns, delta: &BackendConns) -> (u32, u32) {
        let a = base.active.wrapping_add(delta.active);
        let i = base.inactive.wrapping_add(delta.inactive);
        (a.clamp(0, u32::MAX as i64) as u32, i.clamp(0, u32::MAX as i64) as u32)
    }

    /// The base the agent writes for an exact count taken after reading `delta`.
    pub fn base_for(active: u32, inactive: u32, delta: &BackendConns) -> BackendConns {
        BackendConns {
            active: i64::from(active).wrapping_sub(delta.active),
            inactive: i64::from(inactive).wrapping_sub(delta.inactive),
        }
    }
}

/// Key of `AFFINITY`: the service and the client address masked to the service's
/// persistence prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    pub service_id: u32,
    pub client: [u8; 16],
}

/// Value of `AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityVal {
    pub backend_id: u32,
    pub generation: u32,
    /// `bpf_ktime_get_ns()` of the last new flow that used this affinity.
    pub last_ns: u64,
}
