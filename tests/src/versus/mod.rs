//! `lb-bench-versus`: the XDP balancer against HAProxy, nginx and no
//! balancer at all, with the same traffic on the same topology; run by the
//! `lb-bench-versus` binary (`cargo xtask bench versus`).
//!
//! One [`Topology`] with four backends serves every run. Each round brings the
//! systems up one at a time in the order of [`Settings::systems`] (by default `xdp`,
//! `haproxy`, `nginx`, `direct`) and measures, per system:
//!
//! 1. [`Phase::ConnRate`]: new TCP connections per second, closed loop: `concurrency`
//!    client workers, each opening its next connection (connect, one small request,
//!    the response, close) as soon as its last one ended, for `duration`; completed
//!    connections are counted.
//! 2. [`Phase::Latency`]: the same connections open loop, Poisson arrivals at
//!    `open_loop_fraction` (50 %) of the *direct path's* rate measured in phase 1 of
//!    the same round, the same rate and schedule for every system so that they are
//!    comparable; p50/p99/p99.9 of connect + request + response.
//!    [`Phase::LatencyLight`]: the same at `light_fraction` (25 %), a load below
//!    every system's saturation.
//! 3. [`Phase::BulkDown`] and [`Phase::BulkUp`]: `bulk_connections` long
//!    connections for `duration`, backend to client and client to backend.
//!
//! Phase 1 of every system runs before phase 2 of any (the open-loop rate needs the
//! direct path's figure); phases 2 and 3 share one bring-up. Every bring-up starts
//! with a `warmup` of closed-loop connections that must all succeed and reach every
//! backend. Around every measured window the CPU is read ([`cpu`]): the machine, the
//! load balancer's processes, the XDP program's run time, the client's and the
//! backends' threads. Everything here shares the machine's CPUs (two on the
//! reference machine): client, backends, balancer and the kernel's packet
//! processing for all of them. The switch namespace's bridge is the wire, so
//! bridge netfilter (`bridge-nf-call-*`) is off there.
//!
//! # Layout
//! - [`systems`]: bring-up and tear-down of the four systems.
//! - [`traffic`]: the backend servers and the client.
//! - [`cpu`]: CPU accounting of a window.
//! - [`report`]: medians over rounds, ratios to the direct path, Markdown and JSON.

pub mod cpu;
pub mod report;
pub mod systems;
pub mod traffic;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::topology::Topology;
use cpu::{CpuUsage, Meter};
use systems::{Running, System};
use traffic::{APP_PORT, Backends, Client, ConnReport, Direction};

/// Backends of the topology.
pub const BACKENDS: usize = 4;
/// How long bulk connections run before their window starts (slow start, buffers).
const BULK_WARMUP: Duration = Duration::from_secs(1);

/// What to run.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Rounds; every figure is the median over them.
    pub repeats: usize,
    /// Length of every measured window.
    pub duration: Duration,
    /// Client workers of the closed loop (connections at a time).
    pub concurrency: usize,
    /// The open-loop rate as a share of the direct path's closed-loop rate.
    pub open_loop_fraction: f64,
    /// The light open-loop rate as a share of the direct path's closed-loop rate.
    pub light_fraction: f64,
    /// Long connections of the bulk phases.
    pub bulk_connections: usize,
    /// The systems, in the order of a round; must include `direct`.
    pub systems: Vec<System>,
    /// Worker threads of the client's runtime.
    pub client_threads: usize,
    /// Worker threads of the backends' runtime.
    pub backend_threads: usize,
    /// Bound on one connection (connect to end of response), and on bulk set-up.
    pub timeout: Duration,
    /// Closed-loop traffic after each bring-up, not measured.
    pub warmup: Duration,
    /// Other processes on the machine (not part of the benchmark) may use at most
    /// this much CPU, % of one CPU: before a window the benchmark waits for that (up
    /// to `quiet_wait`), and a window during which they used more is measured again
    /// (up to `attempts` times in all; the last attempt is kept and flagged).
    pub max_other_pct: f64,
    /// The longest wait for other processes to go quiet before a window.
    pub quiet_wait: Duration,
    /// Attempts per window.
    pub attempts: usize,
}

