//! End to end: a real server (namespace `rs`) running `lb-agent decap`, started by
//! `lb-realserver.sh up-tunnel` (LB_DECAP=xdp, native mode), its VIPs on `lo` and a
//! UDP server bound to them; a sender namespace (`lb`, in the balancer's place)
//! writes GUE and IPIP frames to it through an AF_PACKET socket, from client
//! addresses it also carries, so the server's plain (unencapsulated) replies,
//! routed back by the real server's default route, reach a socket there.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use lb_common::decap_stat as ds;
use lb_tests::{
    flood::{parse_mac, Injector},
    lab::{agent_bin, realserver_script},
    netns::{self, ns_sh, sh},
    traffic::{self, Server},
    tunnel::{gue, inner_udp, ipip},
};

const LB4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const RS4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
const RS6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
const GUE_PORT: u16 = 6080;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The two namespaces, the real server's UDP servers and its decapsulator; all
/// stopped and removed on drop.
struct TunnelLab {
    id: String,
    lb: String,
    rs: String,
    dir: PathBuf,
    servers: Vec<Server>,
    up: bool,
}

impl TunnelLab {
    fn new() -> TunnelLab {
        netns::require_root();
        let id = format!("dc{}x{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst));
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir).expect("lab temp dir");
        let lab = TunnelLab { lb: format!("{id}-lb"), rs: format!("{id}-rs"), id, dir, servers: Vec::new(), up: false };
        for ns in [&lab.lb, &lab.rs] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            sh(&["ip", "netns", "add", ns]);
            ns_sh(ns, &["ip", "link", "set", "lo", "up"]);
        }
        sh(&["ip", "link", "add", "eth0", "netns", &lab.lb, "type", "veth", "peer", "name", "eth0", "netns", &lab.rs]);
        for (ns, v4, v6) in [(&lab.lb, LB4, LB6), (&lab.rs, RS4, RS6)] {
            ns_sh(ns, &["sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0"]);
            ns_sh(ns, &["ip", "addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
            ns_sh(ns, &["ip", "addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
            ns_sh(ns, &["ip", "link", "set", "eth0", "up"]);
        }
        // The clients live on the sender; the real server reaches them by its
        // default route, not through any tunnel.
        ns_sh(&lab.lb, &["ip", "addr", "add", &format!("{CLIENT4}/32"), "dev", "eth0"]);
        ns_sh(&lab.lb, &["ip", "addr", "add", &format!("{CLIENT6}/128"), "dev", "eth0", "nodad"]);
        ns_sh(&lab.rs, &["ip", "route", "add", "default", "via", &LB4.to_string()]);
        ns_sh(&lab.rs, &["ip", "-6", "route", "add", "default", "via", &LB6.to_string()]);
        lab
    }

    fn pin_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(format!("{}-decap", self.id))
    }

    /// `lb-realserver.sh up-tunnel|down-tunnel eth0 VIP4 VIP6` in the real server's
    /// namespace (through nsenter: the agent pins on the host's bpffs).
    fn script(&self, action: &str) -> std::process::Output {
        let args = format!("--xdp-mode native --gue-port {GUE_PORT} --pin-dir {}", self.pin_dir().display());
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.rs))
            .arg("--")
            .arg("bash")
            .arg(realserver_script())
            .args([action, "eth0", &VIP4.to_string(), &VIP6.to_string()])
            .env("LB_DECAP", "xdp")
            .env("LB_AGENT", agent_bin())
            .env("LB_DECAP_ARGS", args)
            .env("LB_DECAP_RUN", &self.dir)
            .env("NO_COLOR", "1")
            .output()
            .expect("run lb-realserver.sh");
        assert!(
            out.status.success(),
            "lb-realserver.sh {action} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn up(&mut self) {
        self.up = true;
        self.script("up-tunnel");
        let udp = [SocketAddr::new(IpAddr::V4(VIP4), 53), SocketAddr::new(IpAddr::V6(VIP6), 53)];
        self.servers = traffic::udp_server(&self.rs, &udp, "rs1");
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("lb-decap-eth0.log")).unwrap_or_default()
    }

