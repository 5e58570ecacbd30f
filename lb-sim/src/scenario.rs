//! The testbed's eight scenarios at scale. They mean what they mean on the testbed
//! (`tests/src/testbed/scenario.rs`): the same load levels as fractions of the
//! nominal capacity, the same slowdown factor, the same phases as fractions of the
//! run's duration `D`, and capacity-proportional configured weights for `static`
//! (equal ones for the other policies). Only the number of backends differs (120
//! instead of 3 to 8 by default), with the changes applied to a quarter of them
//! instead of one, and the hot spot of S3 moves every 10 s instead of every `D/3`:
//!
//! | id | backends (capacity units) | load | what happens |
//! |---|---|---|---|
//! | S1 | thirds of 1, 2 and 4 | 90 % | nothing: heterogeneous capacity |
//! | S2 | all 1 | 70 % | the first quarter 4× slower from D/3, recovers at 2D/3 |
//! | S3 | all 1 | 70 % | a quarter 4× slower; the next quarter every 10 s |
//! | S4 | all 1 | 50 %, spikes to 130 % | spikes of D/12 every D/3, from D/6 on |
//! | S5 | all 1 | 60 % | the first quarter fails fast (503, idle) from D/3 to 2D/3 |
//! | S6 | all 1 | 80 % of the mean capacity left | noisy neighbours: each backend's capacity replays a CPU series |
//! | S7 | all 1 | 70 % | periodic stalls: the first quarter 4× slower for T/4 every T = D/6, from T on, the j-th of its m backends j·T/m later |
//! | S8 | thirds of 1, 2 and 4 | 30 % → 110 % → 30 % | a compressed day: the load a raised cosine over D, its peak at D/2 |
//!
//! S6 replays, for each backend, one of the CPU series of [`SimParams::series`]
//! (by default the five `ec2_cpu_utilization_*.csv` of `testdata/nab`, built in):
//! backend `b` takes series `b mod k` from the fraction `{b·0.618…}` of it (the
//! fractional part: backends sharing a series start at stretches spread over it),
//! one 5-minute sample every [`REPLAY_STEP_S`] of the run, so a 90 s run replays
//! 15 hours. A neighbour's CPU of `c` % leaves the backend `1 − 0.75·c/100` of its
//! capacity ([`neighbour_capacity`], at least a quarter), applied as a slowdown of the
//! inverse. The load is 80 % of the capacity left on average over the run and the
//! backends. Reaction times are measured only in S1 to S5: S6 changes capacity at
//! every step and S7's stalls end before a 2 s window of flows could show one.

use std::fmt;

use lb_userspace::core::series::Series;

use super::SimParams;

/// S6: seconds of the run per sample of a series (a 5-minute sample of NAB's).
pub const REPLAY_STEP_S: f64 = 0.5;
/// S6: how much of a backend's capacity its neighbour's CPU takes, per unit of it.
pub const NEIGHBOUR_SHARE: f64 = 0.75;
/// S6: the least capacity a neighbour leaves, as a fraction.
pub const MIN_CAPACITY: f64 = 0.25;
/// S6: the offered load, as a fraction of the mean capacity left.
const S6_LOAD: f64 = 0.8;
/// S8: seconds per step of the piecewise-constant load curve.
const RAMP_STEP_S: f64 = 0.5;

/// The capacity a neighbour using `cpu_percent` of the shared host leaves, as a
/// fraction of the backend's own: `1 − 0.75·c/100`, between [`MIN_CAPACITY`] and 1.
pub fn neighbour_capacity(cpu_percent: f64) -> f64 {
    (1.0 - NEIGHBOUR_SHARE * cpu_percent.clamp(0.0, 100.0) / 100.0).max(MIN_CAPACITY)
}

/// The values of a series S6 replays over a run of `duration_s`: one per
/// [`REPLAY_STEP_S`], the first at 0.
pub fn series_needed(duration_s: f64) -> usize {
    (duration_s.max(0.0) / REPLAY_STEP_S).ceil() as usize + 1
}

