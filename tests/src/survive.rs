//! Issue 19's scenario: load balancers leave a fleet whose weights move, under
//! long-lived connections of every age and a steady stream of short ones. Run by
//! `tests/tests/fleet.rs` (`established_flows_survive_an_lb_leaving_and_one_killed`)
//! and by `cargo xtask bench fleet` (`lb_loss_survival`).
//!
//! [`run`] drives a [`FleetWorld`] whose agents are already started:
//! - backends are slowed and recovered in steps ([`Step`]), so that `ai` moves
//!   weights, and so tables, all along;
//! - long-lived connections ([`HoldClients`], one `GET /hold` each, pinging every
//!   200-500 ms) open in waves, every `wave_every` and one second before each event,
//!   so that at an event their ages range from a second to the whole run;
//! - short connections ([`LoadGen`], one request each) arrive at a steady rate;
//! - at each [`Event`]'s time the router stops sending to an LB (its route
//!   withdrawn), or an LB dies (its agent killed with SIGKILL and its route withdrawn
//!   at the same moment);
//! - every 500 ms, each live LB's epoch and table digests are sampled.
//!
//! Which LB the router sends each long-lived connection to is read from the router
//! itself ([`FleetWorld::routes_of`]) when the connection opens and just before and
//! after each event, so that a failure says which LB it was on and where it went.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::fleet::{FleetWorld, cluster_status, node_name};
use crate::spread::Agent;
use crate::testbed::hold::{Held, HoldClients, HoldSpec};
use crate::testbed::loadgen::{LoadGen, LoadReport, LoadSpec, Outcome};

/// A backend's slowdown factor set at a time (since the run's start).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    pub at: Duration,
    pub backend: usize,
    pub slowdown: f64,
}

/// An LB leaving.
#[derive(Clone, Debug, PartialEq)]
pub enum Leave {
    /// The router's route to the VIP goes over these LBs only (the others' routes
    /// withdrawn, as BGP does when an LB leaves gracefully); their agents run on.
    Withdraw(Vec<usize>),
    /// LB `lb` dies: its agent is killed (SIGKILL; its datapath stays, pinned) and
    /// the route goes over `route` only, at the same moment.
    Kill { lb: usize, route: Vec<usize> },
}

/// An LB leaving at a time (since the run's start).
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub at: Duration,
    pub leave: Leave,
}

impl Event {
    /// A name for messages: `withdraw lb-0` or `kill lb-1`.
    pub fn name(&self, lbs: usize) -> String {
        match &self.leave {
            Leave::Withdraw(route) => {
                let gone: Vec<String> = (0..lbs)
                    .filter(|i| !route.contains(i))
                    .map(node_name)
                    .collect();
                format!("route via {route:?} (withdrawn: {})", gone.join(", "))
            }
            Leave::Kill { lb, .. } => format!("kill {}", node_name(*lb)),
        }
    }
}

/// The scenario.
#[derive(Clone, Debug)]
pub struct LossSpec {
    /// How long the run lasts from its start (the last event must be before).
    pub duration: Duration,
    /// Long-lived connections opened per wave.
    pub wave_size: usize,
    /// Time between waves (waves stop at the last event).
    pub wave_every: Duration,
    /// Each long-lived connection's ping interval is drawn between these.
    pub ping: (Duration, Duration),
    /// New short connections per second, the whole run.
    pub short_rate: f64,
    /// Backend slowdowns over time.
    pub steps: Vec<Step>,
    /// LBs leaving, in time order.
    pub events: Vec<Event>,
    pub seed: u64,
}

impl LossSpec {
    /// The scenario of the test and the bench: `events`, the run ending `tail` after
    /// the last; waves of 10 connections every 5 s, each pinging every 200-500 ms,
    /// 50 short connections per second, and weights moving until the last event.
    pub fn moving(events: Vec<Event>, tail: Duration, seed: u64) -> LossSpec {
        let last = events.last().map_or(Duration::ZERO, |e| e.at);
        LossSpec {
            duration: last + tail,
            wave_size: 10,
            wave_every: Duration::from_secs(5),
            ping: (Duration::from_millis(200), Duration::from_millis(500)),
            short_rate: 50.0,
            steps: moving_weights(last),
            events,
            seed,
        }
    }
}

