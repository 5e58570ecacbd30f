//! A discrete-event simulation of one VIP at a scale one machine cannot host (120
//! backends and 100,000 to 400,000 requests per second by default), driven by the
//! agent's own pure core: [`lb_userspace::core::control::VipControl::step`] sets the
//! weights and builds the lookup table (through the policy and
//! [`lb_userspace::core::maglev::build`]), each new flow is hashed into it with
//! [`lb_common::hash::flow_hash`], and under `ai` every backend's
//! [`lb_userspace::core::model::BackendModel`] predicts its latency one interval
//! ahead. It is a crate of its own, apart from the agent's library, and uses only
//! that core (and the configuration's `[control]` section). Nothing of
//! these is copied here; what is written here is what the agent gets from the
//! outside world (the backends, the scrapes, the probes) and the bookkeeping the
//! agent does around those calls. The `sim` bench runs every scenario under every
//! policy; [`run`] runs one, for tests and experiments.
//!
//! # The model of the world
//! - **Arrivals**: a Poisson process (piecewise-constant rate, seeded SplitMix64).
//!   Every request is a new TCP flow from a random client address and port to the
//!   VIP, so it is placed by the table alone: `table[flow_hash % size]`.
//! - **Backends**: a backend of `u` capacity units has `u × slots_per_unit` servers
//!   (4 per unit as on the testbed) and a FIFO queue; a request's service time is
//!   exponential (or deterministic with jitter) of mean `service_s × slowdown`, with
//!   the slowdown in force when it arrives, as the testbed's emulated backends do.
//!   The default 2.5 ms makes a unit 1,600 requests per second: the testbed's
//!   queueing (4, 8 or 16 servers per backend at the same utilisations) at 20× the
//!   speed. A request's completion time is known on arrival (it takes the server
//!   that frees first), so completions need no events, and each request is added at
//!   once to the per-interval figures of its backend: completions, their latency,
//!   busy server time, arrivals, and the in-flight gauge at each tick it spans.
//! - **Capacity over time** (S6, S7): the scenario's events set a backend's slowdown
//!   (S6 every [`REPLAY_STEP_S`] from a replayed CPU series, S7 at each stall's start
//!   and end), so a varying capacity costs one event per change and nothing per
//!   request.
//! - **Clients** give up after `request_timeout_s` (2 s, as the testbed's load
//!   generator): such a request is an error, and the backend still serves it.
//! - **Failing fast** (S5): a request arriving at such a backend is answered at once
//!   with an error and takes no server, so the backend reports a tiny latency, no
//!   load and no requests in flight, while its responses still count as requests.
//! - **Health**: every `probe_interval_s` (500 ms) each backend is probed, with
//!   `rise`/`fall` of 2/2 (the testbed's configuration) as `collect::Prober` counts
//!   them. The health endpoint answers outside the servers, as on the testbed, so
//!   every probe succeeds, a backend failing fast included (a shallow check), unless
//!   `deep_health` makes a failing backend fail its probes. A change of health reruns
//!   the policy at once without a new observation, as the agent's
//!   `control_tick(false)` does.
//!
//! # The agent's side, every `control.interval_ms` (500 ms) of simulated time
//! 1. Each backend is scraped: mean latency of the requests completed in the interval
//!    (errors included, as the application's histogram counts them), responses per
//!    second, utilisation (busy server time / (servers × interval)), in-flight now,
//!    and the new flows per second the table sent it. These are exact; the agent's
//!    scrapes and rates are not quite.
//! 2. Under `ai`, every backend's model is ticked as `Signals::observe` ticks it
//!    (target: that latency, else the probe's; extra metrics: CPU, memory 0, disk 0,
//!    in flight, new flows per second) with the agent's model configuration, and
//!    every 10 observations each model is refitted and installed. The agent fits in
//!    the background and installs before the next tick; here the fits run between
//!    two ticks, in `fit_threads` threads, with the same effect.
//! 3. The policy inputs are built as in `control_tick`: configured weight
//!    (capacity-proportional for `static`, 1 for the others, as on the testbed), the
//!    prober's health, no hold, qps from the scrape, utilisation, the error rate
//!    (5xx responses per second, as the agent's scrape of `errors` gives it), the
//!    latency, the forecast and its predictor. The
//!    parameters are the agent's (`VipControl::new`): `unit` = 10,000 / Σ configured,
//!    quantum = scale / 1000, and the `[control]` defaults (2 %/s move budget, 1 %
//!    floor, smoothing 0.5, 5 % hysteresis) with the testbed's 500 ms interval.
//! 4. If a weight changed, the table is rebuilt from all the weights with the
//!    backends' address bytes as keys, as `Desired::plan` does; the slots whose
//!    backend changed are counted.
//!
//! # Figures (the testbed's definitions, `tests/src/testbed/report.rs`)
//! Latency quantiles of the successful requests (queue wait + service); error rate
//! (fail-fast answers and timeouts over all requests); per-backend utilisation over
//! the run, its maximum and mean; reaction time (S2, S3): for each slowdown after the
//! start, the time until the slowed backends' share of new flows over a 2 s window
//! that starts after the slowdown is at most 1.1 × their new share of capacity (the
//! run's figure is the worst; `None` if one is not reached before the next change).
//! Unlike the testbed, the slowed backends are taken together: with 30 of them, each
//! holding a few hundred slots, the table's own rounding (up to 262 slots per backend
//! at 65537, see [`lb_userspace::core::maglev::accuracy_band`]) would decide a per-backend test.
//! The same from the table instead of the flows is `reaction_table_s`. Slots moved
//! are counted between consecutive tables (the testbed estimates them from weights),
//! over the run and in each of the scenario's phases ([`Scenario::phases`]: S2's
//! steady first third, its slowdown and its recovery; S4's bursts and the calm between
//! them), where an update belongs to the phase its time falls in.
//!
//! Besides the testbed's figures, `p99_all_s` is the p99 of all requests with the
//! failed ones counted as the slowest: the testbed's p99 is of successful requests
//! only, which flatters a policy whose slowest requests time out.
//!
//! # Limits of the model
//! Scrapes are exact and taken at the tick (the agent's are asynchronous and
//! rate-estimated); fits are installed before the next tick (the agent's usually
//! are); every request is a new flow (no established connections stay on a backend
//! across a table change); a client's timeout does not free the backend's server;
//! there is no network time. The first refits of a run find too few samples in the
//! window and are refused, as in the agent; they are counted apart.
//!
//! # Cost
//! No allocation per request, and two random draws, one hash and one heap operation
//! on the backend's few servers each. The bench prints the simulated requests per
//! second of every run.

