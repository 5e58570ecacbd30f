//! Which predictor drives the weights: owns the rolling out-of-sample error of each
//! predictor ([`ErrorTracker`]) and the rule that picks one ([`Selector`]); called by
//! [`super::BackendModel`] every tick, and its [`Choice`] is what `lb explain` shows.
//!
//! The rule: the model (the SVR) is used only while its mean absolute error over its
//! last N scored predictions is strictly below that of the best baseline, and only once
//! it has at least `min_scores` of them; otherwise the baseline with the least error is
//! used. An error is only ever computed from a prediction made before the true value
//! was seen: [`ErrorTracker::predicted`] holds the prediction and the next
//! [`ErrorTracker::actual`] scores it.

use std::collections::VecDeque;
use std::fmt;

use super::{ModelError, check_finite};

/// The rolling mean absolute error of one predictor's predictions, each scored
/// `delay` values after it was made (1: one step ahead).
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorTracker {
    capacity: usize,
    /// How many [`ErrorTracker::actual`] calls after a prediction its truth is known.
    delay: usize,
    /// The predictions not yet scored, oldest first (`None`: none was made that tick).
    pending: VecDeque<Option<f64>>,
    errors: VecDeque<f64>,
}

impl ErrorTracker {
    /// A tracker over the last `capacity` scored predictions (at least 1).
    pub fn new(capacity: usize) -> Result<Self, ModelError> {
        Self::with_delay(capacity, 1)
    }

    /// A tracker over the last `capacity` scored predictions of a value `delay` calls
    /// of [`ErrorTracker::actual`] ahead (both at least 1).
    pub fn with_delay(capacity: usize, delay: usize) -> Result<Self, ModelError> {
        if capacity == 0 {
            return Err(ModelError::InvalidParameter {
                name: "capacity",
                value: 0.0,
                reason: "at least one prediction must be kept",
            });
        }
        if delay == 0 || delay > super::MAX_HORIZON {
            return Err(ModelError::InvalidParameter {
                name: "delay",
                value: delay as f64,
                reason: "must be in 1..=64",
            });
        }
        Ok(Self {
            capacity,
            delay,
            pending: VecDeque::with_capacity(delay),
            // Grown on demand: a huge capacity must not allocate up front.
            errors: VecDeque::with_capacity(capacity.min(1024)),
        })
    }

    /// Holds `prediction` until its truth is seen, `delay` [`ErrorTracker::actual`]
    /// calls later; with a delay of 1, replaces one that was never scored.
    pub fn predicted(&mut self, prediction: f64) -> Result<(), ModelError> {
        check_finite("prediction", &[prediction])?;
        self.hold(Some(prediction));
        Ok(())
    }

    /// Holds no prediction for this tick: the predictor had none.
    pub fn skip(&mut self) {
        self.hold(None);
    }

    fn hold(&mut self, prediction: Option<f64>) {
        if self.pending.len() == self.delay {
            self.pending.pop_front();
        }
        self.pending.push_back(prediction);
    }

    /// Scores the prediction made `delay` ticks ago, if any, against the true value now
    /// seen, and returns its absolute error. A non-finite `actual` is refused and keeps
    /// the predictions held.
    pub fn actual(&mut self, actual: f64) -> Result<Option<f64>, ModelError> {
        check_finite("actual value", &[actual])?;
        if self.pending.len() < self.delay {
            return Ok(None);
        }
        let Some(prediction) = self.pending.pop_front().flatten() else {
            return Ok(None);
        };
        let error = (prediction - actual).abs();
        if !error.is_finite() {
            // Both are finite, but their difference overflowed; such a score would
            // poison the mean, so it is not kept.
            return Ok(None);
        }
        if self.errors.len() == self.capacity {
            self.errors.pop_front();
        }
        self.errors.push_back(error);
        Ok(Some(error))
    }

    /// The mean absolute error of the scored predictions kept, if there are any.
    pub fn mae(&self) -> Option<f64> {
        if self.errors.is_empty() {
            return None;
        }
        Some(self.errors.iter().sum::<f64>() / self.errors.len() as f64)
    }

    /// The number of scored predictions kept (at most the capacity).
    pub fn scored(&self) -> usize {
        self.errors.len()
    }

