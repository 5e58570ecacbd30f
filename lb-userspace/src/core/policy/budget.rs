//! The budget stages: how far the free backends' step may move the lookup table per
//! update, first on ideal shares ([`on_shares`]), then, once weights are whole, on
//! the slots the real table moves ([`on_table`]). Holds, health changes, sheds and
//! the backends relieving them are never scaled: the budget applies on top of what
//! they move alone.

use super::{Note, Update};

/// Share of a table of `size` slots that moves between two weight vectors, in the
/// ideal (each backend's slots proportional to its weight). The budget bounds this.
pub fn share_moved(before: &[u32], after: &[u32]) -> f64 {
    let a: f64 = before.iter().map(|&w| w as f64).sum();
    let b: f64 = after.iter().map(|&w| w as f64).sum();
    if a <= 0.0 || b <= 0.0 {
        return 1.0;
    }
    before
        .iter()
        .zip(after)
        .map(|(&x, &y)| (x as f64 / a - y as f64 / b).abs())
        .sum::<f64>()
        / 2.0
}

/// Scales the step of the free backends the budget bounds so that the share of an
/// ideal table it moves stays within the budget, from what every backend holds with
/// the unbounded changes already made. Returns which backends it bounds.
pub(super) fn on_shares(u: &mut Update) -> Vec<bool> {
    let n = u.n();
    let scaled: Vec<bool> = (0..n)
        .map(|k| u.free[k] && !u.shed[k] && !u.relieving[k])
        .collect();
    let base: Vec<f64> = (0..n)
        .map(|k| match (scaled[k], u.free[k]) {
            (true, _) => u.start[k] as f64,
            (false, true) => u.proposal[k],
            (false, false) => u.after[k] as f64,
        })
        .collect();
    let base_total: f64 = base.iter().sum();
    let fixed_new: Vec<f64> = (0..n)
        .map(|k| {
            if u.free[k] {
                u.proposal[k]
            } else {
                u.after[k] as f64
            }
        })
        .collect();
    let new_total: f64 = fixed_new.iter().sum();
    let budget = u.params.budget_per_second * u.params.interval_s;
    if base_total > 0.0 && new_total > 0.0 {
        // Share moved = half the sum of |share change| over the scaled backends.
        let moved: f64 = (0..n)
            .filter(|&k| scaled[k])
            .map(|k| (fixed_new[k] / new_total - base[k] / base_total).abs())
            .sum::<f64>()
            / 2.0;
        if moved > budget {
            let alpha = budget / moved;
            for k in (0..n).filter(|&k| scaled[k]) {
                let old_share = base[k] / base_total;
                let new_share = fixed_new[k] / new_total;
                u.proposal[k] = (old_share + alpha * (new_share - old_share)) * new_total;
                u.notes[k].push(Note::MoveBudget { fraction: alpha });
            }
        }
    }
    scaled
}