mod engine;
mod histogram;
mod rng;
mod scenario;
#[cfg(test)]
mod tests;

pub use histogram::Histogram;
pub use rng::Rng;
pub use scenario::{
    Change, Event, MIN_CAPACITY, Phase, REPLAY_STEP_S, Scenario, ScenarioId, day_load,
    neighbour_capacity, replayed_capacity, series_needed,
};

use std::sync::LazyLock;

use lb_userspace::core::series::Series;

use lb_userspace::config::Control;
use lb_userspace::core::policy::{PolicyKind, Variant};

/// The distribution of service times.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum ServiceDist {
    /// Exponential of the mean.
    Exponential,
    /// The mean times `1 ± jitter`, uniform.
    Deterministic {
        /// Half-width of the uniform spread, as a fraction of the mean (0..1).
        jitter: f64,
    },
}

/// Everything a run depends on besides the scenario, the policy and the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct SimParams {
    /// Seconds of load (`D`).
    pub duration_s: f64,
    /// Backends (at least 4; S1 and S8 split them in thirds, the others in quarters).
    pub backends: usize,
    /// Servers per capacity unit.
    pub slots_per_unit: usize,
    /// Mean service time at slowdown 1, seconds.
    pub service_s: f64,
    pub service: ServiceDist,
    /// The slowdown of a degraded backend (S2, S3).
    pub slowdown: f64,
    /// S3: seconds between two moves of the hot spot.
    pub hotspot_period_s: f64,
    /// A client gives up on a request after this long (an error).
    pub request_timeout_s: f64,
    /// S6: the CPU series the backends' capacity replays (see [`Scenario`]).
    pub series: Vec<Series>,
    /// How long a backend failing fast takes to answer.
    pub fail_fast_s: f64,
    /// A probe's response time, which stands in for the application's latency when no
    /// request completed in an interval (as in `signals::Reading::latency_s`).
    pub probe_latency_s: f64,
    /// Seconds between health probes.
    pub probe_interval_s: f64,
    pub rise: u32,
    pub fall: u32,
    /// Whether a backend failing fast also fails its health probes.
    pub deep_health: bool,
    /// The agent's `[control]` section.
    pub control: Control,
    /// The lookup table's size (prime).
    pub table_size: u32,
    /// Model observations between refits.
    pub refit_every: u64,
    /// Threads the refits of one tick are spread over.
    pub fit_threads: usize,
    /// The flow window of the reaction time, seconds.
    pub reaction_window_s: f64,
    /// The reaction is reached at this multiple of the capacity share.
    pub reaction_tolerance: f64,
}

