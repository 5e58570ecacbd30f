//! What each backend has shown it can carry, from the last interval's observations:
//! Envoy's capacity figure, whether a backend is strained, and what its errors cost.
//! Read by the target, shed and hand-over stages.

use super::{Input, Params};

/// Requests a backend must have answered in the last interval for its shown
/// capacity to decide a shed: with fewer, one interval's count is mostly noise.
/// Kept low on purpose: a backend that slowed down answers fewer requests, and the
/// demo's 4× slower backend (20 req/s, 10 per 500 ms interval) failed a threshold of
/// 20 and was not shed for 11 s.
pub(super) const SHED_EVIDENCE: f64 = 5.0;

/// Whether the last interval saw enough of a backend's requests to shed on.
pub(super) fn observed_enough(params: &Params, input: &Input) -> bool {
    input
        .qps
        .is_some_and(|q| q.is_finite() && q * params.interval_s >= SHED_EVIDENCE)
}

/// Utilisation at or above which a backend counts as strained (see [`strained`]).
pub(super) const STRAINED: f64 = 0.9;

/// Whether a backend is at the end of what it can do: busy nearly all the time, or
/// failing, Envoy's way, `utilisation + error_penalty · errors/qps ≥ 0.9`. Only a
/// strained backend is shed: a backend with room never needs its traffic cut at
/// once, whatever the other backends' figures make its share look like.
pub(super) fn strained(params: &Params, input: &Input) -> bool {
    let qps = input.qps.filter(|q| q.is_finite() && *q > 0.0);
    let util = input
        .utilisation
        .filter(|u| u.is_finite() && *u >= 0.0)
        .unwrap_or(0.0);
    let failing = match (qps, input.errors_per_s) {
        (Some(q), Some(e)) if e.is_finite() && e >= 0.0 => params.error_penalty * e / q,
        _ => 0.0,
    };
    util + failing >= STRAINED
}

/// Each backend's capacity as Envoy's client-side weighted round robin sees it,
/// `qps / (utilisation + error_penalty · errors/qps)`; `None` without observations.
pub(super) fn capacities(error_penalty: f64, inputs: &[Input]) -> Vec<Option<f64>> {
    inputs
        .iter()
        .map(|i| shown_capacity(error_penalty, i.qps, i.utilisation, i.errors_per_s))
        .collect()
}

/// One backend's capacity as Envoy's client-side weighted round robin sees it, from
/// one interval's requests and errors per second and utilisation:
/// `qps / (utilisation + error_penalty · errors/qps)`; `None` without requests or
/// busy time. What the policies weigh backends by, and what the capacity model
/// (`model::capacity_config`) learns to predict.
pub fn shown_capacity(
    error_penalty: f64,
    qps: Option<f64>,
    utilisation: Option<f64>,
    errors_per_s: Option<f64>,
) -> Option<f64> {
    let qps = qps.filter(|q| q.is_finite() && *q > 0.0)?;
    let util = utilisation.filter(|u| u.is_finite() && *u > 0.0)?;
    let eps = errors_per_s
        .filter(|e| e.is_finite() && *e >= 0.0)
        .unwrap_or(0.0);
    Some(qps / (util + error_penalty * eps / qps)).filter(|c| c.is_finite())
}

/// The fall of capacity `ai` foresees for each backend: the least capacity its
/// predictor expects over the next intervals ([`Input::predicted_capacity`]) as a
/// fraction of what it shows now, where that is below [`Params::shed_ratio`];
/// `None` elsewhere. Forecasts within that ratio change nothing: a predictor's error,
/// or the dip a least-over-the-horizon forecast always has, never moves a weight.
pub(super) fn foreseen_falls(params: &Params, inputs: &[Input]) -> Vec<Option<f64>> {
    capacities(params.error_penalty, inputs)
        .into_iter()
        .zip(inputs)
        .map(|(shown, input)| {
            let (c, p) = (shown?, input.predicted_capacity?);
            let fraction = (p.is_finite() && p >= 0.0).then(|| p / c)?;
            (fraction < params.shed_ratio).then_some(fraction)
        })
        .collect()
}

