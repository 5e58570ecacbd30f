//! The connection tables: a known flow keeps the backend it was first given, whatever
//! happened to the weights or the lookup table since. One table per family, so that
//! IPv4 flows, the bulk of most traffic, carry a 16-byte key instead of 40.
//!
//! A TCP SYN opens a new connection (a client may reuse a port), which follows the
//! current weights, and its entry is written afresh; this is also what makes a
//! drained backend (weight 0) take no new connections while its established ones go
//! on. The one exception is a SYN the client retransmits because it had no answer
//! in time: if the table changed since the first one, the retry would reach another
//! backend, which resets the connection the client then opens with the first
//! backend's late answer. So a SYN reads the table too, and one whose flow has a
//! live entry (no FIN or RST from the client since, see [`mark_closing`]) naming
//! another backend than the table does goes where the first SYN went.

use lb_common::{
    maps::programs::REFERENCE_KEY,
    types::{CONN_CLOSING, ConnEntry, FAMILY_V4},
};

use crate::{
    events, keys,
    maps::{CONNS_V4, CONNS_V6},
    parse::Packet,
    share, stats,
};

/// The entry of the packet's flow, if the flow is known. Counting is the caller's:
/// what a found entry means depends on whether its VIP and backend still stand.
#[inline(always)]
pub fn find(pkt: &Packet) -> Option<ConnEntry> {
    // SAFETY: the entry is copied out at once; an LRU eviction racing with this read
    // can at worst give a stale entry, whose VIP and backend the caller validates.
    if pkt.family == FAMILY_V4 {
        unsafe { CONNS_V4.get(keys::ConnV4::new(pkt).key()) }.copied()
    } else {
        unsafe { CONNS_V6.get(keys::ConnV6::new(pkt).key()) }.copied()
    }
}

/// Marks the packet's flow as closing (the client sent a FIN or RST): from now on a
/// SYN with its addresses and ports opens a new connection. Written in place, once
/// per flow; a failed lookup (the entry just evicted) changes nothing.
#[inline(always)]
pub fn mark_closing(pkt: &Packet) {
    let entry = if pkt.family == FAMILY_V4 {
        CONNS_V4.get_ptr_mut(keys::ConnV4::new(pkt).key())
    } else {
        CONNS_V6.get_ptr_mut(keys::ConnV6::new(pkt).key())
    };
    if let Some(entry) = entry {
        // SAFETY: a map value, valid for the whole program run; a racing reader sees
        // the flag or not, either of which is a valid entry.
        unsafe { (*entry).vip_id |= CONN_CLOSING }
    }
}

/// Remembers a new flow's backend. A failed insert is counted (and logged, see
/// [`events`]) and the packet still goes out: the flow then follows the lookup
/// table, which is right until it changes.
#[inline(always)]
pub fn insert(pkt: &Packet, backend_id: u32, vip_id: u32, counters: stats::Global) {
    // A flow first seen by its FIN or RST (its entry lost) is closing already.
    let closing = if pkt.tcp_fin_rst { CONN_CLOSING } else { 0 };
    let entry = keys::Entry::new(backend_id, vip_id | closing);
    let failed = if pkt.family == FAMILY_V4 {
        let key = keys::ConnV4::new(pkt);
        let result = CONNS_V4
            .insert(key.key(), entry.value(), 0)
            .inspect_err(|&error| events::insert_failed_v4(key.key(), vip_id, error));
        if result.is_ok() && share::enabled() {
            // SAFETY: the key lives on this stack frame for the whole call.
            unsafe { share::report_v4(key.key(), backend_id, vip_id, share::guessed(pkt)) }
        }
        result.is_err()
    } else {
        let key = keys::ConnV6::new(pkt);
        let result = CONNS_V6
            .insert(key.key(), entry.value(), 0)
            .inspect_err(|&error| events::insert_failed_v6(key.key(), vip_id, error));
        if result.is_ok() && share::enabled() {
            // SAFETY: the key lives on this stack frame for the whole call.
            unsafe { share::report_v6(key.key(), backend_id, vip_id, share::guessed(pkt)) }
        }
        result.is_err()
    };
    if failed {
        stats::bump(counters, |s| &mut s.conn_insert_failed);
    }
}

/// The bench reference for a SYN's write: [`insert`]'s map update alone.
#[inline(always)]
pub fn reference_insert() -> bool {
    let key = keys::ConnV4::from_key(REFERENCE_KEY);
    CONNS_V4
        .insert(key.key(), keys::Entry::new(0, 0).value(), 0)
        .is_ok()
}

/// The bench reference for an established packet: [`find`]'s map lookup alone.
#[inline(always)]
pub fn reference_lookup() -> bool {
    // SAFETY: only the presence of the entry is read.
    unsafe { CONNS_V4.get(keys::ConnV4::from_key(REFERENCE_KEY).key()) }.is_some()
}
