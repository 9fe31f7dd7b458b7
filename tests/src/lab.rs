//! A namespace lab in LVS-DR shape: one client, the balancer and three backends on
//! one L2 segment (a bridge in a namespace of its own), backends carrying the VIPs
//! on `lo` with arp_ignore/arp_announce set, the client routing the VIPs via the
//! balancer. Everything lives in namespaces the lab creates, removed on drop (even
//! when a test panics).

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::{
    netns::{self, ns_sh, sh},
    traffic::{self, Server},
};

pub const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
pub const BALANCER4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const BALANCER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

/// One backend host.
pub struct Backend {
    pub ns: String,
    /// What its servers answer: `b1`, `b2`, ...
    pub name: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl Backend {
    /// Backend `i` (from 1) of a lab's shared segment: 198.18.0.(10+i) and
    /// 2001:db8::(0x10+i), in namespace `{id}-b{i}`.
    pub fn on_segment(id: &str, i: usize) -> Backend {
        Backend {
            ns: format!("{id}-b{i}"),
            name: format!("b{i}"),
            v4: Ipv4Addr::new(198, 18, 0, 10 + i as u8),
            v6: Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10 + i as u16),
        }
    }
}

/// A lab's id (`{prefix}{pid}x{seq}`: unique across tests and processes, the
/// prefix of its namespaces' names) and its fresh temporary directory.
pub fn lab_id(prefix: &str) -> (String, PathBuf) {
    let id = format!("{prefix}{}x{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst));
    let dir = std::env::temp_dir().join(&id);
    std::fs::create_dir_all(&dir).expect("lab temp dir");
    (id, dir)
}

/// Writes `yaml` to `dir/name` the way editors do (write, then rename), so an
/// agent never reads half a file; returns the path.
pub fn write_config_in(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, yaml).expect("write config");
    std::fs::rename(&tmp, &path).expect("rename config");
    path
}

/// Where the agent of lab `id` pins its maps (unique per lab).
pub fn pin_dir_of(id: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf").join(id)
}

pub struct Lab {
    pub id: String,
    pub client: String,
    pub balancer: String,
    pub switch: String,
    pub backends: Vec<Backend>,
    /// The switch port facing the balancer (in `switch`).
    pub balancer_port: String,
    pub dir: PathBuf,
    /// Keeps `lb_pass` attached to the switch port facing the balancer.
    pass: Option<aya::Ebpf>,
    /// Running servers: (backend index, kind, server).
    servers: Vec<(usize, &'static str, Server)>,
    namespaces: Vec<String>,
}

/// Port of the echo service (long-lived connections) on every backend.
pub const ECHO_PORT: u16 = 7000;

static SEQ: AtomicU32 = AtomicU32::new(0);
static AGENTS: AtomicU32 = AtomicU32::new(0);

/// Path of the real-server set-up script shipped in deploy/.
pub fn realserver_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/realserver/lb-realserver.sh")
}

impl Lab {
    /// Builds the lab with `n` backends (at most 9).
    pub fn new(n: usize) -> Lab {
        netns::require_root();
        let (id, dir) = lab_id("lb");
        let mut lab = Lab {
            client: format!("{id}-cl"),
            balancer: format!("{id}-lb"),
            switch: format!("{id}-sw"),
            backends: (1..=n).map(|i| Backend::on_segment(&id, i)).collect(),
            balancer_port: "p-lb".into(),
            id,
            dir,
            pass: None,
            servers: Vec::new(),
            namespaces: Vec::new(),
        };
        lab.build();
        lab
    }

    fn add_ns(&mut self, ns: &str) {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
        sh(&["ip", "netns", "add", ns]);
        self.namespaces.push(ns.to_string());
        ns_sh(ns, &["ip", "link", "set", "lo", "up"]);
    }

