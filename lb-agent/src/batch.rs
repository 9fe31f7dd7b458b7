//! Reading arrays in a few system calls (`BPF_MAP_LOOKUP_BATCH`) rather than one
//! per element: the status of ten thousand services reads some 100,000 counters
//! and as many connection counts, and the sweep reads the counts every time.

use std::os::fd::{AsRawFd, BorrowedFd};

use lb_common::Counters;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call.
const CHUNK: u32 = 4096;

/// `union bpf_attr`, the `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Calls `f(key, value bytes)` for elements `0..len` of the array `fd`, whose
/// values (all CPUs' of a per-CPU array) take `value_len` bytes each, in batches
/// of [`CHUNK`]. `Err` when the kernel refuses batch operations.
fn for_each(fd: BorrowedFd<'_>, len: u32, value_len: usize, mut f: impl FnMut(u32, &[u8])) -> std::io::Result<()> {
    let mut keys = vec![0u32; CHUNK as usize];
    // u64 words keep the buffer 8-byte aligned, as values are in the kernel.
    let mut values = vec![0u64; (CHUNK as usize * value_len).div_ceil(8)];
    let (mut token, mut next) = (0u32, 0u32);
    let (mut first, mut seen) = (true, 0u32);
    while seen < len {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw const token as u64 },
            out_batch: &raw mut next as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK.min(len - seen),
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of `CHUNK` keys and `CHUNK` values of
        // `value_len` bytes, and `count` is at most `CHUNK`; the kernel writes no more.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &raw mut attr, size_of::<BatchAttr>() as u32)
        };
        let done = rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT);
        if rc < 0 && !done {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the buffer holds `CHUNK * value_len` bytes (rounded up to words).
        let bytes = unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), values.len() * 8) };
        for (i, &key) in keys.iter().enumerate().take(attr.count as usize) {
            if key < len {
                f(key, &bytes[i * value_len..(i + 1) * value_len]);
            }
        }
        seen += attr.count;
        if done || attr.count == 0 {
            break;
        }
        (token, first) = (next, false);
    }
    Ok(())
}

/// Per element, the counters summed over `ncpu` CPUs, for elements `0..len`
/// of the per-CPU array `fd` (of `Counters`). `Err` when the kernel refuses batch
/// operations (the caller then reads element by element).
pub fn sum_counters(fd: BorrowedFd<'_>, len: u32, ncpu: usize) -> std::io::Result<Vec<Counters>> {
    // Per-CPU values are 8-byte aligned in the kernel's copy.
    let stride = size_of::<Counters>().next_multiple_of(8);
    let mut out = vec![Counters::default(); len as usize];
    for_each(fd, len, stride * ncpu, |key, bytes| {
        let c = &mut out[key as usize];
        for cpu in bytes.chunks_exact(stride) {
            let word = |i: usize| u64::from_ne_bytes(cpu[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            c.packets += word(0);
            c.bytes += word(1);
            c.new_flows += word(2);
        }
    })?;
    Ok(out)
}

/// Elements `0..len` of the (plain) array `fd` of `V`s; `Err` when the kernel
/// refuses batch operations (the caller then reads element by element).
pub fn read_array<V: aya::Pod + Default>(fd: BorrowedFd<'_>, len: u32) -> std::io::Result<Vec<V>> {
    let mut out = vec![V::default(); len as usize];
    for_each(fd, len, size_of::<V>(), |key, bytes| {
        // SAFETY: `bytes` holds one `V` as the kernel stores it; `V` is plain data.
        out[key as usize] = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<V>()) };
    })?;
    Ok(out)
}
