//! The shed stage: a strained backend whose shown capacity and target both fall
//! below [`Params::shed_ratio`](super::Params::shed_ratio) of what it holds is cut at
//! once, outside smoothing and the move budget (waiting 8 s at 2 % per second while a
//! saturated backend's queue grows is what breaks requests). The capacity it lost
//! goes at once; what `ai` cuts below the capacity it still shows, for its predicted
//! latency and so that its backlog drains within [`DRAIN_S`], goes only as far as
//! the other backends have spare below the strain line ([`deepen`]).

use super::capacity::{capacities, foreseen_falls, observed_enough, strained, with_fallback};
use super::filter::Filtered;
use super::handover::Takers;
use super::target::{expected_latencies, weighted_median};
use super::{Input, Note, PolicyKind, Reason, State, Update};

/// Seconds within which `ai` plans to drain the backlog of a backend it sheds.
pub(super) const DRAIN_S: f64 = 2.0;

/// What a shed is decided on, computed once per update.
pub(super) struct Evidence {
    /// Each backend's shown capacity in requests per second (`None` unobserved).
    pub(super) shown_rps: Vec<Option<f64>>,
    /// `ai`: the fraction of its shown capacity each backend is foreseen to fall to
    /// (`capacity::foreseen_falls`); such a backend may shed before it is strained.
    foreseen: Vec<Option<f64>>,
    /// What a backend's shown capacity is compared with what it holds on: `ai`'s
    /// capacity before its latency factor (free backends only: a drained or held
    /// backend that still reports would make the free ones' shares look smaller),
    /// the other policies' targets.
    basis: Vec<f64>,
    /// Σ `basis` over the free backends.
    basis_total: f64,
    /// How long a new request would wait at each backend.
    wait: Vec<Option<f64>>,
    /// What the pool expects anyway: the larger of the median predicted latency and
    /// the median wait.
    reference: Option<f64>,
}

impl Evidence {
    pub(super) fn of(u: &Update) -> Evidence {
        let (inputs, start) = (u.inputs, &u.start);
        let shown_rps = capacities(u.params.error_penalty, inputs);
        let foreseen = match u.kind {
            PolicyKind::Ai => foreseen_falls(u.params, inputs),
            _ => vec![None; inputs.len()],
        };
        let basis = match u.kind {
            PolicyKind::Ai => {
                let mut shown = shown_rps.clone();
                for (k, c) in shown.iter_mut().enumerate() {
                    if inputs[k].hold.is_some() || !inputs[k].healthy {
                        *c = None;
                    }
                }
                with_fallback(&shown, start)
            }
            _ => u.targets.clone(),
        };
        let wait = waits(inputs, &shown_rps);
        let reference = [
            weighted_median(&expected_latencies(u.params, inputs), start),
            weighted_median(&wait, start),
        ]
        .into_iter()
        .flatten()
        .reduce(f64::max);
        let basis_total: f64 = (0..u.n())
            .filter(|&k| inputs[k].hold.is_none() && inputs[k].healthy)
            .map(|k| basis[k])
            .sum();
        Evidence {
            shown_rps,
            foreseen,
            basis,
            basis_total,
            wait,
            reference,
        }
    }
}

/// The sheds found, for the stages after.
pub(super) struct Sheds {
    /// Each free backend's shown capacity in the pool's units.
    pub(super) shown_in_pool: Vec<f64>,
    /// How far below its shown capacity `ai` would cut each shed backend: for its
    /// predicted latency and to drain its backlog.
    deep_cut: Vec<f64>,
}

/// Marks and cuts the free backends that shed: a shed needs the capacity a backend
/// has shown to fall, not a latency ratio alone, which swings with every queue and
/// would shed healthy backends in turn; and the target too, so that `ai` never sheds
/// a backend it keeps above its capacity share because it answers faster.
pub(super) fn find(u: &mut Update, e: &Evidence) -> Sheds {
    let params = u.params;
    let mut shown_in_pool = vec![0.0; u.n()];
    let mut deep_cut = vec![0.0; u.n()];
    for k in (0..u.n()).filter(|&k| u.free[k]) {
        let target = u.target_in_pool(k);
        let current = u.start[k] as f64;
        let shown = if e.basis_total > 0.0 {
            u.pool * e.basis[k] / e.basis_total
        } else {
            current
        };
        shown_in_pool[k] = shown;
        // `ai` counts a backend's backlog against it: what drains the backlog is
        // what it can take (a backend whose backlog alone needs a cut sheds too).
        let drain = match u.kind {
            PolicyKind::Ai => drain_factor(e.wait[k], e.reference),
            _ => 1.0,
        };
        let input = &u.inputs[k];
        let strained_now = strained(params, input);
        // `ai`: a fall of its capacity foreseen; the share of what it is about to
        // be able to take is what it is judged and cut by.
        let foreseen = e.foreseen[k].map(|fraction| shown * fraction);
        let (judged, cut_to) = match foreseen {
            Some(f) => (f, f),
            None => (shown.max(target), target.min(shown)),
        };
        if current > 0.0
            && (strained_now || foreseen.is_some())
            && observed_enough(params, input)
            && judged * drain < params.shed_ratio * current
        {
            // Never above what it holds: a backlog alone can make the shed.
            let target = cut_to.min(current);
            // The capacity it has lost goes at once; a fall still to come is cut
            // only as far as the others have spare ([`deepen`]): on S3 of the
            // simulator, cutting the next hot quarter at once while the hot one was
            // shed overloaded the other half.
            let kept = if strained_now {
                shown.min(current)
            } else {
                current
            };
            u.proposal[k] = kept;
            deep_cut[k] = kept - target * drain;
            u.shed[k] = true;
            u.reasons[k] = Reason::Shed {
                policy: u.kind,
                shown,
                target,
                drain,
                shed_ratio: params.shed_ratio,
                current,
                kept,
            };
            if let (Some(fraction), Some(rps)) = (e.foreseen[k], e.shown_rps[k]) {
                u.notes[k].push(Note::Foreseen {
                    shown: rps * fraction,
                    strained: strained_now,
                });
            }
        }
    }
    Sheds {
        shown_in_pool,
        deep_cut,
    }
}

