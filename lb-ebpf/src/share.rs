//! Flow sharing: each connection entry the datapath writes is also reported to the
//! agent, which sends it to the fleet's other LBs (`lb-userspace/src/share/`). When
//! ECMP moves a flow to one of them (its LB withdrawn or dead), that LB finds the
//! entry and keeps the flow on its backend, even if the lookup table moved since the
//! flow began.
//!
//! # Off costs the packet path nothing
//!
//! Sharing is on only for an agent in a fleet with `[cluster] share_listen`. The
//! agent sets [`SHARE_FLOWS`], a byte in the program's read-only data, when it loads
//! the program; aya freezes that map before the program is verified, so the verifier
//! knows the byte as a constant and removes the call to [`report`] when it is zero
//! (as for the log records, see [`crate::events`]).
//!
//! # The datapath never waits
//!
//! A record is reserved in the `SHARED_FLOWS` ring buffer and submitted without
//! waking the agent (it drains the ring on a timer). A full ring refuses the
//! reservation at once: the flow is forwarded as always, only not shared, and
//! counted (`ring_full`). The flows refused are the newest ones, so when sharing
//! cannot keep up (a flood of new flows) it is the youngest flows that go unshared.
//!
//! Reporting is done in a function of its own, never inlined, that reads the key
//! from the caller's stack by pointer, so the packet path's stack frame is unchanged.

use aya_ebpf::bindings::BPF_RB_NO_WAKEUP;
use lb_common::types::{
    ConnKeyV4, ConnKeyV6, FAMILY_V4, FAMILY_V6, PROTO_TCP, SHARED_F_GUESSED, ShareStats, SharedFlow,
};

use crate::{
    maps::{SHARE_STATS, SHARED_FLOWS},
    parse::Packet,
};

/// Non-zero: report new connection entries. Set by the agent at load time
/// (`lb_common::maps::SHARE_FLOWS_GLOBAL`).
#[unsafe(no_mangle)]
static SHARE_FLOWS: u8 = 0;

/// Whether sharing is on: a constant once the program is verified.
#[inline(always)]
pub fn enabled() -> bool {
    // SAFETY: a plain read of an initialised static; volatile, so that the compiler
    // does not fold the default in and the verifier sees the loaded value.
    unsafe { core::ptr::read_volatile(&SHARE_FLOWS) != 0 }
}

/// Whether the datapath guessed the flow's backend: a TCP flow first seen without
/// its SYN got the table's choice of now.
#[inline(always)]
pub fn guessed(pkt: &Packet) -> bool {
    pkt.proto == PROTO_TCP && !pkt.tcp_syn
}

/// Reports an IPv4 entry. `guessed`: the flow was not seen to begin here.
///
/// # Safety
/// `key` must point at a valid key (on the caller's stack).
#[inline(never)]
pub unsafe fn report_v4(key: *const ConnKeyV4, backend_id: u32, vip_id: u32, guessed: bool) {
    // SAFETY: the caller's pointer is valid for this call.
    let k = unsafe { &*key };
    let key = ConnKeyV6 {
        src: [k.src, 0, 0, 0],
        dst: [k.dst, 0, 0, 0],
        src_port_be: k.src_port_be,
        dst_port_be: k.dst_port_be,
        proto: k.proto,
    };
    report(&key, FAMILY_V4, backend_id, vip_id, guessed);
}

/// Reports an IPv6 entry. `guessed`: the flow was not seen to begin here.
///
/// # Safety
/// `key` must point at a valid key (on the caller's stack).
#[inline(never)]
pub unsafe fn report_v6(key: *const ConnKeyV6, backend_id: u32, vip_id: u32, guessed: bool) {
    // SAFETY: the caller's pointer is valid for this call.
    report(unsafe { &*key }, FAMILY_V6, backend_id, vip_id, guessed);
}

#[inline(always)]
fn report(key: &ConnKeyV6, family: u8, backend_id: u32, vip_id: u32, guessed: bool) {
    let stats = SHARE_STATS.get_ptr_mut(0);
    let Some(mut entry) = SHARED_FLOWS.reserve::<SharedFlow>(0) else {
        count(stats, |s| &mut s.ring_full);
        return;
    };
    entry.write(SharedFlow {
        key: *key,
        backend_id,
        vip_id,
        family,
        flags: if guessed { SHARED_F_GUESSED } else { 0 },
        _pad: [0; 6],
    });
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
    count(stats, |s| &mut s.reported);
}

#[inline(always)]
fn count(stats: Option<*mut ShareStats>, field: impl FnOnce(&mut ShareStats) -> &mut u64) {
    if let Some(s) = stats {
        // SAFETY: a per-CPU array value, valid for the whole program run.
        unsafe { *field(&mut *s) += 1 }
    }
}
