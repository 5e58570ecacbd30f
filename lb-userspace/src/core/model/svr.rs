//! The learned predictor: owns the SVR's sliding window of samples, its training (an
//! RBF-kernel epsilon-SVR from linfa-svm on standardized features and target) and its
//! fitted model; [`super::BackendModel`] feeds and queries it every tick, and the agent
//! runs [`TrainingSet::fit`] in a background task.
//!
//! # Choices
//! - Features and target are standardized with the training window's centre and
//!   scale, so `c`, `loss_epsilon` and the kernel width mean the same on every series;
//!   predictions are un-standardized. By default centre and scale are the median and
//!   the interquartile range ([`Scaling::Robust`]), so that one spike in the window does
//!   not squash every ordinary sample together (see [`super::scale`]).
//! - The RBF width comes from the data: linfa's Gaussian kernel is
//!   `exp(-|x - x'|² / width)`, and the default width is the median of the squared
//!   distances between standardized training rows (the "median heuristic": a typical
//!   pair of samples is at kernel value 1/e), times a factor (1 by default). If more
//!   than half the pairs coincide, the mean is used instead, and 1 if all rows do.
//! - With [`SvrParams::anchor`] set (the default is feature 0, the newest lag), the SVR
//!   learns the target minus that feature and adds it back. Far from its training data
//!   an RBF machine falls back to its bias; learning the change makes that fallback
//!   "no change" (last value) instead of the window's mean, which matters for load that
//!   moves to a level it has not seen.
//! - The window is bounded ([`SvrParams::window`], 500 by default, at most
//!   [`MAX_WINDOW`]) because linfa-svm builds a dense kernel: fit time and memory grow
//!   with the square of the window. With the default tolerance of 1e-3 the `predictor`
//!   bench measures roughly 2-25 ms at 250 samples, 8-90 ms at 500 and 40-490 ms at
//!   1,000, depending on the series (and on the machine's load).
//!
//! # linfa-svm 0.8.1 traps avoided here
//! Shrinking is left off (`.shrinking(true)` panics); records and targets are owned,
//! contiguous arrays (the solver takes the targets as a slice); parameters are set with
//! `c_svr` and `eps`, not the deprecated `c_eps`. A panic inside the solver is caught
//! and returned as [`ModelError::Fit`], so no input can bring the agent down.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};

use linfa::DatasetBase;
use linfa::prelude::{Fit, Predict};
use linfa_svm::Svm;
use ndarray::{Array1, ArrayView1, ArrayView2};

use super::{ModelError, Predictor, Scaling, Standardizer, check_finite};

/// The largest training window accepted: the dense kernel of 2,000 samples takes 32 MB
/// and up to seconds to fit.
pub const MAX_WINDOW: usize = 2000;

/// How the RBF kernel's width is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KernelWidth {
    /// `factor` times the median squared distance between standardized training rows.
    Median {
        /// Multiplies the median; 1 is the plain heuristic.
        factor: f64,
    },
    /// A fixed width, in squared standardized units.
    Fixed(f64),
}

/// The SVR's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SvrParams {
    /// The most samples kept for training; older ones are dropped.
    pub window: usize,
    /// The penalty on errors beyond `loss_epsilon` (larger fits the data more closely).
    pub c: f64,
    /// The half-width of the loss's insensitive tube, in standardized target units.
    pub loss_epsilon: f64,
    /// The solver's stopping tolerance.
    pub tolerance: f64,
    /// How the kernel width is chosen.
    pub kernel_width: KernelWidth,
    /// The fewest samples a fit accepts.
    pub min_samples: usize,
    /// The feature whose value the SVR learns the target's difference from, if any.
    pub anchor: Option<usize>,
    /// How features and target are standardized.
    pub scaling: Scaling,
}

impl Default for SvrParams {
    fn default() -> Self {
        Self {
            window: 500,
            c: 1.0,
            loss_epsilon: 0.1,
            tolerance: 1e-3,
            kernel_width: KernelWidth::Median { factor: 1.0 },
            min_samples: 30,
            anchor: Some(0),
            scaling: Scaling::Robust,
        }
    }
}