/// S6: the capacity factor of each of `n` backends at each replay step of a run of
/// `duration_s` (see the module documentation). Empty rows without series.
pub fn replayed_capacity(series: &[Series], n: usize, duration_s: f64) -> Vec<Vec<f64>> {
    let len = series_needed(duration_s);
    (0..n)
        .map(|b| {
            if series.is_empty() {
                return Vec::new();
            }
            let start = (b as f64 * GOLDEN).fract();
            series[b % series.len()]
                .window(start, len)
                .into_iter()
                .map(neighbour_capacity)
                .collect()
        })
        .collect()
}

/// The fractional part of the golden ratio: multiples of it spread over [0, 1).
const GOLDEN: f64 = 0.618_033_988_749_895;

/// A scenario's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum ScenarioId {
    S1,
    S2,
    S3,
    S4,
    S5,
    S6,
    S7,
    S8,
}

impl ScenarioId {
    /// Every scenario, in order.
    pub const ALL: [ScenarioId; 8] = [
        ScenarioId::S1,
        ScenarioId::S2,
        ScenarioId::S3,
        ScenarioId::S4,
        ScenarioId::S5,
        ScenarioId::S6,
        ScenarioId::S7,
        ScenarioId::S8,
    ];

    /// What it tests, in one line.
    pub fn title(self) -> &'static str {
        match self {
            ScenarioId::S1 => "heterogeneous capacity 1x/2x/4x in thirds at 90 % load",
            ScenarioId::S2 => "a quarter of the backends 4x slower from D/3, recovers at 2D/3",
            ScenarioId::S3 => "a moving hot spot: a quarter 4x slower, the next quarter every 10 s",
            ScenarioId::S4 => "50 % load with bursts to 130 %",
            ScenarioId::S5 => "a quarter of the backends fail fast (503) while looking idle",
            ScenarioId::S6 => "noisy neighbours: each backend's capacity replays a real CPU series",
            ScenarioId::S7 => "periodic stalls: a quarter 4x slower for T/4 every T = D/6",
            ScenarioId::S8 => "a compressed day: load 30 % -> 110 % -> 30 % on capacities 1x/2x/4x",
        }
    }
}

impl fmt::Display for ScenarioId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

impl std::str::FromStr for ScenarioId {
    type Err = String;

    fn from_str(s: &str) -> Result<ScenarioId, String> {
        ScenarioId::ALL
            .into_iter()
            .find(|id| id.to_string().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("no scenario {s:?} (S1 to S8)"))
    }
}

/// A change applied to one backend during a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Change {
    /// Service times multiplied by this factor for requests arriving from now on.
    Slowdown(f64),
    /// Fail-fast mode on or off: every request answered at once with an error,
    /// taking no server.
    FailFast(bool),
}

/// A change at a time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Event {
    /// Seconds since the start of the load.
    pub at: f64,
    /// Backend index.
    pub backend: usize,
    pub change: Change,
}

/// A named part of a run, for the figures given per phase (slots moved): the
/// spans of time `(from, to]` it covers, seconds since the start. A control
/// tick at `t` decides on the interval that ends at `t`, so it belongs to the span
/// that holds `t` (a tick at the very start of a slowdown still saw the steady
/// state).
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub name: &'static str,
    pub spans: Vec<(f64, f64)>,
}

impl Phase {
    fn new(name: &'static str, spans: Vec<(f64, f64)>) -> Phase {
        Phase { name, spans }
    }

    /// Whether time `t` falls in one of its spans.
    pub fn holds(&self, t: f64) -> bool {
        self.spans.iter().any(|&(from, to)| from < t && t <= to)
    }

    /// Seconds it covers.
    pub fn seconds(&self) -> f64 {
        self.spans
            .iter()
            .map(|&(from, to)| (to - from).max(0.0))
            .sum()
    }
}

