//! Reading a per-CPU array of counters in a few system calls
//! (`BPF_MAP_LOOKUP_BATCH`) rather than one per element: the status of ten
//! thousand services reads some 100,000 entries every second.

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

/// Per element, the counters summed over `ncpu` CPUs, for elements `0..len`
/// of the per-CPU array `fd` (of `Counters`). `Err` when the kernel refuses batch
/// operations (the caller then reads element by element).
pub fn sum_counters(fd: BorrowedFd<'_>, len: u32, ncpu: usize) -> std::io::Result<Vec<Counters>> {
    let stride = size_of::<Counters>().div_ceil(8); // u64 words per CPU
    let mut out = Vec::with_capacity(len as usize);
    let mut keys = vec![0u32; CHUNK as usize];
    let mut values = vec![0u64; CHUNK as usize * ncpu * stride];
    let (mut token, mut next) = (0u32, 0u32);
    let mut first = true;
    while out.len() < len as usize {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw const token as u64 },
            out_batch: &raw mut next as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK.min(len - out.len() as u32),
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of `CHUNK` keys and `CHUNK` per-CPU
        // values, and `count` is at most `CHUNK`; the kernel writes no more.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &raw mut attr, size_of::<BatchAttr>() as u32)
        };
        let done = rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT);
        if rc < 0 && !done {
            return Err(std::io::Error::last_os_error());
        }
        for i in 0..attr.count as usize {
            let mut c = Counters::default();
            for cpu in values[i * ncpu * stride..].chunks_exact(stride).take(ncpu) {
                c.packets += cpu[0];
                c.bytes += cpu[1];
                c.new_flows += cpu[2];
            }
            if keys[i] as usize == out.len() && out.len() < len as usize {
                out.push(c);
            }
        }
        if done || attr.count == 0 {
            break;
        }
        (token, first) = (next, false);
    }
    out.resize(len as usize, Counters::default());
    Ok(out)
}
