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
//!
//! # The flood guard: young tables
//!
//! A flood of spoofed SYNs (random sources and ports, a handshake never completed)
//! would write an entry per SYN, and the LRU would evict established flows' entries
//! to make room; their next packets would then follow the lookup table of now, and
//! break wherever it moved since they began. So, with the guard on (the default,
//! [`guard`]), a new flow's first packet writes its choice into a small young table
//! (`YOUNG_V4`/`YOUNG_V6`), and the flow enters the connection table only when the
//! client sends a second packet ([`promote`]): for TCP, the ACK that completes the
//! handshake, which a spoofed source never sends. A flood churns the young table
//! only. A real handshake whose young entry a flood pushed out still completes: its
//! ACK misses both tables, takes the lookup table, which has almost always not
//! moved within one round trip, and its next packet promotes it. The same rule
//! holds for UDP (a flow is kept once it sent two packets) and for TCP flows begun
//! elsewhere (their first packet here is not a SYN). A SYN whose flow is in the
//! connection table already (a client reusing its ports) is handled there, as
//! without the guard: it replaces no other flow's entry.

use lb_common::{
    maps::programs::REFERENCE_KEY,
    types::{CONN_CLOSING, CONN_GUESSED, CONN_NAT_MASK, CONN_VIP_MASK, ConnEntry, FAMILY_V4},
};

use crate::{
    events, keys,
    maps::{CONNS_V4, CONNS_V6, YOUNG_V4, YOUNG_V6},
    parse::Packet,
    share, stats,
};

/// Non-zero: new flows wait in the young tables (the default). Set by the agent at
/// load time (`lb_common::maps::FLOOD_GUARD_GLOBAL`); zero for `--no-flood-guard`.
#[unsafe(no_mangle)]
static FLOOD_GUARD: u8 = 1;

/// Whether the flood guard is on: a constant once the program is verified, so the
/// verifier removes the young tables' code when it is off.
#[inline(always)]
pub fn guard() -> bool {
    // SAFETY: a plain read of an initialised static; volatile, so that the compiler
    // does not fold the default in and the verifier sees the loaded value.
    unsafe { core::ptr::read_volatile(&FLOOD_GUARD) != 0 }
}

/// A connection-table entry of the packet's flow: its value as read, and where it
/// lies, so that a FIN or RST marks it closing without a second lookup.
#[derive(Clone, Copy)]
pub struct Found {
    pub entry: ConnEntry,
    slot: *mut ConnEntry,
}

/// The entry of the packet's flow, if the flow is known. Counting is the caller's:
/// what a found entry means depends on whether its VIP and backend still stand.
#[inline(always)]
pub fn find(pkt: &Packet) -> Option<Found> {
    let slot = if pkt.family == FAMILY_V4 {
        CONNS_V4.get_ptr_mut(keys::ConnV4::new(pkt).key())?
    } else {
        CONNS_V6.get_ptr_mut(keys::ConnV6::new(pkt).key())?
    };
    // SAFETY: a map value, valid for the whole program run; it is copied out at
    // once. An LRU eviction racing with this read can at worst give a stale entry,
    // whose VIP and backend the caller validates.
    let entry = unsafe { *slot };
    Some(Found { entry, slot })
}

/// The young entry of the packet's flow, if its first packet was seen and the
/// client has sent nothing since.
#[inline(always)]
pub fn find_young(pkt: &Packet) -> Option<ConnEntry> {
    // SAFETY: as in [`find`].
    if pkt.family == FAMILY_V4 {
        unsafe { YOUNG_V4.get(keys::ConnV4::new(pkt).key()) }.copied()
    } else {
        unsafe { YOUNG_V6.get(keys::ConnV6::new(pkt).key()) }.copied()
    }
}

