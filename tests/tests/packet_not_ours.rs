//! Packet-level tests of the XDP program through BPF_PROG_TEST_RUN: frames that
//! are not the balancer's pass untouched and are counted by why: not a VIP (also
//! on a `VIP_FILTER` collision), no service on the VIP's port, not IP, truncated
//! or malformed headers; later fragments of no known first one are dropped.
//! Shared `Lab`: tests/src/drpacket.rs.
//!
//! Needs root: `cargo test -p lb-tests --test packet_not_ours -- --test-threads=1`.

use std::net::{IpAddr, Ipv4Addr};

use aya::programs::ProgramError;
use lb_common::{PROTO_TCP, PROTO_UDP, stat::*};
use lb_tests::{drpacket::*, frames::*};

#[test]
fn ipv6_to_an_ipv4_mapped_address_is_not_a_vip() {
    let mut lab = Lab::new(&[web()]);
    let mapped = IpAddr::V6(Ipv4Addr::new(198, 18, 1, 10).to_ipv6_mapped());
    lab.expect_pass(&seg(PROTO_TCP, mapped, 80), PASS_NOT_VIP, "IPv6 to ::ffff:198.18.1.10");
}

#[test]
fn frames_not_for_a_service_pass_untouched() {
    let mut lab = Lab::new(&[web(), web6()]);
    let (tcp, udp) = (PROTO_TCP, PROTO_UDP);
    const NO_SERVICE: u32 = PASS_NO_SERVICE;
    let lldp = ethernet(None, 0x88cc, &[0x02, 0x07, 0x04, 0, 0, 0, 0, 0, 1]);
    let arp = |vlan| arp_request(vlan, Ipv4Addr::new(198, 18, 0, 100), VIP4);
    let cases = [
        ("TCP to a non-VIP", seg(tcp, OTHER, 80), PASS_NOT_VIP),
        ("UDP to a non-VIP", seg(udp, OTHER, 80), PASS_NOT_VIP),
        ("IPv6 TCP to a non-VIP", seg(tcp, OTHER6, 80), PASS_NOT_VIP),
        ("ICMP to a non-VIP", icmp_echo(C4, OTHER), PASS_NOT_VIP),
        ("TCP to VIP:81", seg(tcp, VIP, 81), NO_SERVICE),
        ("IPv6 TCP to VIP:443", seg(tcp, VIP6, 443), NO_SERVICE),
        ("UDP to TCP-only VIP:80", seg(udp, VIP, 80), NO_SERVICE),
        ("IPv6 UDP to TCP-only VIP", seg(udp, VIP6, 80), NO_SERVICE),
        // ICMP to a VIP (echo answered, errors followed): packet_icmp.rs.
        ("ARP request for the VIP", arp(None), PASS_NOT_IP),
        ("802.1Q-tagged ARP", arp(Some(Q_TAG)), PASS_NOT_IP),
        ("LLDP", lldp, PASS_NOT_IP),
    ];
    for (what, frame, counter) in cases {
        lab.expect_pass(&frame, counter, what);
    }
    let mut tagged = seg(tcp, OTHER, 80);
    tagged.splice(12..12, [0x81, 0x00, 0x00, 0x64]);
    lab.expect_pass(&tagged, PASS_NOT_VIP, "802.1Q-tagged TCP to a non-VIP");
}

/// A frame to an address that is no VIP but shares a VIP's `VIP_FILTER` bit (a
/// Bloom-bit collision) passes as not a VIP, to a service's port or not, SYN
/// or not: the service lookup comes first for frames that miss the connection
/// table (`schedule::service_of`) and `VIP_ADDRS` says why there is none.
#[test]
fn a_vip_filter_collision_passes_as_not_a_vip() {
    let mut lab = Lab::new(&[web(), web6()]);
    let bit = lb_common::vip_filter_bit(&addr16(VIP));
    let twin = (0..=u16::MAX)
        .map(|i| IpAddr::V4(Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8)))
        .find(|a| lb_common::vip_filter_bit(&addr16(*a)) == bit)
        .expect("an address in 198.19.0.0/16 with the VIP's filter bit");
    lab.expect_pass(&seg(PROTO_TCP, twin, 80), PASS_NOT_VIP, "TCP to the VIP's port on a filter twin");
    let mut syn = seg(PROTO_TCP, twin, 80);
    syn[ETH_HLEN + 20 + 13] = 0x02; // TCP flags: SYN only
    lab.expect_pass(&syn, PASS_NOT_VIP, "a SYN to the VIP's port on a filter twin");
    lab.expect_pass(&seg(PROTO_TCP, twin, 81), PASS_NOT_VIP, "TCP to another port on a filter twin");
    lab.expect_pass(&seg(PROTO_UDP, twin, 80), PASS_NOT_VIP, "UDP on a filter twin");
}

