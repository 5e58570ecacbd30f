//! The weight policy: turns what is known about each backend of one VIP (health,
//! operator holds, load signals, predictions) into the weights the lookup table is
//! built from, and records why. Pure code with no clock and no I/O, called once per
//! control interval through [`crate::core::control::step`] by the agent, the simulator
//! and the tests alike.
//!
//! Four policies, chosen per VIP:
//! - `equal`: every healthy backend the same weight.
//! - `static`: the configured weights.
//! - `reactive`: a strong non-learning controller, Envoy's client-side weighted round
//!   robin: `qps / (utilisation + error_penalty · errors/qps)`, from the last interval's
//!   observations; backends without observations keep their configured share.
//! - `ai`: weights from predicted headroom. Each backend's target is its shown
//!   capacity (Envoy's figure above), cut when its predicted latency is well above
//!   the traffic-weighted median prediction (`target::latency_factor`: 1 within a
//!   factor of [`Params::latency_band`] and on the faster side, the ratio beyond the
//!   slower edge; never more than the capacity shown; not for a queue it is working
//!   off by itself, `target::drains_by_itself`), where the prediction
//!   (made worse by the backend's error rate, `capacity::with_errors`) is one control
//!   interval ahead, from the model while it beats the baselines, else from the best
//!   baseline (the caller says which). Without observations a backend's capacity is
//!   its current share, and `ai` moves share away from a backend predicted slower
//!   until predictions are within the band.
//!
//! # Stages
//! One update runs these stages in this order, each a module of its own
//! (docs/CONFIG.md explains each for operators, "What `reactive` and `ai` aim at"):
//! 0. [`eject`] (`reactive` and `ai`): a backend whose error rate is clearly above
//!    the pool's is ejected (0 at once) for an ejection time, then probed back.
//! 1. [`pool`]: what each backend holds; operator holds win outright, unhealthy
//!    and ejected backends get 0 at once (safety beats the move budget); `static` and
//!    `equal` stop here, exact.
//! 2. [`target`]: each backend's target (capacity, and for `ai` its latency factor).
//! 3. [`shed`]: a strained backend ([`capacity`]: busy or failing nearly all the
//!    time) whose shown capacity and target both fall below [`Params::shed_ratio`] of
//!    what it holds sheds to its shown capacity at once (`ai`: further, by its latency
//!    and by what drains the backlog it has built, as far as the others have spare
//!    below the strain line), outside smoothing and the budget: cutting a saturated
//!    backend's traffic is safety too.
//! 4. [`filter`]: the others' targets are filtered over updates and a change within
//!    twice the filter's noise or within the hysteresis band is not made, so that
//!    measurement noise alone never moves a weight; the rest is smoothed.
//! 5. [`handover`]: what the shed backends give up goes at once to the backends with
//!    room below their shown capacity, then by spare below the strain line.
//! 6. [`eject`] again: a backend back from an ejection stays at its probe weight
//!    until its errors are judged, then at most doubles per update.
//! 7. [`floor`]: every free backend keeps a minimum share.
//! 8. [`budget`]: the lookup-table slots moved per update, beyond those the holds,
//!    health changes, ejections and sheds move, stay within the budget, on ideal
//!    shares;
//! 9. [`quantize`]: whole steps of the weight scale, and never a VIP without weight;
//! 10. [`budget`] again, on the slots the real table moves.
//!
//! Shedding is one-sided: a backend wins share back only through the filtered,
//! smoothed, budgeted path, so a shed cannot start an oscillation faster than the
//! budget allows. Each backend's [`Decision`] says why, as a [`Reason`] and the
//! [`Note`]s of the stages that changed it.

mod budget;
mod capacity;
mod decision;
mod eject;
mod filter;
mod floor;
mod handover;
mod pool;
mod quantize;
mod resume;
mod shed;
mod target;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

pub use budget::share_moved;
pub use capacity::shown_capacity;
pub use decision::{Decision, Note, Reason};
pub use eject::{MAX_EJECTION_TIMES, Outlier, Phase as OutlierPhase};
pub use filter::Filtered;

use crate::core::BackendId;
use crate::core::model::PredictorSetting;

/// Which policy a VIP uses.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    Equal,
    Static,
    Reactive,
    #[default]
    Ai,
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PolicyKind::Equal => "equal",
            PolicyKind::Static => "static",
            PolicyKind::Reactive => "reactive",
            PolicyKind::Ai => "ai",
        })
    }
}