/// Slowdown steps over `span` for three or more backends: backend 0 degrades and
/// recovers, then backend 1, then backend 0 again, each in steps of `span / 16`, so
/// that `ai` keeps moving weights.
pub fn moving_weights(span: Duration) -> Vec<Step> {
    let factors: [(usize, f64); 16] = [
        (0, 3.0),
        (0, 8.0),
        (0, 15.0),
        (0, 6.0),
        (0, 1.0),
        (1, 4.0),
        (1, 12.0),
        (1, 5.0),
        (1, 1.0),
        (0, 10.0),
        (2, 6.0),
        (0, 2.0),
        (2, 12.0),
        (2, 3.0),
        (0, 1.0),
        (2, 1.0),
    ];
    factors
        .iter()
        .enumerate()
        .map(|(i, &(backend, slowdown))| Step {
            at: span.mul_f64((i + 1) as f64 / 17.0),
            backend,
            slowdown,
        })
        .collect()
}

/// One event as it happened.
#[derive(Clone, Debug)]
pub struct EventRecord {
    pub name: String,
    /// When it happened, since the run's start.
    pub at: Duration,
    /// The LB each open long-lived connection went to just before and just after,
    /// by connection id.
    pub before: BTreeMap<usize, Option<usize>>,
    pub after: BTreeMap<usize, Option<usize>>,
    /// The LBs the route goes over after it.
    pub route: Vec<usize>,
    /// Each LB's `cluster status` just before (None: not running).
    pub statuses: Vec<Option<Value>>,
}

/// One sample of an LB's tables.
#[derive(Clone, Debug)]
pub struct TableSample {
    pub at: Duration,
    pub lb: usize,
    pub epoch: u64,
    /// `tables_here`, as JSON text.
    pub tables: String,
}

/// Everything a run saw.
#[derive(Debug)]
pub struct LossRun {
    pub lbs: usize,
    pub held: Vec<Held>,
    /// The LB each long-lived connection went to when it opened, by id.
    pub at_open: BTreeMap<usize, Option<usize>>,
    pub events: Vec<EventRecord>,
    pub tables: Vec<TableSample>,
    /// The short connections; their times count from the load's own origin,
    /// `short_offset` after the run's start.
    pub short: LoadReport,
    pub short_offset: Duration,
    /// Each LB's last `cluster status` (for a killed LB: just before its death).
    pub last_status: Vec<Option<Value>>,
}

/// What happened to the long-lived connections established before an event.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Survival {
    /// Open before the event.
    pub established: usize,
    /// Of which kept their backend to the end.
    pub kept: usize,
    /// The others, by id.
    pub lost: Vec<usize>,
    /// Of the established, those the router sent to another LB at the event, and
    /// how many of those kept their backend.
    pub moved: usize,
    pub moved_kept: usize,
    /// Of the established, those opened under other tables than the ones in force
    /// at the event (the sampled tables of the first LB of the route after the
    /// event; LBs at one epoch hold the same tables): without flow sharing, only
    /// these can lose their backend when they change LB.
    pub other_table: usize,
    /// Those that both changed LB and were opened under other tables: the ones that
    /// only flow sharing (or luck) keeps on their backend.
    pub moved_other_table: usize,
    /// The youngest and oldest age at the event.
    pub ages: Option<(Duration, Duration)>,
}

impl Survival {
    /// kept / established (1 for none).
    pub fn fraction(&self) -> f64 {
        if self.established == 0 {
            1.0
        } else {
            self.kept as f64 / self.established as f64
        }
    }

    /// One line for messages.
    pub fn summary(&self) -> String {
        let age = |d: Duration| format!("{:.1}s", d.as_secs_f64());
        format!(
            "{}/{} kept their backend ({:.4}); {} changed LB ({} kept); {} opened under other \
             tables ({} of them changed LB); ages {}",
            self.kept,
            self.established,
            self.fraction(),
            self.moved,
            self.moved_kept,
            self.other_table,
            self.moved_other_table,
            self.ages
                .map_or("-".into(), |(lo, hi)| format!("{} to {}", age(lo), age(hi)))
        )
    }
}

