//! What LBs of a fleet write to etcd, as JSON values: each LB's [`NodeRecord`], the
//! leader's [`EpochRecord`] and the operators' [`HoldRecord`]s. Every record read
//! back is checked ([`NodeRecord::parse`] and the others): a value that does not
//! parse, or says something impossible, is refused with the key and the reason, and
//! the fleet goes on without it.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// One LB's record, written under its lease once per control interval: what it saw
/// of every backend (aggregates only) and what it has in force.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    pub node: String,
    /// [`crate::config::Config::digest`] of the configuration it runs.
    pub config_digest: String,
    /// The newest epoch it applied (0: none yet).
    pub epoch_applied: u64,
    /// Milliseconds since the Unix epoch when it was written (for display; ages are
    /// measured by the reader's own clock when the record arrives).
    pub written_ms: u64,
    pub vips: Vec<VipReport>,
    /// Where it receives the fleet's flows (`[cluster] share_listen`); absent when it
    /// does not share. (An LB of an earlier version refuses a record with this field,
    /// so turn sharing on once every LB runs this version.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<std::net::SocketAddr>,
}

/// One VIP as an LB reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipReport {
    /// The VIP as `address:port/protocol`.
    pub vip: String,
    /// The digest of the table it has in force, over each slot's backend index in
    /// configured order ([`crate::core::table_digest`]); `None` before it has one.
    pub digest: Option<String>,
    pub backends: Vec<BackendReport>,
}

/// What one LB saw of one backend over its last control interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendReport {
    pub address: IpAddr,
    /// New flows per second this LB sent it (its datapath's counters).
    pub flows_per_s: Option<f64>,
    /// Bytes per second this LB forwarded to it.
    pub bytes_per_s: Option<f64>,
    /// Its probes' verdict (true when not probed).
    pub healthy: bool,
    /// From the backend's metrics: requests per second it served (all LBs' share).
    pub requests_per_s: Option<f64>,
    /// From the backend's metrics: utilisation 0..=1.
    pub utilisation: Option<f64>,
    pub errors_per_s: Option<f64>,
    pub in_flight: Option<f64>,
    /// The latency a new flow suffers there (its metrics, else this LB's probe).
    pub latency_s: Option<f64>,
    /// This LB's forecast of that latency one interval ahead, and its predictor.
    pub predicted_s: Option<f64>,
    pub predictor: String,
}

/// The leader's decision: each VIP's weights and the digest of the table they give.
/// Epochs only grow; every LB applies the newest it has seen, never an older one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochRecord {
    pub epoch: u64,
    /// The node that published it.
    pub leader: String,
    /// The configuration digest it was decided for; an LB with another applies none.
    pub config_digest: String,
    pub written_ms: u64,
    pub vips: Vec<VipDecision>,
}

/// One VIP's part of an epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipDecision {
    pub vip: String,
    /// Digest of the table of these weights (as [`VipReport::digest`]).
    pub digest: String,
    /// Every backend, in configured order.
    pub backends: Vec<BackendDecision>,
}

/// One backend's weight in an epoch, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendDecision {
    pub address: IpAddr,
    /// In policy units, as the maps hold it.
    pub weight: u32,
    /// The decision as `lb explain` words it.
    pub reason: String,
}

/// An operator's hold on one backend, fleet-wide (`lb weight set/pin`, `lb drain`
/// on any LB). Not on a lease: it stays until an operator lifts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldRecord {
    pub vip: String,
    pub backend: IpAddr,
    pub hold: Hold,
    /// Which LB's control socket it was given on.
    pub by: String,
}

/// What a hold does, in configured weight units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hold {
    Set(u32),
    Pin(u32),
    Drain,
}

/// A record read from etcd that was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("etcd key {key}: {problem}")]
pub struct BadRecord {
    pub key: String,
    pub problem: String,
}

fn bad(key: &str, problem: impl Into<String>) -> BadRecord {
    BadRecord {
        key: key.to_owned(),
        problem: problem.into(),
    }
}

fn json<'a, T: Deserialize<'a>>(key: &str, value: &'a [u8]) -> Result<T, BadRecord> {
    serde_json::from_slice(value).map_err(|e| bad(key, format!("not a valid record: {e}")))
}

/// A measured value must be finite and not negative.
fn check_value(key: &str, what: &str, v: Option<f64>) -> Result<(), BadRecord> {
    match v {
        Some(v) if !v.is_finite() || v < 0.0 => {
            Err(bad(key, format!("{what} is {v}, not a finite value ≥ 0")))
        }
        _ => Ok(()),
    }
}

impl NodeRecord {
    /// Reads the record at `key` (whose last segment names the node), checking every
    /// value.
    pub fn parse(key: &str, node: &str, value: &[u8]) -> Result<NodeRecord, BadRecord> {
        let record: NodeRecord = json(key, value)?;
        if record.node != node {
            return Err(bad(
                key,
                format!("names node {:?}, but is stored as {node:?}", record.node),
            ));
        }
        for v in &record.vips {
            for b in &v.backends {
                let what = |field: &str| format!("{} backend {} {field}", v.vip, b.address);
                check_value(key, &what("flows_per_s"), b.flows_per_s)?;
                check_value(key, &what("bytes_per_s"), b.bytes_per_s)?;
                check_value(key, &what("requests_per_s"), b.requests_per_s)?;
                check_value(key, &what("errors_per_s"), b.errors_per_s)?;
                check_value(key, &what("in_flight"), b.in_flight)?;
                check_value(key, &what("latency_s"), b.latency_s)?;
                check_value(key, &what("predicted_s"), b.predicted_s)?;
                if let Some(u) = b.utilisation
                    && !(0.0..=1.0).contains(&u)
                {
                    return Err(bad(
                        key,
                        format!("{} is {u}, not in 0..=1", what("utilisation")),
                    ));
                }
            }
        }
        Ok(record)
    }
}

