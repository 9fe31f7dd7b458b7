//! LVS-NAT's reply direction (`lb_nat_reply`): a frame to no VIP, while a `nat`
//! service exists (`CONFIG_NAT`), is looked up in `NAT_REVERSE` by its 5-tuple.
//! A backend's reply found there leaves from VIP:port to the client, its checksums
//! updated and TTL / hop limit decremented (`nat::translate`), to the MAC the
//! client's first frame came from (the client's next hop), by the interface
//! that frame came in on (two-arm: redirected, `NatReverse::egress`). The flow's
//! connection-table entry is kept fresh by the replies and closes on the
//! backend's FIN or RST (`conntrack::follow_reply`). Anything else passes, counted
//! `pass_not_vip` as before. Fragments are not looked up here
//! (`nat_frag::reply` translates them); IPv6 extension headers pass.

use aya_ebpf::programs::XdpContext;
use lb_common::{stat, v4_mapped, FlowKey, NatReverse, PROTO_TCP, PROTO_UDP};

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

use super::nat::translate;
use crate::{
    conntrack,
    maps::{CONFIG, NAT_REVERSE},
    parse::{ptr_at, read_be16, Outcome},
};

/// `lb_nat_reply`, as a packed verdict (`main.rs`): a reply leaves by the
/// interface its entry names (`sent_back`). `packed(Outcome::Rare)`
/// (`NOT_FULLNAT`): the frame is no TCP/UDP packet at all (maybe an ICMP error
/// about a packet sent to a backend: `nat_icmp::to_client`, which `lb_nat_reply`
/// calls next). Not an `Option`: an `Option<Outcome>` returned through memory
/// made `nat_reply_call`'s frame pass 512 bytes.
#[inline(always)]
pub fn reply(ctx: &XdpContext) -> u64 {
    let not_ours = Outcome::Pass(stat::PASS_NOT_VIP);
    let Some((key, l3, l4, v6, fin)) = parse(ctx) else { return crate::packed(Outcome::Rare) };
    let Some(p) = NAT_REVERSE.get_ptr_mut(&key) else { return crate::packed(not_ours) };
    // SAFETY: a live entry, copied out (only `seen` is written back).
    let r: NatReverse = unsafe { *p };
    let Some(cfg) = CONFIG.get(0) else { return crate::packed(not_ours) };
    match translate::<true>(ctx, l3, v6, l4, key.proto, &r.vip, r.vport, &r.mac, &cfg.iface_mac) {
        Ok(()) => {
            // SAFETY: a field of the live entry.
            if conntrack::reply_due(unsafe { &raw mut (*p).seen }, fin) {
                let flow = FlowKey { src: key.dst, dst: r.vip, sport: key.dport, dport: r.vport, proto: key.proto, _pad: [0; 3] };
                conntrack::follow_reply(&flow, fin);
            }
            sent_back(r.egress, stat::NAT_REPLY)
        }
        Err(reason) => crate::packed(Outcome::Drop(reason)),
    }
}

/// The packed verdict of a translated reply, counted `counter`: XDP_TX when its
/// entry's `egress` is `EGRESS_SAME` (one-arm), else a redirect to the client's
/// interface (`egress::send`, from that interface's MAC).
#[inline(always)]
pub(super) fn sent_back(egress: u8, counter: u32) -> u64 {
    (u64::from(counter) << 32) | u64::from(super::egress::action(u32::from(egress)))
}

/// The frame's 5-tuple (TCP/UDP over IPv4 or IPv6 without extension headers, not
/// a fragment), the IP and L4 header offsets, the family, and whether it is a TCP
/// FIN or RST.
#[inline(always)]
pub(super) fn parse(ctx: &XdpContext) -> Option<(FlowKey, usize, usize, bool, bool)> {
    let mut l3 = 14;
    let mut ethertype = read_be16(ctx, 12).ok()?;
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        ethertype = read_be16(ctx, 16).ok()?;
        l3 = 18;
    }
    let mut key = FlowKey::default();
    let (l4, v6) = match ethertype {
        0x0800 => {
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*ptr_at::<[u8; 20]>(ctx, l3).ok()? };
            let ihl = ((h[0] & 0x0f) as usize) * 4;
            if h[0] >> 4 != 4 || ihl < 20 || u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
                return None;
            }
            key.src = v4_mapped([h[12], h[13], h[14], h[15]]);
            key.dst = v4_mapped([h[16], h[17], h[18], h[19]]);
            key.proto = h[9];
            (l3 + ihl, false)
        }
        0x86dd => {
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*ptr_at::<[u8; 40]>(ctx, l3).ok()? };
            if h[0] >> 4 != 6 {
                return None;
            }
            key.src.copy_from_slice(&h[8..24]);
            key.dst.copy_from_slice(&h[24..40]);
            key.proto = h[6];
            (l3 + 40, true)
        }
        _ => return None,
    };
    if key.proto != PROTO_TCP && key.proto != PROTO_UDP {
        return None;
    }
    let l4 = l4 & 0x7f;
    let need = if key.proto == PROTO_TCP { 20 } else { 8 };
    if ctx.data() + l4 + need > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { *ptr_at::<[u8; 4]>(ctx, l4).ok()? };
    key.sport = u16::from_be_bytes([ports[0], ports[1]]);
    key.dport = u16::from_be_bytes([ports[2], ports[3]]);
    let fin = key.proto == PROTO_TCP && {
        // SAFETY: the 20-byte TCP header was bounds-checked above; flags are byte 13.
        let flags = unsafe { *ptr_at::<u8>(ctx, l4 + 13).ok()? };
        flags & (TCP_FIN | TCP_RST) != 0
    };
    Some((key, l3, l4, v6, fin))
}
