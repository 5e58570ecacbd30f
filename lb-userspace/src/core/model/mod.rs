//! The load model: owns the prediction of what a new flow sent to a backend will suffer
//! one control interval ahead; the agent's control loop calls it once per backend per
//! tick, and the `predictor` bench replays recorded series through it.
//!
//! This is pure code: no kernel, no async, no clock. Nothing here panics on any input;
//! NaN and infinite values are refused with [`ModelError::NonFinite`].
//!
//! # How the agent uses it
//! Each backend gets one [`BackendModel`]. On every control tick the agent passes the
//! interval's target value (latency or queueing, not raw CPU) and the backend's other
//! metrics to [`BackendModel::tick`], which scores the predictions made on the previous
//! tick against that truth, learns from it and returns a [`Forecast`]: every
//! predictor's value for the next interval and the [`Choice`] of which one should drive
//! the weights, with the reason (for `lb explain`).
//!
//! The SVR is trained apart from the tick so that it can run in a background task:
//! [`BackendModel::training_set`] takes an owned snapshot of the sliding window,
//! [`TrainingSet::fit`] returns a new [`FittedSvr`] or an error, and
//! [`BackendModel::install`] swaps a good fit in. A failed fit changes nothing, so the
//! last good model stays in use.
//!
//! # Layout
//! - [`features`]: the feature window (lags, a short mean, a difference, other metrics).
//! - [`baseline`]: the [`LastValue`] and [`Ewma`] predictors.
//! - [`scale`]: per-column standardization (mean and deviation, or robust).
//! - [`svr`]: the RBF support vector regression over a bounded sliding window.
//! - [`select`]: rolling out-of-sample error and the choice of predictor.
//! - [`backend`]: all of the above for one backend, tick by tick.

pub mod backend;
pub mod baseline;
pub mod features;
pub mod scale;
pub mod select;
pub mod svr;

pub use backend::{BackendModel, BackendModelConfig, Forecast};
pub use baseline::{Ewma, LastValue};
pub use features::{FeatureSpec, FeatureWindow, detect_period};
pub use scale::{Scaling, Standardizer};
pub use select::{Choice, ErrorTracker, PredictorSetting, Reason, Scored, Selector};
pub use svr::{FittedSvr, KernelWidth, SvrModel, SvrParams, TrainingSet};

/// Extra metrics the model sees besides the latency history, in this order.
pub const MODEL_FEATURES: [&str; 5] =
    ["cpu", "memory", "disk_busy", "in_flight", "new_flows_per_s"];

/// The farthest a forecast reaches, in control intervals.
pub const MAX_HORIZON: usize = 64;

/// Refit every backend's model after this many observations.
pub const REFIT_EVERY: u64 = 10;

/// The model every backend gets: a short latency history (four lags, a mean over
/// eight, the last difference) and [`MODEL_FEATURES`], with `predictor` driving the
/// weights. Used by the agent and the simulator alike.
pub fn model_config(predictor: PredictorSetting) -> BackendModelConfig {
    BackendModelConfig {
        predictor,
        features: FeatureSpec {
            lags: 4,
            mean_window: 8,
            diff: true,
            extra_metrics: MODEL_FEATURES.len(),
            seasonal: 0,
        },
        ..BackendModelConfig::default()
    }
}

/// How far ahead the capacity forecast reaches, in control intervals: 2 s at the
/// default 500 ms, the time `ai` gives a shed backend's backlog to drain, so that a
/// backend cut on its forecast is cut before its capacity falls, not after.
pub const CAPACITY_HORIZON: usize = 4;

/// The capacity model every backend gets: its target is the capacity it shows
/// (requests per second it serves per unit of busy time, Envoy's figure), and it
/// predicts the least of it over the next [`CAPACITY_HORIZON`] intervals, from the
/// same history features as [`model_config`], the capacity one detected period ago
/// (the seasonal feature) and [`MODEL_FEATURES`]. The SVR learns the difference from
/// the seasonal feature (its anchor): without a period that is the newest value, as
/// for latency; with one, the model starts from what the backend did a period ago and
/// learns what differs. Unlike latency, capacity is the backend's own: a cut that
/// spares a backend its queue does not hide from the model what it predicted. Used
/// by the agent and the simulator alike.
pub fn capacity_config(predictor: PredictorSetting) -> BackendModelConfig {
    let features = FeatureSpec {
        lags: 4,
        mean_window: 8,
        diff: true,
        extra_metrics: MODEL_FEATURES.len(),
        seasonal: CAPACITY_HORIZON,
    };
    BackendModelConfig {
        predictor,
        horizon: CAPACITY_HORIZON,
        svr: SvrParams {
            window: 300,
            anchor: features.seasonal_index(),
            ..SvrParams::default()
        },
        features,
        ..BackendModelConfig::default()
    }
}

