//! Is this packet for a VIP? Looks up (destination address, port, protocol).

use lb_common::types::{VipKey, VipMeta};

use crate::{Stop, maps::VIPS, parse::Packet};

#[inline(always)]
pub fn lookup(pkt: &Packet) -> Result<VipMeta, Stop> {
    let key = VipKey {
        addr: pkt.flow.dst,
        port_be: pkt.flow.dst_port_be,
        proto: pkt.flow.proto,
        family: pkt.flow.family,
    };
    // SAFETY: VIPS is not preallocated, so the value is not reused while we read it;
    // it is copied out at once.
    match unsafe { VIPS.get(&key) } {
        Some(meta) => Ok(*meta),
        None => Err(Stop::NotVip),
    }
}
