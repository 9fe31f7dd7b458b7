//! A scale-out lab: N balancer nodes behind a router that spreads the VIPs' traffic
//! over them by ECMP, learned over BGP (BIRD with BFD, the configurations of
//! deploy/bird/), and backends on the balancers' L2 segment (DR).
//!
//! ```text
//!  client ──veth── router ──┬── br0 (switch ns) ──┬── lb1 lb2 lb3  (BIRD + lb-agent)
//!  198.18.2.0/24   eth0/eth1│  198.18.0.0/24      └── b1 b2 b3     (VIPs on lo)
//! ```
//!
//! The backends answer the client directly through the router (their default
//! route). Each node runs `lb-agent --announce-table 100` in native XDP mode (the
//! switch ports facing the nodes carry `lb_pass`, every host sends full
//! checksums: see TOOLCHAIN notes in lab.rs) and BIRD exporting table 100.
//! Everything is removed on drop, even when a test panics.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{
    daemon::{self, Daemon},
    lab::{self, Agent, Backend},
    netns::{self, ns_sh, sh},
    segment::{self, Namespaces},
    traffic::{self, Server},
};

pub const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
/// A second VIP, for a service of its own.
pub const VIP4_B: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 20);
pub const ROUTER4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The table the agents announce in (as in deploy/bird/balancer.conf).
pub const ANNOUNCE_TABLE: u32 = 100;