impl Default for SimParams {
    fn default() -> SimParams {
        SimParams {
            duration_s: 90.0,
            backends: 120,
            slots_per_unit: 4,
            service_s: 0.0025,
            service: ServiceDist::Exponential,
            slowdown: 4.0,
            hotspot_period_s: 10.0,
            series: NAB_CPU.clone(),
            request_timeout_s: 2.0,
            fail_fast_s: 0.0001,
            probe_latency_s: 0.0005,
            probe_interval_s: 0.5,
            rise: 2,
            fall: 2,
            deep_health: false,
            control: Control {
                interval_ms: 500,
                ..Control::default()
            },
            table_size: 65537,
            refit_every: engine::REFIT_EVERY,
            fit_threads: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
            reaction_window_s: 2.0,
            reaction_tolerance: 1.1,
        }
    }
}

/// S6's default series: the five CPU series of `testdata/nab` (real AWS CloudWatch
/// CPU utilisation from the Numenta Anomaly Benchmark, MIT), built in.
pub static NAB_CPU: LazyLock<Vec<Series>> = LazyLock::new(|| {
    macro_rules! nab {
        ($($file:literal),*) => {
            [$(($file, include_str!(concat!("../../testdata/nab/", $file)))),*]
        };
    }
    nab!(
        "ec2_cpu_utilization_24ae8d.csv",
        "ec2_cpu_utilization_53ea38.csv",
        "ec2_cpu_utilization_5f5533.csv",
        "ec2_cpu_utilization_77c1ca.csv",
        "ec2_cpu_utilization_825cc2.csv"
    )
    .into_iter()
    .map(|(name, text)| Series::parse(name, text, 1).expect("the built-in series parse"))
    .collect()
});

/// One table rebuild.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TableUpdate {
    /// Simulated time, seconds.
    pub t: f64,
    /// Slots whose backend changed.
    pub slots: u64,
    /// The share of the table that moves between the two weight vectors in the ideal
    /// (`policy::share_moved`), which the move budget bounds unless a backend shed.
    pub ideal_share: f64,
    /// Whether a backend shed (the policy's decision): then the shed's own slots are
    /// outside the budget.
    pub shed: bool,
}

/// One control interval, for plots and analysis.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TickPoint {
    /// The tick's time; the figures are of the interval that ends there.
    pub t: f64,
    /// The watched backends' share of the interval's new flows: the slowed quarter
    /// (S2, S3), the failing quarter (S5), the stalling quarter (S7), the quarter whose
    /// capacity varies most (S6) or the 1× third (S1, S8); 0 in S4.
    pub watched_flow_share: f64,
    /// Their share of the table after this tick.
    pub watched_table_share: f64,
    /// Their share of the capacity.
    pub watched_capacity_share: f64,
    /// Mean latency of the requests completed in the interval, all backends.
    pub mean_latency_s: Option<f64>,
    /// Requests queued or in service at the tick, all backends.
    pub in_system: f64,
    /// Table slots moved at this tick.
    pub slots_moved: u64,
}

/// The table slots moved in one phase of a run ([`Scenario::phases`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PhaseMoves {
    pub name: &'static str,
    /// Seconds of the run the phase covers.
    pub seconds: f64,
    /// Slots moved by the table updates made in it, and per minute of it.
    pub slots_moved: u64,
    pub slots_moved_per_min: f64,
}

/// The figures of Little's law: in a steady state, `mean_in_system` ≈
/// `arrival_rate × mean_time_in_system_s`. Only requests that take a server count.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Little {
    pub arrival_rate: f64,
    pub mean_time_in_system_s: f64,
    /// The in-flight gauges summed over backends, averaged over the ticks.
    pub mean_in_system: f64,
}

