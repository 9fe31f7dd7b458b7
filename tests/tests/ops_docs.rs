//! docs/operations.md and deploy/ cannot go stale: every bpftool recipe in the doc
//! runs against a live lab and must print what the doc says it prints; the systemd
//! unit passes `systemd-analyze verify` and its capability set is enough to run the
//! agent; the Kubernetes manifests parse and say what their README says.
//!
//! Recipe convention (docs/operations.md, "Inspecting the data plane"): a ```sh
//! block whose first line is `# test: host` or `# test: netns` is run, one command
//! per line (`host`: from the host, where the pins are; `netns`: inside the
//! balancer's network namespace, where the interface is). A `# expect: TEXT` line
//! says that the output of the command above it contains TEXT. Substitutions: the
//! lab's pin dir for `/sys/fs/bpf/lb`, the demo configuration for
//! `/etc/lb/lb.yaml`, the built agent for a leading `lb-agent`, plus the lab's
//! `--socket` (status, drain, undrain) or `--pin-dir` (stats). The interface is
//! `eth0` in the doc and in the lab.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{
    lab::{agent_bin, terminate, Lab, VIP4},
    traffic::{requests, Proto},
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn demo_config() -> PathBuf {
    root().join("deploy/examples/demo.yaml")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

const DOC_PIN_DIR: &str = "/sys/fs/bpf/lb";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Where {
    Host,
    Netns,
}

#[derive(Debug)]
struct Recipe {
    line: usize,
    place: Where,
    command: String,
    expect: Vec<String>,
}

/// Every fenced block of `doc`: (info string, first line number, lines).
fn blocks(doc: &str) -> Vec<(String, usize, Vec<String>)> {
    let mut out = Vec::new();
    let mut cur: Option<(String, usize, Vec<String>)> = None;
    for (i, line) in doc.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with("```") {
            match cur.take() {
                Some(b) => out.push(b),
                None => cur = Some((t.trim_start_matches('`').trim().to_string(), i + 2, Vec::new())),
            }
        } else if let Some((_, _, lines)) = cur.as_mut() {
            lines.push(line.to_string());
        }
    }
    assert!(cur.is_none(), "unterminated fenced block in docs/operations.md");
    out
}

/// The tested recipes, and the line numbers of bpftool commands outside them.
fn recipes(doc: &str) -> (Vec<Recipe>, Vec<usize>) {
    let (mut recipes, mut untested) = (Vec::new(), Vec::new());
    for (info, first, lines) in blocks(doc) {
        let place = match lines.first().map(|l| l.trim()) {
            Some("# test: host") if info == "sh" => Some(Where::Host),
            Some("# test: netns") if info == "sh" => Some(Where::Netns),
            Some(l) if l.starts_with("# test:") => panic!("line {first}: unknown test mode {l:?} (or not a ```sh block)"),
            _ => None,
        };
        let Some(place) = place else {
            untested.extend(
                lines.iter().enumerate().filter(|(_, l)| l.contains("bpftool ")).map(|(j, _)| first + j),
            );
            continue;
        };
        for (j, l) in lines.iter().enumerate().skip(1) {
            let t = l.trim();
            if let Some(text) = t.strip_prefix("# expect:") {
                let r: &mut Recipe = recipes.last_mut().filter(|r: &&mut Recipe| r.line > first).unwrap_or_else(|| {
                    panic!("line {}: `# expect:` before any command of its block", first + j)
                });
                r.expect.push(text.trim().to_string());
            } else if !t.is_empty() && !t.starts_with('#') {
                recipes.push(Recipe { line: first + j, place, command: t.to_string(), expect: Vec::new() });
            }
        }
    }
    (recipes, untested)
}

/// The doc's command with the lab's paths.
fn substitute(command: &str, lab: &Lab) -> String {
    let pin = lab.pin_dir();
    let mut c = command.replace(DOC_PIN_DIR, pin.to_str().unwrap());
    c = c.replace("/etc/lb/lb.yaml", demo_config().to_str().unwrap());
    if let Some(rest) = c.strip_prefix("lb-agent ") {
        let sub = rest.split_whitespace().next().unwrap_or("");
        let mut extra = String::new();
        if ["status", "drain", "undrain"].contains(&sub) && !rest.contains("--socket") {
            extra = format!(" --socket {}", lab.control_socket().display());
        }
        if (sub == "stats" || sub == "flows") && !rest.contains("--pin-dir") {
            extra = format!(" --pin-dir {}", pin.display());
        }
        c = format!("{} {rest}{extra}", agent_bin().display());
    }
    c
}