/// A policy as the benches name it: the VIP's policy and, for `ai`, the predictor that
/// drives it (`[control] predictor`): `ai` (auto), `ai-svr`, `ai-ewma`, `ai-last`. The
/// predictor means nothing to the other policies, which are named alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Variant {
    pub kind: PolicyKind,
    pub predictor: PredictorSetting,
}

impl Variant {
    /// Every policy the benches compare, in the order runs interleave them.
    pub const BENCHED: [Variant; 7] = [
        Variant::of(PolicyKind::Equal),
        Variant::of(PolicyKind::Static),
        Variant::of(PolicyKind::Reactive),
        Variant::of(PolicyKind::Ai),
        Variant::ai(PredictorSetting::Svr),
        Variant::ai(PredictorSetting::Ewma),
        Variant::ai(PredictorSetting::Last),
    ];

    /// `kind` with the predictor left at `auto`.
    pub const fn of(kind: PolicyKind) -> Variant {
        Variant {
            kind,
            predictor: PredictorSetting::Auto,
        }
    }

    /// `ai` driven by `predictor`.
    pub const fn ai(predictor: PredictorSetting) -> Variant {
        Variant {
            kind: PolicyKind::Ai,
            predictor,
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.kind, self.predictor) {
            (kind, PredictorSetting::Auto) => write!(f, "{kind}"),
            (kind, p) => write!(f, "{kind}-{p}"),
        }
    }
}

impl std::str::FromStr for Variant {
    type Err = String;

    fn from_str(s: &str) -> Result<Variant, String> {
        Variant::BENCHED
            .into_iter()
            .find(|v| v.to_string() == s)
            .ok_or_else(|| {
                let names: Vec<String> = Variant::BENCHED.iter().map(|v| v.to_string()).collect();
                format!("no policy {s:?} (one of {})", names.join(", "))
            })
    }
}

impl serde::Serialize for Variant {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Tuning shared by all policies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Sum of the weights the policy hands out (besides operator holds).
    pub scale: u32,
    /// Policy units per configured weight unit: holds and configured weights are
    /// multiplied by this, so that they mean what the operator wrote next to the
    /// policy's own weights. The agent picks it per VIP as scale / Σ configured.
    pub unit: u32,
    /// Weights are multiples of this (quantization: fewer, larger table updates).
    pub quantum: u32,
    /// Smallest share of `scale` a healthy backend keeps, so that it is still
    /// observed and can win traffic back. Capped at a fifth of an equal share, so
    /// that with many backends the floors never add up to more than a fifth of the
    /// VIP, and a backend five times weaker than the average can still be given no
    /// more than its capacity.
    pub floor_share: f64,
    /// Exponential smoothing factor toward the target (1: jump at once).
    pub smoothing: f64,
    /// A backend's weight changes only if its target differs by more than this
    /// fraction of its current weight.
    pub hysteresis: f64,
    /// Most of the lookup table that may move per second (0.02: 2 %). Bounded first
    /// on the ideal shares, then, when the caller can build tables
    /// ([`step_with_table`]), on the slots the real table moves.
    pub budget_per_second: f64,
    /// Seconds between updates.
    pub interval_s: f64,
    /// Exponent, in the `ai` policy, of how far a backend's predicted latency lies
    /// beyond the [`Params::latency_band`].
    pub gain: f64,
    /// Predicted latencies within this factor of the reference count as equal in
    /// the `ai` policy.
    pub latency_band: f64,
    /// A free, strained backend whose shown capacity and target are both below this
    /// fraction of what it holds sheds to the lower of the two at once, outside the
    /// filter, smoothing, hysteresis and the move budget, if the last interval saw
    /// enough of its requests (0: never). Only `reactive` and `ai` have targets that
    /// move.
    pub shed_ratio: f64,
    /// Envoy's error penalty in the `reactive` policy.
    pub error_penalty: f64,
    /// What a failed request costs its client, in seconds, for the `ai` policy: it
    /// counts as a request that took this long (a timeout, or a retry elsewhere).
    pub error_cost_s: f64,
    /// `reactive` and `ai` eject a backend whose error rate over the last interval
    /// is at least this much above the pool's (its requests' median; see [`eject`]).
    pub eject_error_rate: f64,
    /// Requests a backend must have answered in the interval for its error rate to
    /// count, and a probe before it is judged.
    pub eject_min_requests: f64,
    /// Most of the healthy, unheld backends ejected at once, rounded down (0: never
    /// eject).
    pub eject_max_share: f64,
    /// Seconds the first ejection lasts; the n-th consecutive one n times as long,
    /// at most [`MAX_EJECTION_TIMES`] times.
    pub eject_time_s: f64,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            scale: 10_000,
            unit: 1,
            quantum: 10,
            floor_share: 0.01,
            smoothing: 0.5,
            hysteresis: 0.05,
            budget_per_second: 0.02,
            interval_s: 1.0,
            gain: 1.0,
            latency_band: 3.0,
            shed_ratio: 0.5,
            error_penalty: 1.0,
            error_cost_s: 1.0,
            eject_error_rate: 0.2,
            eject_min_requests: 10.0,
            eject_max_share: 0.5,
            eject_time_s: 10.0,
        }
    }
}

