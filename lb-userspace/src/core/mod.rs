//! The pure core: what the agent, the simulator and a fleet's leader compute the
//! same way, with no I/O, no clock, no async runtime and no configuration types.
//!
//! - [`control`]: the one control step of a VIP: readings, holds and the table in
//!   force in; weights, the new table and a decision per backend out.
//! - [`policy`]: the weight policy, as named stages.
//! - [`maglev`]: the weighted Maglev lookup table.
//! - [`model`]: the load model and its baselines.
//! - [`series`]: recorded load series (NAB's `timestamp,value` files), parsed.
//! - [`flood`]: telling a flood of new flows from a busy hour (the flood guard's
//!   counters in, the flood state out).

pub mod control;
pub mod flood;
pub mod maglev;
pub mod model;
pub mod policy;
pub mod series;

/// A backend of a VIP, as the datapath numbers it (its index in the backends map):
/// stable for as long as the backend stays configured, so the policy's state follows
/// the backend across reloads and restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
pub struct BackendId(pub u32);

/// FNV-1a 64 of `bytes`: for digests that must agree across machines (a config's,
/// a table's), not for anything an adversary chooses.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    maglev::fnv1a64(maglev::FNV_OFFSET_BASIS, bytes)
}

/// The digest of a lookup table, as 16 hex digits: FNV-1a 64 over its slots as
/// little-endian u32s. What the slots hold (datapath ids, configured indices) is the
/// caller's; two digests compare only when both hold the same kind.
pub fn table_digest<'a>(slots: impl IntoIterator<Item = &'a u32>) -> String {
    let digest = slots.into_iter().fold(maglev::FNV_OFFSET_BASIS, |h, s| {
        maglev::fnv1a64(h, &s.to_le_bytes())
    });
    format!("{digest:016x}")
}

impl std::fmt::Display for BackendId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "backend {}", self.0)
    }
}
