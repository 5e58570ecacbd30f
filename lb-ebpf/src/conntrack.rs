//! The connection table: a known flow keeps the backend it was first given, whatever
//! happened to the weights or the lookup table since.

use lb_common::types::{ConnEntry, PROTO_TCP};

use crate::{maps::CONNS, parse::Packet, stats};

/// The backend of a known flow, counting hits and misses. A miss on a TCP packet
/// that is not a SYN is a flow that began elsewhere (another LB, a restart that lost
/// the table) and may break: `conn_miss_non_syn` is the key health number.
#[inline(always)]
pub fn lookup(pkt: &Packet, counters: stats::Global) -> Option<u32> {
    // SAFETY: the entry is copied out at once; an LRU eviction racing with this read
    // can at worst give a stale backend id, which `table::backend` still validates.
    if let Some(entry) = unsafe { CONNS.get(&pkt.flow) } {
        stats::bump(counters, |s| &mut s.conn_hit);
        return Some(entry.backend_id);
    }
    if pkt.flow.proto == PROTO_TCP && !pkt.tcp_syn {
        stats::bump(counters, |s| &mut s.conn_miss_non_syn);
    } else {
        stats::bump(counters, |s| &mut s.conn_miss_syn);
    }
    None
}

/// Remembers a new flow's backend. A failed insert is counted and the packet still
/// goes out: the flow then follows the lookup table, which is right until it changes.
#[inline(always)]
pub fn insert(pkt: &Packet, backend_id: u32, vip_id: u32, counters: stats::Global) {
    let entry = ConnEntry { backend_id, vip_id };
    if CONNS.insert(&pkt.flow, &entry, 0).is_err() {
        stats::bump(counters, |s| &mut s.conn_insert_failed);
    }
}
