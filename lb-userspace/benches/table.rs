//! Measures the weighted Maglev table builder at 65537 slots: how long a build takes
//! for 10, 100 and 1,000 backends, and how many slots a 10 % weight change of one
//! backend and the removal of one backend move, against the theoretical minimum.
//!
//! Run it as `cargo bench -p lb-userspace --bench table`. It prints a table and writes
//! every figure as JSON to the file named by `LB_BENCH_JSON`, or else to
//! `target/bench/table.json` under the workspace root.

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use lb_userspace::core::maglev::{self, MaglevBackend};

/// The table size every figure is for.
const SIZE: u32 = 65537;
/// The backend counts measured.
const COUNTS: [usize; 3] = [10, 100, 1000];
/// Timed builds per backend count; the median is reported.
const RUNS: usize = 21;
/// Random backend sets per backend count for the disruption figures.
const TRIALS: usize = 200;

/// splitmix64: a small, fixed random sequence, so every run measures the same sets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `n` backends keyed like the agent keys them (an IPv4 address mapped into 16
/// bytes), with distinct addresses and weights from `weight`.
fn backends(
    rng: &mut Rng,
    n: usize,
    mut weight: impl FnMut(&mut Rng) -> u32,
) -> Vec<([u8; 16], u32)> {
    let mut addresses = std::collections::BTreeSet::new();
    while addresses.len() < n {
        addresses.insert(rng.next() as u32);
    }
    let mut out: Vec<([u8; 16], u32)> = addresses
        .into_iter()
        .map(|a| {
            let mut key = [0u8; 16];
            key[10] = 0xff;
            key[11] = 0xff;
            key[12..].copy_from_slice(&a.to_be_bytes());
            (key, 0)
        })
        .collect();
    // Shuffle, so that input order and key order differ as they do in real configs.
    for i in (1..out.len()).rev() {
        out.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for b in &mut out {
        b.1 = weight(rng);
    }
    out
}

fn view(owned: &[([u8; 16], u32)]) -> Vec<MaglevBackend<'_>> {
    owned
        .iter()
        .map(|(key, weight)| MaglevBackend {
            key,
            weight: *weight,
        })
        .collect()
}

fn count(table: &[u32], index: usize) -> usize {
    table.iter().filter(|&&i| i as usize == index).count()
}

