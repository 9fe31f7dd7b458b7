//! The XDP object built by `build.rs` from the current sources.

/// The eBPF ELF object, 8-byte aligned as aya requires.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
