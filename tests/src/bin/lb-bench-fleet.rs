//! `lb-bench-fleet`: a fleet of LBs behind an ECMP router, coordinated through a real
//! etcd (`lb_tests::fleet`), against one LB under the same load in the same run.
//!
//! ```text
//! LB_BIN=... lb-bench-fleet [--lbs 3] [--duration 60] [--outage 30] [--interval-ms 500]
//!     [--lease-s 2] [--seed 1] [--loss-s 90] [--cpu-rate 300]
//! ```
//!
//! 1. One LB alone (no `[cluster]`), scenario S2 under `ai` (four equal backends, one
//!    4x slower from D/3 to 2D/3, 70 % load, one connection per request): its p99.
//! 2. The fleet, same scenario, same seed: its p99; every 100 ms, each LB's cluster
//!    status through its control socket (about a millisecond for all of them): the
//!    digest of each table its datapath reads (from the map's own memory) and its
//!    epochs. Hence the fraction of samples in which all LBs hold the same tables,
//!    and per epoch the time from the leader's publication to the last LB applying
//!    it (each LB's own clock; all on this host).
//! 3. Under steady load: the leader killed with SIGKILL (time to the next epoch from
//!    a new leader, failed connections); then etcd stopped for `--outage` seconds and
//!    started again (failed connections while it was down and until the fleet
//!    resumed).
//! 4. An LB leaving (issue 19), twice in fresh fleets of `--lbs` LBs (three backends,
//!    `ai`): with flow sharing (`share_listen` on each LB) and without. In each:
//!    first the agents' CPU (utime + stime of every agent, from `/proc/<pid>/stat`)
//!    over 10 s idle, then over 20 s of new connections at `--cpu-rate` per second
//!    (one request each); the idle rate is subtracted and the rest divided by the
//!    rate achieved, per 1,000 new flows per second. Then the scenario of
//!    `lb_tests::survive` for `--loss-s` seconds: backends slowed and recovered in
//!    steps so that `ai` moves weights, long-lived connections opened in waves every
//!    5 s (and 1 s before the end), short connections at 50/s; at `--loss-s` LB 0's
//!    route is withdrawn, and 10 s later the fraction of the long-lived connections
//!    established before that kept their backend is the survival. With sharing, the
//!    bytes sent per flow shared (summed over the LBs).
//!
//! Prints the figures and writes `target/bench/fleet.json` (or `$LB_BENCH_JSON`).
//! Needs root, and etcd (`cargo xtask setup` installs it).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_tests::fleet::{
    FleetSpec, FleetWorld, ShareCounts, agreed, cluster_status, cpu_seconds, leader, live,
    newest_epoch, node_name, wait_for, wait_sharing,
};
use lb_tests::spread::{Agent, socket_of};
use lb_tests::survive::{self, Event, Leave, LossSpec};
use lb_tests::testbed::loadgen::{LoadGen, LoadReport, LoadSpec, Outcome};
use lb_tests::testbed::scenario::{Change, Scenario};
use lb_userspace::api::{ClusterStatus, Request};
use lb_userspace::control;
use serde_json::json;

const USAGE: &str = "usage: lb-bench-fleet [--lbs N] [--duration SECONDS] [--outage SECONDS] \
    [--interval-ms MS] [--lease-s SECONDS] [--seed N] [--loss-s SECONDS] [--cpu-rate FLOWS_PER_S]";

