//! The fleet: several LBs behind ECMP that apply one decision, coordinated through
//! etcd (the `[cluster]` section; without it, an LB decides alone).
//!
//! Every LB writes, once per control interval and under its own lease, what it saw of
//! each backend ([`records::NodeRecord`]: aggregates only) and its configuration's
//! digest. One LB leads, through etcd's election API on its lease. Every LB merges
//! the records of the LBs whose configuration digest equals its own ([`merge`]) and
//! runs the same control step a single agent runs on them, so a new leader starts
//! warm; the leader publishes the result as the next epoch
//! ([`records::EpochRecord`]) in a transaction conditioned on its election key
//! ([`etcd::Etcd::publish`]): a deposed leader cannot publish. Every LB, the leader
//! too, applies the newest epoch it has seen and never an older one, through the
//! same atomic table switch as a single agent. See `agent::fleet` for that side.
//!
//! - [`records`]: the values in etcd, checked when read;
//! - [`merge`]: the fleet's view of a backend from every LB's report (pure);
//! - [`etcd`]: the key layout, connecting (TLS), snapshot, fenced publication;
//! - [`session`]: the task that holds the lease and the watch for the agent.

pub mod etcd;
pub mod merge;
pub mod records;
pub mod session;

use std::{path::PathBuf, time::Duration};

/// Why the link to etcd failed; the agent goes on with the last epoch it applied.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("reading {field} {}", path.display())]
    TlsFile {
        field: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd: {what}")]
    Etcd {
        what: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd: {what}: no answer within {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("etcd: {0}")]
    Lost(String),
    #[error("not connected to etcd")]
    Disconnected,
    #[error("etcd refused this LB's epoch: another LB leads now")]
    Fenced,
}
