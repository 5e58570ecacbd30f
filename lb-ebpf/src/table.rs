//! The weighted consistent-hash lookup table: a new flow's hash indexes the VIP's
//! active table copy, which names a backend id. Userspace computes the tables; this
//! module only reads them.

use lb_common::{
    hash::{flow_hash_words, source_hash_words},
    maps::{MAX_RING_SIZE, MAX_VIPS, RING_CHUNK, ring_base},
    types::{Backend, VIP_F_HASH_SRC_ONLY, VipMeta},
};

use crate::{
    Stop,
    maps::{BACKENDS, RINGS},
    parse::Packet,
};

/// The flow hash the VIP's flags call for.
#[inline(always)]
pub fn hash(pkt: &Packet, vip_flags: u32) -> u32 {
    if vip_flags & VIP_F_HASH_SRC_ONLY != 0 {
        source_hash_words(pkt.family, &pkt.src)
    } else {
        flow_hash_words(
            pkt.family,
            pkt.proto,
            &pkt.src,
            &pkt.dst,
            pkt.src_port_be,
            pkt.dst_port_be,
        )
    }
}

/// The backend id for a new flow of `vip`, and the flow's hash.
#[inline(always)]
pub fn pick(pkt: &Packet, vip: &VipMeta) -> Result<(u32, u32), Stop> {
    // Guards against a corrupt VipMeta; they also bound the index for the verifier.
    if vip.vip_id >= MAX_VIPS || vip.ring_size == 0 || vip.ring_size > MAX_RING_SIZE {
        return Err(Stop::NoBackend);
    }
    let hash = hash(pkt, vip.flags);
    let slot = ring_base(vip.vip_id, vip.active & 1) + hash % vip.ring_size;
    // A VIP id beyond the array's configured size finds no element.
    let chunk = RINGS.get(slot / RING_CHUNK).ok_or(Stop::NoBackend)?;
    let backend_id = u32::from(chunk[(slot % RING_CHUNK) as usize]);
    Ok((backend_id, hash))
}

/// The backend with id `backend_id`, if that id is in use. The entry is read where
/// it lies (an array value lives as long as the program), not copied: the copy cost
/// an established packet some 30 instructions of byte moves.
#[inline(always)]
pub fn backend(backend_id: u32) -> Result<&'static Backend, Stop> {
    match BACKENDS.get(backend_id) {
        Some(b) if b.family != 0 => Ok(b),
        _ => Err(Stop::NoBackend),
    }
}