impl SvrParams {
    /// Refuses parameters the solver cannot use.
    pub fn validate(&self) -> Result<(), ModelError> {
        let invalid = |name, value: f64, reason| {
            Err(ModelError::InvalidParameter {
                name,
                value,
                reason,
            })
        };
        if !(2..=MAX_WINDOW).contains(&self.window) {
            return invalid("window", self.window as f64, "must be in 2..=2000");
        }
        if !(2..=self.window).contains(&self.min_samples) {
            return invalid(
                "min_samples",
                self.min_samples as f64,
                "must be in 2..=window",
            );
        }
        if !(self.c.is_finite() && self.c > 0.0) {
            return invalid("c", self.c, "must be finite and positive");
        }
        if !(self.loss_epsilon.is_finite() && self.loss_epsilon >= 0.0) {
            return invalid("loss_epsilon", self.loss_epsilon, "must be finite and >= 0");
        }
        if !(self.tolerance.is_finite() && self.tolerance > 0.0) {
            return invalid("tolerance", self.tolerance, "must be finite and positive");
        }
        let width = match self.kernel_width {
            KernelWidth::Median { factor } => factor,
            KernelWidth::Fixed(width) => width,
        };
        if !(width.is_finite() && width > 0.0) {
            return invalid("kernel_width", width, "must be finite and positive");
        }
        Ok(())
    }
}

/// An owned snapshot of training samples: what a background fit works on.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingSet {
    n_features: usize,
    /// Row-major, `n_features` per sample.
    records: Vec<f64>,
    targets: Vec<f64>,
}

impl TrainingSet {
    /// A set of `targets.len()` samples whose features are `records`, row by row.
    /// Refuses non-finite values and records that are not `n_features` per target.
    pub fn new(
        n_features: usize,
        records: Vec<f64>,
        targets: Vec<f64>,
    ) -> Result<Self, ModelError> {
        if n_features == 0 || records.len() != n_features * targets.len() {
            return Err(ModelError::FeatureCount {
                expected: n_features.max(1) * targets.len(),
                got: records.len(),
            });
        }
        check_finite("feature", &records)?;
        check_finite("target", &targets)?;
        Ok(Self {
            n_features,
            records,
            targets,
        })
    }

    /// The number of samples.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// The length of each feature vector.
    pub fn n_features(&self) -> usize {
        self.n_features
    }

    /// Fits an SVR on the newest `params.window` samples. This takes time growing with
    /// the square of the window and touches nothing else, so it can run on another
    /// thread; on error the caller keeps its previous model.
    pub fn fit(&self, params: &SvrParams) -> Result<FittedSvr, ModelError> {
        self.fit_range(params, 0, self.len())
    }

    /// Chooses among `candidates` by a chronological validation split: each is fitted
    /// on all but the newest `validation` samples and scored by the mean absolute
    /// error of its predictions for those. Returns the best candidate and its error;
    /// the first wins a tie, and candidates whose fit fails are skipped.
    pub fn choose_params(
        &self,
        candidates: &[SvrParams],
        validation: usize,
    ) -> Result<(SvrParams, f64), ModelError> {
        if validation == 0 || validation >= self.len() {
            return Err(ModelError::InvalidParameter {
                name: "validation",
                value: validation as f64,
                reason: "must be in 1..len",
            });
        }
        let split = self.len() - validation;
        let mut best: Option<(SvrParams, f64)> = None;
        let mut last_error = ModelError::InvalidParameter {
            name: "candidates",
            value: 0.0,
            reason: "at least one parameter set is needed",
        };
        for params in candidates {
            let fitted = match self.fit_range(params, 0, split) {
                Ok(fitted) => fitted,
                Err(e) => {
                    last_error = e;
                    continue;
                }
            };
            let mut sum = 0.0;
            for i in split..self.len() {
                sum += (fitted.predict(self.row(i))? - self.targets[i]).abs();
            }
            let mae = sum / validation as f64;
            if best.as_ref().is_none_or(|(_, b)| mae < *b) {
                best = Some((params.clone(), mae));
            }
        }
        best.ok_or(last_error)
    }

    fn row(&self, i: usize) -> &[f64] {
        &self.records[i * self.n_features..(i + 1) * self.n_features]
    }

