use super::wire::{checksum, ACK, RST, SYN, TCP_LEN};
use super::*;

use std::time::Duration;

/// Raw sockets need CAP_NET_RAW: these tests run as root (`cargo xtask test`).
fn prober() -> SynProber {
    let syn = SynProber::new().expect("open the raw sockets (run the tests as root)");
    assert!(syn.v4.is_some() && syn.v6.is_some(), "both families");
    syn
}

async fn probe(syn: &SynProber, target: SocketAddr) -> Result<(), String> {
    probe_turn(syn, target, 0).await
}

async fn probe_turn(syn: &SynProber, target: SocketAddr, turn: usize) -> Result<(), String> {
    tokio::time::timeout(Duration::from_secs(5), syn.probe(target, turn))
        .await
        .unwrap_or_else(|_| Some(Err("no answer within 5 s".to_string())))
        .unwrap_or_else(|| Err("no free source port".to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_ports_answer_closed_ports_refuse_and_nothing_is_accepted() {
    let syn = Arc::new(prober());
    for local in ["127.0.0.1:0", "[::1]:0"] {
        let listeners: Vec<std::net::TcpListener> = (0..25)
            .map(|_| std::net::TcpListener::bind(local).unwrap())
            .collect();
        let targets: Vec<SocketAddr> =
            listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        // Many at once: each target as many times as the pool has ports.
        let results = futures_join(&syn, &targets, targets.len() * POOL).await;
        assert!(results.iter().all(Result::is_ok), "{local}: {results:?}");
        for l in &listeners {
            l.set_nonblocking(true).unwrap();
            assert!(
                l.accept().is_err(),
                "{local}: a probe completed a handshake"
            );
        }
        let closed = {
            let l = std::net::TcpListener::bind(local).unwrap();
            l.local_addr().unwrap()
        };
        let err = probe(&syn, closed).await.unwrap_err();
        assert!(err.contains("refused"), "{local}: {err}");
    }
    // IPv4 sources are kept after a success and looked up again after a failure.
    let sources = syn
        .v4
        .as_ref()
        .and_then(|f| f.route.as_ref())
        .expect("IPv4 sources");
    let known = |dst: &str| {
        let dst: Ipv4Addr = dst.parse().unwrap();
        sources.known.lock().unwrap().get(&dst).map(|(src, _)| *src)
    };
    let listener = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    probe(&syn, listener.local_addr().unwrap()).await.unwrap();
    assert_eq!(known("127.0.0.2"), Some(Ipv4Addr::new(127, 0, 0, 1)));
    let closed = listener.local_addr().unwrap();
    drop(listener);
    probe(&syn, closed).await.unwrap_err();
    assert_eq!(known("127.0.0.2"), None);
}

/// `n` probes spread over `targets`, all at once.
async fn futures_join(
    syn: &Arc<SynProber>,
    targets: &[SocketAddr],
    n: usize,
) -> Vec<Result<(), String>> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let (syn, target) = (syn.clone(), targets[i % targets.len()]);
        set.spawn(async move { probe_turn(&syn, target, i).await });
    }
    set.join_all().await
}

#[test]
fn probes_in_flight_never_share_a_4_tuple() {
    let pending = Pending::default();
    let ports = [40000, 40001, 40002];
    let a: SocketAddr = "198.18.0.2:80".parse().unwrap();
    let b: SocketAddr = "198.18.0.3:80".parse().unwrap();
    let wait = |target, turn, isn| {
        let (tx, _rx) = oneshot::channel();
        Waiting::new(&pending, &ports, target, turn, isn, tx)
    };
    // Turn 1 starts at the second port; taken ports are skipped, in turn.
    let w1 = wait(a, 1, 1).unwrap();
    let w2 = wait(a, 1, 2).unwrap();
    let w3 = wait(a, 1, 3).unwrap();
    assert_eq!([w1.key.2, w2.key.2, w3.key.2], [40001, 40002, 40000]);
    // Every port in flight to `a`: none left for it; `b` is another 4-tuple.
    assert!(wait(a, 0, 4).is_none());
    assert_eq!(wait(b, 1, 5).unwrap().key.2, 40001);
    // A port comes free when its probe ends.
    drop(w2);
    assert_eq!(wait(a, 0, 6).unwrap().key.2, 40002);
    // An entry another probe took since is not removed by the earlier one's end.
    let w7 = wait(a, 2, 7).unwrap();
    assert_eq!(w7.key.2, 40002);
    let stale = Waiting {
        pending: &pending,
        key: w7.key,
        isn: 99,
    };
    drop(stale);
    assert!(pending.lock().unwrap().contains_key(&w7.key));
}

#[test]
fn syn_v4_checksums_verify() {
    let p = syn_v4(
        Ipv4Addr::new(198, 18, 0, 1),
        Ipv4Addr::new(198, 18, 0, 2),
        40000,
        80,
        0x1234_5678,
    );
    assert_eq!(p.len(), 20 + TCP_LEN);
    let (ip, tcp) = p.split_at(20);
    // The sum over pseudo-header and segment, checksum included, is 0xffff.
    let mut pseudo = 0u32;
    for w in [&ip[12..14], &ip[14..16], &ip[16..18], &ip[18..20]] {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    pseudo += 6 + TCP_LEN as u32;
    assert_eq!(checksum(tcp, pseudo), 0);
    assert_eq!(tcp[13], SYN);
    assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 40000);
    assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 80);
}

#[test]
fn answers_are_matched_to_their_syn() {
    let from: IpAddr = "198.18.0.2".parse().unwrap();
    let mut seg = [0u8; 40];
    seg[0] = 0x45;
    let tcp = &mut seg[20..];
    tcp[0..2].copy_from_slice(&80u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&40000u16.to_be_bytes());
    tcp[8..12].copy_from_slice(&0x1234_5679u32.to_be_bytes());
    tcp[13] = SYN | ACK;
    let key = (from, 80, 40000);
    assert_eq!(
        parse(&seg, false, from, &[40000]),
        Some((key, 0x1234_5678, Answer::SynAck))
    );
    seg[33] = RST | ACK;
    assert_eq!(
        parse(&seg, false, from, &[40000]),
        Some((key, 0x1234_5678, Answer::Reset))
    );
    // Another port, a bare ACK, a SYN without ACK: not answers.
    assert_eq!(parse(&seg, false, from, &[40001]), None);
    seg[33] = ACK;
    assert_eq!(parse(&seg, false, from, &[40000]), None);
    seg[33] = SYN;
    assert_eq!(parse(&seg, false, from, &[40000]), None);
    // IPv6: no IP header; too short: nothing.
    seg[33] = SYN | ACK;
    assert_eq!(
        parse(&seg[20..], true, from, &[40000]),
        Some((key, 0x1234_5678, Answer::SynAck))
    );
    assert_eq!(parse(&seg[20..30], true, from, &[40000]), None);
}
