//! The testbed's scenarios and the runner of one scenario under one policy.
//!
//! Capacities are in units of [`UNIT_SLOTS`] slots of [`SERVICE_TIME`] each, that is
//! 80 requests per second per unit at slowdown 1. Times are fractions of the run's
//! duration `D` (30 s by default), so that `--duration-s` stretches or shrinks every
//! phase alike:
//!
//! | id | backends (units) | load | what happens |
//! |---|---|---|---|
//! | S1 | 1, 2, 4 | 90 % of capacity | nothing: heterogeneous capacity |
//! | S2 | 1, 1, 1, 1 | 70 % of capacity | backend0 4× slower from D/3 to 2D/3 |
//! | S3 | 8 × 1 | 70 % of capacity | two backends 4× slower, the pair changes every D/3 |
//! | S4 | 1, 1, 1, 1 | 50 %, spikes to 130 % | spikes of D/12 every D/3, from D/6 on |
//! | S5 | 1, 1, 1, 1 | 60 % of capacity | backend0 fails fast (503, idle) from D/3 to 2D/3 |
//! | S6 | one 1 per series (4 to 8) | 80 % of the mean capacity left | noisy neighbours: each backend's capacity replays a CPU series, one sample per 0.5 s |
//! | S7 | 1, 1, 1, 1 | 70 % of capacity | backend0 4× slower for T/4 every T = D/6, from T on |
//! | S8 | 1, 2, 4 | 30 % → 110 % → 30 % | a compressed day: a raised cosine over D, its peak at D/2 |
//!
//! The load is a fraction of the *nominal* capacity (all backends at slowdown 1): in
//! S2 the degraded capacity is 81 % of nominal, so 70 % load is 86 % of what is left;
//! in S3 it is 81 % too, and in S7 while backend0 stalls.
//!
//! S6 replays the CPU series given to [`Scenario::with_series`] (the bench's
//! `--series`, by default `testdata/nab/ec2_cpu_utilization_*.csv`): backend `i`
//! takes series `i mod k` from the fraction `{i·0.618…}` of it (its fractional part),
//! one 5-minute sample per [`REPLAY_STEP_S`], so a 30 s run replays 5 hours. A
//! neighbour's CPU of `c` % leaves the backend `1 − 0.75·c/100` of its capacity
//! ([`neighbour_capacity`], at least a quarter), applied as a slowdown of the
//! inverse. As in the simulator (`lb-sim`), whose S6 to S8 are these at scale.
//! Reaction times are measured only in S1 to S5: S6 changes capacity at every step,
//! and S7's stalls end before a 2 s window of flows could show one.
//!
//! [`run`] builds a fresh [`Topology`] for every run, attaches the pass-through
//! program on the load balancer's bridge port, starts the emulated backends, writes
//! the agent's configuration (the policy under test; capacity-proportional configured
//! weights for `static`, equal ones for the others), starts the real agent, waits for
//! it to warm up, then drives the load while applying the scenario's events on
//! schedule and sampling the agent every second (`lb backend list --json` and
//! `lb status --json`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use lb_userspace::core::policy::{PolicyKind, Variant};
use lb_userspace::core::series::Series;
use lb_userspace::dataplane::PassThrough;

use super::backend::{BackendCounts, BackendSpec, EmulatedBackend};
use super::loadgen::{LoadGen, LoadReport, LoadSpec, RateFn};
use crate::spread::{Agent, PORT};
use crate::topology::{Topology, VIP_V4, backend_v4};

/// How long one request holds a slot at slowdown 1.
pub const SERVICE_TIME: Duration = Duration::from_millis(50);
/// Slots of one capacity unit (80 requests per second).
pub const UNIT_SLOTS: usize = 4;
/// The lookup table size the "slots moved" figure is expressed in.
pub const TABLE_SIZE: f64 = 65537.0;
/// Every policy, `ai` with each predictor (the ablation: `ai-svr`, `ai-ewma`,
/// `ai-last`), in the order runs interleave them.
pub const POLICIES: [Variant; 7] = Variant::BENCHED;
/// Every scenario id, in order.
pub const SCENARIOS: [&str; 8] = ["S1", "S2", "S3", "S4", "S5", "S6", "S7", "S8"];
/// S6: seconds of the run per sample of a series (a 5-minute sample of NAB's).
pub const REPLAY_STEP_S: f64 = 0.5;
/// S6: how much of a backend's capacity its neighbour's CPU takes, per unit of it.
pub const NEIGHBOUR_SHARE: f64 = 0.75;
/// S6: the least capacity a neighbour leaves, as a fraction.
pub const MIN_CAPACITY: f64 = 0.25;
/// The fractional part of the golden ratio: multiples of it spread over [0, 1).
const GOLDEN: f64 = 0.618_033_988_749_895;

