//! What a policy's [`State`] is rebuilt from when the state itself is gone but the
//! weights it produced are not: an agent restarted over its pinned datapath (whose
//! `BACKENDS` record each backend's weight) and a reload that changed a VIP's
//! backends. Called by the agent (`agent::load_fill_attach`, `agent::overrides`).
//!
//! The weights in force are what the policy learned, filtered, smoothed and
//! budgeted: each free backend's filter starts at its share of them, so that the
//! first update continues from where the last one left off instead of from the
//! first interval's observations alone. The filters' variance is not in the
//! weights and starts at 0, which [`super::filter`]'s noise test tolerates: a
//! single outlying interval moves a fresh filter's mean by a fifth of its distance
//! and its noise band by more (see `a_single_outlier_moves_a_resumed_filter_nowhere`).

use super::{Filtered, PolicyKind, State};
use crate::core::BackendId;

impl State {
    /// The state of a policy of `kind` whose last weights were `weights` (the
    /// backends it moves, in their configured order; not those under an operator
    /// hold, whose weight is the hold's). A backend at 0 (it was unhealthy) starts
    /// again from its initial weight when it is back, as it would have. `static`
    /// and `equal` keep no filters.
    pub fn resumed(kind: PolicyKind, weights: &[(BackendId, u32)]) -> State {
        let mut state = State {
            weights: weights.iter().copied().collect(),
            ..State::default()
        };
        if matches!(kind, PolicyKind::Static | PolicyKind::Equal) {
            return state;
        }
        let pool: f64 = weights.iter().map(|&(_, w)| f64::from(w)).sum();
        if pool <= 0.0 {
            return state;
        }
        for &(id, w) in weights.iter().filter(|&&(_, w)| w > 0) {
            state.targets.insert(id, Filtered::at(f64::from(w) / pool));
            state.free.push(id);
        }
        state
    }

    /// This state for a VIP whose backends are now `ids` (a reload that changed
    /// them): the backends that stay keep their weights and filters, the others'
    /// are forgotten; the next update rescales the filters to the new pool, and a
    /// new backend starts from its initial weight.
    pub fn carried(&self, ids: &[BackendId]) -> State {
        let mut state = self.clone();
        state.weights.retain(|id, _| ids.contains(id));
        state.targets.retain(|id, _| ids.contains(id));
        state.outliers.retain(|id, _| ids.contains(id));
        state
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Input, Params, step};
    use super::*;

    /// Backends of capacity `caps` (requests per second) at 60 % of their total,
    /// each sent its share of `weights`, as the last interval showed them; the
    /// backend `odd` shows `odd_factor` times its capacity (one outlying interval).
    fn shown(caps: &[f64], weights: &[u32], odd: usize, odd_factor: f64) -> Vec<Input> {
        let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        let load = 0.6 * caps.iter().sum::<f64>();
        caps.iter()
            .zip(weights)
            .enumerate()
            .map(|(k, (&cap, &w))| {
                let qps = load * f64::from(w) / total;
                let cap = if k == odd { cap * odd_factor } else { cap };
                Input {
                    id: BackendId(k as u32),
                    configured_weight: 1,
                    healthy: true,
                    qps: Some(qps),
                    utilisation: Some((qps / cap).min(0.85)),
                    ..Input::default()
                }
            })
            .collect()
    }

    const CAPS: [f64; 3] = [100.0, 200.0, 400.0];

    /// `ai` after `n` updates on backends of capacity 1, 2 and 4 from equal weights.
    fn learned(p: &Params, n: usize) -> (State, Vec<u32>) {
        let mut state = State::default();
        let mut w = vec![1; CAPS.len()];
        for _ in 0..n {
            w = step(PolicyKind::Ai, p, &mut state, &shown(&CAPS, &w, 0, 1.0)).0;
        }
        (state, w)
    }

    fn ids(w: &[u32]) -> Vec<(BackendId, u32)> {
        w.iter()
            .enumerate()
            .map(|(k, &w)| (BackendId(k as u32), w))
            .collect()
    }

    #[test]
    fn a_resumed_policy_continues_where_it_left_off() {
        let p = Params::default();
        let (before, last) = learned(&p, 200);
        assert!(last[2] > 3 * last[0], "learned {last:?}");
        let mut state = State::resumed(PolicyKind::Ai, &ids(&last));
        // The weights rest within the hysteresis band of the filters (a smoothed
        // step toward them is no larger than it), so a filter resumed from them is
        // as close to the lost one.
        for (id, f) in &state.targets {
            let mean = before.targets[id].mean;
            let band = p.hysteresis * f.mean / p.smoothing + 1e-3;
            assert!((f.mean - mean).abs() <= band, "{id:?}: {f:?}, {mean}");
        }
        for _ in 0..20 {
            let w = step(PolicyKind::Ai, &p, &mut state, &shown(&CAPS, &last, 0, 1.0)).0;
            assert_eq!(w, last);
        }
    }

    #[test]
    fn a_single_outlier_moves_a_resumed_filter_nowhere() {
        let p = Params::default();
        let (_, last) = learned(&p, 200);
        let odd = shown(&CAPS, &last, 0, 1.5);
        let mut resumed = State::resumed(PolicyKind::Ai, &ids(&last));
        assert_eq!(step(PolicyKind::Ai, &p, &mut resumed, &odd).0, last);
        // The weights alone, as an agent kept them before: the first interval's
        // figures are the filter's start, and they move the weights.
        let mut weights_only = State {
            weights: ids(&last).into_iter().collect(),
            ..State::default()
        };
        assert_ne!(step(PolicyKind::Ai, &p, &mut weights_only, &odd).0, last);
    }

    #[test]
    fn a_reload_keeps_what_the_remaining_backends_learned() {
        let p = Params::default();
        let (state, last) = learned(&p, 200);
        // Backend 0 goes, a fourth of capacity 2 comes.
        let now = [BackendId(1), BackendId(2), BackendId(3)];
        let mut carried = state.carried(&now);
        assert!(!carried.weights.contains_key(&BackendId(0)));
        let caps = [200.0, 400.0, 200.0];
        let mut inputs = shown(&caps, &[last[1], last[2], last[1]], 9, 1.0);
        for (i, id) in inputs.iter_mut().zip(now) {
            i.id = id;
        }
        let w = step(PolicyKind::Ai, &p, &mut carried, &inputs).0;
        let (was, is) = (
            f64::from(last[2]) / f64::from(last[1]),
            f64::from(w[1]) / f64::from(w[0]),
        );
        assert!((is / was - 1.0).abs() < 0.05, "{last:?} -> {w:?}");
    }

    #[test]
    fn static_and_equal_resume_without_filters() {
        let s = State::resumed(PolicyKind::Static, &ids(&[10, 20]));
        assert!(s.targets.is_empty() && s.free.is_empty());
        assert_eq!(s.weights.len(), 2);
        let s = State::resumed(PolicyKind::Reactive, &ids(&[0, 20]));
        assert_eq!(s.free, vec![BackendId(1)]);
        assert_eq!(s.targets[&BackendId(1)].mean, 1.0);
    }
}
