//! Telling a flood of new flows from a busy hour, from the flood guard's counters.
//!
//! The datapath's defence is always on (new flows wait in the young tables until
//! their second packet, `lb-ebpf/src/conntrack.rs`); this watch only says when a
//! flood is happening, for the operator: `lb status`, `/metrics` and a log line when
//! one begins and ends. Its signal is the rate of *unanswered* new flows: flows
//! that went into a young table and never sent a second packet (`young -
//! promoted`). Spoofed SYNs are all unanswered; a busy service's real connections
//! almost all complete. A UDP service whose clients send one datagram per flow (DNS)
//! is unanswered by nature: raise the threshold for it (`lb run --flood-threshold`).
//!
//! Pure: the caller gives the time and the counters.

use std::time::{Duration, Instant};

use lb_common::types::GuardStats;

/// Unanswered new flows per second from which a flood is declared, by default.
pub const DEFAULT_THRESHOLD_PER_S: f64 = 10_000.0;

/// How long the rate must stay below half the threshold before the flood is over.
pub const CALM_AFTER: Duration = Duration::from_secs(5);

/// What one observation changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transition {
    /// A flood began: unanswered new flows per second at the time.
    Entered { unanswered_per_s: f64 },
    /// The flood is over, after this long, with this many unanswered flows.
    Left { lasted: Duration, unanswered: u64 },
}

/// Rates over the last observed interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    /// Flows written into a young table per second.
    pub new_per_s: f64,
    /// Of those, per second, flows that did not send a second packet (the young
    /// writes minus the promotions of the interval, at least zero).
    pub unanswered_per_s: f64,
}

/// The watch: the last counters, the rates they gave, and whether a flood is on.
#[derive(Debug, Clone)]
pub struct FloodWatch {
    threshold_per_s: f64,
    last: Option<(Instant, GuardStats)>,
    rates: Rates,
    /// Since when a flood is on, and the young/promoted counters when it began.
    flood: Option<(Instant, GuardStats)>,
    /// Since when the rate has been below half the threshold, during a flood.
    calm_since: Option<Instant>,
    episodes: u64,
}

impl FloodWatch {
    /// A watch declaring a flood from `threshold_per_s` unanswered new flows per
    /// second (see [`DEFAULT_THRESHOLD_PER_S`]).
    pub fn new(threshold_per_s: f64) -> FloodWatch {
        FloodWatch {
            threshold_per_s,
            last: None,
            rates: Rates::default(),
            flood: None,
            calm_since: None,
            episodes: 0,
        }
    }

    /// Takes the counters at `now`. The first observation only sets the start;
    /// counters that went down (a datapath loaded afresh) start the count again.
    pub fn observe(&mut self, now: Instant, stats: GuardStats) -> Option<Transition> {
        let (then, before) = self.last.replace((now, stats))?;
        let dt = now.saturating_duration_since(then).as_secs_f64();
        if dt <= 0.0 || stats.young < before.young || stats.promoted < before.promoted {
            return None;
        }
        let young = (stats.young - before.young) as f64;
        let promoted = (stats.promoted - before.promoted) as f64;
        self.rates = Rates {
            new_per_s: young / dt,
            unanswered_per_s: (young - promoted).max(0.0) / dt,
        };
        let rate = self.rates.unanswered_per_s;
        match self.flood {
            None if rate >= self.threshold_per_s => {
                self.flood = Some((now, stats));
                self.calm_since = None;
                self.episodes += 1;
                Some(Transition::Entered {
                    unanswered_per_s: rate,
                })
            }
            None => None,
            Some((since, at_start)) => {
                if rate >= self.threshold_per_s / 2.0 {
                    self.calm_since = None;
                    return None;
                }
                let calm = *self.calm_since.get_or_insert(now);
                if now.saturating_duration_since(calm) < CALM_AFTER {
                    return None;
                }
                self.flood = None;
                self.calm_since = None;
                // Saturating: counters that restarted during the flood count from 0.
                let unanswered = stats
                    .young
                    .saturating_sub(at_start.young)
                    .saturating_sub(stats.promoted.saturating_sub(at_start.promoted));
                Some(Transition::Left {
                    lasted: now.saturating_duration_since(since),
                    unanswered,
                })
            }
        }
    }

    /// The counters of the last observation (zero before the first), from which
    /// the rates were taken.
    pub fn counters(&self) -> GuardStats {
        self.last.map(|(_, stats)| stats).unwrap_or_default()
    }

    /// The rates of the last interval.
    pub fn rates(&self) -> Rates {
        self.rates
    }

    /// Since when a flood is on, if one is.
    pub fn active_since(&self) -> Option<Instant> {
        self.flood.map(|(since, _)| since)
    }

    /// Floods declared since the watch began.
    pub fn episodes(&self) -> u64 {
        self.episodes
    }

    /// The threshold, in unanswered new flows per second.
    pub fn threshold_per_s(&self) -> f64 {
        self.threshold_per_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(young: u64, promoted: u64) -> GuardStats {
        GuardStats {
            young,
            promoted,
            young_failed: 0,
        }
    }

    #[test]
    fn busy_but_answered_traffic_is_no_flood() {
        let t0 = Instant::now();
        let mut w = FloodWatch::new(1_000.0);
        assert_eq!(w.observe(t0, stats(0, 0)), None);
        // 50,000 new flows a second, all completed.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(w.observe(t1, stats(50_000, 49_990)), None);
        assert_eq!(w.rates().new_per_s, 50_000.0);
        assert_eq!(w.rates().unanswered_per_s, 10.0);
        assert!(w.active_since().is_none());
    }

    #[test]
    fn a_flood_is_entered_at_the_threshold_and_left_after_calm() {
        let t0 = Instant::now();
        let mut w = FloodWatch::new(1_000.0);
        w.observe(t0, stats(0, 0));
        let s = Duration::from_millis(500);
        // 600 unanswered in half a second: 1,200/s.
        let entered = w.observe(t0 + s, stats(700, 100));
        assert_eq!(
            entered,
            Some(Transition::Entered {
                unanswered_per_s: 1_200.0
            })
        );
        assert_eq!(w.episodes(), 1);
        // Between half the threshold and the threshold: still on.
        assert_eq!(w.observe(t0 + 2 * s, stats(1_000, 100)), None);
        assert!(w.active_since().is_some());
        // Calm, but not yet for long enough.
        assert_eq!(w.observe(t0 + 3 * s, stats(1_000, 100)), None);
        assert_eq!(w.observe(t0 + 10 * s, stats(1_000, 100)), None);
        assert!(w.active_since().is_some());
        let left = w.observe(t0 + 14 * s, stats(1_010, 110));
        assert_eq!(
            left,
            Some(Transition::Left {
                lasted: 13 * s,
                unanswered: 300,
            })
        );
        assert!(w.active_since().is_none());
        assert_eq!(w.episodes(), 1);
    }

    #[test]
    fn counters_that_restart_are_not_a_flood() {
        let t0 = Instant::now();
        let mut w = FloodWatch::new(1_000.0);
        w.observe(t0, stats(1_000_000, 0));
        assert_eq!(w.observe(t0 + Duration::from_secs(1), stats(5, 0)), None);
        assert_eq!(
            w.observe(t0 + Duration::from_secs(2), stats(10, 0)),
            None,
            "the count starts again from the lower value"
        );
        assert_eq!(w.rates().unanswered_per_s, 5.0);
    }
}