/// The budget again, on the table itself: `moved(weights)` builds the table of
/// `weights` and returns the share of its slots that differ from the table in force
/// (`None`: it cannot tell). The ideal bound alone is not enough: a consistent-hash
/// table moves more slots than the ideal when many weights change a little at once.
/// The slots the unbounded changes move alone are allowed, and the budget on top;
/// when the real table would move more, the `scaled` backends' step is scaled down
/// until it fits (usually one more table build, at most six). The scaled backends'
/// rescale is no unbounded change: a common factor keeps every share, but the
/// rounding of whole weights still moves slots, which count against the budget
/// (taking none of the step then also leaves the rescale to a later update).
pub(super) fn on_table(
    u: &mut Update,
    scaled: &[bool],
    moved: &mut dyn FnMut(&[u32]) -> Option<f64>,
) {
    let n = u.n();
    let budget = u.params.budget_per_second * u.params.interval_s;
    let base: Vec<u32> = (0..n)
        .map(|k| {
            if scaled[k] {
                u.unrescaled[k]
            } else {
                u.after[k]
            }
        })
        .collect();
    let Some(share) = (u.after != base).then(|| moved(&u.after)).flatten() else {
        return;
    };
    if share <= budget + 1e-9 {
        return;
    }
    // What the unbounded changes move alone, against the table in force (which may
    // differ from `before`, e.g. right after a hold is released).
    let unbounded = moved(&base).unwrap_or(0.0);
    let allowance = unbounded + budget;
    if share <= allowance + 1e-9 {
        return;
    }
    let at = |alpha: f64, after: &[u32]| -> Vec<u32> {
        (0..n)
            .map(|k| {
                if scaled[k] {
                    let (b, a) = (base[k] as f64, after[k] as f64);
                    (b + alpha * (a - b)).round() as u32
                } else {
                    after[k]
                }
            })
            .collect()
    };
    // Moved slots grow about linearly with the fraction of the step taken: try 90 %
    // of the fraction that would just fit, halve it while it does not; 0 if nothing
    // fits (then only the unbounded changes go through).
    let mut lo = (0.9 * budget / (share - unbounded).max(1e-9)).min(1.0);
    let mut lo_share = None;
    for _ in 0..6 {
        match moved(&at(lo, &u.after)) {
            Some(s) if s <= allowance + 1e-9 => {
                lo_share = Some(s);
                break;
            }
            _ => lo /= 2.0,
        }
    }
    if lo_share.is_none() {
        lo = 0.0;
    }
    u.after = at(lo, &u.after);
    super::quantize::keep_a_backend(u);
    for k in (0..n).filter(|&k| scaled[k]) {
        u.notes[k].push(Note::SlotBudget {
            share,
            fraction: lo,
            now: lo_share,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Input, Params, PolicyKind, State, pool};
    use super::*;

    fn update<'a>(p: &'a Params, inputs: &'a [Input]) -> Update<'a> {
        pool::begin(PolicyKind::Ai, p, &State::default(), inputs)
    }

    fn free(n: usize) -> Vec<Input> {
        vec![
            Input {
                healthy: true,
                configured_weight: 1,
                ..Input::default()
            };
            n
        ]
    }

    #[test]
    fn a_step_beyond_the_budget_on_shares_is_scaled_down_to_it() {
        let p = Params::default();
        let inputs = free(2);
        let mut u = update(&p, &inputs);
        // 5,000 / 5,000 to 8,000 / 2,000: 30 % of the table, the budget is 2 %.
        u.proposal = vec![8000.0, 2000.0];
        let scaled = on_shares(&mut u);
        assert_eq!(scaled, vec![true, true]);
        let moved = (u.proposal[0] / 10_000.0 - 0.5).abs();
        assert!((moved - 0.02).abs() < 1e-9, "{:?}", u.proposal);
        assert!(matches!(u.notes[0][0], Note::MoveBudget { .. }));
    }

    #[test]
    fn a_shed_backend_is_not_scaled() {
        let p = Params::default();
        let inputs = free(2);
        let mut u = update(&p, &inputs);
        u.shed[0] = true;
        u.proposal = vec![1000.0, 9000.0];
        let scaled = on_shares(&mut u);
        assert_eq!(scaled, vec![false, true]);
        assert_eq!(u.proposal[0], 1000.0);
    }

    #[test]
    fn the_table_budget_takes_the_part_of_the_step_that_fits() {
        let p = Params::default();
        let inputs = free(2);
        let mut u = update(&p, &inputs);
        u.after = vec![8000, 2000];
        // A fake table: the share moved is the first weight's change over the scale.
        let mut moved = |w: &[u32]| Some((f64::from(w[0]) - 5000.0).abs() / 10_000.0);
        on_table(&mut u, &[true, true], &mut moved);
        let share = (f64::from(u.after[0]) - 5000.0) / 10_000.0;
        assert!(share > 0.0 && share <= 0.02 + 1e-9, "{:?}", u.after);
        assert!(matches!(u.notes[1][0], Note::SlotBudget { .. }));
    }

    #[test]
    fn ideal_share_moved_is_half_the_share_changes() {
        assert_eq!(share_moved(&[1, 1], &[1, 1]), 0.0);
        assert!((share_moved(&[1, 1], &[3, 1]) - 0.25).abs() < 1e-12);
        assert_eq!(share_moved(&[0, 0], &[1, 1]), 1.0);
    }
}
