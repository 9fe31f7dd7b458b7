use std::{
    net::IpAddr,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use tokio::sync::{mpsc, watch};

use super::*;
use crate::status::{BackendStatus, ProbeStatus, ServiceStatus, Status};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!("lb-control-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn sock(&self) -> PathBuf {
        self.0.join("lb-agent.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn backend(address: &str, weight: u32, health: &str) -> BackendStatus {
    BackendStatus {
        address: Some(ip(address)),
        weight,
        config_weight: weight,
        health: health.into(),
        ..Default::default()
    }
}

fn sample_status() -> Status {
    let mut drained = backend("198.18.0.12", 0, "up");
    drained.drained = true;
    drained.config_weight = 3;
    drained.inactive_conns = 4;
    drained.packets_per_sec = 12.4;
    drained.bytes_per_sec = 9_876.0;
    let mut up = backend("198.18.0.11", 1, "up");
    up.active_conns = 1234;
    up.inactive_conns = 7;
    up.packets_per_sec = 1_500.0;
    up.bytes_per_sec = 1_240_000.0;
    up.mac = Some("02:00:00:00:00:11".into());
    up.probe = Some(ProbeStatus { kind: "http".into(), last_latency_secs: Some(0.0012), successes: 10, failures: 1 });
    let mut backup = backend("198.18.0.13", 2, "down");
    backup.backup = true;
    let mut unresolved = backend("198.18.0.14", 1, "unresolved");
    unresolved.address = Some(ip("198.18.0.14"));
    let web = ServiceStatus {
        name: "web".into(),
        vip: Some(ip("198.18.1.10")),
        port: 80,
        protocol: "tcp".into(),
        scheduler: "maglev".into(),
        table_size: 65537,
        on_all_down: "backup".into(),
        packets_per_sec: 1_512.4,
        bytes_per_sec: 1_259_876.0,
        backends: vec![up, drained, backup, unresolved],
        ..Default::default()
    };
    let mut v6b = backend("2001:db8::11", 5, "up");
    v6b.packets_per_sec = 2_500_000.0;
    v6b.bytes_per_sec = 3_200_000_000.0;
    let dns = ServiceStatus {
        name: "dns6".into(),
        vip: Some(ip("2001:db8::10")),
        port: 53,
        protocol: "udp".into(),
        scheduler: "maglev".into(),
        using_backups: true,
        packets_per_sec: 2_500_000.0,
        bytes_per_sec: 3_200_000_000.0,
        backends: vec![v6b],
        ..Default::default()
    };
    let any = ServiceStatus {
        name: "any".into(),
        vip: Some(ip("198.18.1.20")),
        port: 0,
        protocol: "tcp".into(),
        scheduler: "maglev".into(),
        backends: vec![backend("198.18.0.21", 1, "up")],
        ..Default::default()
    };
    Status {
        iface: "eth0".into(),
        attach_mode: "native".into(),
        pin_dir: "/sys/fs/bpf/lb".into(),
        config_path: "/etc/lb/lb.yaml".into(),
        uptime_secs: 3723,
        reloads_ok: 2,
        reloads_failed: 1,
        outcomes: vec![("forwarded".into(), 42), ("pass_not_ip".into(), 0), ("drop_no_backend".into(), 3)],
        conntrack: Default::default(),
        services: vec![web, dns, any],
        announce: None,
    }
}

/// Answers calls like an agent would: Status with `status`, Drain/Undrain with Done.
fn spawn_agent(status: Status) -> (mpsc::Sender<Call>, tokio::task::JoinHandle<Vec<Request>>) {
    let (tx, mut rx) = mpsc::channel::<Call>(8);
    let agent = tokio::spawn(async move {
        let mut seen = vec![];
        while let Some(call) = rx.recv().await {
            let response = match &call.request {
                // As the agent answers: encoded from its status, not a copy.
                Request::Status => encode_status(&status),
                Request::StatusOf(filter) => Response::Status(filter.select(&status)),
                Request::StatusText { filter, json } => status_text(&status, filter, *json),
                Request::Drain { backend, .. } => Response::Done { message: format!("drained {backend}") },
                Request::Undrain { backend, .. } => Response::Error { message: format!("{backend} is not drained") },
                Request::Reload => Response::Done { message: "reload applied: no change".into() },
                Request::Trace(_) => {
                    // Started; two packets; then the trace ends (as --count does).
                    let out = call.stream.clone().expect("a trace call carries its stream");
                    tokio::spawn(async move {
                        for port in [1000, 1001] {
                            let line = crate::trace::TraceLine { client_port: port, ..Default::default() };
                            let _ = out.send(Response::TraceLine(line)).await;
                        }
                    });
                    Response::Done { message: "tracing every packet".into() }
                }
                Request::TraceStop => Response::Done { message: "trace stopped".into() },
            };
            seen.push(call.request);
            let _ = call.reply.send(response);
        }
        seen
    });
    (tx, agent)
}

async fn blocking_call(path: &Path, request: Request) -> Result<Response, ControlError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || call(&path, &request)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_round_trip() {
    let dir = TempDir::new();
    let path = dir.sock();
    let status = sample_status();
    let (calls, agent) = spawn_agent(status.clone());
    let (stop, shutdown) = watch::channel(false);
    let server = tokio::spawn({
        let path = path.clone();
        async move { serve(&path, calls, shutdown).await }
    });
    // Wait for the socket to appear.
    for _ in 0..200 {
        if path.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    assert_eq!(blocking_call(&path, Request::Status).await.unwrap(), Response::Status(status.clone()));
    let drain = Request::Drain { backend: ip("198.18.0.11"), service: Some("web".into()) };
    assert_eq!(blocking_call(&path, drain.clone()).await.unwrap(), Response::Done { message: "drained 198.18.0.11".into() });
    let undrain = Request::Undrain { backend: ip("2001:db8::11"), service: None };
    assert_eq!(
        blocking_call(&path, undrain.clone()).await.unwrap(),
        Response::Error { message: "2001:db8::11 is not drained".into() }
    );

    // What `lb-agent status` prints, rendered by the agent and copied as it came.
    let text = |filter: crate::status::StatusFilter, json: bool| {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            call_text(&path, &Request::StatusText { filter, json }, &mut out).map(|answer| (answer, out))
        })
    };
    let (answer, table) = text(Default::default(), false).await.unwrap().unwrap();
    assert_eq!((answer, String::from_utf8(table).unwrap()), (None, render_table(&status) + "\n"));
    let (answer, pretty) = text(Default::default(), true).await.unwrap().unwrap();
    assert_eq!((answer, String::from_utf8(pretty).unwrap()), (None, render_json(&status) + "\n"));
    let one = crate::status::StatusFilter { services: vec!["dns6".into()], ..Default::default() };
    let (_, pretty) = text(one.clone(), true).await.unwrap().unwrap();
    assert_eq!(String::from_utf8(pretty).unwrap(), render_json(&one.select(&status)) + "\n");
    let missing = crate::status::StatusFilter { services: vec!["nope".into()], ..Default::default() };
    let (answer, out) = text(missing, false).await.unwrap().unwrap();
    assert_eq!((answer, out), (Some(Response::Error { message: "no service named nope".into() }), vec![]));

    // Several clients at once.
    let many: Vec<_> = (0..8).map(|_| tokio::spawn(blocking_call_owned(path.clone()))).collect();
    for h in many {
        assert!(matches!(h.await.unwrap(), Ok(Response::Status(_))));
    }

    stop.send(true).unwrap();
    server.await.unwrap().unwrap();
    assert!(!path.exists(), "socket file removed at shutdown");
    let seen = agent.await.unwrap();
    assert_eq!(&seen[..3], &[Request::Status, drain, undrain]);
    assert_eq!(seen.len(), 15);
    assert!(matches!(blocking_call(&path, Request::Status).await, Err(ControlError::NotRunning { .. })));
}

async fn blocking_call_owned(path: PathBuf) -> Result<Response, ControlError> {
    blocking_call(&path, Request::Status).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_streams_lines_until_the_agent_ends_it() {
    let dir = TempDir::new();
    let path = dir.sock();
    let (calls, agent) = spawn_agent(sample_status());
    let (stop, shutdown) = watch::channel(false);
    let server = tokio::spawn({
        let path = path.clone();
        async move { serve(&path, calls, shutdown).await }
    });
    for _ in 0..200 {
        if path.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let lines = tokio::task::spawn_blocking({
        let path = path.clone();
        move || {
            use std::io::{BufRead, Write};
            let mut c = std::os::unix::net::UnixStream::connect(&path).unwrap();
            c.write_all(b"{\"cmd\":\"trace\",\"client\":\"198.51.100.7\"}\n").unwrap();
            std::io::BufReader::new(c).lines().map(|l| l.unwrap()).collect::<Vec<String>>()
        }
    })
    .await
    .unwrap();
    let parsed: Vec<Response> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(parsed[0], Response::Done { message: "tracing every packet".into() }, "{lines:?}");
    let ports: Vec<u16> = parsed[1..]
        .iter()
        .map(|r| match r {
            Response::TraceLine(l) => l.client_port,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ports, [1000, 1001]);
    stop.send(true).unwrap();
    server.await.unwrap().unwrap();
    let seen = agent.await.unwrap();
    // The connection told the agent its trace ended.
    assert!(matches!(seen.as_slice(), [Request::Trace(r), Request::TraceStop] if r.client.as_deref() == Some("198.51.100.7")), "{seen:?}");
}

#[tokio::test]
async fn control_invalid_request_gets_error_line() {
    let dir = TempDir::new();
    let path = dir.sock();
    let listener = bind(&path).unwrap();
    let (calls, _agent) = spawn_agent(Status::default());
    let (_stop, shutdown) = watch::channel(false);
    tokio::spawn(run(listener, calls, shutdown));
    let answer = tokio::task::spawn_blocking({
        let path = path.clone();
        move || {
            use std::io::{BufRead, BufReader, Write};
            let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
            s.write_all(b"{\"cmd\":\"reboot\"}\n").unwrap();
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).unwrap();
            line
        }
    })
    .await
    .unwrap();
    assert!(answer.ends_with('\n'));
    match serde_json::from_str::<Response>(&answer).unwrap() {
        Response::Error { message } => assert!(message.contains("invalid request") && message.contains("reboot"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn control_socket_mode_is_0600_and_owned_by_us() {
    let dir = TempDir::new();
    let path = dir.sock();
    let listener = bind(&path).unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(meta.uid(), unsafe { libc::geteuid() });
    // No temporary name left behind.
    let names: Vec<_> = std::fs::read_dir(&dir.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("lb-agent.sock")]);
    drop(listener);
    assert!(!path.exists(), "dropping an unused listener removes the file");
}

#[tokio::test]
async fn control_stale_socket_is_replaced_live_one_refused() {
    let dir = TempDir::new();
    let path = dir.sock();
    // A socket file with nobody listening, as a killed agent leaves it.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    assert!(matches!(call(&path, &Request::Status), Err(ControlError::Stale { .. })));

    let first = bind(&path).expect("stale socket replaced");
    let (calls, _agent) = spawn_agent(Status::default());
    let (stop, shutdown) = watch::channel(false);
    let server = tokio::spawn(run(first, calls, shutdown));

    let err = bind(&path).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    assert!(err.to_string().contains("another lb-agent is already listening"), "{err}");
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    // The first agent still answers: the failed bind removed nothing.
    assert!(matches!(blocking_call(&path, Request::Status).await, Ok(Response::Status(_))));

    stop.send(true).unwrap();
    server.await.unwrap().unwrap();
    assert!(!path.exists());
}

#[test]
fn control_bind_refuses_to_replace_a_regular_file() {
    let dir = TempDir::new();
    let path = dir.sock();
    std::fs::write(&path, "not a socket").unwrap();
    let err = bind(&path).unwrap_err();
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
}

#[test]
fn control_error_messages() {
    let p = Path::new("/run/lb-agent.sock");
    let e = |kind| map_io_error(p, std::io::Error::from(kind)).to_string();
    assert_eq!(e(std::io::ErrorKind::PermissionDenied), "permission denied on /run/lb-agent.sock: run as root");
    assert_eq!(
        map_io_error(p, std::io::Error::from_raw_os_error(libc::EACCES)).to_string(),
        "permission denied on /run/lb-agent.sock: run as root"
    );
    assert_eq!(
        map_io_error(p, std::io::Error::from_raw_os_error(libc::EPERM)).to_string(),
        "permission denied on /run/lb-agent.sock: run as root"
    );
    assert_eq!(e(std::io::ErrorKind::NotFound), "the agent is not running: no control socket at /run/lb-agent.sock");
    assert!(e(std::io::ErrorKind::ConnectionRefused).starts_with("the agent is not running"));
    assert_eq!(e(std::io::ErrorKind::WouldBlock), "the agent did not answer on /run/lb-agent.sock within 5 s");
    assert_eq!(e(std::io::ErrorKind::TimedOut), "the agent did not answer on /run/lb-agent.sock within 5 s");

    // A real missing socket.
    let dir = TempDir::new();
    let err = call(&dir.sock(), &Request::Status).unwrap_err();
    assert!(matches!(err, ControlError::NotRunning { .. }));
    assert!(err.to_string().contains(&dir.sock().display().to_string()));
}

#[test]
fn control_client_times_out() {
    let dir = TempDir::new();
    let path = dir.sock();
    // Listens but never answers.
    let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let t = std::time::Instant::now();
    let err = call_with_timeout(&path, &Request::Status, Duration::from_millis(200)).unwrap_err();
    assert!(matches!(err, ControlError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("within 0.2 s"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_server_times_out_a_silent_agent_and_client() {
    let dir = TempDir::new();
    let path = dir.sock();
    let listener = bind(&path).unwrap();
    // An event loop that holds calls without answering.
    let (calls, mut rx) = mpsc::channel::<Call>(8);
    let hold = tokio::spawn(async move {
        let mut held = vec![];
        while let Some(c) = rx.recv().await {
            held.push(c);
        }
    });
    let (stop, shutdown) = watch::channel(false);
    let server = tokio::spawn(run_with_timeout(listener, calls, shutdown, Duration::from_millis(300)));

    let answer = tokio::task::spawn_blocking({
        let path = path.clone();
        move || call_with_timeout(&path, &Request::Status, Duration::from_secs(3))
    })
    .await
    .unwrap()
    .unwrap();
    match answer {
        Response::Error { message } => assert!(message.contains("did not answer within 0.3 s"), "{message}"),
        other => panic!("{other:?}"),
    }

    // A client that connects and says nothing is disconnected.
    let eof = tokio::task::spawn_blocking({
        let path = path.clone();
        move || {
            use std::io::Read;
            let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut buf = vec![];
            s.read_to_end(&mut buf).map(|_| buf)
        }
    })
    .await
    .unwrap()
    .unwrap();
    assert!(eof.is_empty());

    stop.send(true).unwrap();
    server.await.unwrap().unwrap();
    hold.abort();
}

#[test]
fn control_json_round_trip() {
    let requests = [
        Request::Status,
        Request::Drain { backend: ip("198.18.0.11"), service: Some("web".into()) },
        Request::Drain { backend: ip("2001:db8::11"), service: None },
        Request::Undrain { backend: ip("198.18.0.11"), service: None },
    ];
    for r in &requests {
        let text = serde_json::to_string(r).unwrap();
        assert!(!text.contains('\n'));
        assert_eq!(&serde_json::from_str::<Request>(&text).unwrap(), r);
    }
    assert_eq!(serde_json::to_string(&Request::Status).unwrap(), r#"{"cmd":"status"}"#);
    assert_eq!(
        serde_json::from_str::<Request>(r#"{"cmd":"drain","backend":"198.18.0.11"}"#).unwrap(),
        Request::Drain { backend: ip("198.18.0.11"), service: None }
    );
    assert_eq!(
        serde_json::from_str::<Request>(r#"{"cmd":"undrain","backend":"2001:db8::11","service":"dns6"}"#).unwrap(),
        Request::Undrain { backend: ip("2001:db8::11"), service: Some("dns6".into()) }
    );

    let responses = [
        Response::Status(sample_status()),
        Response::Status(Status::default()),
        Response::Done { message: "drained 198.18.0.11 in web (the file still says weight 3)".into() },
        Response::Error { message: "no backend 198.18.0.99".into() },
    ];
    for r in &responses {
        let text = serde_json::to_string(r).unwrap();
        assert!(!text.contains('\n'));
        assert_eq!(&serde_json::from_str::<Response>(&text).unwrap(), r);
    }
    assert_eq!(serde_json::to_string(&responses[3]).unwrap(), r#"{"result":"error","message":"no backend 198.18.0.99"}"#);
    assert!(serde_json::to_string(&responses[0]).unwrap().starts_with(r#"{"result":"status","iface":"eth0""#));

    // render_json is the pretty form of the same status.
    let pretty = render_json(&sample_status());
    assert!(pretty.contains("\n  \"iface\": \"eth0\""));
    assert_eq!(serde_json::from_str::<Status>(&pretty).unwrap(), sample_status());
}

#[test]
fn control_render_table() {
    let table = render_table(&sample_status());
    print!("{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0],
        "lb-agent on eth0 (native XDP), up 1h 2m 3s, reloads 2 ok, 1 failed, config /etc/lb/lb.yaml"
    );
    let expected = "\
Prot LocalAddress:Port Scheduler (Name)  Weight  Health      ActiveConn  InActConn  Pkts/s  Bytes/s
  -> RemoteAddress:Port
TCP  198.18.1.10:80 maglev (web)                                   1234         11    1.5K     1.3M
  -> 198.18.0.11:80                           1  up                1234          7    1.5K     1.2M
  -> 198.18.0.12:80                           0  up                   0          4      12     9.9K  drained (file: 3)
  -> 198.18.0.13:80                           2  down                 0          0       0        0  backup
  -> 198.18.0.14:80                           1  unresolved           0          0       0        0
UDP  [2001:db8::10]:53 maglev (dns6)                                  0          0    2.5M     3.2G  backups serving
  -> [2001:db8::11]:53                        5  up                   0          0    2.5M     3.2G
TCP  198.18.1.20:* maglev (any)                                       0          0       0        0
  -> 198.18.0.21:*                            1  up                   0          0       0        0
outcomes: forwarded=42 drop_no_backend=3
";
    assert_eq!(lines[1..].join("\n") + "\n", expected);

    // Columns line up: every row's numeric columns end at the same offsets.
    let ends = |line: &str| line.find("  drained").or(line.find("  backup")).unwrap_or(line.len());
    let first = ends(lines[3]);
    for l in &lines[1..lines.len() - 1] {
        if !l.starts_with("  -> RemoteAddress") {
            assert_eq!(ends(l), first, "{l:?}");
        }
    }
}

#[test]
fn control_render_empty_and_units() {
    let table = render_table(&Status::default());
    assert!(table.starts_with("lb-agent on ? (unknown XDP), up 0s, reloads 0 ok, 0 failed\n"), "{table}");
    assert!(table.contains("(no services)"));
    assert_eq!(human_rate(0.0), "0");
    assert_eq!(human_rate(999.4), "999");
    assert_eq!(human_rate(999.6), "1.0K");
    assert_eq!(human_rate(12_345.0), "12.3K");
    assert_eq!(human_rate(999_960.0), "1.0M");
    assert_eq!(human_rate(4.2e9), "4.2G");
    assert_eq!(human_rate(f64::NAN), "-");
    assert_eq!(human_duration(59), "59s");
    assert_eq!(human_duration(61), "1m 1s");
    assert_eq!(human_duration(7207), "2h 0m 7s");
    assert_eq!(human_duration(3 * 86400 + 4 * 3600 + 5 * 60 + 6), "3d 4h 5m");
}
