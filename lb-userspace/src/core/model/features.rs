//! The feature window: owns a backend's recent metric history and turns it into the
//! feature vector the predictors see; fed once per tick by [`super::BackendModel`] (and
//! by the `predictor` bench when it replays a series).
//!
//! The vector is, in order: the last `lags` target values (newest first), the mean of
//! the last `mean_window` target values (if `mean_window > 0`), the last difference
//! of the target (if `diff`), and the newest value of each extra metric (CPU, memory,
//! I/O, requests per second, ...). For a replayed single series there are no extra
//! metrics, so the features are lags of the series plus the mean and the difference.
//!
//! With [`FeatureSpec::seasonal`] set to a horizon `h`, one more feature comes
//! between the difference and the extra metrics: what the series did one period
//! ago, the least of the `h` values that followed the newest one a period before
//! (the same aggregate [`super::BackendModel`] predicts over a horizon of `h`). The
//! period is found in the recent history ([`SEASON_HISTORY`] values) by its
//! autocorrelation ([`detect_period`]), again every [`PERIOD_EVERY`] values; while
//! none is found the feature is the newest value, so it adds nothing.

use std::collections::VecDeque;

use super::{ModelError, check_finite};

/// Which features are built from the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureSpec {
    /// How many past target values enter as they are (at least 1).
    pub lags: usize,
    /// The length of the short mean of the target; 0 leaves it out.
    pub mean_window: usize,
    /// Whether the last difference of the target (newest minus the one before) enters.
    pub diff: bool,
    /// How many other metrics the caller passes with each target value.
    pub extra_metrics: usize,
    /// The horizon of the seasonal feature (see the module documentation); 0 leaves
    /// it out.
    pub seasonal: usize,
}

/// How many target values the period is looked for in: enough for two periods of
/// a minute at 500 ms intervals.
pub const SEASON_HISTORY: usize = 240;

/// The period is looked for again after this many values.
pub const PERIOD_EVERY: usize = 10;

/// The least autocorrelation at a period for it to count.
pub const MIN_PERIOD_CORRELATION: f64 = 0.3;

/// The period of `series` in samples, if it has one: the lag of the highest
/// autocorrelation after the first lag at which the autocorrelation is at or below
/// zero (a trend or a slow drift, whose autocorrelation only decays, has none), among
/// the lags from `min_lag` to half the series, if that autocorrelation is at least
/// [`MIN_PERIOD_CORRELATION`]. `None` for a constant or too short series.
pub fn detect_period(series: &[f64], min_lag: usize) -> Option<usize> {
    let n = series.len();
    let max_lag = n / 2;
    if n < 4 || min_lag.max(1) > max_lag {
        return None;
    }
    let mean = series.iter().sum::<f64>() / n as f64;
    let centred: Vec<f64> = series.iter().map(|v| v - mean).collect();
    let variance: f64 = centred.iter().map(|v| v * v).sum();
    if !(variance.is_finite() && variance > 0.0) {
        return None;
    }
    let acf = |lag: usize| -> f64 {
        centred[..n - lag]
            .iter()
            .zip(&centred[lag..])
            .map(|(a, b)| a * b)
            .sum::<f64>()
            / variance
    };
    let mut crossed = false;
    let mut best: Option<(usize, f64)> = None;
    for lag in 1..=max_lag {
        let r = acf(lag);
        if !crossed {
            crossed = r <= 0.0;
            continue;
        }
        if lag >= min_lag && best.is_none_or(|(_, b)| r > b) {
            best = Some((lag, r));
        }
    }
    best.filter(|&(_, r)| r >= MIN_PERIOD_CORRELATION)
        .map(|(lag, _)| lag)
}

impl Default for FeatureSpec {
    /// Six lags, a mean over twelve values and the difference: for 5-minute samples,
    /// half an hour as it was and the hour's level.
    fn default() -> Self {
        Self {
            lags: 6,
            mean_window: 12,
            diff: true,
            extra_metrics: 0,
            seasonal: 0,
        }
    }
}

impl FeatureSpec {
    /// The most lags, mean window or extra metrics a spec may have.
    pub const MAX_LEN: usize = 1024;

