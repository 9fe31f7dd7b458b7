//! Builds the XDP object from the current `lb-ebpf` (and `lb-common`) sources, so
//! the agent can never embed a stale program. Needs the pinned nightly and
//! bpf-linker: `cargo xtask setup` installs both.

fn main() -> anyhow::Result<()> {
    // lb-common is compiled into the object too; aya-build only watches lb-ebpf.
    println!("cargo:rerun-if-changed=../lb-common/src");
    aya_build::build_ebpf(
        [aya_build::Package { name: "lb-ebpf", root_dir: "../lb-ebpf", ..Default::default() }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}

/// Keep in step with `lb-ebpf/rust-toolchain.toml` and `xtask`'s setup.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-19";