/// The capacity a neighbour using `cpu_percent` of the shared host leaves, as a
/// fraction of the backend's own: `1 − 0.75·c/100`, between [`MIN_CAPACITY`] and 1.
pub fn neighbour_capacity(cpu_percent: f64) -> f64 {
    (1.0 - NEIGHBOUR_SHARE * cpu_percent.clamp(0.0, 100.0) / 100.0).max(MIN_CAPACITY)
}

/// The values of a series S6 replays over a run of `duration`: one per
/// [`REPLAY_STEP_S`], the first at 0.
pub fn series_needed(duration: Duration) -> usize {
    (duration.as_secs_f64() / REPLAY_STEP_S).ceil() as usize + 1
}

/// S8: the offered load at the fraction `x` of the run, as a fraction of the nominal
/// capacity: a raised cosine from 30 % at the start to 110 % at the middle and back.
pub fn day_load(x: f64) -> f64 {
    0.7 - 0.4 * (2.0 * std::f64::consts::PI * x).cos()
}

/// A change applied to one backend during a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Change {
    /// Service times multiplied by this factor from now on (1: back to normal).
    Slowdown(f64),
    /// Fail-fast mode on or off.
    FailFast(bool),
}

/// A change at a time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Event {
    /// Seconds since the start of the load.
    pub at: f64,
    /// Backend index.
    pub backend: usize,
    /// What changes.
    pub change: Change,
}

/// One scenario, for one run duration.
#[derive(Clone)]
pub struct Scenario {
    /// `S1` to `S8`.
    pub id: &'static str,
    /// One line saying what it tests.
    pub title: &'static str,
    /// The backends, index i being `backend{i}` at 198.18.0.(11 + i).
    pub backends: Vec<BackendSpec>,
    /// The weights `static` is configured with (capacity-proportional).
    pub static_weights: Vec<u32>,
    /// Requests per second over time.
    pub rate: RateFn,
    /// A description of the load, for the report.
    pub load: String,
    /// How long arrivals are scheduled for.
    pub duration: Duration,
    /// The changes, sorted by time.
    pub events: Vec<Event>,
    /// S6: the names of the series replayed; empty for the others.
    pub series: Vec<String>,
    /// Whether the reaction to each slowdown is measured ([`Scenario::degradations`]):
    /// in S1 to S5.
    reactions_measured: bool,
}

impl Scenario {
    /// The scenario `id` (case-insensitive) stretched to `duration`; `None` for an
    /// unknown id and for S6, which needs its series ([`Scenario::with_series`]).
    pub fn get(id: &str, duration: Duration) -> Option<Scenario> {
        Scenario::with_series(id, duration, &[])
    }

