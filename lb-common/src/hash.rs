//! The flow hash: picks a flow's slot in its VIP's lookup table for new flows.
//!
//! It must give the same value in the kernel and in userspace (tests and the agent's
//! `explain` use it), so it is written once, here, over plain integers. The function is
//! MurmurHash3 (x86, 32-bit) over 32-bit words: cheap in BPF (multiplies, rotates, no
//! tables), well mixed, and with a published reference to test against.

use crate::{
    maps::VIP_FILTER_BITS,
    types::{AddrWords, FAMILY_V4, FlowKey, addr_words},
};

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

/// Seed of the flow hash. Every load balancer that shares a VIP behind ECMP must use
/// the same seed, so it is a constant and not a per-process random value.
pub const FLOW_HASH_SEED: u32 = 0x5eed_1b01;

#[inline(always)]
fn mix(h: u32, word: u32) -> u32 {
    let k = word.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finish(mut h: u32, len_bytes: u32) -> u32 {
    h ^= len_bytes;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// MurmurHash3_x86_32 of `words` (read as little-endian 4-byte blocks), with `seed`.
#[inline(always)]
pub fn murmur3_words(words: &[u32], seed: u32) -> u32 {
    let mut h = seed;
    let mut i = 0;
    while i < words.len() {
        h = mix(h, words[i]);
        i += 1;
    }
    finish(h, (words.len() * 4) as u32)
}

/// Hash of a flow's 5-tuple: source and destination address and port, and protocol.
/// IPv4 flows hash only the 4 meaningful bytes of each address.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    flow_hash_words(
        key.family,
        key.proto,
        &addr_words(&key.src),
        &addr_words(&key.dst),
        key.src_port_be,
        key.dst_port_be,
    )
}

/// [`flow_hash`] of a flow given as address words, as the datapath holds it.
#[inline(always)]
pub fn flow_hash_words(
    family: u8,
    proto: u8,
    src: &AddrWords,
    dst: &AddrWords,
    src_port_be: u16,
    dst_port_be: u16,
) -> u32 {
    let ports = ((src_port_be as u32) << 16) | dst_port_be as u32;
    let tail = ((family as u32) << 8) | proto as u32;
    if family == FAMILY_V4 {
        murmur3_words(&[src[0], dst[0], ports, tail], FLOW_HASH_SEED)
    } else {
        murmur3_words(
            &[
                src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3], ports, tail,
            ],
            FLOW_HASH_SEED,
        )
    }
}

/// Hash of the source address alone: every flow of one client lands on one backend.
#[inline(always)]
pub fn source_hash(key: &FlowKey) -> u32 {
    source_hash_words(key.family, &addr_words(&key.src))
}

/// [`source_hash`] of a source given as address words.
#[inline(always)]
pub fn source_hash_words(family: u8, src: &AddrWords) -> u32 {
    if family == FAMILY_V4 {
        murmur3_words(&[src[0]], FLOW_HASH_SEED)
    } else {
        murmur3_words(src, FLOW_HASH_SEED)
    }
}