    fn rs_mac(&self) -> [u8; 6] {
        let out = ns_sh(&self.rs, &["cat", "/sys/class/net/eth0/address"]);
        parse_mac(String::from_utf8_lossy(&out.stdout).trim())
    }
}

impl Drop for TunnelLab {
    fn drop(&mut self) {
        self.servers.clear();
        if self.up {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.script("down-tunnel")));
            // Whatever happened above, the agent must not outlive the lab.
            let pid = std::fs::read_to_string(self.dir.join("lb-decap-eth0.pid"));
            if let Some(pid) = pid.ok().and_then(|p| p.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2); the pid is the agent the script started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for ns in [&self.lb, &self.rs] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = std::fs::remove_dir_all(self.pin_dir());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends `frame` (a tunnelled request from `client`:`sport`) from the sender and
/// returns the reply that socket gets, trying three times.
fn ask(lab: &TunnelLab, what: &str, client: IpAddr, sport: u16, frame: Vec<u8>, rs_mac: [u8; 6]) -> (String, SocketAddr) {
    netns::run_in(&lab.lb, {
        let what = what.to_string();
        move || {
            let sock = UdpSocket::bind(SocketAddr::new(client, sport)).expect("bind the client socket");
            sock.set_read_timeout(Some(Duration::from_secs(1))).expect("timeout");
            let inj = Injector::open("eth0", rs_mac);
            let mut buf = [0u8; 1500];
            for _ in 0..3 {
                let mut f = frame.clone();
                assert!(inj.send(&mut f), "{what}: the kernel refused the frame");
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    return (String::from_utf8_lossy(&buf[..n]).into_owned(), from);
                }
            }
            panic!("{what}: no reply within 3 s")
        }
    })
}