/// Policy units per configured weight unit for a VIP whose configured weights are
/// `configured`: configured weights (and operator holds, which are in the same
/// units) times this sum to about 10,000, or 1,000 per backend when there are more
/// than ten, so a policy has room for fine steps however many backends share the
/// VIP, and a weight of 1 still means what it says.
pub fn unit(configured: &[u32]) -> u32 {
    let sum: u32 = configured.iter().sum::<u32>().max(1);
    let room = (configured.len() as u32).saturating_mul(1_000).max(10_000);
    (room / sum).max(1)
}

/// What is known about one backend at an update.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Input {
    /// The backend.
    pub id: BackendId,
    pub configured_weight: u32,
    pub healthy: bool,
    /// An operator hold (set, pin or drain): this weight, whatever the policy says.
    pub hold: Option<u32>,
    /// Requests per second over the last interval.
    pub qps: Option<f64>,
    /// Utilisation 0..=1 (CPU) over the last interval.
    pub utilisation: Option<f64>,
    /// Errors per second over the last interval.
    pub errors_per_s: Option<f64>,
    /// Observed latency over the last interval, seconds.
    pub latency_s: Option<f64>,
    /// Requests queued or in service at the last scrape (the backend's in-flight
    /// gauge).
    pub in_flight: Option<f64>,
    /// Latency predicted one interval ahead by the predictor in use, seconds.
    pub predicted_s: Option<f64>,
    /// Which predictor produced `predicted_s` (for the record).
    pub predictor: String,
    /// The least capacity (requests per second, as [`shown_capacity`] measures it)
    /// predicted over the next few intervals (`model::CAPACITY_HORIZON`) by the
    /// capacity model's predictor in use. `ai` acts on it only when it foresees a fall
    /// below [`Params::shed_ratio`] of the capacity shown now: the backend is shed
    /// before its capacity falls.
    pub predicted_capacity: Option<f64>,
}

/// What a policy carries from one update to the next, per VIP.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// The weights last handed out, by backend.
    pub weights: BTreeMap<BackendId, u32>,
    /// Each free backend's target share of the free backends' pool, filtered over
    /// updates, by backend.
    pub targets: BTreeMap<BackendId, Filtered>,
    /// The free backends those shares are of: when the set changes, the filters
    /// start again.
    pub free: Vec<BackendId>,
    /// The backends ejected for their errors or on their way back, by backend.
    pub outliers: BTreeMap<BackendId, Outlier>,
}

/// One update for one VIP: new weights (in `inputs` order) and the decisions, with
/// the move budget bounded on ideal shares only. See [`step_with_table`].
pub fn step(
    kind: PolicyKind,
    params: &Params,
    state: &mut State,
    inputs: &[Input],
) -> (Vec<u32>, Vec<Decision>) {
    step_with_table(kind, params, state, inputs, &mut |_| None)
}