/// Order statistics of a sample.
struct Summary {
    min: f64,
    mean: f64,
    median: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn summarize(values: &mut [f64]) -> Summary {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    Summary {
        min: at(0.0),
        mean: values.iter().sum::<f64>() / values.len() as f64,
        median: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        max: at(1.0),
    }
}

fn summary_json(s: &Summary) -> String {
    format!(
        r#"{{"min": {:.4}, "mean": {:.4}, "median": {:.4}, "p90": {:.4}, "p99": {:.4}, "max": {:.4}}}"#,
        s.min, s.mean, s.median, s.p90, s.p99, s.max
    )
}

/// Build times in milliseconds for `n` backends with weights 1..=1000.
fn build_times(rng: &mut Rng, n: usize) -> Summary {
    let owned = backends(rng, n, |rng| 1 + rng.below(1000) as u32);
    let input = view(&owned);
    for _ in 0..3 {
        black_box(maglev::build(black_box(&input), black_box(SIZE)).unwrap());
    }
    let mut times: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            black_box(maglev::build(black_box(&input), black_box(SIZE)).unwrap());
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    summarize(&mut times)
}

/// What changing or removing one backend did over many random sets.
struct Disruption {
    /// Slots moved by a 10 % weight change, over the ideal `|Δshare| · size`.
    change_ratio: Summary,
    /// The ideal number of slots a 10 % weight change moves.
    change_ideal: Summary,
    /// How many weight changes moved more than 1.5× the ideal.
    change_over_1_5: usize,
    /// How many weight changes had an ideal of at least 40 slots, and how many of
    /// those moved more than 1.5× the ideal.
    change_large: (usize, usize),
    /// The most slots a weight change moved between two other backends.
    change_collateral_max: usize,
    /// Slots moved by removing a backend, over the slots it had.
    removal_ratio: Summary,
    /// Slots moved besides the removed backend's, as a percentage of the table.
    removal_extra_percent: Summary,
}

fn disruption(rng: &mut Rng, n: usize) -> Disruption {
    let (mut ratios, mut ideals, mut over, mut collateral_max) = (vec![], vec![], 0, 0);
    let mut large = (0, 0);
    let (mut removal_ratios, mut extras) = (vec![], vec![]);
    for trial in 0..TRIALS {
        // Weights are multiples of 10 from 10 to 10,000, so a 10 % change is exact.
        let owned = backends(rng, n, |rng| 10 * (1 + rng.below(1000) as u32));
        let k = rng.below(n as u64) as usize;
        let old = view(&owned);
        let old_table = maglev::build(&old, SIZE).unwrap();

        let mut changed = owned.clone();
        changed[k].1 = owned[k].1 / 10 * if trial % 2 == 0 { 11 } else { 9 };
        let new = view(&changed);
        let new_table = maglev::build(&new, SIZE).unwrap();
        let moved = maglev::moved_slots(&old, &old_table, &new, &new_table);
        let share = |b: &[([u8; 16], u32)]| {
            f64::from(b[k].1) / b.iter().map(|b| f64::from(b.1)).sum::<f64>()
        };
        let ideal = (share(&changed) - share(&owned)).abs() * f64::from(SIZE);
        let ratio = moved.len() as f64 / ideal;
        if ratio > 1.5 {
            over += 1;
        }
        if ideal >= 40.0 {
            large.0 += 1;
            if ratio > 1.5 {
                large.1 += 1;
            }
        }
        ratios.push(ratio);
        ideals.push(ideal);
        let collateral = moved
            .iter()
            .filter(|&&s| {
                old_table[s as usize] as usize != k && new_table[s as usize] as usize != k
            })
            .count();
        collateral_max = collateral_max.max(collateral);

        let mut removed = owned.clone();
        removed.remove(k);
        let gone = view(&removed);
        let gone_table = maglev::build(&gone, SIZE).unwrap();
        let moved = maglev::moved_slots(&old, &old_table, &gone, &gone_table).len();
        let its = count(&old_table, k);
        // A light backend among 1,000 may hold no slot at all; it moves nothing.
        if its > 0 {
            removal_ratios.push(moved as f64 / its as f64);
        }
        extras.push((moved - its) as f64 * 100.0 / f64::from(SIZE));
    }
    Disruption {
        change_ratio: summarize(&mut ratios),
        change_ideal: summarize(&mut ideals),
        change_over_1_5: over,
        change_large: large,
        change_collateral_max: collateral_max,
        removal_ratio: summarize(&mut removal_ratios),
        removal_extra_percent: summarize(&mut extras),
    }
}

/// The 1-minute load average, where the system tells it: build times on a busy
/// machine say little.
fn load_average() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

fn main() {
    let load = load_average();
    let mut rng = Rng(0x6d61_676c_6576);
    let times: Vec<(usize, Summary)> = COUNTS
        .iter()
        .map(|&n| (n, build_times(&mut rng, n)))
        .collect();
    let disruptions: Vec<(usize, Disruption)> = COUNTS
        .iter()
        .map(|&n| (n, disruption(&mut rng, n)))
        .collect();

    println!("weighted Maglev table, {SIZE} slots");
    println!();
    match load {
        Some(load) => {
            println!("build time (ms, {RUNS} runs, weights 1..=1000; load average {load:.2})")
        }
        None => println!("build time (ms, {RUNS} runs, weights 1..=1000)"),
    }
    println!(
        "{:>9} {:>8} {:>8} {:>8}",
        "backends", "median", "min", "max"
    );
    for (n, t) in &times {
        println!("{n:>9} {:>8.2} {:>8.2} {:>8.2}", t.median, t.min, t.max);
    }
    println!();
    println!(
        "10 % weight change of one backend ({TRIALS} random sets each, weights 10..=10000):\n\
         slots moved / ideal |Δshare|·size"
    );
    println!(
        "{:>9} {:>11} {:>7} {:>7} {:>7} {:>7} {:>7} {:>10} {:>14} {:>11}",
        "backends",
        "ideal slots",
        "mean",
        "median",
        "p90",
        "p99",
        "max",
        ">1.5×",
        "ideal≥40: >1.5×",
        "collateral"
    );
    for (n, d) in &disruptions {
        let (r, i) = (&d.change_ratio, &d.change_ideal);
        println!(
            "{n:>9} {:>11.1} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>6}/{TRIALS} {:>10}/{:<4} {:>11}",
            i.median,
            r.mean,
            r.median,
            r.p90,
            r.p99,
            r.max,
            d.change_over_1_5,
            d.change_large.1,
            d.change_large.0,
            d.change_collateral_max
        );
    }
    println!("(ideal slots: median; collateral: most slots moved between two other backends)");
    println!();
    println!("removal of one backend: slots moved / its slots, and extra slots as % of the table");
    println!(
        "{:>9} {:>7} {:>7} {:>11} {:>11}",
        "backends", "mean", "max", "extra mean", "extra max"
    );
    for (n, d) in &disruptions {
        let (r, e) = (&d.removal_ratio, &d.removal_extra_percent);
        println!(
            "{n:>9} {:>7.3} {:>7.3} {:>10.4}% {:>10.4}%",
            r.mean, r.max, e.mean, e.max
        );
    }

    let mut json = String::new();
    let load = load.map_or("null".to_string(), |l| format!("{l:.2}"));
    let _ = write!(
        json,
        "{{\n  \"table_size\": {SIZE},\n  \"load_average_1m\": {load},\n  \"build_ms\": ["
    );
    for (i, (n, t)) in times.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(
            json,
            "{sep}\n    {{\"backends\": {n}, \"runs\": {RUNS}, \"median\": {:.4}, \"min\": {:.4}, \"max\": {:.4}}}",
            t.median, t.min, t.max
        );
    }
    let _ = write!(json, "\n  ],\n  \"disruption\": [");
    for (i, (n, d)) in disruptions.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(
            json,
            "{sep}\n    {{\"backends\": {n}, \"trials\": {TRIALS}, \
             \"weight_change_10pct\": {{\"ideal_slots\": {}, \"moved_over_ideal\": {}, \
             \"over_1_5\": {}, \"ideal_at_least_40\": {}, \"ideal_at_least_40_over_1_5\": {}, \
             \"collateral_slots_max\": {}}}, \
             \"removal\": {{\"moved_over_own_slots\": {}, \"extra_percent_of_table\": {}}}}}",
            summary_json(&d.change_ideal),
            summary_json(&d.change_ratio),
            d.change_over_1_5,
            d.change_large.0,
            d.change_large.1,
            d.change_collateral_max,
            summary_json(&d.removal_ratio),
            summary_json(&d.removal_extra_percent),
        );
    }
    json.push_str("\n  ]\n}\n");

    let path = std::env::var_os("LB_BENCH_JSON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
            let root = manifest
                .parent()
                .expect("lb-userspace sits in the workspace");
            root.join("target/bench/table.json")
        });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create the bench output directory");
    }
    std::fs::write(&path, json).expect("write the bench JSON");
    println!();
    println!("wrote {}", path.display());
}
