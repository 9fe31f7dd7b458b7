//! The flow hash and Maglev slot lookup, defined once for the kernel and the agent.
//!
//! The hash is MurmurHash3's 32-bit block mix over the 5-tuple's words: cheap in
//! BPF (no loops the verifier has to bound beyond a fixed unroll, no tables) and
//! well spread over the slots.

use crate::FlowKey;

const SEED: u32 = 0x4c42_5f31; // "LB_1"

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finish(mut h: u32, len: u32) -> u32 {
    h ^= len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
fn word(b: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]])
}

/// Hash of a flow's 5-tuple (source and destination address and port, protocol).
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let w = |i: usize| if i < 4 { word(&key.src, i) } else { word(&key.dst, i - 4) };
    flow_hash_by(w, ((key.sport as u32) << 16) | key.dport as u32, key.proto as u32)
}

/// `flow_hash` with the addresses' eight little-endian 32-bit words given by
/// `word` (source 0..4, destination 4..8), the ports as `sport << 16 | dport`.
#[inline(always)]
pub fn flow_hash_by(word: impl Fn(usize) -> u32, ports: u32, proto: u32) -> u32 {
    let mut h = SEED;
    for i in 0..8 {
        h = mix(h, word(i));
    }
    h = mix(h, ports);
    h = mix(h, proto);
    finish(h, 40)
}

/// MurmurHash3's mix of `words` into `hash`, finished: `first::first_record_check`.
#[inline(always)]
pub fn check_mix(hash: u32, words: [u32; 4]) -> u32 {
    let mut h = mix(SEED ^ hash, words[0]);
    h = mix(h, words[1]);
    h = mix(h, words[2]);
    h = mix(h, words[3]);
    finish(h, 20)
}

/// Slot of a flow in a Maglev table of `table_size` slots (`table_size` > 0).
#[inline(always)]
pub fn maglev_slot(hash: u32, table_size: u32) -> u32 {
    hash % table_size
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sport: u16) -> FlowKey {
        FlowKey {
            src: crate::v4_mapped([198, 18, 0, 1]),
            dst: crate::v4_mapped([198, 18, 1, 1]),
            sport,
            dport: 80,
            proto: crate::PROTO_TCP,
            _pad: [0; 3],
        }
    }

    #[test]
    fn hash_is_stable_and_depends_on_every_field() {
        // A fixed value: the kernel and every agent version must agree on it.
        let h = flow_hash(&key(40000));
        assert_eq!(h, flow_hash(&key(40000)));
        assert_ne!(h, flow_hash(&key(40001)));
        let mut k = key(40000);
        k.proto = crate::PROTO_UDP;
        assert_ne!(h, flow_hash(&k));
        let mut k = key(40000);
        k.dst[15] ^= 1;
        assert_ne!(h, flow_hash(&k));
    }

    #[test]
    fn mask_addr_keeps_the_prefix() {
        let a = crate::v4_mapped([198, 18, 200, 77]);
        assert_eq!(crate::mask_addr(&a, 96 + 24), crate::v4_mapped([198, 18, 200, 0]));
        assert_eq!(crate::mask_addr(&a, 96 + 20), crate::v4_mapped([198, 18, 192, 0]));
        assert_eq!(crate::mask_addr(&a, 128), a);
        let v6 = [0x20, 0x01, 0x0d, 0xb8, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4, 5, 6, 7, 8];
        let m = crate::mask_addr(&v6, 36);
        assert_eq!(&m[..5], &[0x20, 0x01, 0x0d, 0xb8, 0xf0]);
        assert!(m[5..].iter().all(|&b| b == 0));
    }

    #[test]
    fn source_ports_spread_over_slots() {
        let size = 13u32;
        let mut hits = [0u32; 13];
        for p in 0..13_000u16 {
            hits[maglev_slot(flow_hash(&key(p)), size) as usize] += 1;
        }
        for h in hits {
            assert!((800..1200).contains(&h), "uneven spread: {hits:?}");
        }
    }
}
