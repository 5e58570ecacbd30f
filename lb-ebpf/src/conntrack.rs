//! The connection table: a known flow keeps the backend it was first given, whatever
//! happened to the weights or the lookup table since.
//!
//! A TCP SYN never reads the table: it opens a new connection (a client may reuse a
//! port), which must follow the current weights, and its entry is written afresh.
//! This is also what makes a drained backend (weight 0) take no new connections while
//! its established ones go on.

use lb_common::types::{ConnEntry, PROTO_TCP};

use crate::{maps::CONNS, parse::Packet, stats};

/// The backend of a known flow, counting hits and misses. A miss on a TCP packet
/// that is not a SYN is a flow that began elsewhere (another LB, a lost table) and
/// may break: `conn_miss_non_syn` is the key health number.
#[inline(always)]
pub fn lookup(pkt: &Packet, counters: stats::Global) -> Option<u32> {
    if pkt.tcp_syn {
        stats::bump(counters, |s| &mut s.conn_miss_syn);
        return None;
    }
    if let Some(backend_id) = peek(pkt) {
        stats::bump(counters, |s| &mut s.conn_hit);
        return Some(backend_id);
    }
    if pkt.flow.proto == PROTO_TCP {
        stats::bump(counters, |s| &mut s.conn_miss_non_syn);
    } else {
        stats::bump(counters, |s| &mut s.conn_miss_syn);
    }
    None
}

/// The backend of a known flow, without counting.
#[inline(always)]
pub fn peek(pkt: &Packet) -> Option<u32> {
    // SAFETY: the entry is copied out at once; an LRU eviction racing with this read
    // can at worst give a stale backend id, which `table::backend` still validates.
    unsafe { CONNS.get(&pkt.flow) }.map(|entry| entry.backend_id)
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