/// `ai`'s cuts below a shed backend's shown capacity, as far as the others can take
/// without being strained themselves once the capacity it lost is placed: draining
/// one backend's queue, or sparing requests its latency, by overloading the others
/// only moves the queue (on a pool at 90 % load it went from backend to backend).
/// A shed backend's filter starts again from what it is left with: a new regime.
pub(super) fn deepen(u: &mut Update, state: &mut State, sheds: &Sheds, takers: &Takers) {
    let n = u.n();
    let by_capacity: f64 = (0..n)
        .filter(|&k| u.shed[k])
        .map(|k| (u.start[k] as f64 - u.proposal[k]).max(0.0))
        .sum();
    let spare: f64 = takers.spare_total(u);
    let wanted: f64 = sheds.deep_cut.iter().sum();
    let taken = if wanted > 0.0 {
        ((spare - by_capacity).max(0.0) / wanted).min(1.0)
    } else {
        0.0
    };
    for k in 0..n {
        if !u.shed[k] {
            continue;
        }
        let cut = sheds.deep_cut[k] * taken;
        u.proposal[k] -= cut;
        if u.proposal[k] >= u.start[k] as f64 {
            // A backlog alone called for the shed, and the others have no spare to
            // take any of it: nothing is cut, so this is no shed (its filter and
            // the budget carry on as for any other backend).
            u.shed[k] = false;
            u.proposal[k] = u.start[k] as f64;
            u.reasons[k] = Reason::BacklogWithoutSpare {
                policy: u.kind,
                kept: u.proposal[k],
            };
            continue;
        }
        if cut > 0.0 {
            u.notes[k].push(Note::DeepCut { cut, taken });
        }
        state.targets.insert(
            u.inputs[k].id,
            Filtered::at(u.proposal[k] / u.pool.max(1.0)),
        );
    }
}

/// How long a new request would wait at each backend: its requests in flight over
/// the rate it has shown it can serve them (`in_flight / capacity`, seconds); `None`
/// without an in-flight gauge or a shown capacity.
fn waits(inputs: &[Input], capacity: &[Option<f64>]) -> Vec<Option<f64>> {
    inputs
        .iter()
        .zip(capacity)
        .map(|(i, c)| {
            let in_flight = i.in_flight.filter(|v| v.is_finite() && *v >= 0.0)?;
            let c = c.filter(|c| c.is_finite() && *c > 0.0)?;
            Some(in_flight / c)
        })
        .collect()
}

/// The fraction of its shown capacity `ai` lets a backend take, so that the
/// backlog it has built drains within [`DRAIN_S`] instead of staying (at exactly
/// its capacity, arrivals match departures and a queue never shrinks). A new
/// request there waits `wait` seconds; what exceeds `reference` (what the pool
/// expects anyway: the larger of the median predicted latency and the median
/// wait, so that a load every backend queues for drains nobody) is backlog, and
/// serving `capacity · (1 − excess / DRAIN_S)` requests per second clears it in
/// [`DRAIN_S`]. 1 when either is unknown; never below 0 (the floor share holds).
fn drain_factor(wait: Option<f64>, reference: Option<f64>) -> f64 {
    let (Some(wait), Some(reference)) = (wait, reference) else {
        return 1.0;
    };
    let excess = (wait - reference).max(0.0);
    (1.0 - excess / DRAIN_S).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_beyond_the_reference_drains_within_the_drain_time() {
        assert_eq!(drain_factor(None, Some(0.1)), 1.0);
        assert_eq!(drain_factor(Some(0.05), Some(0.1)), 1.0);
        // One second of excess wait: half its capacity clears it in two seconds.
        assert!((drain_factor(Some(1.1), Some(0.1)) - 0.5).abs() < 1e-12);
        assert_eq!(drain_factor(Some(10.0), Some(0.1)), 0.0);
    }
}