    /// Fits on the newest `params.window` samples of `start..end`.
    fn fit_range(
        &self,
        params: &SvrParams,
        start: usize,
        end: usize,
    ) -> Result<FittedSvr, ModelError> {
        params.validate()?;
        let start = start.max(end.saturating_sub(params.window));
        let n = end - start;
        if n < params.min_samples {
            return Err(ModelError::TooFewSamples {
                needed: params.min_samples,
                have: n,
            });
        }
        let nf = self.n_features;
        if let Some(anchor) = params.anchor
            && anchor >= nf
        {
            return Err(ModelError::InvalidParameter {
                name: "anchor",
                value: anchor as f64,
                reason: "must be the index of a feature",
            });
        }
        let x = ArrayView2::from_shape((n, nf), &self.records[start * nf..end * nf])
            .map_err(|e| ModelError::Fit(e.to_string()))?;
        let y: Vec<f64> = (start..end)
            .map(|i| self.targets[i] - params.anchor.map_or(0.0, |a| self.records[i * nf + a]))
            .collect();
        check_finite("target change", &y)?;
        let x_scale = Standardizer::fit_with(x, params.scaling)?;
        let y_scale = Standardizer::fit_values_with(&y, params.scaling)?;
        let records = x_scale.transform(x)?;
        check_finite("standardized feature", records.as_slice().unwrap_or(&[]))?;
        let targets: Array1<f64> = y.iter().map(|v| y_scale.forward(0, *v)).collect();
        let kernel_width = match params.kernel_width {
            KernelWidth::Median { factor } => factor * median_squared_distance(records.view()),
            KernelWidth::Fixed(width) => width,
        };
        if !(kernel_width.is_finite() && kernel_width > 0.0) {
            return Err(ModelError::NonFinite {
                what: "kernel width",
                index: 0,
                value: kernel_width,
            });
        }
        let solver = Svm::<f64, f64>::params()
            .c_svr(params.c, Some(params.loss_epsilon))
            .eps(params.tolerance)
            .shrinking(false)
            .gaussian_kernel(kernel_width);
        let dataset = DatasetBase::new(records, targets);
        let svm = catch_unwind(AssertUnwindSafe(|| solver.fit(&dataset)))
            .map_err(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "the solver panicked".to_string());
                ModelError::Fit(message)
            })?
            .map_err(|e| ModelError::Fit(e.to_string()))?;
        if !svm.rho.is_finite() || svm.alpha.iter().any(|a| !a.is_finite()) {
            return Err(ModelError::Fit(
                "the solver returned a non-finite solution".into(),
            ));
        }
        Ok(FittedSvr {
            svm,
            x_scale,
            y_scale,
            kernel_width,
            trained_on: n,
            params: params.clone(),
        })
    }
}

/// The median of the squared distances between rows of `x` (the upper median for an
/// even count), over at most 256 rows spread evenly through `x`; the mean if the median
/// is zero, and 1 if every row is the same.
fn median_squared_distance(x: ArrayView2<'_, f64>) -> f64 {
    const MAX_ROWS: usize = 256;
    let n = x.nrows();
    let step = n.div_ceil(MAX_ROWS).max(1);
    let rows: Vec<ArrayView1<'_, f64>> = x.rows().into_iter().step_by(step).collect();
    let mut d2 = Vec::with_capacity(rows.len() * rows.len().saturating_sub(1) / 2);
    for (i, a) in rows.iter().enumerate() {
        for b in &rows[i + 1..] {
            d2.push(
                a.iter()
                    .zip(b.iter())
                    .map(|(p, q)| (p - q) * (p - q))
                    .sum::<f64>(),
            );
        }
    }
    if d2.is_empty() {
        return 1.0;
    }
    let mid = d2.len() / 2;
    let (_, median, _) = d2.select_nth_unstable_by(mid, f64::total_cmp);
    let median = *median;
    if median > 1e-12 {
        return median;
    }
    let mean = d2.iter().sum::<f64>() / d2.len() as f64;
    if mean > 1e-12 { mean } else { 1.0 }
}

