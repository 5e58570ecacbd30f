//! The figures of a testbed run, their medians over repeats, and the outputs: a
//! Markdown report, a JSON file with every figure, and hand-written SVG plots.
//!
//! Definitions (per run):
//! - **latency p50 / p99 / p99.9**: of the successful requests, from their
//!   *scheduled* start (the load is open-loop) to the end of the response.
//! - **p99 all**: the 99th percentile over every request, a failed one counting as
//!   slower than any success (so "failed" once more than 1 % fail): a policy
//!   cannot improve it by failing its slowest requests, as it can the p99 of
//!   successes.
//! - **error rate**: failed requests (timeout, reset, refused, non-200) / all.
//! - **utilisation**: a backend's busy slot-seconds during the load's schedule /
//!   (its slots × the schedule's length); the maximum and the mean over backends.
//! - **reaction time** (S2, S3): for each slowdown after the start, the seconds from
//!   the slowdown until the slowed backends' share of new flows, over a 2-second
//!   window of the agent's `new_flows` counters that starts after the slowdown, is at
//!   most 1.1 × their new share of capacity (each of them); `None` when that does not
//!   happen before the next change. A run's figure is the worst of its slowdowns.
//!   The same from the agent's weights instead of its flow counters (no sampling
//!   noise) is reported as `reaction_weights_s`.
//! - **slots moved per minute**: for each pair of successive samples (1 s apart),
//!   the ideal share of the lookup table that moves between the two weight vectors
//!   (half the sum of absolute share changes) × 65537, summed and divided by the
//!   sampled minutes. Changes that reverse within one second are not seen. Also per
//!   third of the run (a pair counts in the third its later sample falls in): the
//!   phases of S2 and S5 are thirds (steady, changed, recovered).
//! - **non-SYN misses**: the datapath's `conn_miss_non_syn` at the end of the run
//!   (each run has a fresh agent and datapath).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lb_userspace::core::policy::Variant;
use serde_json::{Value, json};

use super::scenario::{RunData, Sample, Scenario, TABLE_SIZE};
use super::{median, secs};

/// The figures of one run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunMetrics {
    /// Requests scheduled.
    pub requests: usize,
    /// Requests answered with 200.
    pub ok: usize,
    /// Failed / all.
    pub error_rate: f64,
    /// Failures by kind.
    pub errors: BTreeMap<String, usize>,
    /// Latency quantiles of successful requests, seconds.
    pub p50_s: Option<f64>,
    pub p99_s: Option<f64>,
    pub p999_s: Option<f64>,
    /// p99 over all requests, failures counting as infinitely slow; `None` when it
    /// falls on a failure.
    pub p99_all_s: Option<f64>,
    /// Utilisation of each backend, 0..=1.
    pub utilisation: Vec<f64>,
    /// Largest and mean utilisation.
    pub util_max: f64,
    pub util_mean: f64,
    /// Reaction time from flow counters (see the module docs), seconds.
    pub reaction_s: Option<f64>,
    /// Each measured slowdown's reaction time, in order.
    pub reactions_s: Vec<Option<f64>>,
    /// Reaction time from the agent's weights, seconds.
    pub reaction_weights_s: Option<f64>,
    /// Lookup-table slots moved per minute.
    pub slots_moved_per_min: f64,
    /// The same in each third of the run.
    pub slots_moved_per_min_by_third: [f64; 3],
    /// Non-SYN connection-table misses.
    pub conn_miss_non_syn: u64,
    /// Backend-seconds the agent called a backend unhealthy (samples × backends).
    pub unhealthy_samples: usize,
    /// Offered rate, requests per second.
    pub offered_rate: f64,
    /// The generator's largest and mean start lag, seconds.
    pub max_lag_s: f64,
    pub mean_lag_s: f64,
    /// Successful requests by backend.
    pub per_backend: BTreeMap<String, usize>,
}

/// Whether a scenario has slowdowns whose reaction is measured.
pub fn measures_reaction(scenario: &Scenario) -> bool {
    !scenario.degradations().is_empty()
}

/// Each backend's share of new flows between samples `a` and `b`; `None` without
/// new flows.
fn flow_shares(a: &Sample, b: &Sample) -> Option<Vec<f64>> {
    let deltas: Vec<f64> = a
        .backends
        .iter()
        .zip(&b.backends)
        .map(|(x, y)| y.new_flows.saturating_sub(x.new_flows) as f64)
        .collect();
    let total: f64 = deltas.iter().sum();
    (total > 0.0).then(|| deltas.iter().map(|d| d / total).collect())
}

/// Each backend's share of the total weight at a sample; `None` if all are 0.
fn weight_shares(s: &Sample) -> Option<Vec<f64>> {
    let total: f64 = s.backends.iter().map(|b| b.weight).sum();
    (total > 0.0).then(|| s.backends.iter().map(|b| b.weight / total).collect())
}

