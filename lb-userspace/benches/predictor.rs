//! Measures the load model on recorded series: replays each series as one backend's
//! load through `lb_userspace::core::model::BackendModel`, exactly as the agent would tick it,
//! and reports the one-step-ahead error of the SVR, last value and EWMA, plus the SVR's
//! fit time at several window sizes and its prediction time.
//!
//! Run it as `cargo bench -p lb-userspace --bench predictor`. With no arguments it
//! replays every `*.csv` in `testdata/nab/` under the workspace root. `--series PATH`
//! (repeatable) replaces that set with the given files and `--add-series PATH` adds to
//! it; each file is `timestamp,value` lines, with an optional header line.
//!
//! # Method, per series
//! - The first half is training, the second half is evaluated walk-forward, one step
//!   ahead. Nothing about the second half is used for any choice.
//! - The EWMA's alpha is the one with the least one-step MAE on the training half
//!   (0.05 to 1 in steps of 0.05).
//! - The SVR's `c` (0.3, 1, 3), loss epsilon (0.05, 0.2, in standardized units) and
//!   whether it learns the change from the last value or the level are chosen by a
//!   chronological validation split of the training half: each of the 12 candidates is
//!   fitted on a 500-sample window that ends 20 % before the end of the training half
//!   and scored by MAE on that last 20 %. The kernel width is not searched: it is the
//!   median heuristic of `lb_userspace::core::model::svr`.
//! - During the test half the SVR is refitted every [`REFIT_EVERY`] ticks on its
//!   500-sample sliding window. The fit happens between two ticks, as a background
//!   fit installed before the next tick would.
//! - "selected" is the prediction of whichever predictor the selector chose at each
//!   tick (the SVR only while its rolling MAE over 100 ticks beats the best baseline's).
//! - Fit time is the median of 3 fits at each window size on the newest samples of the
//!   whole series; prediction time is the mean over 2,000 calls of the last fitted
//!   model (500-sample window), one feature vector per call, as for one backend.
//!
//! It prints a table and writes every figure as JSON to the file named by
//! `LB_BENCH_JSON`, or else to `target/bench/predictor.json` under the workspace root.

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use lb_userspace::core::model::{
    BackendModel, BackendModelConfig, Ewma, FeatureSpec, FeatureWindow, Forecast, KernelWidth,
    SvrParams, TrainingSet,
};
use lb_userspace::core::series::Series;

/// Ticks between two SVR refits during the test half: with 5-minute samples, once an
/// hour. About 2,000 test ticks per series make some 170 fits of 10 to 50 ms each.
const REFIT_EVERY: usize = 12;
/// The SVR's sliding window during the replay.
const WINDOW: usize = 500;
/// The window sizes whose fit time is measured.
const FIT_WINDOWS: [usize; 3] = [250, 500, 1000];
/// Timed fits per window size and series; the median is reported.
const FIT_RUNS: usize = 3;
/// Predictions timed per series for the prediction time.
const PREDICT_CALLS: usize = 2000;
/// The share of the training half held out to choose the SVR's parameters.
const VALIDATION_SHARE: f64 = 0.2;
/// The shortest series accepted.
const MIN_ROWS: usize = 200;

/// One predictor's errors over the test half.
#[derive(Debug, Default, Clone, Copy)]
struct Errors {
    abs: f64,
    sq: f64,
    n: usize,
}

impl Errors {
    fn add(&mut self, predicted: f64, actual: f64) {
        let e = predicted - actual;
        self.abs += e.abs();
        self.sq += e * e;
        self.n += 1;
    }

    fn mae(&self) -> f64 {
        self.abs / self.n.max(1) as f64
    }

    fn rmse(&self) -> f64 {
        (self.sq / self.n.max(1) as f64).sqrt()
    }
}