    /// The scenario `id` (case-insensitive) stretched to `duration`, S6 replaying
    /// `series` (each of at least [`series_needed`] values; a shorter one is read
    /// around from its start again); `None` for an unknown id and for S6 without
    /// series.
    pub fn with_series(id: &str, duration: Duration, series: &[Series]) -> Option<Scenario> {
        let d = duration.as_secs_f64();
        let units = |u: &[usize]| -> Vec<BackendSpec> {
            u.iter()
                .enumerate()
                .map(|(i, &u)| {
                    BackendSpec::new(format!("backend{i}"), u * UNIT_SLOTS, SERVICE_TIME)
                })
                .collect()
        };
        let capacity = |b: &[BackendSpec]| b.iter().map(BackendSpec::capacity).sum::<f64>();
        let s = match id.to_ascii_uppercase().as_str() {
            "S1" => {
                let backends = units(&[1, 2, 4]);
                let rate = 0.9 * capacity(&backends);
                Scenario {
                    id: "S1",
                    title: "heterogeneous capacity 1x, 2x, 4x at 90 % load",
                    static_weights: vec![1, 2, 4],
                    rate: super::loadgen::constant(rate),
                    load: format!("{rate:.0} req/s (90 % of {:.0})", capacity(&backends)),
                    backends,
                    duration,
                    series: Vec::new(),
                    reactions_measured: true,
                    events: Vec::new(),
                }
            }
            "S2" => {
                let backends = units(&[1, 1, 1, 1]);
                let rate = 0.7 * capacity(&backends);
                Scenario {
                    id: "S2",
                    title: "one of 4 equal backends 4x slower from D/3, recovers at 2D/3",
                    static_weights: vec![1; 4],
                    rate: super::loadgen::constant(rate),
                    load: format!("{rate:.0} req/s (70 % of {:.0})", capacity(&backends)),
                    backends,
                    duration,
                    series: Vec::new(),
                    reactions_measured: true,
                    events: vec![
                        Event {
                            at: d / 3.0,
                            backend: 0,
                            change: Change::Slowdown(4.0),
                        },
                        Event {
                            at: 2.0 * d / 3.0,
                            backend: 0,
                            change: Change::Slowdown(1.0),
                        },
                    ],
                }
            }
            "S3" => {
                let backends = units(&[1; 8]);
                let rate = 0.7 * capacity(&backends);
                let mut events = Vec::new();
                for (phase, pair) in [[0, 1], [2, 3], [4, 5]].iter().enumerate() {
                    let at = phase as f64 * d / 3.0;
                    if phase > 0 {
                        for b in [pair[0] - 2, pair[1] - 2] {
                            events.push(Event {
                                at,
                                backend: b,
                                change: Change::Slowdown(1.0),
                            });
                        }
                    }
                    for &b in pair {
                        events.push(Event {
                            at,
                            backend: b,
                            change: Change::Slowdown(4.0),
                        });
                    }
                }
                Scenario {
                    id: "S3",
                    title: "8 backends, 2 of them 4x slower, the slow pair changes every D/3",
                    static_weights: vec![1; 8],
                    rate: super::loadgen::constant(rate),
                    load: format!("{rate:.0} req/s (70 % of {:.0})", capacity(&backends)),
                    backends,
                    duration,
                    series: Vec::new(),
                    reactions_measured: true,
                    events,
                }
            }
            "S4" => {
                let backends = units(&[1, 1, 1, 1]);
                let cap = capacity(&backends);
                let (base, spike) = (0.5 * cap, 1.3 * cap);
                let period = d / 3.0;
                let (first, len) = (d / 6.0, d / 12.0);
                let rate: RateFn = std::sync::Arc::new(move |t: f64| {
                    let k = ((t - first) / period).floor();
                    let start = first + k * period;
                    if t >= first && t - start < len {
                        spike
                    } else {
                        base
                    }
                });
                Scenario {
                    id: "S4",
                    title: "4 equal backends, 50 % load with bursts to 130 %",
                    static_weights: vec![1; 4],
                    rate,
                    load: format!(
                        "{base:.0} req/s, {spike:.0} req/s for D/12 every D/3 from D/6 (of {cap:.0})"
                    ),
                    backends,
                    duration,
                    series: Vec::new(),
                    reactions_measured: true,
                    events: Vec::new(),
                }
            }
            "S5" => {
                let backends = units(&[1, 1, 1, 1]);
                let rate = 0.6 * capacity(&backends);
                Scenario {
                    id: "S5",
                    title: "backend0 fails fast (503) while looking idle, D/3 to 2D/3",
                    static_weights: vec![1; 4],
                    rate: super::loadgen::constant(rate),
                    load: format!("{rate:.0} req/s (60 % of {:.0})", capacity(&backends)),
                    backends,
                    duration,
                    series: Vec::new(),
                    reactions_measured: true,
                    events: vec![
                        Event {
                            at: d / 3.0,
                            backend: 0,
                            change: Change::FailFast(true),
                        },
                        Event {
                            at: 2.0 * d / 3.0,
                            backend: 0,
                            change: Change::FailFast(false),
                        },
                    ],
                }
            }
            "S6" => {
                if series.is_empty() {
                    return None;
                }
                let n = series.len().clamp(4, 8);
                let backends = units(&vec![1; n]);
                let len = series_needed(duration);
                let steps = (d / REPLAY_STEP_S).ceil() as usize;
                let mut events = Vec::new();
                let mut left = 0.0;
                for b in 0..n {
                    let start = (b as f64 * GOLDEN).fract();
                    let mut slowdown = 1.0;
                    let window = series[b % series.len()].window(start, len);
                    for (i, &cpu) in window.iter().take(steps).enumerate() {
                        let f = neighbour_capacity(cpu);
                        let at = i as f64 * REPLAY_STEP_S;
                        left += f * ((at + REPLAY_STEP_S).min(d) - at);
                        if 1.0 / f != slowdown {
                            slowdown = 1.0 / f;
                            events.push(Event {
                                at,
                                backend: b,
                                change: Change::Slowdown(slowdown),
                            });
                        }
                    }
                }
                events.sort_by(|a, b| a.at.total_cmp(&b.at));
                let cap = capacity(&backends);
                let mean_left = left / (d * n as f64);
                let rate = 0.8 * mean_left * cap;
                Scenario {
                    id: "S6",
                    title: "noisy neighbours: each backend's capacity replays a real CPU series",
                    static_weights: vec![1; n],
                    rate: super::loadgen::constant(rate),
                    load: format!(
                        "{rate:.0} req/s (80 % of the {:.0} left on average of {cap:.0})",
                        mean_left * cap
                    ),
                    backends,
                    duration,
                    events,
                    series: series.iter().map(|s| s.name.clone()).collect(),
                    reactions_measured: false,
                }
            }
            "S7" => {
                let backends = units(&[1, 1, 1, 1]);
                let rate = 0.7 * capacity(&backends);
                let (period, stall) = (d / 6.0, d / 24.0);
                let mut events = Vec::new();
                let mut start = period;
                while start < d {
                    events.push(Event {
                        at: start,
                        backend: 0,
                        change: Change::Slowdown(4.0),
                    });
                    events.push(Event {
                        at: start + stall,
                        backend: 0,
                        change: Change::Slowdown(1.0),
                    });
                    start += period;
                }
                Scenario {
                    id: "S7",
                    title: "periodic stalls: backend0 4x slower for D/24 every D/6, from D/6 on",
                    static_weights: vec![1; 4],
                    rate: super::loadgen::constant(rate),
                    load: format!("{rate:.0} req/s (70 % of {:.0})", capacity(&backends)),
                    backends,
                    duration,
                    events,
                    series: Vec::new(),
                    reactions_measured: false,
                }
            }
            "S8" => {
                let backends = units(&[1, 2, 4]);
                let cap = capacity(&backends);
                let rate: RateFn = std::sync::Arc::new(move |t: f64| day_load(t / d) * cap);
                Scenario {
                    id: "S8",
                    title: "a compressed day: load 30 % -> 110 % -> 30 % on capacities 1x, 2x, 4x",
                    static_weights: vec![1, 2, 4],
                    rate,
                    load: format!(
                        "{:.0} -> {:.0} -> {:.0} req/s, a raised cosine peaking at D/2 (of {cap:.0})",
                        0.3 * cap,
                        1.1 * cap,
                        0.3 * cap
                    ),
                    backends,
                    duration,
                    events: Vec::new(),
                    series: Vec::new(),
                    reactions_measured: false,
                }
            }
            _ => return None,
        };
        Some(s)
    }