    /// The most scored predictions kept.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// A predictor's name and its tracker, as the selector sees them.
#[derive(Debug, Clone, Copy)]
pub struct Scored<'a> {
    /// The predictor's name.
    pub name: &'a str,
    /// Its rolling error.
    pub tracker: &'a ErrorTracker,
}

/// Which predictor drives the weights, as the operator sets it (`[control] predictor`):
/// the rule above (`auto`), or one predictor always, for comparing them (the benches'
/// `ai-svr`, `ai-ewma` and `ai-last`) or for ruling the model out.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PredictorSetting {
    /// The model while its rolling error is below the best baseline's, else that
    /// baseline.
    #[default]
    Auto,
    /// The SVR whenever it has a prediction (the last value before its first fit).
    Svr,
    /// The EWMA baseline.
    Ewma,
    /// The last value seen.
    Last,
}

impl PredictorSetting {
    /// Every setting, in the order the benches run them.
    pub const ALL: [PredictorSetting; 4] = [
        PredictorSetting::Auto,
        PredictorSetting::Svr,
        PredictorSetting::Ewma,
        PredictorSetting::Last,
    ];

    /// The name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            PredictorSetting::Auto => "auto",
            PredictorSetting::Svr => "svr",
            PredictorSetting::Ewma => "ewma",
            PredictorSetting::Last => "last",
        }
    }
}

impl fmt::Display for PredictorSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for PredictorSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<PredictorSetting, String> {
        PredictorSetting::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("{s:?} is not one of auto, svr, ewma, last"))
    }
}

/// Why a predictor was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The operator set this predictor (`[control] predictor`), whatever the errors.
    Configured(PredictorSetting),
    /// The model's rolling error is below the best baseline's.
    ModelBetter,
    /// The model's rolling error is not below the best baseline's.
    ModelNotBetter,
    /// The model has too few scored predictions to be judged (it may not be fitted).
    ModelUnproven {
        /// Scored predictions it has.
        have: usize,
        /// Scored predictions it needs.
        need: usize,
    },
    /// No baseline has a scored prediction yet, so nothing can be compared.
    NoBaselineScores,
    /// There is no baseline to compare with.
    NoBaseline,
}

/// The selector's verdict, with the figures behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The name of the predictor that should drive the weights.
    pub predictor: String,
    /// Whether that is the model rather than a baseline.
    pub uses_model: bool,
    /// Why.
    pub reason: Reason,
    /// The model's name.
    pub model: String,
    /// The model's rolling error, if it has scored predictions.
    pub model_mae: Option<f64>,
    /// The number of scored predictions behind `model_mae`.
    pub model_scored: usize,
    /// The best baseline's name (the first baseline when none is scored), if any.
    pub baseline: Option<String>,
    /// That baseline's index in the baselines the selector was given.
    pub baseline_index: Option<usize>,
    /// The best baseline's rolling error, if it has scored predictions.
    pub baseline_mae: Option<f64>,
}

impl fmt::Display for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let baseline = self.baseline.as_deref().unwrap_or("no baseline");
        let mae = |m: Option<f64>| m.map_or("-".to_string(), |m| format!("{m:.4}"));
        write!(f, "{}: ", self.predictor)?;
        match self.reason {
            Reason::ModelBetter => write!(
                f,
                "{} has a rolling MAE of {} over {} predictions, below {} at {}",
                self.model,
                mae(self.model_mae),
                self.model_scored,
                baseline,
                mae(self.baseline_mae)
            ),
            Reason::ModelNotBetter => write!(
                f,
                "{} has a rolling MAE of {} over {} predictions, not below {} at {}",
                self.model,
                mae(self.model_mae),
                self.model_scored,
                baseline,
                mae(self.baseline_mae)
            ),
            Reason::ModelUnproven { have, need } => write!(
                f,
                "{} has {have} of the {need} scored predictions needed to be judged",
                self.model
            ),
            Reason::Configured(setting) => write!(
                f,
                "[control] predictor = \"{setting}\" (rolling MAE {} {}, {} {})",
                self.model,
                mae(self.model_mae),
                baseline,
                mae(self.baseline_mae)
            ),
            Reason::NoBaselineScores => write!(f, "no baseline has been scored yet"),
            Reason::NoBaseline => write!(f, "there is no baseline to compare with"),
        }
    }
}

/// Chooses between the model and the baselines by their rolling errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selector {
    /// The fewest scored predictions the model needs before it can be chosen.
    pub min_scores: usize,
}