/// Reaction times of every measured slowdown: `by_flows` picks the flow-counter
/// definition, else the weight one.
fn reactions(scenario: &Scenario, samples: &[Sample], by_flows: bool) -> Vec<Option<f64>> {
    const WINDOW: f64 = 2.0;
    const TOLERANCE: f64 = 1.1;
    scenario
        .degradations()
        .into_iter()
        .map(|(at, slowed, end)| {
            let target = scenario.capacity_shares_at(at);
            let reached = |shares: &[f64]| {
                slowed
                    .iter()
                    .all(|&b| shares.get(b).is_some_and(|s| *s <= TOLERANCE * target[b]))
            };
            for (j, b) in samples.iter().enumerate() {
                if b.t < at || b.t > end + 0.5 {
                    continue;
                }
                let shares = if by_flows {
                    // The first sample at least WINDOW before b that is after `at`.
                    let Some(a) = samples[..j]
                        .iter()
                        .rev()
                        .find(|a| a.t >= at - 0.05 && b.t - a.t >= WINDOW - 0.3)
                    else {
                        continue;
                    };
                    flow_shares(a, b)
                } else {
                    weight_shares(b)
                };
                if shares.is_some_and(|s| reached(&s)) {
                    return Some(b.t - at);
                }
            }
            None
        })
        .collect()
}

/// The worst of several reaction times; `None` if any is `None` or there is none.
fn worst(r: &[Option<f64>]) -> Option<f64> {
    if r.is_empty() {
        return None;
    }
    r.iter().try_fold(0.0f64, |acc, x| x.map(|x| acc.max(x)))
}

impl RunMetrics {
    /// Computes the figures of `run` of `scenario`.
    pub fn compute(scenario: &Scenario, run: &RunData) -> RunMetrics {
        let load = &run.load;
        let utilisation: Vec<f64> = run
            .busy_slot_s
            .iter()
            .zip(&run.specs)
            .map(|(busy, spec)| busy / (spec.slots as f64 * run.window_s.max(1e-9)))
            .collect();
        let util_max = utilisation.iter().copied().fold(0.0, f64::max);
        let util_mean = utilisation.iter().sum::<f64>() / utilisation.len().max(1) as f64;
        let (start, end) = match (run.samples.first(), run.samples.last()) {
            (Some(a), Some(b)) if b.t > a.t => (a.t, b.t),
            _ => (0.0, 60.0),
        };
        let span_min = (end - start) / 60.0;
        let mut moved = 0.0;
        let mut by_third = [0.0; 3];
        for pair in run.samples.windows(2) {
            if let (Some(a), Some(b)) = (weight_shares(&pair[0]), weight_shares(&pair[1])) {
                let share = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f64>() / 2.0;
                moved += share;
                let third = ((pair[1].t - start) / (end - start) * 3.0).ceil() as usize;
                by_third[third.clamp(1, 3) - 1] += share;
            }
        }
        let reactions_s = reactions(scenario, &run.samples, true);
        let latencies = load.ok_latencies();
        RunMetrics {
            requests: load.total(),
            ok: load.ok(),
            error_rate: load.error_rate(),
            errors: load.errors(),
            p50_s: super::quantile_sorted(&latencies, 0.5),
            p99_s: super::quantile_sorted(&latencies, 0.99),
            p999_s: super::quantile_sorted(&latencies, 0.999),
            p99_all_s: {
                let mut all = latencies.clone();
                all.resize(load.total(), f64::INFINITY);
                super::quantile_sorted(&all, 0.99).filter(|v| v.is_finite())
            },
            utilisation,
            util_max,
            util_mean,
            reaction_s: worst(&reactions_s),
            reactions_s,
            reaction_weights_s: worst(&reactions(scenario, &run.samples, false)),
            slots_moved_per_min: moved * TABLE_SIZE / span_min,
            slots_moved_per_min_by_third: by_third.map(|m| m * TABLE_SIZE / (span_min / 3.0)),
            conn_miss_non_syn: run.samples.last().map_or(0, |s| s.conn_miss_non_syn),
            unhealthy_samples: run
                .samples
                .iter()
                .flat_map(|s| &s.backends)
                .filter(|b| b.healthy == Some(false))
                .count(),
            offered_rate: load.offered_rate(),
            max_lag_s: load.max_lag(),
            mean_lag_s: load.mean_lag(),
            per_backend: load.per_backend(),
        }
    }

