//! The pool stage: what each backend holds when an update starts, which backends
//! the policy may move (the free pool: neither held, unhealthy nor ejected), and the
//! guards that act at once, before any other stage: operator holds win outright,
//! unhealthy backends get 0 and so do ejected ones ([`eject`](super::eject)).
//! `static` and `equal` end here ([`exact`]).

use super::eject;
use super::target::{initial_weights, targets};
use super::{Input, Params, PolicyKind, Reason, State, Update};

/// Starts an update: what each backend holds and starts from, its target, and the
/// holds and health changes made.
pub(super) fn begin<'a>(
    kind: PolicyKind,
    params: &'a Params,
    state: &State,
    inputs: &'a [Input],
) -> Update<'a> {
    let n = inputs.len();
    let initial = initial_weights(kind, params, inputs);
    // What each backend holds now: the policy's last weight, else its operator hold
    // (the weight actually in force), else its initial weight.
    let before: Vec<u32> = inputs
        .iter()
        .zip(&initial)
        .map(|(i, &first)| {
            state
                .weights
                .get(&i.id)
                .copied()
                .or(i.hold)
                .unwrap_or(first)
        })
        .collect();
    let ejected: Vec<Option<Reason>> = inputs.iter().map(|i| eject::ejected(state, i.id)).collect();
    let free: Vec<bool> = inputs
        .iter()
        .zip(&ejected)
        .map(|(i, e)| i.hold.is_none() && i.healthy && e.is_none())
        .collect();
    // A free backend that held no weight (back from unhealthy or from a hold)
    // starts again from its initial weight; back from an ejection, from its probe
    // weight.
    let mut unrescaled: Vec<u32> = (0..n)
        .map(|k| {
            if free[k] && before[k] == 0 {
                initial[k]
            } else {
                before[k]
            }
        })
        .collect();
    let probing: Vec<bool> = (0..n)
        .map(|k| free[k] && before[k] == 0 && eject::returning(state, inputs[k].id))
        .collect();
    if probing.contains(&true) {
        let probe = eject::probe_weight(params, inputs, &free, &unrescaled, &probing);
        for k in (0..n).filter(|&k| probing[k]) {
            unrescaled[k] = probe;
        }
    }
    let start = rescaled(&unrescaled, &initial, &free);
    let targets = targets(kind, params, inputs, &start);
    let free_total: f64 = (0..n).filter(|&k| free[k]).map(|k| targets[k]).sum();
    // The free backends share what they hold between them; holds and unhealthy
    // backends neither give to nor take from them.
    let pool: f64 = (0..n).filter(|&k| free[k]).map(|k| start[k] as f64).sum();
    // Holds and health first: not smoothed, not budgeted. Every free backend's
    // reason is set by the stage that decides its weight.
    let mut after = before.clone();
    let reasons = inputs
        .iter()
        .enumerate()
        .map(|(k, input)| {
            if let Some(w) = input.hold {
                after[k] = w;
                Reason::Hold { weight: w }
            } else if !input.healthy {
                after[k] = 0;
                Reason::Unhealthy
            } else if let Some(reason) = ejected[k].clone() {
                after[k] = 0;
                reason
            } else {
                Reason::Equal
            }
        })
        .collect();
    Update {
        kind,
        params,
        inputs,
        free,
        before,
        unrescaled,
        start,
        targets,
        free_total,
        pool,
        after,
        proposal: vec![0.0; n],
        shed: vec![false; n],
        relieving: vec![false; n],
        reasons,
        notes: vec![Vec::new(); n],
    }
}

/// The free backends' weights kept at the total they started from (their initial
/// weights), rescaled together when they drift more than 1 % from it: a shed leaves
/// the others' weights as they are, so without this the total would shrink with
/// every shed and the quantum, the floor and a returning backend's initial weight
/// would grow against it. A common factor changes no share, so the table moves only
/// by the rounding.
fn rescaled(start: &[u32], initial: &[u32], free: &[bool]) -> Vec<u32> {
    let n = start.len();
    let have: f64 = (0..n).filter(|&k| free[k]).map(|k| start[k] as f64).sum();
    let want: f64 = (0..n).filter(|&k| free[k]).map(|k| initial[k] as f64).sum();
    if have > 0.0 && want > 0.0 && (have / want - 1.0).abs() > 0.01 {
        let c = want / have;
        (0..n)
            .map(|k| {
                if free[k] {
                    ((start[k] as f64 * c).round() as u32).max(1)
                } else {
                    start[k]
                }
            })
            .collect()
    } else {
        start.to_vec()
    }
}

/// `static` and `equal` are exact: no smoothing, budget or quantization.
pub(super) fn exact(u: &mut Update) {
    let unit = u.params.unit;
    for k in (0..u.n()).filter(|&k| u.free[k]) {
        let configured = u.inputs[k].configured_weight;
        (u.after[k], u.reasons[k]) = match u.kind {
            PolicyKind::Static => (
                configured.saturating_mul(unit),
                Reason::Static { configured },
            ),
            _ => (unit, Reason::Equal),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drifted_pool_is_rescaled_to_its_initial_total_and_holds_are_not() {
        let free = [true, true, false];
        // 25 % below the initial total: rescaled, shares kept.
        assert_eq!(
            rescaled(&[300, 450, 999], &[400, 600, 0], &free),
            vec![400, 600, 999]
        );
        // Within 1 %: left alone.
        assert_eq!(
            rescaled(&[398, 600, 999], &[400, 600, 0], &free),
            vec![398, 600, 999]
        );
    }
}
