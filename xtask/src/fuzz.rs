//! `cargo xtask fuzz`: fuzzes the parsers that take input from outside the agent
//! (the configuration file, a backend's Prometheus text, control-socket requests) for
//! a bounded time, and says what ran, for how long, and what was found.
//!
//! Where cargo-fuzz can run (a nightly toolchain, a C++ compiler for libFuzzer, and
//! cargo-fuzz itself, installed into `.tools/` from crates.io when missing), each
//! target of `fuzz/` runs for `--seconds` under libFuzzer (`-max_total_time`), its
//! corpus growing in `fuzz/corpus/TARGET` from the seeds in `fuzz/seeds/TARGET`; a
//! crash is saved in `fuzz/artifacts/TARGET/`. Elsewhere the proptest fuzz tests of
//! lb-userspace (`tests/fuzz.rs`, the same invariants) run with a large
//! `LB_FUZZ_CASES` sized to take about `--seconds` in all.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// A cargo-fuzz target, the proptest properties that check the same, and their
/// cost: milliseconds per case, all of them together, in a debug build (measured on
/// a busy two-core machine).
type Target = (&'static str, &'static [&'static str], u64);

const TARGETS: &[Target] = &[
    ("config", &["generated_configs", "mutated_config"], 9),
    (
        "prom_text",
        &["generated_expositions", "mutated_exposition"],
        18,
    ),
    ("control_api", &["generated_requests", "mutated_request"], 2),
];

/// The properties that feed random bytes and text to every parser, and their cost.
const RANDOM: Target = ("random", &["random_"], 9);

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Longest input libFuzzer makes (the proptest pass covers 100 KiB lines and 1 MiB
/// documents).
const MAX_LEN: u32 = 128 * 1024;

/// One input taking longer than this is a finding (a hang or a quadratic path).
const INPUT_TIMEOUT_S: u32 = 10;

pub fn run(root: &Path, seconds: u64, target: Option<&str>) -> anyhow::Result<()> {
    if seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    let targets: Vec<_> = match target {
        None => TARGETS.to_vec(),
        Some(name) => match TARGETS.iter().find(|(t, _, _)| *t == name) {
            Some(t) => vec![*t],
            None => bail!(
                "no fuzz target {name:?}; the targets are {}",
                TARGETS
                    .iter()
                    .map(|(t, _, _)| *t)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    };
    match cargo_fuzz(root) {
        Ok(tools) => libfuzzer(root, &tools, seconds, &targets),
        Err(why) => {
            println!("fuzz: cargo-fuzz cannot run here ({why:#});");
            println!("fuzz: running the proptest fuzz tests of lb-userspace instead");
            proptest(root, seconds, &targets)
        }
    }
}

/// Makes sure cargo-fuzz can run: nightly, a C++ compiler, cargo-fuzz (installed into
/// `.tools/` when missing). Returns the directory to put first on PATH.
fn cargo_fuzz(root: &Path) -> anyhow::Result<PathBuf> {
    let ok = |cmd: &mut Command| {
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ok(Command::new("rustc").args(["+nightly", "--version"])) {
        bail!("no nightly toolchain; `rustup toolchain install nightly`");
    }
    if !ok(Command::new("c++").arg("--version")) {
        bail!("no C++ compiler (`c++`) to build libFuzzer; `apt-get install g++`");
    }
    let tools = root.join(".tools");
    let bin = tools.join("bin");
    if ok(Command::new(bin.join("cargo-fuzz")).args(["fuzz", "--version"])) {
        return Ok(bin);
    }
    println!(
        "fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION} into {}",
        tools.display()
    );
    let status = Command::new("cargo")
        .args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ])
        .arg("--root")
        .arg(&tools)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("running cargo install cargo-fuzz")?;
    if !status.success() || !ok(Command::new(bin.join("cargo-fuzz")).args(["fuzz", "--version"])) {
        bail!("installing cargo-fuzz failed ({status})");
    }
    Ok(bin)
}

/// `cargo +nightly fuzz ARGS` in the repository, with cargo-fuzz from `tools`.
fn cargo_fuzz_command(root: &Path, tools: &Path) -> Command {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![tools.to_path_buf()];
    paths.extend(std::env::split_paths(&path));
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "fuzz"])
        .current_dir(root)
        .env("PATH", std::env::join_paths(paths).expect("PATH entries"))
        // The parsers do not need the XDP program.
        .env("LB_SKIP_EBPF", "1")
        .env_remove("RUSTUP_TOOLCHAIN")
        // Its build (nightly, fuzzing instrumentation) stays in fuzz/target.
        .env_remove("CARGO_TARGET_DIR");
    cmd
}

/// Options of every `cargo fuzz build` and `run`: no sanitizer (the parsers are safe
/// Rust, so a crash is a panic, which libFuzzer catches anyway; without ASan the
/// targets run several times faster), with debug assertions (overflow checks).
const BUILD_OPTIONS: &[&str] = &["--sanitizer", "none", "--debug-assertions"];

struct Outcome {
    target: &'static str,
    /// Wall time, building included.
    took: Duration,
    /// Seconds libFuzzer itself ran.
    fuzzed_s: Option<u64>,
    runs: Option<u64>,
    corpus: Option<String>,
    found: Option<String>,
}

fn libfuzzer(root: &Path, tools: &Path, seconds: u64, targets: &[Target]) -> anyhow::Result<()> {
    let status = cargo_fuzz_command(root, tools)
        .arg("build")
        .args(BUILD_OPTIONS)
        .status()
        .context("running cargo fuzz build")?;
    if !status.success() {
        bail!("building the fuzz targets failed ({status})");
    }
    let mut outcomes = Vec::new();
    for &(target, _, _) in targets {
        let corpus = root.join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let logs = root.join("fuzz/target");
        std::fs::create_dir_all(&logs)?;
        let log_path = logs.join(format!("{target}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        println!(
            "fuzz: {target}: libFuzzer for {seconds} s (log: {})",
            log_path.display()
        );
        let start = Instant::now();
        let status = cargo_fuzz_command(root, tools)
            .arg("run")
            .args(BUILD_OPTIONS)
            .arg(target)
            .arg(&corpus)
            .arg(root.join("fuzz/seeds").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-max_len={MAX_LEN}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
            .arg("-print_final_stats=1")
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .with_context(|| format!("running cargo fuzz run {target}"))?;
        let took = start.elapsed();
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let stat = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let corpus_line = text
            .lines()
            .rev()
            .find(|l| l.contains(" corp: "))
            .and_then(|l| l.split(" corp: ").nth(1))
            .map(|c| c.split_whitespace().next().unwrap_or("").to_owned());
        let found = (!status.success()).then(|| {
            let artifact = text
                .lines()
                .find_map(|l| l.split("Test unit written to ").nth(1))
                .unwrap_or("no artifact written")
                .trim()
                .to_owned();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            eprintln!("fuzz: {target} FAILED ({status}); the end of its log:");
            for line in tail.iter().rev() {
                eprintln!("  {line}");
            }
            artifact
        });
        let fuzzed_s = text
            .lines()
            .find_map(|l| l.strip_prefix("Done ")?.split(" runs in ").nth(1))
            .and_then(|t| t.split_whitespace().next()?.parse().ok());
        outcomes.push(Outcome {
            target,
            took,
            fuzzed_s,
            runs: stat("number_of_executed_units"),
            corpus: corpus_line,
            found,
        });
    }
    report("libFuzzer (cargo-fuzz)", &outcomes)
}

fn report(how: &str, outcomes: &[Outcome]) -> anyhow::Result<()> {
    println!("\nfuzz: {how}");
    println!(
        "{:<12} {:>8} {:>8} {:>12} {:>14}  result",
        "target", "fuzzed s", "wall s", "inputs", "corpus"
    );
    for o in outcomes {
        println!(
            "{:<12} {:>8} {:>8.1} {:>12} {:>14}  {}",
            o.target,
            o.fuzzed_s.map_or("?".into(), |s| s.to_string()),
            o.took.as_secs_f64(),
            o.runs.map_or("?".into(), |r| r.to_string()),
            o.corpus.as_deref().unwrap_or("-"),
            match &o.found {
                None => "nothing found".to_owned(),
                Some(artifact) => format!("FOUND: {artifact}"),
            }
        );
    }
    let failed: Vec<_> = outcomes.iter().filter(|o| o.found.is_some()).collect();
    if !failed.is_empty() {
        bail!(
            "fuzzing found a problem in {}; reproduce with `cargo +nightly fuzz run TARGET \
             ARTIFACT` (PATH=.tools/bin:$PATH)",
            failed
                .iter()
                .map(|o| o.target)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// The proptest properties of `targets` (and the random ones, for all targets), with
/// as many cases as fit in `seconds` on one core (the tests run on every core, but
/// the machine is rarely idle; a busy one takes about `seconds`, an idle one less).
fn proptest(root: &Path, seconds: u64, targets: &[Target]) -> anyhow::Result<()> {
    let mut targets = targets.to_vec();
    if targets.len() == TARGETS.len() {
        targets.push(RANDOM);
    }
    let filters: Vec<&str> = targets
        .iter()
        .flat_map(|(_, p, _)| p.iter().copied())
        .collect();
    let ms_per_case: u64 = targets.iter().map(|(_, _, ms)| ms).sum();
    let cases = (seconds * 1000 / ms_per_case).max(500);
    println!(
        "fuzz: proptest properties {} with LB_FUZZ_CASES={cases} (about {seconds} s)",
        filters.join(", ")
    );
    let start = Instant::now();
    let status = super::cargo(root)
        .args(["test", "-p", "lb-userspace", "--test", "fuzz", "--"])
        .args(&filters)
        .env("LB_FUZZ_CASES", cases.to_string())
        .status()
        .context("running cargo test")?;
    let took = start.elapsed();
    println!(
        "\nfuzz: proptest ran {} for {:.1} s with {cases} cases each: {}",
        filters.join(", "),
        took.as_secs_f64(),
        if status.success() {
            "nothing found"
        } else {
            "FAILED (see above)"
        }
    );
    super::exit_like(status)
}
