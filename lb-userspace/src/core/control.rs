//! The one control step of a VIP: what is known about its backends (readings,
//! forecasts, operator holds) and the table in force go in; the weights, the new
//! lookup table if they changed, and a decision per backend come out. The agent's
//! control tick, the simulator and the tests call [`VipControl::step`] and nothing
//! else: building the policy's inputs ([`Input::observed`]), checking the move budget
//! on the real table, and keeping the table a step built so that it is never built
//! twice, all happen here once.

use std::sync::Arc;

use crate::core::BackendId;
use crate::core::maglev::{self, MaglevBackend, MaglevError};
use crate::core::model::Forecast;
use crate::core::policy::{self, Decision, Input, Params, PolicyKind};

/// A lookup table and the weights it was built from. Its slots hold indices into
/// the VIP's backends in their configured order.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub weights: Vec<u32>,
    pub slots: Arc<Vec<u32>>,
}

impl Table {
    /// Builds the table of `size` slots for backends keyed by `keys` (their
    /// addresses as 16 bytes) with `weights`.
    pub fn build(keys: &[[u8; 16]], weights: &[u32], size: u32) -> Result<Table, MaglevError> {
        let slots = maglev::build(&MaglevBackend::zip(keys, weights), size)?;
        Ok(Table {
            weights: weights.to_vec(),
            slots: Arc::new(slots),
        })
    }
}

/// What was last seen of one backend, from its scrape (the agent) or its simulated
/// counters (the simulator): rates over the last interval and gauges now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observation {
    /// Requests per second.
    pub qps: Option<f64>,
    /// Utilisation 0..=1.
    pub utilisation: Option<f64>,
    pub errors_per_s: Option<f64>,
    /// The latency a new flow suffers there now, seconds.
    pub latency_s: Option<f64>,
    /// Requests queued or in service.
    pub in_flight: Option<f64>,
}

impl Input {
    /// A healthy, free backend's input from what was seen of it and its forecast;
    /// the caller sets `healthy` and `hold`.
    pub fn observed(
        id: BackendId,
        configured_weight: u32,
        seen: Observation,
        forecast: Option<&Forecast>,
    ) -> Input {
        Input {
            id,
            configured_weight,
            healthy: true,
            hold: None,
            qps: seen.qps,
            utilisation: seen.utilisation,
            errors_per_s: seen.errors_per_s,
            latency_s: seen.latency_s,
            in_flight: seen.in_flight,
            predicted_s: forecast.and_then(|f| f.value),
            predictor: forecast
                .map(|f| f.choice.predictor.clone())
                .unwrap_or_default(),
            predicted_capacity: None,
        }
    }

    /// The same input with the capacity model's forecast (`model::capacity_config`):
    /// the least capacity its predictor in use expects over the next intervals.
    pub fn with_capacity_forecast(self, capacity: Option<&Forecast>) -> Input {
        Input {
            predicted_capacity: capacity.and_then(|f| f.value),
            ..self
        }
    }
}

/// One VIP's backends as a step sees them, in their configured order.
pub struct Backends<'a> {
    pub inputs: &'a [Input],
    /// Each backend's table key (its address as 16 bytes).
    pub keys: &'a [[u8; 16]],
    pub table_size: u32,
}

/// What one step decided.
#[derive(Debug)]
pub struct Outcome {
    /// Every backend's weight, in configured order (policy units).
    pub weights: Vec<u32>,
    /// The table of `weights` when they differ from the table in force's (the one
    /// the move budget already built, else a new build); `None` when they do not.
    pub table: Option<Result<Table, MaglevError>>,
}

/// One VIP's control between steps: its policy, parameters and state, and the
/// decisions of its last step.
#[derive(Debug, Clone)]
pub struct VipControl {
    pub kind: PolicyKind,
    pub params: Params,
    pub state: policy::State,
    /// Why each backend got its weight at the last step (empty before the first).
    pub decisions: Vec<Decision>,
}

