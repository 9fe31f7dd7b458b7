//! `rr` and `wrr`: the service's table is one period of the rotation (`rr`: each
//! backend taking new flows once; `wrr`: nginx's smooth weighted order, computed
//! by the agent), and a per-service cursor in `ROTATION`, shared by all CPUs,
//! walks it. The cursor is advanced with an atomic fetch-and-add, so the
//! rotation is exact across CPUs: every new flow takes the next slot, whichever
//! CPU it arrives on.

use crate::maps::ROTATION;

/// The next slot of the rotation.
#[inline(always)]
pub fn slot(service_id: u32, size: u32) -> u32 {
    let Some(cursor) = ROTATION.get_ptr_mut(service_id) else { return 0 };
    (fetch_add(cursor) % size as u64) as u32
}

/// `*p += 1`, returning the value before, as one BPF `atomic_fetch_add`
/// instruction. Written in assembly: the object is built for the generic BPF CPU
/// (v1), where LLVM emits only the plain atomic add and refuses to use its
/// result; the kernel's verifier accepts the fetch form on any kernel since 5.12.
#[inline(always)]
fn fetch_add(p: *mut u64) -> u64 {
    let mut v: u64 = 1;
    // SAFETY: `p` is a live, aligned array element; the instruction reads and
    // writes only it.
    unsafe {
        core::arch::asm!(
            "{v} = atomic_fetch_add((u64 *)({p} + 0), {v})",
            p = in(reg) p,
            v = inout(reg) v,
            options(nostack),
        );
    }
    v
}