    /// The slowdown of each backend at time `t` (events at or before `t` applied).
    pub fn slowdowns_at(&self, t: f64) -> Vec<f64> {
        let mut s = vec![1.0; self.backends.len()];
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
            .backends
            .iter()
            .zip(self.slowdowns_at(t))
            .map(|(b, s)| b.capacity() / s)
            .collect();
        let total: f64 = caps.iter().sum();
        caps.iter().map(|c| c / total).collect()
    }

    /// The degradations whose reaction is measured: (time, backends that became
    /// slower then, end of the phase). A slowdown at time 0 is left out, since the
    /// agent has no history of the backend yet then. None in S6 to S8.
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
            let end = times
                .get(i + 1)
                .copied()
                .unwrap_or(self.duration.as_secs_f64());
            out.push((t, worse, end));
        }
        out
    }

    /// The nominal capacity of all backends, requests per second.
    pub fn capacity(&self) -> f64 {
        self.backends.iter().map(BackendSpec::capacity).sum()
    }
}

/// How to run a scenario.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The policy under test (for `ai`, with its predictor).
    pub policy: Variant,
    /// Seeds the arrival schedule (use the same seed for every policy of a repeat).
    pub seed: u64,
    /// Write the `[vip.health]` and `[vip.metrics]` sections into the agent's
    /// configuration (the agent refuses them until it knows them).
    pub health_metrics: bool,
    /// Bound on each request.
    pub request_timeout: Duration,
    /// Time between starting the agent and starting the load.
    pub warmup: Duration,
    /// The agent's control interval, milliseconds.
    pub interval_ms: u64,
    /// Print each sample of the agent as it is taken (the demo's live view).
    pub live: bool,
}