/// One update for one VIP, with the move budget bounded on the real table:
/// `moved(weights)` builds the lookup table of `weights` (in `inputs` order) and
/// returns the share of its slots whose backend differs from the table in force
/// (`None`: it cannot tell, and the ideal-share bound stands alone). The stages run
/// in the order the module documentation lists them.
pub fn step_with_table(
    kind: PolicyKind,
    params: &Params,
    state: &mut State,
    inputs: &[Input],
    moved: &mut dyn FnMut(&[u32]) -> Option<f64>,
) -> (Vec<u32>, Vec<Decision>) {
    if matches!(kind, PolicyKind::Static | PolicyKind::Equal) {
        state.outliers.clear();
        let mut update = pool::begin(kind, params, state, inputs);
        pool::exact(&mut update);
        return update.finish(state);
    }
    eject::judge(params, state, inputs);
    let mut update = pool::begin(kind, params, state, inputs);
    filter::follow_the_pool(&update, state);
    let evidence = shed::Evidence::of(&update);
    let sheds = shed::find(&mut update, &evidence);
    let filtered_in_pool = filter::smooth(&mut update, state);
    let room = handover::room(&update, &sheds.shown_in_pool, &filtered_in_pool);
    let takers = handover::Takers::of(&update, &evidence.shown_rps);
    shed::deepen(&mut update, state, &sheds, &takers);
    handover::give(&mut update, state, &room, &takers);
    handover::settle_shed_shares(&mut update);
    eject::cap(&mut update, state);
    floor::raise(&mut update);
    let scaled = budget::on_shares(&mut update);
    quantize::round(&mut update);
    quantize::keep_a_backend(&mut update);
    budget::on_table(&mut update, &scaled, moved);
    update.finish(state)
}

/// One update's working figures, per backend in `inputs` order, as the stages hand
/// them on.
struct Update<'a> {
    kind: PolicyKind,
    params: &'a Params,
    inputs: &'a [Input],
    /// Neither held, unhealthy nor ejected: the backends the policy moves.
    free: Vec<bool>,
    /// What each backend held when the update started.
    before: Vec<u32>,
    /// What each backend starts from, before the free ones' rescale.
    unrescaled: Vec<u32>,
    /// What each backend starts from: `before`, a returning free backend's initial
    /// weight, the free ones rescaled to their initial total.
    start: Vec<u32>,
    /// Each backend's unnormalized target.
    targets: Vec<f64>,
    /// Σ `targets` over the free backends.
    free_total: f64,
    /// What the free backends hold between them (Σ `start` over them).
    pool: f64,
    /// The weights handed out (holds and health at once; the free ones at the end).
    after: Vec<u32>,
    /// The free backends' weights as the stages propose them, in the pool's units.
    proposal: Vec<f64>,
    /// Shed at once this update.
    shed: Vec<bool>,
    /// Took some of what the shed backends gave up (its whole step at once).
    relieving: Vec<bool>,
    /// Why each backend gets its weight.
    reasons: Vec<Reason>,
    /// What the stages after the first did to each backend's weight.
    notes: Vec<Vec<Note>>,
}

impl Update<'_> {
    fn n(&self) -> usize {
        self.inputs.len()
    }

    /// The free backends' indices.
    fn free(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.n()).filter(|&k| self.free[k])
    }

    /// Backend `k`'s target as its part of the pool.
    fn target_in_pool(&self, k: usize) -> f64 {
        if self.free_total > 0.0 {
            self.pool * self.targets[k] / self.free_total
        } else {
            self.pool / self.n() as f64
        }
    }

    /// Records the weights handed out and the decisions behind them. Only the
    /// policy's own weights are remembered: a backend under an operator hold starts
    /// again from its initial weight when the hold ends, and a held or unhealthy
    /// backend starts its filter again when it is free.
    fn finish(self, state: &mut State) -> (Vec<u32>, Vec<Decision>) {
        let inputs = self.inputs;
        for (k, input) in inputs.iter().enumerate() {
            if input.hold.is_some() {
                state.weights.remove(&input.id);
            } else {
                state.weights.insert(input.id, self.after[k]);
            }
        }
        state
            .weights
            .retain(|id, _| inputs.iter().any(|i| &i.id == id));
        state.targets.retain(|id, _| {
            inputs
                .iter()
                .any(|i| &i.id == id && i.hold.is_none() && i.healthy)
        });
        let decisions = inputs
            .iter()
            .zip(self.reasons)
            .zip(self.notes)
            .enumerate()
            .map(|(k, ((i, reason), notes))| Decision {
                backend: i.id,
                policy: self.kind,
                before: self.before[k],
                target: self.targets[k],
                after: self.after[k],
                predicted_s: i.predicted_s,
                predictor: i.predictor.clone(),
                reason,
                notes,
            })
            .collect();
        (self.after, decisions)
    }
}
