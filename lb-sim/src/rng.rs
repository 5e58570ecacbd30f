//! The simulator's random numbers: SplitMix64, small, fast and seedable, with one
//! independent stream per use (arrivals, flow tuples, service times), so that every
//! policy of one seed sees the very same requests: same arrival times, same 5-tuples
//! and the same service-time draws in the same order (common random numbers).

/// SplitMix64: a 64-bit counter passed through a bijective mixer (Steele, Lea and
/// Flood, 2014). Its period is 2^64 and every seed is good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

/// The counter's increment (the golden ratio in 64-bit fixed point).
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// Stream `stream` of `seed`: generators of different streams are unrelated.
    pub fn stream(seed: u64, stream: u64) -> Rng {
        let mut base = Rng::new(seed ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03));
        Rng::new(base.next_u64() ^ stream)
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform number in the open interval (0, 1): never 0, so its logarithm is
    /// finite.
    #[inline]
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// An exponential number of mean `mean`.
    #[inline]
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -self.uniform().ln() * mean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_open_and_centred_and_streams_differ() {
        let mut r = Rng::new(7);
        let n = 100_000;
        let mut sum = 0.0;
        for _ in 0..n {
            let u = r.uniform();
            assert!(u > 0.0 && u < 1.0);
            sum += u;
        }
        assert!((sum / n as f64 - 0.5).abs() < 0.01);
        let mut a = Rng::stream(1, 0);
        let mut b = Rng::stream(1, 1);
        assert_ne!(a.next_u64(), b.next_u64());
        let mut e = Rng::new(3);
        let mean = (0..n).map(|_| e.exponential(2.0)).sum::<f64>() / n as f64;
        assert!((mean - 2.0).abs() < 0.05, "{mean}");
    }
}
