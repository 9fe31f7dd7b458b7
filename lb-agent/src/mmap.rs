//! A shared read/write mapping of a `BPF_F_MMAPABLE` array map (`MAGLEV`,
//! `FIRST_RECORD`, `CT_SYN_FILTER`), unmapped when dropped. The kernel keeps
//! the map alive while the mapping exists.

use std::os::fd::{AsRawFd, BorrowedFd};

pub struct Mapping {
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: the mapping is owned by this value; its users say how they access it.
unsafe impl Send for Mapping {}

impl Mapping {
    /// Maps the first `bytes` (at least 1) of the map behind `fd`.
    pub fn new(fd: BorrowedFd<'_>, bytes: usize) -> std::io::Result<Self> {
        let bytes = bytes.max(1);
        // SAFETY: a shared read/write mapping of a map the kernel allows to be
        // mapped; nothing else is aliased.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping { ptr: ptr.cast(), bytes })
    }

    /// The start of the mapping (page-aligned), as elements of `T`.
    pub fn ptr<T>(&self) -> *mut T {
        self.ptr.cast()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.bytes) };
    }
}