/// Slot of a (destination, port, protocol) in the `VIP_FILTER` array. The datapath
/// reads that slot before anything else about a packet; a zero there proves the
/// packet is for no VIP, without the VIP hash lookup. The agent sets the slot of
/// every key in `VIPS` (including ICMP echo entries, port 0). Collisions only cost
/// the hash lookup the filter would have saved.
#[inline(always)]
pub fn vip_filter_slot(dst: &AddrWords, port_be: u16, proto: u8) -> u32 {
    let fold = dst[0] ^ dst[1] ^ dst[2] ^ dst[3] ^ ((port_be as u32) << 8) ^ proto as u32;
    // Fibonacci hashing: the top bits of a multiply by 2^32 / golden ratio.
    fold.wrapping_mul(0x9e37_79b1) >> (32 - VIP_FILTER_BITS)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::types::{FAMILY_V6, PROTO_TCP};
    use std::vec::Vec;

    fn v4_flow(src: [u8; 4], sport: u16) -> FlowKey {
        let mut key = FlowKey {
            src_port_be: sport.to_be(),
            dst_port_be: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            ..Default::default()
        };
        key.src[..4].copy_from_slice(&src);
        key.dst[..4].copy_from_slice(&[198, 18, 1, 1]);
        key
    }

    /// Reference values of MurmurHash3_x86_32 from its published test vectors
    /// (the byte strings below, read as little-endian words).
    #[test]
    fn murmur3_matches_reference_vectors() {
        assert_eq!(murmur3_words(&[], 0), 0);
        assert_eq!(murmur3_words(&[], 1), 0x514e_28b7);
        assert_eq!(murmur3_words(&[], 0xffff_ffff), 0x81f1_6f39);
        // "\xff\xff\xff\xff", seed 0
        assert_eq!(murmur3_words(&[0xffff_ffff], 0), 0x7629_3b50);
        // "\x21\x43\x65\x87", seed 0
        assert_eq!(murmur3_words(&[0x8765_4321], 0), 0xf55b_516b);
        // "\x21\x43\x65\x87", seed 0x5082EDEE
        assert_eq!(murmur3_words(&[0x8765_4321], 0x5082_edee), 0x2362_f9de);
    }

    #[test]
    fn every_field_of_the_tuple_changes_the_hash() {
        let base = v4_flow([198, 18, 0, 1], 40000);
        let h = flow_hash(&base);
        let mut k = base;
        k.src[3] = 2;
        assert_ne!(flow_hash(&k), h);
        let mut k = base;
        k.dst[3] = 2;
        assert_ne!(flow_hash(&k), h);
        let mut k = base;
        k.src_port_be = 40001u16.to_be();
        assert_ne!(flow_hash(&k), h);
        let mut k = base;
        k.dst_port_be = 81u16.to_be();
        assert_ne!(flow_hash(&k), h);
        let mut k = base;
        k.proto = 17;
        assert_ne!(flow_hash(&k), h);
    }

    #[test]
    fn source_hash_ignores_ports_and_destination() {
        let a = v4_flow([198, 18, 0, 1], 40000);
        let mut b = v4_flow([198, 18, 0, 1], 50000);
        b.dst[3] = 9;
        assert_eq!(source_hash(&a), source_hash(&b));
        assert_ne!(flow_hash(&a), flow_hash(&b));
    }

    #[test]
    fn ipv6_uses_all_address_words() {
        let mut a = FlowKey {
            family: FAMILY_V6,
            proto: PROTO_TCP,
            ..Default::default()
        };
        a.src[0] = 0xfd;
        let h = flow_hash(&a);
        for byte in 0..16 {
            let mut b = a;
            b.src[byte] ^= 0x80;
            assert_ne!(flow_hash(&b), h, "source byte {byte} ignored");
            let mut b = a;
            b.dst[byte] ^= 0x80;
            assert_ne!(flow_hash(&b), h, "destination byte {byte} ignored");
        }
    }

    /// Sequential client ports (what one NATed client produces) spread evenly over a
    /// 65537-slot table: a chi-square test over 64 buckets of `hash % 65537`.
    /// With 63 degrees of freedom the 0.1% critical value is 103.4; an unmixed hash
    /// (such as the ports alone) lands in the thousands.
    #[test]
    fn sequential_ports_spread_uniformly() {
        const N: usize = 200_000;
        const BUCKETS: usize = 64;
        let mut counts = [0usize; BUCKETS];
        for i in 0..N {
            let key = v4_flow([198, 18, (i >> 16) as u8, 1], (i & 0xffff) as u16);
            let slot = flow_hash(&key) % 65537;
            counts[(slot as usize * BUCKETS) / 65537] += 1;
        }
        let expected = N as f64 / BUCKETS as f64;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        assert!(
            chi2 < 103.4,
            "chi-square {chi2} over {BUCKETS} buckets: {counts:?}"
        );
    }

    /// Flipping one input bit flips each output bit with probability close to 1/2.
    #[test]
    fn single_bit_flips_avalanche() {
        let base = v4_flow([198, 18, 0, 7], 12345);
        let h = flow_hash(&base);
        let mut flips = Vec::new();
        for bit in 0..32 {
            let mut k = base;
            k.src[bit / 8] ^= 1 << (bit % 8);
            flips.push((flow_hash(&k) ^ h).count_ones());
        }
        let mean = flips.iter().sum::<u32>() as f64 / flips.len() as f64;
        assert!((12.0..20.0).contains(&mean), "mean flipped bits {mean}");
    }

    #[test]
    fn vip_filter_slots_are_in_range_and_spread() {
        use crate::maps::VIP_FILTER_SLOTS;
        let mut used = std::collections::BTreeSet::new();
        for last in 0..64u8 {
            let addr = addr_words(&[198, 18, 1, last, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            let slot = vip_filter_slot(&addr, 443u16.to_be(), PROTO_TCP);
            assert!(slot < VIP_FILTER_SLOTS);
            used.insert(slot);
        }
        // 64 consecutive VIP addresses: nearly all in distinct slots.
        assert!(used.len() >= 60, "{} distinct slots", used.len());
        let a = addr_words(&[198, 18, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_ne!(
            vip_filter_slot(&a, 80u16.to_be(), PROTO_TCP),
            vip_filter_slot(&a, 81u16.to_be(), PROTO_TCP)
        );
    }
}