/// Sets IPv4 tot_len or IPv6 payload_len to end exactly at the end of `frame`.
fn fit_length(frame: &mut [u8], l3: usize) {
    let len = frame.len() - l3;
    if frame[l3] >> 4 == 4 {
        frame[l3 + 2..l3 + 4].copy_from_slice(&(len as u16).to_be_bytes());
        fix_ipv4_checksum(frame, l3);
    } else {
        frame[l3 + 4..l3 + 6].copy_from_slice(&((len - IPV6_HLEN) as u16).to_be_bytes());
    }
}

#[test]
fn truncated_frames_pass_as_malformed() {
    let mut lab = Lab::new(&[web(), web6(), dns()]);
    let cases = [
        ("IPv4 TCP", Flow::tcp(C4, VIP, 40000, 80), None),
        ("IPv4 802.1Q", Flow::tcp(C4, VIP, 40001, 80), Some(Q_TAG)),
        ("IPv4 UDP", Flow::udp(C4, VIP, 40002, 53), None),
        ("IPv6 TCP", Flow::tcp(C6, VIP6, 40003, 80), None),
        ("IPv6 802.1ad", Flow::tcp(C6, VIP6, 40004, 80), Some(AD_TAG)),
    ];
    let malformed = |v: &[u64]| {
        [PASS_MALFORMED_L2, PASS_MALFORMED_L3, PASS_MALFORMED_L4]
            .iter()
            .map(|&i| v[i as usize])
            .sum::<u64>()
    };
    for (name, flow, vlan) in cases {
        let full = flow.frame(vlan, 12);
        let svc = lab.svc_of(&flow);
        lab.forward(svc, &full, &format!("{name}: the whole frame"));
        let l3 = ETH_HLEN + if vlan.is_some() { VLAN_HLEN } else { 0 };
        let (v4, tcp) = (flow.dst.is_ipv4(), flow.proto == PROTO_TCP);
        let l4 = l3 + if v4 { IPV4_HLEN } else { IPV6_HLEN };
        let l4_end = l4 + if tcp { TCP_HLEN } else { UDP_HLEN };
        for len in 0..full.len() {
            let (cut, what) = (&full[..len], format!("{name} cut to {len}"));
            let before = lab.global();
            if len < ETH_HLEN {
                // The kernel refuses XDP test input shorter than an Ethernet header
                // (EINVAL from bpf_test_init) without running the program, so these
                // lengths cannot be tested; a NIC never hands XDP such frames anyway.
                match lab.try_run(cut) {
                    Err(ProgramError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::EINVAL) => {}
                    other => panic!("{what}: expected EINVAL from the test run, got {other:?}"),
                }
                lab.expect_delta(&before, &[], &what);
                continue;
            }
            // Cut inside the tag: l2. Anywhere later: l3, since either the IP header
            // is incomplete or its length field points past the end of the frame.
            let counter = if len < l3 {
                PASS_MALFORMED_L2
            } else {
                PASS_MALFORMED_L3
            };
            lab.expect_pass(cut, counter, &what);
            assert_eq!(malformed(&lab.global()) - malformed(&before), 1, "{what}");
            if (l4..l4_end).contains(&len) {
                let mut fitted = cut.to_vec();
                fit_length(&mut fitted, l3);
                let what = format!("{what}, length fitted");
                lab.expect_pass(&fitted, PASS_MALFORMED_L4, &what);
            }
        }
    }
}

