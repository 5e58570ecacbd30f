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
//!
//! The load is a fraction of the *nominal* capacity (all backends at slowdown 1): in
//! S2 the degraded capacity is 81 % of nominal, so 70 % load is 86 % of what is left;
//! in S3 it is 81 % too.
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
pub const SCENARIOS: [&str; 5] = ["S1", "S2", "S3", "S4", "S5"];

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
    /// `S1` to `S5`.
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
}

impl Scenario {
    /// The scenario `id` (case-insensitive) stretched to `duration`.
    pub fn get(id: &str, duration: Duration) -> Option<Scenario> {
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
    /// agent has no history of the backend yet then.
    pub fn degradations(&self) -> Vec<(f64, Vec<usize>, f64)> {
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