    /// The length of the feature vector.
    pub fn len(&self) -> usize {
        self.lags
            .saturating_add(usize::from(self.mean_window > 0) + usize::from(self.diff))
            .saturating_add(usize::from(self.seasonal > 0))
            .saturating_add(self.extra_metrics)
    }

    /// The position of the seasonal feature in the vector, if there is one.
    pub fn seasonal_index(&self) -> Option<usize> {
        (self.seasonal > 0)
            .then(|| self.lags + usize::from(self.mean_window > 0) + usize::from(self.diff))
    }

    /// Whether the vector is empty (never, for a valid spec).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many target values must have been seen before there is a feature vector.
    pub fn history_needed(&self) -> usize {
        self.lags
            .max(self.mean_window)
            .max(if self.diff { 2 } else { 1 })
    }

    /// Refuses a spec without lags, or with more history or metrics than
    /// [`FeatureSpec::MAX_LEN`].
    pub fn validate(&self) -> Result<(), ModelError> {
        let invalid = |name, value: usize, reason| {
            Err(ModelError::InvalidParameter {
                name,
                value: value as f64,
                reason,
            })
        };
        if self.lags == 0 {
            return invalid("lags", 0, "at least one lag is needed");
        }
        if self.lags > Self::MAX_LEN {
            return invalid("lags", self.lags, "at most 1024");
        }
        if self.mean_window > Self::MAX_LEN {
            return invalid("mean_window", self.mean_window, "at most 1024");
        }
        if self.extra_metrics > Self::MAX_LEN {
            return invalid("extra_metrics", self.extra_metrics, "at most 1024");
        }
        if self.seasonal > super::MAX_HORIZON {
            return invalid("seasonal", self.seasonal, "at most 64");
        }
        Ok(())
    }

    /// A name for each feature, in vector order, for explanations.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = (0..self.lags).map(|i| format!("lag{i}")).collect();
        if self.mean_window > 0 {
            names.push(format!("mean{}", self.mean_window));
        }
        if self.diff {
            names.push("diff".to_string());
        }
        if self.seasonal > 0 {
            names.push(format!("season{}", self.seasonal));
        }
        names.extend((0..self.extra_metrics).map(|i| format!("extra{i}")));
        names
    }
}

/// The bounded history of one backend's metrics.
#[derive(Debug, Clone)]
pub struct FeatureWindow {
    spec: FeatureSpec,
    /// Newest at the back; never longer than `spec.history_needed()`.
    targets: VecDeque<f64>,
    extras: Vec<f64>,
    /// With a seasonal feature: the last [`SEASON_HISTORY`] target values, newest at
    /// the back (empty without one).
    history: VecDeque<f64>,
    /// The period last found in `history`.
    period: Option<usize>,
    /// Values pushed since the period was last looked for.
    since_period: usize,
}

impl FeatureWindow {
    /// An empty window for `spec`.
    pub fn new(spec: FeatureSpec) -> Result<Self, ModelError> {
        spec.validate()?;
        let capacity = spec.history_needed();
        Ok(Self {
            extras: vec![0.0; spec.extra_metrics],
            history: VecDeque::with_capacity(if spec.seasonal > 0 { SEASON_HISTORY } else { 0 }),
            spec,
            targets: VecDeque::with_capacity(capacity),
            period: None,
            since_period: 0,
        })
    }

    /// The spec the window was built with.
    pub fn spec(&self) -> &FeatureSpec {
        &self.spec
    }

    /// Adds one tick's target value and extra metrics. Non-finite values or the wrong
    /// number of extra metrics are refused and leave the window unchanged.
    pub fn push(&mut self, target: f64, extra: &[f64]) -> Result<(), ModelError> {
        check_finite("target", &[target])?;
        if extra.len() != self.spec.extra_metrics {
            return Err(ModelError::FeatureCount {
                expected: self.spec.extra_metrics,
                got: extra.len(),
            });
        }
        check_finite("extra metric", extra)?;
        if self.targets.len() == self.spec.history_needed() {
            self.targets.pop_front();
        }
        self.targets.push_back(target);
        self.extras.copy_from_slice(extra);
        if self.spec.seasonal > 0 {
            if self.history.len() == SEASON_HISTORY {
                self.history.pop_front();
            }
            self.history.push_back(target);
            self.since_period += 1;
            if self.since_period >= PERIOD_EVERY {
                self.since_period = 0;
                self.period = detect_period(self.history.make_contiguous(), self.spec.seasonal + 1);
            }
        }
        Ok(())
    }