#[test]
fn malformed_ip_headers_fragments_and_extension_headers_pass() {
    let mut lab = Lab::new(&[web(), web6()]);
    let web = lab.svc("web");
    let good = Flow::tcp(C4, VIP, 40000, 80).frame(None, 16);
    // `good` with bytes from offset `at` replaced (in the IPv4 header at 14).
    let edit = |at: usize, bytes: &[u8]| {
        let mut v = good.clone();
        v[at..at + bytes.len()].copy_from_slice(bytes);
        fix_ipv4_checksum(&mut v, ETH_HLEN);
        v
    };
    for ihl in 0..5u8 {
        let what = format!("IPv4 IHL {ihl}");
        lab.expect_pass(&edit(14, &[0x40 | ihl]), PASS_MALFORMED_L3, &what);
    }
    for version in [0u8, 6, 15] {
        let what = format!("IPv4 ethertype, version {version}");
        lab.expect_pass(&edit(14, &[version << 4 | 5]), PASS_MALFORMED_L3, &what);
    }
    lab.expect_pass(&edit(16, &[0, 19]), PASS_MALFORMED_L3, "tot_len 19 < IHL*4");
    let tot_len = (good.len() - ETH_HLEN + 1) as u16;
    let long = edit(16, &tot_len.to_be_bytes());
    lab.expect_pass(&long, PASS_MALFORMED_L3, "tot_len past the frame");
    let l4 = tcp(40000, 80, &[]);
    let opts = ipv4_opts(Ipv4Addr::new(198, 18, 0, 100), VIP4, 6, &[1, 1, 1, 0], &l4);
    for tot_len in [20u8, 23] {
        let mut f = ethernet(None, ETH_P_IP, &opts);
        f[17] = tot_len;
        fix_ipv4_checksum(&mut f, ETH_HLEN);
        let what = format!("IHL 6, tot_len {tot_len} < 24");
        lab.expect_pass(&f, PASS_MALFORMED_L3, &what);
    }
    let good6 = Flow::tcp(C6, VIP6, 40000, 80).frame(None, 16);
    let mut six = good6.clone();
    six[14] = 0x40;
    lab.expect_pass(&six, PASS_MALFORMED_L3, "IPv6 ethertype, version 4");
    six = good6.clone();
    six[19] += 1;
    lab.expect_pass(&six, PASS_MALFORMED_L3, "IPv6 payload_len past the frame");

    // Later fragments (offset 1480, with MF, DF with offset 8) whose first was
    // never seen: dropped (fragments in full: packet_icmp.rs).
    for frag in [[0x00, 0xb9], [0x20, 0xb9], [0x40, 0x01]] {
        let what = format!("IPv4 later fragment to the VIP, flags/offset {frag:02x?}");
        let before = lab.global();
        lab.untouched(&edit(20, &frag), XDP_DROP, &what);
        lab.expect_delta(&before, &[(DROP_FRAG_UNKNOWN, 1)], &what);
    }
    let mut frag = seg(PROTO_TCP, OTHER, 80);
    frag[20] = 0x20;
    lab.expect_pass(&frag, PASS_NOT_VIP, "IPv4 fragment to a non-VIP");
    // Not fragments: DF (the builder's default), no flags; padding after tot_len.
    lab.forward(web, &good, "DF set");
    lab.forward(web, &edit(20, &[0, 0]), "no IPv4 flags");
    let padded = [&good[..], &[0u8; 6]].concat();
    lab.forward(web, &padded, "Ethernet padding after the IP packet");

    // IPv6 extension headers (hop-by-hop with PadN; fragment with M set), then TCP.
    let hbh = [&[6, 0, 1, 4, 0, 0, 0, 0][..], &l4].concat();
    let f = ip_frame(None, C6, VIP6, PROTO_HOPOPT, &hbh);
    lab.expect_pass(&f, PASS_NOT_L4, "IPv6 hop-by-hop header to the VIP");
    // A first fragment (offset 0, M set) is balanced (packet_icmp.rs); with a
    // hop-by-hop header before it, it is not looked for.
    let frag6 = [&[6, 0, 0, 1, 0, 0, 0, 7][..], &l4].concat();
    let hbh_frag = [&[44, 0, 1, 4, 0, 0, 0, 0][..], &frag6].concat();
    let f = ip_frame(None, C6, VIP6, PROTO_HOPOPT, &hbh_frag);
    lab.expect_pass(&f, PASS_NOT_L4, "IPv6 fragment header after hop-by-hop to the VIP");
}