/// The latency `ai` expects of a backend once its errors are counted: a failed
/// request costs the client [`Params::error_cost_s`] (a timeout or a retry), so with
/// a share `e` of requests failing the expectation is (1 − e) · predicted + e · cost.
/// A backend that fails fast answers quickest, and without this would look like the
/// best one.
pub(super) fn with_errors(params: &Params, input: &Input, predicted: f64) -> f64 {
    let qps = input.qps.filter(|q| q.is_finite() && *q > 0.0);
    let errors = input.errors_per_s.filter(|e| e.is_finite() && *e >= 0.0);
    match (qps, errors) {
        (Some(qps), Some(errors)) => {
            let e = (errors / qps).min(1.0);
            (1.0 - e) * predicted + e * params.error_cost_s.max(predicted)
        }
        _ => predicted,
    }
}

/// Scores where known; unknown backends keep their current share of the known ones.
pub(super) fn with_fallback(scores: &[Option<f64>], before: &[u32]) -> Vec<f64> {
    let known: f64 = scores.iter().flatten().sum();
    let known_weight: f64 = scores
        .iter()
        .zip(before)
        .filter(|(s, _)| s.is_some())
        .map(|(_, &w)| w as f64)
        .sum();
    let total_weight: f64 = before.iter().map(|&w| w as f64).sum();
    if known <= 0.0 || known_weight <= 0.0 {
        return before.iter().map(|&w| w as f64).collect();
    }
    scores
        .iter()
        .zip(before)
        .map(|(s, &w)| match s {
            // Scale scores so that the known group keeps its total weight.
            Some(s) => s / known * known_weight,
            None => w as f64,
        })
        .map(|x| x / total_weight.max(1.0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(qps: f64, util: f64, errors: f64) -> Input {
        Input {
            qps: Some(qps),
            utilisation: Some(util),
            errors_per_s: Some(errors),
            healthy: true,
            ..Input::default()
        }
    }

    #[test]
    fn capacity_is_envoys_and_errors_count_against_it() {
        let c = capacities(1.0, &[seen(100.0, 0.5, 0.0), seen(100.0, 0.5, 50.0)]);
        assert_eq!(c[0], Some(200.0));
        // Half the requests failing: 100 / (0.5 + 0.5).
        assert_eq!(c[1], Some(100.0));
        assert_eq!(capacities(1.0, &[Input::default()]), vec![None]);
    }

    #[test]
    fn strained_is_busy_or_failing_nearly_all_the_time() {
        let p = Params::default();
        assert!(!strained(&p, &seen(100.0, 0.85, 0.0)));
        assert!(strained(&p, &seen(100.0, 0.95, 0.0)));
        assert!(strained(&p, &seen(100.0, 0.1, 90.0)));
        assert!(!strained(&p, &Input::default()));
    }

    #[test]
    fn a_shed_needs_enough_requests_seen() {
        let p = Params::default();
        assert!(!observed_enough(&p, &seen(4.0, 1.0, 0.0)));
        assert!(observed_enough(&p, &seen(5.0, 1.0, 0.0)));
    }

    #[test]
    fn a_failed_request_costs_the_error_cost() {
        let p = Params::default();
        // A quarter failing: 0.75 · 10 ms + 0.25 · 1 s.
        let e = with_errors(&p, &seen(100.0, 0.5, 25.0), 0.010);
        assert!((e - 0.2575).abs() < 1e-12, "{e}");
        assert_eq!(with_errors(&p, &Input::default(), 0.010), 0.010);
    }

    #[test]
    fn unknown_scores_keep_their_share_and_known_ones_share_theirs() {
        // Two known backends split their 60 % by score; the unknown one keeps 40 %
        // (as shares of the whole).
        let s = with_fallback(&[Some(1.0), Some(3.0), None], &[30, 30, 40]);
        assert!(
            (s[0] - 0.15).abs() < 1e-12 && (s[1] - 0.45).abs() < 1e-12,
            "{s:?}"
        );
        assert!((s[2] - 0.4).abs() < 1e-12, "{s:?}");
    }
}
