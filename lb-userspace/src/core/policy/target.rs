//! The target stage: the weight each backend starts from the first time a policy
//! sees it, and each policy's unnormalized target (`reactive`: Envoy's capacity;
//! `ai`: that capacity, cut when its predicted latency is well above the others').

use super::capacity::{capacities, strained, with_errors, with_fallback};
use super::shed::DRAIN_S;
use super::{Input, Params, PolicyKind};

/// The weight each backend starts from the first time a policy sees it (in
/// `inputs` order), computed once per update: the agent calls the policy every
/// interval for up to thousands of backends.
pub(super) fn initial_weights(kind: PolicyKind, params: &Params, inputs: &[Input]) -> Vec<u32> {
    let n = inputs.len().max(1) as f64;
    let total: f64 = inputs.iter().map(|i| i.configured_weight as f64).sum();
    inputs
        .iter()
        .map(|input| match kind {
            PolicyKind::Equal => params.unit,
            PolicyKind::Static => input.configured_weight.saturating_mul(params.unit),
            _ if total > 0.0 => {
                (params.scale as f64 * input.configured_weight as f64 / total) as u32
            }
            _ => (params.scale as f64 / n) as u32,
        })
        .collect()
}

/// Each backend's unnormalized target (only ratios among free backends matter).
pub(super) fn targets(
    kind: PolicyKind,
    params: &Params,
    inputs: &[Input],
    before: &[u32],
) -> Vec<f64> {
    match kind {
        PolicyKind::Equal => inputs.iter().map(|_| 1.0).collect(),
        PolicyKind::Static => inputs.iter().map(|i| i.configured_weight as f64).collect(),
        PolicyKind::Reactive => {
            // Envoy CSWRR: qps / (utilisation + penalty · eps/qps). Backends without
            // observations keep what they have.
            with_fallback(&capacities(params.error_penalty, inputs), before)
        }
        PolicyKind::Ai => {
            // Headroom: what each backend has shown it can carry (Envoy's capacity,
            // so that a backend failing fast does not look idle and huge), cut when
            // its predicted latency is well above the others'.
            let shown = capacities(params.error_penalty, inputs);
            let capacity = with_fallback(&shown, before);
            let preds = expected_latencies(params, inputs);
            let Some(reference) = weighted_median(&preds, before) else {
                return capacity;
            };
            let drained = drains_by_itself(params, inputs, &shown, before);
            preds
                .iter()
                .zip(capacity)
                .enumerate()
                .map(|(k, (p, c))| match p {
                    // Its latency is a queue it is working off by itself: it will
                    // answer like the others, errors still counted.
                    Some(_) if drained[k] => {
                        let raw = inputs[k].predicted_s.unwrap_or(reference);
                        let p = with_errors(params, &inputs[k], raw.min(reference));
                        c * latency_factor(params, reference / p)
                    }
                    Some(p) => c * latency_factor(params, reference / p),
                    None => c,
                })
                .collect()
        }
    }
}

/// The latency `ai` expects of each backend one interval ahead, errors counted
/// ([`with_errors`]); `None` where nothing is predicted. Their traffic-weighted
/// median is `ai`'s reference: one slow backend does not drag it along (a mean
/// would call a backend four times slower than three others only 2.3 times the
/// reference).
pub(super) fn expected_latencies(params: &Params, inputs: &[Input]) -> Vec<Option<f64>> {
    inputs
        .iter()
        .map(|i| {
            let p = i.predicted_s.filter(|p| p.is_finite() && *p > 0.0)?;
            Some(with_errors(params, i, p))
        })
        .collect()
}

/// How much `ai` scales a backend's shown capacity when its predicted latency is
/// `ratio` times faster than the reference: 1 within the dead band (a factor of
/// [`Params::latency_band`], where differences between backends are mostly noise of
/// their queues) and on the faster side, and beyond the band's slower edge the ratio
/// to the power [`Params::gain`]. Continuous, so that a backend near the edge does not
/// jump. Never above 1: a backend is given at most the capacity it has shown, however
/// fast it answers. Answering faster than the median is what a backend with room does
/// when the others queue (after a burst, the backends that drained first answered in
/// a service time while the median was still queued, and raising them 10 to 900×
/// their capacity moved every weight of the pool); its capacity already says how
/// much it can take.
pub(super) fn latency_factor(params: &Params, ratio: f64) -> f64 {
    let band = params.latency_band.max(1.0).ln();
    let slower = -ratio.ln();
    (-(slower - band).max(0.0) * params.gain).exp()
}

/// Whether each backend is draining a queue that is the past: it is strained (busy
/// working the queue off), a new request there would wait (`in_flight / shown`)
/// less than half the observed latency of the requests it answered (the queue has at
/// least halved since they arrived; the prediction, from a model that has seen
/// bursts, can already be lower than that), and what is left drains by itself within
/// [`DRAIN_S`] (the time `ai` gives a shed backend's backlog) at the rate its weight
/// sends it requests: `in_flight ≤ (shown − arrivals) · DRAIN_S`. The arrivals are its
/// weight times the responses per second per unit of weight of the backends that are
/// not strained (their responses are their arrivals; a backend draining a queue
/// answers faster than it receives), or of all backends when every one is. After a
/// burst every backend drains the queue it built, and they finish a second or two
/// apart: the last ones answer old requests late while the median is back to a
/// service time, and a cut for that latency landed after their queue was gone, then
/// took many updates to win back.
fn drains_by_itself(
    params: &Params,
    inputs: &[Input],
    shown: &[Option<f64>],
    before: &[u32],
) -> Vec<bool> {
    let per_weight = |pick: &dyn Fn(&Input) -> bool| -> Option<f64> {
        let (mut qps, mut weight) = (0.0, 0.0);
        for (i, &w) in inputs.iter().zip(before) {
            if let Some(q) = i.qps.filter(|q| q.is_finite() && *q >= 0.0)
                && pick(i)
            {
                qps += q;
                weight += w as f64;
            }
        }
        (weight > 0.0).then(|| qps / weight)
    };
    let Some(rate) = per_weight(&|i| !strained(params, i)).or_else(|| per_weight(&|_| true)) else {
        return vec![false; inputs.len()];
    };
    inputs
        .iter()
        .zip(shown)
        .zip(before)
        .map(|((i, c), &w)| {
            let (Some(in_flight), Some(c)) = (i.in_flight.filter(|v| v.is_finite()), *c) else {
                return false;
            };
            let shrunk = i.latency_s.is_some_and(|l| in_flight / c < l / 2.0);
            shrunk && strained(params, i) && in_flight <= (c - rate * w as f64) * DRAIN_S
        })
        .collect()
}

