//! The pure core: what the agent, the simulator and (next) a fleet leader compute the
//! same way, with no I/O, no clock, no async runtime and no configuration types.
//!
//! - [`control`]: the one control step of a VIP: readings, holds and the table in
//!   force in; weights, the new table and a decision per backend out.
//! - [`policy`]: the weight policy, as named stages.
//! - [`maglev`]: the weighted Maglev lookup table.
//! - [`model`]: the load model and its baselines.

pub mod control;
pub mod maglev;
pub mod model;
pub mod policy;

/// A backend of a VIP, as the datapath numbers it (its index in the backends map):
/// stable for as long as the backend stays configured, so the policy's state follows
/// the backend across reloads and restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
pub struct BackendId(pub u32);

impl std::fmt::Display for BackendId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "backend {}", self.0)
    }
}