impl Default for Settings {
    fn default() -> Settings {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Settings {
            repeats: 3,
            duration: Duration::from_secs(10),
            concurrency: 64,
            open_loop_fraction: 0.5,
            light_fraction: 0.25,
            bulk_connections: 4,
            systems: System::DEFAULT.to_vec(),
            client_threads: cpus,
            backend_threads: cpus,
            timeout: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            max_other_pct: 20.0,
            quiet_wait: Duration::from_secs(120),
            attempts: 3,
        }
    }
}

/// What a window measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// New connections per second, closed loop.
    ConnRate,
    /// Latency at a fixed open-loop rate.
    Latency,
    /// Latency at a lighter fixed open-loop rate.
    LatencyLight,
    /// Bulk, backend to client.
    BulkDown,
    /// Bulk, client to backend.
    BulkUp,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 5] = [
        Phase::ConnRate,
        Phase::Latency,
        Phase::LatencyLight,
        Phase::BulkDown,
        Phase::BulkUp,
    ];

    /// The name in JSON and progress lines.
    pub fn name(self) -> &'static str {
        match self {
            Phase::ConnRate => "conn_rate",
            Phase::Latency => "latency",
            Phase::LatencyLight => "latency_light",
            Phase::BulkDown => "bulk_down",
            Phase::BulkUp => "bulk_up",
        }
    }
}

/// The connection figures of a [`Phase::ConnRate`] or [`Phase::Latency`] window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConnFigures {
    /// Connections completed in the window.
    pub ok: u64,
    /// Failed connections by kind.
    pub errors: BTreeMap<String, u64>,
    /// Completed connections per second.
    pub rate: f64,
    /// Open loop: the scheduled rate.
    pub offered_rate: Option<f64>,
    /// Latency quantiles of completed connections, milliseconds.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    /// Open loop: the 99th percentile of how late connections started, ms.
    pub lag_p99_ms: Option<f64>,
    /// Completed connections by backend.
    pub per_backend: Vec<u64>,
    /// Open loop: each second's connections, p99 and largest latency and largest
    /// start lag, ms (a steady tail or a stall).
    pub seconds: Vec<traffic::SecondStats>,
}

/// The figures of a bulk window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BulkFigures {
    /// Bytes delivered in the window (received by the client for `down`, by the
    /// backends for `up`).
    pub bytes: u64,
    /// The same in Gbit/s.
    pub gbit_s: f64,
}

/// One measured window.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRecord {
    /// Round, from 1.
    pub round: usize,
    pub system: System,
    pub phase: Phase,
    /// The traffic window, seconds.
    pub duration_s: f64,
    /// For connection phases.
    pub conns: Option<ConnFigures>,
    /// For bulk phases.
    pub bulk: Option<BulkFigures>,
    /// The CPU during the window.
    pub cpu: CpuUsage,
    /// XDP only: how the datapath's counters (`lb status --json`) moved.
    pub datapath: Option<BTreeMap<String, u64>>,
    /// Which attempt this window was (see [`Settings::max_other_pct`]).
    pub attempt: usize,
}

/// Everything a benchmark produced.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub records: Vec<RunRecord>,
    /// Runs that failed, with why.
    pub failures: Vec<String>,
    /// The direct path's closed-loop rate of each round (index 0 is round 1), which
    /// the open-loop rates are fractions of, connections/s.
    pub direct_rates: Vec<Option<f64>>,
    /// Seconds the whole benchmark took.
    pub wall_s: f64,
    /// The XDP program's cost per path under `BPF_PROG_TEST_RUN`, measured at the
    /// start of the run on the agent's configuration (when `xdp` runs): the prices
    /// of `bench_mix_ns_per_packet`.
    pub path_costs: Option<crate::pathcost::Measured>,
}

/// Everything a window needs.
struct Bench<'a> {
    settings: &'a Settings,
    topo: &'a Topology,
    dir: &'a Path,
    config: &'a Path,
    backends: &'a Backends,
    client: &'a Client,
}