fn run_shell(place: Where, command: &str, lab: &Lab) -> (bool, String, String) {
    let mut cmd = match place {
        Where::Host => Command::new("bash"),
        Where::Netns => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{}", lab.balancer)).arg("--").arg("bash");
            c
        }
    };
    let out = cmd.arg("-c").arg(command).stdin(Stdio::null()).output().expect("run bash");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn bpftool(args: &[&str]) -> String {
    let out = Command::new("bpftool").args(args).output().expect("bpftool (Debian package bpftool) must be installed");
    assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running `lb-agent decap`, stopped on drop (even when a recipe panics).
struct Decap(std::process::Child);

impl Drop for Decap {
    fn drop(&mut self) {
        terminate(&mut self.0, Duration::from_secs(5));
    }
}

/// `lb-agent decap` on backend b1's eth0, pinned where the doc's
/// `/sys/fs/bpf/lb-decap` lands after `substitute` (the lab's pin dir + `-decap`).
fn start_decap(lab: &Lab) -> Decap {
    let log = lab.dir.join("decap.log");
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.backends[0].ns))
        .arg("--")
        .arg(agent_bin())
        .args(["decap", "--iface", "eth0", "--xdp-mode", "generic", "--pin-dir"])
        .arg(format!("{}-decap", lab.pin_dir().display()))
        .env("NO_COLOR", "1")
        .stderr(std::fs::File::create(&log).expect("decap log"))
        .spawn()
        .expect("start lb-agent decap");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("decapsulator attached") {
            return Decap(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("lb-agent decap exited ({status}):\n{text}");
        }
        assert!(Instant::now() < deadline, "lb-agent decap did not attach within 20 s:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn bpftool_recipes_in_operations_md_work() {
    let doc = read("docs/operations.md");
    let (recipes, untested) = recipes(&doc);
    assert!(untested.is_empty(), "bpftool commands outside a `# test:` block at lines {untested:?} of docs/operations.md");
    assert!(recipes.len() >= 20, "only {} recipes found: is the `# test:` convention still used?", recipes.len());
    assert!(recipes.iter().any(|r| r.place == Where::Netns), "no `# test: netns` recipe");

    let mut lab = Lab::new(3);
    lab.start_servers();
    let agent = lab.start_agent(&demo_config());
    let t = requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, 30, 2, Duration::from_secs(60));
    assert_eq!(t.failures, 0, "{:?}", t.first_errors);
    // One datagram per flow: these stay in CONNTRACK (TCP flows move to
    // CT_ESTABLISHED at their second packet).
    let t = requests(&lab.client, Proto::Udp, IpAddr::V4(VIP4), 53, 10, 1, Duration::from_secs(30));
    assert_eq!(t.failures, 0, "{:?}", t.first_errors);

    // The real-server recipes (`/sys/fs/bpf/lb-decap`, "Real servers in tunnel
    // mode") read the pins of an `lb-agent decap` on backend b1.
    let decap = start_decap(&lab);

    let mut failures = Vec::new();
    for r in &recipes {
        let command = substitute(&r.command, &lab);
        let (ok, out, err) = run_shell(r.place, &command, &lab);
        if !ok {
            failures.push(format!("line {}: `{}` failed:\n{err}{out}", r.line, r.command));
            continue;
        }
        // Compare against the output with the lab's pin dir written back as the doc's.
        let shown = out.replace(lab.pin_dir().to_str().unwrap(), DOC_PIN_DIR);
        for e in &r.expect {
            if !shown.contains(e.as_str()) {
                let head: String = shown.lines().take(40).collect::<Vec<_>>().join("\n");
                failures.push(format!("line {}: `{}` does not print {e:?}:\n{head}", r.line, r.command));
            }
        }
    }
    drop(decap);
    assert!(failures.is_empty(), "{} of {} recipes fail:\n\n{}", failures.len(), recipes.len(), failures.join("\n\n"));

    // Every map the agent pins carries BTF: key and value types, and a `formatted`
    // section in JSON output.
    let pin = lab.pin_dir();
    for (name, ..) in lb_agent::pinning::layout() {
        let path = pin.join(name);
        let path = path.to_str().unwrap();
        for part in ["key", "value"] {
            let types = bpftool(&["btf", "dump", "map", "pinned", path, part]);
            assert!(!types.trim().is_empty(), "map {name} has no BTF {part} type");
        }
        // MAGLEV and FIRST_RECORD (arrays of hundreds of thousands of slots) are
        // too large to dump: one lookup.
        let json = if name == "MAGLEV" || name == "FIRST_RECORD" {
            bpftool(&["-j", "map", "lookup", "pinned", path, "key", "hex", "00", "00", "00", "00"])
        } else {
            bpftool(&["-j", "map", "dump", "pinned", path])
        };
        let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{name}: {e}"));
        let entries: Vec<&serde_json::Value> = match &v {
            serde_json::Value::Array(a) => a.iter().collect(),
            other => vec![other],
        };
        assert!(entries.iter().all(|e| e.get("formatted").is_some()), "{name}: an entry without `formatted`: {json:.300}");
        if !["AFFINITY", "FRAGS", "PREFIX_SERVICES", "LOCALITY", "NAT_REVERSE", "FULLNAT_REVERSE", "FULLNAT_FORWARD"].contains(&name) {
            // The demo has no persistence, sends no fragments and has no prefix,
            // no nat and no fullnat service: AFFINITY, FRAGS, PREFIX_SERVICES,
            // LOCALITY, NAT_REVERSE, FULLNAT_REVERSE and FULLNAT_FORWARD are empty,
            // their BTF is checked above.
            assert!(!entries.is_empty(), "{name} is empty after traffic");
        }
        assert!(doc.contains(&format!("`{name}`")), "docs/operations.md does not mention the map {name}");
    }

    // The doc's outcome table is lb_common::stat::NAMES.
    let table: Vec<(usize, String)> = doc
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let idx = cells.get(1)?.parse::<usize>().ok()?;
            Some((idx, cells.get(2)?.trim_matches('`').to_string()))
        })
        .collect();
    let names: Vec<(usize, String)> = lb_common::stat::NAMES.iter().enumerate().map(|(i, n)| (i, n.to_string())).collect();
    assert_eq!(table, names, "the STATS index table of docs/operations.md differs from lb_common::stat::NAMES");
    drop(agent);
}

