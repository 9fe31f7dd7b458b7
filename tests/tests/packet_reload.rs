//! Packet-level tests of the XDP program through BPF_PROG_TEST_RUN: a flow keeps
//! its backend while the agent rewrites the maps (reloads, backends joining,
//! leaving, going down), and is scheduled afresh when it must be (its backend
//! gone, its id reused, a new SYN on the same 5-tuple). Shared `Lab`:
//! tests/src/drpacket.rs.
//!
//! Needs root: `cargo test -p lb-tests --test packet_reload -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    net::IpAddr,
};

use lb_agent::plan::Plan;
use lb_common::stat::*;
use lb_tests::{drpacket::*, frames::*};

/// Frames of the flow 198.18.0.100:`sport` -> VIP:80/tcp, from `from` on.
fn flows(from: u16) -> impl Iterator<Item = Flow> {
    (from..from + 1000).map(|p| Flow::tcp(C4, VIP, p, 80))
}

#[test]
fn connection_table_keeps_flows_on_their_backend() {
    // The added backends have higher addresses, so the old ones keep their ids
    // (ids follow address order; the connection table stores ids).
    let old = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];
    let more = [&old[..], &["198.18.0.14", "198.18.0.15", "198.18.0.16"]].concat();
    let (a, b) = (web_of(&old), web_of(&more));
    let mut lab = Lab::new(&[a]);
    let plan_b = plan_for(std::slice::from_ref(&b), &[]);
    // A flow that Maglev sends elsewhere once the new backends exist.
    let moves = |f: &Flow| lab.predict(0, f) != predict(&plan_b, 0, f);
    let f = flows(40000).find(moves).expect("no flow moves");
    let frame = f.frame(None, 10);
    let first = lab.new_flow(0, &f, &frame, "first frame");
    lab.expect_fwd(0, &frame, first, &[CONN_HIT, CT_PROMOTED], "second frame");

    lab.rewrite(std::slice::from_ref(&b), &[]);
    assert_eq!(lab.addr(first), ip(old[first as usize]), "id changed");
    assert_ne!(lab.predict(0, &f), first, "set-up: flow should move");
    lab.expect_fwd(0, &frame, first, &[CONN_HIT], "after adding backends");
    let g = flows(41000).find(|g| lab.predict(0, g) >= 3).unwrap();
    lab.new_flow(0, &g, &g.frame(None, 0), "new flow after the change");

    // The flow's backend loses its MAC (inactive): the flow is scheduled again.
    lab.rewrite(&[b], &[old[first as usize]]);
    let next = lab.predict(0, &f);
    assert_ne!(next, first, "Maglev still picks the inactive backend");
    lab.expect_fwd(0, &frame, next, &[CONN_MISS], "after its backend left");
    lab.expect_fwd(0, &frame, next, &[CONN_HIT], "after rescheduling");
}

#[test]
fn backends_keep_their_ids_across_reloads() {
    // A backend with a lower address joins: on a first build it would take id 0
    // and renumber the others, but a reload keeps every id, so the connection
    // table still points at the right servers.
    let old = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];
    let mut lab = Lab::new(&[web_of(&old)]);
    let f = flows(40000).find(|f| lab.predict(0, f) == 1).expect("a flow to .12");
    let frame = f.frame(None, 0);
    lab.new_flow(0, &f, &frame, "first frame");
    lab.rewrite(&[web_of(&["198.18.0.10", "198.18.0.11", "198.18.0.12", "198.18.0.13"])], &[]);
    assert_eq!(lab.addr(1), ip("198.18.0.12"), "ids are stable across reloads");
    lab.expect_fwd(0, &frame, 1, &[CONN_HIT, CT_PROMOTED], "after a lower address joined");
}

#[test]
fn a_reused_backend_id_never_receives_old_flows() {
    // .12 leaves (its id is freed), a new backend joins later and is given that id
    // again with a new generation: the flow recorded for .12 must be scheduled
    // afresh, not sent to the newcomer.
    let mut lab = Lab::new(&[web_of(&["198.18.0.11", "198.18.0.12", "198.18.0.13"])]);
    let f = flows(40000).find(|f| lab.predict(0, f) == 1).expect("a flow to .12");
    let frame = f.frame(None, 0);
    lab.new_flow(0, &f, &frame, "first frame");
    lab.rewrite(&[web_of(&["198.18.0.11", "198.18.0.13"])], &[]);
    lab.rewrite(&[web_of(&["198.18.0.11", "198.18.0.13", "198.18.0.30"])], &[]);
    assert_eq!(lab.addr(1), ip("198.18.0.30"), "set-up: the newcomer took id 1");
    let want = lab.predict(0, &f);
    lab.expect_fwd(0, &frame, want, &[CONN_MISS], "old flow after its id was reused");
}

#[test]
fn a_syn_starts_a_new_flow_even_on_a_known_five_tuple() {
    // A client reusing a source port: the old connection's entry must not pin the
    // new connection to the old backend when Maglev now says otherwise.
    let old = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];
    let more = [&old[..], &["198.18.0.14", "198.18.0.15", "198.18.0.16"]].concat();
    let mut lab = Lab::new(&[web_of(&old)]);
    let plan_b = plan_for(&[web_of(&more)], &[]);
    let f = flows(40000).find(|f| lab.predict(0, f) != predict(&plan_b, 0, f)).expect("a flow that moves");
    let ack = f.frame(None, 0);
    let first = lab.new_flow(0, &f, &ack, "first connection");
    lab.rewrite(&[web_of(&more)], &[]);
    lab.expect_fwd(0, &ack, first, &[CONN_HIT, CT_PROMOTED], "the old connection stays");
    let mut syn = ack.clone();
    syn[14 + 20 + 13] = 0x02; // TCP flags: SYN only
    let want = lab.predict(0, &f);
    assert_ne!(want, first, "set-up: Maglev moved the flow");
    lab.expect_fwd(0, &syn, want, &[CONN_MISS], "a new connection on the same 5-tuple");
    lab.expect_fwd(0, &ack, want, &[CONN_HIT], "and its later packets follow it");
}

#[test]
fn a_backend_that_goes_down_and_up_takes_new_flows_again() {
    let backends = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];
    let mut lab = Lab::new(&[web_of(&backends)]);
    let cfg = config_for(&[web_of(&backends)]);
    let macs: BTreeMap<IpAddr, [u8; 6]> = backends.iter().map(|a| (ip(a), mac_of(ip(a)))).collect();
    let f = flows(40000).find(|f| lab.predict(0, f) == 1).expect("a flow to .12");
    let mut syn = f.frame(None, 0);
    syn[14 + 20 + 13] = 0x02;
    for (round, down) in [true, false, true, false].into_iter().enumerate() {
        let set: lb_agent::plan::DownSet =
            if down { [("web".to_string(), ip("198.18.0.12"))].into() } else { Default::default() };
        lab.plan = Plan::next(&cfg, &macs, &set, Some(&lab.plan));
        lab.dp.apply(&lab.plan).expect("apply");
        let want = lab.predict(0, &f);
        assert_eq!(want == 1, !down, "round {round}: the plan follows health");
        lab.expect_fwd(0, &syn, want, &[CONN_MISS], &format!("round {round}, down={down}"));
    }
}
