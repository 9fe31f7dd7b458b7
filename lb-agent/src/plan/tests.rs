use super::*;
use crate::config;

const CFG: &str = "services:
  - name: web
    vip: 198.18.1.10
    port: 80
    table_size: 101
    backends:
      - address: 198.18.0.13
        weight: 2
      - address: 198.18.0.11
      - address: 198.18.0.12
  - name: any
    vip: 198.18.1.10
    port: 0
    protocol: udp
    table_size: 13
    persistence:
      timeout: 60s
      prefix_v4: 24
    on_all_down: pass
    backends:
      - address: 198.18.0.11
";

fn macs(addrs: &[&str]) -> BTreeMap<IpAddr, Mac> {
    addrs.iter().enumerate().map(|(i, a)| (a.parse().unwrap(), [2, 0, 0, 0, 0, i as u8 + 1])).collect()
}

fn all_macs() -> BTreeMap<IpAddr, Mac> {
    macs(&["198.18.0.11", "198.18.0.12", "198.18.0.13"])
}

#[test]
fn ids_and_tables_do_not_depend_on_backend_order() {
    let a = config::parse(CFG, "a.yaml").unwrap();
    let reordered = CFG.replace(
        "      - address: 198.18.0.13\n        weight: 2\n      - address: 198.18.0.11\n      - address: 198.18.0.12\n",
        "      - address: 198.18.0.12\n      - address: 198.18.0.11\n      - address: 198.18.0.13\n        weight: 2\n",
    );
    assert_ne!(reordered, CFG, "the test must reorder something");
    let b = config::parse(&reordered, "b.yaml").unwrap();
    let (pa, pb) = (Plan::build(&a, &all_macs()), Plan::build(&b, &all_macs()));
    assert_eq!(pa.services[0].table, pb.services[0].table);
    assert_eq!(pa.backends, pb.backends);
    // A first plan numbers a service's backends in address order.
    assert_eq!(pa.backends[0].address, "198.18.0.11".parse::<IpAddr>().unwrap());
    assert_eq!(pa.maglev_slots(), 101 + 13);
}

#[test]
fn service_flags_follow_the_configuration() {
    let cfg = config::parse(CFG, "a.yaml").unwrap();
    let plan = Plan::build(&cfg, &all_macs());
    let any = &plan.services[1].value;
    assert_eq!(any.flags, SERVICE_PASS_ON_EMPTY | SERVICE_PERSIST);
    assert_eq!((any.persist_timeout_s, any.persist_prefix_v4, any.persist_prefix_v6), (60, 24, 128));
    assert_eq!(plan.services[0].value.flags, 0);
    let flags = plan.vip_addrs[&addr_key("198.18.1.10".parse().unwrap())];
    assert_eq!(flags, lb_common::VIP_ANY_PORT_UDP);
}

#[test]
fn unresolved_and_down_backends_own_no_slots() {
    let cfg = config::parse(CFG, "a.yaml").unwrap();
    let plan = Plan::build(&cfg, &macs(&["198.18.0.11", "198.18.0.12"]));
    assert_eq!(plan.unresolved(), vec![("web", "198.18.0.13".parse().unwrap())]);
    let down: DownSet = [("web".to_string(), "198.18.0.12".parse().unwrap())].into();
    let plan = Plan::next(&cfg, &macs(&["198.18.0.11", "198.18.0.12"]), &down, Some(&plan));
    let web = &plan.services[0];
    assert!(web.table.iter().all(|&id| id == web.backend_ids[0]), "only .11 is usable");
    for b in &plan.backends[1..3] {
        assert_eq!(b.flags, 0, "{} is neither resolved and up", b.address);
    }
}

#[test]
fn drained_backends_keep_established_flows_only() {
    let cfg = config::parse(&CFG.replace("        weight: 2\n", "        weight: 0\n"), "a.yaml").unwrap();
    let plan = Plan::build(&cfg, &all_macs());
    let drained = plan.backends.iter().find(|b| b.weight == 0).unwrap();
    assert_eq!(drained.flags, BACKEND_ACTIVE, "active for its flows, closed to new ones");
    assert!(!plan.services[0].table.contains(&drained.id));
}

#[test]
fn backups_serve_only_while_no_primary_is_up() {
    let yaml = "services:
  - name: web
    vip: 198.18.1.10
    port: 80
    table_size: 13
    backends:
      - address: 198.18.0.11
      - address: 198.18.0.12
        backup: true
";
    let cfg = config::parse(yaml, "a.yaml").unwrap();
    let plan = Plan::build(&cfg, &all_macs());
    assert!(!plan.services[0].using_backups);
    assert!(plan.services[0].table.iter().all(|&id| id == 0));
    assert_eq!(plan.backends[1].flags, BACKEND_ACTIVE, "an idle backup keeps its established flows");
    let down: DownSet = [("web".to_string(), "198.18.0.11".parse().unwrap())].into();
    let plan = Plan::next(&cfg, &all_macs(), &down, Some(&plan));
    assert!(plan.services[0].using_backups);
    assert!(plan.services[0].table.iter().all(|&id| id == 1));
}

#[test]
fn a_service_with_no_usable_backend_has_an_empty_table() {
    let cfg = config::parse(CFG, "a.yaml").unwrap();
    let plan = Plan::build(&cfg, &BTreeMap::new());
    assert!(plan.services.iter().all(|s| s.value.table_size == 0 && s.table.is_empty()));
    assert_eq!(plan.backend_for(0, &lb_common::FlowKey::default()), None);
}