/// One scenario, for one set of parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub id: ScenarioId,
    /// Capacity units of each backend.
    pub units: Vec<u32>,
    /// The weights `static` is configured with (capacity-proportional).
    pub static_weights: Vec<u32>,
    /// The offered rate, piecewise constant: `(from, requests per second)`, sorted,
    /// the first from 0.
    pub rate: Vec<(f64, f64)>,
    /// The changes, sorted by time.
    pub events: Vec<Event>,
    /// Seconds of load.
    pub duration_s: f64,
    /// Requests per second one capacity unit serves at slowdown 1.
    pub unit_rate: f64,
    /// The backends whose share of new flows the time series follow (the slowed,
    /// failing or stalling ones, the smallest in S1 and S8, the quarter whose
    /// capacity varies most in S6), as a function of time; see
    /// [`Scenario::watched_at`].
    watched: Vec<(f64, Vec<usize>)>,
    /// The run in parts that do not overlap and cover it: before, during and after
    /// a change (S2, S5), before the first burst, the bursts and the calm between
    /// them (S4), the first hot spot and its moves (S3), before the first stall and
    /// the stalls (S7), the low load, its rise and its fall (S8), the whole run (S1,
    /// S6).
    pub phases: Vec<Phase>,
    /// Whether the reaction to each slowdown is measured ([`Scenario::degradations`]):
    /// in S1 to S5, not in S6 (a change at every step) nor S7 (stalls shorter than
    /// the window of flows that would measure one).
    reactions_measured: bool,
}