impl Default for Selector {
    fn default() -> Self {
        Self { min_scores: 30 }
    }
}

impl Selector {
    /// The predictor that should drive the weights now, and why. The first of equally
    /// good baselines wins, and a tie with the model goes to the baseline.
    pub fn choose(&self, model: Scored<'_>, baselines: &[Scored<'_>]) -> Choice {
        let model_mae = model.tracker.mae();
        let model_scored = model.tracker.scored();
        let mut choice = Choice {
            predictor: model.name.to_string(),
            uses_model: true,
            reason: Reason::NoBaseline,
            model: model.name.to_string(),
            model_mae,
            model_scored,
            baseline: None,
            baseline_index: None,
            baseline_mae: None,
        };
        let Some(first) = baselines.first() else {
            return choice;
        };
        let best = baselines
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.tracker.mae().map(|m| (i, b, m)))
            .fold(
                None::<(usize, &Scored<'_>, f64)>,
                |best, (i, b, m)| match best {
                    Some((_, _, bm)) if bm <= m => best,
                    _ => Some((i, b, m)),
                },
            );
        let (index, baseline, baseline_mae) = match best {
            Some((i, b, m)) => (i, b, Some(m)),
            None => (0, first, None),
        };
        choice.baseline = Some(baseline.name.to_string());
        choice.baseline_index = Some(index);
        choice.baseline_mae = baseline_mae;
        let need = self.min_scores.max(1);
        choice.reason = match (model_mae, baseline_mae) {
            (_, None) => Reason::NoBaselineScores,
            _ if model_scored < need => Reason::ModelUnproven {
                have: model_scored,
                need,
            },
            (Some(m), Some(b)) if m < b => Reason::ModelBetter,
            _ => Reason::ModelNotBetter,
        };
        if choice.reason != Reason::ModelBetter {
            choice.predictor = baseline.name.to_string();
            choice.uses_model = false;
        }
        choice
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tracker that has scored `errors` in order.
    fn tracker(capacity: usize, errors: &[f64]) -> ErrorTracker {
        let mut t = ErrorTracker::new(capacity).unwrap();
        for e in errors {
            t.predicted(*e).unwrap();
            t.actual(0.0).unwrap();
        }
        t
    }

    #[test]
    fn tracker_scores_only_predictions_made_before_the_value() {
        let mut t = ErrorTracker::new(3).unwrap();
        // A value with no prediction held scores nothing.
        assert_eq!(t.actual(5.0).unwrap(), None);
        t.predicted(4.0).unwrap();
        assert_eq!(t.actual(5.0).unwrap(), Some(1.0));
        // The prediction was consumed: the same value cannot score it twice.
        assert_eq!(t.actual(5.0).unwrap(), None);
        t.predicted(2.0).unwrap();
        t.skip();
        assert_eq!(t.actual(5.0).unwrap(), None);
        assert_eq!(t.mae(), Some(1.0));
        assert_eq!(t.scored(), 1);
    }

    #[test]
    fn a_delayed_tracker_scores_each_prediction_against_the_value_delay_later() {
        let mut t = ErrorTracker::with_delay(10, 3).unwrap();
        // Predictions 10, 20, (none), 40 for values that arrive three calls later.
        let mut scored = Vec::new();
        for (value, prediction) in [
            (0.0, Some(10.0)),
            (0.0, Some(20.0)),
            (0.0, None),
            (11.0, Some(40.0)),
            (25.0, None),
            (7.0, None),
            (44.0, None),
        ] {
            scored.push(t.actual(value).unwrap());
            match prediction {
                Some(p) => t.predicted(p).unwrap(),
                None => t.skip(),
            }
        }
        // The first three values come before any prediction has its truth.
        assert_eq!(
            scored,
            [None, None, None, Some(1.0), Some(5.0), None, Some(4.0)]
        );
        assert_eq!(t.mae(), Some(10.0 / 3.0));
        for bad in [0, crate::core::model::MAX_HORIZON + 1] {
            assert!(matches!(
                ErrorTracker::with_delay(10, bad),
                Err(ModelError::InvalidParameter { name: "delay", .. })
            ));
        }
    }

    #[test]
    fn tracker_keeps_a_rolling_window() {
        let t = tracker(3, &[10.0, 1.0, 2.0, 3.0]);
        assert_eq!(t.scored(), 3);
        assert_eq!(t.mae(), Some(2.0));
        assert_eq!(ErrorTracker::new(3).unwrap().mae(), None);
        assert!(ErrorTracker::new(0).is_err());
    }

    #[test]
    fn tracker_refuses_non_finite_values() {
        let mut t = ErrorTracker::new(3).unwrap();
        assert!(matches!(
            t.predicted(f64::NAN),
            Err(ModelError::NonFinite {
                what: "prediction",
                ..
            })
        ));
        t.predicted(1.0).unwrap();
        assert!(matches!(
            t.actual(f64::INFINITY),
            Err(ModelError::NonFinite {
                what: "actual value",
                ..
            })
        ));
        // The held prediction survives the refused value.
        assert_eq!(t.actual(3.0).unwrap(), Some(2.0));
        // An overflowing difference is dropped, not kept as infinity.
        t.predicted(f64::MAX).unwrap();
        assert_eq!(t.actual(-f64::MAX).unwrap(), None);
        assert_eq!(t.mae(), Some(2.0));
    }

    #[test]
    fn selector_switches_to_the_baseline_when_the_model_is_worse_and_back() {
        let selector = Selector { min_scores: 5 };
        let mut model = ErrorTracker::new(10).unwrap();
        let mut last = ErrorTracker::new(10).unwrap();
        let mut ewma = ErrorTracker::new(10).unwrap();
        let mut history = Vec::new();
        // The model is good, then bad long enough to lose its lead, then good again.
        for (ticks, err) in [(10, 0.5), (10, 2.0), (10, 0.1)] {
            for _ in 0..ticks {
                for (t, e) in [(&mut model, err), (&mut last, 1.0), (&mut ewma, 0.8)] {
                    t.predicted(e).unwrap();
                    t.actual(0.0).unwrap();
                }
            }
            let choice = selector.choose(
                Scored {
                    name: "svr",
                    tracker: &model,
                },
                &[
                    Scored {
                        name: "last_value",
                        tracker: &last,
                    },
                    Scored {
                        name: "ewma",
                        tracker: &ewma,
                    },
                ],
            );
            assert_eq!(choice.baseline.as_deref(), Some("ewma"));
            history.push((choice.predictor.clone(), choice.reason));
        }
        assert_eq!(
            history,
            [
                ("svr".to_string(), Reason::ModelBetter),
                ("ewma".to_string(), Reason::ModelNotBetter),
                ("svr".to_string(), Reason::ModelBetter),
            ]
        );
    }

    #[test]
    fn selector_needs_evidence_before_trusting_the_model() {
        let selector = Selector { min_scores: 5 };
        let model = tracker(10, &[0.0; 4]);
        let base = tracker(10, &[1.0; 10]);
        let unscored = ErrorTracker::new(10).unwrap();
        fn scored<'a>(name: &'a str, tracker: &'a ErrorTracker) -> Scored<'a> {
            Scored { name, tracker }
        }
        let choice = selector.choose(scored("svr", &model), &[scored("last_value", &base)]);
        assert_eq!(choice.predictor, "last_value");
        assert!(!choice.uses_model);
        assert_eq!(choice.reason, Reason::ModelUnproven { have: 4, need: 5 });
        assert_eq!(
            choice.to_string(),
            "last_value: svr has 4 of the 5 scored predictions needed to be judged"
        );
        // Before any baseline is scored, the first baseline is used.
        let choice = selector.choose(
            scored("svr", &tracker(10, &[0.0; 10])),
            &[scored("last_value", &unscored), scored("ewma", &unscored)],
        );
        assert_eq!(
            (choice.predictor.as_str(), choice.reason),
            ("last_value", Reason::NoBaselineScores)
        );
        // A tie goes to the baseline.
        let choice = selector.choose(scored("svr", &base), &[scored("ewma", &base)]);
        assert_eq!(choice.reason, Reason::ModelNotBetter);
        assert_eq!(
            choice.to_string(),
            "ewma: svr has a rolling MAE of 1.0000 over 10 predictions, not below ewma at 1.0000"
        );
        // Without baselines the model is all there is.
        let choice = selector.choose(scored("svr", &unscored), &[]);
        assert_eq!(
            (choice.uses_model, choice.reason),
            (true, Reason::NoBaseline)
        );
    }
}