/// The median of the known `values`, each counted with its weight: the smallest
/// value at or below which at least half the weight lies. `None` if no known value
/// has weight.
pub(super) fn weighted_median(values: &[Option<f64>], weights: &[u32]) -> Option<f64> {
    let mut known: Vec<(f64, f64)> = values
        .iter()
        .zip(weights)
        .filter_map(|(v, &w)| Some((*v.as_ref()?, w as f64)))
        .filter(|&(_, w)| w > 0.0)
        .collect();
    let total: f64 = known.iter().map(|&(_, w)| w).sum();
    known.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut below = 0.0;
    for (v, w) in known {
        below += w;
        if below >= total / 2.0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_within_the_band_changes_nothing_and_beyond_it_scales() {
        let p = Params::default();
        assert_eq!(latency_factor(&p, 1.0), 1.0);
        assert_eq!(latency_factor(&p, 2.9), 1.0);
        assert_eq!(latency_factor(&p, 1.0 / 2.9), 1.0);
        // Four times slower than the reference: a third of the band's edge.
        assert!((latency_factor(&p, 0.25) - 0.75).abs() < 1e-12);
        assert!((latency_factor(&p, 1.0 / 6.0) - 0.5).abs() < 1e-12);
        // Faster, however much, never raises a backend above its shown capacity.
        assert_eq!(latency_factor(&p, 6.0), 1.0);
        assert_eq!(latency_factor(&p, 1000.0), 1.0);
    }

    /// Four backends at half load; the first busy with `in_flight` requests, its
    /// answered requests `latency_s` old, predicted `predicted_s` (the others 3 ms):
    /// its target against another's.
    fn draining(in_flight: f64, latency_s: f64, predicted_s: f64) -> f64 {
        let p = Params {
            interval_s: 0.5,
            ..Params::default()
        };
        let inputs: Vec<Input> = (0..4)
            .map(|k| Input {
                healthy: true,
                qps: Some(if k == 0 { 1600.0 } else { 800.0 }),
                utilisation: Some(if k == 0 { 1.0 } else { 0.5 }),
                in_flight: Some(if k == 0 { in_flight } else { 2.0 }),
                latency_s: Some(if k == 0 { latency_s } else { 0.003 }),
                predicted_s: Some(if k == 0 { predicted_s } else { 0.003 }),
                ..Input::default()
            })
            .collect();
        let t = targets(PolicyKind::Ai, &p, &inputs, &[1000; 4]);
        t[0] / t[1]
    }

    #[test]
    fn a_queue_that_drains_by_itself_is_no_reason_to_cut() {
        // 400 in flight at 1,600/s: a new request waits 0.25 s, a quarter of what
        // its answered requests took, and at 800/s of arrivals the queue is gone
        // in half a second. It keeps its capacity (as much as the others').
        assert!((draining(400.0, 1.0, 1.0) - 1.0).abs() < 1e-9);
        // The same when the model already predicts less than the observed latency.
        assert!((draining(400.0, 1.0, 0.3) - 1.0).abs() < 1e-9);
        // A queue that has not shrunk (a new request waits 0.625 s of 1 s) is cut.
        assert!(draining(1000.0, 1.0, 1.0) < 0.01);
        // So is one that would outlast the drain time (1,800 in flight, 2.25 s).
        assert!(draining(1800.0, 4.0, 4.0) < 0.01);
    }

    #[test]
    fn the_weighted_median_ignores_unknown_and_weightless_values() {
        let v = [Some(1.0), Some(10.0), None, Some(100.0)];
        assert_eq!(weighted_median(&v, &[1, 1, 50, 1]), Some(10.0));
        assert_eq!(weighted_median(&v, &[5, 1, 0, 1]), Some(1.0));
        assert_eq!(weighted_median(&[None, Some(2.0)], &[1, 0]), None);
    }

    #[test]
    fn initial_weights_follow_the_policy() {
        let p = Params {
            scale: 600,
            unit: 10,
            ..Params::default()
        };
        let inputs: Vec<Input> = [1, 2, 3]
            .map(|w| Input {
                configured_weight: w,
                ..Input::default()
            })
            .to_vec();
        assert_eq!(
            initial_weights(PolicyKind::Equal, &p, &inputs),
            vec![10, 10, 10]
        );
        assert_eq!(
            initial_weights(PolicyKind::Static, &p, &inputs),
            vec![10, 20, 30]
        );
        assert_eq!(
            initial_weights(PolicyKind::Ai, &p, &inputs),
            vec![100, 200, 300]
        );
    }
}
