//! The agent's half of the SYN filter (`lb_common::syn_filter`): the sweep
//! rebuilds the copy the program's SYNs do not read while it walks
//! `CT_ESTABLISHED`, then points the head at it. Off (the head says no copy)
//! from start until the second sweep: the first rebuild begins only after one
//! whole sweep interval with this agent's program attached.

use std::{
    os::fd::AsFd,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::MapData;
use lb_common::{syn_filter, FlowKey};

/// `CT_SYN_FILTER` mapped read-write (the map is `BPF_F_MMAPABLE`).
pub struct SynFilter {
    mapping: crate::mmap::Mapping,
    len: usize,
    mask: u32,
    /// The copy the head names (`None`: off).
    reading: Option<u32>,
    /// Sweeps begun; rebuilding starts with the second.
    sweeps: u64,
    _map: MapData,
}

/// A rebuild under way (`SynFilter::begin`): the copy being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebuild(u32);

impl SynFilter {
    /// Maps `map` and writes its head: off, with the mask its size gives.
    pub fn new(map: MapData) -> std::io::Result<Self> {
        let len = map.info().map_err(std::io::Error::other)?.max_entries() as usize;
        if len < 3 {
            return Err(std::io::Error::other(format!("CT_SYN_FILTER has {len} elements, fewer than a head and two copies")));
        }
        let per_copy = ((len - 1) / 2) as u32;
        if !per_copy.is_power_of_two() {
            return Err(std::io::Error::other(format!("CT_SYN_FILTER's copies ({per_copy} words) are not a power of two")));
        }
        let mapping = crate::mmap::Mapping::new(map.fd().as_fd(), len * size_of::<u64>())?;
        let f = SynFilter { mapping, len, mask: per_copy - 1, reading: None, sweeps: 0, _map: map };
        f.word(0).store(syn_filter::head_word(None, f.mask), Ordering::Release);
        Ok(f)
    }

    fn word(&self, i: u32) -> &AtomicU64 {
        assert!((i as usize) < self.len, "CT_SYN_FILTER element {i} of {}", self.len);
        // SAFETY: in bounds of the live mapping; u64-aligned (page-aligned base);
        // every access is atomic.
        unsafe { &*self.mapping.ptr::<AtomicU64>().add(i as usize) }
    }

    /// Whether the program's SYNs read the filter.
    pub fn is_on(&self) -> bool {
        self.reading.is_some()
    }

    /// At the start of a sweep: from the second on, zeroes the copy not being
    /// read and returns it, to be filled by `add` for every entry the walk finds.
    pub fn begin(&mut self) -> Option<Rebuild> {
        self.sweeps += 1;
        if self.sweeps < 2 {
            return None;
        }
        let copy = self.reading.map_or(0, |c| 1 - c);
        for i in 0..=self.mask {
            self.word(syn_filter::word_index(i, copy, self.mask)).store(0, Ordering::Relaxed);
        }
        Some(Rebuild(copy))
    }

    /// Sets `key`'s bit in the copy being rebuilt.
    pub fn add(&self, r: Rebuild, key: &FlowKey) {
        let h = syn_filter::hash(key);
        self.word(syn_filter::word_index(h, r.0, self.mask)).fetch_or(syn_filter::bits(h), Ordering::Relaxed);
    }

    /// After a complete walk: the SYNs read the rebuilt copy from now on.
    pub fn finish(&mut self, r: Rebuild) {
        self.word(0).store(syn_filter::head_word(Some(r.0), self.mask), Ordering::Release);
        self.reading = Some(r.0);
    }
}