    /// The figures as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "requests": self.requests,
            "ok": self.ok,
            "error_rate": self.error_rate,
            "errors": self.errors,
            "p50_s": self.p50_s,
            "p99_s": self.p99_s,
            "p999_s": self.p999_s,
            "p99_all_s": self.p99_all_s,
            "utilisation": self.utilisation,
            "util_max": self.util_max,
            "util_mean": self.util_mean,
            "reaction_s": self.reaction_s,
            "reactions_s": self.reactions_s,
            "reaction_weights_s": self.reaction_weights_s,
            "slots_moved_per_min": self.slots_moved_per_min,
            "slots_moved_per_min_by_third": self.slots_moved_per_min_by_third,
            "conn_miss_non_syn": self.conn_miss_non_syn,
            "unhealthy_samples": self.unhealthy_samples,
            "offered_rate": self.offered_rate,
            "max_lag_s": self.max_lag_s,
            "mean_lag_s": self.mean_lag_s,
            "per_backend": self.per_backend,
        })
    }

    /// A one-line summary for the progress output.
    pub fn summary(&self) -> String {
        format!(
            "p50 {} p99 {} p99.9 {} err {:.2}% util max {:.0}% mean {:.0}% reaction {} moved {:.0}/min (thirds {:.0}/{:.0}/{:.0}) misses {} unhealthy {}",
            ms(self.p50_s),
            ms(self.p99_s),
            ms(self.p999_s),
            self.error_rate * 100.0,
            self.util_max * 100.0,
            self.util_mean * 100.0,
            self.reaction_s
                .map_or("-".to_owned(), |r| format!("{r:.1}s")),
            self.slots_moved_per_min,
            self.slots_moved_per_min_by_third[0],
            self.slots_moved_per_min_by_third[1],
            self.slots_moved_per_min_by_third[2],
            self.conn_miss_non_syn,
            self.unhealthy_samples
        )
    }
}

fn ms(s: Option<f64>) -> String {
    s.map_or("-".to_owned(), |s| format!("{:.1}ms", s * 1e3))
}

/// One finished run, with what is kept of it for the outputs.
pub struct RunRecord {
    pub scenario: &'static str,
    pub policy: Variant,
    /// 1-based.
    pub repeat: usize,
    pub seed: u64,
    pub metrics: RunMetrics,
    /// The run's time series, for plots and the JSON file.
    pub series: Value,
    /// Wall-clock seconds the run took, setup and teardown included.
    pub wall_s: f64,
}

impl RunRecord {
    /// Keeps the figures and time series of `run`.
    pub fn new(scenario: &Scenario, run: &RunData, repeat: usize, wall_s: f64) -> RunRecord {
        let metrics = RunMetrics::compute(scenario, run);
        let per_second: Vec<Value> = run
            .load
            .per_second()
            .iter()
            .map(|s| json!({"t": s.t, "requests": s.requests, "failed": s.failed, "p50_s": s.p50, "p99_s": s.p99}))
            .collect();
        let samples: Vec<Value> = run
            .samples
            .iter()
            .map(|s| {
                json!({
                    "t": s.t,
                    "weights": s.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
                    "new_flows": s.backends.iter().map(|b| b.new_flows).collect::<Vec<_>>(),
                    "healthy": s.backends.iter().map(|b| b.healthy).collect::<Vec<_>>(),
                    "latency_ms": s.backends.iter().map(|b| b.latency_ms).collect::<Vec<_>>(),
                    "predicted_ms": s.backends.iter().map(|b| b.predicted_ms).collect::<Vec<_>>(),
                    "conn_miss_non_syn": s.conn_miss_non_syn,
                })
            })
            .collect();
        let counts: Vec<Value> = run
            .counts
            .iter()
            .map(|c| {
                json!({
                    "accepted": c.accepted, "served": c.served, "failed": c.failed,
                    "probes": c.probes, "scrapes": c.scrapes, "busy_slot_s": c.busy_slot_s,
                })
            })
            .collect();
        RunRecord {
            scenario: run.scenario,
            policy: run.policy,
            repeat,
            seed: run.seed,
            metrics,
            series: json!({"per_second": per_second, "samples": samples, "backends": counts}),
            wall_s,
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "policy": self.policy.to_string(),
            "repeat": self.repeat,
            "seed": self.seed,
            "wall_s": self.wall_s,
            "metrics": self.metrics.to_json(),
            "series": self.series,
        })
    }
}

/// Medians over the repeats of one scenario × policy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub runs: usize,
    pub p50_s: Option<f64>,
    pub p99_s: Option<f64>,
    pub p999_s: Option<f64>,
    /// p99 over all requests, failures counting as infinitely slow; `None` when it
    /// falls on a failure.
    pub p99_all_s: Option<f64>,
    pub error_rate: Option<f64>,
    pub util_max: Option<f64>,
    pub util_mean: Option<f64>,
    /// `None` when the median run did not react in time (or nothing is measured).
    pub reaction_s: Option<f64>,
    pub reaction_weights_s: Option<f64>,
    /// How many of the runs reacted in time.
    pub reacted: usize,
    pub slots_moved_per_min: Option<f64>,
    /// Medians of each third's figure.
    pub slots_moved_per_min_by_third: [Option<f64>; 3],
    pub conn_miss_non_syn: Option<f64>,
}

