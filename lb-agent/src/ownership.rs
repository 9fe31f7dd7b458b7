//! One agent per pin directory and per interface.
//!
//! Two agents on one pin directory would both write the maps, and the one that stops
//! first would remove the pins from under the other (whose crash would then detach
//! the balancer). So `run` takes an exclusive `flock` on the pin directory itself
//! (bpffs directories take flocks like any other) before it touches anything else in
//! the kernel, and holds it until it exits. The kernel drops the lock when the
//! process ends however it ends (SIGKILL included), so adopting a balancer left
//! attached still works. A second agent is refused at once with the owner's pid and
//! command line, found in `/proc/locks` by the directory's device and inode.
//!
//! The interface is checked, not locked: an agent attaches only to an interface that
//! carries no XDP program, or whose program is the one in the link pinned in its own
//! pin directory (the balancer it adopts). Anything else (another agent's balancer
//! from another pin directory, a program attached by another tool) is refused and
//! named, before anything is loaded.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use aya::programs::links::{FdLink, PinnedLink};

use crate::{neigh::Interface, pinning::PinDir};

#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error(
        "pin directory {dir} is in use by another lb-agent ({owner}); stop it first (a crashed or \
         --keep-on-exit agent leaves no lock, and its balancer is adopted), or give this agent another --pin-dir"
    )]
    Owned { dir: PathBuf, owner: String },
    #[error("locking the pin directory {dir}: {source}")]
    Lock { dir: PathBuf, source: io::Error },
    #[error(
        "interface {iface} already carries XDP program {prog}, which is not the balancer pinned under \
         {dir}: another lb-agent (with another --pin-dir) or another tool attached it; stop its owner or \
         detach it (ip link set dev {iface} xdp off) first"
    )]
    ForeignProgram { iface: String, prog: String, dir: PathBuf },
    #[error(
        "the XDP link pinned at {link} (program {link_prog}) is not on interface {iface}, which carries {found}: \
         it belongs to another interface, or its interface went away; run with the --iface it was made for, \
         or remove {dir} to start afresh"
    )]
    LinkElsewhere { link: PathBuf, link_prog: u32, iface: String, found: String, dir: PathBuf },
    #[error("reading the XDP link pinned at {link}: {error}")]
    Link { link: PathBuf, error: String },
}

/// The lock on a pin directory, held while this value lives (the agent's life).
#[derive(Debug)]
pub struct PinDirLock {
    /// The open directory carrying the flock (close-on-exec, so probes' children do
    /// not inherit it).
    _file: File,
    dir: PathBuf,
}

impl Drop for PinDirLock {
    fn drop(&mut self) {
        // An agent that failed before pinning anything leaves no empty directory
        // behind; one holding pins (--keep-on-exit) is not empty and stays.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Takes the pin directory `dir` (creating it if needed) for this process, or says
/// who holds it. Never waits.
pub fn lock_pin_dir(dir: &Path) -> Result<PinDirLock, OwnershipError> {
    let io_err = |source| OwnershipError::Lock { dir: dir.to_path_buf(), source };
    // The owner removes the directory when it stops: if that happens between our
    // open and our lock, we hold a lock on a directory that is gone; look again.
    for _ in 0..8 {
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let file = match File::open(dir) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(e)),
        };
        // SAFETY: flock(2) on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let meta = file.metadata().map_err(io_err)?;
                return Err(OwnershipError::Owned { dir: dir.to_path_buf(), owner: describe_holder(meta.dev(), meta.ino()) });
            }
            return Err(io_err(e));
        }
        let held = file.metadata().map_err(io_err)?;
        match std::fs::metadata(dir) {
            Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => return Ok(PinDirLock { _file: file, dir: dir.to_path_buf() }),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(e)),
        }
    }
    Err(io_err(io::Error::other("the directory keeps being removed and created again")))
}

/// "pid 1234: lb-agent run --iface eth0 ...", from /proc/locks and /proc/PID/cmdline.
fn describe_holder(dev: u64, ino: u64) -> String {
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    match flock_holder(&locks, libc::major(dev), libc::minor(dev), ino) {
        Some(pid) => match std::fs::read(format!("/proc/{pid}/cmdline")) {
            Ok(cmd) if !cmd.is_empty() => format!("pid {pid}: {}", command_line(&cmd)),
            _ => format!("pid {pid}"),
        },
        None => "its pid is not in /proc/locks (another pid namespace?)".into(),
    }
}

