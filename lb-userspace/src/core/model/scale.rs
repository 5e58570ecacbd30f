//! Per-column standardization (subtract a centre, divide by a scale); owned by each
//! [`super::FittedSvr`], which fits one for its features and one for its target and
//! applies them to every prediction.
//!
//! Two ways to measure centre and scale are offered ([`Scaling`]): the mean and
//! standard deviation, and a robust one, the median and the interquartile range (over
//! 1.349, so that it equals the deviation for normal data). The robust one is what the
//! SVR uses by default: load series have rare huge spikes (the NAB series are chosen
//! for them), and a single spike in a window inflates the deviation so much that all
//! ordinary samples collapse into a sliver of the scaled space, where the SVR's
//! insensitive tube swallows their whole variation.
//!
//! A column whose scale is zero or negligible next to its centre falls back to the
//! standard deviation (the robust scale is zero when most values are equal), and then to
//! 1, so it maps to zeros instead of dividing by zero.

use ndarray::{Array2, ArrayView2};

use super::{ModelError, check_finite};

/// How a column's centre and scale are measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scaling {
    /// The mean and the (population) standard deviation.
    MeanStd,
    /// The median and the interquartile range over 1.349.
    #[default]
    Robust,
}

/// The centre and scale of each column of some data.
#[derive(Debug, Clone, PartialEq)]
pub struct Standardizer {
    mean: Vec<f64>,
    scale: Vec<f64>,
}

impl Standardizer {
    /// Learns each column's mean and (population) standard deviation from `data`, one
    /// sample per row. Refuses empty or non-finite data.
    pub fn fit(data: ArrayView2<'_, f64>) -> Result<Self, ModelError> {
        Self::fit_with(data, Scaling::MeanStd)
    }

    /// Learns each column's centre and scale from `data`, one sample per row, the way
    /// `scaling` says. Refuses empty or non-finite data.
    pub fn fit_with(data: ArrayView2<'_, f64>, scaling: Scaling) -> Result<Self, ModelError> {
        let (rows, cols) = data.dim();
        if rows == 0 || cols == 0 {
            return Err(ModelError::TooFewSamples {
                needed: 1,
                have: rows,
            });
        }
        if let Some((index, &value)) = data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(ModelError::NonFinite {
                what: "training value",
                index,
                value,
            });
        }
        let n = rows as f64;
        let mut mean = Vec::with_capacity(cols);
        let mut scale = Vec::with_capacity(cols);
        let mut sorted = Vec::with_capacity(rows);
        for column in data.columns() {
            let m = column.sum() / n;
            let var = column.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / n;
            let sd = var.sqrt();
            if !sd.is_finite() {
                return Err(ModelError::NonFinite {
                    what: "column deviation",
                    index: mean.len(),
                    value: sd,
                });
            }
            // Below this the column is constant up to rounding.
            let negligible = 1e-12 * m.abs().max(1e-300);
            let (centre, robust) = match scaling {
                Scaling::MeanStd => (m, sd),
                Scaling::Robust => {
                    sorted.clear();
                    sorted.extend(column.iter().copied());
                    sorted.sort_by(f64::total_cmp);
                    let iqr = quantile(&sorted, 0.75) - quantile(&sorted, 0.25);
                    (quantile(&sorted, 0.5), iqr / 1.349)
                }
            };
            mean.push(centre);
            scale.push(if robust > negligible {
                robust
            } else if sd > negligible {
                sd
            } else {
                1.0
            });
        }
        // Sums of huge finite values can overflow; refuse rather than store infinities.
        check_finite("column mean", &mean)?;
        Ok(Self { mean, scale })
    }

    /// Learns the mean and deviation of one column of values.
    pub fn fit_values(values: &[f64]) -> Result<Self, ModelError> {
        Self::fit_values_with(values, Scaling::MeanStd)
    }

    /// Learns the centre and scale of one column of values, the way `scaling` says.
    pub fn fit_values_with(values: &[f64], scaling: Scaling) -> Result<Self, ModelError> {
        let view = ArrayView2::from_shape((values.len(), 1), values)
            .map_err(|e| ModelError::Fit(e.to_string()))?;
        Self::fit_with(view, scaling)
    }

    /// The number of columns.
    pub fn columns(&self) -> usize {
        self.mean.len()
    }

    /// Each column's centre (the mean or the median).
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }

    /// Each column's scale (1 for a constant column).
    pub fn scale(&self) -> &[f64] {
        &self.scale
    }

    /// Standardizes one value of column `column` (which must exist: this indexes).
    pub(crate) fn forward(&self, column: usize, value: f64) -> f64 {
        (value - self.mean[column]) / self.scale[column]
    }

    /// Undoes [`Standardizer::forward`] for one value of column `column`.
    pub(crate) fn inverse(&self, column: usize, value: f64) -> f64 {
        value * self.scale[column] + self.mean[column]
    }

    /// Standardizes one row into `out`, which must have [`Standardizer::columns`] slots.
    pub fn forward_row(&self, row: &[f64], out: &mut [f64]) -> Result<(), ModelError> {
        if row.len() != self.columns() || out.len() != self.columns() {
            return Err(ModelError::FeatureCount {
                expected: self.columns(),
                got: row.len(),
            });
        }
        for (c, (o, v)) in out.iter_mut().zip(row).enumerate() {
            *o = self.forward(c, *v);
        }
        Ok(())
    }

    /// Undoes [`Standardizer::forward_row`].
    pub fn inverse_row(&self, row: &[f64]) -> Result<Vec<f64>, ModelError> {
        if row.len() != self.columns() {
            return Err(ModelError::FeatureCount {
                expected: self.columns(),
                got: row.len(),
            });
        }
        Ok(row
            .iter()
            .enumerate()
            .map(|(c, v)| self.inverse(c, *v))
            .collect())
    }

    /// Standardizes every row of `data` into a new, contiguous (row-major) array.
    pub fn transform(&self, data: ArrayView2<'_, f64>) -> Result<Array2<f64>, ModelError> {
        if data.ncols() != self.columns() {
            return Err(ModelError::FeatureCount {
                expected: self.columns(),
                got: data.ncols(),
            });
        }
        let mut out = data.as_standard_layout().into_owned();
        for mut row in out.rows_mut() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = self.forward(c, *v);
            }
        }
        Ok(out)
    }
}

