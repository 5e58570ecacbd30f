//! Is this packet for a VIP? Three ways to answer, cheapest first:
//! - [`may_be_vip`]: one read of the `VIP_FILTER` array; a clear slot proves "no" for
//!   the bulk of a host's traffic without a hash lookup.
//! - [`flags_by_id`]: an established flow's connection entry names its VIP id; one
//!   read of the `VIP_IDS` array, compared with the packet, confirms it.
//! - [`lookup`]: the `VIPS` hash map, for new flows, ICMP, and everything else.

use lb_common::{hash::vip_filter_slot, types::VipMeta};

use crate::{
    Stop, keys,
    maps::{VIP_FILTER, VIP_IDS, VIPS},
    parse::Packet,
};

/// False only when no VIP has this packet's (destination, port, protocol).
#[inline(always)]
pub fn may_be_vip(pkt: &Packet) -> bool {
    let slot = vip_filter_slot(&pkt.dst, pkt.dst_port_be, pkt.proto);
    // A failed read (impossible: the slot is in range) falls back to the hash lookup.
    VIP_FILTER.get(slot).is_none_or(|set| *set != 0)
}

/// The flags of VIP `vip_id`, if that id still belongs to the packet's destination
/// (address, port, protocol). `None` sends the packet to [`lookup`].
#[inline(always)]
pub fn flags_by_id(vip_id: u32, pkt: &Packet) -> Option<u32> {
    let entry = VIP_IDS.get(vip_id)?;
    if entry.family == pkt.family
        && entry.port_be == pkt.dst_port_be
        && entry.proto == pkt.proto
        && entry.addr == pkt.dst
    {
        Some(entry.flags)
    } else {
        None
    }
}

/// The VIP the packet is addressed to, from the `VIPS` hash map.
#[inline(always)]
pub fn lookup(pkt: &Packet) -> Result<VipMeta, Stop> {
    let key = keys::Vip::new(pkt);
    // SAFETY: VIPS is not preallocated, so the value is not reused while we read it;
    // it is copied out at once.
    match unsafe { VIPS.get(key.key()) } {
        Some(meta) => Ok(*meta),
        None => Err(Stop::NotVip),
    }
}
