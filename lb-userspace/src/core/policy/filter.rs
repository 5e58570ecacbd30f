//! The filter stage: each free backend's target share, filtered over updates
//! ([`Filtered`]); a change within twice the filter's noise or within the
//! hysteresis band is not made, so that measurement noise alone never moves a
//! weight; the rest is smoothed toward the filtered target.

use super::{Reason, State, Update};

/// A signal filtered over updates: an exponentially weighted mean and variance,
/// with weight [`FILTER`] on the newest value.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Filtered {
    pub mean: f64,
    pub variance: f64,
}

/// Weight of the newest target in [`Filtered`]: about the last five updates count.
const FILTER: f64 = 0.2;

impl Filtered {
    /// A filter that starts at `share`, with no variance yet.
    pub(super) fn at(share: f64) -> Filtered {
        Filtered {
            mean: share,
            variance: 0.0,
        }
    }

    fn update(&mut self, x: f64) {
        let d = x - self.mean;
        self.mean += FILTER * d;
        self.variance = (1.0 - FILTER) * (self.variance + FILTER * d * d);
    }

    /// The standard deviation of the mean itself, had the values been independent.
    fn noise(&self) -> f64 {
        (self.variance * FILTER / (2.0 - FILTER)).sqrt()
    }
}

/// When the free pool changed, the filters hold shares of the old pool: the
/// survivors keep their proportions and variance, rescaled to their share of the
/// new pool; a backend new to the pool starts a filter of its own.
pub(super) fn follow_the_pool(u: &Update, state: &mut State) {
    let free: Vec<_> = u.free().map(|k| u.inputs[k].id).collect();
    if free == state.free {
        return;
    }
    let surviving: f64 = u
        .free()
        .filter_map(|k| state.targets.get(&u.inputs[k].id).map(|f| f.mean))
        .sum();
    let held_now: f64 = u
        .free()
        .filter(|&k| state.targets.contains_key(&u.inputs[k].id))
        .map(|k| u.start[k] as f64)
        .sum();
    let pool_now: f64 = u.free().map(|k| u.start[k] as f64).sum();
    let factor = if surviving > 0.0 && pool_now > 0.0 {
        held_now / pool_now / surviving
    } else {
        0.0
    };
    state.targets.retain(|id, f| {
        f.mean *= factor;
        f.variance *= factor * factor;
        factor > 0.0 && free.contains(id)
    });
    state.free = free;
}

/// Filters, and smooths or keeps, every free backend that was not shed. Returns
/// each one's filtered target in the pool's units (0 for the others).
pub(super) fn smooth(u: &mut Update, state: &mut State) -> Vec<f64> {
    let params = u.params;
    let mut filtered_in_pool = vec![0.0; u.n()];
    for k in (0..u.n()).filter(|&k| u.free[k] && !u.shed[k]) {
        let current = u.start[k] as f64;
        let share = u.target_in_pool(k) / u.pool.max(1.0);
        let filtered = state
            .targets
            .entry(u.inputs[k].id)
            .or_insert(Filtered::at(share));
        filtered.update(share);
        let (target, noise) = (filtered.mean * u.pool, filtered.noise() * u.pool);
        filtered_in_pool[k] = target;
        let smoothed = current + params.smoothing * (target - current);
        let policy = u.kind;
        if current > 0.0
            && ((smoothed - current).abs() <= params.hysteresis * current
                || (target - current).abs() <= 2.0 * noise)
        {
            u.proposal[k] = current;
            u.reasons[k] = Reason::Steady {
                policy,
                target,
                noise,
                hysteresis: params.hysteresis,
            };
        } else {
            u.proposal[k] = smoothed;
            u.reasons[k] = Reason::Smoothed {
                policy,
                target,
                noise,
                smoothed,
            };
        }
    }
    filtered_in_pool
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_signal_has_no_noise_and_a_step_is_followed_by_a_fifth() {
        let mut f = Filtered::at(0.5);
        f.update(0.5);
        assert_eq!((f.mean, f.noise()), (0.5, 0.0));
        f.update(1.0);
        assert!((f.mean - 0.6).abs() < 1e-12, "{f:?}");
        assert!(f.noise() > 0.0);
    }
}
