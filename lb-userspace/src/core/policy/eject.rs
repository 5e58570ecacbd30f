//! The eject stage: outlier ejection for `reactive` and `ai`, Envoy's way. A backend
//! whose error rate over the last interval is clearly above the pool's is taken out
//! of the table at once (weight 0, outside the filter and the move budget), for an
//! ejection time that grows with each consecutive ejection; then it comes back at a
//! probe share until enough of its requests say whether it still fails, and, while
//! they say it does not, its share may at most double per update until its target
//! is within that. Called twice per update: [`judge`] before the pool stage
//! (which keeps an ejected backend out of the free pool and starts a probing one at
//! its probe weight, [`probe_weight`]), [`cap`] after the hand-over.
//!
//! Why 0 and not the floor: a backend failing fast answers at once, so every request
//! it gets fails; the floor (a fifth of an equal share at most) kept on a quarter of
//! 120 backends is 5 % of the traffic failing. Without new flows it gives no error
//! signal, which is why it comes back as a probe after its ejection time rather than
//! when its errors stop.
//!
//! The rule, with its settings (`[control]`, docs/CONFIG.md):
//! - Evidence: a backend's requests (`qps · interval`) and errors
//!   (`errors_per_s · interval`) in the last interval; it counts only with at least
//!   [`Params::eject_min_requests`] requests.
//! - The pool's error rate: the median of the error rates of the backends that
//!   count, each weighted by its requests (a quarter of the pool failing does not move
//!   it); where none counts, all of the pool's errors over all its requests.
//! - An outlier: a healthy, unheld backend whose error rate is at least
//!   [`Params::eject_error_rate`] above the pool's. A pool failing alike has no
//!   outlier.
//! - At most [`Params::eject_max_share`] of the healthy, unheld backends are ejected
//!   or probing at once (rounded down: never the last one), the worst error rates
//!   first.
//! - The n-th consecutive ejection lasts n × [`Params::eject_time_s`], at most
//!   [`MAX_EJECTION_TIMES`] times that; the count drops by one per ejection time the
//!   backend then runs without being an outlier.
//! - The probe: enough of the traffic for [`Params::eject_min_requests`] requests
//!   per interval, at least the floor share and at most an equal share. Its requests
//!   are summed over updates until there are enough; then it is ejected again if
//!   they make it an outlier, else it returns: its share may at most double per
//!   update until its target is within that (the filter, smoothing and budget still
//!   pace it); meanwhile an interval that makes it an outlier ejects it again.

use super::{Input, Note, Params, Reason, State, Update, floor};
use crate::core::BackendId;

/// The longest ejection, in ejection times (Envoy's defaults: 300 s at most, 30 s
/// per ejection).
pub const MAX_EJECTION_TIMES: u32 = 10;

/// Where a backend stands after an ejection, between updates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outlier {
    /// Consecutive ejections: the n-th lasts n ejection times.
    pub times: u32,
    pub phase: Phase,
}

impl Outlier {
    /// Ejected or probing: kept from its share, and counted against
    /// [`Params::eject_max_share`].
    fn out(&self) -> bool {
        matches!(self.phase, Phase::Ejected { .. } | Phase::Probing { .. })
    }
}

/// The phases of an ejection, in the order a backend goes through them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Phase {
    /// Out of the table for `left_s` more seconds; ejected on `error_rate` against
    /// the pool's `reference`.
    Ejected {
        left_s: f64,
        error_rate: f64,
        reference: f64,
    },
    /// Back at its probe weight, its `requests` and `errors` summed until there are
    /// enough to judge it.
    Probing { requests: f64, errors: f64 },
    /// Judged clean: its share may double per update until its target is within that.
    Returning,
    /// Back under the policy alone; `clean_s` seconds since its count last dropped.
    Clean { clean_s: f64 },
}

/// What the last interval showed of one backend.
#[derive(Debug, Clone, Copy)]
struct Seen {
    requests: f64,
    errors: f64,
}

impl Seen {
    fn of(params: &Params, input: &Input) -> Option<Seen> {
        let qps = input.qps.filter(|q| q.is_finite() && *q >= 0.0)?;
        let eps = input.errors_per_s.filter(|e| e.is_finite() && *e >= 0.0)?;
        let requests = qps * params.interval_s;
        Some(Seen {
            requests,
            errors: (eps * params.interval_s).min(requests),
        })
    }

    /// The error rate, with enough requests to count.
    fn rate(&self, params: &Params) -> Option<f64> {
        (self.requests >= params.eject_min_requests.max(1.0)).then(|| self.errors / self.requests)
    }
}

/// In the pool ejection acts on: healthy and not held.
fn in_pool(input: &Input) -> bool {
    input.healthy && input.hold.is_none()
}