/// A trained SVR with the scalings it was trained with.
#[derive(Debug, Clone)]
pub struct FittedSvr {
    svm: Svm<f64, f64>,
    x_scale: Standardizer,
    y_scale: Standardizer,
    kernel_width: f64,
    trained_on: usize,
    params: SvrParams,
}

impl FittedSvr {
    /// Predicts the target for `features`, in the target's own units.
    pub fn predict(&self, features: &[f64]) -> Result<f64, ModelError> {
        let nf = self.n_features();
        if features.len() != nf {
            return Err(ModelError::FeatureCount {
                expected: nf,
                got: features.len(),
            });
        }
        check_finite("feature", features)?;
        let mut scaled = vec![0.0; nf];
        self.x_scale.forward_row(features, &mut scaled)?;
        let scaled = Array1::from(scaled);
        let y =
            <Svm<f64, f64> as Predict<ArrayView1<'_, f64>, f64>>::predict(&self.svm, scaled.view());
        let anchor = self.params.anchor.map_or(0.0, |a| features[a]);
        let value = self.y_scale.inverse(0, y) + anchor;
        check_finite("prediction", &[value])?;
        Ok(value)
    }

    /// The length of the feature vectors it takes.
    pub fn n_features(&self) -> usize {
        self.x_scale.columns()
    }

    /// The kernel width used, in squared standardized units.
    pub fn kernel_width(&self) -> f64 {
        self.kernel_width
    }

    /// The number of support vectors (each costs one kernel evaluation per prediction).
    pub fn support_vectors(&self) -> usize {
        self.svm.nsupport()
    }

    /// The number of samples it was trained on.
    pub fn trained_on(&self) -> usize {
        self.trained_on
    }

    /// The parameters it was trained with.
    pub fn params(&self) -> &SvrParams {
        &self.params
    }
}

/// The SVR predictor: a bounded sliding window of samples and the last good fit.
#[derive(Debug, Clone)]
pub struct SvrModel {
    params: SvrParams,
    n_features: Option<usize>,
    /// Row-major features of the samples in the window, oldest first.
    records: VecDeque<f64>,
    targets: VecDeque<f64>,
    fitted: Option<FittedSvr>,
}

impl SvrModel {
    /// An empty model; the feature count is fixed by the first observation.
    pub fn new(params: SvrParams) -> Result<Self, ModelError> {
        params.validate()?;
        Ok(Self {
            records: VecDeque::new(),
            targets: VecDeque::with_capacity(params.window),
            params,
            n_features: None,
            fitted: None,
        })
    }

    /// The parameters fits use.
    pub fn params(&self) -> &SvrParams {
        &self.params
    }

    /// Replaces the parameters used by later fits; the window keeps its newest samples.
    pub fn set_params(&mut self, params: SvrParams) -> Result<(), ModelError> {
        params.validate()?;
        self.params = params;
        while self.targets.len() > self.params.window {
            self.drop_oldest();
        }
        Ok(())
    }

    /// The number of samples in the window.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// An owned copy of the window, for a fit elsewhere.
    pub fn training_set(&self) -> TrainingSet {
        TrainingSet {
            n_features: self.n_features.unwrap_or(1),
            records: self.records.iter().copied().collect(),
            targets: self.targets.iter().copied().collect(),
        }
    }

    /// Fits on the current window without changing the model; see [`TrainingSet::fit`].
    pub fn fit(&self) -> Result<FittedSvr, ModelError> {
        self.training_set().fit(&self.params)
    }

    /// Makes `fitted` the model used for predictions. Refuses one trained on another
    /// number of features.
    pub fn install(&mut self, fitted: FittedSvr) -> Result<(), ModelError> {
        if let Some(nf) = self.n_features
            && nf != fitted.n_features()
        {
            return Err(ModelError::FeatureCount {
                expected: nf,
                got: fitted.n_features(),
            });
        }
        self.n_features = Some(fitted.n_features());
        self.fitted = Some(fitted);
        Ok(())
    }

    /// The model in use, if any.
    pub fn fitted(&self) -> Option<&FittedSvr> {
        self.fitted.as_ref()
    }

    fn drop_oldest(&mut self) {
        if self.targets.pop_front().is_some() {
            let nf = self.n_features.unwrap_or(0);
            self.records.drain(..nf);
        }
    }
}