/// The unit's capability set, from `CapabilityBoundingSet=`.
fn unit_caps(unit: &str) -> Vec<String> {
    let line = unit.lines().find(|l| l.starts_with("CapabilityBoundingSet=")).expect("CapabilityBoundingSet= in the unit");
    line.trim_start_matches("CapabilityBoundingSet=").split_whitespace().map(str::to_string).collect()
}

#[test]
fn systemd_unit_verifies() {
    let unit = read("deploy/systemd/lb-agent.service");
    for needle in [
        "Type=notify",
        "ExecStart=/usr/local/bin/lb-agent run --config /etc/lb/lb.yaml --iface ${LB_IFACE} --keep-on-exit",
        "EnvironmentFile=-/etc/default/lb-agent",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "LimitMEMLOCK=infinity",
        "ProtectSystem=strict",
        "ReadWritePaths=/sys/fs/bpf /run",
    ] {
        assert!(unit.lines().any(|l| l == needle), "the unit has no line {needle:?}");
    }
    let ambient = unit.lines().find(|l| l.starts_with("AmbientCapabilities=")).expect("AmbientCapabilities=");
    assert_eq!(ambient.trim_start_matches("AmbientCapabilities=").split_whitespace().collect::<Vec<_>>(), unit_caps(&unit));

    // A copy whose commands are the built agent, so verify checks real executables.
    let dir = std::env::temp_dir().join(format!("lb-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb-agent.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/lb-agent", agent_bin().to_str().unwrap())).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd) must be installed: cargo xtask setup does");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "systemd-analyze verify failed:\n{text}");
    // verify exits 0 on unknown keys and the like, only warning: any output fails.
    assert!(text.trim().is_empty(), "systemd-analyze verify warns:\n{text}");
}