/// The median of optional values where `None` counts as +infinity; `None` if the
/// median is infinite or there are no values.
fn median_inf(values: &[Option<f64>]) -> Option<f64> {
    let v: Vec<f64> = values.iter().map(|x| x.unwrap_or(f64::INFINITY)).collect();
    median(&v).filter(|m| m.is_finite())
}

impl Summary {
    /// Medians of `runs`.
    pub fn of(runs: &[&RunMetrics]) -> Summary {
        let m = |f: &dyn Fn(&RunMetrics) -> Option<f64>| {
            median(&runs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
        };
        Summary {
            runs: runs.len(),
            p50_s: m(&|r| r.p50_s),
            p99_s: m(&|r| r.p99_s),
            p999_s: m(&|r| r.p999_s),
            p99_all_s: median_inf(&runs.iter().map(|r| r.p99_all_s).collect::<Vec<_>>()),
            error_rate: m(&|r| Some(r.error_rate)),
            util_max: m(&|r| Some(r.util_max)),
            util_mean: m(&|r| Some(r.util_mean)),
            reaction_s: median_inf(&runs.iter().map(|r| r.reaction_s).collect::<Vec<_>>()),
            reaction_weights_s: median_inf(
                &runs
                    .iter()
                    .map(|r| r.reaction_weights_s)
                    .collect::<Vec<_>>(),
            ),
            reacted: runs.iter().filter(|r| r.reaction_s.is_some()).count(),
            slots_moved_per_min: m(&|r| Some(r.slots_moved_per_min)),
            slots_moved_per_min_by_third: [0, 1, 2]
                .map(|t| m(&|r| Some(r.slots_moved_per_min_by_third[t]))),
            conn_miss_non_syn: m(&|r| Some(r.conn_miss_non_syn as f64)),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "runs": self.runs,
            "p50_s": self.p50_s,
            "p99_s": self.p99_s,
            "p999_s": self.p999_s,
            "p99_all_s": self.p99_all_s,
            "error_rate": self.error_rate,
            "util_max": self.util_max,
            "util_mean": self.util_mean,
            "reaction_s": self.reaction_s,
            "reaction_weights_s": self.reaction_weights_s,
            "reacted": self.reacted,
            "slots_moved_per_min": self.slots_moved_per_min,
            "slots_moved_per_min_by_third": self.slots_moved_per_min_by_third,
            "conn_miss_non_syn": self.conn_miss_non_syn,
        })
    }
}

/// The settings of a whole bench run, for the report's header.
#[derive(Clone, Debug)]
pub struct Settings {
    pub scenarios: Vec<String>,
    pub repeats: usize,
    pub duration_s: f64,
    pub health_metrics: bool,
    pub quick: bool,
    pub wall_s: f64,
    pub host: String,
}

/// Where the outputs go: `<workspace>/target/bench/policies.md`, the plots under
/// `<workspace>/target/bench/policies/`, and the JSON at `$LB_BENCH_JSON` or
/// `<workspace>/target/bench/policies.json`.
pub struct OutputPaths {
    pub markdown: PathBuf,
    pub plots: PathBuf,
    pub json: PathBuf,
}

impl OutputPaths {
    pub fn default_paths() -> OutputPaths {
        let bench = Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(
            || PathBuf::from("target/bench"),
            |root| root.join("target/bench"),
        );
        let json = std::env::var_os("LB_BENCH_JSON")
            .map(PathBuf::from)
            .unwrap_or_else(|| bench.join("policies.json"));
        OutputPaths {
            markdown: bench.join("policies.md"),
            plots: bench.join("policies"),
            json,
        }
    }
}

/// Writes every output; returns the paths written.
pub fn write_all(
    settings: &Settings,
    scenarios: &[Scenario],
    records: &[RunRecord],
    failures: &[String],
    paths: &OutputPaths,
) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    std::fs::create_dir_all(&paths.plots)
        .with_context(|| format!("cannot create {}", paths.plots.display()))?;
    if let Some(parent) = paths.markdown.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if let Some(parent) = paths.json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut plots: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for scenario in scenarios {
        let runs: Vec<&RunRecord> = records
            .iter()
            .filter(|r| r.scenario == scenario.id)
            .collect();
        if runs.is_empty() {
            continue;
        }
        let name = format!("{}-latency.svg", scenario.id);
        std::fs::write(paths.plots.join(&name), latency_svg(scenario, &runs))?;
        written.push(paths.plots.join(&name));
        plots.entry(scenario.id).or_default().push(name);
        for policy in super::scenario::POLICIES {
            let Some(run) = runs.iter().find(|r| r.policy == policy) else {
                continue;
            };
            let name = format!("{}-{policy}-weights.svg", scenario.id);
            std::fs::write(paths.plots.join(&name), weights_svg(scenario, run))?;
            written.push(paths.plots.join(&name));
            plots.entry(scenario.id).or_default().push(name);
        }
    }
    let plots_rel = paths
        .plots
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::fs::write(
        &paths.markdown,
        markdown(settings, scenarios, records, failures, &plots, &plots_rel),
    )?;
    written.push(paths.markdown.clone());
    std::fs::write(
        &paths.json,
        serde_json::to_string_pretty(&json_doc(settings, scenarios, records, failures))?,
    )?;
    written.push(paths.json.clone());
    Ok(written)
}