/// Everything measured on one series.
struct Report {
    name: String,
    path: PathBuf,
    rows: usize,
    train: usize,
    test: usize,
    ewma_alpha: f64,
    svr: SvrParams,
    validation_mae: f64,
    last_value: Errors,
    ewma: Errors,
    svr_err: Errors,
    selected: Errors,
    /// Test ticks at which the SVR had no prediction (last value stood in).
    svr_missing: usize,
    /// Test ticks at which the selector chose the SVR.
    svr_chosen: usize,
    refits: usize,
    refit_failures: usize,
    refit_ms_median: f64,
    support_vectors: usize,
    kernel_width: f64,
    /// Fit time in ms for each of [`FIT_WINDOWS`].
    fit_ms: Vec<f64>,
    predict_us: f64,
    seconds: f64,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("predictor bench: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let started = Instant::now();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.canonicalize().unwrap_or(root);
    let files = series_files(&root, std::env::args().skip(1))?;
    // Read and check every file before spending minutes on the first.
    let mut series = Vec::new();
    for path in &files {
        series.push((path.clone(), load_series(path)?));
    }
    let mut reports = Vec::new();
    for (path, values) in &series {
        let report = evaluate(path, values)?;
        eprintln!("  {}: done in {:.1} s", report.name, report.seconds);
        reports.push(report);
    }
    let total = started.elapsed().as_secs_f64();
    print_table(&reports, total);
    write_json(&root, &reports, total)
}

/// The files to replay, from the command line and the default folder.
fn series_files(
    root: &Path,
    mut args: impl Iterator<Item = String>,
) -> Result<Vec<PathBuf>, String> {
    let usage = "usage: predictor [--series PATH]... [--add-series PATH]...";
    let (mut replace, mut add) = (Vec::new(), Vec::new());
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // cargo bench passes this to every bench target.
            "--bench" => {}
            "--series" | "--add-series" => {
                let path = args
                    .next()
                    .ok_or_else(|| format!("{arg} needs a path; {usage}"))?;
                if arg == "--series" {
                    replace.push(PathBuf::from(path));
                } else {
                    add.push(PathBuf::from(path));
                }
            }
            "--help" | "-h" => return Err(usage.to_string()),
            other => return Err(format!("unknown argument {other:?}; {usage}")),
        }
    }
    let mut files = if replace.is_empty() {
        let dir = root.join("testdata/nab");
        let entries =
            std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "csv"))
            .collect();
        found.sort();
        if found.is_empty() {
            return Err(format!("no *.csv in {}", dir.display()));
        }
        found
    } else {
        replace
    };
    files.extend(add);
    Ok(files)
}

/// The values of a `timestamp,value` file; the error names the file and line.
fn load_series(path: &Path) -> Result<Vec<f64>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Series::parse(&path.display().to_string(), &text, MIN_ROWS)
        .map(|s| s.values)
        .map_err(|e| e.to_string())
}

/// The (features at t, value at t + 1) samples of `values`, in order.
fn samples(spec: &FeatureSpec, values: &[f64]) -> Result<(Vec<Vec<f64>>, Vec<f64>), String> {
    let mut window = FeatureWindow::new(spec.clone()).map_err(|e| e.to_string())?;
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    let mut previous: Option<Vec<f64>> = None;
    for &y in values {
        if let Some(features) = previous.take() {
            rows.push(features);
            targets.push(y);
        }
        window.push(y, &[]).map_err(|e| e.to_string())?;
        previous = window.features();
    }
    Ok((rows, targets))
}

/// The SVR parameters tried on the validation split.
fn candidates() -> Vec<SvrParams> {
    let mut out = Vec::new();
    for anchor in [Some(0), None] {
        for c in [0.3, 1.0, 3.0] {
            for loss_epsilon in [0.05, 0.2] {
                out.push(SvrParams {
                    window: WINDOW,
                    c,
                    loss_epsilon,
                    kernel_width: KernelWidth::Median { factor: 1.0 },
                    anchor,
                    ..SvrParams::default()
                });
            }
        }
    }
    out
}

