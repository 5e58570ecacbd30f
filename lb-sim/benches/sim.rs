//! Runs the testbed's eight scenarios at scale in the simulator
//! (`lb_sim`): 120 backends and 100,000 to 400,000 requests per second of
//! simulated time, every policy on the agent's own policy, table and model code.
//!
//! Run it as `cargo bench -p lb-sim --bench sim`. Runs are interleaved as on
//! the testbed: for each seed, each scenario, each policy (equal, static, reactive,
//! ai, and the ablation of `ai`'s predictor: `ai-svr`, `ai-ewma`, `ai-last`, which
//! are `ai` with `[control] predictor` set), all policies of a seed seeing the very
//! same requests. The table shows the
//! median over seeds of each figure (the testbed's definitions, see the `sim` module);
//! a reaction time shows how many seeds reached it when some did not. A second table
//! shows the slots moved per minute in each of a scenario's phases (`Scenario::phases`:
//! S2's steady first third, its slowdown, its recovery; S4's bursts and the calm
//! between them), a third why the adaptive policies do what they do: how often the move budget and the
//! floor bound them, and how the predictors fared.
//!
//! Environment: `LB_SIM_SEEDS` (3), `LB_SIM_DURATION_S` (90), `LB_SIM_BACKENDS`
//! (120), `LB_SIM_SCENARIOS` and `LB_SIM_POLICIES` (comma-separated subsets), and,
//! to study the policies' guards rather than to report, the agent's `[control]`
//! settings `LB_SIM_INTERVAL_MS` (500), `LB_SIM_MOVE_BUDGET` (0.02),
//! `LB_SIM_FLOOR_SHARE` (0.01), `LB_SIM_SMOOTHING` (0.5), `LB_SIM_HYSTERESIS` (0.05),
//! `LB_SIM_SHED_RATIO` (0.5), `LB_SIM_EJECT_ERROR_RATE` (0.2), `LB_SIM_EJECT_MIN_REQUESTS`
//! (10), `LB_SIM_EJECT_MAX_SHARE` (0.5; 0 turns ejection off), `LB_SIM_EJECT_TIME_MS`
//! (10000). `LB_SIM_SERIES` names the CPU series S6 replays instead
//! of the five built-in ones (`testdata/nab/ec2_cpu_utilization_*.csv`): paths
//! separated by `:` or `,` (relative ones from the workspace root), each a
//! `timestamp,value` file (NAB's format) of at least one value per 0.5 s of the run; a
//! bad file stops the bench with its name and line.
//! The series used are named in the output (the S6 line and `params.series` of the
//! JSON, present when S6 runs). It prints Markdown and writes every figure of every
//! run as JSON to the file named by `LB_BENCH_JSON`, or else to
//! `target/bench/sim.json` under the workspace root: `results.<scenario>.<policy>` has
//! the medians `p99_ms`, `p99_all_ms` (null when more than 1 % failed) and
//! `errors_percent`; `summary` every median; `runs` every run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use lb_sim::{self as sim, ScenarioId, SimParams, SimReport};
use lb_userspace::core::policy::{PolicyKind, Variant};
use lb_userspace::core::series::{Series, SeriesError};
use serde_json::json;

