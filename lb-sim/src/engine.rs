//! The event loop of one run: arrivals, probes, scenario changes and control ticks
//! in time order, and the agent's path from signals to weights to table at every
//! tick (see the module documentation of [`super`] for the model and its choices).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use lb_common::hash::flow_hash;
use lb_common::types::{FAMILY_V4, FlowKey, PROTO_TCP};

use super::histogram::Histogram;
use super::rng::Rng;
use super::scenario::{Change, Scenario};
use super::{
    Little, ModelStats, PhaseMoves, ServiceDist, SimParams, SimReport, TableUpdate, TickPoint,
    worst,
};
use lb_userspace::core::BackendId;
use lb_userspace::core::control::{Backends, Observation, Table, VipControl};
use lb_userspace::core::model::{self, BackendModel, Forecast, Load, ModelError};
use lb_userspace::core::policy::{self, Decision, Input, Note, Params, PolicyKind, Variant};
use lb_userspace::desired::addr_bytes;

/// What a scrape of one backend gives at a control tick: the rates over the interval
/// that just ended and the gauges now, as `collect::BackendSample` would hold them.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    /// Mean latency of the requests completed in the interval (errors included, as
    /// the application's histogram counts them); `None` without completions.
    latency_s: Option<f64>,
    /// Responses per second (every status code, as `app_requests_total` counts).
    requests_per_s: f64,
    /// Error responses per second (what an `errors` counter of 5xx responses counts;
    /// client timeouts are not the backend's to count).
    errors_per_s: f64,
    /// Busy server-seconds / (servers × interval).
    cpu: f64,
    /// Requests queued or in service now.
    in_flight: f64,
    /// New flows per second the table sent it (the datapath's counter).
    new_flows_per_s: f64,
}

/// One backend: its servers, its state and what the agent knows of it.
struct Backend {
    /// When each server is next free, as the bits of a non-negative `f64` (which
    /// order like the numbers), in a min-heap: a request takes the server that frees
    /// first, so requests are served in arrival order.
    free_at: BinaryHeap<Reverse<u64>>,
    servers: usize,
    slowdown: f64,
    fail_fast: bool,
    /// The prober's state: health, and the current run of successes or failures.
    healthy: bool,
    successes: u32,
    failures: u32,
    /// Whether the last probe succeeded (its latency stands in for the
    /// application's when no request completed).
    probe_ok: bool,
    /// Requests in the system at the last tick (the running sum of the in-flight
    /// differences).
    in_flight: i64,
    sample: Option<Sample>,
    model: Option<BackendModel>,
    forecast: Option<Forecast>,
    /// The capacity model (`model::capacity_config`) and its last forecast.
    capacity: Option<BackendModel>,
    capacity_forecast: Option<Forecast>,
}

/// Per backend and per control interval, what the completions, arrivals and busy
/// time of every request add up to. A request's completion time is known when it
/// arrives (FIFO servers, service time drawn at arrival), so it is added at once to
/// the interval it completes in; an interval's figures are final when its tick comes,
/// since every request arriving later also completes later.
struct Bins {
    /// Intervals per backend: the run's ticks plus an overflow interval (after the
    /// last tick) and one spare entry for the in-flight differences.
    per: usize,
    arrivals: Vec<u32>,
    done: Vec<u32>,
    done_latency: Vec<f64>,
    /// Error responses completed (failing fast).
    errors: Vec<u32>,
    busy: Vec<f64>,
    /// At index `j`, the change of the in-flight gauge at tick `j`.
    in_flight: Vec<i32>,
}

/// Which of a backend's two models a fit is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    Latency,
    Capacity,
}

/// A scheduled event other than an arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// The scenario's event of this index.
    Change(usize),
    /// Every backend is probed.
    Probe,
    /// Control tick `j` (at `j` × interval).
    Tick(usize),
}

/// Ordered by time, then by the order of scheduling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at: u64,
    seq: u64,
    kind: Kind,
}