/// The `q` quantile of sorted, non-empty `sorted`, interpolating linearly between
/// neighbours.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

#[cfg(test)]
mod tests {
    use ndarray::array;

    use super::*;

    #[test]
    fn standardized_columns_have_zero_mean_and_unit_deviation() {
        let data = array![[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [6.0, 60.0]];
        let s = Standardizer::fit(data.view()).unwrap();
        assert_eq!(s.mean(), [3.0, 30.0]);
        let t = s.transform(data.view()).unwrap();
        for column in t.columns() {
            let mean = column.sum() / 4.0;
            let var = column.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 4.0;
            assert!(mean.abs() < 1e-12);
            assert!((var - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn standardization_round_trips() {
        let data = array![[0.1, -5.0, 7.0], [1e6, 3.0, 7.0], [42.0, 0.0, 7.0]];
        let s = Standardizer::fit(data.view()).unwrap();
        for row in data.rows() {
            let row = row.to_vec();
            let mut scaled = vec![0.0; 3];
            s.forward_row(&row, &mut scaled).unwrap();
            let back = s.inverse_row(&scaled).unwrap();
            for (a, b) in row.iter().zip(&back) {
                assert!(
                    (a - b).abs() <= 1e-9 * a.abs().max(1.0),
                    "{a} came back as {b}"
                );
            }
        }
        // The constant column keeps scale 1 and maps to zero.
        assert_eq!(s.scale()[2], 1.0);
        assert_eq!(s.forward(2, 7.0), 0.0);
        let y = Standardizer::fit_values(&[2.0, 4.0]).unwrap();
        assert_eq!(y.forward(0, 4.0), 1.0);
        assert_eq!(y.inverse(0, -1.0), 2.0);
    }

    #[test]
    fn robust_scaling_ignores_a_spike() {
        // 1..=9 and one huge spike: the median is 5.5 and the IQR that of 1..=10 (4.5),
        // while the deviation is dominated by the spike.
        let mut values: Vec<f64> = (1..=9).map(f64::from).collect();
        values.push(1e6);
        let robust = Standardizer::fit_values_with(&values, Scaling::Robust).unwrap();
        assert_eq!(robust.mean(), [5.5]);
        assert!((robust.scale()[0] - 4.5 / 1.349).abs() < 1e-12);
        let plain = Standardizer::fit_values(&values).unwrap();
        assert!(plain.scale()[0] > 1e5);
        // Ordinary values stay apart after robust scaling, and the round trip holds.
        assert!(robust.forward(0, 2.0) - robust.forward(0, 1.0) > 0.2);
        assert!((robust.inverse(0, robust.forward(0, 1e6)) - 1e6).abs() < 1e-6);
        // Mostly equal values have no IQR; the deviation steps in, then 1.
        let mostly_zero = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 8.0];
        let s = Standardizer::fit_values_with(&mostly_zero, Scaling::Robust).unwrap();
        assert_eq!((s.mean()[0], s.scale()[0]), (0.0, 7f64.sqrt()));
        let s = Standardizer::fit_values_with(&[3.0; 4], Scaling::Robust).unwrap();
        assert_eq!((s.mean()[0], s.scale()[0]), (3.0, 1.0));
    }

    #[test]
    fn refuses_empty_non_finite_and_misshapen_input() {
        assert!(Standardizer::fit_values(&[]).is_err());
        assert!(matches!(
            Standardizer::fit_values(&[1.0, f64::NAN]),
            Err(ModelError::NonFinite { index: 1, .. })
        ));
        // Finite values whose sums or squares overflow are refused too.
        assert!(Standardizer::fit_values(&[f64::MAX, f64::MAX]).is_err());
        assert!(Standardizer::fit_values(&[1e300, -1e300]).is_err());
        let s = Standardizer::fit_values(&[1.0, 2.0]).unwrap();
        assert!(s.forward_row(&[1.0, 2.0], &mut [0.0, 0.0]).is_err());
        assert!(s.inverse_row(&[]).is_err());
        assert!(s.transform(array![[1.0, 2.0]].view()).is_err());
    }
}