impl RunOptions {
    /// Defaults for `policy`: seed 1, health and metrics sections on, 2 s timeout,
    /// 1 s warm-up, 500 ms control interval.
    pub fn new(policy: Variant) -> RunOptions {
        RunOptions {
            policy,
            seed: 1,
            health_metrics: true,
            request_timeout: Duration::from_secs(2),
            warmup: Duration::from_secs(1),
            interval_ms: 500,
            live: false,
        }
    }
}

/// What the agent said about one backend at a sample.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BackendSample {
    /// The weight in force, in configured units.
    pub weight: f64,
    /// New flows so far.
    pub new_flows: u64,
    /// Packets so far.
    pub packets: u64,
    /// Health by the agent's probes, if it says.
    pub healthy: Option<bool>,
    /// The latency the agent sees there (scraped, else probed), ms, if it says.
    pub latency_ms: Option<f64>,
    /// That latency one interval ahead as the agent predicts it, ms, if it says.
    pub predicted_ms: Option<f64>,
}

/// One sample of the agent, once a second.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    /// Seconds since the start of the load.
    pub t: f64,
    /// By backend index; a backend missing from the agent's list has defaults.
    pub backends: Vec<BackendSample>,
    /// The datapath's non-SYN connection-table misses so far.
    pub conn_miss_non_syn: u64,
}

/// Everything recorded in one run.
pub struct RunData {
    /// The scenario id.
    pub scenario: &'static str,
    /// The policy.
    pub policy: Variant,
    /// The arrival seed.
    pub seed: u64,
    /// The backends as configured.
    pub specs: Vec<BackendSpec>,
    /// Every request.
    pub load: LoadReport,
    /// The agent, once a second from the start of the load.
    pub samples: Vec<Sample>,
    /// Slot-seconds each backend spent serving during the load's schedule.
    pub busy_slot_s: Vec<f64>,
    /// The length of that window, seconds.
    pub window_s: f64,
    /// Each backend's counters at the end.
    pub counts: Vec<BackendCounts>,
    /// The agent's output.
    pub agent_log: Vec<String>,
}

/// The agent configuration of a run.
pub fn agent_config(scenario: &Scenario, topo: &Topology, opts: &RunOptions) -> String {
    let mut text = format!(
        "[control]\ninterval_ms = {}\npredictor = \"{}\"\n\n[[vip]]\naddress = \"{VIP_V4}\"\n\
         port = {PORT}\nprotocol = \"tcp\"\npolicy = \"{}\"\n",
        opts.interval_ms, opts.policy.predictor, opts.policy.kind
    );
    if opts.health_metrics {
        text += &format!(
            "\n[vip.health]\nport = {}\nhttp_path = \"/\"\ninterval_ms = 500\ntimeout_ms = 300\n\
             rise = 2\nfall = 2\n\n[vip.metrics]\nport = {}\npath = \"/metrics\"\n\
             in_flight = \"app_requests_in_flight\"\nlatency = \"app_request_duration_seconds\"\n\
             requests = \"app_requests_total\"\nerrors = \"app_errors_total\"\ntimeout_ms = 300\n",
            super::backend::PROBE_PORT,
            super::backend::METRICS_PORT
        );
    }
    for (i, host) in topo.backends().iter().enumerate() {
        let weight = match opts.policy.kind {
            PolicyKind::Static => scenario.static_weights[i],
            _ => 1,
        };
        text += &format!(
            "\n[[vip.backend]]\naddress = \"{}\"\nmac = \"{}\"\nweight = {weight}\n",
            host.ipv4(),
            host.mac()
        );
    }
    text
}

