//! How a service's table lies in `MAGLEV`, for both sides.
//!
//! `MAGLEV` is an array of 8-byte elements, read as 32-bit words (element `e`
//! holds words `2e`, low half, and `2e + 1`, high half). A table of `slots`
//! slots indexing `ids` distinct backend ids takes `half_words(slots, ids)`
//! words from `Service::table_offset` (a word index):
//!
//! - the slots, two 16-bit indexes to a word (slot `s` in word `s / 2`, the low
//!   half for an even `s`);
//! - then the backend ids those indexes name, one word each (`list_word`), in
//!   the order they first appear in the slots: a table whose slots are all
//!   distinct (the candidates of `rr`, `lc`, `wlc`, `lblc`, `lblcr`) has slot
//!   `s` index entry `s`, which the least-connection scan reads directly.
//!
//! Two bytes a slot: a table of 65,537 slots is 128 KB, which stays in cache
//! far better than the 512 KB it took when each slot was a backend id in an
//! element of its own (the kernel lays array elements out 8 bytes apart, so a
//! 4-byte value wasted half of each). The list lives in the same half of the
//! service's region as its slots, so the agent's table swap (write the idle
//! half, then point the service at it) switches both at once.

/// Most distinct backend ids one table can index (16-bit indexes).
pub const TABLE_MAX_IDS: usize = 1 << 16;

/// Words of a table's slots: where its list of backend ids begins.
#[inline(always)]
pub const fn slot_words(slots: u32) -> u32 {
    slots / 2 + slots % 2
}

/// Words of a table of `slots` slots indexing `ids` backend ids.
#[inline(always)]
pub const fn half_words(slots: u32, ids: u32) -> u32 {
    slot_words(slots) + ids
}

/// The word holding slot `slot`'s index, and the index's shift in it.
#[inline(always)]
pub const fn slot_at(slot: u32) -> (u32, u32) {
    (slot / 2, (slot & 1) * 16)
}

/// The word of list entry `index` of a table of `slots` slots.
#[inline(always)]
pub const fn list_word(slots: u32, index: u32) -> u32 {
    slot_words(slots) + index
}

/// `MAGLEV` element of word `word`, and the word's shift in it.
#[inline(always)]
pub const fn element_of(word: u32) -> (u32, u32) {
    (word / 2, (word & 1) * 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry() {
        assert_eq!(slot_words(7), 4);
        assert_eq!(slot_words(8), 4);
        assert_eq!(half_words(65_537, 50), 32_769 + 50);
        assert_eq!(slot_at(0), (0, 0));
        assert_eq!(slot_at(5), (2, 16));
        assert_eq!(list_word(7, 2), 6);
        assert_eq!(element_of(7), (3, 32));
        assert_eq!(element_of(6), (3, 0));
    }
}
