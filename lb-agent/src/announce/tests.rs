use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::plan::DownSet;

const CFG: &str = "services:
  - name: web
    vip: 198.18.1.10
    port: 80
    table_size: 101
    backends:
      - address: 198.18.0.11
      - address: 198.18.0.12
  - name: dns
    vip: 198.18.1.10
    port: 53
    protocol: udp
    table_size: 101
    backends:
      - address: 198.18.0.13
  - name: v6
    vip: 2001:db8:1::10
    port: 80
    table_size: 101
    backends:
      - address: 2001:db8::11
  - name: passing
    vip: 198.18.1.20
    port: 80
    table_size: 101
    on_all_down: pass
    backends:
      - address: 198.18.0.14
  - name: spare
    vip: 198.18.1.30
    port: 80
    table_size: 101
    on_all_down: backup
    backends:
      - address: 198.18.0.15
      - address: 198.18.0.16
        backup: true
";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn macs(config: &crate::config::Config) -> BTreeMap<IpAddr, crate::neigh::Mac> {
    crate::plan::Plan::backend_addresses(config).into_iter().map(|a| (a, [2, 0, 0, 0, 0, 1])).collect()
}

fn plan_with_down(down: &[(&str, &str)]) -> Plan {
    let config = crate::config::parse(CFG, "test.yaml").expect("valid config");
    let down: DownSet = down.iter().map(|(s, a)| (s.to_string(), ip(a))).collect();
    Plan::next(&config, &macs(&config), &down, None)
}

fn set(addrs: &[&str]) -> BTreeSet<IpAddr> {
    addrs.iter().map(|a| ip(a)).collect()
}

#[test]
fn every_vip_with_a_usable_backend_is_announced() {
    let plan = plan_with_down(&[]);
    assert_eq!(wanted(&plan), set(&["198.18.1.10", "198.18.1.20", "198.18.1.30", "2001:db8:1::10"]));
}

#[test]
fn a_vip_stays_while_any_of_its_services_is_ready() {
    // web is down entirely; dns on the same VIP still serves.
    let plan = plan_with_down(&[("web", "198.18.0.11"), ("web", "198.18.0.12")]);
    assert!(wanted(&plan).contains(&ip("198.18.1.10")));
    // Both services down: the VIP goes.
    let plan = plan_with_down(&[("web", "198.18.0.11"), ("web", "198.18.0.12"), ("dns", "198.18.0.13")]);
    assert!(!wanted(&plan).contains(&ip("198.18.1.10")));
}

#[test]
fn all_down_withdraws_unless_pass_or_a_backup_serves() {
    let plan = plan_with_down(&[("v6", "2001:db8::11"), ("passing", "198.18.0.14"), ("spare", "198.18.0.15")]);
    let w = wanted(&plan);
    assert!(!w.contains(&ip("2001:db8:1::10")), "no backend: withdrawn");
    assert!(w.contains(&ip("198.18.1.20")), "on_all_down: pass keeps the VIP");
    assert!(w.contains(&ip("198.18.1.30")), "a backup serves: announced");
    let plan = plan_with_down(&[("spare", "198.18.0.15"), ("spare", "198.18.0.16")]);
    assert!(!wanted(&plan).contains(&ip("198.18.1.30")), "backups down too: withdrawn");
}

#[test]
fn unresolved_backends_do_not_count() {
    let config = crate::config::parse(CFG, "test.yaml").unwrap();
    let plan = Plan::next(&config, &BTreeMap::new(), &DownSet::new(), None);
    assert_eq!(wanted(&plan), set(&["198.18.1.20"]), "only the pass service without MACs");
}

#[test]
fn diff_adds_and_removes_only_the_difference() {
    let (add, del) = diff(&set(&["198.18.1.10", "198.18.1.20"]), &set(&["198.18.1.20", "2001:db8:1::10"]));
    assert_eq!(add, vec![ip("2001:db8:1::10")]);
    assert_eq!(del, vec![ip("198.18.1.10")]);
}