/// A Poisson process of piecewise-constant rate: at a change of rate the next gap is
/// drawn afresh from the boundary, which is exact since the process has no memory.
struct Arrivals {
    rng: Rng,
    rate: Vec<(f64, f64)>,
    segment: usize,
    t: f64,
}

impl Arrivals {
    fn next(&mut self) -> f64 {
        loop {
            let rate = self.rate[self.segment].1;
            let end = self
                .rate
                .get(self.segment + 1)
                .map_or(f64::INFINITY, |r| r.0);
            if rate > 0.0 {
                let at = self.t + self.rng.exponential(1.0 / rate);
                if at < end {
                    self.t = at;
                    return at;
                }
            }
            if end.is_infinite() {
                return f64::INFINITY;
            }
            self.t = end;
            self.segment += 1;
        }
    }
}

/// Refit every model after this many observations, as the agent does.
pub(super) const REFIT_EVERY: u64 = model::REFIT_EVERY;

/// The policy parameters the agent would use for this VIP (the agent's own
/// `Control::params_for`).
pub(super) fn agent_params(configured: &[u32], p: &SimParams) -> Params {
    p.control.params_for(configured)
}

/// One run in progress.
struct Sim<'a> {
    p: &'a SimParams,
    scenario: &'a Scenario,
    kind: PolicyKind,
    /// The VIP's control step, as the agent runs it.
    control: VipControl,
    keys: Vec<[u8; 16]>,
    configured: Vec<u32>,
    /// The table in force and its weights.
    table: Table,
    /// Slots of each backend in `table`.
    slot_counts: Vec<u32>,
    backends: Vec<Backend>,
    bins: Bins,
    interval: f64,
    ticks: usize,
    timers: BinaryHeap<Reverse<Timer>>,
    seq: u64,
    /// The flow of a request before its client address and port are drawn.
    flow: FlowKey,
    tuples: Rng,
    service: Rng,
    latency: Histogram,
    requests: u64,
    failed_fast: u64,
    timeouts: u64,
    /// Requests that took a server, and their total time in the system.
    in_system_requests: u64,
    in_system_time: f64,
    /// The in-flight gauges summed over backends, summed over ticks.
    in_system_samples: f64,
    observations: u64,
    model_stats: ModelStats,
    updates: Vec<TableUpdate>,
    policy_steps: u32,
    budget_limited_steps: u32,
    floor_raised: u64,
    health_changes: u32,
    table_failures: u32,
    series: Vec<TickPoint>,
    /// Slot counts after every tick, for the reaction measured on the table.
    slot_history: Vec<Vec<u32>>,
}

/// Runs `scenario` under `kind` with `seed`.
pub(super) fn simulate(
    scenario: &Scenario,
    kind: PolicyKind,
    seed: u64,
    p: &SimParams,
) -> SimReport {
    let started = Instant::now();
    let mut sim = Sim::new(scenario, kind, seed, p);
    let mut arrivals = Arrivals {
        rng: Rng::stream(seed, 1),
        rate: scenario.rate.clone(),
        segment: 0,
        t: 0.0,
    };
    let end = scenario.duration_s;
    let mut next_arrival = arrivals.next();
    loop {
        let timer_at = sim
            .timers
            .peek()
            .map_or(f64::INFINITY, |t| f64::from_bits(t.0.at));
        if next_arrival < timer_at && next_arrival < end {
            sim.arrive(next_arrival);
            next_arrival = arrivals.next();
        } else if let Some(Reverse(timer)) = sim.timers.pop() {
            let at = f64::from_bits(timer.at);
            match timer.kind {
                Kind::Change(i) => sim.change(i),
                Kind::Probe => sim.probe(at),
                Kind::Tick(j) => sim.tick(j),
            }
        } else {
            break;
        }
    }
    sim.report(seed, started.elapsed().as_secs_f64())
}

