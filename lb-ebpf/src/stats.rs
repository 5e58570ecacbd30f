//! Named counters. Every update is skipped when its map lookup fails: counting never
//! changes a verdict. All counter maps are per CPU, so plain increments are safe.

use lb_common::types::{GlobalStats, GuardStats, NatStats};

use crate::{
    Stop,
    maps::{BACKEND_STATS, GUARD_STATS, NAT_STATS, STATS, VIP_STATS},
};

/// The datapath-wide counters of this CPU, looked up once per packet.
pub type Global = Option<*mut GlobalStats>;

#[inline(always)]
pub fn global() -> Global {
    STATS.get_ptr_mut(0)
}

#[inline(always)]
pub fn bump(counters: Global, field: impl FnOnce(&mut GlobalStats) -> &mut u64) {
    if let Some(s) = counters {
        // SAFETY: a per-CPU array value, valid for the whole program run.
        unsafe { *field(&mut *s) += 1 }
    }
}

/// Counts a flood-guard event (`GUARD_STATS`) on this CPU.
#[inline(always)]
pub fn guard(field: impl FnOnce(&mut GuardStats) -> &mut u64) {
    if let Some(g) = GUARD_STATS.get_ptr_mut(0) {
        // SAFETY: a per-CPU array value, valid for the whole program run.
        unsafe { *field(&mut *g) += 1 }
    }
}

/// Counts a full-NAT event (`NAT_STATS`) on this CPU.
#[inline(always)]
pub fn nat(field: impl FnOnce(&mut NatStats) -> &mut u64) {
    if let Some(n) = NAT_STATS.get_ptr_mut(0) {
        // SAFETY: a per-CPU array value, valid for the whole program run.
        unsafe { *field(&mut *n) += 1 }
    }
}

/// Counts why processing stopped. Full NAT's reasons have their own counters
/// (`NAT_STATS`), so that the pinned `STATS` keeps the layout older agents know.
#[inline(always)]
pub fn count_stop(counters: Global, stop: Stop) {
    match stop {
        Stop::NotIp => bump(counters, |s| &mut s.pass_not_ip),
        Stop::NotVip => bump(counters, |s| &mut s.pass_not_vip),
        Stop::Fragment => bump(counters, |s| &mut s.pass_fragment),
        Stop::Truncated => bump(counters, |s| &mut s.pass_truncated),
        Stop::Malformed => bump(counters, |s| &mut s.pass_malformed),
        Stop::Ipv6Extension => bump(counters, |s| &mut s.pass_ipv6_extension),
        Stop::IcmpOther => bump(counters, |s| &mut s.pass_icmp_other),
        Stop::NoBackend => bump(counters, |s| &mut s.drop_no_backend),
        Stop::EncapFailed => bump(counters, |s| &mut s.drop_encap_failed),
        Stop::NatPortsExhausted => nat(|n| &mut n.ports_exhausted),
        Stop::NatLost => nat(|n| &mut n.lost),
        Stop::NatUnknown => nat(|n| &mut n.reply_unknown),
    }
}

/// Per-VIP and per-backend packets, bytes and new flows.
#[inline(always)]
pub fn account(vip_id: u32, backend_id: u32, len: u64, new_flow: bool) {
    let new = new_flow as u64;
    if let Some(v) = VIP_STATS.get_ptr_mut(vip_id) {
        // SAFETY: a per-CPU array value, valid for the whole program run.
        unsafe {
            (*v).packets += 1;
            (*v).bytes += len;
            (*v).new_flows += new;
        }
    }
    if let Some(b) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as above.
        unsafe {
            (*b).packets += 1;
            (*b).bytes += len;
            (*b).new_flows += new;
        }
    }
}
