//! The feature window: owns a backend's recent metric history and turns it into the
//! feature vector the predictors see; fed once per tick by [`super::BackendModel`] (and
//! by the `predictor` bench when it replays a series).
//!
//! The vector is, in order: the last `lags` target values (newest first), the mean of
//! the last `mean_window` target values (if `mean_window > 0`), the last difference
//! of the target (if `diff`), and the newest value of each extra metric (CPU, memory,
//! I/O, requests per second, ...). For a replayed single series there are no extra
//! metrics, so the features are lags of the series plus the mean and the difference.

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
            .saturating_add(self.extra_metrics)
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
}

impl FeatureWindow {
    /// An empty window for `spec`.
    pub fn new(spec: FeatureSpec) -> Result<Self, ModelError> {
        spec.validate()?;
        let capacity = spec.history_needed();
        Ok(Self {
            extras: vec![0.0; spec.extra_metrics],
            spec,
            targets: VecDeque::with_capacity(capacity),
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
        Ok(())
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