/// The pool's error rate over the last interval: the median of the error rates that
/// count, weighted by their requests; where none counts, the pool's errors over its
/// requests; `None` without requests.
fn pool_rate(params: &Params, inputs: &[Input], seen: &[Option<Seen>]) -> Option<f64> {
    let mut counted: Vec<(f64, f64)> = inputs
        .iter()
        .zip(seen)
        .filter(|(i, _)| in_pool(i))
        .filter_map(|(_, s)| Some((s.as_ref()?.rate(params)?, s.as_ref()?.requests)))
        .collect();
    if counted.is_empty() {
        let (errors, requests) = inputs
            .iter()
            .zip(seen)
            .filter(|(i, _)| in_pool(i))
            .filter_map(|(_, s)| *s)
            .fold((0.0, 0.0), |(e, r), s| (e + s.errors, r + s.requests));
        return (requests > 0.0).then(|| errors / requests);
    }
    counted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = counted.iter().map(|&(_, w)| w).sum();
    let mut below = 0.0;
    for &(rate, w) in &counted {
        below += w;
        if below >= total / 2.0 {
            return Some(rate);
        }
    }
    counted.last().map(|&(rate, _)| rate)
}

/// Updates every backend's ejection before the pool stage: time passes for the
/// ejected ones (those whose time is up come back as probes), probes with enough
/// requests are judged, and the outliers are ejected within the bound, the worst
/// first. `static` and `equal` never call it.
pub(super) fn judge(params: &Params, state: &mut State, inputs: &[Input]) {
    state
        .outliers
        .retain(|id, _| inputs.iter().any(|i| &i.id == id));
    if params.eject_max_share <= 0.0 {
        state.outliers.clear();
        return;
    }
    let dt = params.interval_s;
    let base = params.eject_time_s;
    let seen: Vec<Option<Seen>> = inputs.iter().map(|i| Seen::of(params, i)).collect();
    let reference = pool_rate(params, inputs, &seen);
    let outlier = |rate: f64| reference.is_some_and(|r| rate - r >= params.eject_error_rate);
    // (backend, the error rate it is judged on).
    let mut candidates: Vec<(usize, f64)> = Vec::new();
    for (k, input) in inputs.iter().enumerate() {
        let now = seen[k].and_then(|s| s.rate(params));
        let pooled = in_pool(input);
        let Some(o) = state.outliers.get_mut(&input.id) else {
            if let Some(rate) = now.filter(|&r| pooled && outlier(r)) {
                candidates.push((k, rate));
            }
            continue;
        };
        match &mut o.phase {
            Phase::Ejected { left_s, .. } => {
                *left_s -= dt;
                if *left_s <= 1e-9 {
                    o.phase = Phase::Probing {
                        requests: 0.0,
                        errors: 0.0,
                    };
                }
            }
            Phase::Probing { requests, errors } => {
                if let Some(s) = seen[k].filter(|_| pooled) {
                    *requests += s.requests;
                    *errors += s.errors;
                }
                if *requests >= params.eject_min_requests.max(1.0) {
                    let rate = *errors / *requests;
                    if outlier(rate) {
                        candidates.push((k, rate));
                    } else if reference.is_some() {
                        o.phase = Phase::Returning;
                    }
                }
            }
            Phase::Returning => {
                if let Some(rate) = now.filter(|&r| pooled && outlier(r)) {
                    candidates.push((k, rate));
                }
            }
            Phase::Clean { clean_s } => {
                if let Some(rate) = now.filter(|&r| pooled && outlier(r)) {
                    candidates.push((k, rate));
                } else {
                    *clean_s += dt;
                    if *clean_s >= base - 1e-9 {
                        *clean_s = 0.0;
                        o.times = o.times.saturating_sub(1);
                    }
                }
            }
        }
    }
    state
        .outliers
        .retain(|_, o| o.times > 0 || !matches!(o.phase, Phase::Clean { .. }));
    let pool = inputs.iter().filter(|i| in_pool(i)).count();
    let bound = (params.eject_max_share * pool as f64 + 1e-9).floor() as usize;
    let mut out = state.outliers.values().filter(|o| o.out()).count();
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    for (k, rate) in candidates {
        let id = inputs[k].id;
        let counted = state.outliers.get(&id).is_some_and(Outlier::out);
        if !counted && out >= bound {
            continue;
        }
        let times = state.outliers.get(&id).map_or(0, |o| o.times) + 1;
        state.outliers.insert(
            id,
            Outlier {
                times,
                phase: Phase::Ejected {
                    left_s: base * f64::from(times.min(MAX_EJECTION_TIMES)),
                    error_rate: rate,
                    reference: reference.unwrap_or(0.0),
                },
            },
        );
        if !counted {
            out += 1;
        }
    }
}

/// Backend `id`'s reason when it is ejected now.
pub(super) fn ejected(state: &State, id: BackendId) -> Option<Reason> {
    match state.outliers.get(&id)? {
        Outlier {
            times,
            phase:
                Phase::Ejected {
                    left_s,
                    error_rate,
                    reference,
                },
        } => Some(Reason::Ejected {
            error_rate: *error_rate,
            reference: *reference,
            times: *times,
            left_s: *left_s,
        }),
        _ => None,
    }
}