fn evaluate(path: &Path, values: &[f64]) -> Result<Report, String> {
    let started = Instant::now();
    let name = path.file_stem().map_or_else(
        || path.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    );
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("{}: {what}: {e}", path.display());
    let n = values.len();
    let split = n / 2;
    let train = &values[..split];
    let spec = FeatureSpec::default();

    // Choices made on the training half only.
    let (ewma_alpha, _) =
        Ewma::choose_alpha(train, &Ewma::DEFAULT_ALPHAS).map_err(|e| fail("EWMA alpha", &e))?;
    let (rows, targets) = samples(&spec, train)?;
    let train_set = TrainingSet::new(spec.len(), rows.concat(), targets)
        .map_err(|e| fail("training set", &e))?;
    let validation = ((train_set.len() as f64) * VALIDATION_SHARE) as usize;
    let (svr, validation_mae) = train_set
        .choose_params(&candidates(), validation)
        .map_err(|e| fail("choosing SVR parameters", &e))?;

    // Fit time at several window sizes, on the newest samples of the whole series (a
    // cost figure only: nothing learnt here is used for predictions). A series too
    // short for a window size gets no figure (NaN, null in the JSON).
    let (rows, targets) = samples(&spec, values)?;
    let all_set =
        TrainingSet::new(spec.len(), rows.concat(), targets).map_err(|e| fail("timing set", &e))?;
    let mut fit_ms = Vec::new();
    for w in FIT_WINDOWS {
        if all_set.len() < w {
            fit_ms.push(f64::NAN);
            continue;
        }
        let params = SvrParams {
            window: w,
            ..svr.clone()
        };
        let mut runs = Vec::new();
        for _ in 0..FIT_RUNS {
            let t = Instant::now();
            let fitted = all_set.fit(&params).map_err(|e| fail("timed fit", &e))?;
            runs.push(t.elapsed().as_secs_f64() * 1e3);
            black_box(fitted);
        }
        fit_ms.push(median(runs.into_iter()));
    }

    // The walk-forward replay.
    let mut model = BackendModel::new(BackendModelConfig {
        features: spec.clone(),
        svr: svr.clone(),
        ewma_alpha,
        ..BackendModelConfig::default()
    })
    .map_err(|e| fail("model", &e))?;
    let mut last_value = Errors::default();
    let mut ewma = Errors::default();
    let mut svr_err = Errors::default();
    let mut selected = Errors::default();
    let (mut svr_missing, mut svr_chosen, mut refits, mut refit_failures) = (0, 0, 0, 0);
    let mut refit_ms = Vec::new();
    let mut pending: Option<Forecast> = None;
    for (t, &y) in values.iter().enumerate() {
        if let Some(forecast) = pending.take() {
            let lv = forecast.last_value.unwrap_or(y);
            last_value.add(lv, y);
            ewma.add(forecast.ewma.unwrap_or(lv), y);
            match forecast.svr {
                Some(p) => svr_err.add(p, y),
                None => {
                    svr_missing += 1;
                    svr_err.add(lv, y);
                }
            }
            selected.add(forecast.value.unwrap_or(lv), y);
            svr_chosen += usize::from(forecast.choice.uses_model);
        }
        // Refit between ticks, so the forecast for the first test value already uses
        // a model trained on the training half only.
        if t + 1 >= split && (t + 1 - split).is_multiple_of(REFIT_EVERY) {
            let snapshot = model.training_set();
            let clock = Instant::now();
            let result = snapshot.fit(model.svr_params());
            refit_ms.push(clock.elapsed().as_secs_f64() * 1e3);
            refits += 1;
            match result {
                Ok(fitted) => model.install(fitted).map_err(|e| fail("install", &e))?,
                Err(_) => refit_failures += 1,
            }
        }
        let forecast = model.tick(y, &[]).map_err(|e| fail("tick", &e))?;
        if t + 1 >= split && t + 1 < n {
            pending = Some(forecast);
        }
    }

    // Prediction time of the last fitted model, on the test half's features.
    let fitted = model
        .svr()
        .fitted()
        .ok_or_else(|| format!("{}: the SVR was never fitted", path.display()))?;
    let (mut rows, _) = samples(&spec, &values[split..])?;
    rows.truncate(PREDICT_CALLS);
    let clock = Instant::now();
    let mut calls = 0;
    while calls < PREDICT_CALLS {
        for row in &rows {
            black_box(fitted.predict(black_box(row)).ok());
            calls += 1;
        }
    }
    let predict_us = clock.elapsed().as_secs_f64() * 1e6 / calls as f64;

    refit_ms.sort_by(f64::total_cmp);
    Ok(Report {
        name,
        path: path.to_path_buf(),
        rows: n,
        train: split,
        test: n - split,
        ewma_alpha,
        validation_mae,
        last_value,
        ewma,
        svr_err,
        selected,
        svr_missing,
        svr_chosen,
        refits,
        refit_failures,
        refit_ms_median: refit_ms
            .get(refit_ms.len() / 2)
            .copied()
            .unwrap_or(f64::NAN),
        support_vectors: fitted.support_vectors(),
        kernel_width: fitted.kernel_width(),
        svr,
        fit_ms,
        predict_us,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn print_table(reports: &[Report], total: f64) {
    println!("one-step-ahead error on the second half of each series (walk-forward)");
    println!(
        "SVR refitted every {REFIT_EVERY} ticks on a {WINDOW}-sample window; EWMA alpha and SVR \
         parameters chosen on the first half only"
    );
    println!();
    println!(
        "{:<32} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>6} {:>5}",
        "series",
        "svr MAE",
        "last MAE",
        "ewma MAE",
        "sel MAE",
        "svr RMSE",
        "last RMSE",
        "ewma RMSE",
        "sel RMSE",
        "alpha",
        "best"
    );
    let mut wins = 0;
    for r in reports {
        let best_baseline = r.last_value.mae().min(r.ewma.mae());
        let svr_wins = r.svr_err.mae() < best_baseline;
        wins += usize::from(svr_wins);
        println!(
            "{:<32} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>6.2} {:>5}",
            r.name,
            num(r.svr_err.mae()),
            num(r.last_value.mae()),
            num(r.ewma.mae()),
            num(r.selected.mae()),
            num(r.svr_err.rmse()),
            num(r.last_value.rmse()),
            num(r.ewma.rmse()),
            num(r.selected.rmse()),
            r.ewma_alpha,
            if svr_wins {
                "svr"
            } else if r.ewma.mae() < r.last_value.mae() {
                "ewma"
            } else {
                "last"
            }
        );
    }
    println!();
    println!("SVR MAE / best baseline MAE, and what was chosen on the training half");
    println!(
        "{:<32} {:>7} {:>8} {:>6} {:>6} {:>7} {:>5} {:>10} {:>6} {:>7} {:>7}",
        "series",
        "ratio",
        "svr used",
        "c",
        "eps",
        "target",
        "SVs",
        "width",
        "refits",
        "failed",
        "fit ms"
    );
    for r in reports {
        let ratio = r.svr_err.mae() / r.last_value.mae().min(r.ewma.mae());
        println!(
            "{:<32} {:>7.3} {:>7.1}% {:>6} {:>6} {:>7} {:>5} {:>10} {:>6} {:>7} {:>7.1}",
            r.name,
            ratio,
            100.0 * r.svr_chosen as f64 / r.test.max(1) as f64,
            r.svr.c,
            r.svr.loss_epsilon,
            if r.svr.anchor.is_some() {
                "change"
            } else {
                "level"
            },
            r.support_vectors,
            num(r.kernel_width),
            r.refits,
            r.refit_failures,
            r.refit_ms_median
        );
    }
    println!();
    println!(
        "SVR beats both baselines (MAE) on {wins} of {} series",
        reports.len()
    );
    println!();
    println!(
        "fit time (ms, median of {FIT_RUNS}) by window size, and prediction time per call \
         (one backend, {PREDICT_CALLS} calls)"
    );
    print!("{:<32}", "series");
    for w in FIT_WINDOWS {
        print!(" {:>9}", format!("fit {w}"));
    }
    println!(" {:>11}", "predict µs");
    for r in reports {
        print!("{:<32}", r.name);
        for ms in &r.fit_ms {
            if ms.is_finite() {
                print!(" {ms:>9.1}");
            } else {
                print!(" {:>9}", "-");
            }
        }
        println!(" {:>11.2}", r.predict_us);
    }
    print!("{:<32}", "median");
    for i in 0..FIT_WINDOWS.len() {
        let ms = median(reports.iter().map(|r| r.fit_ms[i]));
        if ms.is_finite() {
            print!(" {ms:>9.1}");
        } else {
            print!(" {:>9}", "-");
        }
    }
    println!(" {:>11.2}", median(reports.iter().map(|r| r.predict_us)));
    println!();
    println!("total run time {total:.1} s");
}

/// A number in a width-friendly form: plain for ordinary magnitudes, else scientific.
fn num(v: f64) -> String {
    if v != 0.0 && !(1e-3..1e6).contains(&v.abs()) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

/// The (upper) median of the finite values, or NaN if there are none.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.filter(|v| v.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A JSON number, or null for NaN and infinities.
fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".to_string()
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn errors_json(e: &Errors) -> String {
    format!(
        "{{\"mae\": {}, \"rmse\": {}, \"n\": {}}}",
        json_num(e.mae()),
        json_num(e.rmse()),
        e.n
    )
}

fn write_json(root: &Path, reports: &[Report], total: f64) -> Result<(), String> {
    let mut json = String::new();
    let _ = write!(
        json,
        "{{\n  \"method\": {{\"split\": 0.5, \"refit_every\": {REFIT_EVERY}, \"window\": {WINDOW}, \
         \"validation_share\": {VALIDATION_SHARE}, \"error_window\": {}, \"min_scores\": {}, \
         \"features\": {}}},\n  \"series\": [",
        BackendModelConfig::default().error_window,
        BackendModelConfig::default().min_scores,
        json_str(&FeatureSpec::default().names().join(","))
    );
    for (i, r) in reports.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let fit: Vec<String> = FIT_WINDOWS
            .iter()
            .zip(&r.fit_ms)
            .map(|(w, ms)| format!("\"{w}\": {}", json_num(*ms)))
            .collect();
        let _ = write!(
            json,
            "{sep}\n    {{\"name\": {}, \"path\": {}, \"rows\": {}, \"train\": {}, \"test\": {}, \
             \"ewma_alpha\": {}, \"svr_params\": {{\"c\": {}, \"loss_epsilon\": {}, \
             \"target\": {}, \"window\": {}}}, \"validation_mae\": {}, \
             \"svr\": {}, \"last_value\": {}, \"ewma\": {}, \"selected\": {}, \
             \"svr_beats_baselines\": {}, \"svr_chosen_ticks\": {}, \"svr_missing_ticks\": {}, \
             \"refits\": {}, \"refit_failures\": {}, \"refit_ms_median\": {}, \
             \"support_vectors\": {}, \"kernel_width\": {}, \"fit_ms\": {{{}}}, \
             \"predict_us\": {}, \"seconds\": {}}}",
            json_str(&r.name),
            json_str(&r.path.display().to_string()),
            r.rows,
            r.train,
            r.test,
            json_num(r.ewma_alpha),
            json_num(r.svr.c),
            json_num(r.svr.loss_epsilon),
            json_str(if r.svr.anchor.is_some() {
                "change"
            } else {
                "level"
            }),
            r.svr.window,
            json_num(r.validation_mae),
            errors_json(&r.svr_err),
            errors_json(&r.last_value),
            errors_json(&r.ewma),
            errors_json(&r.selected),
            r.svr_err.mae() < r.last_value.mae().min(r.ewma.mae()),
            r.svr_chosen,
            r.svr_missing,
            r.refits,
            r.refit_failures,
            json_num(r.refit_ms_median),
            r.support_vectors,
            json_num(r.kernel_width),
            fit.join(", "),
            json_num(r.predict_us),
            json_num(r.seconds)
        );
    }
    let wins = reports
        .iter()
        .filter(|r| r.svr_err.mae() < r.last_value.mae().min(r.ewma.mae()))
        .count();
    let _ = write!(
        json,
        "\n  ],\n  \"svr_wins\": {wins},\n  \"series_count\": {},\n  \"total_seconds\": {}\n}}\n",
        reports.len(),
        json_num(total)
    );
    let path = std::env::var_os("LB_BENCH_JSON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/bench/predictor.json"));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    std::fs::write(&path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!("figures written to {}", path.display());
    Ok(())
}