    /// The period last found in the history, in values (only with a seasonal
    /// feature).
    pub fn period(&self) -> Option<usize> {
        self.period
    }

    /// The seasonal feature: the least of the `seasonal` values that followed, one
    /// period ago, the value one period before the newest; the newest value without
    /// a period (or history of it).
    fn seasonal_value(&self, newest: f64) -> f64 {
        let h = self.spec.seasonal;
        let n = self.history.len();
        match self.period {
            // The values at newest + k - period, k = 1..=h, all in the past.
            Some(p) if p > h && p < n => (1..=h)
                .map(|k| self.history[n - 1 + k - p])
                .fold(f64::INFINITY, f64::min),
            _ => newest,
        }
    }

    /// The newest target value, if any.
    pub fn last_target(&self) -> Option<f64> {
        self.targets.back().copied()
    }

    /// The current feature vector, or `None` until enough history has been seen.
    pub fn features(&self) -> Option<Vec<f64>> {
        let mut out = Vec::with_capacity(self.spec.len());
        self.features_into(&mut out).then_some(out)
    }

    /// Writes the current feature vector into `out` (cleared first) and says whether
    /// there was enough history for one; saves an allocation per tick.
    pub fn features_into(&self, out: &mut Vec<f64>) -> bool {
        out.clear();
        let n = self.targets.len();
        if n < self.spec.history_needed() {
            return false;
        }
        out.extend(self.targets.iter().rev().take(self.spec.lags));
        if self.spec.mean_window > 0 {
            let sum: f64 = self.targets.iter().rev().take(self.spec.mean_window).sum();
            out.push(sum / self.spec.mean_window as f64);
        }
        if self.spec.diff {
            out.push(self.targets[n - 1] - self.targets[n - 2]);
        }
        if self.spec.seasonal > 0 {
            out.push(self.seasonal_value(self.targets[n - 1]));
        }
        out.extend_from_slice(&self.extras);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_are_lags_mean_diff_and_extras_in_order() {
        let spec = FeatureSpec {
            lags: 3,
            mean_window: 4,
            diff: true,
            extra_metrics: 2,
            seasonal: 0,
        };
        assert_eq!(spec.len(), 7);
        assert_eq!(
            spec.names(),
            ["lag0", "lag1", "lag2", "mean4", "diff", "extra0", "extra1"]
        );
        let mut w = FeatureWindow::new(spec).unwrap();
        for (i, v) in [1.0, 2.0, 4.0].into_iter().enumerate() {
            w.push(v, &[10.0 + i as f64, 0.5]).unwrap();
            assert_eq!(w.features(), None, "only {} values seen", i + 1);
        }
        w.push(8.0, &[20.0, 0.25]).unwrap();
        assert_eq!(
            w.features().unwrap(),
            [8.0, 4.0, 2.0, 3.75, 4.0, 20.0, 0.25]
        );
        // The oldest value leaves the mean.
        w.push(0.0, &[21.0, 0.0]).unwrap();
        assert_eq!(w.features().unwrap(), [0.0, 8.0, 4.0, 3.5, -8.0, 21.0, 0.0]);
        assert_eq!(w.last_target(), Some(0.0));
    }

    /// Every `period` values, `len` of them at a quarter of the level.
    fn stalls(n: usize, period: usize, len: usize) -> Vec<f64> {
        (0..n)
            .map(|i| {
                let noise = ((i * 7919) % 13) as f64; // deterministic, small
                if i % period < len {
                    25.0 + noise
                } else {
                    100.0 + noise
                }
            })
            .collect()
    }

    #[test]
    fn the_period_is_found_by_autocorrelation_and_only_where_there_is_one() {
        assert_eq!(detect_period(&stalls(100, 30, 7), 5), Some(30));
        assert_eq!(detect_period(&stalls(240, 17, 4), 5), Some(17));
        // Shorter than two periods: none.
        assert_eq!(detect_period(&stalls(50, 30, 7), 5), None);
        // A trend's autocorrelation only decays; a constant has none.
        let ramp: Vec<f64> = (0..200).map(f64::from).collect();
        assert_eq!(detect_period(&ramp, 5), None);
        assert_eq!(detect_period(&[3.0; 100], 5), None);
        // Noise without a period (a fixed pseudo-random sequence).
        let mut x = 1u64;
        let noise: Vec<f64> = (0..240)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 33) as f64
            })
            .collect();
        assert_eq!(detect_period(&noise, 5), None);
    }

    #[test]
    fn the_seasonal_feature_is_the_least_of_the_next_values_a_period_ago() {
        let spec = FeatureSpec {
            lags: 1,
            mean_window: 0,
            diff: false,
            extra_metrics: 0,
            seasonal: 3,
        };
        assert_eq!(spec.len(), 2);
        assert_eq!(spec.seasonal_index(), Some(1));
        assert_eq!(spec.names(), ["lag0", "season3"]);
        let series = stalls(208, 30, 7);
        let mut w = FeatureWindow::new(spec).unwrap();
        // Before a period is found the feature is the newest value.
        for &v in &series[..30] {
            w.push(v, &[]).unwrap();
            assert_eq!(w.period(), None);
            assert_eq!(w.features().unwrap(), [v, v]);
        }
        for (i, &v) in series.iter().enumerate().skip(30) {
            w.push(v, &[]).unwrap();
            let f = w.features().unwrap();
            match w.period() {
                Some(p) => {
                    assert_eq!(p, 30);
                    let ahead = (1..=3)
                        .map(|k| series[i + k - p])
                        .fold(f64::INFINITY, f64::min);
                    assert_eq!(f, [v, ahead], "at {i}");
                }
                None => assert_eq!(f, [v, v]),
            }
        }
        // Found, and in time: two periods and a few values in.
        assert_eq!(w.period(), Some(30));
        // Just before a stall the feature foresees it; the newest value does not.
        let f = w.features().unwrap();
        assert!(f[0] >= 100.0 && f[1] < 40.0, "{f:?}");
    }

    #[test]
    fn history_is_bounded() {
        let mut w = FeatureWindow::new(FeatureSpec::default()).unwrap();
        for i in 0..1000 {
            w.push(f64::from(i), &[]).unwrap();
        }
        assert_eq!(w.targets.len(), FeatureSpec::default().history_needed());
    }

    #[test]
    fn refuses_bad_input_and_stays_unchanged() {
        for bad in [
            FeatureSpec {
                lags: 0,
                ..FeatureSpec::default()
            },
            FeatureSpec {
                lags: usize::MAX,
                ..FeatureSpec::default()
            },
            FeatureSpec {
                mean_window: usize::MAX,
                ..FeatureSpec::default()
            },
            FeatureSpec {
                extra_metrics: usize::MAX,
                ..FeatureSpec::default()
            },
        ] {
            assert!(
                FeatureWindow::new(bad.clone()).is_err(),
                "{bad:?} was accepted"
            );
        }
        let spec = FeatureSpec {
            lags: 1,
            mean_window: 0,
            diff: false,
            extra_metrics: 1,
            seasonal: 0,
        };
        let mut w = FeatureWindow::new(spec).unwrap();
        w.push(1.0, &[2.0]).unwrap();
        assert!(matches!(
            w.push(f64::NAN, &[2.0]),
            Err(ModelError::NonFinite { what: "target", .. })
        ));
        assert!(matches!(
            w.push(1.0, &[f64::INFINITY]),
            Err(ModelError::NonFinite {
                what: "extra metric",
                index: 0,
                ..
            })
        ));
        assert_eq!(
            w.push(1.0, &[]),
            Err(ModelError::FeatureCount {
                expected: 1,
                got: 0
            })
        );
        assert_eq!(w.features().unwrap(), [1.0, 2.0]);
    }
}
