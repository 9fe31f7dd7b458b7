//! Project tasks: `cargo xtask setup | build-ebpf | test | demo | bench`.

mod setup;

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, set-up and test tasks for the load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks: the pinned nightly with rust-src,
    /// bpf-linker built against its LLVM, and the Debian packages the tests use.
    Setup,
    /// Build the XDP object alone (target/bpfel-unknown-none/release/lb-ebpf).
    BuildEbpf,
    /// Set up, then run every test: unit, packet (BPF_PROG_TEST_RUN) and end-to-end
    /// in network namespaces (needs root), and a quick benchmark run as a smoke test.
    Test,
    /// Set up, then run the demo: a namespace lab with a client, the balancer and
    /// three HTTP backends; thousands of requests; how they spread.
    Demo,
    /// Set up, then run the benchmarks (per-packet cost through BPF_PROG_TEST_RUN,
    /// Maglev, full apply, memory) and write docs/benchmarks.md (needs root).
    Bench {
        /// Fewer repetitions and sizes; prints the tables and writes nothing.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::setup(),
        Cmd::BuildEbpf => {
            setup::setup()?;
            build_ebpf()
        }
        Cmd::Test => {
            setup::setup()?;
            test()
        }
        Cmd::Demo => {
            setup::setup()?;
            demo()
        }
        Cmd::Bench { quick } => {
            setup::setup()?;
            bench(quick)
        }
    }
}

pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root()).env("PATH", path_with_cargo_bin());
    c
}

/// PATH with the cargo home's bin first, so builds find the bpf-linker set-up installed.
fn path_with_cargo_bin() -> std::ffi::OsString {
    let mut paths = vec![setup::cargo_home().join("bin")];
    paths.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    std::env::join_paths(paths).expect("PATH entries have no separator")
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is in the workspace").to_path_buf()
}

fn build_ebpf() -> Result<()> {
    let mut c = Command::new("rustup");
    c.args(["run", setup::NIGHTLY, "cargo", "build", "--release", "-p", "lb-ebpf"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .env("CARGO_ENCODED_RUSTFLAGS", "-Cdebuginfo=2\x1f-Clink-arg=--btf")
        .current_dir(workspace_root())
        .env("PATH", path_with_cargo_bin());
    run(&mut c)?;
    eprintln!("xtask: object at target/bpfel-unknown-none/release/lb-ebpf");
    Ok(())
}

fn test() -> Result<()> {
    if !is_root() {
        bail!("the test suite attaches XDP programs and builds network namespaces: run it as root");
    }
    // Unit tests of the shared code and the agent.
    run(cargo().args(["test", "-p", "lb-common", "-p", "lb-agent"]))?;
    // The end-to-end tests start the agent binary that sits next to them.
    run(cargo().args(["build", "-p", "lb-agent"]))?;
    // Packet and end-to-end tests share kernel state: one at a time.
    run(cargo().args(["test", "-p", "lb-tests", "--", "--test-threads=1"]))?;
    // Smoke run of the benchmarks: must complete with sane figures; no thresholds.
    bench(true)
}

fn demo() -> Result<()> {
    if !is_root() {
        bail!("the demo builds network namespaces and attaches XDP: run it as root");
    }
    run(cargo().args(["build", "--release", "-p", "lb-agent"]))?;
    run(cargo().args(["run", "--release", "-p", "lb-tests", "--bin", "lb-demo"]))
}

fn bench(quick: bool) -> Result<()> {
    if !is_root() {
        bail!("the benchmarks load XDP programs and run them with BPF_PROG_TEST_RUN: run them as root");
    }
    // The failover rows start the agent binary that sits next to lb-bench, and
    // the scale part runs the real agent binary (target/release/lb-agent).
    run(cargo().args(["build", "--release", "-p", "lb-agent"]))?;
    let mut c = cargo();
    c.args(["run", "--release", "-p", "lb-tests", "--bin", "lb-bench"]);
    if quick {
        c.args(["--", "--quick"]);
    }
    run(&mut c)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