struct Args {
    lbs: usize,
    duration: f64,
    outage: f64,
    interval_ms: u64,
    lease_s: u64,
    seed: u64,
    loss_s: f64,
    cpu_rate: f64,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        lbs: 3,
        duration: 60.0,
        outage: 30.0,
        interval_ms: 500,
        lease_s: 2,
        seed: 1,
        loss_s: 90.0,
        cpu_rate: 300.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(key) = it.next() {
        if key == "--help" || key == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it
            .next()
            .with_context(|| format!("{key} needs a value\n{USAGE}"))?;
        let number = |v: &str| -> Result<f64> {
            let x: f64 = v
                .parse()
                .with_context(|| format!("{key}: {v:?} is not a number"))?;
            if !(x.is_finite() && x > 0.0) {
                bail!("{key} must be positive");
            }
            Ok(x)
        };
        match key.as_str() {
            "--lbs" => a.lbs = number(&value)? as usize,
            "--duration" => a.duration = number(&value)?,
            "--outage" => a.outage = number(&value)?,
            "--interval-ms" => a.interval_ms = number(&value)? as u64,
            "--lease-s" => a.lease_s = number(&value)? as u64,
            "--seed" => a.seed = number(&value)? as u64,
            "--loss-s" => a.loss_s = number(&value)?,
            "--cpu-rate" => a.cpu_rate = number(&value)?,
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    if !(2..=9).contains(&a.lbs) {
        bail!("--lbs must be 2 to 9");
    }
    Ok(a)
}

fn spec(args: &Args, scenario: &Scenario, lbs: usize, cluster: bool) -> FleetSpec {
    FleetSpec {
        lbs,
        backends: scenario
            .backends
            .iter()
            .map(|b| (b.slots, b.service_time))
            .collect(),
        policy: "ai",
        interval_ms: args.interval_ms,
        lease_s: args.lease_s,
        tls: false,
        cluster,
    }
}

fn load_spec(world: &FleetWorld, scenario: &Scenario, seed: u64) -> LoadSpec {
    LoadSpec {
        rate: scenario.rate.clone(),
        seed,
        ..LoadSpec::new(world.vip(), 0.0, scenario.duration)
    }
}

/// Applies the scenario's events as their time comes, until the load ends; calls
/// `sample` every 100 ms meanwhile.
fn drive(world: &FleetWorld, scenario: &Scenario, load: &LoadGen, mut sample: impl FnMut()) {
    let mut next = 0;
    while !load.is_finished() {
        let t = load.origin().elapsed().as_secs_f64();
        while let Some(e) = scenario.events.get(next).filter(|e| e.at <= t) {
            match e.change {
                Change::Slowdown(f) => world.backends[e.backend].set_slowdown(f),
                Change::FailFast(on) => world.backends[e.backend].set_fail_fast(on),
            }
            next += 1;
        }
        let started = Instant::now();
        sample();
        std::thread::sleep(Duration::from_millis(100).saturating_sub(started.elapsed()));
    }
}

fn p99_ms(report: &LoadReport) -> f64 {
    report.latency_quantile(0.99).unwrap_or(f64::NAN) * 1000.0
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Failed requests scheduled within [from, to) seconds of the load's origin.
fn failed_between(report: &LoadReport, from: f64, to: f64) -> usize {
    report
        .records
        .iter()
        .filter(|r| (from..to).contains(&r.scheduled.as_secs_f64()))
        .filter(|r| matches!(r.outcome, Outcome::Err(_)))
        .count()
}

fn start_all(world: &FleetWorld) -> Result<Vec<Option<Agent>>> {
    (0..world.spec.lbs)
        .map(|i| world.start_lb(i).map(Some))
        .collect()
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let scenario = Scenario::get("S2", Duration::from_secs_f64(args.duration)).expect("S2");
    let started = Instant::now();

    // 1. One LB alone.
    eprintln!("fleet bench: one LB, S2, {} s", args.duration);
    let single = {
        let world = FleetWorld::build(spec(&args, &scenario, 1, false))?;
        let agent = world.start_lb(0)?;
        std::thread::sleep(Duration::from_secs(1));
        let load = LoadGen::start(&world.client, load_spec(&world, &scenario, args.seed))?;
        drive(&world, &scenario, &load, || {});
        let report = load.join()?;
        agent.stop()?;
        report
    };
    eprintln!("  {}", single.summary());

    // 2. The fleet, same load.
    eprintln!("fleet bench: {} LBs, S2, {} s", args.lbs, args.duration);
    let mut world = FleetWorld::build(spec(&args, &scenario, args.lbs, true))?;
    let mut agents = start_all(&world)?;
    wait_for(
        "the first epoch everywhere",
        Duration::from_secs(30),
        || agreed(&live(&agents), 1),
    )?;
    let load = LoadGen::start(&world.client, load_spec(&world, &scenario, args.seed))?;
    // Epochs published before the load (the first ones, while LBs were still starting)
    // are not counted in the lag.
    let window_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let mut samples = 0usize;
    let mut agreeing = 0usize;
    // epoch → (written by the leader, ms; applied by each LB, ms)
    let mut epochs: BTreeMap<u64, (u64, BTreeMap<usize, u64>)> = BTreeMap::new();
    // Sampled through the control sockets from this process: a sample of every LB
    // takes about a millisecond, so it is (nearly) one instant.
    let sockets: Vec<_> = (0..args.lbs)
        .map(|i| socket_of(&world.instance(i)))
        .collect();
    drive(&world, &scenario, &load, || {
        let statuses: Vec<Option<ClusterStatus>> = sockets
            .iter()
            .map(|s| control::request(s, Request::ClusterStatus).ok())
            .collect();
        if statuses.iter().all(Option::is_some) {
            samples += 1;
            let first = statuses[0].as_ref().map(|s| &s.tables_here);
            if statuses
                .iter()
                .all(|s| s.as_ref().map(|s| &s.tables_here) == first)
            {
                agreeing += 1;
            }
        }
        for (i, s) in statuses.into_iter().enumerate() {
            let Some(s) = s else { continue };
            epochs.entry(s.epoch_newest).or_default().0 = s.epoch_newest_written_ms;
            let applied = epochs.entry(s.epoch_applied).or_default();
            applied.1.entry(i).or_insert(s.epoch_applied_ms);
        }
    });
    let fleet = load.join()?;
    eprintln!("  {}", fleet.summary());
    let mut lags: Vec<f64> = epochs
        .values()
        .filter(|(written, applied)| *written >= window_ms && applied.len() == args.lbs)
        .map(|(written, applied)| {
            let last = applied.values().max().copied().unwrap_or(0);
            last.saturating_sub(*written) as f64
        })
        .collect();
    let epochs_measured = lags.len();
    let lag_p50 = quantile(&mut lags, 0.5);
    let lag_p99 = quantile(&mut lags, 0.99);

    // 3. Failover and outage under steady load.
    eprintln!(
        "fleet bench: leader killed, then etcd down {} s",
        args.outage
    );
    let rate = scenario.rate.as_ref()(0.0);
    let steady = LoadGen::start(
        &world.client,
        LoadSpec {
            seed: args.seed + 1,
            ..LoadSpec::new(world.vip(), rate, Duration::from_secs(3600))
        },
    )?;
    std::thread::sleep(Duration::from_secs(3));
    let lead = wait_for("one leader", Duration::from_secs(10), || {
        Ok(leader(&agents))
    })?;
    let killed = node_name(lead);
    let other = (lead + 1) % args.lbs;
    let (before, _) = newest_epoch(agents[other].as_ref().expect("alive"))?;
    let kill_at = steady.origin().elapsed().as_secs_f64();
    let t0 = Instant::now();
    agents[lead].take().expect("alive").kill(libc::SIGKILL)?;
    let failover = loop {
        let (n, by) = newest_epoch(agents[other].as_ref().expect("alive"))?;
        if n > before && by != killed {
            break t0.elapsed().as_secs_f64();
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("no new leader within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("  {killed} killed: next epoch from a new leader after {failover:.2} s");
    agents[lead] = Some(world.start_lb(lead)?);
    wait_for(
        "the restarted LB catches up",
        Duration::from_secs(30),
        || agreed(&live(&agents), before + 1),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let outage_at = steady.origin().elapsed().as_secs_f64();
    world.etcd.stop()?;
    std::thread::sleep(Duration::from_secs_f64(args.outage));
    world.etcd.restart()?;
    let resumed = wait_for("the fleet resumes", Duration::from_secs(60), || {
        agreed(&live(&agents), 1)
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let resumed_at = steady.origin().elapsed().as_secs_f64();
    steady.stop();
    let steady = steady.join()?;
    let kill_failed = failed_between(&steady, kill_at, outage_at);
    let outage_failed = failed_between(&steady, outage_at, resumed_at);
    eprintln!(
        "  failed connections: {kill_failed} around the kill, {outage_failed} through the outage \
         (resumed at epoch {resumed}); {}",
        steady.summary()
    );
    for a in agents.into_iter().flatten() {
        a.stop()?;
    }
    drop(world);

    // 4. An LB leaving, with flow sharing and without.
    let shared = lb_loss(&args, true)?;
    let unshared = lb_loss(&args, false)?;

    let interval_s = args.interval_ms as f64 / 1000.0;
    let agreement = if samples > 0 {
        agreeing as f64 / samples as f64
    } else {
        f64::NAN
    };
    let (p99, p99_single) = (p99_ms(&fleet), p99_ms(&single));
    let mut out = json!({
        "lbs": args.lbs,
        "scenario": "S2",
        "policy": "ai",
        "duration_s": args.duration,
        "interval_ms": args.interval_ms,
        "lease_s": args.lease_s,
        "p99_ms": p99,
        "p99_ms_single": p99_single,
        "p99_ratio": p99 / p99_single,
        "requests": fleet.total(),
        "requests_single": single.total(),
        "failed": fleet.failed(),
        "failed_single": single.failed(),
        "digest_agreement": agreement,
        "digest_samples": samples,
        "apply_lag_ms": {"p50": lag_p50, "p99": lag_p99, "epochs": epochs_measured},
        "failover_s": failover,
        "failover_limit_s": args.lease_s as f64 + interval_s,
        "kill_failed_connections": kill_failed,
        "outage_s": args.outage,
        "outage_failed_connections": outage_failed,
        "steady_requests": steady.total(),
        "goals": {
            "digest_agreement": agreement >= 0.99,
            "apply_lag_p99": lag_p99 <= 200.0,
            "failover": failover <= args.lease_s as f64 + interval_s,
            "no_failed_connections": kill_failed == 0 && outage_failed == 0,
            "p99_within_1_2x_single": p99 <= 1.2 * p99_single,
        },
        "wall_s": started.elapsed().as_secs_f64(),
    });
    // Phase 4's keys (one `json!` of everything would pass the macro's recursion limit).
    let loss = json!({
        "lb_loss_mechanism": "connection sharing",
        "lb_loss_survival": shared.survival.fraction(),
        "lb_loss_survival_without": unshared.survival.fraction(),
        "lb_loss_established": shared.survival.established,
        "lb_loss_established_without": unshared.survival.established,
        "lb_loss_detail": {
            "with": shared.survival.summary(),
            "without": unshared.survival.summary(),
            "table_changes": [shared.table_changes, unshared.table_changes],
            "short_failed": [shared.short_failed, unshared.short_failed],
            "short_requests": [shared.short_requests, unshared.short_requests],
            "loss_s": args.loss_s,
        },
        "sync_bytes_per_flow": shared.share.bytes_per_flow(),
        "sync_flows_sent": shared.share.flows_sent,
        "sync_bytes_sent": shared.share.bytes_sent,
        "sync_flows_inserted": shared.share.flows_inserted,
        "sync_dropped": shared.share.dropped,
        "sync_refused": shared.share.refused,
        "agent_cpu_per_1k_new_flows_per_s": shared.cpu.per_1k(),
        "agent_cpu_per_1k_new_flows_per_s_without": unshared.cpu.per_1k(),
        "agent_cpu_idle_baseline_subtracted": true,
        "agent_cpu_idle_s_per_s": [shared.cpu.idle, unshared.cpu.idle],
        "agent_cpu_busy_s_per_s": [shared.cpu.busy, unshared.cpu.busy],
        "agent_cpu_new_flows_per_s": [shared.cpu.rate, unshared.cpu.rate],
        "agent_cpu_method": "CPU seconds per second of all agents together (utime + stime \
            from /proc/<pid>/stat) during 20 s of new connections at a steady rate, minus \
            the same over 10 s idle just before in the same fleet, per 1,000 new flows per \
            second achieved; [with sharing, without] where a pair",
    });
    if let (Some(out), Some(loss)) = (out.as_object_mut(), loss.as_object()) {
        out.extend(loss.clone());
    }
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    let path = std::env::var_os("LB_BENCH_JSON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "target/bench/fleet.json".into());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// The agents' CPU around a steady rate of new flows.
struct Cpu {
    /// CPU seconds per second of all agents, idle and under the new flows.
    idle: f64,
    busy: f64,
    /// New flows per second achieved (requests scheduled / seconds).
    rate: f64,
}

impl Cpu {
    /// (busy - idle) per 1,000 new flows per second.
    fn per_1k(&self) -> f64 {
        (self.busy - self.idle) / (self.rate / 1000.0)
    }
}

/// What one LB-loss run gave.
struct Loss {
    survival: lb_tests::survive::Survival,
    table_changes: usize,
    short_failed: usize,
    short_requests: usize,
    share: ShareCounts,
    cpu: Cpu,
}

/// CPU seconds of every running agent, summed.
fn agents_cpu(agents: &[Option<Agent>]) -> Result<f64> {
    live(agents).iter().map(|a| cpu_seconds(a.pid())).sum()
}

/// Phase 4 once: a fresh fleet, with flow sharing or without.
fn lb_loss(args: &Args, share: bool) -> Result<Loss> {
    let with = if share { "with" } else { "without" };
    eprintln!("fleet bench: an LB leaving, {with} flow sharing");
    let world = FleetWorld::build(FleetSpec {
        interval_ms: args.interval_ms,
        lease_s: args.lease_s,
        ..FleetSpec::new(args.lbs)
    })?;
    let mut agents: Vec<Option<Agent>> = (0..args.lbs)
        .map(|i| {
            let extra = if share {
                world.share_line(i)
            } else {
                String::new()
            };
            world.start_lb_with(i, &extra).map(Some)
        })
        .collect::<Result<_>>()?;
    wait_for(
        "the first epoch everywhere",
        Duration::from_secs(30),
        || agreed(&live(&agents), 1),
    )?;
    if share {
        wait_sharing(&live(&agents), args.lbs - 1, Duration::from_secs(30))?;
    }

    // The agents' CPU, idle and then under a steady rate of new flows.
    let idle_for = Duration::from_secs(10);
    let busy_for = Duration::from_secs(20);
    let (c0, t0) = (agents_cpu(&agents)?, Instant::now());
    std::thread::sleep(idle_for);
    let idle = (agents_cpu(&agents)? - c0) / t0.elapsed().as_secs_f64();
    let load = LoadGen::start(
        &world.client,
        LoadSpec {
            seed: args.seed + 2,
            ..LoadSpec::new(world.vip(), args.cpu_rate, busy_for)
        },
    )?;
    let (c1, t1) = (agents_cpu(&agents)?, Instant::now());
    while !load.is_finished() && load.origin().elapsed() < busy_for {
        std::thread::sleep(Duration::from_millis(50));
    }
    let busy = (agents_cpu(&agents)? - c1) / t1.elapsed().as_secs_f64();
    let report = load.join()?;
    let cpu = Cpu {
        idle,
        busy,
        rate: report.total() as f64 / busy_for.as_secs_f64(),
    };
    eprintln!(
        "  agents' CPU: {:.4} s/s idle, {:.4} s/s at {:.0} new flows/s ({} failed): {:.4} s/s \
         per 1,000 new flows/s",
        cpu.idle,
        cpu.busy,
        cpu.rate,
        report.failed(),
        cpu.per_1k()
    );

    // The scenario: LB 0's route withdrawn at `--loss-s`.
    let at = Duration::from_secs_f64(args.loss_s);
    let spec = LossSpec::moving(
        vec![Event {
            at,
            leave: Leave::Withdraw((1..args.lbs).collect()),
        }],
        Duration::from_secs(10),
        args.seed,
    );
    let run = survive::run(&world, &mut agents, &spec)?;
    let survival = run.survival(0);
    let statuses: Vec<ShareCounts> = live(&agents)
        .iter()
        .map(|a| cluster_status(a).map(|s| ShareCounts::of(&s)))
        .collect::<Result<_>>()?;
    let share_counts = ShareCounts::sum(&statuses);
    let table_changes = (0..args.lbs)
        .map(|i| run.table_changes(i))
        .max()
        .unwrap_or(0);
    let short_failed = run.short_failures().len();
    eprintln!(
        "  {with} sharing: {}; tables changed {table_changes} times; short: {}; share \
         {share_counts:?}",
        survival.summary(),
        run.short.summary()
    );
    if survival.kept < survival.established {
        eprintln!("{}", run.explain(&survival.lost));
    }
    world.stop_all(agents)?;
    Ok(Loss {
        survival,
        table_changes,
        short_failed,
        short_requests: run.short.total(),
        share: share_counts,
        cpu,
    })
}