/// Reads `lb backend list --json` and `lb status --json` into a sample.
fn sample(agent: &Agent, n: usize, t: f64) -> Result<Sample> {
    let list: serde_json::Value = serde_json::from_str(&agent.ctl(&["backend", "list", "--json"])?)
        .context("backend list is not JSON")?;
    let status: serde_json::Value =
        serde_json::from_str(&agent.ctl(&["status", "--json"])?).context("status is not JSON")?;
    let mut backends = vec![BackendSample::default(); n];
    for entry in list.as_array().map(Vec::as_slice).unwrap_or_default() {
        let Some(address) = entry["backend"].as_str() else {
            continue;
        };
        let Some(i) = (0..n).find(|&i| backend_v4(i).to_string() == address) else {
            continue;
        };
        backends[i] = BackendSample {
            weight: entry["weight"].as_f64().unwrap_or(0.0),
            new_flows: entry["new_flows"].as_u64().unwrap_or(0),
            packets: entry["packets"].as_u64().unwrap_or(0),
            healthy: entry["healthy"].as_bool(),
            latency_ms: entry["latency_ms"].as_f64(),
            predicted_ms: entry["predicted_ms"].as_f64(),
        };
    }
    Ok(Sample {
        t,
        backends,
        conn_miss_non_syn: status["datapath"]["conn_miss_non_syn"]
            .as_u64()
            .unwrap_or(0),
    })
}

fn apply(backends: &[EmulatedBackend], event: &Event) {
    match event.change {
        Change::Slowdown(f) => backends[event.backend].set_slowdown(f),
        Change::FailFast(on) => backends[event.backend].set_fail_fast(on),
    }
}

/// One sample as the demo's live view shows it: a table of the backends (weight as
/// a share, the agent's latency and prediction, health), redrawn in place on a
/// terminal, printed one after another otherwise.
fn print_live(scenario: &Scenario, s: &Sample, redraw: bool) {
    use std::io::{IsTerminal, Write};
    let total: f64 = s.backends.iter().map(|b| b.weight).sum();
    let slow = scenario.slowdowns_at(s.t);
    let mut out = format!(
        "t = {:>3.0} s   {:<10} {:>7} {:>11} {:>13} {:>8}  {}\n",
        s.t, "backend", "share", "latency ms", "predicted ms", "health", "(emulated)"
    );
    for (i, b) in s.backends.iter().enumerate() {
        let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        let share = if total > 0.0 {
            b.weight / total * 100.0
        } else {
            0.0
        };
        out += &format!(
            "              {:<10} {:>6.1}% {:>11} {:>13} {:>8}  {}\n",
            scenario.backends[i].name,
            share,
            ms(b.latency_ms),
            ms(b.predicted_ms),
            match b.healthy {
                Some(true) => "ok",
                Some(false) => "DOWN",
                None => "-",
            },
            match slow.get(i) {
                Some(&x) if x > 1.0 => format!("{x:.0}x slower"),
                _ => String::new(),
            }
        );
    }
    let mut stdout = std::io::stdout().lock();
    if redraw && stdout.is_terminal() {
        // Back to the top of the previous table, which has as many lines.
        let _ = write!(stdout, "\x1b[{}A\x1b[J", s.backends.len() + 1);
    }
    let _ = write!(stdout, "{out}");
    let _ = stdout.flush();
}