/// What the models did in an `ai` run.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ModelStats {
    /// Backend-ticks with a forecast, and how many of them used the SVR.
    pub ticks: u64,
    pub svr_chosen: u64,
    pub fits: u64,
    /// Fits refused because the window did not hold enough samples yet (the first
    /// few refits of a run).
    pub fits_too_early: u64,
    pub fit_failures: u64,
    /// Wall-clock seconds spent fitting.
    pub fit_wall_s: f64,
    /// Rolling one-step MAE at the end of the run, mean over backends, seconds.
    pub mae_last_value_s: Option<f64>,
    pub mae_ewma_s: Option<f64>,
    pub mae_svr_s: Option<f64>,
    /// Backend-ticks with a capacity forecast, and how many of them used the SVR.
    pub capacity_ticks: u64,
    pub capacity_svr_chosen: u64,
    /// The capacity model's rolling MAE (of the least capacity over its horizon) at
    /// the end of the run, mean over backends, requests per second: last value, EWMA,
    /// SVR.
    pub capacity_mae: [Option<f64>; 3],
    /// Backend-updates shed on a foreseen fall of capacity.
    pub foreseen_sheds: u64,
}

/// Everything measured in one run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SimReport {
    pub scenario: ScenarioId,
    pub policy: PolicyKind,
    /// The policy as the benches name it: `ai` with `[control] predictor` other than
    /// `auto` is `ai-svr`, `ai-ewma` or `ai-last`.
    pub variant: Variant,
    pub seed: u64,
    pub backends: usize,
    pub duration_s: f64,
    /// Requests per second all backends serve at slowdown 1.
    pub nominal_capacity: f64,
    /// Requests per second offered (simulated).
    pub offered_rate: f64,
    pub requests: u64,
    /// Requests answered within the timeout.
    pub ok: u64,
    /// Requests answered with an error by a backend failing fast.
    pub failed_fast: u64,
    /// Requests the client gave up on.
    pub timeouts: u64,
    /// (failed fast + timeouts) / requests.
    pub error_rate: f64,
    /// Latency quantiles and mean of the successful requests, seconds.
    pub p50_s: Option<f64>,
    pub p99_s: Option<f64>,
    pub p999_s: Option<f64>,
    pub mean_s: Option<f64>,
    /// The p99 of all requests, failed ones counted as the slowest: `None` when more
    /// than 1 % failed (it is then beyond the timeout).
    pub p99_all_s: Option<f64>,
    /// Busy server time / (servers × duration), by backend.
    pub utilisation: Vec<f64>,
    pub util_max: f64,
    pub util_mean: f64,
    /// The worst reaction time from flows (see the module documentation), and each.
    pub reaction_s: Option<f64>,
    pub reactions_s: Vec<Option<f64>>,
    /// The same from the table's slots.
    pub reaction_table_s: Option<f64>,
    pub reactions_table_s: Vec<Option<f64>>,
    /// Slots moved over all table rebuilds, and per simulated minute.
    pub slots_moved: u64,
    pub slots_moved_per_min: f64,
    /// The same in each of the scenario's phases, in their order.
    pub phases: Vec<PhaseMoves>,
    pub updates: Vec<TableUpdate>,
    /// Policy runs, those limited by the move budget, and backend-runs raised to the
    /// floor.
    pub policy_steps: u32,
    pub budget_limited_steps: u32,
    pub floor_raised: u64,
    /// Probes that changed some backend's health.
    pub health_changes: u32,
    /// Tables that could not be built (the previous one stayed).
    pub table_failures: u32,
    /// The weights in force at the end.
    pub final_weights: Vec<u32>,
    pub little: Little,
    /// Only for `ai`.
    pub model: Option<ModelStats>,
    pub series: Vec<TickPoint>,
    /// Wall-clock seconds of the run, and simulated requests per wall-clock second.
    pub wall_s: f64,
    pub sim_requests_per_s: f64,
}

impl SimReport {
    /// The report without the wall-clock figures, which alone differ between two
    /// runs of the same seed.
    pub fn without_timing(&self) -> SimReport {
        let mut r = self.clone();
        r.wall_s = 0.0;
        r.sim_requests_per_s = 0.0;
        if let Some(m) = &mut r.model {
            m.fit_wall_s = 0.0;
        }
        r
    }
}

/// Runs `scenario` under `policy` with `seed`: the same seed gives every policy the
/// same requests (arrival times, 5-tuples and service-time draws).
pub fn run(scenario: ScenarioId, policy: PolicyKind, seed: u64, params: &SimParams) -> SimReport {
    let s = Scenario::new(scenario, params);
    engine::simulate(&s, policy, seed, params)
}

/// The worst of several reaction times; `None` if any is `None` or there is none.
fn worst(r: &[Option<f64>]) -> Option<f64> {
    if r.is_empty() {
        return None;
    }
    r.iter().try_fold(0.0f64, |acc, x| x.map(|x| acc.max(x)))
}