/// Runs `f` on a thread in a fresh network namespace (root only: fails otherwise).
fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare(2) affects only this thread, which ends with the test.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare(CLONE_NEWNET) failed (run the tests as root): {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

fn ip_route(table: u32) -> String {
    let out = std::process::Command::new("ip").args(["route", "show", "table", &table.to_string()]).output().unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    let out6 = std::process::Command::new("ip").args(["-6", "route", "show", "table", &table.to_string()]).output().unwrap();
    text.push_str(&String::from_utf8_lossy(&out6.stdout));
    text
}

#[test]
fn routes_follow_the_plan_and_a_clean_stop_withdraws_them() {
    in_private_netns(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let table = 4242;
            // A route of someone else's in the same table is left alone.
            assert!(std::process::Command::new("ip")
                .args(["route", "add", "blackhole", "198.18.9.9/32", "table", "4242"])
                .status()
                .unwrap()
                .success());
            let routes = RouteTable::connect(table).unwrap();
            assert_eq!(routes.sync(&set(&["198.18.1.10", "2001:db8:1::10"])).await.unwrap(), (2, 0));
            assert_eq!(routes.list().await.unwrap(), set(&["198.18.1.10", "2001:db8:1::10"]));
            let shown = ip_route(table);
            assert!(shown.contains("blackhole 198.18.1.10 proto 190"), "{shown}");
            assert!(shown.contains("blackhole 2001:db8:1::10"), "{shown}");
            assert_eq!(routes.sync(&set(&["2001:db8:1::10"])).await.unwrap(), (0, 1));
            assert_eq!(routes.sync(&set(&["2001:db8:1::10"])).await.unwrap(), (0, 0), "idempotent");

            // Through the task: update, then a stop that keeps, then one that withdraws.
            let mut a = Announcer::start(Some(table)).unwrap();
            a.update(&plan_with_down(&[]));
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(routes.list().await.unwrap().len(), 4);
            a.stop(false, Duration::ZERO).await;
            assert_eq!(routes.list().await.unwrap().len(), 4, "kept on a stop without withdrawal");

            let mut a = Announcer::start(Some(table)).unwrap();
            a.update(&plan_with_down(&[("v6", "2001:db8::11")]));
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(!routes.list().await.unwrap().contains(&ip("2001:db8:1::10")));
            let t = std::time::Instant::now();
            a.stop(true, Duration::from_millis(300)).await;
            assert!(t.elapsed() >= Duration::from_millis(300), "waits for convergence after withdrawing");
            assert!(routes.list().await.unwrap().is_empty());
            assert!(ip_route(table).contains("198.18.9.9"), "foreign route kept");
        });
    });
}

#[test]
fn off_means_no_task_and_no_routes() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut a = Announcer::start(None).unwrap();
        a.update(&plan_with_down(&[]));
        let t = std::time::Instant::now();
        a.stop(true, Duration::from_secs(5)).await;
        assert!(t.elapsed() < Duration::from_secs(1));
    });
}

#[test]
fn the_table_is_the_agents_own() {
    use clap::Parser;
    let parse = |t: &str| {
        crate::cli::Cli::try_parse_from(["lb-agent", "run", "--config", "x.yaml", "--iface", "eth0", "--announce-table", t])
    };
    for bad in ["0", "253", "254", "255", "main", "4294967296"] {
        let e = parse(bad).expect_err(bad).to_string();
        assert!(e.contains("--announce-table"), "{bad}: {e}");
    }
    let ok = parse("100").expect("table 100");
    let crate::cli::Commands::Run(args) = ok.command else { panic!("not run") };
    assert_eq!(args.announce_table, Some(100));
    assert_eq!(args.withdraw_wait_secs, 2.0);
}

#[test]
fn status_shows_the_table_and_the_vips() {
    let mut status = crate::status::Status::default();
    assert!(!crate::control::render_table(&status).contains("announcing"), "nothing when off");
    status.announce = Some(Box::new(crate::status::AnnounceStatus { table: 100, vips: vec![ip("198.18.1.10"), ip("2001:db8:1::10")] }));
    let text = crate::control::render_table(&status);
    assert!(text.contains("announcing in routing table 100: 198.18.1.10, 2001:db8:1::10"), "{text}");
    status.announce = Some(Box::new(crate::status::AnnounceStatus { table: 100, vips: vec![] }));
    assert!(crate::control::render_table(&status).contains("announcing in routing table 100: nothing"));
    let json = crate::control::render_json(&status);
    assert!(json.contains("\"announce\""), "{json}");
}

#[test]
fn announcer_status_follows_updates() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        assert!(Announcer::start(None).unwrap().status().is_none());
        in_private_netns(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let mut a = Announcer::start(Some(7)).unwrap();
                assert!(a.status().unwrap().vips.is_empty());
                a.update(&plan_with_down(&[("v6", "2001:db8::11")]));
                let s = a.status().unwrap();
                assert_eq!(s.table, 7);
                assert_eq!(s.vips, vec![ip("198.18.1.10"), ip("198.18.1.20"), ip("198.18.1.30")]);
                a.stop(true, Duration::ZERO).await;
            });
        });
    });
}