impl EpochRecord {
    pub fn parse(key: &str, value: &[u8]) -> Result<EpochRecord, BadRecord> {
        let record: EpochRecord = json(key, value)?;
        if record.epoch == 0 {
            return Err(bad(key, "epoch 0: epochs start at 1"));
        }
        for v in &record.vips {
            if v.backends.iter().all(|b| b.weight == 0) {
                return Err(bad(
                    key,
                    format!("epoch {} leaves VIP {} without weight", record.epoch, v.vip),
                ));
            }
        }
        Ok(record)
    }

    /// This epoch's decision for `vip`.
    pub fn vip(&self, vip: &str) -> Option<&VipDecision> {
        self.vips.iter().find(|v| v.vip == vip)
    }
}

impl HoldRecord {
    pub fn parse(key: &str, value: &[u8]) -> Result<HoldRecord, BadRecord> {
        let record: HoldRecord = json(key, value)?;
        if let Hold::Set(w) | Hold::Pin(w) = record.hold
            && w > crate::config::MAX_WEIGHT
        {
            return Err(bad(
                key,
                format!("weight {w} is above {}", crate::config::MAX_WEIGHT),
            ));
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeRecord {
        NodeRecord {
            node: "lb-a".into(),
            config_digest: "00".into(),
            epoch_applied: 3,
            written_ms: 1,
            share: Some("198.18.0.2:7947".parse().unwrap()),
            vips: vec![VipReport {
                vip: "198.18.1.1:80/tcp".into(),
                digest: Some("ab".into()),
                backends: vec![BackendReport {
                    address: "198.18.0.11".parse().unwrap(),
                    flows_per_s: Some(10.0),
                    bytes_per_s: None,
                    healthy: true,
                    requests_per_s: None,
                    utilisation: Some(0.5),
                    errors_per_s: None,
                    in_flight: None,
                    latency_s: Some(0.01),
                    predicted_s: None,
                    predictor: "ewma".into(),
                }],
            }],
        }
    }

    #[test]
    fn a_node_record_round_trips() {
        let text = serde_json::to_vec(&node()).unwrap();
        assert_eq!(NodeRecord::parse("k", "lb-a", &text).unwrap(), node());
    }

    #[test]
    fn bad_records_are_refused_with_the_key_and_the_reason() {
        let text = serde_json::to_vec(&node()).unwrap();
        let e = NodeRecord::parse("/lb/x/state/nodes/lb-b", "lb-b", &text).unwrap_err();
        assert!(e.to_string().contains("/lb/x/state/nodes/lb-b"), "{e}");
        assert!(e.to_string().contains("lb-a"), "{e}");

        let mut n = node();
        n.vips[0].backends[0].utilisation = Some(7.0);
        let e = NodeRecord::parse("k", "lb-a", &serde_json::to_vec(&n).unwrap()).unwrap_err();
        assert!(e.problem.contains("utilisation is 7"), "{e}");

        let e = NodeRecord::parse("k", "lb-a", b"{\"node\": 1}").unwrap_err();
        assert!(e.problem.contains("not a valid record"), "{e}");

        let mut n = serde_json::to_value(node()).unwrap();
        n["vips"][0]["backends"][0]["latency_s"] = serde_json::json!(-1.0);
        let e = NodeRecord::parse("k", "lb-a", n.to_string().as_bytes()).unwrap_err();
        assert!(e.problem.contains("latency_s is -1"), "{e}");
    }

    #[test]
    fn an_epoch_that_leaves_a_vip_without_weight_is_refused() {
        let epoch = EpochRecord {
            epoch: 2,
            leader: "lb-a".into(),
            config_digest: "00".into(),
            written_ms: 0,
            vips: vec![VipDecision {
                vip: "v".into(),
                digest: "d".into(),
                backends: vec![BackendDecision {
                    address: "198.18.0.11".parse().unwrap(),
                    weight: 0,
                    reason: "drained".into(),
                }],
            }],
        };
        let e = EpochRecord::parse("k", &serde_json::to_vec(&epoch).unwrap()).unwrap_err();
        assert!(e.problem.contains("without weight"), "{e}");
    }

    #[test]
    fn holds_round_trip_and_weights_are_bounded() {
        let hold = HoldRecord {
            vip: "v".into(),
            backend: "198.18.0.11".parse().unwrap(),
            hold: Hold::Pin(3),
            by: "lb-a".into(),
        };
        let text = serde_json::to_vec(&hold).unwrap();
        assert_eq!(HoldRecord::parse("k", &text).unwrap(), hold);
        let big = HoldRecord {
            hold: Hold::Set(u32::MAX),
            ..hold
        };
        let e = HoldRecord::parse("k", &serde_json::to_vec(&big).unwrap()).unwrap_err();
        assert!(e.problem.contains("above"), "{e}");
    }
}