impl LossRun {
    /// The long-lived connections established before event `e`, and what became
    /// of them.
    pub fn survival(&self, e: usize) -> Survival {
        let event = &self.events[e];
        let mut s = Survival::default();
        let mut ages: Vec<Duration> = Vec::new();
        for h in self.held.iter().filter(|h| h.open_before(event.at)) {
            s.established += 1;
            let kept = h.kept();
            if kept {
                s.kept += 1;
            } else {
                s.lost.push(h.id);
            }
            let (before, after) = (event.before.get(&h.id), event.after.get(&h.id));
            let moved = matches!((before, after), (Some(Some(b)), Some(Some(a))) if b != a);
            if moved {
                s.moved += 1;
                s.moved_kept += usize::from(kept);
            }
            let opened = h.opened.expect("open before");
            ages.push(event.at.saturating_sub(opened));
            if let Some(&lb) = event.route.first()
                && self.tables_at(lb, opened) != self.tables_at(lb, event.at)
            {
                s.other_table += 1;
                s.moved_other_table += usize::from(moved);
            }
        }
        s.ages = ages.iter().min().copied().zip(ages.iter().max().copied());
        s
    }

    /// The tables LB `lb` held at `t` (its last sample before), as JSON text.
    pub fn tables_at(&self, lb: usize, t: Duration) -> Option<&str> {
        self.tables
            .iter()
            .rev()
            .find(|s| s.lb == lb && s.at <= t)
            .map(|s| s.tables.as_str())
    }

    /// How many times LB `lb`'s tables changed between samples.
    pub fn table_changes(&self, lb: usize) -> usize {
        let seen: Vec<&str> = self
            .tables
            .iter()
            .filter(|s| s.lb == lb)
            .map(|s| s.tables.as_str())
            .collect();
        seen.windows(2).filter(|w| w[0] != w[1]).count()
    }

    /// The epochs LB `lb` applied during the run (first and last sampled).
    pub fn epochs(&self, lb: usize) -> Option<(u64, u64)> {
        let mut it = self.tables.iter().filter(|s| s.lb == lb).map(|s| s.epoch);
        let first = it.next()?;
        Some((first, it.next_back().unwrap_or(first)))
    }

    /// A line per connection of `ids`: what it saw and which LB it went to when it
    /// opened and around each event.
    pub fn explain(&self, ids: &[usize]) -> String {
        let lb = |x: Option<&Option<usize>>| match x {
            Some(Some(i)) => node_name(*i),
            _ => "?".into(),
        };
        let mut out = String::new();
        for &id in ids {
            let Some(h) = self.held.get(id) else { continue };
            out += &format!(
                "  {}; LB at open {}",
                h.describe(),
                lb(self.at_open.get(&id))
            );
            for e in &self.events {
                if e.before.contains_key(&id) || e.after.contains_key(&id) {
                    out += &format!(
                        "; at {:.1}s ({}) {} -> {}",
                        e.at.as_secs_f64(),
                        e.name,
                        lb(e.before.get(&id)),
                        lb(e.after.get(&id))
                    );
                }
            }
            out += "\n";
        }
        out
    }

    /// The short connections that failed: (scheduled time since the run's start,
    /// why).
    pub fn short_failures(&self) -> Vec<(Duration, String)> {
        self.short
            .records
            .iter()
            .filter_map(|r| match &r.outcome {
                Outcome::Err(kind) => Some((r.scheduled + self.short_offset, kind.to_string())),
                Outcome::Ok(_) => None,
            })
            .collect()
    }
}