/// Runs the whole benchmark; `say` gets one line per window (and per failure).
pub fn run(settings: &Settings, say: &mut dyn FnMut(&str)) -> Result<Outcome> {
    ensure!(
        settings.systems.contains(&System::Direct),
        "the systems must include direct: it is the baseline and sets the open-loop rate"
    );
    ensure!(settings.repeats >= 1, "at least one repeat");
    systems::check_programs(&settings.systems)?;
    let started = Instant::now();
    let topo = Topology::build(BACKENDS).context("building the test network")?;
    // The same name as the agent's configuration folder of the other harness runs, so
    // that the exit-time cleanup of this process finds it.
    let dir = std::env::temp_dir().join(format!("{}-lb", topo.prefix()));
    std::fs::create_dir_all(&dir)?;
    let result = run_on(settings, &topo, &dir, say);
    let _ = std::fs::remove_dir_all(&dir);
    let mut outcome = result?;
    outcome.wall_s = started.elapsed().as_secs_f64();
    Ok(outcome)
}

fn run_on(
    settings: &Settings,
    topo: &Topology,
    dir: &Path,
    say: &mut dyn FnMut(&str),
) -> Result<Outcome> {
    // Many short connections from one client address: a wide port range everywhere
    // (the proxies connect out from the load balancer too).
    for host in topo.hosts() {
        host.ns()
            .sysctl(&[("net/ipv4/ip_local_port_range", "10000 65000")])?;
    }
    // The bridge is the wire: with br_netfilter in the kernel, every bridged frame
    // would also pass the (empty) iptables hooks of the switch namespace, a cost no
    // real switch has and one that paths with more hops pay more often.
    for key in [
        "net/bridge/bridge-nf-call-iptables",
        "net/bridge/bridge-nf-call-ip6tables",
        "net/bridge/bridge-nf-call-arptables",
    ] {
        if topo.switch().read_sysctl(key).is_ok() {
            topo.switch().sysctl(&[(key, "0")])?;
        }
    }
    let config = dir.join("lb.toml");
    std::fs::write(&config, systems::agent_config(topo, false))?;
    systems::route_nat_replies(topo)?;
    let backends = Backends::start(topo.backends(), settings.backend_threads)?;
    let client = Client::start(topo.client().ns(), settings.client_threads)?;
    let bench = Bench {
        settings,
        topo,
        dir,
        config: &config,
        backends: &backends,
        client: &client,
    };
    let mut outcome = Outcome::default();
    if settings.systems.contains(&System::Xdp) {
        say("path costs: the XDP program under BPF_PROG_TEST_RUN, the agent's configuration");
        match crate::pathcost::measure(&systems::agent_config(topo, false)) {
            Ok(m) => {
                say(&report::path_costs_line(&m));
                outcome.path_costs = Some(m);
            }
            Err(e) => fail(&mut outcome, say, format!("path costs: {e:#}")),
        }
    }
    for round in 1..=settings.repeats {
        let mut direct_rate = None;
        for &system in &settings.systems {
            let label = format!("round {round}/{} {}", settings.repeats, system.name());
            match bench.session(system, round, &[Phase::ConnRate], 0.0, &mut outcome, say) {
                Ok(()) => {
                    if system == System::Direct {
                        direct_rate = outcome
                            .records
                            .last()
                            .and_then(|r| r.conns.as_ref())
                            .map(|c| c.rate);
                    }
                }
                Err(e) => fail(&mut outcome, say, format!("{label} conn_rate: {e:#}")),
            }
        }
        outcome.direct_rates.push(direct_rate);
        let Some(direct_rate) = direct_rate.filter(|r| *r > 0.0) else {
            fail(
                &mut outcome,
                say,
                format!("round {round}: no direct rate, so no open-loop and bulk runs"),
            );
            continue;
        };
        for &system in &settings.systems {
            let label = format!("round {round}/{} {}", settings.repeats, system.name());
            let phases = [
                Phase::Latency,
                Phase::LatencyLight,
                Phase::BulkDown,
                Phase::BulkUp,
            ];
            if let Err(e) = bench.session(system, round, &phases, direct_rate, &mut outcome, say) {
                fail(&mut outcome, say, format!("{label}: {e:#}"));
            }
        }
    }
    Ok(outcome)
}

fn fail(outcome: &mut Outcome, say: &mut dyn FnMut(&str), message: String) {
    say(&format!("FAILED {message}"));
    outcome.failures.push(message);
}

