//! The naive predictors, last value and EWMA, that the SVR must beat to be used; called
//! through [`Predictor`] by [`super::BackendModel`] and the `predictor` bench.
//!
//! Both ignore the features and look only at the target series.

use super::{ModelError, Predictor, check_finite};

/// Predicts that the next value equals the last one seen.
#[derive(Debug, Clone, Default)]
pub struct LastValue {
    last: Option<f64>,
}

impl LastValue {
    /// A predictor that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Predictor for LastValue {
    fn name(&self) -> &str {
        "last_value"
    }

    fn observe(&mut self, _features: &[f64], target: f64) -> Result<(), ModelError> {
        check_finite("target", &[target])?;
        self.last = Some(target);
        Ok(())
    }

    fn predict(&self, _features: &[f64]) -> Result<f64, ModelError> {
        self.last.ok_or(ModelError::NotReady {
            predictor: "last_value",
        })
    }
}

/// Predicts the exponentially weighted moving average of the values seen:
/// `level = alpha * value + (1 - alpha) * level`, starting at the first value.
#[derive(Debug, Clone)]
pub struct Ewma {
    alpha: f64,
    level: Option<f64>,
}

impl Ewma {
    /// The alphas [`Ewma::choose_alpha`] tries when given no others: 0.05 to 1 in steps
    /// of 0.05.
    pub const DEFAULT_ALPHAS: [f64; 20] = [
        0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8,
        0.85, 0.9, 0.95, 1.0,
    ];

    /// An EWMA with smoothing factor `alpha`, which must be in (0, 1]; 1 is last value.
    pub fn new(alpha: f64) -> Result<Self, ModelError> {
        if !(alpha > 0.0 && alpha <= 1.0) {
            return Err(ModelError::InvalidParameter {
                name: "alpha",
                value: alpha,
                reason: "must be in (0, 1]",
            });
        }
        Ok(Self { alpha, level: None })
    }

    /// The smoothing factor.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The alpha among `candidates` with the least one-step-ahead mean absolute error
    /// over `series`, with its error; the first wins a tie. Call it on training data only.
    pub fn choose_alpha(series: &[f64], candidates: &[f64]) -> Result<(f64, f64), ModelError> {
        check_finite("series value", series)?;
        if series.len() < 2 {
            return Err(ModelError::TooFewSamples {
                needed: 2,
                have: series.len(),
            });
        }
        let mut best: Option<(f64, f64)> = None;
        for &alpha in candidates {
            let mut ewma = Ewma::new(alpha)?;
            let mut sum = 0.0;
            for (i, &value) in series.iter().enumerate() {
                if i > 0 {
                    sum += (ewma.predict(&[])? - value).abs();
                }
                ewma.observe(&[], value)?;
            }
            let mae = sum / (series.len() - 1) as f64;
            if best.is_none_or(|(_, b)| mae < b) {
                best = Some((alpha, mae));
            }
        }
        best.ok_or(ModelError::InvalidParameter {
            name: "candidates",
            value: 0.0,
            reason: "at least one alpha is needed",
        })
    }
}

impl Predictor for Ewma {
    fn name(&self) -> &str {
        "ewma"
    }

    fn observe(&mut self, _features: &[f64], target: f64) -> Result<(), ModelError> {
        check_finite("target", &[target])?;
        let level = match self.level {
            None => target,
            Some(level) => self.alpha * target + (1.0 - self.alpha) * level,
        };
        // Values near f64::MAX can overflow the sum; such a level is refused.
        check_finite("EWMA level", &[level])?;
        self.level = Some(level);
        Ok(())
    }

    fn predict(&self, _features: &[f64]) -> Result<f64, ModelError> {
        self.level.ok_or(ModelError::NotReady { predictor: "ewma" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_value_repeats_the_last_observation() {
        let mut p = LastValue::new();
        assert_eq!(
            p.predict(&[]),
            Err(ModelError::NotReady {
                predictor: "last_value"
            })
        );
        for (value, expected) in [(3.0, 3.0), (5.5, 5.5), (-1.0, -1.0)] {
            p.observe(&[], value).unwrap();
            assert_eq!(p.predict(&[]).unwrap(), expected);
        }
        assert_eq!(p.name(), "last_value");
    }

    #[test]
    fn ewma_follows_its_recurrence() {
        let mut p = Ewma::new(0.5).unwrap();
        assert!(p.predict(&[]).is_err());
        // 4 → 4; then 0.5*8 + 0.5*4 = 6; then 0.5*0 + 0.5*6 = 3; then 0.5*3 + 0.5*3 = 3.
        for (value, expected) in [(4.0, 4.0), (8.0, 6.0), (0.0, 3.0), (3.0, 3.0)] {
            p.observe(&[], value).unwrap();
            assert!((p.predict(&[]).unwrap() - expected).abs() < 1e-12);
        }
        assert_eq!(p.name(), "ewma");
    }

    #[test]
    fn ewma_with_alpha_one_is_last_value() {
        let mut e = Ewma::new(1.0).unwrap();
        let mut l = LastValue::new();
        for v in [1.0, 7.0, -2.0, 0.5] {
            e.observe(&[], v).unwrap();
            l.observe(&[], v).unwrap();
            assert_eq!(e.predict(&[]).unwrap(), l.predict(&[]).unwrap());
        }
    }

    #[test]
    fn ewma_rejects_alphas_outside_zero_one() {
        for alpha in [0.0, -0.1, 1.01, f64::NAN, f64::INFINITY] {
            assert!(
                matches!(
                    Ewma::new(alpha),
                    Err(ModelError::InvalidParameter { name: "alpha", .. })
                ),
                "alpha {alpha} was accepted"
            );
        }
    }

    #[test]
    fn baselines_refuse_non_finite_targets_and_stay_unchanged() {
        let mut l = LastValue::new();
        let mut e = Ewma::new(0.3).unwrap();
        l.observe(&[], 2.0).unwrap();
        e.observe(&[], 2.0).unwrap();
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(matches!(
                l.observe(&[], bad),
                Err(ModelError::NonFinite { what: "target", .. })
            ));
            assert!(matches!(
                e.observe(&[], bad),
                Err(ModelError::NonFinite { what: "target", .. })
            ));
        }
        assert_eq!(l.predict(&[]).unwrap(), 2.0);
        assert_eq!(e.predict(&[]).unwrap(), 2.0);
    }

    #[test]
    fn choose_alpha_prefers_smoothing_on_noise_and_tracking_on_a_trend() {
        // Alternating noise around a constant: a small alpha averages it away.
        let noise: Vec<f64> = (0..200)
            .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let (alpha, _) = Ewma::choose_alpha(&noise, &Ewma::DEFAULT_ALPHAS).unwrap();
        assert_eq!(alpha, 0.05);
        // A steady ramp: the freshest value is the best guess.
        let ramp: Vec<f64> = (0..200).map(f64::from).collect();
        let (alpha, mae) = Ewma::choose_alpha(&ramp, &Ewma::DEFAULT_ALPHAS).unwrap();
        assert_eq!(alpha, 1.0);
        assert!((mae - 1.0).abs() < 1e-12);
        assert!(Ewma::choose_alpha(&[1.0], &[0.5]).is_err());
        assert!(Ewma::choose_alpha(&[1.0, f64::NAN], &[0.5]).is_err());
        assert!(Ewma::choose_alpha(&[1.0, 2.0], &[]).is_err());
    }
}