/// Runs the scenario on `world`, whose agents (`agents[i]` is LB `i`) are running
/// and agree; a killed LB's agent is taken out of `agents`.
pub fn run(world: &FleetWorld, agents: &mut [Option<Agent>], spec: &LossSpec) -> Result<LossRun> {
    let lbs = world.spec.lbs;
    let holds = HoldClients::start(
        &world.client,
        HoldSpec {
            interval: spec.ping,
            seed: spec.seed,
            ..HoldSpec::new(world.vip())
        },
    )?;
    let start = holds.origin();
    let load = LoadGen::start(
        &world.client,
        LoadSpec {
            timeout: Duration::from_secs(5),
            seed: spec.seed,
            ..LoadSpec::new(world.vip(), spec.short_rate, spec.duration)
        },
    )?;
    let short_offset = load.origin().saturating_duration_since(start);
    let last_event = spec.events.last().map_or(spec.duration, |e| e.at);
    let mut waves: Vec<Duration> = std::iter::successors(Some(Duration::ZERO), |t| {
        Some(*t + spec.wave_every).filter(|t| *t < last_event)
    })
    .collect();
    waves.extend(
        spec.events
            .iter()
            .map(|e| e.at.saturating_sub(Duration::from_secs(1))),
    );
    waves.sort();
    let mut waves = waves.into_iter().peekable();
    let mut steps = spec.steps.iter().peekable();
    let mut events = spec.events.iter().peekable();
    let mut records = Vec::new();
    let mut at_open = BTreeMap::new();
    let mut tables = Vec::new();
    let mut last_status: Vec<Option<Value>> = vec![None; lbs];
    let mut next_sample = Duration::ZERO;
    let routes = |ids_ports: &[(usize, u16)]| -> Result<BTreeMap<usize, Option<usize>>> {
        let ports: Vec<u16> = ids_ports.iter().map(|(_, p)| *p).collect();
        let lbs = world.routes_of(&ports)?;
        Ok(ids_ports.iter().map(|(id, _)| *id).zip(lbs).collect())
    };
    loop {
        let tick = Instant::now();
        let t = start.elapsed();
        if t >= spec.duration {
            break;
        }
        // Sampled first, so that a connection opened in this tick finds the tables
        // it opened under.
        if t >= next_sample {
            next_sample = t + Duration::from_millis(500);
            for (lb, a) in agents.iter().enumerate() {
                let Some(status) = a.as_ref().and_then(|a| cluster_status(a).ok()) else {
                    continue;
                };
                tables.push(TableSample {
                    at: start.elapsed(),
                    lb,
                    epoch: status["epoch_applied"].as_u64().unwrap_or(0),
                    tables: status["tables_here"].to_string(),
                });
                last_status[lb] = Some(status);
            }
        }
        while let Some(s) = steps.next_if(|s| s.at <= t) {
            world.backends[s.backend].set_slowdown(s.slowdown);
        }
        if waves.next_if(|w| *w <= t).is_some() {
            while waves.next_if(|w| *w <= t).is_some() {}
            let ids = holds.open(spec.wave_size)?;
            let ports: Vec<(usize, u16)> = holds.with(|all| {
                ids.iter()
                    .filter_map(|&id| all[id].local_port.map(|p| (id, p)))
                    .collect()
            });
            at_open.extend(routes(&ports)?);
        }
        if let Some(e) = events.next_if(|e| e.at <= t) {
            let statuses: Vec<Option<Value>> = agents
                .iter()
                .map(|a| a.as_ref().and_then(|a| cluster_status(a).ok()))
                .collect();
            for (last, s) in last_status.iter_mut().zip(&statuses) {
                if s.is_some() {
                    last.clone_from(s);
                }
            }
            let open = holds.open_now();
            let before = routes(&open)?;
            let at = start.elapsed();
            match &e.leave {
                Leave::Withdraw(route) => world.route_via(route)?,
                Leave::Kill { lb, route } => {
                    let agent = agents[*lb]
                        .take()
                        .with_context(|| format!("{} is not running", node_name(*lb)))?;
                    // The host dies: its agent and its route go at the same moment,
                    // so the route changes before the agent is reaped; `kill` then
                    // sends the (harmless) second SIGKILL and waits for the exit.
                    // SAFETY: a signal to our own child.
                    unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
                    world.route_via(route)?;
                    agent.kill(libc::SIGKILL)?;
                }
            }
            let after = routes(&open)?;
            let route = match &e.leave {
                Leave::Withdraw(route) | Leave::Kill { route, .. } => route.clone(),
            };
            records.push(EventRecord {
                name: e.name(lbs),
                at,
                before,
                after,
                route,
                statuses,
            });
        }
        std::thread::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed()));
    }
    load.stop();
    let short = load.join()?;
    let held = holds.stop()?;
    Ok(LossRun {
        lbs,
        held,
        at_open,
        events: records,
        tables,
        short,
        short_offset,
        last_status,
    })
}