/// A backend's metrics besides its latency, as the model sees them
/// ([`MODEL_FEATURES`]); what a source does not measure is 0.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    pub cpu: f64,
    pub memory: f64,
    pub disk_busy: f64,
    pub in_flight: f64,
    pub new_flows_per_s: f64,
}

impl Load {
    /// The extra metrics in [`MODEL_FEATURES`] order, for [`BackendModel::tick`].
    pub fn features(&self) -> [f64; MODEL_FEATURES.len()] {
        [
            self.cpu,
            self.memory,
            self.disk_busy,
            self.in_flight,
            self.new_flows_per_s,
        ]
    }
}

/// A one-step-ahead predictor of a backend's target metric.
///
/// The caller alternates two calls per control tick: [`Predictor::observe`] with the
/// features that were current one tick ago and the target value that has just been
/// measured, then [`Predictor::predict`] with the features current now, for the value
/// one tick ahead.
pub trait Predictor {
    /// A short, stable name for tables and `lb explain` (for example `"last_value"`).
    fn name(&self) -> &str;

    /// Learns that `features` (known one tick ago) were followed by `target`.
    ///
    /// Non-finite input is refused and leaves the predictor unchanged.
    fn observe(&mut self, features: &[f64], target: f64) -> Result<(), ModelError>;

    /// Predicts the target one tick ahead from the current `features`.
    fn predict(&self, features: &[f64]) -> Result<f64, ModelError>;
}

/// Everything the model can refuse or fail at.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// An input, or a value computed from inputs, was NaN or infinite.
    #[error("{what} is not finite ({value}) at position {index}")]
    NonFinite {
        /// Which input: `"target"`, `"feature"`, `"extra metric"`, ...
        what: &'static str,
        /// The position of the value within its input (0 for a single value).
        index: usize,
        /// The offending value.
        value: f64,
    },
    /// A feature vector had the wrong length for this model.
    #[error("expected {expected} features, got {got}")]
    FeatureCount {
        /// The length the model was built or trained with.
        expected: usize,
        /// The length it was given.
        got: usize,
    },
    /// A parameter was outside its allowed range.
    #[error("parameter {name} = {value} is invalid: {reason}")]
    InvalidParameter {
        /// The parameter's name.
        name: &'static str,
        /// Its value.
        value: f64,
        /// What the allowed range is.
        reason: &'static str,
    },
    /// A predictor was asked for a value before it had seen any data.
    #[error("{predictor} has not observed anything yet")]
    NotReady {
        /// The predictor's name.
        predictor: &'static str,
    },
    /// The SVR was asked for a prediction before any fit was installed.
    #[error("the SVR has no fitted model yet")]
    NotFitted,
    /// A fit was asked for with too few samples.
    #[error("too few samples to fit: need {needed}, have {have}")]
    TooFewSamples {
        /// The least number of samples a fit accepts.
        needed: usize,
        /// The number there were.
        have: usize,
    },
    /// The SVR solver failed (the message is the solver's).
    #[error("the SVR fit failed: {0}")]
    Fit(String),
}

impl ModelError {
    /// Every [`ModelError::kind`].
    pub const KINDS: [&'static str; 7] = [
        "non_finite",
        "feature_count",
        "invalid_parameter",
        "not_ready",
        "not_fitted",
        "too_few_samples",
        "fit",
    ];

    /// A short, stable name of the kind of error, for counters and labels.
    pub fn kind(&self) -> &'static str {
        match self {
            ModelError::NonFinite { .. } => "non_finite",
            ModelError::FeatureCount { .. } => "feature_count",
            ModelError::InvalidParameter { .. } => "invalid_parameter",
            ModelError::NotReady { .. } => "not_ready",
            ModelError::NotFitted => "not_fitted",
            ModelError::TooFewSamples { .. } => "too_few_samples",
            ModelError::Fit(_) => "fit",
        }
    }
}

/// Refuses the first non-finite value of `values`, naming it as `what`.
pub(crate) fn check_finite(what: &'static str, values: &[f64]) -> Result<(), ModelError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(ModelError::NonFinite {
            what,
            index,
            value: values[index],
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_is_listed_once() {
        let all = [
            ModelError::NonFinite {
                what: "target",
                index: 0,
                value: f64::NAN,
            },
            ModelError::FeatureCount {
                expected: 1,
                got: 2,
            },
            ModelError::InvalidParameter {
                name: "c",
                value: -1.0,
                reason: "must be positive",
            },
            ModelError::NotReady { predictor: "ewma" },
            ModelError::NotFitted,
            ModelError::TooFewSamples { needed: 2, have: 1 },
            ModelError::Fit("solver".into()),
        ];
        let kinds: Vec<&str> = all.iter().map(ModelError::kind).collect();
        assert_eq!(kinds, ModelError::KINDS);
    }
}