impl<'a> Sim<'a> {
    fn new(scenario: &'a Scenario, kind: PolicyKind, seed: u64, p: &'a SimParams) -> Sim<'a> {
        let n = scenario.len();
        let interval = p.control.interval_ms as f64 / 1000.0;
        let ticks = (scenario.duration_s / interval + 1e-9).floor() as usize;
        let configured: Vec<u32> = match kind {
            PolicyKind::Static => scenario.static_weights.clone(),
            _ => vec![1; n],
        };
        let params = agent_params(&configured, p);
        let addresses: Vec<IpAddr> = (0..n)
            .map(|i| IpAddr::V4(Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8)))
            .collect();
        let keys: Vec<[u8; 16]> = addresses.iter().map(|&a| addr_bytes(a).0).collect();
        // Before the first update the agent's table holds the configured weights.
        let weights: Vec<u32> = configured.iter().map(|&w| w * params.unit).collect();
        let model_config = model::model_config(p.control.predictor);
        let capacity_config = model::capacity_config(p.control.predictor);
        let backends = scenario
            .units
            .iter()
            .map(|&u| {
                let servers = p.slots_per_unit.max(1) * u as usize;
                Backend {
                    free_at: (0..servers).map(|_| Reverse(0f64.to_bits())).collect(),
                    servers,
                    slowdown: 1.0,
                    fail_fast: false,
                    healthy: true,
                    successes: 0,
                    failures: 0,
                    probe_ok: true,
                    in_flight: 0,
                    sample: None,
                    // The agent models every backend whatever the policy; only `ai`
                    // reads the predictions, so the others skip the cost.
                    model: (kind == PolicyKind::Ai)
                        .then(|| BackendModel::new(model_config.clone()).ok())
                        .flatten(),
                    forecast: None,
                    capacity: (kind == PolicyKind::Ai)
                        .then(|| BackendModel::new(capacity_config.clone()).ok())
                        .flatten(),
                    capacity_forecast: None,
                }
            })
            .collect();
        let per = ticks + 2;
        let bins = Bins {
            per,
            arrivals: vec![0; n * per],
            done: vec![0; n * per],
            done_latency: vec![0.0; n * per],
            errors: vec![0; n * per],
            busy: vec![0.0; n * per],
            in_flight: vec![0; n * per],
        };
        let mut flow = FlowKey {
            family: FAMILY_V4,
            proto: PROTO_TCP,
            dst_port_be: 80u16.to_be(),
            ..FlowKey::default()
        };
        flow.dst[..4].copy_from_slice(&[198, 18, 0, 1]);
        let mut sim = Sim {
            p,
            scenario,
            kind,
            control: VipControl::new(kind, params),
            keys,
            configured,
            table: Table {
                weights: Vec::new(),
                slots: Default::default(),
            },
            slot_counts: vec![0; n],
            backends,
            bins,
            interval,
            ticks,
            timers: BinaryHeap::new(),
            seq: 0,
            flow,
            tuples: Rng::stream(seed, 2),
            service: Rng::stream(seed, 3),
            latency: Histogram::new(),
            requests: 0,
            failed_fast: 0,
            timeouts: 0,
            in_system_requests: 0,
            in_system_time: 0.0,
            in_system_samples: 0.0,
            observations: 0,
            model_stats: ModelStats::default(),
            updates: Vec::new(),
            policy_steps: 0,
            budget_limited_steps: 0,
            floor_raised: 0,
            health_changes: 0,
            table_failures: 0,
            series: Vec::with_capacity(ticks),
            slot_history: Vec::with_capacity(ticks),
        };
        let first = Table::build(&sim.keys, &weights, p.table_size);
        sim.install(
            first.expect("the configured weights give a table"),
            false,
            0.0,
        );
        sim.updates.clear();
        for i in 0..scenario.events.len() {
            if scenario.events[i].at < scenario.duration_s {
                sim.schedule(scenario.events[i].at, Kind::Change(i));
            }
        }
        if p.probe_interval_s > 0.0 {
            sim.schedule(p.probe_interval_s, Kind::Probe);
        }
        if ticks > 0 {
            sim.schedule(interval, Kind::Tick(1));
        }
        sim
    }

    fn schedule(&mut self, at: f64, kind: Kind) {
        self.seq += 1;
        self.timers.push(Reverse(Timer {
            at: at.max(0.0).to_bits(),
            seq: self.seq,
            kind,
        }));
    }

    /// The interval a time falls in (the overflow interval after the last tick).
    #[inline]
    fn bin(&self, t: f64) -> usize {
        ((t / self.interval) as usize).min(self.ticks)
    }

    /// One request: a new flow with a random 5-tuple, hashed into the table.
    #[inline]
    fn arrive(&mut self, t: f64) {
        let bits = self.tuples.next_u64();
        let mut key = self.flow;
        key.src[..4].copy_from_slice(&(bits as u32).to_be_bytes());
        key.src_port_be = (1024 + ((bits >> 32) as u16) % 64512).to_be();
        let slot = flow_hash(&key) % self.table.slots.len() as u32;
        let b = self.table.slots[slot as usize] as usize;
        // Drawn for every request, so that every policy sees the same draws.
        let u = self.service.uniform();
        self.requests += 1;
        let base = b * self.bins.per;
        let k = self.bin(t);
        self.bins.arrivals[base + k] += 1;
        let backend = &mut self.backends[b];
        if backend.fail_fast {
            let end = t + self.p.fail_fast_s;
            let k = ((end / self.interval) as usize).min(self.ticks);
            self.bins.done[base + k] += 1;
            self.bins.done_latency[base + k] += self.p.fail_fast_s;
            self.bins.errors[base + k] += 1;
            self.failed_fast += 1;
            return;
        }
        let mean = self.p.service_s * backend.slowdown;
        let service = match self.p.service {
            ServiceDist::Exponential => -u.ln() * mean,
            ServiceDist::Deterministic { jitter } => mean * (1.0 + jitter * (2.0 * u - 1.0)),
        };
        let (start, end) = {
            let mut first = backend.free_at.peek_mut().expect("a backend has servers");
            let start = f64::from_bits(first.0).max(t);
            let end = start + service;
            first.0 = end.to_bits();
            (start, end)
        };
        let latency = end - t;
        if latency <= self.p.request_timeout_s {
            self.latency.record(latency);
        } else {
            // The client gives up; the backend serves the request all the same.
            self.timeouts += 1;
        }
        self.in_system_requests += 1;
        self.in_system_time += latency;
        let interval = self.interval;
        let last = self.ticks;
        let k_end = ((end / interval) as usize).min(last);
        self.bins.done[base + k_end] += 1;
        self.bins.done_latency[base + k_end] += latency;
        let mut k = ((start / interval) as usize).min(last);
        let mut from = start;
        while k < k_end {
            let edge = (k + 1) as f64 * interval;
            self.bins.busy[base + k] += edge - from;
            from = edge;
            k += 1;
        }
        self.bins.busy[base + k_end] += end - from;
        // In flight at tick j (time j·interval) if it arrived at or before and
        // completes after.
        let first = (t / interval).ceil() as usize;
        let after = (end / interval).ceil() as usize;
        if first < after {
            self.bins.in_flight[base + first.min(last + 1)] += 1;
            self.bins.in_flight[base + after.min(last + 1)] -= 1;
        }
    }

    fn change(&mut self, i: usize) {
        let e = self.scenario.events[i];
        let b = &mut self.backends[e.backend];
        match e.change {
            Change::Slowdown(f) => b.slowdown = f,
            Change::FailFast(on) => b.fail_fast = on,
        }
    }

    /// Every backend is probed; a change of health reruns the policy at once, as the
    /// agent does (`control_tick(false)`: no new observation).
    fn probe(&mut self, at: f64) {
        let (rise, fall) = (self.p.rise.max(1), self.p.fall.max(1));
        let mut changed = false;
        for b in &mut self.backends {
            // The health endpoint answers outside the servers: it fails only for a
            // backend failing fast behind a deep health check.
            let ok = !(b.fail_fast && self.p.deep_health);
            b.probe_ok = ok;
            if ok {
                b.failures = 0;
                b.successes = b.successes.saturating_add(1);
                if !b.healthy && b.successes >= rise {
                    b.healthy = true;
                    changed = true;
                }
            } else {
                b.successes = 0;
                b.failures = b.failures.saturating_add(1);
                if b.healthy && b.failures >= fall {
                    b.healthy = false;
                    changed = true;
                }
            }
        }
        if changed {
            self.health_changes += 1;
            self.decide(at);
        }
        let next = at + self.p.probe_interval_s;
        if next <= self.scenario.duration_s + 1e-9 {
            self.schedule(next, Kind::Probe);
        }
    }

    /// Control tick `j`: scrape every backend, feed the models, run the policy.
    fn tick(&mut self, j: usize) {
        let t = j as f64 * self.interval;
        let k = j - 1;
        let per = self.bins.per;
        let mut in_system = 0i64;
        let (mut done_all, mut latency_all) = (0u64, 0.0);
        for (b, backend) in self.backends.iter_mut().enumerate() {
            let i = b * per + k;
            backend.in_flight += i64::from(self.bins.in_flight[b * per + j]);
            in_system += backend.in_flight;
            let done = self.bins.done[i];
            done_all += u64::from(done);
            latency_all += self.bins.done_latency[i];
            backend.sample = Some(Sample {
                latency_s: (done > 0).then(|| self.bins.done_latency[i] / f64::from(done)),
                requests_per_s: f64::from(done) / self.interval,
                errors_per_s: f64::from(self.bins.errors[i]) / self.interval,
                cpu: (self.bins.busy[i] / (backend.servers as f64 * self.interval)).min(1.0),
                in_flight: backend.in_flight as f64,
                new_flows_per_s: f64::from(self.bins.arrivals[i]) / self.interval,
            });
        }
        self.in_system_samples += in_system as f64;
        if self.kind == PolicyKind::Ai {
            self.observe();
        }
        let moved_before = self.updates.len();
        self.decide(t);
        let moved: u64 = self.updates[moved_before..].iter().map(|u| u.slots).sum();
        // The time series point of the interval that just ended.
        let watched = self.scenario.watched_at(t - self.interval / 2.0);
        let arrivals = |b: usize| f64::from(self.bins.arrivals[b * per + k]);
        let all: f64 = (0..self.backends.len()).map(arrivals).sum();
        let share = |x: f64, total: f64| if total > 0.0 { x / total } else { 0.0 };
        let slots: f64 = watched
            .iter()
            .map(|&b| f64::from(self.slot_counts[b]))
            .sum();
        let caps = self.scenario.capacity_shares_at(t - self.interval / 2.0);
        self.series.push(TickPoint {
            t,
            watched_flow_share: share(watched.iter().map(|&b| arrivals(b)).sum(), all),
            watched_table_share: share(slots, self.table.slots.len() as f64),
            watched_capacity_share: watched.iter().map(|&b| caps[b]).sum(),
            mean_latency_s: (done_all > 0).then(|| latency_all / done_all as f64),
            in_system: in_system as f64,
            slots_moved: moved,
        });
        self.slot_history.push(self.slot_counts.clone());
        if j < self.ticks {
            self.schedule((j + 1) as f64 * self.interval, Kind::Tick(j + 1));
        }
    }

    /// Feeds every model this interval's observation, as `Signals::observe` does, and
    /// refits them every [`REFIT_EVERY`] observations. The agent fits in background
    /// tasks that finish before the next tick; here the fits run at once, in
    /// `fit_threads` threads, and the new models are used from the next tick on.
    fn observe(&mut self) {
        self.observations += 1;
        let probe_latency = self.p.probe_latency_s;
        let error_penalty = self.control.params.error_penalty;
        for b in &mut self.backends {
            let sample = b.sample.unwrap_or_default();
            // The capacity it showed, as the policy will see it; an interval without
            // requests or busy time shows none, and the model skips it.
            let shown = policy::shown_capacity(
                error_penalty,
                Some(sample.requests_per_s),
                Some(sample.cpu),
                Some(sample.errors_per_s),
            );
            let load = Load {
                cpu: sample.cpu,
                in_flight: sample.in_flight,
                new_flows_per_s: sample.new_flows_per_s,
                ..Load::default()
            };
            if let (Some(model), Some(shown)) = (&mut b.capacity, shown)
                && let Ok(forecast) = model.tick(shown, &load.features())
            {
                self.model_stats.capacity_ticks += 1;
                if forecast.choice.uses_model {
                    self.model_stats.capacity_svr_chosen += 1;
                }
                b.capacity_forecast = Some(forecast);
            }
            let Some(model) = &mut b.model else {
                continue;
            };
            let Some(target) = sample.latency_s.or(b.probe_ok.then_some(probe_latency)) else {
                continue;
            };
            if let Ok(forecast) = model.tick(target, &load.features()) {
                self.model_stats.ticks += 1;
                if forecast.choice.uses_model {
                    self.model_stats.svr_chosen += 1;
                }
                b.forecast = Some(forecast);
            }
        }
        if self.observations.is_multiple_of(self.p.refit_every.max(1)) {
            self.refit();
        }
    }

    fn refit(&mut self) {
        let started = Instant::now();
        let sets: Vec<_> = self
            .backends
            .iter()
            .enumerate()
            .flat_map(|(i, b)| {
                [(Head::Latency, &b.model), (Head::Capacity, &b.capacity)]
                    .into_iter()
                    .filter_map(move |(head, m)| {
                        let m = m.as_ref()?;
                        Some(((i, head), m.training_set(), m.svr_params().clone()))
                    })
            })
            .collect();
        let threads = self.p.fit_threads.clamp(1, sets.len().max(1));
        let chunk = sets.len().div_ceil(threads).max(1);
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = sets
                .chunks(chunk)
                .map(|c| {
                    s.spawn(move || {
                        c.iter()
                            .map(|(i, set, params)| (*i, set.fit(params)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("a fit thread panicked"))
                .collect()
        });
        for ((i, head), result) in results {
            let b = &mut self.backends[i];
            let model = match head {
                Head::Latency => b.model.as_mut(),
                Head::Capacity => b.capacity.as_mut(),
            };
            let Some(model) = model else {
                continue;
            };
            match result.and_then(|fitted| model.install(fitted)) {
                Ok(()) => self.model_stats.fits += 1,
                // The window is still filling: the agent's fit fails the same way.
                Err(ModelError::TooFewSamples { .. }) => self.model_stats.fits_too_early += 1,
                Err(_) => self.model_stats.fit_failures += 1,
            }
        }
        self.model_stats.fit_wall_s += started.elapsed().as_secs_f64();
    }

    /// The control step runs on what is known of every backend, as in the agent's
    /// control tick; the table it returns, if the weights changed, is installed.
    fn decide(&mut self, t: f64) {
        let probe_latency = self.p.probe_latency_s;
        let inputs: Vec<Input> = self
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let sample = b.sample.as_ref();
                let seen = Observation {
                    qps: sample.map(|s| s.requests_per_s),
                    utilisation: sample.map(|s| s.cpu),
                    errors_per_s: sample.map(|s| s.errors_per_s),
                    latency_s: sample
                        .and_then(|s| s.latency_s)
                        .or(b.probe_ok.then_some(probe_latency)),
                    in_flight: sample.map(|s| s.in_flight),
                };
                let id = BackendId(i as u32);
                Input {
                    healthy: b.healthy,
                    ..Input::observed(id, self.configured[i], seen, b.forecast.as_ref())
                        .with_capacity_forecast(b.capacity_forecast.as_ref())
                }
            })
            .collect();
        let vip = Backends {
            inputs: &inputs,
            keys: &self.keys,
            table_size: self.p.table_size,
        };
        let outcome = self.control.step(&vip, Some(&self.table));
        let decisions = &self.control.decisions;
        self.policy_steps += 1;
        if decisions.iter().any(Decision::budget_limited) {
            self.budget_limited_steps += 1;
        }
        self.floor_raised += decisions.iter().filter(|d| d.floored()).count() as u64;
        let shed = decisions.iter().any(Decision::shed);
        self.model_stats.foreseen_sheds += decisions
            .iter()
            .filter(|d| d.notes.iter().any(|n| matches!(n, Note::Foreseen { .. })))
            .count() as u64;
        match outcome.table {
            Some(Ok(table)) => self.install(table, shed, t),
            // The agent then keeps the table it has.
            Some(Err(_)) => self.table_failures += 1,
            None => {}
        }
    }

    /// Makes `table` current, recording how many slots it moved.
    fn install(&mut self, table: Table, shed: bool, t: f64) {
        let slots = if self.table.slots.len() == table.slots.len() {
            self.table
                .slots
                .iter()
                .zip(table.slots.iter())
                .filter(|(a, b)| a != b)
                .count() as u64
        } else {
            table.slots.len() as u64
        };
        self.updates.push(TableUpdate {
            t,
            slots,
            ideal_share: if self.table.weights.is_empty() {
                1.0
            } else {
                policy::share_moved(&self.table.weights, &table.weights)
            },
            shed,
        });
        self.slot_counts.iter_mut().for_each(|c| *c = 0);
        for &i in table.slots.iter() {
            self.slot_counts[i as usize] += 1;
        }
        self.table = table;
    }

    /// Reaction times of every measured slowdown, from the flows of a window of
    /// `reaction_window_s` after it (`by_flows`) or from the table after each tick:
    /// the time until the slowed backends together get at most `reaction_tolerance`
    /// times their new share of the capacity. `None` when it does not happen before
    /// the next change.
    fn reactions(&self, by_flows: bool) -> Vec<Option<f64>> {
        let per = self.bins.per;
        let window = (self.p.reaction_window_s / self.interval).round().max(1.0) as usize;
        self.scenario
            .degradations()
            .into_iter()
            .map(|(at, slowed, end)| {
                let caps = self.scenario.capacity_shares_at(at);
                let target: f64 = slowed.iter().map(|&b| caps[b]).sum();
                for j in 1..=self.ticks {
                    let t = j as f64 * self.interval;
                    if t < at - 1e-9 || t > end + 0.5 + 1e-9 {
                        continue;
                    }
                    let share = if by_flows {
                        if j < window || ((j - window) as f64 * self.interval) < at - 1e-9 {
                            continue;
                        }
                        let sum = |b: usize| -> f64 {
                            (j - window..j)
                                .map(|k| f64::from(self.bins.arrivals[b * per + k]))
                                .sum()
                        };
                        let all: f64 = (0..self.backends.len()).map(sum).sum();
                        if all <= 0.0 {
                            continue;
                        }
                        slowed.iter().map(|&b| sum(b)).sum::<f64>() / all
                    } else {
                        let counts = &self.slot_history[j - 1];
                        let total: f64 = counts.iter().map(|&c| f64::from(c)).sum();
                        slowed.iter().map(|&b| f64::from(counts[b])).sum::<f64>() / total
                    };
                    if share <= self.p.reaction_tolerance * target {
                        return Some(t - at);
                    }
                }
                None
            })
            .collect()
    }

    fn report(self, seed: u64, wall_s: f64) -> SimReport {
        let d = self.scenario.duration_s;
        let per = self.bins.per;
        let span = self.ticks as f64 * self.interval;
        let utilisation: Vec<f64> = self
            .backends
            .iter()
            .enumerate()
            .map(|(b, backend)| {
                let busy: f64 = self.bins.busy[b * per..b * per + self.ticks].iter().sum();
                busy / (backend.servers as f64 * span.max(1e-9))
            })
            .collect();
        let util_max = utilisation.iter().copied().fold(0.0, f64::max);
        let util_mean = utilisation.iter().sum::<f64>() / utilisation.len().max(1) as f64;
        let reactions_s = self.reactions(true);
        let reactions_table_s = self.reactions(false);
        let slots_moved: u64 = self.updates.iter().map(|u| u.slots).sum();
        let phases = self
            .scenario
            .phases
            .iter()
            .map(|phase| {
                let seconds = phase.seconds();
                let slots: u64 = self
                    .updates
                    .iter()
                    .filter(|u| phase.holds(u.t))
                    .map(|u| u.slots)
                    .sum();
                PhaseMoves {
                    name: phase.name,
                    seconds,
                    slots_moved: slots,
                    slots_moved_per_min: slots as f64 / (seconds.max(1e-9) / 60.0),
                }
            })
            .collect();
        let errors = self.failed_fast + self.timeouts;
        let mut model = None;
        if self.kind == PolicyKind::Ai {
            let mut stats = self.model_stats.clone();
            let mut sums = [(0.0, 0usize); 3];
            for m in self.backends.iter().filter_map(|b| b.model.as_ref()) {
                for (s, v) in sums.iter_mut().zip(m.rolling_mae()) {
                    if let Some(v) = v {
                        s.0 += v;
                        s.1 += 1;
                    }
                }
            }
            let mean = |(s, n): (f64, usize)| (n > 0).then(|| s / n as f64);
            stats.mae_last_value_s = mean(sums[0]);
            stats.mae_ewma_s = mean(sums[1]);
            stats.mae_svr_s = mean(sums[2]);
            let mut sums = [(0.0, 0usize); 3];
            for m in self.backends.iter().filter_map(|b| b.capacity.as_ref()) {
                for (s, v) in sums.iter_mut().zip(m.rolling_mae()) {
                    if let Some(v) = v {
                        s.0 += v;
                        s.1 += 1;
                    }
                }
            }
            stats.capacity_mae = sums.map(mean);
            model = Some(stats);
        }
        SimReport {
            scenario: self.scenario.id,
            policy: self.kind,
            variant: if self.kind == PolicyKind::Ai {
                Variant::ai(self.p.control.predictor)
            } else {
                Variant::of(self.kind)
            },
            seed,
            backends: self.backends.len(),
            duration_s: d,
            nominal_capacity: self.scenario.nominal_capacity(),
            offered_rate: self.requests as f64 / d,
            requests: self.requests,
            ok: self.latency.len(),
            failed_fast: self.failed_fast,
            timeouts: self.timeouts,
            error_rate: errors as f64 / self.requests.max(1) as f64,
            p50_s: self.latency.quantile(0.5),
            p99_s: self.latency.quantile(0.99),
            p999_s: self.latency.quantile(0.999),
            p99_all_s: self.latency.quantile_with_worse(0.99, errors),
            mean_s: self.latency.mean(),
            utilisation,
            util_max,
            util_mean,
            reaction_s: worst(&reactions_s),
            reactions_s,
            reaction_table_s: worst(&reactions_table_s),
            reactions_table_s,
            slots_moved,
            slots_moved_per_min: slots_moved as f64 / (d / 60.0),
            phases,
            updates: self.updates,
            policy_steps: self.policy_steps,
            budget_limited_steps: self.budget_limited_steps,
            floor_raised: self.floor_raised,
            health_changes: self.health_changes,
            table_failures: self.table_failures,
            final_weights: self.table.weights,
            little: Little {
                arrival_rate: self.in_system_requests as f64 / d,
                mean_time_in_system_s: self.in_system_time / self.in_system_requests.max(1) as f64,
                mean_in_system: self.in_system_samples / self.ticks.max(1) as f64,
            },
            model,
            series: self.series,
            wall_s,
            sim_requests_per_s: self.requests as f64 / wall_s.max(1e-9),
        }
    }
}
