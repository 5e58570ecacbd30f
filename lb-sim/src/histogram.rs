//! A latency histogram with logarithmic buckets, so that a run of tens of millions of
//! requests keeps a few kilobytes instead of every latency: each power of two is cut
//! into 256 buckets (the top 8 bits of the mantissa of an `f64`), which bounds the
//! relative error of a quantile by 0.2 % from 1 µs to 1,000 s.

/// Bits of mantissa kept: 2^8 buckets per power of two.
const SUB_BITS: u32 = 8;
/// Shift from an `f64`'s bits to its bucket key.
const SHIFT: u32 = 52 - SUB_BITS;
/// Everything below this goes to the first bucket.
const MIN_S: f64 = 1e-6;
/// Everything above this goes to the last bucket.
const MAX_S: f64 = 1e3;

/// Counts of latencies by logarithmic bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum: f64,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram::new()
    }
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Histogram {
        let len = (key(MAX_S) - key(MIN_S) + 1) as usize;
        Histogram {
            counts: vec![0; len],
            total: 0,
            sum: 0.0,
        }
    }

    /// Counts one latency of `seconds` (non-negative and finite).
    #[inline]
    pub fn record(&mut self, seconds: f64) {
        let k = key(seconds.clamp(MIN_S, MAX_S)) - key(MIN_S);
        self.counts[k as usize] += 1;
        self.total += 1;
        self.sum += seconds;
    }

    /// How many latencies were counted.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The mean of what was counted (exact, not from the buckets).
    pub fn mean(&self) -> Option<f64> {
        (self.total > 0).then(|| self.sum / self.total as f64)
    }

    /// The `q` quantile by nearest rank (the `ceil(q·n)`-th smallest, as the testbed
    /// computes it), given as the middle of its bucket.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.quantile_with_worse(q, 0)
    }

    /// The `q` quantile of what was counted plus `worse` values above all of them
    /// (failed requests counted as the slowest); `None` if it falls among those.
    pub fn quantile_with_worse(&self, q: f64, worse: u64) -> Option<f64> {
        let all = self.total + worse;
        if all == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * all as f64).ceil() as u64).clamp(1, all);
        if rank > self.total {
            return None;
        }
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let base = key(MIN_S) + i as u64;
                let lo = f64::from_bits(base << SHIFT);
                let hi = f64::from_bits((base + 1) << SHIFT);
                return Some((lo + hi) / 2.0);
            }
        }
        None
    }
}

/// The bucket key of a positive finite `x`: its exponent and top mantissa bits.
#[inline]
fn key(x: f64) -> u64 {
    x.to_bits() >> SHIFT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_the_bucket_error() {
        let mut h = Histogram::new();
        let values: Vec<f64> = (1..=10_000).map(|i| i as f64 * 1e-4).collect();
        for &v in &values {
            h.record(v);
        }
        for q in [0.5, 0.99, 0.999] {
            let exact = values[(q * values.len() as f64).ceil() as usize - 1];
            let got = h.quantile(q).unwrap();
            assert!((got / exact - 1.0).abs() < 0.003, "q {q}: {got} vs {exact}");
        }
        assert!((h.mean().unwrap() - 0.50005).abs() < 1e-9);
        assert_eq!(Histogram::new().quantile(0.5), None);
        assert_eq!(h.quantile_with_worse(0.99, 200), None);
        let with = h.quantile_with_worse(0.99, 50).unwrap();
        assert!((with / values[9_949] - 1.0).abs() < 0.003, "{with}");
        h.record(0.0);
        h.record(1e9);
        assert_eq!(h.len(), 10_002);
    }
}
