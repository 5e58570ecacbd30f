//! One backend's model, tick by tick: owns its feature window, the three predictors,
//! their error trackers and the selector; the agent's control loop calls
//! [`BackendModel::tick`] once per backend per control interval, and the `predictor`
//! bench replays series through it the same way.
//!
//! A tick does, in order: score the predictions made last tick against the value just
//! measured; teach every predictor that value; update the features; predict the next
//! interval with each predictor; choose which one drives the weights. Fitting the SVR is
//! not part of a tick (see [`BackendModel::training_set`] and [`BackendModel::install`]).

use std::collections::VecDeque;

use super::{
    Choice, ErrorTracker, Ewma, FeatureSpec, FeatureWindow, FittedSvr, LastValue, MAX_HORIZON,
    ModelError, Predictor, PredictorSetting, Reason, Scored, Selector, SvrModel, SvrParams,
    TrainingSet, check_finite,
};

/// How a [`BackendModel`] is built.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendModelConfig {
    /// Which features the SVR sees.
    pub features: FeatureSpec,
    /// The SVR's parameters.
    pub svr: SvrParams,
    /// The EWMA baseline's smoothing factor, in (0, 1].
    pub ewma_alpha: f64,
    /// How many scored predictions each rolling error covers.
    pub error_window: usize,
    /// The fewest scored predictions the SVR needs before it can be chosen.
    pub min_scores: usize,
    /// Which predictor drives the weights: the selector's choice, or one always.
    pub predictor: PredictorSetting,
    /// How many ticks ahead the forecast reaches: every predictor predicts the least
    /// target value over the next `horizon` intervals, and is scored against it once
    /// they have passed (1: the next interval's value). At most [`MAX_HORIZON`].
    pub horizon: usize,
}

impl Default for BackendModelConfig {
    fn default() -> Self {
        Self {
            features: FeatureSpec::default(),
            svr: SvrParams::default(),
            ewma_alpha: 0.5,
            error_window: 100,
            min_scores: 30,
            predictor: PredictorSetting::Auto,
            horizon: 1,
        }
    }
}

/// What one tick predicts for the next interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Forecast {
    /// The chosen predictor's prediction (`None` only before the first value).
    pub value: Option<f64>,
    /// Which predictor was chosen and why.
    pub choice: Choice,
    /// The last-value baseline's prediction.
    pub last_value: Option<f64>,
    /// The EWMA baseline's prediction.
    pub ewma: Option<f64>,
    /// The SVR's prediction (`None` until it is fitted and the features are complete).
    pub svr: Option<f64>,
    /// The best baseline's prediction (the one the model is compared with).
    pub baseline: Option<f64>,
}

/// Indices into [`BackendModel::trackers`].
const LAST: usize = 0;
const EWMA: usize = 1;
const SVR: usize = 2;

/// One backend's predictors and their bookkeeping.
#[derive(Debug, Clone)]
pub struct BackendModel {
    config: BackendModelConfig,
    window: FeatureWindow,
    /// The features as they were at the end of each of the last `horizon` ticks,
    /// oldest first: the oldest are paired with the target once its horizon passed.
    previous: VecDeque<Option<Vec<f64>>>,
    /// The last `horizon` target values, oldest first.
    recent: VecDeque<f64>,
    last: LastValue,
    ewma: Ewma,
    svr: SvrModel,
    trackers: [ErrorTracker; 3],
    selector: Selector,
}