impl VipControl {
    pub fn new(kind: PolicyKind, params: Params) -> VipControl {
        VipControl {
            kind,
            params,
            state: policy::State::default(),
            decisions: Vec::new(),
        }
    }

    /// One step: the policy runs on `backends`, its move budget checked on the real
    /// table against `in_force` (without one, on ideal shares only), and the table
    /// of the new weights comes with them if they changed.
    pub fn step(&mut self, backends: &Backends, in_force: Option<&Table>) -> Outcome {
        let Backends {
            inputs,
            keys,
            table_size,
        } = *backends;
        // The budget check builds tables; the last one it built is kept, since the
        // weights a step settles on are usually the last ones it tried.
        let mut built: Option<Table> = None;
        let mut moved = |weights: &[u32]| {
            let table = Table::build(keys, weights, table_size).ok()?;
            let share = maglev::moved_share(&table.slots, &in_force?.slots);
            built = Some(table);
            share
        };
        let (weights, decisions) =
            policy::step_with_table(self.kind, &self.params, &mut self.state, inputs, &mut moved);
        self.decisions = decisions;
        let table = match in_force {
            Some(t) if t.weights == weights => None,
            _ => Some(match built.filter(|t| t.weights == weights) {
                Some(t) => Ok(t),
                None => Table::build(keys, &weights, table_size),
            }),
        };
        Outcome { weights, table }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u32) -> (Vec<Input>, Vec<[u8; 16]>) {
        let inputs = (0..n)
            .map(|i| Input::observed(BackendId(i), 1, Observation::default(), None))
            .collect();
        let keys = (0..n)
            .map(|i| {
                let mut k = [0u8; 16];
                k[..4].copy_from_slice(&[198, 18, 1, i as u8]);
                k
            })
            .collect();
        (inputs, keys)
    }

    #[test]
    fn a_step_returns_a_table_only_when_the_weights_change() {
        let (mut inputs, keys) = backends(4);
        let mut control = VipControl::new(PolicyKind::Static, Params::default());
        let vip = Backends {
            inputs: &inputs,
            keys: &keys,
            table_size: 251,
        };
        let first = control.step(&vip, None);
        let table = first.table.expect("a first table").expect("it builds");
        assert_eq!(table.weights, first.weights);
        assert_eq!(table.slots.len(), 251);
        let again = control.step(&vip, Some(&table));
        assert!(again.table.is_none(), "same weights, no new table");
        inputs[2].healthy = false;
        let vip = Backends {
            inputs: &inputs,
            keys: &keys,
            table_size: 251,
        };
        let after = control.step(&vip, Some(&table));
        let new = after.table.expect("weights changed").expect("it builds");
        assert_eq!(new.weights[2], 0);
        assert!(
            new.slots.iter().all(|&s| s != 2),
            "the unhealthy backend has no slot"
        );
        assert_eq!(control.decisions[2].reason, policy::Reason::Unhealthy);
    }

    #[test]
    fn the_table_a_budgeted_step_built_is_the_one_it_returns() {
        // `ai` with one backend predicted far slower: the slot budget builds tables.
        let (mut inputs, keys) = backends(8);
        for (k, i) in inputs.iter_mut().enumerate() {
            i.predicted_s = Some(if k == 0 { 1.0 } else { 0.01 });
        }
        let mut control = VipControl::new(PolicyKind::Ai, Params::default());
        let vip = Backends {
            inputs: &inputs,
            keys: &keys,
            table_size: 65537,
        };
        let mut in_force = Table::build(&keys, &[1250; 8], 65537).expect("builds");
        for _ in 0..5 {
            let outcome = control.step(&vip, Some(&in_force));
            if let Some(table) = outcome.table {
                let table = table.expect("builds");
                let fresh = Table::build(&keys, &outcome.weights, 65537).expect("builds");
                assert_eq!(table, fresh, "the kept table is the table of the weights");
                in_force = table;
            }
        }
        assert!(
            in_force.weights[0] < in_force.weights[1],
            "{:?}",
            in_force.weights
        );
    }
}