/// The medians of every scenario × policy present in `records`.
pub fn summaries<'a>(
    scenarios: &'a [Scenario],
    records: &[RunRecord],
) -> Vec<(&'a Scenario, Variant, Summary)> {
    let mut out = Vec::new();
    for scenario in scenarios {
        for policy in super::scenario::POLICIES {
            let runs: Vec<&RunMetrics> = records
                .iter()
                .filter(|r| r.scenario == scenario.id && r.policy == policy)
                .map(|r| &r.metrics)
                .collect();
            if !runs.is_empty() {
                out.push((scenario, policy, Summary::of(&runs)));
            }
        }
    }
    out
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or("–".to_owned(), f)
}

/// The results table of one scenario, in Markdown.
pub fn table(scenario: &Scenario, rows: &[(Variant, Summary)]) -> String {
    let reaction = measures_reaction(scenario);
    let mut out = String::from(
        "| policy | runs | p50 ms | p99 ms | p99.9 ms | p99 all ms | errors % | util max % | util mean % |",
    );
    if reaction {
        out += " reaction s (flows) | reacted | reaction s (weights) |";
    }
    out += " slots moved/min | by third | non-SYN misses |\n|---|---|---|---|---|---|---|---|---|";
    if reaction {
        out += "---|---|---|";
    }
    out += "---|---|---|\n";
    for (policy, s) in rows {
        let _ = write!(
            out,
            "| {policy} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.runs,
            opt(s.p50_s, |v| format!("{:.1}", v * 1e3)),
            opt(s.p99_s, |v| format!("{:.1}", v * 1e3)),
            opt(s.p999_s, |v| format!("{:.1}", v * 1e3)),
            match (s.runs, s.p99_all_s) {
                (0, _) => "–".to_owned(),
                (_, Some(v)) => format!("{:.1}", v * 1e3),
                (_, None) => "failed".to_owned(),
            },
            opt(s.error_rate, |v| format!("{:.2}", v * 100.0)),
            opt(s.util_max, |v| format!("{:.0}", v * 100.0)),
            opt(s.util_mean, |v| format!("{:.0}", v * 100.0)),
        );
        if reaction {
            let _ = write!(
                out,
                " {} | {}/{} | {} |",
                opt(s.reaction_s, |v| format!("{v:.1}")),
                s.reacted,
                s.runs,
                opt(s.reaction_weights_s, |v| format!("{v:.1}")),
            );
        }
        let _ = writeln!(
            out,
            " {} | {} | {} |",
            opt(s.slots_moved_per_min, |v| format!("{v:.0}")),
            s.slots_moved_per_min_by_third
                .map(|t| opt(t, |v| format!("{v:.0}")))
                .join(" / "),
            opt(s.conn_miss_non_syn, |v| format!("{v:.0}")),
        );
    }
    out
}