#[test]
fn reloads_keep_ids_and_reuse_freed_ones_with_a_new_generation() {
    let cfg = config::parse(CFG, "a.yaml").unwrap();
    let first = Plan::build(&cfg, &all_macs());
    let without = config::parse(&CFG.replace("      - address: 198.18.0.12\n", ""), "b.yaml").unwrap();
    let second = Plan::next(&without, &all_macs(), &DownSet::new(), Some(&first));
    let id_of = |p: &Plan, a: &str| p.backends.iter().find(|b| b.address == a.parse::<IpAddr>().unwrap() && b.service == 0).map(|b| (b.id, b.generation));
    assert_eq!(id_of(&second, "198.18.0.11"), id_of(&first, "198.18.0.11"));
    assert_eq!(id_of(&second, "198.18.0.13"), id_of(&first, "198.18.0.13"));
    let freed = id_of(&first, "198.18.0.12").unwrap();
    let with_new = config::parse(&CFG.replace("198.18.0.12", "198.18.0.14"), "c.yaml").unwrap();
    let third = Plan::next(&with_new, &all_macs(), &DownSet::new(), Some(&second));
    let (id, generation) = id_of(&third, "198.18.0.14").unwrap();
    assert_eq!(id, freed.0, "the freed id is reused");
    assert_eq!(generation, freed.1 + 1, "with a new generation");
}

#[test]
fn egress_reaches_the_backend_entries_and_survives_adoption() {
    let cfg = config::parse(CFG, "test.yaml").unwrap();
    let one_arm = Plan::build(&cfg, &all_macs());
    assert!(one_arm.backends.iter().all(|b| b.map_value(0).egress == lb_common::EGRESS_SAME));
    let far: IpAddr = "198.18.0.13".parse().unwrap();
    let plan = Plan::build(&cfg, &all_macs()).set_egress(|a| if a == far { lb_common::EGRESS_BACKEND } else { lb_common::EGRESS_SAME });
    for b in &plan.backends {
        let want = if b.address == far { lb_common::EGRESS_BACKEND } else { lb_common::EGRESS_SAME };
        assert_eq!(b.map_value(plan.services[b.service].value.id).egress, want, "{}", b.address);
    }
    // What an adopting agent reads back from BACKENDS keeps it.
    let backends: Vec<(u32, lb_common::Backend)> =
        plan.backends.iter().map(|b| (b.id, b.map_value(plan.services[b.service].value.id))).collect();
    let services: Vec<_> = plan.services.iter().map(|s| (s.key, s.value, s.table.to_vec())).collect();
    let adopted = crate::plan::from_maps(&services, &backends, plan.vip_addrs.clone(), &plan);
    assert!(adopted.backends.iter().all(|b| (b.address == far) == (b.egress == lb_common::EGRESS_BACKEND)));
}

fn same_plan(a: &Plan, b: &Plan, what: &str) {
    assert_eq!(a.services, b.services, "{what}: services");
    assert_eq!(a.backends, b.backends, "{what}: backends");
    assert_eq!(a.vip_addrs, b.vip_addrs, "{what}: VIP addresses");
    assert_eq!(a.snat_pools, b.snat_pools, "{what}: SNAT pools");
    assert_eq!((a.service_ids.high_water(), a.backend_ids.high_water()), (b.service_ids.high_water(), b.backend_ids.high_water()), "{what}: ids");
}

/// `cfg` with every service a copy of its own (nothing shared with `cfg`): the
/// plan cannot take `reuse.rs`'s shortcut for any of them.
fn unshared(cfg: &Config) -> Config {
    Config { services: cfg.services.iter().map(|s| Arc::new((**s).clone())).collect(), ..cfg.clone() }
}

#[test]
fn services_copied_from_the_previous_plan_are_planned_as_afresh() {
    let cfg = config::parse(CFG, "a").unwrap();
    let first = Plan::build(&cfg, &all_macs());
    let nobody_down = DownSet::new();
    let web_down: DownSet = [("web".to_string(), "198.18.0.11".parse().unwrap())].into();
    let mut reweighted = cfg.clone();
    Arc::make_mut(&mut reweighted.services[0]).backends[0].weight = 5;
    let mut reordered = cfg.clone();
    reordered.services.swap(0, 1);
    let one_mac_moved = {
        let mut m = all_macs();
        m.insert("198.18.0.12".parse().unwrap(), [2, 0, 0, 0, 0, 9]);
        m
    };
    // (the configuration, sharing its services with `cfg`; MACs; down)
    let cases: [(&Config, BTreeMap<IpAddr, Mac>, &DownSet); 6] = [
        (&cfg, all_macs(), &nobody_down),
        (&reweighted, all_macs(), &nobody_down),
        (&reordered, all_macs(), &nobody_down),
        (&cfg, one_mac_moved, &nobody_down),
        (&cfg, macs(&["198.18.0.11", "198.18.0.13"]), &nobody_down),
        (&cfg, all_macs(), &web_down),
    ];
    for (n, (c, m, down)) in cases.into_iter().enumerate() {
        let copied = Plan::next(c, &m, down, Some(&first));
        let afresh = Plan::next(&unshared(c), &m, down, Some(&first));
        same_plan(&copied, &afresh, &format!("case {n}"));
        // And a plan built on the copied one copies again.
        same_plan(&Plan::next(c, &m, down, Some(&copied)), &Plan::next(&unshared(c), &m, down, Some(&afresh)), &format!("case {n}, next"));
    }
    // The shortcut is taken: the shared table of an unchanged service is the
    // previous plan's (also true when planned afresh with equal inputs), and its
    // entry names the configuration it came from.
    let again = Plan::next(&cfg, &all_macs(), &nobody_down, Some(&first));
    assert!(again.services.iter().zip(&cfg.services).all(|(p, s)| p.source.as_ref().is_some_and(|x| Arc::ptr_eq(x, s))));
}