impl Scenario {
    /// Scenario `id` with the backends, capacity and duration of `p`.
    pub fn new(id: ScenarioId, p: &SimParams) -> Scenario {
        let n = p.backends.max(4);
        let d = p.duration_s;
        let unit_rate = p.slots_per_unit as f64 / p.service_s;
        let quarter = |q: usize| -> Vec<usize> { (q * n / 4..(q + 1) * n / 4).collect() };
        let (units, static_weights): (Vec<u32>, Vec<u32>) = match id {
            ScenarioId::S1 | ScenarioId::S8 => {
                let u: Vec<u32> = (0..n).map(|i| [1, 2, 4][i * 3 / n]).collect();
                (u.clone(), u)
            }
            _ => (vec![1; n], vec![1; n]),
        };
        let capacity = units.iter().map(|&u| u as f64).sum::<f64>() * unit_rate;
        let constant = |load: f64| vec![(0.0, load * capacity)];
        let mut events = Vec::new();
        let mut watched = Vec::new();
        let thirds = || {
            vec![
                Phase::new("steady", vec![(0.0, d / 3.0)]),
                Phase::new(
                    if id == ScenarioId::S5 {
                        "failing"
                    } else {
                        "slow"
                    },
                    vec![(d / 3.0, 2.0 * d / 3.0)],
                ),
                Phase::new("recovered", vec![(2.0 * d / 3.0, d)]),
            ]
        };
        let mut phases = vec![Phase::new("all", vec![(0.0, d)])];
        let rate = match id {
            ScenarioId::S1 => {
                watched.push((0.0, (0..n).filter(|&i| units[i] == 1).collect()));
                constant(0.9)
            }
            ScenarioId::S2 => {
                for b in quarter(0) {
                    events.push(Event {
                        at: d / 3.0,
                        backend: b,
                        change: Change::Slowdown(p.slowdown),
                    });
                    events.push(Event {
                        at: 2.0 * d / 3.0,
                        backend: b,
                        change: Change::Slowdown(1.0),
                    });
                }
                watched.push((0.0, quarter(0)));
                phases = thirds();
                constant(0.7)
            }
            ScenarioId::S3 => {
                let period = p
                    .hotspot_period_s
                    .max(p.control.interval_ms as f64 / 1000.0);
                let mut phase = 0;
                while (phase as f64) * period < d {
                    let at = phase as f64 * period;
                    if phase > 0 {
                        for b in quarter((phase - 1) % 4) {
                            events.push(Event {
                                at,
                                backend: b,
                                change: Change::Slowdown(1.0),
                            });
                        }
                    }
                    for b in quarter(phase % 4) {
                        events.push(Event {
                            at,
                            backend: b,
                            change: Change::Slowdown(p.slowdown),
                        });
                    }
                    watched.push((at, quarter(phase % 4)));
                    phase += 1;
                }
                let first = period.min(d);
                phases = vec![
                    Phase::new("first spot", vec![(0.0, first)]),
                    Phase::new("moves", vec![(first, d)]),
                ];
                constant(0.7)
            }
            ScenarioId::S4 => {
                let (base, spike) = (0.5 * capacity, 1.3 * capacity);
                let (first, period, len) = (d / 6.0, d / 3.0, d / 12.0);
                let mut rate = vec![(0.0, base)];
                let (mut bursts, mut calm) = (Vec::new(), Vec::new());
                let mut start = first;
                while start < d {
                    rate.push((start, spike));
                    rate.push((start + len, base));
                    bursts.push((start, (start + len).min(d)));
                    calm.push(((start + len).min(d), (start + period).min(d)));
                    start += period;
                }
                phases = vec![
                    Phase::new("before bursts", vec![(0.0, first.min(d))]),
                    Phase::new("bursts", bursts),
                    Phase::new("between bursts", calm),
                ];
                rate
            }
            ScenarioId::S5 => {
                for b in quarter(0) {
                    events.push(Event {
                        at: d / 3.0,
                        backend: b,
                        change: Change::FailFast(true),
                    });
                    events.push(Event {
                        at: 2.0 * d / 3.0,
                        backend: b,
                        change: Change::FailFast(false),
                    });
                }
                watched.push((0.0, quarter(0)));
                phases = thirds();
                constant(0.6)
            }
            ScenarioId::S6 => {
                let factors = replayed_capacity(&p.series, n, d);
                let steps = (d / REPLAY_STEP_S).ceil() as usize;
                for (b, row) in factors.iter().enumerate() {
                    let mut slowdown = 1.0;
                    for (i, &f) in row.iter().take(steps).enumerate() {
                        if 1.0 / f != slowdown {
                            slowdown = 1.0 / f;
                            events.push(Event {
                                at: i as f64 * REPLAY_STEP_S,
                                backend: b,
                                change: Change::Slowdown(slowdown),
                            });
                        }
                    }
                }
                // The mean capacity left, each step weighted by its time in the run.
                let mut left = 0.0;
                for row in &factors {
                    for (i, &f) in row.iter().take(steps).enumerate() {
                        let from = i as f64 * REPLAY_STEP_S;
                        left += f * ((from + REPLAY_STEP_S).min(d) - from);
                    }
                }
                let mean_left = if factors.iter().all(Vec::is_empty) {
                    1.0
                } else {
                    left / (d * n as f64)
                };
                watched.push((0.0, most_variable(&factors, n.div_ceil(4).max(1))));
                constant(S6_LOAD * mean_left)
            }
            ScenarioId::S7 => {
                let period = d / 6.0;
                let stall = period / 4.0;
                let stalling = quarter(0);
                let m = stalling.len();
                for (j, &b) in stalling.iter().enumerate() {
                    let offset = period * j as f64 / m as f64;
                    let mut start = period + offset;
                    while start < d {
                        events.push(Event {
                            at: start,
                            backend: b,
                            change: Change::Slowdown(p.slowdown),
                        });
                        events.push(Event {
                            at: start + stall,
                            backend: b,
                            change: Change::Slowdown(1.0),
                        });
                        start += period;
                    }
                }
                watched.push((0.0, stalling));
                phases = vec![
                    Phase::new("before stalls", vec![(0.0, period)]),
                    Phase::new("stalls", vec![(period, d)]),
                ];
                constant(0.7)
            }
            ScenarioId::S8 => {
                watched.push((0.0, (0..n).filter(|&i| units[i] == 1).collect()));
                phases = vec![
                    Phase::new("low", vec![(0.0, d / 4.0), (3.0 * d / 4.0, d)]),
                    Phase::new("rise", vec![(d / 4.0, d / 2.0)]),
                    Phase::new("fall", vec![(d / 2.0, 3.0 * d / 4.0)]),
                ];
                let steps = (d / RAMP_STEP_S).ceil() as usize;
                (0..steps)
                    .map(|i| {
                        let from = i as f64 * RAMP_STEP_S;
                        let mid = (from + (from + RAMP_STEP_S).min(d)) / 2.0;
                        (from, day_load(mid / d) * capacity)
                    })
                    .collect()
            }
        };
        events.sort_by(|a, b| a.at.total_cmp(&b.at));
        Scenario {
            id,
            units,
            static_weights,
            rate,
            events,
            duration_s: d,
            unit_rate,
            watched,
            phases,
            reactions_measured: !matches!(id, ScenarioId::S6 | ScenarioId::S7 | ScenarioId::S8),
        }
    }

