//! Routing daemons (BIRD, keepalived) run in the foreground inside a lab
//! namespace, killed on drop. A missing daemon fails the test with the way to
//! install it: these labs never skip.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A daemon started by a test; SIGKILLed and reaped on drop.
pub struct Daemon {
    child: Option<Child>,
    pub name: String,
    pub log: PathBuf,
}

/// Panics unless `program` is installed.
pub fn require(program: &str, package: &str) {
    let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"].iter().any(|d| Path::new(d).join(program).exists());
    assert!(found, "{program} is not installed: the HA labs need the real daemon (apt-get install {package}, or cargo xtask setup)");
}

impl Daemon {
    /// Runs `args` in namespace `ns` (through `ip netns exec`), stdout and stderr to `log`.
    pub fn start(ns: &str, name: &str, args: &[&str], log: PathBuf) -> Daemon {
        let out = std::fs::File::create(&log).expect("daemon log");
        // A process group of its own: keepalived forks its VRRP child even with
        // --dont-fork, and a kill must reach every process.
        let child = Command::new("ip")
            .process_group(0)
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} in {ns}: {e}"));
        Daemon { child: Some(child), name: name.to_string(), log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails if the daemon has exited already (a bad configuration, usually).
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            panic!("{} exited ({status}):\n{}", self.name, self.log_text());
        }
    }

    /// SIGKILL to the whole process group, as a machine dying would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the process group our own child leads.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// BIRD 2 in namespace `ns` with configuration `conf` (its control socket and
/// log next to it).
pub fn bird(ns: &str, dir: &Path, name: &str, conf: &str) -> Daemon {
    require("bird", "bird2");
    let conf_path = dir.join(format!("{name}.conf"));
    let log = dir.join(format!("{name}.log"));
    let conf = conf.replace("log syslog all;", &format!("log \"{}\" all;", dir.join(format!("{name}.bird.log")).display()));
    std::fs::write(&conf_path, conf).expect("write bird.conf");
    let sock = dir.join(format!("{name}.ctl"));
    let pid = dir.join(format!("{name}.pid"));
    let mut d = Daemon::start(
        ns,
        name,
        &["bird", "-f", "-c", path(&conf_path), "-s", path(&sock), "-P", path(&pid)],
        log,
    );
    std::thread::sleep(Duration::from_millis(200));
    d.assert_running();
    d
}

/// `birdc -s SOCKET ARGS` of a BIRD started by `bird`.
pub fn birdc(dir: &Path, name: &str, args: &[&str]) -> String {
    let sock = dir.join(format!("{name}.ctl"));
    let out = Command::new("birdc").arg("-s").arg(&sock).args(args).output().expect("run birdc");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// keepalived in namespace `ns` with configuration `conf`, in the foreground.
pub fn keepalived(ns: &str, dir: &Path, name: &str, conf: &str) -> Daemon {
    require("keepalived", "keepalived");
    let conf_path = dir.join(format!("{name}.conf"));
    std::fs::write(&conf_path, conf).expect("write keepalived.conf");
    let pids: Vec<PathBuf> = ["p", "r", "c"].iter().map(|k| dir.join(format!("{name}.{k}.pid"))).collect();
    let mut d = Daemon::start(
        ns,
        name,
        &[
            "keepalived", "--dont-fork", "--log-console", "--log-detail", "-f", path(&conf_path),
            "-p", path(&pids[0]), "-r", path(&pids[1]), "-c", path(&pids[2]),
        ],
        dir.join(format!("{name}.log")),
    );
    std::thread::sleep(Duration::from_millis(200));
    d.assert_running();
    d
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Polls `f` every 10 ms until it is true; the time it took, or a panic with
/// `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if f() {
            return start.elapsed();
        }
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
