//! `lb-bench-policies`: the "prove it" benchmark of issue 6. Runs every scenario of
//! the policy testbed (`lb_tests::testbed`) under `equal`, `static`, `reactive`, `ai`
//! and the ablation of `ai`'s predictor (`ai-svr`, `ai-ewma`, `ai-last`: `ai` with
//! `[control] predictor` set), interleaved (S1-equal, S1-static, ..., S1-ai-last,
//! S1-equal, ...), each
//! run in its own network namespaces with the real agent (`$LB_BIN`) and the real XDP
//! datapath, and writes `target/bench/policies.md`, `target/bench/policies.json` (or
//! `$LB_BENCH_JSON`) and SVG plots under `target/bench/policies/`.
//!
//! ```text
//! LB_BIN=... lb-bench-policies [--scenarios S1,S2] [--policies ai,ai-last]
//!                              [--repeats 3] [--duration-s 30]
//!                              [--quick] [--no-health-metrics] [--series FILE]...
//! ```
//!
//! `policies.json` has `results.<scenario>.<policy>` with the medians `p99_ms`,
//! `p99_all_ms` (null when the p99 falls on a failure) and `errors_percent`.
//!
//! `--quick` is 1 repeat of 10 s runs (a smoke test). `--no-health-metrics` leaves
//! the `[vip.health]` and `[vip.metrics]` sections out of the agent's configuration.
//! `--series FILE` (repeatable) names a CPU series S6 replays, a `timestamp,value`
//! file (NAB's format) with a value per 0.5 s of the run; by default the five
//! `testdata/nab/ec2_cpu_utilization_*.csv` of the workspace. A relative path is
//! taken from the current directory (the workspace root under `cargo xtask`).
//! Needs root (namespaces, XDP). Ctrl-C removes every namespace of the run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_tests::testbed::{
    self,
    report::{OutputPaths, RunRecord, Settings},
    scenario::{POLICIES, RunOptions, SCENARIOS, Scenario, series_needed},
};
use lb_userspace::core::policy::Variant;
use lb_userspace::core::series::Series;

struct Args {
    scenarios: Vec<String>,
    policies: Vec<Variant>,
    repeats: usize,
    duration_s: f64,
    quick: bool,
    health_metrics: bool,
    /// S6's series files; empty for the default ones.
    series: Vec<PathBuf>,
}

const USAGE: &str = "usage: lb-bench-policies [--scenarios S1,S2,...] \
                     [--policies ai,ai-svr,...] [--repeats N] [--duration-s SECONDS] \
                     [--quick] [--no-health-metrics] [--series FILE]...";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        scenarios: SCENARIOS.iter().map(|s| (*s).to_owned()).collect(),
        policies: POLICIES.to_vec(),
        repeats: 3,
        duration_s: 30.0,
        quick: false,
        health_metrics: true,
        series: Vec::new(),
    };
    let mut repeats = None;
    let mut duration = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String> {
            match inline.clone().or_else(|| it.next()) {
                Some(v) => Ok(v),
                None => bail!("{name} needs a value\n{USAGE}"),
            }
        };
        match key.as_str() {
            "--scenarios" => {
                args.scenarios = value("--scenarios")?
                    .split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| s.trim().to_ascii_uppercase())
                    .collect();
            }
            "--policies" => {
                let list = value("--policies")?;
                let mut chosen = Vec::new();
                for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let policy: Variant = name
                        .parse()
                        .map_err(|e: String| anyhow::anyhow!("--policies: {e}"))?;
                    if !chosen.contains(&policy) {
                        chosen.push(policy);
                    }
                }
                if chosen.is_empty() {
                    bail!("--policies needs at least one policy\n{USAGE}");
                }
                // Runs interleave in the usual order whatever the order given.
                args.policies = POLICIES
                    .into_iter()
                    .filter(|p| chosen.contains(p))
                    .collect();
            }
            "--repeats" => repeats = Some(value("--repeats")?.parse().context("--repeats")?),
            "--duration-s" => {
                duration = Some(value("--duration-s")?.parse().context("--duration-s")?)
            }
            "--quick" => args.quick = true,
            "--no-health-metrics" => args.health_metrics = false,
            "--series" => args.series.push(PathBuf::from(value("--series")?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if args.quick {
        args.repeats = 1;
        args.duration_s = 10.0;
    }
    if let Some(r) = repeats {
        args.repeats = r;
    }
    if let Some(d) = duration {
        args.duration_s = d;
    }
    if args.repeats == 0 || args.duration_s.is_nan() || args.duration_s < 3.0 {
        bail!("need at least 1 repeat and 3 s per run\n{USAGE}");
    }
    for s in &args.scenarios {
        if !SCENARIOS.contains(&s.as_str()) {
            bail!("unknown scenario {s:?} (known: {})", SCENARIOS.join(", "));
        }
    }
    Ok(args)
}

/// S6's series: `files`, else every `ec2_cpu_utilization_*.csv` in the workspace's
/// `testdata/nab`; each must hold a value for every replay step of `duration`.
fn load_series(files: &[PathBuf], duration: Duration) -> Result<Vec<Series>> {
    let files = if files.is_empty() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/nab");
        let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("ec2_cpu_utilization_") && n.ends_with(".csv"))
            })
            .collect();
        found.sort();
        if found.is_empty() {
            bail!("no ec2_cpu_utilization_*.csv in {}", dir.display());
        }
        found
    } else {
        files.to_vec()
    };
    let needed = series_needed(duration);
    files
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the series {}", path.display()))?;
            let name = match path.strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")).join("..")) {
                Ok(relative) => relative.display().to_string(),
                Err(_) => path.display().to_string(),
            };
            Ok(Series::parse(&name, &text, needed)?)
        })
        .collect()
}

