//! An active/backup pair: two balancers running lb-agent and keepalived
//! (deploy/keepalived/keepalived.conf), a client and backends on one L2 segment.
//! The master holds the VIP on its eth0 and answers ARP for it; the client reaches
//! the VIP on-link. Everything is removed on drop, even when a test panics.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    daemon::{self, Daemon},
    ecmp::{deploy_file, VIP4, VIP6},
    lab::{self, Agent, Backend},
    netns::{self, ns_sh},
    segment::{self, Namespaces},
    traffic::{self, Server},
};


pub struct Peer {
    pub ns: String,
    pub port: String,
    pub pin_dir: PathBuf,
    pub control_socket: PathBuf,
    pub agent: Option<Agent>,
    pub keepalived: Option<Daemon>,
}

pub struct VrrpLab {
    pub dir: PathBuf,
    pub client: String,
    pub switch: String,
    /// [0] the master (priority 150), [1] the backup (100).
    pub peers: Vec<Peer>,
    pub backends: Vec<Backend>,
    servers: Vec<Server>,
    pass: Option<aya::Ebpf>,
    namespaces: Namespaces,
}

impl VrrpLab {
    pub fn new(backends: usize) -> VrrpLab {
        netns::require_root();
        daemon::require("keepalived", "keepalived");
        let (id, dir) = crate::lab::lab_id("vr");
        let mut lab = VrrpLab {
            client: format!("{id}-cl"),
            switch: format!("{id}-sw"),
            peers: (1..=2)
                .map(|i| Peer {
                    ns: format!("{id}-lb{i}"),
                    port: format!("p-lb{i}"),
                    pin_dir: PathBuf::from("/sys/fs/bpf").join(format!("{id}-lb{i}")),
                    control_socket: dir.join(format!("ctl-lb{i}.sock")),
                    agent: None,
                    keepalived: None,
                })
                .collect(),
            backends: (1..=backends).map(|i| Backend::on_segment(&id, i)).collect(),
            dir,
            servers: Vec::new(),
            pass: None,
            namespaces: Namespaces::default(),
        };
        lab.build();
        lab
    }

    fn build(&mut self) {
        let (switch, client) = (self.switch.clone(), self.client.clone());
        self.namespaces.add_switch(&switch);
        self.namespaces.add(&client);
        segment::plug(&switch, &client, "eth0", "p-cl", lab::CLIENT4, lab::CLIENT6);
        // The VIP is on-link: the client ARPs for it and the master answers.
        ns_sh(&client, &["ip", "route", "add", &format!("{VIP4}/32"), "dev", "eth0"]);
        ns_sh(&client, &["ip", "-6", "route", "add", &format!("{VIP6}/128"), "dev", "eth0"]);
        for (i, p) in self.peers.iter().enumerate() {
            self.namespaces.add(&p.ns);
            let v4 = Ipv4Addr::new(198, 18, 0, 3 + i as u8);
            let v6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 3 + i as u16);
            segment::plug_balancer(&switch, &p.ns, &p.port, v4, v6);
        }
        let script = lab::realserver_script();
        let script = script.to_str().expect("utf-8 path");
        for (i, b) in self.backends.iter().enumerate() {
            self.namespaces.add(&b.ns);
            segment::plug(&switch, &b.ns, "eth0", &format!("p-b{}", i + 1), b.v4, b.v6);
            ns_sh(&b.ns, &["bash", script, "up", &VIP4.to_string(), &VIP6.to_string()]);
        }
        self.pass = Some(segment::pass_on_ports(&switch, self.peers.iter().map(|p| p.port.clone()).collect()));
    }

    /// HTTP on port 80 and an echo server on `lab::ECHO_PORT` on every backend.
    pub fn start_servers(&mut self) {
        for b in &self.backends {
            self.servers.push(traffic::http_server(&b.ns, 80, &b.name));
            self.servers.push(traffic::echo_server(&b.ns, lab::ECHO_PORT, &b.name));
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

    pub fn start_agent(&mut self, i: usize, config: &Path) {
        let p = &self.peers[i];
        let args: Vec<String> = ["--iface", "eth0", "--xdp-mode", "native", "--metrics-listen", "off", "--config"]
            .iter()
            .map(|s| s.to_string())
            .chain([config.display().to_string(), "--control-socket".into(), p.control_socket.display().to_string()])
            .collect();
        let log = self.dir.join(format!("agent-lb{}.log", i + 1));
        self.peers[i].agent = Some(lab::spawn_agent(&p.ns, &args, p.pin_dir.clone(), log, &[]));
    }

    /// Peer `i`'s keepalived configuration: deploy/keepalived/keepalived.conf with
    /// this lab's agent binary and control socket (and the backup's priority).
    pub fn keepalived_conf(&self, i: usize) -> String {
        let p = &self.peers[i];
        let conf = deploy_file("keepalived/keepalived.conf")
            .replace("/usr/local/bin/lb-agent", &lab::agent_bin().display().to_string())
            .replace("/run/lb-agent.sock", &p.control_socket.display().to_string())
            .replace("router_id lb1", &format!("router_id lb{}", i + 1));
        if i == 0 { conf } else { conf.replace("priority 150", "priority 100") }
    }

    pub fn start_keepalived(&mut self, i: usize) {
        let conf = self.keepalived_conf(i);
        let ns = self.peers[i].ns.clone();
        self.peers[i].keepalived = Some(daemon::keepalived(&ns, &self.dir, &format!("keepalived-lb{}", i + 1), &conf));
    }

    /// Whether peer `i` holds the VIP on its eth0.
    pub fn holds_vip(&self, i: usize) -> bool {
        let out = ns_sh(&self.peers[i].ns, &["ip", "-4", "addr", "show", "dev", "eth0"]);
        String::from_utf8_lossy(&out.stdout).contains(&format!("{VIP4}/32"))
    }

    /// Waits until peer `i` holds the VIP (and the other does not).
    pub fn wait_master(&self, i: usize, timeout: Duration) -> Duration {
        let start = std::time::Instant::now();
        loop {
            if self.holds_vip(i) && !self.holds_vip(1 - i) {
                return start.elapsed();
            }
            if start.elapsed() > timeout {
                let logs: Vec<String> = self.peers.iter().filter_map(|p| p.keepalived.as_ref().map(|k| k.log_text())).collect();
                panic!("lb{} did not become the only VIP holder within {timeout:?}:\n{}", i + 1, logs.join("\n----\n"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Peer `i` dies hard: link down first, then its agent and keepalived killed.
    pub fn kill_peer(&mut self, i: usize) {
        ns_sh(&self.switch, &["ip", "link", "set", &self.peers[i].port, "down"]);
        ns_sh(&self.peers[i].ns, &["ip", "link", "set", "eth0", "down"]);
        if let Some(a) = self.peers[i].agent.as_mut() {
            a.kill();
        }
        if let Some(k) = self.peers[i].keepalived.as_mut() {
            k.kill();
        }
    }
}

impl Drop for VrrpLab {
    fn drop(&mut self) {
        for p in &mut self.peers {
            p.keepalived = None;
            p.agent = None;
        }
        self.servers.clear();
        self.pass = None;
        self.namespaces = Namespaces::default();
        for p in &self.peers {
            let _ = std::fs::remove_dir_all(&p.pin_dir);
        }
        if std::env::var_os("LB_TEST_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