    /// A host namespace with `eth0` plugged into the switch as `port`.
    fn add_host(&mut self, ns: &str, port: &str, v4: Ipv4Addr, v6: Ipv6Addr) {
        self.add_ns(ns);
        sh(&["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", &self.switch]);
        ns_sh(&self.switch, &["ip", "link", "set", port, "master", "br0", "up"]);
        ns_sh(ns, &["sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0"]);
        ns_sh(ns, &["ip", "addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
        ns_sh(ns, &["ip", "addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
        ns_sh(ns, &["ip", "link", "set", "eth0", "up"]);
        // Lab-only: veth leaves TCP/UDP checksums to "offload", and that metadata does
        // not survive native XDP_TX, so senders must put full checksums on the wire.
        ns_sh(ns, &["ethtool", "-K", "eth0", "tx", "off"]);
    }

    fn build(&mut self) {
        let switch = self.switch.clone();
        self.add_ns(&switch);
        ns_sh(&switch, &["ip", "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"]);
        ns_sh(&switch, &["ip", "link", "set", "br0", "up"]);

        let (client, balancer) = (self.client.clone(), self.balancer.clone());
        self.add_host(&client, "p-cl", CLIENT4, CLIENT6);
        ns_sh(&client, &["ip", "route", "add", &format!("{VIP4}/32"), "via", &BALANCER4.to_string()]);
        ns_sh(&client, &["ip", "-6", "route", "add", &format!("{VIP6}/128"), "via", &BALANCER6.to_string()]);

        self.add_host(&balancer, "p-lb", BALANCER4, BALANCER6);
        // The balancer must not answer for the VIPs itself; with no route to them
        // and forwarding off, a frame XDP passes up is simply dropped by the stack.
        ns_sh(&balancer, &["sysctl", "-qw", "net.ipv4.ip_forward=0"]);

        let script = realserver_script();
        let script = script.to_str().expect("utf-8 path");
        for i in 0..self.backends.len() {
            let (ns, v4, v6) = (self.backends[i].ns.clone(), self.backends[i].v4, self.backends[i].v6);
            self.add_host(&ns, &format!("p-b{}", i + 1), v4, v6);
            ns_sh(&ns, &["bash", script, "up", &VIP4.to_string(), &VIP6.to_string()]);
        }
        self.attach_pass_program();
    }

    /// Native XDP_TX on a veth needs an XDP program on the receiving end: attach
    /// `lb_pass` to the switch port facing the balancer.
    fn attach_pass_program(&mut self) {
        let port = self.balancer_port.clone();
        let ebpf = netns::run_in(&self.switch, move || {
            let mut ebpf = aya::Ebpf::load(lb_agent::object::OBJECT).expect("load the XDP object");
            let prog: &mut aya::programs::Xdp = ebpf
                .program_mut(lb_common::PROG_PASS)
                .expect("lb_pass in the object")
                .try_into()
                .expect("lb_pass is XDP");
            prog.load().expect("load lb_pass");
            prog.attach(&port, aya::programs::XdpMode::Driver).expect("attach lb_pass to the switch port");
            ebpf
        });
        self.pass = Some(ebpf);
    }

    /// Starts on every backend an HTTP server on port 80, a UDP server on port 53
    /// (bound to both VIPs) and an echo server on `ECHO_PORT`; each answers with
    /// the backend's name.
    pub fn start_servers(&mut self) {
        for i in 0..self.backends.len() {
            self.start_http(i);
            let b = &self.backends[i];
            let udp = [SocketAddr::new(IpAddr::V4(VIP4), 53), SocketAddr::new(IpAddr::V6(VIP6), 53)];
            for s in traffic::udp_server(&b.ns, &udp, &b.name) {
                self.servers.push((i, "udp", s));
            }
            self.start_echo(i);
        }
    }

    /// Starts backend `i`'s HTTP server (port 80).
    pub fn start_http(&mut self, i: usize) {
        let b = &self.backends[i];
        self.servers.push((i, "http", traffic::http_server(&b.ns, 80, &b.name)));
    }

    /// Starts backend `i`'s echo server (`ECHO_PORT`).
    pub fn start_echo(&mut self, i: usize) {
        let b = &self.backends[i];
        self.servers.push((i, "echo", traffic::echo_server(&b.ns, ECHO_PORT, &b.name)));
    }

    /// Stops backend `i`'s HTTP server: its port 80 refuses connections.
    pub fn stop_http(&mut self, i: usize) {
        self.servers.retain(|(j, kind, _)| !(*j == i && *kind == "http"));
    }

    /// Stops accepting on backend `i`'s echo port (open connections stay served).
    pub fn stop_echo(&mut self, i: usize) {
        self.servers.retain(|(j, kind, _)| !(*j == i && *kind == "echo"));
    }

    /// Adds `n` more addresses (198.18.0.100 and up) to the client and returns them.
    pub fn add_client_addresses(&self, n: u8) -> Vec<IpAddr> {
        (0..n)
            .map(|k| {
                let a = Ipv4Addr::new(198, 18, 0, 100 + k);
                ns_sh(&self.client, &["ip", "addr", "add", &format!("{a}/24"), "dev", "eth0"]);
                IpAddr::V4(a)
            })
            .collect()
    }

    /// Writes a configuration file into the lab's directory.
    pub fn write_config(&self, name: &str, yaml: &str) -> PathBuf {
        write_config_in(&self.dir, name, yaml)
    }

    /// The agent's control socket (unique per lab).
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("ctl.sock")
    }

    /// Where a test's agent pins its maps (unique per lab).
    pub fn pin_dir(&self) -> PathBuf {
        pin_dir_of(&self.id)
    }

    /// Starts `lb-agent run` in the balancer namespace (through nsenter, so it sees
    /// the host's bpffs) on `eth0` in native mode, and waits until it has attached.
    pub fn start_agent(&self, config: &Path) -> Agent {
        self.start_agent_with(config, &[])
    }

    /// `start_agent` with more `lb-agent run` arguments. Waits for the line that
    /// says the balancer is in place: "attached", or "replaced the program" when it
    /// adopts one an earlier agent left attached.
    pub fn start_agent_with(&self, config: &Path, extra: &[&str]) -> Agent {
        self.start_agent_full(config, extra, &[])
    }

    /// `start_agent` with more environment variables for the agent.
    pub fn start_agent_env(&self, config: &Path, env: &[(&str, &str)]) -> Agent {
        self.start_agent_full(config, &[], env)
    }

    fn start_agent_full(&self, config: &Path, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        let n = AGENTS.fetch_add(1, Ordering::SeqCst);
        let log = self.dir.join(format!("agent-{n}.log"));
        let mut args: Vec<String> = ["--iface", "eth0", "--xdp-mode", "native", "--config"].map(String::from).into();
        args.push(config.display().to_string());
        args.push("--control-socket".into());
        args.push(self.control_socket().display().to_string());
        args.extend(extra.iter().map(|a| a.to_string()));
        spawn_agent(&self.balancer, &args, self.pin_dir(), log, env)
    }
}

/// Starts `lb-agent run ARGS... --pin-dir PIN_DIR` in namespace `ns` (through
/// nsenter, so it sees the host's bpffs), logging to `log`, and waits for the line
/// that says the balancer is in place: "attached", or "replaced the program" when
/// it adopts one an earlier agent left attached.
pub fn spawn_agent(ns: &str, args: &[String], pin_dir: PathBuf, log: PathBuf, env: &[(&str, &str)]) -> Agent {
    let bin = agent_bin();
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(&bin)
        .arg("run")
        .args(args)
        .arg("--pin-dir")
        .arg(&pin_dir)
        .env("LB_LOG", std::env::var("LB_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()))
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("agent log"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let mut agent = Agent { child: Some(child), log, pin_dir, cleanup: true };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = agent.log_text();
        if text.contains("attached iface") || text.contains("replaced the program") {
            return agent;
        }
        if let Some(status) = agent.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            panic!("lb-agent exited ({status}) before attaching:\n{}", agent.log_text());
        }
        assert!(Instant::now() < deadline, "lb-agent did not attach within 30 s:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.servers.clear();
        self.pass = None;
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The lb-agent binary next to the running test or demo binary (cargo puts both in
/// target/<profile>/; `cargo xtask test` builds it first).
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LB_AGENT_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("lb-agent");
    assert!(bin.exists(), "{} not found: build it first (cargo build -p lb-agent; cargo xtask test does)", bin.display());
    bin
}

/// A running agent: SIGTERM on drop (then SIGKILL if it hangs), and its pins
/// removed unless it was killed on purpose (another agent adopts them).
pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
    pub pin_dir: PathBuf,
    cleanup: bool,
}

impl Agent {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The agent's pid (nsenter execs it, so it is the child's).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// SIGKILL, as a crash would: the balancer stays attached from its pins.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("agent running");
        let _ = child.kill();
        let _ = child.wait();
        self.cleanup = false;
    }

    /// Stops with SIGTERM but keeps the pins for the next agent (run with
    /// `--keep-on-exit`).
    pub fn stop_keeping(&mut self) -> (std::process::ExitStatus, String) {
        self.cleanup = false;
        self.stop()
    }

    /// Sends SIGHUP (reload).
    pub fn hup(&self) {
        let child = self.child.as_ref().expect("agent running");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    }

    /// Waits until the log holds more than `already` lines containing `needle`;
    /// returns the new count. Panics with the log after `timeout`.
    pub fn wait_log(&self, needle: &str, already: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.count_log(needle);
            if n > already {
                return n;
            }
            assert!(Instant::now() < deadline, "no new log line with {needle:?} within {timeout:?}:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Lines of the log containing `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log_text().lines().filter(|l| l.contains(needle)).count()
    }

    /// Stops the agent with SIGTERM and returns its exit status and log.
    pub fn stop(&mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().expect("agent already stopped");
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("wait for lb-agent") {
                return (status, self.log_text());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let status = child.wait().expect("wait for lb-agent");
                panic!("lb-agent ignored SIGTERM for 10 s ({status}):\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(5));
        }
        if self.cleanup {
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
    }
}

/// Stops a child process: SIGTERM, up to `grace` to exit, then SIGKILL; reaps it.
pub fn terminate(child: &mut Child, grace: Duration) {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A tcpdump capture inside a namespace, written to a file.
pub struct Capture {
    child: Option<Child>,
    pub file: PathBuf,
}

impl Capture {
    pub fn start(ns: &str, iface: &str, file: PathBuf) -> Capture {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "tcpdump", "-i", iface, "-n", "-U", "--immediate-mode", "-w"])
            .arg(&file)
            .arg("ip or ip6")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tcpdump");
        let mut err = BufReader::new(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        let _ = err.read_line(&mut line);
        assert!(line.contains("listening"), "tcpdump did not start: {line}");
        Capture { child: Some(child), file }
    }

    /// Stops the capture (SIGINT so it flushes).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let _ = c.wait();
        }
    }

    /// Packets in the capture that match a tcpdump filter.
    pub fn count(&self, filter: &str) -> usize {
        self.lines(filter).len()
    }

    /// tcpdump's one-line summaries of the packets that match a filter.
    pub fn lines(&self, filter: &str) -> Vec<String> {
        let out = sh(&["tcpdump", "-r", self.file.to_str().expect("utf-8"), "-n", filter]);
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
    }
}