fn markdown(
    settings: &Settings,
    scenarios: &[Scenario],
    records: &[RunRecord],
    failures: &[String],
    plots: &BTreeMap<&str, Vec<String>>,
    plots_rel: &str,
) -> String {
    let mut out = String::from("# Weight policies under load (issue 6)\n\n");
    let _ = writeln!(
        out,
        "Every scenario under `equal`, `static`, `reactive` and `ai`, interleaved, {} \
         repeat(s) of {:.0} s of load each{}; {} runs in {:.1} min on {}. The agent's \
         configuration {} the `[vip.health]` and `[vip.metrics]` sections.\n",
        settings.repeats,
        settings.duration_s,
        if settings.quick { " (--quick)" } else { "" },
        records.len(),
        settings.wall_s / 60.0,
        settings.host,
        if settings.health_metrics {
            "had"
        } else {
            "did not have"
        },
    );
    out += "Each figure is the median over the repeats. Latencies are of successful \
            requests, from their scheduled start (open-loop Poisson arrivals, one new \
            connection each, 2 s timeout); errors are timeouts, resets and non-200 \
            answers over all requests. \"p99 all\" is over every request, a failure \
            counting as slower than any success (\"failed\" once more than 1 % fail). \
            Utilisation is busy slot time over slot capacity \
            during the load. Reaction time: from a slowdown until every slowed backend's \
            share of new flows (2 s windows of the agent's counters) is at most 1.1 × its \
            new share of capacity; \"reacted\" counts the runs where that happened before \
            the next change. Slots moved: the ideal lookup-table share moved between \
            successive 1 s samples of the weights × 65537, per minute. Backends: slots of \
            50 ms, 4 slots = 80 req/s per capacity unit.\n\n";
    if !failures.is_empty() {
        out += "## Failed runs\n\n";
        for f in failures {
            let _ = writeln!(out, "- {f}");
        }
        out += "\n";
    }
    let all = summaries(scenarios, records);
    for scenario in scenarios {
        let rows: Vec<(Variant, Summary)> = all
            .iter()
            .filter(|(s, _, _)| s.id == scenario.id)
            .map(|(_, p, s)| (*p, s.clone()))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "## {}: {}\n\nLoad: {}. Backends: {}.{}\n",
            scenario.id,
            scenario.title,
            scenario.load,
            scenario
                .backends
                .iter()
                .map(|b| format!("{} ({} slots, {:.0} req/s)", b.name, b.slots, b.capacity()))
                .collect::<Vec<_>>()
                .join(", "),
            if scenario.series.is_empty() {
                String::new()
            } else {
                format!(" Series replayed: {}.", scenario.series.join(", "))
            }
        );
        out += &table(scenario, &rows);
        out += "\n";
        for plot in plots.get(scenario.id).into_iter().flatten() {
            let _ = writeln!(out, "![{plot}]({plots_rel}/{plot})");
        }
        out += "\n";
    }
    out
}

/// The headline medians keyed by scenario, then policy: `p99_ms`, `p99_all_ms` (null
/// when the p99 falls on a failure), `errors_percent`.
fn results(scenarios: &[Scenario], records: &[RunRecord]) -> Value {
    let mut by_scenario = serde_json::Map::new();
    for (s, p, m) in summaries(scenarios, records) {
        let entry = by_scenario
            .entry(s.id.to_string())
            .or_insert_with(|| json!({}));
        entry[p.to_string()] = json!({
            "p99_ms": m.p99_s.map(|v| v * 1e3),
            "p99_all_ms": m.p99_all_s.map(|v| v * 1e3),
            "errors_percent": m.error_rate.map(|e| e * 100.0),
            "slots_moved_per_min": m.slots_moved_per_min,
        });
    }
    Value::Object(by_scenario)
}