impl Bench<'_> {
    /// Brings `system` up, warms it up, measures `phases` and tears it down;
    /// `direct_rate` is the direct path's closed-loop rate of the round (the open
    /// loops' rates are fractions of it).
    fn session(
        &self,
        system: System,
        round: usize,
        phases: &[Phase],
        direct_rate: f64,
        outcome: &mut Outcome,
        say: &mut dyn FnMut(&str),
    ) -> Result<()> {
        let running = Running::start(system, self.topo, self.dir, self.config)?;
        let s = self.settings;
        let measured = (|| -> Result<()> {
            self.wait_for_quiet(say)?;
            self.warm_up(&running)?;
            for &phase in phases {
                for attempt in 1..=s.attempts.max(1) {
                    if attempt > 1 {
                        self.wait_for_quiet(say)?;
                    }
                    let mut record = self.measure(&running, round, phase, direct_rate)?;
                    record.attempt = attempt;
                    let line = report::progress_line(&record, s.repeats);
                    let other = record.other_processes_pct();
                    if other <= s.max_other_pct {
                        say(&line);
                    } else if attempt < s.attempts {
                        say(&format!(
                            "{line}\n        other processes used {other:.0} % of one CPU \
                             (limit {:.0} %): measuring again",
                            s.max_other_pct
                        ));
                        continue;
                    } else {
                        say(&format!(
                            "{line}\n        other processes used {other:.0} % of one CPU \
                             in every attempt: kept",
                        ));
                    }
                    outcome.records.push(record);
                    break;
                }
            }
            Ok(())
        })();
        let stopped = running.stop();
        measured.and(stopped)
    }

    /// Waits until processes that are not part of the benchmark use at most
    /// [`Settings::max_other_pct`] of a CPU (measured over half a second while no
    /// traffic runs), or [`Settings::quiet_wait`] has passed.
    fn wait_for_quiet(&self, say: &mut dyn FnMut(&str)) -> Result<()> {
        let s = self.settings;
        let meter = Meter {
            lb_ns: self.topo.lb().ns(),
            client: self.client.threads(),
            backends: self.backends.threads(),
            xdp: None,
        };
        let deadline = Instant::now() + s.quiet_wait;
        let mut waiting = false;
        loop {
            let before = meter.read()?;
            std::thread::sleep(Duration::from_millis(500));
            let usage = meter.read()?.since(&before);
            let other = 100.0 * usage.other_processes_s() / usage.wall_s.max(1e-9);
            if other <= s.max_other_pct {
                return Ok(());
            }
            if Instant::now() >= deadline {
                say(&format!(
                    "other processes still use {other:.0} % of one CPU after {:?}: \
                     measuring anyway",
                    s.quiet_wait
                ));
                return Ok(());
            }
            if !waiting {
                say(&format!(
                    "waiting for other processes to go quiet ({other:.0} % of one CPU)"
                ));
                waiting = true;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Closed-loop traffic that must all succeed and reach every backend.
    fn warm_up(&self, running: &Running) -> Result<()> {
        let s = self.settings;
        let report = self.client.closed_loop(
            &running.targets(APP_PORT),
            s.concurrency,
            s.warmup,
            s.timeout,
        );
        let reached = report.per_backend.iter().filter(|&&n| n > 0).count();
        ensure!(
            report.failed() == 0 && reached == BACKENDS,
            "warm-up through {}: {} ok, errors {:?}, per backend {:?}",
            running.system().name(),
            report.ok,
            report.errors,
            report.per_backend
        );
        Ok(())
    }

    /// Measures one window of `phase` through `running`.
    fn measure(
        &self,
        running: &Running,
        round: usize,
        phase: Phase,
        direct_rate: f64,
    ) -> Result<RunRecord> {
        let s = self.settings;
        let rate = match phase {
            Phase::Latency => direct_rate * s.open_loop_fraction,
            Phase::LatencyLight => direct_rate * s.light_fraction,
            _ => 0.0,
        };
        let meter = Meter {
            lb_ns: self.topo.lb().ns(),
            client: self.client.threads(),
            backends: self.backends.threads(),
            xdp: running.xdp(),
        };
        let mut record = RunRecord {
            round,
            system: running.system(),
            phase,
            duration_s: s.duration.as_secs_f64(),
            conns: None,
            bulk: None,
            cpu: CpuUsage::default(),
            datapath: None,
            attempt: 1,
        };
        let counters_before = running.datapath_counters();
        match phase {
            Phase::ConnRate | Phase::Latency | Phase::LatencyLight => {
                let targets = running.targets(APP_PORT);
                let before = meter.read()?;
                let report = if phase == Phase::ConnRate {
                    self.client
                        .closed_loop(&targets, s.concurrency, s.duration, s.timeout)
                } else {
                    // The same schedule for every system of a round.
                    let seed = 0x7665_7273_7573 ^ round as u64 ^ ((phase as u64) << 32);
                    self.client
                        .open_loop(&targets, rate, s.duration, seed, s.timeout)
                };
                let after = meter.read()?;
                record.cpu = after.since(&before);
                record.conns = Some(conn_figures(&report, phase, rate, s.duration));
            }
            Phase::BulkDown | Phase::BulkUp => {
                let direction = if phase == Phase::BulkDown {
                    Direction::Down
                } else {
                    Direction::Up
                };
                let bulk = self.client.start_bulk(
                    direction,
                    &running.targets(direction.port()),
                    s.bulk_connections,
                    s.timeout,
                )?;
                let bytes = || match direction {
                    Direction::Down => bulk.received(),
                    Direction::Up => self.backends.up_bytes(),
                };
                std::thread::sleep(BULK_WARMUP);
                let before = meter.read()?;
                let b0 = bytes();
                std::thread::sleep(s.duration);
                let b1 = bytes();
                let after = meter.read()?;
                let errors = self.client.stop_bulk(bulk);
                if !errors.is_empty() {
                    bail!("bulk {} connections failed: {errors:?}", direction.name());
                }
                record.cpu = after.since(&before);
                let delivered = b1.saturating_sub(b0);
                record.bulk = Some(BulkFigures {
                    bytes: delivered,
                    gbit_s: delivered as f64 * 8.0 / record.cpu.wall_s.max(1e-9) / 1e9,
                });
                record.duration_s = record.cpu.wall_s;
            }
        }
        if let (Some(before), Some(after)) = (counters_before, running.datapath_counters()) {
            record.datapath = Some(counter_deltas(&before, &after));
        }
        Ok(record)
    }
}

fn conn_figures(report: &ConnReport, phase: Phase, rate: f64, duration: Duration) -> ConnFigures {
    let ms = |v: Option<f64>| v.map(|s| s * 1e3);
    let open = matches!(phase, Phase::Latency | Phase::LatencyLight);
    let d = duration.as_secs_f64();
    ConnFigures {
        ok: report.ok,
        errors: report.errors.clone(),
        rate: report.ok as f64 / d,
        offered_rate: open
            .then(|| report.scheduled as f64 / d)
            .filter(|_| rate > 0.0),
        p50_ms: ms(report.latency(0.5)),
        p99_ms: ms(report.latency(0.99)),
        p999_ms: ms(report.latency(0.999)),
        lag_p99_ms: if open { ms(report.lag(0.99)) } else { None },
        per_backend: report.per_backend.clone(),
        seconds: report.seconds.clone(),
    }
}

/// How each numeric counter moved from `before` to `after` (JSON objects of
/// numbers, as `lb status --json` gives the datapath's counters).
pub fn counter_deltas(before: &Value, after: &Value) -> BTreeMap<String, u64> {
    let Some(after) = after.as_object() else {
        return BTreeMap::new();
    };
    after
        .iter()
        .filter_map(|(k, v)| {
            let now = v.as_u64()?;
            let then = before.get(k).and_then(Value::as_u64).unwrap_or(0);
            Some((k.clone(), now.saturating_sub(then)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_deltas_take_numbers_only() {
        let before = serde_json::json!({"tx": 10, "rx_frames": 4, "name": "x"});
        let after = serde_json::json!({"tx": 25, "rx_frames": 4, "new": 3, "name": "y"});
        let d = counter_deltas(&before, &after);
        assert_eq!(d["tx"], 15);
        assert_eq!(d["rx_frames"], 0);
        assert_eq!(d["new"], 3);
        assert!(!d.contains_key("name"));
    }
}