/// Runs `scenario` once under `opts.policy`: builds everything, drives the load,
/// samples the agent, tears everything down (also on error) and returns the record.
pub fn run(scenario: &Scenario, opts: &RunOptions) -> Result<RunData> {
    let n = scenario.backends.len();
    let topo = Topology::build(n).context("building the test network")?;
    let dir = std::env::temp_dir().join(format!("{}-lb", topo.prefix()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(scenario, opts, &topo, dir.join("lb.toml"));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(
    scenario: &Scenario,
    opts: &RunOptions,
    topo: &Topology,
    config: PathBuf,
) -> Result<RunData> {
    let n = scenario.backends.len();
    // One socket per request: make sure the client never runs out of ports.
    topo.client()
        .ns()
        .sysctl(&[("net/ipv4/ip_local_port_range", "10000 65000")])?;
    std::fs::write(&config, agent_config(scenario, topo, opts))?;

    let port = topo.lb_bridge_port().to_owned();
    let _pass = topo
        .switch()
        .run_in(move || PassThrough::attach(&port))?
        .context("attaching the pass-through program to the bridge port")?;
    let vip = topo.vip(PORT, false);
    let backends = topo
        .backends()
        .iter()
        .zip(&scenario.backends)
        .map(|(host, spec)| {
            EmulatedBackend::start(host.ns(), spec.clone(), vip, IpAddr::V4(host.ipv4()))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut agent = Agent::start(topo, &config, &["--detach-on-exit"]).with_context(|| {
        if opts.health_metrics {
            "starting the agent (if it refuses [vip.health] or [vip.metrics] as unknown \
             fields, run without them: --no-health-metrics)"
        } else {
            "starting the agent"
        }
    })?;
    std::thread::sleep(opts.warmup);

    let mut events = scenario.events.clone();
    events.sort_by(|a, b| a.at.total_cmp(&b.at));
    let mut next_event = 0;
    while next_event < events.len() && events[next_event].at <= 0.0 {
        apply(&backends, &events[next_event]);
        next_event += 1;
    }
    let duration = scenario.duration.as_secs_f64();
    let start_busy: Vec<f64> = backends.iter().map(|b| b.counts().busy_slot_s).collect();
    let mut samples = vec![sample(&agent, n, 0.0)?];
    let load = LoadGen::start(
        topo.client().ns(),
        LoadSpec {
            target: SocketAddr::new(IpAddr::V4(VIP_V4), PORT),
            rate: scenario.rate.clone(),
            duration: scenario.duration,
            seed: opts.seed,
            timeout: opts.request_timeout,
        },
    )?;
    let origin = load.origin();
    let elapsed = || {
        Instant::now()
            .saturating_duration_since(origin)
            .as_secs_f64()
    };
    let mut next_sample = 1.0;
    let mut end_busy = None;
    let mut sample_errors = 0;
    loop {
        let now = elapsed();
        while next_event < events.len() && events[next_event].at <= now {
            apply(&backends, &events[next_event]);
            next_event += 1;
        }
        if end_busy.is_none() && now >= duration {
            end_busy = Some(
                backends
                    .iter()
                    .map(|b| b.counts().busy_slot_s)
                    .collect::<Vec<_>>(),
            );
        }
        if now >= next_sample {
            match sample(&agent, n, now) {
                Ok(s) => {
                    if opts.live {
                        print_live(scenario, &s, samples.len() > 1);
                    }
                    samples.push(s);
                }
                Err(e) => {
                    sample_errors += 1;
                    if sample_errors > 5 {
                        return Err(e.context("the agent stopped answering"));
                    }
                }
            }
            next_sample += 1.0;
        }
        if now >= duration && next_sample > duration {
            break;
        }
        let next_event_at = events.get(next_event).map_or(f64::INFINITY, |e| e.at);
        let wake = next_sample.min(next_event_at).min(duration);
        let wait = if wake > now { wake - now } else { 0.01 };
        std::thread::sleep(Duration::from_secs_f64(wait.min(0.25)));
    }
    let load = load.join()?;
    let end_busy =
        end_busy.unwrap_or_else(|| backends.iter().map(|b| b.counts().busy_slot_s).collect());
    let counts: Vec<BackendCounts> = backends.iter().map(EmulatedBackend::counts).collect();
    let mut agent_log = agent.drain_log();
    agent_log.extend(agent.stop()?);
    drop(backends);
    ensure!(
        load.total() > 0,
        "no request was scheduled (rate {:.1} req/s)",
        (scenario.rate)(0.0)
    );
    if samples.len() < 2 {
        bail!("too few samples of the agent");
    }
    Ok(RunData {
        scenario: scenario.id,
        policy: opts.policy,
        seed: opts.seed,
        specs: scenario.backends.clone(),
        load,
        samples,
        busy_slot_s: end_busy
            .iter()
            .zip(&start_busy)
            .map(|(e, s)| e - s)
            .collect(),
        window_s: duration,
        counts,
        agent_log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default series of the bench, read as it reads them.
    fn nab_cpu() -> Vec<Series> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/nab");
        ["24ae8d", "53ea38", "5f5533", "77c1ca", "825cc2"]
            .iter()
            .map(|id| {
                let name = format!("ec2_cpu_utilization_{id}.csv");
                let text = std::fs::read_to_string(dir.join(&name)).unwrap();
                Series::parse(&name, &text, series_needed(Duration::from_secs(30))).unwrap()
            })
            .collect()
    }

    #[test]
    fn every_scenario_id_builds() {
        let d = Duration::from_secs(30);
        let series = nab_cpu();
        for id in SCENARIOS {
            let s = Scenario::with_series(id, d, &series).unwrap();
            assert_eq!(s.id, id);
            assert!((s.rate)(d.as_secs_f64() / 2.0) > 0.0, "{id}");
        }
        // S6 needs its series.
        assert!(Scenario::get("S6", d).is_none());
        assert!(Scenario::get("S9", d).is_none());
    }

    #[test]
    fn s6_replays_each_backend_a_series_within_bounds() {
        let d = Duration::from_secs(30);
        let series = nab_cpu();
        let s = Scenario::with_series("S6", d, &series).unwrap();
        assert_eq!(s.backends.len(), 5);
        assert_eq!(s.series.len(), 5);
        assert!(s.series[0].starts_with("ec2_cpu_utilization_"));
        let mut lo = [f64::INFINITY; 5];
        let mut hi = [0.0f64; 5];
        for i in 0..60 {
            let t = i as f64 * REPLAY_STEP_S + 0.25;
            for (b, x) in s.slowdowns_at(t).into_iter().enumerate() {
                // Between a quarter of the capacity (4x) and all of it.
                assert!((1.0..=4.0).contains(&x), "backend {b} at {t}: {x}");
                lo[b] = lo[b].min(1.0 / x);
                hi[b] = hi[b].max(1.0 / x);
            }
        }
        // At least one backend loses more than a third of its capacity for a while.
        assert!((0..5).any(|b| hi[b] - lo[b] > 0.33), "{lo:?} {hi:?}");
        // The load is 80 % of the capacity left on average.
        let left: f64 = (0..60)
            .map(|i| {
                let caps = s.slowdowns_at(i as f64 * REPLAY_STEP_S + 0.25);
                caps.iter().map(|x| 80.0 / x).sum::<f64>()
            })
            .sum::<f64>()
            / 60.0;
        assert!(((s.rate)(7.0) / (0.8 * left) - 1.0).abs() < 1e-9);
        assert!(s.degradations().is_empty());
        // A single series is shared by four backends at different stretches.
        let one = Scenario::with_series("S6", d, &series[3..4]).unwrap();
        assert_eq!(one.backends.len(), 4);
        let changes = |b: usize| -> Vec<f64> {
            one.events
                .iter()
                .filter(|e| e.backend == b)
                .map(|e| e.at)
                .collect()
        };
        assert_ne!(changes(0), changes(1));
    }

    #[test]
    fn s7_stalls_backend0_every_sixth_of_the_run() {
        let s = Scenario::get("S7", Duration::from_secs(30)).unwrap();
        for k in 1..6 {
            let start = 5.0 * k as f64;
            assert_eq!(s.slowdowns_at(start - 0.01), vec![1.0; 4], "stall {k}");
            assert_eq!(s.slowdowns_at(start + 0.01)[0], 4.0, "stall {k}");
            assert_eq!(s.slowdowns_at(start + 1.24)[0], 4.0, "stall {k}");
            assert_eq!(s.slowdowns_at(start + 1.26)[0], 1.0, "stall {k}");
        }
        assert_eq!(s.events.len(), 10);
        assert!(s.events.iter().all(|e| e.backend == 0));
        assert!(s.degradations().is_empty());
    }

    #[test]
    fn s8_load_peaks_above_capacity_at_the_middle() {
        let s = Scenario::get("S8", Duration::from_secs(30)).unwrap();
        let cap = s.capacity();
        assert_eq!(cap, 560.0);
        assert!(((s.rate)(0.0) / cap - 0.3).abs() < 1e-9);
        assert!(((s.rate)(15.0) / cap - 1.1).abs() < 1e-9);
        assert!((s.rate)(10.0) < (s.rate)(15.0) && (s.rate)(20.0) < (s.rate)(15.0));
        assert!(((s.rate)(30.0) / cap - 0.3).abs() < 1e-9);
        assert_eq!(s.static_weights, vec![1, 2, 4]);
    }
}