impl Predictor for SvrModel {
    fn name(&self) -> &str {
        "svr"
    }

    fn observe(&mut self, features: &[f64], target: f64) -> Result<(), ModelError> {
        let nf = self.n_features.unwrap_or(features.len());
        if nf == 0 || features.len() != nf {
            return Err(ModelError::FeatureCount {
                expected: nf.max(1),
                got: features.len(),
            });
        }
        check_finite("feature", features)?;
        check_finite("target", &[target])?;
        self.n_features = Some(nf);
        if self.targets.len() == self.params.window {
            self.drop_oldest();
        }
        self.records.extend(features);
        self.targets.push_back(target);
        Ok(())
    }

    fn predict(&self, features: &[f64]) -> Result<f64, ModelError> {
        self.fitted
            .as_ref()
            .ok_or(ModelError::NotFitted)?
            .predict(features)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::{FeatureSpec, FeatureWindow, LastValue};

    /// A fixed pseudo-random sequence in [0, 1), so tests are repeatable.
    fn uniform(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 11) as f64 / (1u64 << 53) as f64
    }

    fn small_params() -> SvrParams {
        SvrParams {
            window: 200,
            min_samples: 10,
            c: 10.0,
            loss_epsilon: 0.01,
            anchor: None,
            ..SvrParams::default()
        }
    }

    #[test]
    fn learns_sine_of_a_feature_far_better_than_last_value() {
        let mut svr = SvrModel::new(small_params()).unwrap();
        let mut last = LastValue::new();
        let mut seed = 7;
        for _ in 0..200 {
            let x = uniform(&mut seed) * 6.0 - 3.0;
            svr.observe(&[x], x.sin()).unwrap();
            last.observe(&[x], x.sin()).unwrap();
        }
        svr.install(svr.fit().unwrap()).unwrap();
        let (mut svr_err, mut last_err) = (0.0, 0.0);
        for _ in 0..200 {
            let x = uniform(&mut seed) * 6.0 - 3.0;
            svr_err += (svr.predict(&[x]).unwrap() - x.sin()).abs() / 200.0;
            last_err += (last.predict(&[x]).unwrap() - x.sin()).abs() / 200.0;
            last.observe(&[x], x.sin()).unwrap();
        }
        assert!(svr_err < 0.05, "SVR MAE {svr_err}");
        assert!(
            svr_err * 10.0 < last_err,
            "SVR {svr_err} vs last value {last_err}"
        );
    }

    #[test]
    fn predicts_a_sine_series_from_its_lags_better_than_last_value() {
        let mut window = FeatureWindow::new(FeatureSpec {
            lags: 3,
            mean_window: 0,
            diff: true,
            extra_metrics: 0,
            seasonal: 0,
        })
        .unwrap();
        let mut svr = SvrModel::new(SvrParams {
            anchor: Some(0),
            ..small_params()
        })
        .unwrap();
        let mut last = LastValue::new();
        let series: Vec<f64> = (0..400)
            .map(|t| 5.0 + 2.0 * (0.2 * f64::from(t)).sin())
            .collect();
        let (mut svr_err, mut last_err, mut scored) = (0.0, 0.0, 0);
        let mut previous: Option<Vec<f64>> = None;
        for (t, &y) in series.iter().enumerate() {
            if let Some(features) = &previous {
                if t > 250 {
                    svr_err += (svr.predict(features).unwrap() - y).abs();
                    last_err += (last.predict(features).unwrap() - y).abs();
                    scored += 1;
                }
                svr.observe(features, y).unwrap();
                last.observe(features, y).unwrap();
            }
            if t == 250 {
                svr.install(svr.fit().unwrap()).unwrap();
            }
            window.push(y, &[]).unwrap();
            previous = window.features();
        }
        let (svr_err, last_err) = (svr_err / scored as f64, last_err / scored as f64);
        assert!(
            svr_err * 5.0 < last_err,
            "SVR {svr_err} vs last value {last_err}"
        );
    }