fn json_doc(
    settings: &Settings,
    scenarios: &[Scenario],
    records: &[RunRecord],
    failures: &[String],
) -> Value {
    json!({
        "settings": {
            "scenarios": settings.scenarios,
            "repeats": settings.repeats,
            "duration_s": settings.duration_s,
            "health_metrics": settings.health_metrics,
            "quick": settings.quick,
            "wall_s": settings.wall_s,
            "host": settings.host,
            "table_size": TABLE_SIZE,
        },
        "scenarios": scenarios.iter().map(|s| json!({
            "id": s.id,
            "title": s.title,
            "load": s.load,
            "duration_s": secs(s.duration),
            "capacity": s.capacity(),
            "backends": s.backends.iter().map(|b| json!({
                "name": b.name, "slots": b.slots,
                "service_time_s": secs(b.service_time), "capacity": b.capacity(),
            })).collect::<Vec<_>>(),
            "static_weights": s.static_weights,
            "series": s.series,
            "events": s.events.iter().map(|e| json!({
                "at": e.at, "backend": e.backend, "change": format!("{:?}", e.change),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "summary": summaries(scenarios, records).iter().map(|(s, p, m)| json!({
            "scenario": s.id, "policy": p.to_string(), "median": m.to_json(),
        })).collect::<Vec<_>>(),
        "results": results(scenarios, records),
        "failures": failures,
        "runs": records.iter().map(RunRecord::to_json).collect::<Vec<_>>(),
    })
}

// ---------------------------------------------------------------------------------
// SVG plots, written by hand.

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn policy_color(p: Variant) -> &'static str {
    let i = super::scenario::POLICIES.iter().position(|&q| q == p);
    COLORS[i.unwrap_or(COLORS.len() - 1) % COLORS.len()]
}

/// One line of a chart: name, colour, dashed, points (x, y; `None` breaks the line).
pub struct Series {
    pub name: String,
    pub color: String,
    pub dashed: bool,
    pub points: Vec<(f64, Option<f64>)>,
}

/// A line chart: `x` from 0 to `x_max`, `y` linear from 0 or logarithmic,
/// vertical markers at `marks`.
pub fn line_chart(
    title: &str,
    y_label: &str,
    series: &[Series],
    x_max: f64,
    y_log: bool,
    marks: &[f64],
) -> String {
    let (w, h) = (760.0, 360.0);
    let (left, right, top, bottom) = (70.0, 170.0, 30.0, 40.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().filter_map(|p| p.1))
        .filter(|y| y.is_finite() && (!y_log || *y > 0.0))
        .collect();
    let (mut y_min, mut y_max) = if y_log {
        let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ys.iter().copied().fold(0.0, f64::max);
        if lo.is_finite() && hi > 0.0 {
            (
                10f64.powf(lo.log10().floor()),
                10f64.powf(hi.log10().ceil()),
            )
        } else {
            (0.001, 1.0)
        }
    } else {
        let hi = ys.iter().copied().fold(0.0, f64::max);
        let step = nice_step(hi / 5.0);
        (0.0, (hi / step).ceil().max(1.0) * step)
    };
    if y_max <= y_min {
        y_max = y_min + 1.0;
    }
    if y_log && y_max / y_min < 10.0 {
        y_min = y_max / 10.0;
    }
    let x_max = if x_max > 0.0 { x_max } else { 1.0 };
    let px = |x: f64| left + pw * (x / x_max).clamp(0.0, 1.0);
    let py = |y: f64| {
        let f = if y_log {
            (y.max(y_min).log10() - y_min.log10()) / (y_max.log10() - y_min.log10())
        } else {
            (y - y_min) / (y_max - y_min)
        };
        top + ph * (1.0 - f.clamp(0.0, 1.0))
    };
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"18\" font-size=\"13\" text-anchor=\"middle\">{}</text>\n",
        left + pw / 2.0,
        escape(title)
    );
    // Grid and y ticks.
    let ticks: Vec<f64> = if y_log {
        let mut t = Vec::new();
        let mut d = y_min;
        while d <= y_max * 1.0001 {
            for m in [1.0, 2.0, 5.0] {
                let v = d * m;
                if v >= y_min * 0.9999 && v <= y_max * 1.0001 {
                    t.push(v);
                }
            }
            d *= 10.0;
        }
        t
    } else {
        let step = nice_step((y_max - y_min) / 5.0);
        let n = ((y_max - y_min) / step).round() as usize;
        (0..=n).map(|i| y_min + step * i as f64).collect()
    };
    for t in ticks {
        let y = py(t);
        let _ = writeln!(
            out,
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left + pw,
            left - 4.0,
            y + 4.0,
            tick_label(t)
        );
    }
    let x_step = nice_step(x_max / 6.0);
    let mut x = 0.0;
    while x <= x_max + 1e-9 {
        let _ = writeln!(
            out,
            "<line x1=\"{0:.1}\" y1=\"{top}\" x2=\"{0:.1}\" y2=\"{1:.1}\" stroke=\"#eee\"/>\
             <text x=\"{0:.1}\" y=\"{2:.1}\" text-anchor=\"middle\">{3}</text>",
            px(x),
            top + ph,
            top + ph + 14.0,
            tick_label(x)
        );
        x += x_step;
    }
    for &m in marks {
        let _ = writeln!(
            out,
            "<line x1=\"{0:.1}\" y1=\"{top}\" x2=\"{0:.1}\" y2=\"{1:.1}\" stroke=\"#888\" \
             stroke-dasharray=\"2,3\"/>",
            px(m),
            top + ph
        );
    }
    let _ = writeln!(
        out,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#333\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">time since the start of the load (s)</text>\n\
         <text x=\"14\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 14 {:.1})\">{}</text>",
        left + pw / 2.0,
        h - 6.0,
        top + ph / 2.0,
        top + ph / 2.0,
        escape(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        let dash = if s.dashed {
            " stroke-dasharray=\"5,3\""
        } else {
            ""
        };
        let mut segment: Vec<String> = Vec::new();
        let flush = |segment: &mut Vec<String>, out: &mut String| {
            if segment.len() >= 2 {
                let _ = writeln!(
                    out,
                    "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"{dash} points=\"{}\"/>",
                    s.color,
                    segment.join(" ")
                );
            } else if segment.len() == 1 {
                let (x, y) = segment[0].split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(
                    out,
                    "<circle cx=\"{x}\" cy=\"{y}\" r=\"1.5\" fill=\"{}\"/>",
                    s.color
                );
            }
            segment.clear();
        };
        for &(x, y) in &s.points {
            match y.filter(|y| y.is_finite() && (!y_log || *y > 0.0)) {
                Some(y) => segment.push(format!("{:.1},{:.1}", px(x), py(y))),
                None => flush(&mut segment, &mut out),
            }
        }
        flush(&mut segment, &mut out);
        let ly = top + 12.0 + 16.0 * i as f64;
        let lx = left + pw + 12.0;
        let _ = writeln!(
            out,
            "<line x1=\"{lx}\" y1=\"{ly}\" x2=\"{:.1}\" y2=\"{ly}\" stroke=\"{}\" stroke-width=\"2\"{dash}/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            lx + 22.0,
            s.color,
            lx + 28.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
    out += "</svg>\n";
    out
}

fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    let m = raw / p;
    p * if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    }
}

fn tick_label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 || (v.fract() == 0.0 && v.abs() >= 1.0) {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The times of a scenario's changes, for the plots; none for S6, whose capacity
/// changes every half second.
fn event_marks(scenario: &Scenario) -> Vec<f64> {
    if !scenario.series.is_empty() {
        return Vec::new();
    }
    let mut marks: Vec<f64> = scenario
        .events
        .iter()
        .map(|e| e.at)
        .filter(|&t| t > 0.0)
        .collect();
    marks.dedup();
    marks
}

/// p50 (dashed) and p99 (solid) latency per second, one colour per policy, of the
/// first repeat of each policy.
fn latency_svg(scenario: &Scenario, runs: &[&RunRecord]) -> String {
    let mut series = Vec::new();
    for policy in super::scenario::POLICIES {
        let Some(run) = runs.iter().find(|r| r.policy == policy) else {
            continue;
        };
        let per_second = run.series["per_second"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for (key, dashed, label) in [("p99_s", false, "p99"), ("p50_s", true, "p50")] {
            series.push(Series {
                name: format!("{policy} {label}"),
                color: policy_color(policy).into(),
                dashed,
                points: per_second
                    .iter()
                    .map(|s| (s["t"].as_f64().unwrap_or(0.0) + 0.5, s[key].as_f64()))
                    .collect(),
            });
        }
    }
    line_chart(
        &format!("{}: latency per second (repeat 1)", scenario.id),
        "latency (s)",
        &series,
        secs(scenario.duration),
        true,
        &event_marks(scenario),
    )
}

/// Each backend's share of the weight over time, of one run.
fn weights_svg(scenario: &Scenario, run: &RunRecord) -> String {
    let samples = run.series["samples"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let series = scenario
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| Series {
            name: b.name.clone(),
            color: COLORS[i % COLORS.len()].into(),
            dashed: i >= COLORS.len(),
            points: samples
                .iter()
                .map(|s| {
                    let w: Vec<f64> = s["weights"]
                        .as_array()
                        .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(0.0)).collect())
                        .unwrap_or_default();
                    let total: f64 = w.iter().sum();
                    let share = (total > 0.0).then(|| w.get(i).copied().unwrap_or(0.0) / total);
                    (s["t"].as_f64().unwrap_or(0.0), share)
                })
                .collect(),
        })
        .collect::<Vec<_>>();
    line_chart(
        &format!(
            "{} {}: weight share per backend (repeat {})",
            scenario.id, run.policy, run.repeat
        ),
        "share of the weight",
        &series,
        secs(scenario.duration) + 1.0,
        false,
        &event_marks(scenario),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testbed::scenario::BackendSample;

    fn sample(t: f64, flows: &[u64], weights: &[f64]) -> Sample {
        Sample {
            t,
            backends: flows
                .iter()
                .zip(weights)
                .map(|(&f, &w)| BackendSample {
                    weight: w,
                    new_flows: f,
                    packets: 0,
                    ..BackendSample::default()
                })
                .collect(),
            conn_miss_non_syn: 0,
        }
    }

    #[test]
    fn reaction_is_found_from_flow_shares() {
        let s = Scenario::get("S2", std::time::Duration::from_secs(30)).unwrap();
        // Slowdown at 10 s; capacity share of backend0 becomes 1/13.
        let mut samples = Vec::new();
        let mut flows = [0u64; 4];
        for t in 0..=30 {
            let share0 = if t >= 15 { 0.07 } else { 0.25 };
            let per = 200.0;
            flows[0] += (per * share0) as u64;
            for f in flows.iter_mut().skip(1) {
                *f += (per * (1.0 - share0) / 3.0) as u64;
            }
            let w0 = if t >= 14 { 0.25 } else { 1.0 };
            samples.push(sample(t as f64, &flows, &[w0, 1.0, 1.0, 1.0]));
        }
        let r = reactions(&s, &samples, true);
        assert_eq!(r.len(), 1);
        // The first 2 s window entirely at the new share ends at 16.
        assert_eq!(r[0], Some(6.0));
        assert_eq!(reactions(&s, &samples, false)[0], Some(4.0));
    }

    #[test]
    fn svg_is_well_formed_enough() {
        let svg = line_chart(
            "t",
            "y",
            &[Series {
                name: "a<b".into(),
                color: "#000".into(),
                dashed: false,
                points: vec![
                    (0.0, Some(0.01)),
                    (1.0, None),
                    (2.0, Some(0.5)),
                    (3.0, Some(1.0)),
                ],
            }],
            3.0,
            true,
            &[1.5],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a&lt;b"));
        assert!(svg.contains("<polyline"));
    }
}