impl BackendModel {
    /// A model that has seen nothing; refuses an invalid configuration.
    pub fn new(config: BackendModelConfig) -> Result<Self, ModelError> {
        config.features.validate()?;
        if !(1..=MAX_HORIZON).contains(&config.horizon) {
            return Err(ModelError::InvalidParameter {
                name: "horizon",
                value: config.horizon as f64,
                reason: "must be in 1..=64",
            });
        }
        if let Some(anchor) = config.svr.anchor
            && anchor >= config.features.len()
        {
            return Err(ModelError::InvalidParameter {
                name: "anchor",
                value: anchor as f64,
                reason: "must be the index of a feature",
            });
        }
        let tracker = ErrorTracker::with_delay(config.error_window, config.horizon)?;
        Ok(Self {
            window: FeatureWindow::new(config.features.clone())?,
            previous: VecDeque::with_capacity(config.horizon),
            recent: VecDeque::with_capacity(config.horizon),
            last: LastValue::new(),
            ewma: Ewma::new(config.ewma_alpha)?,
            svr: SvrModel::new(config.svr.clone())?,
            trackers: [tracker.clone(), tracker.clone(), tracker],
            selector: Selector {
                min_scores: config.min_scores,
            },
            config,
        })
    }

    /// The period its seasonal feature found in the target's history, if any.
    pub fn period(&self) -> Option<usize> {
        self.window.period()
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &BackendModelConfig {
        &self.config
    }

    /// Sets which predictor drives the weights from the next tick on (a reload); what
    /// every predictor learned is kept.
    pub fn set_predictor(&mut self, predictor: PredictorSetting) {
        self.config.predictor = predictor;
    }

    /// Takes one interval's measured target value and the backend's other metrics (as
    /// many as `features.extra_metrics`), and forecasts the next interval. Refused
    /// input (non-finite, wrong count) changes nothing.
    pub fn tick(&mut self, target: f64, extra: &[f64]) -> Result<Forecast, ModelError> {
        check_finite("target", &[target])?;
        if extra.len() != self.config.features.extra_metrics {
            return Err(ModelError::FeatureCount {
                expected: self.config.features.extra_metrics,
                got: extra.len(),
            });
        }
        check_finite("extra metric", extra)?;
        // Every input is valid now, so the window takes it. A predictor or tracker
        // that still cannot use the value (only an overflow of values near f64::MAX
        // can cause that) does not learn from it: the tick never stops halfway.
        self.window.push(target, extra)?;
        let horizon = self.config.horizon;
        if self.recent.len() == horizon {
            self.recent.pop_front();
        }
        self.recent.push_back(target);
        // The truth of the forecast made `horizon` ticks ago: the least value since.
        let reached = (self.recent.len() == horizon)
            .then(|| self.recent.iter().copied().fold(f64::INFINITY, f64::min));
        if let Some(truth) = reached {
            for tracker in &mut self.trackers {
                let _ = tracker.actual(truth);
            }
        }
        let _ = self.last.observe(&[], target);
        let _ = self.ewma.observe(&[], target);
        if self.previous.len() == horizon
            && let (Some(Some(features)), Some(truth)) = (self.previous.pop_front(), reached)
        {
            let _ = self.svr.observe(&features, truth);
        }
        let features = self.window.features();

        let last_value = self.last.predict(&[]).ok();
        let ewma = self.ewma.predict(&[]).ok();
        let svr = features
            .as_deref()
            .and_then(|features| self.svr.predict(features).ok());
        self.previous.push_back(features);
        for (tracker, prediction) in self.trackers.iter_mut().zip([last_value, ewma, svr]) {
            match prediction {
                Some(p) if tracker.predicted(p).is_ok() => {}
                _ => tracker.skip(),
            }
        }
        let choice = self.choice();
        // The baselines in the order `choice` was given them.
        let baselines = [last_value, ewma];
        let baseline = choice.baseline_index.and_then(|i| baselines[i]);
        let value = match self.config.predictor {
            PredictorSetting::Auto if choice.uses_model => svr,
            PredictorSetting::Auto => baseline,
            PredictorSetting::Svr => svr,
            PredictorSetting::Ewma => ewma,
            PredictorSetting::Last => last_value,
        };
        Ok(Forecast {
            value: value.or(last_value),
            choice,
            last_value,
            ewma,
            svr,
            baseline,
        })
    }

    /// Which predictor should drive the weights now, and why: the selector's choice
    /// under [`PredictorSetting::Auto`], else the one set (with the selector's figures
    /// kept for comparison).
    pub fn choice(&self) -> Choice {
        let mut choice = self.selected();
        let set = self.config.predictor;
        let (name, uses_model) = match set {
            PredictorSetting::Auto => return choice,
            PredictorSetting::Svr => (self.svr.name(), true),
            PredictorSetting::Ewma => (self.ewma.name(), false),
            PredictorSetting::Last => (self.last.name(), false),
        };
        choice.predictor = name.to_string();
        choice.uses_model = uses_model;
        choice.reason = Reason::Configured(set);
        choice
    }

    /// Which predictor the selector would choose, by the rolling errors.
    fn selected(&self) -> Choice {
        self.selector.choose(
            Scored {
                name: self.svr.name(),
                tracker: &self.trackers[SVR],
            },
            &[
                Scored {
                    name: self.last.name(),
                    tracker: &self.trackers[LAST],
                },
                Scored {
                    name: self.ewma.name(),
                    tracker: &self.trackers[EWMA],
                },
            ],
        )
    }

    /// An owned snapshot of the SVR's training window, to fit with
    /// [`BackendModel::svr_params`] on another thread.
    pub fn training_set(&self) -> TrainingSet {
        self.svr.training_set()
    }

    /// The parameters a fit should use.
    pub fn svr_params(&self) -> &SvrParams {
        self.svr.params()
    }

    /// Makes a finished fit the SVR used from the next tick on.
    pub fn install(&mut self, fitted: FittedSvr) -> Result<(), ModelError> {
        self.svr.install(fitted)
    }

    /// The SVR, for its window and fitted model.
    pub fn svr(&self) -> &SvrModel {
        &self.svr
    }

    /// The rolling errors of last value, EWMA and SVR, in that order.
    pub fn rolling_mae(&self) -> [Option<f64>; 3] {
        [
            self.trackers[LAST].mae(),
            self.trackers[EWMA].mae(),
            self.trackers[SVR].mae(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::Reason;

    fn config() -> BackendModelConfig {
        BackendModelConfig {
            features: FeatureSpec {
                lags: 3,
                mean_window: 4,
                diff: true,
                extra_metrics: 1,
                seasonal: 0,
            },
            svr: SvrParams {
                window: 120,
                min_samples: 20,
                c: 10.0,
                loss_epsilon: 0.01,
                ..SvrParams::default()
            },
            ewma_alpha: 0.5,
            error_window: 20,
            min_scores: 10,
            predictor: PredictorSetting::Auto,
            horizon: 1,
        }
    }

    fn load(t: usize) -> f64 {
        10.0 + 3.0 * (0.25 * t as f64).sin()
    }

    #[test]
    fn the_svr_takes_over_once_it_proves_better_and_is_bounded() {
        let mut model = BackendModel::new(config()).unwrap();
        let mut choices = Vec::new();
        for t in 0..300 {
            if t == 150 {
                let fitted = model.training_set().fit(model.svr_params()).unwrap();
                model.install(fitted).unwrap();
            }
            let forecast = model.tick(load(t), &[0.5]).unwrap();
            assert!(forecast.value.is_some());
            assert_eq!(forecast.svr.is_some(), t >= 150);
            choices.push(forecast.choice);
        }
        assert!(choices[100..150].iter().all(|c| !c.uses_model));
        assert!(matches!(
            choices[155].reason,
            Reason::ModelUnproven { have: 5, need: 10 }
        ));
        let last = choices.last().unwrap();
        assert!(last.uses_model, "{last}");
        assert_eq!(last.reason, Reason::ModelBetter);
        let [lv, _, svr] = model.rolling_mae();
        assert!(svr.unwrap() * 5.0 < lv.unwrap());
        assert_eq!(model.svr().len(), 120);
    }

    #[test]
    fn a_set_predictor_drives_the_weights_whatever_the_errors() {
        let mut models: Vec<BackendModel> = PredictorSetting::ALL
            .into_iter()
            .map(|predictor| {
                BackendModel::new(BackendModelConfig {
                    predictor,
                    ..config()
                })
                .unwrap()
            })
            .collect();
        for t in 0..200 {
            if t == 100 {
                for model in &mut models {
                    let fitted = model.training_set().fit(model.svr_params()).unwrap();
                    model.install(fitted).unwrap();
                }
            }
            let forecasts: Vec<Forecast> = models
                .iter_mut()
                .map(|m| m.tick(load(t), &[0.5]).unwrap())
                .collect();
            // Every model saw the same values, so they predict alike; only the value
            // that drives the weights differs.
            let [auto, svr, ewma, last] = &forecasts[..] else {
                unreachable!()
            };
            assert_eq!((auto.ewma, auto.svr), (ewma.ewma, ewma.svr));
            assert_eq!(ewma.value, ewma.ewma);
            assert_eq!(ewma.choice.predictor, "ewma");
            assert_eq!(last.value, last.last_value);
            assert_eq!(last.choice.predictor, "last_value");
            assert_eq!(
                last.choice.reason,
                Reason::Configured(PredictorSetting::Last)
            );
            assert!(!last.choice.uses_model && !ewma.choice.uses_model);
            // The SVR drives from its first prediction on, proven or not.
            assert!(svr.choice.uses_model);
            assert_eq!(svr.value, svr.svr.or(svr.last_value));
            if t >= 100 {
                assert!(svr.svr.is_some());
            }
        }
        // By then auto has chosen the SVR for its error, and says so.
        let auto = models[0].choice();
        assert_eq!(auto.reason, Reason::ModelBetter);
        assert!(
            models[2]
                .choice()
                .to_string()
                .contains("predictor = \"ewma\"")
        );
    }

    #[test]
    fn a_reload_changes_the_predictor_and_keeps_what_was_learned() {
        let mut model = BackendModel::new(config()).unwrap();
        for t in 0..50 {
            model.tick(load(t), &[0.5]).unwrap();
        }
        let errors = model.rolling_mae();
        model.set_predictor(PredictorSetting::Ewma);
        assert_eq!(model.rolling_mae(), errors);
        let forecast = model.tick(load(50), &[0.5]).unwrap();
        assert_eq!(forecast.value, forecast.ewma);
    }

    #[test]
    fn a_horizon_scores_the_least_value_over_it() {
        let mut model = BackendModel::new(BackendModelConfig {
            horizon: 3,
            ..config()
        })
        .unwrap();
        let values = [5.0, 9.0, 2.0, 8.0, 7.0, 6.0];
        for v in values {
            model.tick(v, &[0.0]).unwrap();
        }
        // Last value predicted 5, 9, 2 (at the first three ticks) for the least of
        // the three values after each: 2, 2, 6; the errors are 3, 7 and 4.
        let [last, ..] = model.rolling_mae();
        assert_eq!(last, Some(14.0 / 3.0));
        for bad in [0, crate::core::model::MAX_HORIZON + 1] {
            assert!(
                BackendModel::new(BackendModelConfig {
                    horizon: bad,
                    ..config()
                })
                .is_err()
            );
        }
    }

    /// A backend whose capacity falls to a quarter for 7 of every 30 intervals: the
    /// capacity model, refitted every 10 ticks as the agent does, finds the period,
    /// beats the baselines and, before each stall of the later periods, forecasts
    /// the fall while the last value cannot.
    #[test]
    fn the_capacity_model_foresees_a_periodic_stall() {
        let mut model =
            BackendModel::new(super::super::capacity_config(PredictorSetting::Auto)).unwrap();
        let capacity = |i: usize| {
            let noise = ((i * 7919) % 13) as f64 * 4.0;
            if i % 30 < 7 {
                400.0 + noise
            } else {
                1600.0 + noise
            }
        };
        let mut foreseen = Vec::new();
        for i in 0..240 {
            if i > 0
                && i % 10 == 0
                && let Ok(fitted) = model.training_set().fit(model.svr_params())
            {
                model.install(fitted).unwrap();
            }
            let forecast = model.tick(capacity(i), &[0.0; 5]).unwrap();
            // The stall starts within the next four intervals.
            if i >= 150 && (26..30).contains(&(i % 30)) {
                assert_eq!(forecast.last_value, Some(capacity(i)));
                foreseen.push(forecast.value.unwrap() < 0.5 * capacity(i));
                assert!(forecast.choice.uses_model, "{i}: {}", forecast.choice);
            }
        }
        assert_eq!(model.period(), Some(30));
        assert!(foreseen.iter().all(|&f| f), "{foreseen:?}");
        let [last, ewma, svr] = model.rolling_mae();
        assert!(svr.unwrap() < 0.5 * last.unwrap().min(ewma.unwrap()));
    }

    #[test]
    fn refused_ticks_change_nothing() {
        let mut model = BackendModel::new(config()).unwrap();
        for t in 0..10 {
            model.tick(load(t), &[1.0]).unwrap();
        }
        let before = format!("{model:?}");
        assert!(matches!(
            model.tick(f64::NAN, &[1.0]),
            Err(ModelError::NonFinite { what: "target", .. })
        ));
        assert!(matches!(
            model.tick(1.0, &[f64::INFINITY]),
            Err(ModelError::NonFinite {
                what: "extra metric",
                ..
            })
        ));
        assert!(matches!(
            model.tick(1.0, &[]),
            Err(ModelError::FeatureCount { .. })
        ));
        assert_eq!(format!("{model:?}"), before);
    }

    #[test]
    fn extreme_finite_values_never_fail_a_tick() {
        let mut model = BackendModel::new(config()).unwrap();
        for t in 0..100 {
            if t == 40 {
                let fitted = model.training_set().fit(model.svr_params()).unwrap();
                model.install(fitted).unwrap();
            }
            let (target, extra) = if t < 40 {
                (load(t), 1.0)
            } else {
                // Huge values of both signs, and ordinary ones between them.
                let sign = if t % 2 == 0 { 1.0 } else { -1.0 };
                let target = if t % 3 == 0 { sign * f64::MAX } else { load(t) };
                (target, -sign * f64::MAX)
            };
            let forecast = model.tick(target, &[extra]).unwrap();
            for p in [
                forecast.value,
                forecast.last_value,
                forecast.ewma,
                forecast.svr,
            ]
            .into_iter()
            .flatten()
            {
                assert!(p.is_finite());
            }
            // A fit on the contaminated window may fail, but with an error.
            if t % 20 == 19 {
                let _ = model.training_set().fit(model.svr_params());
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

        /// Any values at all, NaN and infinities included, give forecasts or named
        /// errors; never a panic, and never a non-finite forecast.
        #[test]
        fn any_input_gives_a_forecast_or_an_error(
            values in proptest::collection::vec(
                proptest::prop_oneof![
                    3 => -1e3f64..1e3,
                    1 => proptest::num::f64::ANY,
                ],
                1..90,
            )
        ) {
            let mut model = BackendModel::new(config()).unwrap();
            for (t, &v) in values.iter().enumerate() {
                if t == 60 {
                    // The fit may fail on such data, but with an error.
                    if let Ok(fitted) = model.training_set().fit(model.svr_params()) {
                        model.install(fitted).unwrap();
                    }
                }
                match model.tick(v, &[v * 0.5]) {
                    Ok(forecast) => {
                        proptest::prop_assert!(v.is_finite());
                        for p in [forecast.value, forecast.last_value, forecast.ewma, forecast.svr]
                            .into_iter()
                            .flatten()
                        {
                            proptest::prop_assert!(p.is_finite());
                        }
                    }
                    Err(e) => proptest::prop_assert!(
                        matches!(e, ModelError::NonFinite { .. }),
                        "{e}"
                    ),
                }
            }
        }
    }

    #[test]
    fn refuses_an_anchor_outside_the_features() {
        let mut bad = config();
        bad.svr.anchor = Some(bad.features.len());
        assert!(BackendModel::new(bad).is_err());
        let mut bad = config();
        bad.ewma_alpha = 0.0;
        assert!(BackendModel::new(bad).is_err());
    }
}
