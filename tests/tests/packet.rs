//! Packet-level tests of the XDP program through BPF_PROG_TEST_RUN: hand-built
//! frames to a VIP's service in; verdict, output frame and counters checked
//! against what the agent's plan predicts. Each test loads its own object, so its
//! maps start empty. Flows across reloads: packet_reload.rs; frames that are not
//! the balancer's (no VIP, no service, malformed): packet_not_ours.rs; the shared
//! `Lab`: tests/src/drpacket.rs.
//!
//! Needs root: `cargo test -p lb-tests --test packet -- --test-threads=1`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use aya::maps::Array;
use lb_common::{Config, Counters, PROTO_TCP, map_names, stat::*};
use lb_tests::{drpacket::*, frames::*};


/// 200 new flows (`tmpl` from source ports 40000..40200), framed by `frame`: each
/// goes to the backend the plan predicts, and every backend of the service gets some.
fn spread(lab: &mut Lab, what: &str, tmpl: Flow, frame: impl Fn(&Flow) -> Vec<u8>) {
    let svc = lab.svc_of(&tmpl);
    let mut used = BTreeSet::new();
    for sport in 40000..40200 {
        let (flow, what) = (tmpl.sport(sport), format!("{what}, source port {sport}"));
        used.insert(lab.new_flow(svc, &flow, &frame(&flow), &what));
    }
    let all = &lab.plan.services[svc].backend_ids;
    assert!(used.len() == all.len(), "{what}: only {used:?} of {all:?}");
}

#[test]
fn vip_hit_is_forwarded_to_the_predicted_backend() {
    let mut lab = Lab::new(&[web(), web6(), dns()]);
    let c = |last| IpAddr::V4(Ipv4Addr::new(198, 18, 0, last));
    let c6 = ip("2001:db8::101");
    // The tagged cases also check that the tag stays (all bytes after the MACs do).
    let cases = [
        ("IPv4 TCP", Flow::tcp(c(100), VIP, 0, 80), None),
        ("IPv6 TCP", Flow::tcp(C6, VIP6, 0, 80), None),
        ("IPv4 UDP", Flow::udp(C4, VIP, 0, 53), None),
        ("802.1Q", Flow::tcp(c(101), VIP, 0, 80), Some(Q_TAG)),
        ("802.1ad", Flow::tcp(c(102), VIP, 0, 80), Some(AD_TAG)),
        ("IPv6 802.1Q", Flow::tcp(c6, VIP6, 0, 80), Some(Q_TAG)),
    ];
    for (what, tmpl, vlan) in cases {
        spread(&mut lab, what, tmpl, |f| f.frame(vlan, 32));
    }
    // IHL 7 (NOPs, end of list): the ports must be read after the options.
    let opts = [1, 1, 1, 1, 1, 1, 1, 0];
    let c103 = Ipv4Addr::new(198, 18, 0, 103);
    let frame = |f: &Flow| {
        let ip = ipv4_opts(c103, VIP4, PROTO_TCP, &opts, &f.l4(b"x"));
        ethernet(None, ETH_P_IP, &ip)
    };
    let tmpl = Flow::tcp(c103.into(), VIP, 0, 80);
    spread(&mut lab, "IPv4 options", tmpl, frame);
}

#[test]
fn any_port_service_and_exact_port_precedence() {
    let b = ["198.18.0.31", "198.18.0.32", "198.18.0.33"];
    let any = service("any", "198.18.1.20", 0, "tcp", &b);
    let b = ["198.18.0.41", "198.18.0.42"];
    let https = service("https", "198.18.1.20", 443, "tcp", &b);
    let b = ["2001:db8::31", "2001:db8::32"];
    let any6 = service("any6", "2001:db8:1::20", 0, "udp", &b);
    let mut lab = Lab::new(&[any, https, any6]);
    let (s_any, s_https, s_any6) = (lab.svc("any"), lab.svc("https"), lab.svc("any6"));
    let (vip, vip6) = (ip("198.18.1.20"), ip("2001:db8:1::20"));
    for dport in [0, 1, 22, 80, 442, 444, 8080, 65535] {
        for sport in [1000, 2000, 3000] {
            let (f, what) = (Flow::tcp(C4, vip, sport, dport), format!("TCP to {dport}"));
            lab.new_flow(s_any, &f, &f.frame(None, 4), &what);
        }
        let (f, what) = (Flow::udp(C6, vip6, 53, dport), format!("UDP6 to {dport}"));
        lab.new_flow(s_any6, &f, &f.frame(None, 4), &what);
    }
    // new_flow() accepts only backends of `https`, never one of the any-port service.
    let mut used = BTreeSet::new();
    for f in (40000..40100).map(|p| Flow::tcp(C4, vip, p, 443)) {
        used.insert(lab.new_flow(s_https, &f, &f.frame(None, 4), "TCP to 443"));
    }
    assert_eq!(used.len(), 2, "port 443 flows used backends {used:?} only");
    let stats = lab.dp.stats().unwrap();
    let packets = |s: usize| stats.services[lab.plan.services[s].value.id as usize].packets;
    let got = (packets(s_any), packets(s_https), packets(s_any6));
    assert_eq!(got, (24, 100, 8), "packets of any, https, any6");
    // The any-port flag is per protocol: UDP to the TCP any-port VIP, TCP to the UDP one.
    let udp = Flow::udp(C4, vip, 1000, 53).frame(None, 4);
    lab.expect_pass(&udp, PASS_NO_SERVICE, "UDP to a TCP any-port VIP");
    let tcp = Flow::tcp(C6, vip6, 1000, 80).frame(None, 4);
    lab.expect_pass(&tcp, PASS_NO_SERVICE, "TCP to a UDP any-port VIP");
}

