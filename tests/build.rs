//! Builds the benchmark-only XDP programs (`tests/bench-ebpf`: the live-frames
//! generator, the frame counter, the tunnel bench's `bench_untunnel`) and the
//! balancer built with `no-rare` for `lb-bench`, as lb-agent/build.rs builds the
//! balancer. Needs the pinned nightly and bpf-linker: `cargo xtask setup` installs both.

fn main() -> anyhow::Result<()> {
    // lb-common is compiled into the balancer object too; aya-build only watches lb-ebpf.
    println!("cargo:rerun-if-changed=../lb-common/src");
    println!("cargo::rustc-check-cfg=cfg(no_rare_object)");
    let mut packages = vec![aya_build::Package { name: "lb-bench-ebpf", root_dir: "bench-ebpf", ..Default::default() }];
    // The balancer without the ICMP and fragment path (`OUT_DIR/lb-ebpf`):
    // `lb-bench`'s before/after of that path. Release builds only (`lb-bench`
    // runs as one; the test suite's debug build does not wait for a second
    // balancer build). The agent embeds its own build (lb-agent/build.rs).
    if std::env::var("PROFILE").as_deref() == Ok("release") {
        packages.push(aya_build::Package {
            name: "lb-ebpf",
            root_dir: "../lb-ebpf",
            features: &["no-rare"],
            ..Default::default()
        });
        println!("cargo::rustc-cfg=no_rare_object");
    }
    aya_build::build_ebpf(packages, aya_build::Toolchain::Custom(EBPF_TOOLCHAIN))
}

/// Keep in step with `bench-ebpf/rust-toolchain.toml` and `xtask`'s setup.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-19";
