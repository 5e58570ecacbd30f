//! The fleet's view of each backend: every LB's report combined, so that the leader
//! runs the same control step a single agent would, on what all LBs together saw.
//! Pure.
//!
//! - Flows per second are each LB's own share of the traffic: summed.
//! - What comes from the backend's own metrics (requests per second, utilisation,
//!   errors, in flight) describes the backend, not one LB's share, and each LB scrapes
//!   it: the median, so one LB's bad scrape moves nothing.
//! - Latency and the forecast: the median over the LBs that have one.
//! - Health: out when at least half of the LBs that report it say so (a tie goes to
//!   safety). Each LB also takes a backend its own probes fail out of its own table at
//!   once, whatever the fleet says (see `agent::fleet`).

use std::{collections::BTreeMap, net::IpAddr};

use super::records::{BackendReport, NodeRecord};
use crate::core::control::Observation;

/// One backend as the fleet saw it over the last interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    pub seen: Observation,
    pub healthy: bool,
    pub predicted_s: Option<f64>,
    /// The predictor most LBs used for that forecast.
    pub predictor: String,
    /// How many LBs reported the backend.
    pub reporters: usize,
}

/// Every backend's reports over `records`, by (VIP, address).
pub fn index<'a>(
    records: impl IntoIterator<Item = &'a NodeRecord>,
) -> BTreeMap<(&'a str, IpAddr), Vec<&'a BackendReport>> {
    let mut out: BTreeMap<(&str, IpAddr), Vec<&BackendReport>> = BTreeMap::new();
    for r in records {
        for v in &r.vips {
            for b in &v.backends {
                out.entry((v.vip.as_str(), b.address)).or_default().push(b);
            }
        }
    }
    out
}

/// The reports of one backend combined; `None` when no LB reported it.
pub fn merge(reports: &[&BackendReport]) -> Option<Merged> {
    if reports.is_empty() {
        return None;
    }
    let median_of =
        |f: fn(&BackendReport) -> Option<f64>| median(reports.iter().filter_map(|r| f(r)));
    let flows: Vec<f64> = reports.iter().filter_map(|r| r.flows_per_s).collect();
    let qps =
        median_of(|r| r.requests_per_s).or_else(|| (!flows.is_empty()).then(|| flows.iter().sum()));
    let unhealthy = reports.iter().filter(|r| !r.healthy).count();
    let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
    for r in reports.iter().filter(|r| r.predicted_s.is_some()) {
        *votes.entry(r.predictor.as_str()).or_default() += 1;
    }
    // The most votes; among equals, the first name (a BTreeMap iterates in order and
    // `max_by_key` keeps the last maximum, hence the reversed iteration).
    let predictor = votes
        .iter()
        .rev()
        .max_by_key(|&(_, n)| *n)
        .map(|(name, _)| (*name).to_owned())
        .unwrap_or_default();
    Some(Merged {
        seen: Observation {
            qps,
            utilisation: median_of(|r| r.utilisation),
            errors_per_s: median_of(|r| r.errors_per_s),
            latency_s: median_of(|r| r.latency_s),
            in_flight: median_of(|r| r.in_flight),
        },
        healthy: unhealthy * 2 < reports.len(),
        predicted_s: median_of(|r| r.predicted_s),
        predictor,
        reporters: reports.len(),
    })
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(flows: f64, healthy: bool, latency: Option<f64>) -> BackendReport {
        BackendReport {
            address: "198.18.0.11".parse().unwrap(),
            flows_per_s: Some(flows),
            bytes_per_s: None,
            healthy,
            requests_per_s: None,
            utilisation: None,
            errors_per_s: None,
            in_flight: None,
            latency_s: latency,
            predicted_s: latency.map(|l| l * 2.0),
            predictor: "ewma".into(),
        }
    }

    #[test]
    fn flows_add_up_and_latency_is_the_median() {
        let rs = [
            report(10.0, true, Some(0.010)),
            report(20.0, true, Some(0.500)),
            report(30.0, true, Some(0.020)),
        ];
        let m = merge(&rs.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(m.seen.qps, Some(60.0));
        assert_eq!(
            m.seen.latency_s,
            Some(0.020),
            "one LB's outlier moves nothing"
        );
        assert_eq!(m.predicted_s, Some(0.040));
        assert_eq!(m.predictor, "ewma");
        assert_eq!(m.reporters, 3);
        assert!(m.healthy);
    }

    #[test]
    fn the_backends_own_request_rate_wins_over_the_sum_of_flows() {
        let mut rs = [report(10.0, true, None), report(20.0, true, None)];
        rs[0].requests_per_s = Some(100.0);
        rs[1].requests_per_s = Some(110.0);
        let m = merge(&rs.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(m.seen.qps, Some(105.0));
    }

    #[test]
    fn health_is_out_when_half_the_lbs_say_so() {
        let two = [report(1.0, true, None), report(1.0, false, None)];
        assert!(
            !merge(&two.iter().collect::<Vec<_>>()).unwrap().healthy,
            "a tie is out"
        );
        let three = [
            report(1.0, true, None),
            report(1.0, true, None),
            report(1.0, false, None),
        ];
        assert!(merge(&three.iter().collect::<Vec<_>>()).unwrap().healthy);
        assert!(merge(&[]).is_none());
    }

    /// The leader runs the same step on merged inputs: a backend failing every
    /// request, as three LBs scrape it (one of them without its error counter), is
    /// ejected at the first step, and one LB's scrape showing errors on a healthy
    /// backend ejects nothing.
    #[test]
    fn a_failing_backend_is_ejected_on_merged_inputs() {
        use crate::core::BackendId;
        use crate::core::policy::{self, Input, Params, PolicyKind, State};
        let scrape = |requests: f64, errors: Option<f64>| BackendReport {
            requests_per_s: Some(requests),
            utilisation: Some(if errors == Some(requests) { 0.0 } else { 0.5 }),
            errors_per_s: errors,
            in_flight: Some(1.0),
            ..report(requests / 3.0, true, Some(0.010))
        };
        let inputs: Vec<Input> = (0..4)
            .map(|k| {
                let errors = match k {
                    0 => [Some(100.0), Some(100.0), None],
                    1 => [Some(90.0), Some(0.0), Some(0.0)],
                    _ => [Some(0.0); 3],
                };
                let reports: Vec<BackendReport> =
                    errors.iter().map(|&e| scrape(100.0, e)).collect();
                let m = merge(&reports.iter().collect::<Vec<_>>()).unwrap();
                Input {
                    healthy: m.healthy,
                    predicted_s: m.predicted_s,
                    ..Input::observed(BackendId(k), 1, m.seen, None)
                }
            })
            .collect();
        for kind in [PolicyKind::Reactive, PolicyKind::Ai] {
            let (w, d) = policy::step(kind, &Params::default(), &mut State::default(), &inputs);
            assert_eq!(w[0], 0, "{kind}: {w:?}");
            assert!(d[0].ejected(), "{kind}: {:?}", d[0]);
            assert!(d[1..].iter().all(|d| !d.ejected()), "{kind}: {d:?}");
        }
    }

    #[test]
    fn the_index_groups_reports_by_vip_and_backend() {
        use super::super::records::{NodeRecord, VipReport};
        let record = |node: &str, flows: f64| NodeRecord {
            node: node.into(),
            config_digest: "d".into(),
            epoch_applied: 0,
            written_ms: 0,
            share: None,
            vips: vec![VipReport {
                vip: "v".into(),
                digest: None,
                backends: vec![report(flows, true, None)],
            }],
        };
        let records = [record("a", 1.0), record("b", 2.0)];
        let index = index(&records);
        let reports = &index[&("v", "198.18.0.11".parse().unwrap())];
        assert_eq!(reports.len(), 2);
        assert_eq!(merge(reports).unwrap().seen.qps, Some(3.0));
    }
}
