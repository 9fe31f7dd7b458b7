//! The SYN filter (`CT_SYN_FILTER`): two bits per hash of every flow in
//! `CT_ESTABLISHED` (a one-word Bloom filter), so that a TCP SYN of a new 5-tuple (a flood's, or a new
//! client's) learns from one array read, not a hash-table miss in a cold bucket,
//! that no established flow has its 5-tuple. A SYN whose bit is set looks the
//! table up as before (a reused client port must find its entry).
//!
//! The map is an array of 64-bit words: element 0 is the head (`head_word`:
//! which copy the SYNs read, 0 while the filter is off, and the words-per-copy
//! mask), then two copies of `mask + 1` words each. The program sets a flow's
//! bit in both copies right after it inserts the flow into `CT_ESTABLISHED`
//! (atomic ORs; a SYN of that 5-tuple reading the bit before that is one that
//! came before the insert); nothing in the program clears a bit. The agent's
//! sweep rebuilds the copy the SYNs do not read: it zeroes it, walks the table
//! setting the bit of every flow found, and then points the head at it. A flow
//! inserted before a word of that copy was zeroed was in the table when the
//! walk began, and one inserted later sets its bit after the zeroing: no
//! established flow is ever without its bit in the copy being read (the first
//! rebuild after the program was attached waits one sweep, so that no program
//! of an earlier agent, which set no bits here, is still inserting). Bits of
//! flows that left the table stay set until the next rebuild (a SYN then
//! looks the table up for nothing).

use crate::FlowKey;

pub mod names {
    pub const CT_SYN_FILTER: &str = "CT_SYN_FILTER";
}

/// Bits per `CT_ESTABLISHED` entry, each flow setting two in one word
/// (`bits`): at a full table, one SYN of a new 5-tuple in about 20
/// ((1 - e^(-2/8))^2) still looks the table up. 256 KB a copy at the default
/// 262,144 entries: one bit in 16 bits an entry (as first built) took 512 KB,
/// which a SYN's random read found out of cache more often (about 30 ns a SYN
/// in `lb-bench`, 512 KB against 128 KB).
pub const BITS_PER_ENTRY: u32 = 8;

/// Words in each copy for an `established_size`: a power of two, at least 64.
pub fn words_per_copy(established_size: u32) -> u32 {
    let bits = u64::from(established_size) * u64::from(BITS_PER_ENTRY);
    ((bits / 64).max(64) as u32).checked_next_power_of_two().unwrap_or(1 << 31)
}

/// Elements of `CT_SYN_FILTER` for an `established_size`: the head and two copies.
pub fn entries(established_size: u32) -> u32 {
    1 + 2 * words_per_copy(established_size)
}

/// The head: the copy the SYNs read (`Some(0 | 1)`) or off (`None`), and the
/// words-per-copy mask.
#[inline(always)]
pub fn head_word(reading: Option<u32>, mask: u32) -> u64 {
    (u64::from(mask) << 32) | u64::from(reading.map_or(0, |c| c + 1))
}

/// The element of `hash`'s word in `copy` (0 or 1), for the head's `mask`.
#[inline(always)]
pub fn word_index(hash: u32, copy: u32, mask: u32) -> u32 {
    1 + copy * (mask + 1) + (hash & mask)
}

/// `hash`'s two bits in its word (from the hash's top 12 bits; the mask
/// takes low ones): a flow is absent unless both are set.
#[inline(always)]
pub fn bits(hash: u32) -> u64 {
    (1 << (hash >> 26)) | (1 << ((hash >> 20) & 63))
}

/// The filter's hash of a flow, with the addresses' eight little-endian 32-bit
/// words given by `word` (source 0..4, destination 4..8) and the ports as
/// `sport << 16 | dport`: each address folded to one word, then three
/// multiply-and-shift rounds. Cheaper than `flow_hash` (it runs on every SYN before the
/// flow is scheduled), and good enough for a filter.
#[inline(always)]
pub fn hash_by(word: impl Fn(usize) -> u32, ports: u32, proto: u32) -> u32 {
    let src = word(0) ^ word(1) ^ word(2) ^ word(3);
    let dst = word(4) ^ word(5) ^ word(6) ^ word(7);
    let mut h = src.wrapping_mul(0x9e37_79b1);
    h = (h ^ (h >> 16) ^ ports).wrapping_mul(0x85eb_ca77);
    h = (h ^ (h >> 13) ^ dst ^ (proto << 24)).wrapping_mul(0xc2b2_ae3d);
    h ^ (h >> 16)
}

/// `hash_by` of a key.
pub fn hash(key: &FlowKey) -> u32 {
    let word = |b: &[u8; 16], i: usize| u32::from_le_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
    let w = |i: usize| if i < 4 { word(&key.src, i) } else { word(&key.dst, i - 4) };
    hash_by(w, (u32::from(key.sport) << 16) | u32::from(key.dport), u32::from(key.proto))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_indexes() {
        assert_eq!(words_per_copy(0), 64);
        assert_eq!(words_per_copy(262_144), 32_768, "8 bits an entry");
        assert_eq!(entries(262_144), 1 + 2 * 32_768);
        let mask = words_per_copy(1000) - 1;
        assert_eq!(word_index(u32::MAX, 0, mask), 1 + mask);
        assert_eq!(word_index(u32::MAX, 1, mask), 2 + 2 * mask, "the last element");
        assert_eq!(head_word(None, mask) as u32, 0);
        assert_eq!(head_word(Some(1), mask), (u64::from(mask) << 32) | 2);
    }

    fn key(i: u32, sport_base: u16) -> FlowKey {
        FlowKey {
            src: crate::v4_mapped([198, 18, (i >> 8) as u8, i as u8]),
            dst: crate::v4_mapped([198, 19, 0, 1]),
            sport: sport_base + (i % 5000) as u16,
            dport: 80,
            proto: crate::PROTO_TCP,
            _pad: [0; 3],
        }
    }

    /// One VIP, IPv4 clients counting up source address and port (a flood's
    /// pattern): the bits spread over the words as a random hash would, and
    /// other flows of the same pattern find both their bits set about as
    /// often as a random filter of that fill says.
    #[test]
    fn a_flood_of_ipv4_flows_spreads_over_the_filter() {
        let mask = words_per_copy(65_536) - 1;
        let mut copy = [0u64; 8_192];
        assert_eq!(mask + 1, 8_192);
        let n = 65_536u32;
        for i in 0..n {
            let h = hash(&key(i, 1024));
            copy[(word_index(h, 0, mask) - 1) as usize] |= bits(h);
        }
        // 2 x 65,536 bits set in 2^19: about 116,000 distinct expected.
        let distinct: u32 = copy.iter().map(|w| w.count_ones()).sum();
        assert!(distinct > 113_000, "{distinct} distinct bits of {}", 2 * n);
        // A full table: (1 - e^(-1/4))^2, about 4.9%, of absent flows look present.
        let present = (0..n)
            .filter(|&i| {
                let h = hash(&key(i, 30_000));
                let b = bits(h);
                copy[(word_index(h, 0, mask) - 1) as usize] & b == b
            })
            .count();
        assert!(present < n as usize * 6 / 100, "{present} of {n} absent flows look present");
    }
}