fn wait_for(mut ok: impl FnMut() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(std::time::Instant::now() < deadline, "waited 5 s for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn real_server_answers_gue_and_ipip_requests_to_its_vip() {
    let mut lab = TunnelLab::new();
    lab.up();
    let log = lab.agent_log();
    assert!(log.contains("decapsulator attached") && log.contains("mode=native"), "agent log:\n{log}");
    let link = String::from_utf8_lossy(&ns_sh(&lab.rs, &["ip", "link", "show", "eth0"]).stdout).into_owned();
    assert!(link.contains("xdp"), "no XDP program on the real server's eth0:\n{link}");
    let rp = ns_sh(&lab.rs, &["sysctl", "-n", "net.ipv4.conf.eth0.rp_filter", "net.ipv4.conf.all.rp_filter"]);
    assert_eq!(String::from_utf8_lossy(&rp.stdout).split_whitespace().collect::<Vec<_>>(), ["2", "2"], "rp_filter");

    let mac = lab.rs_mac();
    let (c4, c6, v4, v6) = (IpAddr::V4(CLIENT4), IpAddr::V6(CLIENT6), IpAddr::V4(VIP4), IpAddr::V6(VIP6));
    let (lb4, lb6, rs4, rs6) = (IpAddr::V4(LB4), IpAddr::V6(LB6), IpAddr::V4(RS4), IpAddr::V6(RS6));
    let cases = [
        ("gue, ipv4 in ipv4", c4, v4, 40001, gue(None, lb4, rs4, 50001, GUE_PORT, &inner_udp(c4, v4, 40001, 53, b"q"))),
        ("ipip", c4, v4, 40002, ipip(None, lb4, rs4, &inner_udp(c4, v4, 40002, 53, b"q"))),
        ("gue, ipv6 in ipv6", c6, v6, 40003, gue(None, lb6, rs6, 50003, GUE_PORT, &inner_udp(c6, v6, 40003, 53, b"q"))),
        ("ip6ip6", c6, v6, 40004, ipip(None, lb6, rs6, &inner_udp(c6, v6, 40004, 53, b"q"))),
        ("gue, ipv4 in ipv6", c4, v4, 40005, gue(None, lb6, rs6, 50005, GUE_PORT, &inner_udp(c4, v4, 40005, 53, b"q"))),
    ];
    for (what, client, vip, sport, frame) in cases {
        let (answer, from) = ask(&lab, what, client, sport, frame, mac);
        assert_eq!(answer, "rs1", "{what}: reply");
        assert_eq!(from, SocketAddr::new(vip, 53), "{what}: the reply comes from the VIP, unencapsulated");
    }

    // An address added to the interface while the agent runs is decapsulated for
    // within a second or so (rtnetlink address events); a removed one no longer is.
    let extra = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 111));
    ns_sh(&lab.rs, &["ip", "addr", "add", "198.18.0.111/24", "dev", "eth0"]);
    wait_for(|| lab.agent_log().contains("198.18.0.111"), "the agent to log the new address");
    let frame = ipip(None, lb4, extra, &inner_udp(c4, v4, 40006, 53, b"q"));
    let (answer, _) = ask(&lab, "ipip to an added address", c4, 40006, frame, mac);
    assert_eq!(answer, "rs1", "ipip to an added address");
    ns_sh(&lab.rs, &["ip", "addr", "del", "198.18.0.111/24", "dev", "eth0"]);
    wait_for(|| lab.agent_log().matches("addresses changed").count() >= 2, "the agent to log the removal");
    let before = lb_agent::decap::read_pinned_stats(&lab.pin_dir()).expect("DECAP_STATS")[ds::PASS_NOT_LOCAL as usize];
    netns::run_in(&lab.lb, move || {
        let mut f = ipip(None, lb4, extra, &inner_udp(c4, v4, 40007, 53, b"q"));
        assert!(Injector::open("eth0", mac).send(&mut f), "send to the removed address");
    });
    wait_for(
        || lb_agent::decap::read_pinned_stats(&lab.pin_dir()).expect("DECAP_STATS")[ds::PASS_NOT_LOCAL as usize] > before,
        "pass_not_local to count the frame to the removed address",
    );

    let stats = lb_agent::decap::read_pinned_stats(&lab.pin_dir()).expect("read the pinned DECAP_STATS");
    for (counter, at_least) in [(ds::DECAP_GUE, 3), (ds::DECAP_IPIP, 1), (ds::DECAP_IP6IP6, 1)] {
        assert!(stats[counter as usize] >= at_least, "{} = {} (all: {stats:?})", ds::NAMES[counter as usize], stats[counter as usize]);
    }
    assert_eq!(stats[ds::DROP_MALFORMED as usize], 0, "nothing malformed was sent: {stats:?}");
    // The replies and everything else the real server received passed untouched.
    assert!(stats[ds::PASS_NOT_TUNNEL as usize] + stats[ds::PASS_NOT_IP as usize] > 0, "{stats:?}");

    // The --stats mode reads the same pins.
    let out = Command::new(agent_bin()).args(["decap", "--stats", "--pin-dir"]).arg(lab.pin_dir()).output().expect("lb-agent decap --stats");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("decap_gue"), "lb-agent decap --stats: {text}{}", String::from_utf8_lossy(&out.stderr));

    // down-tunnel stops the agent: it detaches and removes its pins.
    lab.script("down-tunnel");
    lab.up = false;
    let log = lab.agent_log();
    assert!(log.contains("SIGTERM") && log.contains("detached"), "agent log after down-tunnel:\n{log}");
    let link = String::from_utf8_lossy(&ns_sh(&lab.rs, &["ip", "link", "show", "eth0"]).stdout).into_owned();
    assert!(!link.contains("xdp"), "XDP program left on eth0 after down-tunnel:\n{link}");
    assert!(!lab.pin_dir().join("DECAP_STATS").exists(), "pins left behind");
}