/// Whether backend `id` is on its way back from an ejection (probing or
/// returning): holding no weight, it starts from its probe weight, not its initial
/// one.
pub(super) fn returning(state: &State, id: BackendId) -> bool {
    state
        .outliers
        .get(&id)
        .is_some_and(|o| matches!(o.phase, Phase::Probing { .. } | Phase::Returning))
}

/// The weight each backend in `probing` starts its probe from: the share of the
/// VIP's traffic that brings [`Params::eject_min_requests`] requests per interval,
/// at least the floor share and at most an equal share of the `free` backends, next
/// to what the other free backends `hold`, in policy units.
pub(super) fn probe_weight(
    params: &Params,
    inputs: &[Input],
    free: &[bool],
    hold: &[u32],
    probing: &[bool],
) -> u32 {
    let n = free.iter().filter(|&&f| f).count().max(1);
    let served: f64 = inputs
        .iter()
        .filter_map(|i| i.qps.filter(|q| q.is_finite() && *q > 0.0))
        .sum();
    let floor = floor::share(params, n);
    let enough = if served > 0.0 {
        params.eject_min_requests / (params.interval_s * served)
    } else {
        floor
    };
    let share = enough.max(floor).min(1.0 / n as f64);
    let others: f64 = (0..free.len())
        .filter(|&k| free[k] && !probing[k])
        .map(|k| f64::from(hold[k]))
        .sum();
    let m = probing.iter().filter(|&&p| p).count() as f64;
    let weight = if others > 0.0 && m * share < 1.0 {
        // w / (others + m · w) = share.
        share * others / (1.0 - m * share)
    } else {
        share * f64::from(params.scale)
    };
    (weight.round() as u32).max(1)
}

/// Holds a probing backend at the share it started from and lets a returning one
/// at most double its share, against what the other free backends are proposed; a
/// returning backend whose target is within that is back under the policy alone.
pub(super) fn cap(u: &mut Update, state: &mut State) {
    let proposed: f64 = u.free().map(|k| u.proposal[k]).sum();
    for k in 0..u.n() {
        if !u.free[k] {
            continue;
        }
        let Some(o) = state.outliers.get_mut(&u.inputs[k].id) else {
            continue;
        };
        let factor = match o.phase {
            Phase::Probing { .. } => 1.0,
            Phase::Returning => 2.0,
            Phase::Ejected { .. } | Phase::Clean { .. } => continue,
        };
        // x / (others + x) = factor · start / pool.
        let share = factor * u.start[k] as f64 / u.pool.max(1.0);
        let others = proposed - u.proposal[k];
        let cap = if share < 1.0 {
            share * others / (1.0 - share)
        } else {
            f64::INFINITY
        };
        match o.phase {
            Phase::Probing { .. } => {
                u.proposal[k] = u.proposal[k].min(cap);
                u.notes[k].push(Note::Probe {
                    weight: u.proposal[k],
                });
            }
            _ => {
                if u.proposal[k] > cap {
                    u.proposal[k] = cap;
                    u.notes[k].push(Note::Returning { cap });
                }
                if u.target_in_pool(k) <= cap {
                    o.phase = Phase::Clean { clean_s: 0.0 };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(qps: f64, errors: f64) -> Input {
        Input {
            healthy: true,
            qps: Some(qps),
            errors_per_s: Some(errors),
            ..Input::default()
        }
    }

    #[test]
    fn the_pool_rate_is_the_median_of_those_that_count_else_all_errors_over_all_requests() {
        let p = Params::default();
        let inputs = [
            seen(100.0, 100.0),
            seen(100.0, 1.0),
            seen(100.0, 2.0),
            seen(100.0, 3.0),
            seen(1.0, 1.0),
        ];
        let s: Vec<_> = inputs.iter().map(|i| Seen::of(&p, i)).collect();
        // The backend failing everything and the one with a single request do not
        // move it.
        assert_eq!(pool_rate(&p, &inputs, &s), Some(0.02));
        let few = [seen(4.0, 1.0), seen(4.0, 0.0)];
        let s: Vec<_> = few.iter().map(|i| Seen::of(&p, i)).collect();
        assert_eq!(pool_rate(&p, &few, &s), Some(0.125));
    }

    #[test]
    fn a_probe_brings_enough_requests_within_the_floor_and_an_equal_share() {
        let p = Params::default();
        let free = [true; 4];
        let probing = [true, false, false, false];
        let hold = [0, 1000, 1000, 1000];
        let weight = |qps: f64| {
            let inputs = vec![seen(qps, 0.0); 4];
            let w = f64::from(probe_weight(&p, &inputs, &free, &hold, &probing));
            w / (w + 3000.0)
        };
        // 10 requests per 1 s interval out of 200 req/s: 5 % of the traffic.
        assert!((weight(50.0) - 0.05).abs() < 1e-3);
        // Out of 20 req/s it would take half: an equal share at most.
        assert!((weight(5.0) - 0.25).abs() < 1e-3);
        // Out of 100,000 req/s: the floor, 1 %.
        assert!((weight(25_000.0) - 0.01).abs() < 1e-3);
    }
}