/// Every policy, `ai` with each predictor (the ablation): see [`Variant::BENCHED`].
const POLICIES: [Variant; 7] = Variant::BENCHED;

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn main() {
    let started = Instant::now();
    let seeds: u64 = env_num("LB_SIM_SEEDS", 3).max(1);
    let defaults = SimParams::default();
    let c = defaults.control;
    let control = lb_userspace::config::Control {
        interval_ms: env_num("LB_SIM_INTERVAL_MS", c.interval_ms),
        move_budget_per_second: env_num("LB_SIM_MOVE_BUDGET", c.move_budget_per_second),
        floor_share: env_num("LB_SIM_FLOOR_SHARE", c.floor_share),
        smoothing: env_num("LB_SIM_SMOOTHING", c.smoothing),
        hysteresis: env_num("LB_SIM_HYSTERESIS", c.hysteresis),
        shed_ratio: env_num("LB_SIM_SHED_RATIO", c.shed_ratio),
        predictor: c.predictor,
        eject_error_rate: env_num("LB_SIM_EJECT_ERROR_RATE", c.eject_error_rate),
        eject_min_requests: env_num("LB_SIM_EJECT_MIN_REQUESTS", c.eject_min_requests),
        eject_max_share: env_num("LB_SIM_EJECT_MAX_SHARE", c.eject_max_share),
        eject_time_ms: env_num("LB_SIM_EJECT_TIME_MS", c.eject_time_ms),
    };
    let scenarios: Vec<ScenarioId> = match std::env::var("LB_SIM_SCENARIOS") {
        Ok(list) => list
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect(),
        Err(_) => ScenarioId::ALL.to_vec(),
    };
    let duration_s = env_num("LB_SIM_DURATION_S", defaults.duration_s);
    let series = match series(duration_s, defaults.series.clone()) {
        Ok(series) => series,
        // Only S6 reads them.
        Err(e) if scenarios.contains(&ScenarioId::S6) => {
            eprintln!("sim bench: {e}");
            std::process::exit(1);
        }
        Err(_) => Vec::new(),
    };
    let params = SimParams {
        duration_s,
        backends: env_num("LB_SIM_BACKENDS", defaults.backends),
        control,
        series,
        ..defaults
    };
    let policies: Vec<Variant> = match std::env::var("LB_SIM_POLICIES") {
        Ok(list) => POLICIES
            .into_iter()
            .filter(|p| list.split(',').any(|s| s.trim() == p.to_string()))
            .collect(),
        Err(_) => POLICIES.to_vec(),
    };
    eprintln!(
        "sim: {} backends, {} s per run, {} seed(s), {} scenario(s) x {} policies",
        params.backends,
        params.duration_s,
        seeds,
        scenarios.len(),
        policies.len()
    );
    let mut reports: Vec<SimReport> = Vec::new();
    for seed in 1..=seeds {
        for &scenario in &scenarios {
            for &policy in &policies {
                let run_params = SimParams {
                    control: lb_userspace::config::Control {
                        predictor: policy.predictor,
                        ..params.control
                    },
                    ..params.clone()
                };
                let r = sim::run(scenario, policy.kind, seed, &run_params);
                eprintln!(
                    "  seed {seed} {scenario} {:<8} p99 {} err {:.2}% util max {:.0}% \
                     reaction {} moved {:.0}/min  {:.1} s wall, {:.2} M req/s simulated",
                    policy.to_string(),
                    ms(r.p99_s),
                    r.error_rate * 100.0,
                    r.util_max * 100.0,
                    r.reaction_s.map_or("-".into(), |x| format!("{x:.1}s")),
                    r.slots_moved_per_min,
                    r.wall_s,
                    r.sim_requests_per_s / 1e6
                );
                let phases: Vec<String> = r
                    .phases
                    .iter()
                    .map(|ph| format!("{} {:.0}", ph.name, ph.slots_moved_per_min))
                    .collect();
                eprintln!("    moved/min by phase: {}", phases.join(", "));
                reports.push(r);
            }
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let mut groups: BTreeMap<(ScenarioId, usize), Vec<&SimReport>> = BTreeMap::new();
    for r in &reports {
        let p = POLICIES.iter().position(|&p| p == r.variant).unwrap_or(0);
        groups.entry((r.scenario, p)).or_default().push(r);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Simulated testbed: {} backends, {} s per run, median of {} seed(s)\n\n\
         Control: {} ms interval, move budget {} /s, floor share {}, smoothing {}, \
         hysteresis {}, shed ratio {}.\n",
        params.backends,
        params.duration_s,
        seeds,
        control.interval_ms,
        control.move_budget_per_second,
        control.floor_share,
        control.smoothing,
        control.hysteresis,
        control.shed_ratio
    );
    for &s in &scenarios {
        let r = sim::Scenario::new(s, &params);
        let _ = writeln!(
            out,
            "- **{s}**: {} ({:.0} req/s offered on average, nominal capacity {:.0} req/s{})",
            s.title(),
            r.mean_rate(),
            r.nominal_capacity(),
            if s == ScenarioId::S6 {
                format!("; series {}", series_names(&params).join(", "))
            } else {
                String::new()
            }
        );
    }
    let _ = writeln!(
        out,
        "\n| scenario | policy | p50 ms | p99 ms | p99.9 ms | p99 all ms | errors % | util max % | \
         util mean % | reaction s (flows) | reaction s (table) | slots moved/min | \
         offered req/s | simulated req/s |"
    );
    let _ = writeln!(
        out,
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    );
    let mut summary = Vec::new();
    let mut results: BTreeMap<String, serde_json::Map<String, serde_json::Value>> = BTreeMap::new();
    let mut phase_rows = Vec::new();
    for ((scenario, p), runs) in &groups {
        let policy = POLICIES[*p];
        let m = |f: &dyn Fn(&SimReport) -> Option<f64>| median(runs.iter().map(|r| f(r)));
        let p50 = m(&|r| r.p50_s);
        let p99 = m(&|r| r.p99_s);
        let p999 = m(&|r| r.p999_s);
        // Beyond the timeout (failed requests above 1 %) sorts as infinite.
        let p99_all = m(&|r| Some(r.p99_all_s.unwrap_or(f64::MAX)));
        let err = m(&|r| Some(r.error_rate));
        let umax = m(&|r| Some(r.util_max));
        let umean = m(&|r| Some(r.util_mean));
        let moved = m(&|r| Some(r.slots_moved_per_min));
        let offered = m(&|r| Some(r.offered_rate));
        let speed = m(&|r| Some(r.sim_requests_per_s));
        let measured = runs.iter().any(|r| !r.reactions_s.is_empty());
        let reaction = |f: &dyn Fn(&SimReport) -> Option<f64>| -> String {
            if !measured {
                return "n/a".into();
            }
            let reached = runs.iter().filter(|r| f(r).is_some()).count();
            let med = median(runs.iter().map(|r| f(r)));
            match (med, reached == runs.len()) {
                (Some(v), true) => format!("{v:.1}"),
                (Some(v), false) => format!("{v:.1} ({reached}/{})", runs.len()),
                (None, _) => format!("never ({reached}/{})", runs.len()),
            }
        };
        // Every run of a scenario has the same phases, in the same order.
        let phases: Vec<_> = runs[0]
            .phases
            .iter()
            .enumerate()
            .map(|(i, ph)| {
                let moved = m(&|r| r.phases.get(i).map(|x| x.slots_moved_per_min));
                (ph.name, ph.seconds, moved)
            })
            .collect();
        let rf = reaction(&|r| r.reaction_s);
        let rt = reaction(&|r| r.reaction_table_s);
        let _ = writeln!(
            out,
            "| {scenario} | {policy} | {} | {} | {} | {} | {} | {} | {} | {rf} | {rt} | {} | {} | {} |",
            ms(p50),
            ms(p99),
            ms(p999),
            match p99_all {
                Some(v) if v < f64::MAX => ms(Some(v)),
                _ => format!("> {:.0}", params.request_timeout_s * 1e3),
            },
            fmt(err.map(|e| e * 100.0), 2),
            fmt(umax.map(|u| u * 100.0), 0),
            fmt(umean.map(|u| u * 100.0), 0),
            fmt(moved, 0),
            fmt(offered, 0),
            fmt(speed, 0),
        );
        summary.push(json!({
            "scenario": scenario, "policy": policy, "runs": runs.len(),
            "p50_s": p50, "p99_s": p99, "p999_s": p999, "error_rate": err,
            "p99_all_s": p99_all.filter(|v| *v < f64::MAX),
            "util_max": umax, "util_mean": umean,
            "reaction_s": runs.iter().map(|r| r.reaction_s).collect::<Vec<_>>(),
            "reaction_table_s": runs.iter().map(|r| r.reaction_table_s).collect::<Vec<_>>(),
            "slots_moved_per_min": moved, "offered_rate": offered,
            "sim_requests_per_s": speed,
            "phases": phases.iter().map(|(name, seconds, moved)| json!({
                "name": name, "seconds": seconds, "slots_moved_per_min": moved,
            })).collect::<Vec<_>>(),
        }));
        results.entry(scenario.to_string()).or_default().insert(
            policy.to_string(),
            json!({
                "p99_ms": p99.map(|v| v * 1e3),
                "p99_all_ms": p99_all.filter(|v| *v < f64::MAX).map(|v| v * 1e3),
                "errors_percent": err.map(|e| e * 100.0),
                "slots_moved_per_min": moved,
            }),
        );
        phase_rows.push((*scenario, policy, phases));
    }
    let _ = writeln!(
        out,
        "\n### Slots moved per minute in each phase (medians over seeds)\n\n\
         | scenario | policy | phase (s of the run): slots moved/min |\n|---|---|---|"
    );
    for (scenario, policy, phases) in &phase_rows {
        let cells: Vec<String> = phases
            .iter()
            .map(|(name, seconds, moved)| format!("{name} ({seconds:.0} s): {}", fmt(*moved, 0)))
            .collect();
        let _ = writeln!(out, "| {scenario} | {policy} | {} |", cells.join(" · "));
    }
    let _ = writeln!(
        out,
        "\n### Why the adaptive policies do what they do (medians over seeds)\n\n\
         | scenario | policy | steps at the move budget % | floor raises per step | \
         ai: SVR chosen % | ai: MAE last / EWMA / SVR ms | ai: fits (failed; too early) | ai: fit wall s | \
         ai: capacity SVR chosen % | ai: capacity MAE last / EWMA / SVR req/s | ai: foreseen sheds |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for ((scenario, p), runs) in &groups {
        let policy = POLICIES[*p];
        if !matches!(policy.kind, PolicyKind::Reactive | PolicyKind::Ai) {
            continue;
        }
        let m = |f: &dyn Fn(&SimReport) -> Option<f64>| median(runs.iter().map(|r| f(r)));
        let steps = |r: &SimReport| f64::from(r.policy_steps.max(1));
        let budget = m(&|r| Some(100.0 * f64::from(r.budget_limited_steps) / steps(r)));
        let floor = m(&|r| Some(r.floor_raised as f64 / steps(r)));
        let model = |f: &dyn Fn(&sim::ModelStats) -> Option<f64>| {
            median(runs.iter().map(|r| r.model.as_ref().and_then(f)))
        };
        let chosen = model(&|s| Some(100.0 * s.svr_chosen as f64 / s.ticks.max(1) as f64));
        let maes = [
            model(&|s| s.mae_last_value_s),
            model(&|s| s.mae_ewma_s),
            model(&|s| s.mae_svr_s),
        ];
        let fits = model(&|s| Some(s.fits as f64));
        let failed = model(&|s| Some(s.fit_failures as f64));
        let early = model(&|s| Some(s.fits_too_early as f64));
        let fit_wall = model(&|s| Some(s.fit_wall_s));
        let capacity_chosen =
            model(&|s| Some(100.0 * s.capacity_svr_chosen as f64 / s.capacity_ticks.max(1) as f64));
        let capacity_maes = [0, 1, 2].map(|i| model(&|s| s.capacity_mae[i]));
        let foreseen = model(&|s| Some(s.foreseen_sheds as f64));
        let ai = policy.kind == PolicyKind::Ai;
        let _ = writeln!(
            out,
            "| {scenario} | {policy} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            fmt(budget, 0),
            fmt(floor, 1),
            if ai { fmt(chosen, 0) } else { "".into() },
            if ai {
                maes.map(|x| fmt(x.map(|v| v * 1e3), 2)).join(" / ")
            } else {
                "".into()
            },
            if ai {
                format!(
                    "{} ({}; {} too early)",
                    fmt(fits, 0),
                    fmt(failed, 0),
                    fmt(early, 0)
                )
            } else {
                "".into()
            },
            if ai { fmt(fit_wall, 1) } else { "".into() },
            if ai {
                fmt(capacity_chosen, 0)
            } else {
                "".into()
            },
            if ai {
                capacity_maes.map(|x| fmt(x, 1)).join(" / ")
            } else {
                "".into()
            },
            if ai { fmt(foreseen, 0) } else { "".into() },
        );
    }
    let _ = writeln!(
        out,
        "\n{} runs in {:.0} s of wall-clock time ({:.0} M simulated requests).",
        reports.len(),
        wall,
        reports.iter().map(|r| r.requests as f64).sum::<f64>() / 1e6
    );
    print!("{out}");

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.canonicalize().unwrap_or(root);
    let path = std::env::var_os("LB_BENCH_JSON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/bench/sim.json"));
    let c = &params.control;
    let mut doc = json!({
        "bench": "sim",
        "wall_s": wall,
        "seeds": seeds,
        "params": {
            "duration_s": params.duration_s,
            "backends": params.backends,
            "slots_per_unit": params.slots_per_unit,
            "service_s": params.service_s,
            "service": params.service,
            "slowdown": params.slowdown,
            "hotspot_period_s": params.hotspot_period_s,
            "request_timeout_s": params.request_timeout_s,
            "probe_interval_s": params.probe_interval_s,
            "rise": params.rise,
            "fall": params.fall,
            "deep_health": params.deep_health,
            "table_size": params.table_size,
            "refit_every": params.refit_every,
            "control": {
                "interval_ms": c.interval_ms,
                "move_budget_per_second": c.move_budget_per_second,
                "floor_share": c.floor_share,
                "smoothing": c.smoothing,
                "hysteresis": c.hysteresis,
                "shed_ratio": c.shed_ratio,
                "eject_error_rate": c.eject_error_rate,
                "eject_min_requests": c.eject_min_requests,
                "eject_max_share": c.eject_max_share,
                "eject_time_ms": c.eject_time_ms,
            },
        },
        "results": results,
        "summary": summary,
        "runs": reports,
    });
    // Only when S6 runs, so that outputs without it compare with older ones.
    if scenarios.contains(&ScenarioId::S6) {
        doc["params"]["series"] = json!(series_names(&params));
    }
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match serde_json::to_string(&doc).map(|s| std::fs::write(&path, s)) {
        Ok(Ok(())) => println!("\nwrote {}", path.display()),
        Ok(Err(e)) => eprintln!("sim bench: writing {}: {e}", path.display()),
        Err(e) => eprintln!("sim bench: {e}"),
    }
}

/// S6's series: the files `LB_SIM_SERIES` names (`:` or `,` between paths), else
/// `built_in`; each must hold a value for every replay step of a run of `duration_s`.
fn series(duration_s: f64, built_in: Vec<Series>) -> Result<Vec<Series>, String> {
    let needed = sim::series_needed(duration_s);
    let series = match std::env::var("LB_SIM_SERIES") {
        Ok(list) => {
            let mut out = Vec::new();
            for path in list
                .split([':', ','])
                .map(str::trim)
                .filter(|p| !p.is_empty())
            {
                // Cargo runs a bench in its package's directory: a relative path is
                // taken from the workspace root instead.
                let full = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("..")
                    .join(path);
                let text = std::fs::read_to_string(&full)
                    .map_err(|e| format!("LB_SIM_SERIES: cannot read {path}: {e}"))?;
                out.push(Series::parse(path, &text, needed).map_err(|e| e.to_string())?);
            }
            if out.is_empty() {
                return Err("LB_SIM_SERIES names no file".into());
            }
            out
        }
        Err(_) => built_in,
    };
    for s in &series {
        if s.values.len() < needed {
            return Err(SeriesError::TooShort {
                name: s.name.clone(),
                found: s.values.len(),
                needed,
            }
            .to_string());
        }
    }
    Ok(series)
}

fn series_names(params: &SimParams) -> Vec<String> {
    params.series.iter().map(|s| s.name.clone()).collect()
}

/// The median of the values present; `None` if there is none.
fn median(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let mut v: Vec<f64> = values.flatten().filter(|v| v.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn ms(s: Option<f64>) -> String {
    fmt(s.map(|s| s * 1e3), 2)
}

fn fmt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.decimals$}"))
}