pub fn deploy_file(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// One balancer node.
pub struct Node {
    pub ns: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    /// Its port on the switch.
    pub port: String,
    pub pin_dir: PathBuf,
    pub control_socket: PathBuf,
    pub agent: Option<Agent>,
    pub bird: Option<Daemon>,
}

pub struct EcmpLab {
    pub id: String,
    pub dir: PathBuf,
    pub client: String,
    pub router: String,
    pub switch: String,
    pub nodes: Vec<Node>,
    pub backends: Vec<Backend>,
    /// Addresses the client can send from.
    pub client_addrs: Vec<IpAddr>,
    router_bird: Option<Daemon>,
    servers: Vec<(usize, u16, Server)>,
    pass: Option<aya::Ebpf>,
    namespaces: Namespaces,
    agents_started: u32,
}

impl EcmpLab {
    /// Builds the lab (`nodes` ≤ 3 to match deploy/bird/router.conf, `backends` ≤ 9)
    /// and starts the router's BIRD.
    pub fn new(nodes: usize, backends: usize) -> EcmpLab {
        netns::require_root();
        daemon::require("bird", "bird2");
        assert!(nodes <= 3, "deploy/bird/router.conf peers with three balancers");
        let (id, dir) = crate::lab::lab_id("ec");
        let mut lab = EcmpLab {
            client: format!("{id}-cl"),
            router: format!("{id}-rt"),
            switch: format!("{id}-sw"),
            nodes: (1..=nodes)
                .map(|i| Node {
                    ns: format!("{id}-lb{i}"),
                    v4: Ipv4Addr::new(198, 18, 0, 1 + i as u8),
                    v6: Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1 + i as u16),
                    port: format!("p-lb{i}"),
                    pin_dir: PathBuf::from("/sys/fs/bpf").join(format!("{id}-lb{i}")),
                    control_socket: dir.join(format!("ctl-lb{i}.sock")),
                    agent: None,
                    bird: None,
                })
                .collect(),
            backends: (1..=backends).map(|i| Backend::on_segment(&id, i)).collect(),
            client_addrs: Vec::new(),
            id,
            dir,
            router_bird: None,
            servers: Vec::new(),
            pass: None,
            namespaces: Namespaces::default(),
            agents_started: 0,
        };
        lab.build();
        lab
    }

    fn build(&mut self) {
        let (switch, client, router) = (self.switch.clone(), self.client.clone(), self.router.clone());
        self.namespaces.add_switch(&switch);

        // Client <-> router, a point-to-point link of its own.
        self.namespaces.add(&client);
        self.namespaces.add(&router);
        sh(&["ip", "link", "add", "eth0", "netns", &client, "type", "veth", "peer", "name", "eth0", "netns", &router]);
        segment::addresses(&client, "eth0", "198.18.2.2/24", "2001:db8:2::2/64");
        segment::addresses(&router, "eth0", "198.18.2.1/24", "2001:db8:2::1/64");
        ns_sh(&client, &["ip", "route", "add", "default", "via", "198.18.2.1"]);
        ns_sh(&client, &["ip", "-6", "route", "add", "default", "via", "2001:db8:2::1"]);
        for k in 0..30u8 {
            let a = Ipv4Addr::new(198, 18, 2, 100 + k);
            ns_sh(&client, &["ip", "addr", "add", &format!("{a}/24"), "dev", "eth0"]);
            self.client_addrs.push(IpAddr::V4(a));
        }

        // The router: forwards, hashes ECMP on ports (deploy/bird/router.conf).
        segment::plug(&switch, &router, "eth1", "p-rt", ROUTER4, ROUTER6);
        for s in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.fib_multipath_hash_policy=1",
            "net.ipv6.fib_multipath_hash_policy=1",
        ] {
            ns_sh(&router, &["sysctl", "-qw", s]);
        }

        for i in 0..self.nodes.len() {
            let (ns, port, v4, v6) = (self.nodes[i].ns.clone(), self.nodes[i].port.clone(), self.nodes[i].v4, self.nodes[i].v6);
            self.namespaces.add(&ns);
            segment::plug_balancer(&switch, &ns, &port, v4, v6);
        }

        let script = lab::realserver_script();
        let script = script.to_str().expect("utf-8 path");
        for i in 0..self.backends.len() {
            let (ns, v4, v6) = (self.backends[i].ns.clone(), self.backends[i].v4, self.backends[i].v6);
            self.namespaces.add(&ns);
            segment::plug(&switch, &ns, "eth0", &format!("p-b{}", i + 1), v4, v6);
            ns_sh(&ns, &["bash", script, "up", &VIP4.to_string(), &VIP6.to_string(), &VIP4_B.to_string()]);
            ns_sh(&ns, &["ip", "route", "add", "default", "via", &ROUTER4.to_string()]);
            ns_sh(&ns, &["ip", "-6", "route", "add", "default", "via", &ROUTER6.to_string()]);
        }
        self.pass = Some(segment::pass_on_ports(&switch, self.nodes.iter().map(|n| n.port.clone()).collect()));
        self.router_bird = Some(daemon::bird(&router, &self.dir, "bird-router", &deploy_file("bird/router.conf")));
    }

    /// Node `i`'s BIRD configuration: deploy/bird/balancer.conf with its addresses.
    pub fn node_bird_conf(&self, i: usize) -> String {
        let n = &self.nodes[i];
        deploy_file("bird/balancer.conf")
            .replace("198.18.0.2", &n.v4.to_string())
            .replace("local 2001:db8::2 ", &format!("local {} ", n.v6))
    }

    pub fn start_bird(&mut self, i: usize) {
        let conf = self.node_bird_conf(i);
        let ns = self.nodes[i].ns.clone();
        self.nodes[i].bird = Some(daemon::bird(&ns, &self.dir, &format!("bird-lb{}", i + 1), &conf));
    }

    /// Starts node `i`'s agent (native mode, announcing in `ANNOUNCE_TABLE`).
    pub fn start_agent(&mut self, i: usize, config: &Path) {
        self.agents_started += 1;
        let n = &self.nodes[i];
        let log = self.dir.join(format!("agent-lb{}-{}.log", i + 1, self.agents_started));
        let args: Vec<String> = [
            "--iface", "eth0", "--xdp-mode", "native", "--metrics-listen", "off", "--withdraw-wait-secs", "1",
            "--announce-table",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            ANNOUNCE_TABLE.to_string(),
            "--config".into(),
            config.display().to_string(),
            "--control-socket".into(),
            n.control_socket.display().to_string(),
        ])
        .collect();
        let agent = lab::spawn_agent(&n.ns, &args, n.pin_dir.clone(), log, &[]);
        self.nodes[i].agent = Some(agent);
    }

    /// A node dies hard: its link goes down first (no goodbye reaches the router),
    /// then its agent and BIRD are killed.
    pub fn kill_node(&mut self, i: usize) {
        ns_sh(&self.switch, &["ip", "link", "set", &self.nodes[i].port, "down"]);
        ns_sh(&self.nodes[i].ns, &["ip", "link", "set", "eth0", "down"]);
        if let Some(a) = self.nodes[i].agent.as_mut() {
            a.kill();
        }
        if let Some(b) = self.nodes[i].bird.as_mut() {
            b.kill();
        }
    }

    /// Next hops of the router's route to `vip` (0: no route).
    pub fn nexthops(&self, vip: IpAddr) -> usize {
        let family = if vip.is_ipv4() { "-4" } else { "-6" };
        let prefix = if vip.is_ipv4() { format!("{vip}/32") } else { format!("{vip}/128") };
        let out = ns_sh(&self.router, &["ip", family, "route", "show", "exact", &prefix]);
        let text = String::from_utf8_lossy(&out.stdout);
        let multi = text.lines().filter(|l| l.trim_start().starts_with("nexthop")).count();
        if multi > 0 {
            multi
        } else {
            text.lines().filter(|l| l.contains(" via ")).count()
        }
    }

    /// Waits until the router's route to `vip` has `n` next hops; how long it took.
    pub fn wait_nexthops(&self, vip: IpAddr, n: usize, timeout: Duration) -> Duration {
        let start = std::time::Instant::now();
        loop {
            if self.nexthops(vip) == n {
                return start.elapsed();
            }
            if start.elapsed() > timeout {
                panic!(
                    "the router's route to {vip} did not get {n} next hops within {timeout:?} (has {}):\n{}\n{}",
                    self.nexthops(vip),
                    daemon::birdc(&self.dir, "bird-router", &["show", "protocols"]),
                    daemon::birdc(&self.dir, "bird-router", &["show", "route", "all"]),
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The VIPs node `i` announces (its routes in `ANNOUNCE_TABLE`).
    pub fn announced(&self, i: usize) -> BTreeSet<IpAddr> {
        let mut out = BTreeSet::new();
        for family in ["-4", "-6"] {
            let o = ns_sh(&self.nodes[i].ns, &["ip", family, "route", "show", "table", &ANNOUNCE_TABLE.to_string()]);
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                if let Some(a) = line.split_whitespace().nth(1).and_then(|a| a.parse().ok()) {
                    out.insert(a);
                }
            }
        }
        out
    }

    /// `lb-agent status` of node `i`.
    pub fn status_text(&self, i: usize) -> String {
        let out = Command::new(lab::agent_bin())
            .args(["status", "--socket"])
            .arg(&self.nodes[i].control_socket)
            .output()
            .expect("run lb-agent status");
        assert!(out.status.success(), "lb-agent status of lb{}: {}", i + 1, String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts an HTTP server on `port` on backend `i` (answering its name).
    pub fn start_http(&mut self, i: usize, port: u16) {
        let b = &self.backends[i];
        self.servers.push((i, port, traffic::http_server(&b.ns, port, &b.name)));
    }

    pub fn stop_server(&mut self, i: usize, port: u16) {
        self.servers.retain(|(j, p, _)| !(*j == i && *p == port));
    }

    /// HTTP on port 80 and an echo server on `lab::ECHO_PORT` on every backend.
    pub fn start_servers(&mut self) {
        for i in 0..self.backends.len() {
            self.start_http(i, 80);
            let b = &self.backends[i];
            self.servers.push((i, lab::ECHO_PORT, traffic::echo_server(&b.ns, lab::ECHO_PORT, &b.name)));
        }
    }

    pub fn write_config(&self, name: &str, yaml: &str) -> PathBuf {
        let path = self.dir.join(name);
        // Write then rename, so a running agent never reads half a file.
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml).expect("write config");
        std::fs::rename(&tmp, &path).expect("rename config");
        path
    }

    /// Node `i`'s counters, from its pinned maps.
    pub fn stats(&self, i: usize) -> lb_agent::dataplane::Stats {
        lb_agent::dataplane::Stats::read_pinned(&self.nodes[i].pin_dir)
            .unwrap_or_else(|e| panic!("reading lb{}'s counters: {e:#}", i + 1))
    }

    pub fn bird_state(&self, i: usize) -> String {
        let name = format!("bird-lb{}", i + 1);
        daemon::birdc(&self.dir, &name, &["show", "protocols"]) + &daemon::birdc(&self.dir, &name, &["show", "bfd", "sessions"])
    }
}

impl Drop for EcmpLab {
    fn drop(&mut self) {
        // Agents and daemons first (each agent withdraws and detaches), then servers.
        for n in &mut self.nodes {
            n.agent = None;
            n.bird = None;
        }
        self.router_bird = None;
        self.servers.clear();
        self.pass = None;
        self.namespaces = Namespaces::default();
        for n in &self.nodes {
            let _ = std::fs::remove_dir_all(&n.pin_dir);
        }
        if std::env::var_os("LB_TEST_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// What a node's agent wrote into its pinned maps, in a canonical text: every
/// service with its active Maglev table, every backend id in use. Two nodes given
/// the same file must give the same text.
pub fn pinned_tables(pin_dir: &Path) -> String {
    use aya::maps::{Array, HashMap, Map, MapData};
    use lb_common::{map_names as names, Backend as B, Service, VipKey};
    let open = |name: &str| MapData::from_pin(pin_dir.join(name)).unwrap_or_else(|e| panic!("{}/{name}: {e}", pin_dir.display()));
    let services: HashMap<_, VipKey, Service> = HashMap::try_from(Map::HashMap(open(names::SERVICES))).expect("SERVICES");
    let backends: Array<_, B> = Array::try_from(Map::Array(open(names::BACKENDS))).expect("BACKENDS");
    let maglev: Array<_, u64> = Array::try_from(Map::Array(open(names::MAGLEV))).expect("MAGLEV");
    let mut lines: Vec<String> = Vec::new();
    let mut ids = BTreeSet::new();
    for entry in services.iter() {
        let (k, s) = entry.expect("SERVICES entry");
        // Words of the table (`lb_common::table`), read element by element.
        let table = lb_agent::maglev_map::decode(s.table_size, |w| {
            let (element, shift) = lb_common::table::element_of(s.table_offset + w);
            (maglev.get(&element, 0).expect("MAGLEV element") >> shift) as u32
        });
        ids.extend(table.iter().copied());
        lines.push(format!("service {k:?} id {} size {} flags {} table {table:?}", s.id, s.table_size, s.flags));
    }
    lines.sort();
    for id in ids {
        let b = backends.get(&id, 0).expect("BACKENDS entry");
        lines.push(format!("backend {id} {b:?}"));
    }
    lines.join("\n")
}