    /// The number of backends.
    pub fn len(&self) -> usize {
        self.units.len()
    }

    /// Whether there are no backends (never).
    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }

    /// The capacity of every backend at slowdown 1, requests per second.
    pub fn nominal_capacity(&self) -> f64 {
        self.units.iter().map(|&u| u as f64).sum::<f64>() * self.unit_rate
    }

    /// The offered rate at time `t`.
    pub fn rate_at(&self, t: f64) -> f64 {
        self.rate
            .iter()
            .rev()
            .find(|(from, _)| *from <= t)
            .map_or(0.0, |r| r.1)
    }

    /// The mean offered rate over the run.
    pub fn mean_rate(&self) -> f64 {
        let d = self.duration_s;
        let mut total = 0.0;
        for (i, &(from, r)) in self.rate.iter().enumerate() {
            let to = self.rate.get(i + 1).map_or(d, |x| x.0).min(d);
            total += r * (to - from).max(0.0);
        }
        total / d
    }

    /// Each backend's slowdown at time `t` (events at or before `t` applied).
    pub fn slowdowns_at(&self, t: f64) -> Vec<f64> {
        let mut s = vec![1.0; self.len()];
        for e in self.events.iter().filter(|e| e.at <= t) {
            if let Change::Slowdown(f) = e.change {
                s[e.backend] = f;
            }
        }
        s
    }

    /// Each backend's share of the capacity at time `t`.
    pub fn capacity_shares_at(&self, t: f64) -> Vec<f64> {
        let caps: Vec<f64> = self
            .units
            .iter()
            .zip(self.slowdowns_at(t))
            .map(|(&u, s)| u as f64 / s)
            .collect();
        let total: f64 = caps.iter().sum();
        caps.iter().map(|c| c / total).collect()
    }

    /// The degradations whose reaction is measured, as on the testbed: (time, the
    /// backends that became slower then, the end of the phase). A slowdown at time 0
    /// is left out: the policies have no history of the backends yet. None in S6 to
    /// S8.
    pub fn degradations(&self) -> Vec<(f64, Vec<usize>, f64)> {
        if !self.reactions_measured {
            return Vec::new();
        }
        let mut times: Vec<f64> = self.events.iter().map(|e| e.at).collect();
        times.dedup();
        let mut out = Vec::new();
        for (i, &t) in times.iter().enumerate() {
            if t <= 0.0 {
                continue;
            }
            let before = self.slowdowns_at(t - 1e-9);
            let after = self.slowdowns_at(t);
            let worse: Vec<usize> = (0..after.len()).filter(|&b| after[b] > before[b]).collect();
            if worse.is_empty() {
                continue;
            }
            let end = times.get(i + 1).copied().unwrap_or(self.duration_s);
            out.push((t, worse, end));
        }
        out
    }

    /// The backends the time series follow at time `t` (empty in S4).
    pub fn watched_at(&self, t: f64) -> &[usize] {
        self.watched
            .iter()
            .rev()
            .find(|(from, _)| *from <= t)
            .map_or(&[], |w| w.1.as_slice())
    }
}

/// S8: the offered load at the fraction `x` of the run, as a fraction of the nominal
/// capacity: a raised cosine from 30 % at the start to 110 % at the middle and back.
pub fn day_load(x: f64) -> f64 {
    0.7 - 0.4 * (2.0 * std::f64::consts::PI * x).cos()
}

/// The `count` backends whose capacity factor varies most (standard deviation over
/// the run), in index order.
fn most_variable(factors: &[Vec<f64>], count: usize) -> Vec<usize> {
    let spread = |row: &[f64]| {
        let n = row.len().max(1) as f64;
        let mean = row.iter().sum::<f64>() / n;
        (row.iter().map(|f| (f - mean).powi(2)).sum::<f64>() / n).sqrt()
    };
    let mut order: Vec<usize> = (0..factors.len()).collect();
    order.sort_by(|&a, &b| spread(&factors[b]).total_cmp(&spread(&factors[a])));
    let mut chosen: Vec<usize> = order.into_iter().take(count).collect();
    chosen.sort_unstable();
    chosen
}