/// A progress bar on stderr, redrawn in place.
fn progress(done: usize, total: usize, label: &str, started: Instant) {
    const WIDTH: usize = 30;
    let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH);
    let elapsed = started.elapsed().as_secs_f64();
    let eta = if done > 0 {
        format!(
            " ETA {:.0} s",
            elapsed / done as f64 * (total - done) as f64
        )
    } else {
        String::new()
    };
    let bar = format!(
        "[{}{}] {done}/{total} {label}{eta}",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled)
    );
    let mut err = std::io::stderr().lock();
    if is_tty() {
        let _ = write!(err, "\r\x1b[2K{bar}");
    } else {
        let _ = writeln!(err, "{bar}");
    }
    let _ = err.flush();
}

/// Whether stderr is a terminal (the bar is redrawn in place only there).
fn is_tty() -> bool {
    // SAFETY: isatty only looks at the descriptor.
    unsafe { libc::isatty(2) == 1 }
}

/// Prints a line of its own on stderr, clearing the bar first on a terminal.
fn line(text: &str) {
    if is_tty() {
        eprintln!("\r\x1b[2K{text}");
    } else {
        eprintln!("{text}");
    }
}

fn host_description() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpus} CPUs, Linux {kernel}")
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("\nlb-bench-policies: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let args = parse_args()?;
    lb_tests::spread::lb_binary()?;
    testbed::prepare_process("lb-bench-policies");
    let duration = Duration::from_secs_f64(args.duration_s);
    let series = if args.scenarios.iter().any(|s| s == "S6") {
        load_series(&args.series, duration)?
    } else {
        Vec::new()
    };
    let scenarios: Vec<Scenario> = args
        .scenarios
        .iter()
        .map(|id| Scenario::with_series(id, duration, &series).expect("checked above"))
        .collect();
    let total = scenarios.len() * args.policies.len() * args.repeats;
    eprintln!(
        "lb-bench-policies: {} scenario(s) x {} policies x {} repeat(s) = {total} runs of {:.0} s \
         (health/metrics sections {})",
        scenarios.len(),
        args.policies.len(),
        args.repeats,
        args.duration_s,
        if args.health_metrics { "on" } else { "off" }
    );
    let started = Instant::now();
    let mut records: Vec<RunRecord> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut done = 0;
    for scenario in &scenarios {
        for repeat in 1..=args.repeats {
            // The same arrival schedule for every policy of a repeat.
            let seed =
                0x6c62_7465_7374 ^ ((scenario.id.as_bytes()[1] as u64) << 32) ^ repeat as u64;
            for &policy in &args.policies {
                let label = format!("{} {policy} repeat {repeat}", scenario.id);
                progress(done, total, &label, started);
                let mut opts = RunOptions::new(policy);
                opts.seed = seed;
                opts.health_metrics = args.health_metrics;
                let t0 = Instant::now();
                let result = testbed::scenario::run(scenario, &opts);
                let wall = t0.elapsed().as_secs_f64();
                done += 1;
                match result {
                    Ok(run) => {
                        let record = RunRecord::new(scenario, &run, repeat, wall);
                        line(&format!(
                            "{label}: {} ({:.0} req/s, {:.0} s)",
                            record.metrics.summary(),
                            record.metrics.offered_rate,
                            wall
                        ));
                        records.push(record);
                    }
                    Err(e) => {
                        let message = format!("{label}: {e:#}");
                        line(&message);
                        failures.push(message);
                        if records.is_empty() && failures.len() >= 2 {
                            bail!("the first runs all failed; giving up");
                        }
                    }
                }
            }
        }
    }
    progress(done, total, "done", started);
    if is_tty() {
        eprintln!();
    }
    let settings = Settings {
        scenarios: args.scenarios.clone(),
        repeats: args.repeats,
        duration_s: args.duration_s,
        health_metrics: args.health_metrics,
        quick: args.quick,
        wall_s: started.elapsed().as_secs_f64(),
        host: host_description(),
    };
    let paths = OutputPaths::default_paths();
    let written = testbed::report::write_all(&settings, &scenarios, &records, &failures, &paths)?;
    for scenario in &scenarios {
        let rows: Vec<_> = testbed::report::summaries(std::slice::from_ref(scenario), &records)
            .into_iter()
            .map(|(_, p, s)| (p, s))
            .collect();
        if !rows.is_empty() {
            println!("\n{}: {}\n", scenario.id, scenario.title);
            println!("{}", testbed::report::table(scenario, &rows));
        }
    }
    eprintln!(
        "lb-bench-policies: {} runs ({} failed) in {:.1} min; wrote {}",
        records.len() + failures.len(),
        failures.len(),
        settings.wall_s / 60.0,
        written
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e != "svg"))
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if records.is_empty() {
        bail!("no run succeeded");
    }
    Ok(())
}