/// Remembers a new flow's backend in the young table, until its second packet
/// ([`promote`]). A failed write is counted; the flow then follows the lookup table
/// until its next packet writes it again. `tag`: the VIP id with the flow's NAT
/// binding, if any (see `ConnEntry::vip_id`).
#[inline(always)]
pub fn insert_young(pkt: &Packet, backend_id: u32, tag: u32) {
    let mut flags = if pkt.tcp_fin_rst { CONN_CLOSING } else { 0 };
    if share::guessed(pkt) {
        flags |= CONN_GUESSED;
    }
    let entry = keys::Entry::new(backend_id, tag | flags);
    let result = if pkt.family == FAMILY_V4 {
        YOUNG_V4.insert(keys::ConnV4::new(pkt).key(), entry.value(), 0)
    } else {
        YOUNG_V6.insert(keys::ConnV6::new(pkt).key(), entry.value(), 0)
    };
    stats::guard(|g| {
        if result.is_ok() {
            &mut g.young
        } else {
            &mut g.young_failed
        }
    });
}

/// The client's second packet of a young flow: its entry moves into the connection
/// table (closing already if this packet is a FIN or RST) and leaves the young one.
/// Returns the entry as now written.
#[inline(always)]
pub fn promote(pkt: &Packet, young: ConnEntry, counters: stats::Global) -> ConnEntry {
    let closing = if pkt.tcp_fin_rst || young.closing() {
        CONN_CLOSING
    } else {
        0
    };
    let tag = young.vip_id & (CONN_VIP_MASK | CONN_NAT_MASK);
    write(
        pkt,
        young.backend_id,
        tag,
        closing,
        young.guessed(),
        counters,
    );
    // A failed delete leaves an entry the LRU ages out; a SYN that finds it finds
    // the flow in the connection table first.
    let _ = if pkt.family == FAMILY_V4 {
        YOUNG_V4.remove(keys::ConnV4::new(pkt).key())
    } else {
        YOUNG_V6.remove(keys::ConnV6::new(pkt).key())
    };
    stats::guard(|g| &mut g.promoted);
    ConnEntry {
        backend_id: young.backend_id,
        vip_id: tag | closing,
    }
}

/// Marks a found flow as closing (the client sent a FIN or RST): from now on a SYN
/// with its addresses and ports opens a new connection. Written in place, once per
/// flow, where [`find`] found it.
#[inline(always)]
pub fn mark_closing(found: &Found) {
    // SAFETY: a map value, valid for the whole program run (an entry evicted since
    // is freed only after it, RCU); a racing reader sees the flag or not, either of
    // which is a valid entry.
    unsafe { (*found.slot).vip_id |= CONN_CLOSING }
}

/// Remembers a new flow's backend. A failed insert is counted (and logged, see
/// [`events`]) and the packet still goes out: the flow then follows the lookup
/// table, which is right until it changes. `tag`: the VIP id with the flow's NAT
/// binding, if any.
#[inline(always)]
pub fn insert(pkt: &Packet, backend_id: u32, tag: u32, counters: stats::Global) {
    // A flow first seen by its FIN or RST (its entry lost) is closing already.
    let closing = if pkt.tcp_fin_rst { CONN_CLOSING } else { 0 };
    write(pkt, backend_id, tag, closing, share::guessed(pkt), counters);
}

/// Writes a connection-table entry, and reports it when sharing is on. A full-NAT
/// flow is not reported: its port is this LB's, and a peer could not serve it.
#[inline(always)]
fn write(
    pkt: &Packet,
    backend_id: u32,
    tag: u32,
    closing: u32,
    guessed: bool,
    counters: stats::Global,
) {
    let entry = keys::Entry::new(backend_id, tag | closing);
    let vip_id = tag & CONN_VIP_MASK;
    let report = share::enabled() && tag & CONN_NAT_MASK == 0;
    let failed = if pkt.family == FAMILY_V4 {
        let key = keys::ConnV4::new(pkt);
        let result = CONNS_V4
            .insert(key.key(), entry.value(), 0)
            .inspect_err(|&error| events::insert_failed_v4(key.key(), vip_id, error));
        if result.is_ok() && report {
            // SAFETY: the key lives on this stack frame for the whole call.
            unsafe { share::report_v4(key.key(), backend_id, vip_id, guessed) }
        }
        result.is_err()
    } else {
        let key = keys::ConnV6::new(pkt);
        let result = CONNS_V6
            .insert(key.key(), entry.value(), 0)
            .inspect_err(|&error| events::insert_failed_v6(key.key(), vip_id, error));
        if result.is_ok() && report {
            // SAFETY: the key lives on this stack frame for the whole call.
            unsafe { share::report_v6(key.key(), backend_id, vip_id, guessed) }
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
