//! `MAGLEV` mapped into the agent's memory (the map is `BPF_F_MMAPABLE`): a
//! table is written with plain stores instead of a syscall per slot. A table
//! of backend ids is stored encoded (`lb_common::table`): 16-bit slots indexing
//! the list of its distinct ids, in the order they first appear, that follows
//! them.

use lb_common::table::{half_words, list_word, slot_at, slot_words, TABLE_MAX_IDS};

/// Backend ids below this are indexed directly (`first_appearance`); the plan
/// hands ids out densely from 0, so every real table is.
const DIRECT_IDS: u32 = 1 << 22;

std::thread_local! {
    /// `first_appearance`'s index by id (1 + the id's list index, 0: not seen),
    /// kept per thread and left all zero between calls.
    static BY_ID: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The distinct ids of `table` in the order they first appear, calling
/// `each(slot, index into that list)` for every slot. One pass with a direct
/// index by id: sorting each table to rank its ids took most of the time of
/// encoding ten million slots at start.
fn first_appearance(table: &[u32], mut each: impl FnMut(usize, u32)) -> Vec<u32> {
    let mut list = Vec::new();
    let top = table.iter().copied().max().unwrap_or(0);
    if top < DIRECT_IDS {
        BY_ID.with_borrow_mut(|by_id| {
            if by_id.len() <= top as usize {
                by_id.resize(top as usize + 1, 0);
            }
            for (s, &id) in table.iter().enumerate() {
                let mut at = by_id[id as usize];
                if at == 0 {
                    list.push(id);
                    at = list.len() as u32;
                    by_id[id as usize] = at;
                }
                each(s, at - 1);
            }
            for &id in &list {
                by_id[id as usize] = 0;
            }
        });
        return list;
    }
    // An id past the direct index: rank by a sorted copy.
    let mut sorted = table.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut index_of = vec![u32::MAX; sorted.len()];
    for (s, id) in table.iter().enumerate() {
        // Every id is in `sorted` (built from the table).
        let rank = sorted.binary_search(id).unwrap_or_default();
        if index_of[rank] == u32::MAX {
            index_of[rank] = list.len() as u32;
            list.push(*id);
        }
        each(s, index_of[rank]);
    }
    list
}

/// Words a table of `ids` distinct backend ids takes in `MAGLEV` (the size of
/// each half of its region): 0 while it is empty.
pub fn words(table: &[u32], ids: u32) -> u32 {
    if table.is_empty() {
        return 0;
    }
    half_words(table.len() as u32, ids)
}

/// The number of distinct backend ids in `table` (`PlannedService::table_ids`).
pub fn distinct(table: &[u32]) -> u32 {
    first_appearance(table, |_, _| {}).len() as u32
}

/// The words of `table` as `MAGLEV` holds them. The list is in the order ids
/// first appear: a table whose slots are all distinct (the candidates of `rr`,
/// `lc`, `wlc`, `lblc`, `lblcr`) has slot `s` index list entry `s`, which the
/// least-connection scan reads directly.
pub fn encode(table: &[u32]) -> Vec<u32> {
    let slots = table.len() as u32;
    // The list's length is known only at the end: the slots' words first.
    let mut words = Vec::with_capacity(slot_words(slots) as usize + 64);
    words.resize(slot_words(slots) as usize, 0u32);
    let list = first_appearance(table, |s, index| {
        let (w, shift) = slot_at(s as u32);
        words[w as usize] |= index << shift;
    });
    assert!(list.len() <= TABLE_MAX_IDS, "a table indexes at most {TABLE_MAX_IDS} backend ids");
    words.extend_from_slice(&list);
    debug_assert_eq!(words.len() as u32, half_words(slots, list.len() as u32));
    words
}

/// The table of `slots` slots whose words `word` reads (relative to the
/// table's offset): the inverse of `encode`. An index past the list (a table
/// another version wrote, or none) reads as id `u32::MAX`.
pub fn decode(slots: u32, word: impl Fn(u32) -> u32) -> Vec<u32> {
    let indexes: Vec<u32> = (0..slots)
        .map(|s| {
            let (w, shift) = slot_at(s);
            (word(w) >> shift) & 0xffff
        })
        .collect();
    let ids = indexes.iter().max().map_or(0, |m| m + 1);
    let list: Vec<u32> = (0..ids).map(|i| word(list_word(slots, i))).collect();
    indexes.iter().map(|&i| list.get(i as usize).copied().unwrap_or(u32::MAX)).collect()
}

/// The map's memory: `len` 32-bit words (two to an 8-byte element).
pub struct MaglevMap {
    mapping: crate::mmap::Mapping,
    len: usize,
}

impl MaglevMap {
    /// Maps `fd` (an array of `elements` 8-byte elements created with
    /// BPF_F_MMAPABLE); written only through `&mut self`.
    pub fn new(fd: std::os::fd::BorrowedFd<'_>, elements: usize) -> std::io::Result<Self> {
        Ok(MaglevMap { mapping: crate::mmap::Mapping::new(fd, elements * 8)?, len: elements * 2 })
    }

    /// Writes `table` encoded at word `offset` (`words_of(table)` words).
    /// Readers only reach these words after the service entry that points at
    /// them is updated (a syscall, which orders these stores before it).
    pub fn write(&mut self, offset: usize, table: &[u32]) {
        let words = encode(table);
        assert!(offset + words.len() <= self.len, "MAGLEV write out of bounds");
        // SAFETY: in bounds (checked above) of a live mapping of `len` words.
        let cells = unsafe { std::slice::from_raw_parts_mut(self.mapping.ptr::<u32>().add(offset), words.len()) };
        cells.copy_from_slice(&words);
    }

    /// Reads the table of `slots` slots at word `offset` (for adoption, tests
    /// and inspection); words past the map read as 0.
    pub fn read(&self, offset: usize, slots: u32) -> Vec<u32> {
        let base = self.mapping.ptr::<u32>();
        decode(slots, |w| {
            let at = offset + w as usize;
            // SAFETY: in bounds of a live mapping of `len` words.
            if at < self.len { unsafe { *base.add(at) } } else { 0 }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_round_trips_and_takes_two_bytes_a_slot_plus_its_list() {
        let table: Vec<u32> = (0..65_537u32).map(|s| 1000 + (s * 7919) % 50).collect();
        let words = encode(&table);
        assert_eq!(words.len(), 32_769 + 50);
        assert_eq!(distinct(&table), 50);
        assert_eq!(decode(65_537, |w| words[w as usize]), table);
        // Slot 3's index is the high half of word 1; the list is in order of
        // first appearance.
        assert_eq!((words[1] >> 16) as usize, words[32_769..].iter().position(|&id| id == table[3]).unwrap());
        assert_eq!(words[32_769..32_772], table[..3]);
    }

    #[test]
    fn distinct_slots_index_their_own_list_entry() {
        // What the least-connection scan relies on (`lb-ebpf`, `leastconn.rs`).
        let table = [40u32, 7, 19, 3, 25];
        let words = encode(&table);
        for s in 0..5u32 {
            let (w, shift) = slot_at(s);
            assert_eq!((words[w as usize] >> shift) & 0xffff, s);
            assert_eq!(words[lb_common::table::list_word(5, s) as usize], table[s as usize]);
        }
    }

    #[test]
    fn ids_past_the_direct_index_and_tables_in_a_row_encode_alike() {
        // A table of small ids, one of large ones (ranked by a sorted copy),
        // then the first again: the per-thread index starts each table empty.
        let small: Vec<u32> = (0..1031u32).map(|s| (s * 31) % 9).collect();
        let large: Vec<u32> = small.iter().map(|id| DIRECT_IDS + 5 * id).collect();
        let (a, b, c) = (encode(&small), encode(&large), encode(&small));
        assert_eq!(a, c);
        assert_eq!(a[..slot_words(1031) as usize], b[..slot_words(1031) as usize], "the same slots, the same indexes");
        assert_eq!(decode(1031, |w| b[w as usize]), large);
        assert_eq!((distinct(&small), distinct(&large)), (9, 9));
    }

    #[test]
    fn odd_small_and_empty_tables() {
        for table in [vec![], vec![9], vec![5, 3, 5], vec![7, 7, 7, 7, 7, 7, 7]] {
            let words = encode(&table);
            assert_eq!(decode(table.len() as u32, |w| words[w as usize]), table);
            assert_eq!(words.len() as u32, half_words(table.len() as u32, distinct(&table)));
        }
    }
}