/// The pid holding a FLOCK on the inode `major:minor:ino` in a /proc/locks text
/// (`1: FLOCK  ADVISORY  WRITE 1234 00:28:55626 0 EOF`; device in hex, inode in
/// decimal). Waiters (`1: -> FLOCK ...`) are skipped.
pub fn flock_holder(locks: &str, major: u32, minor: u32, ino: u64) -> Option<i32> {
    let wanted = format!("{major:02x}:{minor:02x}:{ino}");
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, "FLOCK", _, _, pid, id, ..] if *id == wanted => pid.parse().ok().filter(|p| *p > 0),
            _ => None,
        }
    })
}

/// A NUL-separated /proc/PID/cmdline as one line.
fn command_line(raw: &[u8]) -> String {
    raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(String::from_utf8_lossy).collect::<Vec<_>>().join(" ")
}

/// Refuses an interface that carries an XDP program other than the balancer in
/// `pins`' pinned link, and a pinned link whose program is not on the interface.
pub fn check_interface(iface: &Interface, pins: &PinDir) -> Result<(), OwnershipError> {
    check_link(iface, pins, pins.link())
}

/// `check_interface` for the backend interface (two-arm), whose link is pinned
/// at `PinDir::backend_link`.
pub fn check_backend_interface(iface: &Interface, pins: &PinDir) -> Result<(), OwnershipError> {
    check_link(iface, pins, pins.backend_link())
}

fn check_link(iface: &Interface, pins: &PinDir, link_path: PathBuf) -> Result<(), OwnershipError> {
    let found = |id: Option<u32>| match id {
        Some(id) => format!("XDP program {}", program_name(id)),
        None => "no XDP program".into(),
    };
    if !link_path.exists() {
        return match iface.xdp_prog {
            None => Ok(()),
            Some(id) => Err(OwnershipError::ForeignProgram {
                iface: iface.name.clone(),
                prog: program_name(id),
                dir: pins.dir.clone(),
            }),
        };
    }
    let link_err = |error: String| OwnershipError::Link { link: link_path.clone(), error };
    let link = FdLink::from(PinnedLink::from_pin(&link_path).map_err(|e| link_err(e.to_string()))?);
    let link_prog = link.info().map_err(|e| link_err(e.to_string()))?.program_id();
    if iface.xdp_prog == Some(link_prog) {
        return Ok(());
    }
    Err(OwnershipError::LinkElsewhere {
        link: link_path,
        link_prog,
        iface: iface.name.clone(),
        found: found(iface.xdp_prog),
        dir: pins.dir.clone(),
    })
}

/// "42 (lb_xdp)", or the bare id when the program cannot be looked up.
fn program_name(id: u32) -> String {
    let name = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_string));
    match name {
        Some(name) if !name.is_empty() => format!("{id} ({name})"),
        _ => id.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_holder_in_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 77 00:28:55626 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 15458 00:28:55626 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 999 00:28:55626 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 12 fd:01:55626 0 EOF\n";
        assert_eq!(flock_holder(locks, 0, 0x28, 55626), Some(15458));
        assert_eq!(flock_holder(locks, 0xfd, 1, 55626), Some(12));
        assert_eq!(flock_holder(locks, 0, 0x28, 1), None);
    }

    #[test]
    fn a_second_lock_is_refused_with_the_owner_named_and_released_on_drop() {
        let dir = std::env::temp_dir().join(format!("lb-lock-test-{}", std::process::id()));
        let first = lock_pin_dir(&dir).expect("first lock");
        // flock conflicts between open file descriptions, even in one process.
        let err = lock_pin_dir(&dir).expect_err("second lock refused");
        let text = err.to_string();
        assert!(text.contains(&format!("pid {}:", std::process::id())), "{text}");
        assert!(text.contains(&dir.display().to_string()), "{text}");
        drop(first);
        let again = lock_pin_dir(&dir).expect("free again once the owner is gone");
        drop(again);
        assert!(!dir.exists(), "an empty pin directory is removed with its lock");
    }

    #[test]
    fn a_directory_removed_by_the_owner_is_created_again() {
        let dir = std::env::temp_dir().join(format!("lb-lock-gone-{}", std::process::id()));
        let held = lock_pin_dir(&dir).expect("lock");
        // The owner stops: removes the directory, then its lock goes.
        std::fs::remove_dir(&dir).unwrap();
        drop(held);
        let next = lock_pin_dir(&dir).expect("lock a new directory");
        assert!(dir.is_dir());
        std::fs::write(dir.join("pin"), b"").unwrap();
        drop(next);
        assert!(dir.is_dir(), "a directory holding pins stays");
        std::fs::remove_file(dir.join("pin")).unwrap();
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn command_lines_are_joined() {
        assert_eq!(command_line(b"lb-agent\0run\0--iface\0eth0\0"), "lb-agent run --iface eth0");
    }
}
