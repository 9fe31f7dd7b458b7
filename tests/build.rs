//! Builds the benchmark-only XDP programs (`tests/bench-ebpf`: the live-frames
//! generator and the frame counter) for `lb-bench`, as lb-agent/build.rs builds the
//! balancer. Needs the pinned nightly and bpf-linker: `cargo xtask setup` installs both.

fn main() -> anyhow::Result<()> {
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-bench-ebpf",
            root_dir: "bench-ebpf",
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}

/// Keep in step with `bench-ebpf/rust-toolchain.toml` and `xtask`'s setup.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-19";
