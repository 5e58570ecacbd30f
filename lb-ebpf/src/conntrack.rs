//! The connection tables: a known flow keeps the backend it was first given, whatever
//! happened to the weights or the lookup table since. One table per family, so that
//! IPv4 flows, the bulk of most traffic, carry a 16-byte key instead of 40.
//!
//! A TCP SYN never reads the table: it opens a new connection (a client may reuse a
//! port), which must follow the current weights, and its entry is written afresh.
//! This is also what makes a drained backend (weight 0) take no new connections while
//! its established ones go on.

use lb_common::types::{ConnEntry, ConnKeyV4, ConnKeyV6, FAMILY_V4};

use crate::{
    maps::{CONNS_V4, CONNS_V6},
    parse::Packet,
    stats,
};

#[inline(always)]
fn key_v4(pkt: &Packet) -> ConnKeyV4 {
    ConnKeyV4 {
        src: pkt.src[0],
        dst: pkt.dst[0],
        src_port_be: pkt.src_port_be,
        dst_port_be: pkt.dst_port_be,
        proto: u32::from(pkt.proto),
    }
}

#[inline(always)]
fn key_v6(pkt: &Packet) -> ConnKeyV6 {
    ConnKeyV6 {
        src: pkt.src,
        dst: pkt.dst,
        src_port_be: pkt.src_port_be,
        dst_port_be: pkt.dst_port_be,
        proto: u32::from(pkt.proto),
    }
}

/// The entry of the packet's flow, if the flow is known. Counting is the caller's:
/// what a found entry means depends on whether its VIP and backend still stand.
#[inline(always)]
pub fn find(pkt: &Packet) -> Option<ConnEntry> {
    // SAFETY: the entry is copied out at once; an LRU eviction racing with this read
    // can at worst give a stale entry, whose VIP and backend the caller validates.
    if pkt.family == FAMILY_V4 {
        unsafe { CONNS_V4.get(&key_v4(pkt)) }.copied()
    } else {
        unsafe { CONNS_V6.get(&key_v6(pkt)) }.copied()
    }
}

/// Remembers a new flow's backend. A failed insert is counted and the packet still
/// goes out: the flow then follows the lookup table, which is right until it changes.
#[inline(always)]
pub fn insert(pkt: &Packet, backend_id: u32, vip_id: u32, counters: stats::Global) {
    let entry = ConnEntry { backend_id, vip_id };
    let inserted = if pkt.family == FAMILY_V4 {
        CONNS_V4.insert(&key_v4(pkt), &entry, 0)
    } else {
        CONNS_V6.insert(&key_v6(pkt), &entry, 0)
    };
    if inserted.is_err() {
        stats::bump(counters, |s| &mut s.conn_insert_failed);
    }
}