#[test]
fn the_units_capabilities_are_enough() {
    // Run the agent as root limited to the unit's bounding set (what systemd does
    // for a root service with CapabilityBoundingSet=), and forward.
    let caps = unit_caps(&read("deploy/systemd/lb-agent.service"));
    let set: String = caps.iter().map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_lowercase())).collect();
    let mut lab = Lab::new(1);
    lab.start_servers();
    // The demo configuration with tcp probes, which want raw sockets (CAP_NET_RAW).
    let demo = read("deploy/examples/demo.yaml");
    assert!(demo.contains("    protocol: tcp\n"), "the demo has tcp services");
    let config = lab.write_config(
        "capped.yaml",
        &demo.replace("    protocol: tcp\n", "    protocol: tcp\n    probe: {kind: tcp, interval: 1s}\n"),
    );
    let log = lab.dir.join("capped-agent.log");
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.balancer))
        .args(["--", "setpriv", &format!("--bounding-set=-all{set}"), "--inh-caps=-all", "--"])
        .arg(agent_bin())
        .args(["run", "--iface", "eth0", "--xdp-mode", "native", "--config"])
        .arg(&config)
        .arg("--pin-dir")
        .arg(lab.pin_dir())
        .arg("--control-socket")
        .arg(lab.control_socket())
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("nsenter and setpriv (util-linux)");
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    let result = loop {
        let t = text();
        if t.contains("open a socket each") {
            break Err(format!("the agent with only {caps:?} could not use raw sockets for tcp probes:\n{t}"));
        }
        if t.contains("attached iface") && t.contains("tcp probes send their SYNs from raw sockets") {
            break Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(format!("the agent with only {caps:?} exited ({status}):\n{}", text()));
        }
        if Instant::now() > deadline {
            break Err(format!("the agent with only {caps:?} did not attach in 30 s:\n{}", text()));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let tally = result.is_ok().then(|| requests(&lab.client, Proto::Http, IpAddr::V4(VIP4), 80, 20, 1, Duration::from_secs(30)));
    // SIGTERM detaches and removes the pins.
    terminate(&mut child, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(lab.pin_dir());
    result.unwrap_or_else(|e| panic!("{e}"));
    let tally = tally.unwrap();
    assert_eq!(tally.failures, 0, "{:?}", tally.first_errors);
}

#[test]
fn kubernetes_manifests_parse() {
    use serde_yaml::Value;
    let dir = root().join("deploy/kubernetes");
    let mut docs = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for f in files.iter().filter(|f| f.extension().is_some_and(|e| e == "yaml" || e == "yml")) {
        let text = std::fs::read_to_string(f).unwrap();
        for d in text.split("\n---").filter(|d| !d.trim().is_empty()) {
            let v: Value = serde_yaml::from_str(d).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            assert!(v.get("apiVersion").is_some() && v.get("kind").is_some(), "{}: no apiVersion/kind", f.display());
            docs.push(v);
        }
    }
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap_or_else(|| panic!("no {k} in deploy/kubernetes"));
    let cm = kind("ConfigMap");
    let ds = kind("DaemonSet");

    // The embedded configuration is valid.
    let lb_yaml = cm["data"]["lb.yaml"].as_str().expect("ConfigMap data lb.yaml");
    if let Err(e) = lb_agent::config::parse(lb_yaml, "configmap.yaml:lb.yaml") {
        panic!("the ConfigMap's lb.yaml is invalid:\n{e}");
    }

    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], Value::Bool(true));
    assert!(spec.get("nodeSelector").is_some(), "nodeSelector placeholder");
    let c = &spec["containers"][0];
    assert!(c["image"].as_str().is_some_and(|i| !i.is_empty()), "image");
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], Value::Bool(false));
    let added: Vec<String> =
        sc["capabilities"]["add"].as_sequence().expect("capabilities.add").iter().map(|v| format!("CAP_{}", v.as_str().unwrap())).collect();
    let mut unit = unit_caps(&read("deploy/systemd/lb-agent.service"));
    let mut pod = added.clone();
    unit.sort();
    pod.sort();
    assert_eq!(pod, unit, "the DaemonSet's capabilities differ from the systemd unit's");
    assert_eq!(sc["capabilities"]["drop"][0], Value::String("ALL".into()));

    let args: Vec<&str> = c["args"].as_sequence().expect("args").iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(args.first(), Some(&"run"));
    for a in ["--config=/etc/lb/lb.yaml", "--keep-on-exit", "--control-socket=/run/lb-agent/lb-agent.sock"] {
        assert!(args.contains(&a), "args lack {a}: {args:?}");
    }
    // The agent accepts them: with a configuration that does not exist it stops at
    // reading it (exit 1, before touching the kernel); a usage error would be 2.
    let missing = std::env::temp_dir().join(format!("lb-no-such-config-{}.yaml", std::process::id()));
    let config_arg = format!("--config={}", missing.display());
    let argv: Vec<&str> = args
        .iter()
        .map(|a| if a.contains("$(LB_IFACE)") { "--iface=lo" } else if a.starts_with("--config=") { config_arg.as_str() } else { a })
        .collect();
    let out = Command::new(agent_bin()).args(&argv).output().expect("run lb-agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "lb-agent {argv:?}: {err}");
    assert!(err.contains(&missing.display().to_string()), "lb-agent {argv:?}: {err}");

    let probe: Vec<&str> =
        c["readinessProbe"]["exec"]["command"].as_sequence().expect("readiness exec").iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(&probe[1..], ["status", "--socket", "/run/lb-agent/lb-agent.sock"]);

    let mounts = c["volumeMounts"].as_sequence().unwrap();
    let volumes = spec["volumes"].as_sequence().unwrap();
    let volume_of = |path: &str| {
        let m = mounts.iter().find(|m| m["mountPath"] == path).unwrap_or_else(|| panic!("no mount at {path}"));
        volumes.iter().find(|v| v["name"] == m["name"]).unwrap_or_else(|| panic!("no volume for {path}"))
    };
    assert_eq!(volume_of("/sys/fs/bpf")["hostPath"]["path"], Value::String("/sys/fs/bpf".into()));
    assert_eq!(volume_of("/run/lb-agent")["hostPath"]["path"], Value::String("/run/lb-agent".into()));
    assert_eq!(volume_of("/etc/lb")["configMap"]["name"], cm["metadata"]["name"]);

    let readme = read("deploy/kubernetes/README.md");
    assert!(readme.contains("validated only as YAML") && readme.contains("not been run on a cluster"), "README must say so");
}