    #[test]
    fn window_is_bounded_and_keeps_the_newest_samples() {
        let mut svr = SvrModel::new(SvrParams {
            window: 50,
            min_samples: 10,
            ..SvrParams::default()
        })
        .unwrap();
        for i in 0..200 {
            let x = f64::from(i);
            svr.observe(&[x, -x], x).unwrap();
            assert!(svr.len() <= 50);
        }
        assert_eq!(svr.len(), 50);
        assert_eq!(svr.records.len(), 100);
        let set = svr.training_set();
        assert_eq!(set.len(), 50);
        assert_eq!(set.targets[0], 150.0);
        assert_eq!(set.row(0), [150.0, -150.0]);
        assert_eq!(set.targets[49], 199.0);
        assert_eq!(svr.fit().unwrap().trained_on(), 50);
        // A fit of a longer set uses only the newest `window` samples too.
        let long = TrainingSet::new(1, (0..300).map(f64::from).collect(), vec![0.0; 300]).unwrap();
        assert_eq!(long.fit(&small_params()).unwrap().trained_on(), 200);
    }

    #[test]
    fn non_finite_input_gives_the_named_error_everywhere() {
        let mut svr = SvrModel::new(small_params()).unwrap();
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(matches!(
                svr.observe(&[1.0, bad], 1.0),
                Err(ModelError::NonFinite {
                    what: "feature",
                    index: 1,
                    ..
                })
            ));
            assert!(matches!(
                svr.observe(&[1.0, 2.0], bad),
                Err(ModelError::NonFinite { what: "target", .. })
            ));
            assert!(matches!(
                TrainingSet::new(1, vec![bad], vec![1.0]),
                Err(ModelError::NonFinite {
                    what: "feature",
                    ..
                })
            ));
        }
        assert!(svr.is_empty(), "refused samples were kept");
        for i in 0..20 {
            svr.observe(&[f64::from(i), 1.0], f64::from(i)).unwrap();
        }
        svr.install(svr.fit().unwrap()).unwrap();
        assert!(matches!(
            svr.predict(&[f64::NAN, 1.0]),
            Err(ModelError::NonFinite {
                what: "feature",
                ..
            })
        ));
        // Finite values too large to standardize are refused, not a panic.
        let huge = TrainingSet::new(1, vec![1e300, -1e300, 0.0], vec![1.0, 2.0, 3.0]).unwrap();
        let params = SvrParams {
            min_samples: 2,
            ..small_params()
        };
        assert!(matches!(
            huge.fit(&params),
            Err(ModelError::NonFinite { .. })
        ));
    }

    #[test]
    fn refuses_misuse_with_errors() {
        let mut svr = SvrModel::new(small_params()).unwrap();
        assert_eq!(svr.predict(&[1.0]), Err(ModelError::NotFitted));
        assert_eq!(
            svr.fit().unwrap_err(),
            ModelError::TooFewSamples {
                needed: 10,
                have: 0
            }
        );
        assert!(svr.observe(&[], 1.0).is_err());
        svr.observe(&[1.0], 1.0).unwrap();
        assert_eq!(
            svr.observe(&[1.0, 2.0], 1.0),
            Err(ModelError::FeatureCount {
                expected: 1,
                got: 2
            })
        );
        for bad in [
            SvrParams {
                window: 1,
                ..SvrParams::default()
            },
            SvrParams {
                window: MAX_WINDOW + 1,
                ..SvrParams::default()
            },
            SvrParams {
                c: 0.0,
                ..SvrParams::default()
            },
            SvrParams {
                loss_epsilon: f64::NAN,
                ..SvrParams::default()
            },
            SvrParams {
                kernel_width: KernelWidth::Fixed(-1.0),
                ..SvrParams::default()
            },
            SvrParams {
                min_samples: 501,
                ..SvrParams::default()
            },
        ] {
            assert!(SvrModel::new(bad.clone()).is_err(), "{bad:?} was accepted");
        }
        let set = TrainingSet::new(2, vec![0.0; 40], vec![0.0; 20]).unwrap();
        let far_anchor = SvrParams {
            anchor: Some(2),
            ..small_params()
        };
        assert!(matches!(
            set.fit(&far_anchor),
            Err(ModelError::InvalidParameter { name: "anchor", .. })
        ));
        assert!(TrainingSet::new(2, vec![0.0; 3], vec![0.0; 2]).is_err());
    }

    #[test]
    fn a_failed_fit_keeps_the_last_good_model() {
        let mut svr = SvrModel::new(small_params()).unwrap();
        for i in 0..30 {
            let x = f64::from(i) / 10.0;
            svr.observe(&[x], x * x).unwrap();
        }
        svr.install(svr.fit().unwrap()).unwrap();
        let before = svr.predict(&[1.5]).unwrap();
        svr.set_params(SvrParams {
            min_samples: 100,
            ..small_params()
        })
        .unwrap();
        assert!(svr.fit().is_err());
        assert_eq!(svr.predict(&[1.5]).unwrap(), before);
        // A model for another feature count is refused.
        let other = TrainingSet::new(2, vec![0.5; 40], (0..20).map(f64::from).collect())
            .unwrap()
            .fit(&small_params())
            .unwrap();
        assert!(svr.install(other).is_err());
        assert_eq!(svr.predict(&[1.5]).unwrap(), before);
    }

    #[test]
    fn degenerate_data_fits_without_panicking() {
        // Constant features and target.
        let flat = TrainingSet::new(2, vec![3.0; 60], vec![7.0; 30]).unwrap();
        let fitted = flat.fit(&small_params()).unwrap();
        assert!((fitted.predict(&[3.0, 3.0]).unwrap() - 7.0).abs() < 1e-6);
        assert!((fitted.predict(&[1e9, -1e9]).unwrap() - 7.0).abs() < 1e-6);
        // Mostly zeros with rare spikes, like the disk series.
        let spiky: Vec<f64> = (0..60)
            .map(|i| if i % 20 == 0 { 1e6 } else { 0.0 })
            .collect();
        let set = TrainingSet::new(1, spiky[..59].to_vec(), spiky[1..].to_vec()).unwrap();
        let params = SvrParams {
            min_samples: 10,
            ..SvrParams::default()
        };
        let fitted = set.fit(&params).unwrap();
        assert!(fitted.predict(&[0.0]).unwrap().is_finite());
        assert!(fitted.kernel_width() > 0.0);
    }

    #[test]
    fn kernel_width_is_the_median_squared_distance() {
        // Standardized by mean and deviation, 0..=3 becomes (i - 1.5) / sqrt(1.25);
        // squared distances are d² / 1.25 for d in {1, 1, 1, 2, 2, 3}: 0.8 three times,
        // 3.2 twice, 7.2. The upper median is 3.2.
        let set = TrainingSet::new(1, vec![0.0, 1.0, 2.0, 3.0], vec![0.0, 1.0, 2.0, 3.0]).unwrap();
        let params = SvrParams {
            min_samples: 2,
            scaling: Scaling::MeanStd,
            ..small_params()
        };
        let fitted = set.fit(&params).unwrap();
        assert!((fitted.kernel_width() - 3.2).abs() < 1e-9);
        let doubled = SvrParams {
            kernel_width: KernelWidth::Median { factor: 2.0 },
            ..params.clone()
        };
        assert!((set.fit(&doubled).unwrap().kernel_width() - 6.4).abs() < 1e-9);
        let fixed = SvrParams {
            kernel_width: KernelWidth::Fixed(0.5),
            ..params
        };
        assert_eq!(set.fit(&fixed).unwrap().kernel_width(), 0.5);
    }

    #[test]
    fn choose_params_picks_the_candidate_that_validates_best() {
        let mut seed = 3;
        let xs: Vec<f64> = (0..120).map(|_| uniform(&mut seed) * 6.0 - 3.0).collect();
        let set = TrainingSet::new(1, xs.clone(), xs.iter().map(|x| x.sin()).collect()).unwrap();
        // A tiny penalty underfits; the sine needs a real one.
        let weak = SvrParams {
            c: 1e-4,
            ..small_params()
        };
        let good = small_params();
        let (chosen, mae) = set.choose_params(&[weak, good.clone()], 40).unwrap();
        assert_eq!(chosen, good);
        assert!(mae < 0.1, "validation MAE {mae}");
        assert!(set.choose_params(&[], 40).is_err());
        assert!(set.choose_params(&[good], 120).is_err());
    }
}
