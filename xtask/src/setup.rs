//! `cargo xtask setup`: idempotent installation of everything a fresh machine lacks.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::run;

/// The nightly that builds the XDP object (aya-ebpf 0.2.1 and bpf-linker 0.13 with
/// LLVM 22). Keep in step with lb-ebpf/rust-toolchain.toml and lb-agent/build.rs.
pub const NIGHTLY: &str = "nightly-2026-05-19";
const LLVM_SO: &str = "libLLVM.so.22.1-rust-1.97.0-nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages used by the tests and the demo.
const APT_PACKAGES: &[&str] = &[
    "bpftool",
    "tcpdump",
    "iputils-ping",
    "ethtool",
    "iproute2",
    "util-linux",
    "procps",
    "nftables",
    "fonts-dejavu-core",
    "prometheus",
    // Routing daemons for the high-availability labs (tests/tests/ha.rs).
    "bird2",
    "keepalived",
    // systemd-analyze, for the unit check in tests/tests/ops_docs.rs.
    "systemd",
];

pub fn setup() -> Result<()> {
    nightly()?;
    bpf_linker()?;
    apt()?;
    eprintln!("xtask: setup complete");
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly() -> Result<()> {
    let sysroot = output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--print", "sysroot"]));
    let has_src = sysroot
        .as_deref()
        .map(|s| PathBuf::from(s.trim()).join("lib/rustlib/src/rust/library/core").exists())
        .unwrap_or(false);
    if has_src {
        return Ok(());
    }
    run(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal", "-c", "rust-src"]))
}

pub fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"))
}

fn bpf_linker() -> Result<()> {
    let installed = output(Command::new("bpf-linker").arg("--version"))
        .or_else(|| output(Command::new(cargo_home().join("bin/bpf-linker")).arg("--version")));
    if installed.is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    // bpf-linker links against the nightly's own LLVM: a prefix whose lib/ points
    // into the nightly sysroot. It stays under the cargo home: the linker keeps a
    // RUNPATH to it.
    let sysroot = output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))
        .context("the pinned nightly is not installed")?;
    let so = PathBuf::from(sysroot.trim()).join("lib").join(LLVM_SO);
    if !so.exists() {
        bail!("{} is missing: the nightly's LLVM changed, update LLVM_SO in xtask/src/setup.rs", so.display());
    }
    let prefix = cargo_home().join("lb-llvm");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    for name in ["libLLVM.so", LLVM_SO] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&so, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", "llvm-22", "--force"])
        .env("LLVM_PREFIX", &prefix))
}

fn apt() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}
