//! The Checker end to end against a TCP listener that goes away and comes back.

use tokio::sync::mpsc;

use super::*;

fn key(service: &str) -> TargetKey {
    TargetKey {
        service: service.to_string(),
        backend: "127.0.0.1".parse().unwrap(),
    }
}

fn target(service: &str, kind: ProbeKind, addr: SocketAddr) -> Target {
    Target {
        key: key(service),
        spec: ProbeSpec {
            kind,
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(100),
            rise: 1,
            fall: 1,
            initial: Health::Up,
            ..ProbeSpec::default()
        },
        addr,
        service: service.to_string(),
    }
}

async fn next(events: &mut mpsc::UnboundedReceiver<HealthEvent>) -> HealthEvent {
    tokio::time::timeout(Duration::from_secs(20), events.recv())
        .await
        .expect("no event within 20 s")
        .expect("the checker dropped its sender")
}

#[tokio::test]
async fn listener_closed_and_reopened() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut checker = Checker::new(DEFAULT_MAX_CONCURRENT, tx);
    checker.set_targets(vec![target("web", ProbeKind::Tcp, addr)]);
    assert_eq!(checker.health(&key("web")), Some(Health::Up));

    drop(listener);
    let event = next(&mut events).await;
    assert_eq!(
        (event.key.clone(), event.health),
        (key("web"), Health::Down)
    );
    assert!(event.reason.contains("tcp: connect to"), "{}", event.reason);
    assert_eq!(checker.health(&key("web")), Some(Health::Down));

    let listener = std::net::TcpListener::bind(addr).unwrap();
    let event = next(&mut events).await;
    assert_eq!((event.key, event.health), (key("web"), Health::Up));
    assert_eq!(checker.health(&key("web")), Some(Health::Up));
    drop(listener);

    checker.shutdown();
    assert_eq!(checker.health(&key("web")), None);
}

#[tokio::test]
async fn set_targets_keeps_replaces_and_removes() {
    let closed = closed_port().await;
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut checker = Checker::new(4, tx);
    let failing = target("web", ProbeKind::Tcp, closed);
    checker.set_targets(vec![
        failing.clone(),
        target("dns", ProbeKind::None, closed),
    ]);
    let event = next(&mut events).await;
    assert_eq!((event.key, event.health), (key("web"), Health::Down));
    assert_eq!(
        checker.health(&key("dns")),
        Some(Health::Up),
        "kind none is up"
    );

    // The same target again keeps its state (no new event, still down).
    checker.set_targets(vec![failing.clone()]);
    assert_eq!(checker.health(&key("web")), Some(Health::Down));
    assert_eq!(checker.health(&key("dns")), None, "removed");

    // A changed spec starts again at its initial state, and says so.
    let mut changed = failing;
    changed.spec.interval = Duration::from_secs(3600);
    changed.spec.timeout = Duration::from_secs(1);
    checker.set_targets(vec![changed]);
    let event = next(&mut events).await;
    assert_eq!((event.key, event.health), (key("web"), Health::Up));
    assert_eq!(checker.health(&key("web")), Some(Health::Up));
}

#[test]
fn target_address_defaults() {
    let spec = ProbeSpec::default();
    let backend = "198.18.0.11".parse().unwrap();
    assert_eq!(spec.target(backend, 80), "198.18.0.11:80".parse().unwrap());
    let spec = ProbeSpec {
        port: Some(8080),
        address: Some("198.18.0.99".parse().unwrap()),
        ..spec
    };
    assert_eq!(
        spec.target(backend, 80),
        "198.18.0.99:8080".parse().unwrap()
    );
}

/// Waits until the stats of `key` satisfy `done`, and returns them.
async fn stats_until(
    checker: &Checker,
    key: &TargetKey,
    done: impl Fn(&ProbeStats) -> bool,
) -> ProbeStats {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stats = checker.probe_stats(key).expect("target is probed");
        if done(&stats) {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stats still {stats:?} after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn probe_stats_count_attempts() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let open = listener.local_addr().unwrap();
    let closed = closed_port().await;
    let (tx, _events) = mpsc::unbounded_channel();
    let mut checker = Checker::new(DEFAULT_MAX_CONCURRENT, tx);
    let good = target("web", ProbeKind::Tcp, open);
    let mut bad = target("dns", ProbeKind::Tcp, closed);
    bad.key.backend = "127.0.0.2".parse().unwrap();
    let mut none = target("none", ProbeKind::None, closed);
    none.key.backend = "127.0.0.3".parse().unwrap();
    checker.set_targets(vec![good.clone(), bad.clone(), none.clone()]);
    assert_eq!(checker.probe_stats(&none.key), Some(ProbeStats::default()));
    assert_eq!(checker.probe_stats(&key("absent")), None);

    let up = stats_until(&checker, &good.key, |s| s.successes >= 2).await;
    assert_eq!(up.failures, 0);
    assert!(up.last_latency.is_some());
    let down = stats_until(&checker, &bad.key, |s| s.failures >= 2).await;
    assert_eq!((down.successes, down.last_latency), (0, None));

    // The listener goes: failures are counted, the last success's latency is kept.
    drop(listener);
    let before = checker.probe_stats(&good.key).unwrap();
    let after = stats_until(&checker, &good.key, |s| s.failures >= 1).await;
    assert!(after.successes >= before.successes);
    assert!(after.last_latency.is_some());

    // A changed spec keeps the key's totals; removal forgets them.
    let mut changed = good.clone();
    changed.spec.timeout = Duration::from_millis(50);
    checker.set_targets(vec![changed.clone(), bad.clone()]);
    let kept = checker.probe_stats(&changed.key).unwrap();
    assert!(kept.successes >= after.successes && kept.failures >= after.failures);
    assert_eq!(checker.probe_stats(&none.key), None);
    checker.set_targets(vec![]);
    assert_eq!(checker.probe_stats(&good.key), None);
}
