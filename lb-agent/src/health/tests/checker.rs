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