#[test]
fn service_without_resolved_backends_drops() {
    let dead = service(
        "dead",
        "198.18.1.30",
        80,
        "tcp",
        &["198.18.0.51", "198.18.0.52"],
    );
    let b = ["198.18.0.61", "198.18.0.62", "198.18.0.63"];
    let half = service("half", "198.18.1.30", 81, "tcp", &b);
    let unresolved = ["198.18.0.51", "198.18.0.52", "198.18.0.62"];
    let mut lab = Lab::with_unresolved(&[dead, half], &unresolved);
    let (s_dead, s_half) = (lab.svc("dead"), lab.svc("half"));
    let vip = ip("198.18.1.30");
    assert_eq!(lab.plan.services[s_dead].value.table_size, 0, "table");
    for f in (40000..40020).map(|p| Flow::tcp(C4, vip, p, 80)) {
        assert_eq!(lab.plan.backend_for(s_dead, &f.key()), None, "{f:?}");
        let before = lab.global();
        lab.untouched(&f.frame(None, 8), XDP_DROP, &format!("dead service, {f:?}"));
        let want = [(DROP_NO_BACKEND, 1), (CONN_MISS, 1), (CT_MIDFLOW_MISS, 1)];
        lab.expect_delta(&before, &want, "dead service");
    }
    let mut used = BTreeSet::new();
    for f in (40000..40100).map(|p| Flow::tcp(C4, vip, p, 81)) {
        used.insert(lab.new_flow(s_half, &f, &f.frame(None, 8), "half"));
    }
    let got: Vec<IpAddr> = used.iter().map(|&id| lab.addr(id)).collect();
    assert_eq!(got, [ip(b[0]), ip(b[2])], "backends used by `half`");
    let stats = lab.dp.stats().unwrap();
    let id = lab.plan.services[s_dead].value.id as usize;
    assert_eq!(stats.services[id], Counters::default(), "dead service");
}

#[test]
fn service_and_backend_counters_are_exact() {
    let mut lab = Lab::new(&[web(), dns()]);
    let nsvc = lab.plan.services.len();
    let mut svc_want = vec![Counters::default(); nsvc];
    let mut be_want = vec![Counters::default(); lab.plan.backends.len()];
    let mut first_hop = BTreeMap::new();
    let before = lab.global();
    // 30 flows (20 TCP, 10 UDP), 3 frames each, of varied sizes, some tagged; and a
    // non-VIP frame every 10th, which must not be counted.
    let (n, flows, passed) = (90u64, 30u64, 9u64);
    for i in 0..n as u16 {
        let sport = 50000 + i % 30;
        let tcp = Flow::tcp(C4, VIP, sport, 80);
        let flow = if i % 30 < 20 {
            tcp
        } else {
            Flow::udp(C4, VIP, sport, 53)
        };
        let svc = lab.svc_of(&flow);
        let vlan = (i % 4 == 0).then_some(Q_TAG);
        let frame = flow.frame(vlan, usize::from(i * 17 % 700));
        let got = lab.forward(svc, &frame, &format!("frame {i}"));
        let new_flow = !first_hop.contains_key(&sport);
        let hop = first_hop.entry(sport);
        let want = *hop.or_insert_with(|| lab.predict(svc, &flow));
        assert_eq!(got, want, "frame {i}: flow changed backend");
        for c in [&mut svc_want[svc], &mut be_want[got as usize]] {
            c.packets += 1;
            c.bytes += frame.len() as u64;
            c.new_flows += u64::from(new_flow);
        }
        if i % 10 == 0 {
            lab.untouched(&seg(PROTO_TCP, OTHER, 80), XDP_PASS, "non-VIP");
        }
    }
    let expected = [
        (FORWARDED, n),
        (CONN_MISS, flows),
        (CONN_HIT, n - flows),
        // TCP flows start with an ACK here (no SYN seen): a mid-flow miss each.
        (CT_MIDFLOW_MISS, 20),
        // Every flow's second frame moves it to CT_ESTABLISHED.
        (CT_PROMOTED, flows),
        (PASS_NOT_VIP, passed),
    ];
    lab.expect_delta(&before, &expected, "after all frames");
    let stats = lab.dp.stats().unwrap();
    for (i, s) in lab.plan.services.iter().enumerate() {
        let (got, name) = (stats.services[s.value.id as usize], &s.name);
        assert_eq!(got, svc_want[i], "service {name}");
    }
    for b in &lab.plan.backends {
        let (got, addr) = (stats.backends[b.id as usize], b.address);
        assert_eq!(got, be_want[b.id as usize], "backend {addr}");
    }
    // Unused ids (the maps are larger than the plan) stay at zero.
    let zero = |v: &[Counters]| v.iter().all(|c| *c == Counters::default());
    assert!(zero(&stats.services[nsvc..]), "unused service ids");
    assert!(zero(&stats.backends[be_want.len()..]), "unused backend ids");
}

#[test]
fn vip_traffic_passes_until_the_maps_are_marked_ready() {
    let mut lab = Lab::new(&[web()]);
    // As while the agent is still filling the maps: all entries there, not ready.
    let map = lab.dp.ebpf_mut().map_mut(map_names::CONFIG).unwrap();
    let mut config: Array<_, Config> = map.try_into().unwrap();
    let ready = config.get(&0, 0).unwrap();
    config.set(0, Config { flags: 0, ..ready }, 0).unwrap();
    let frame = Flow::tcp(C4, VIP, 40000, 80).frame(None, 8);
    lab.expect_pass(&frame, PASS_NOT_READY, "VIP frame, maps not ready");
    lab.rewrite(&[web()], &[]);
    lab.forward(0, &frame, "VIP frame, maps ready");
}
