//! `lb-bench-flood`: a SYN flood against the real agent, with its flood guard and
//! without it, in the same run (`lb_tests::flood`).
//!
//! ```text
//! LB_BIN=... lb-bench-flood [--syns N] [--connections N]
//! ```
//!
//! Each half: long-lived TCP connections through the XDP program, a weight change,
//! then, while the weights change every second, `--syns` spoofed SYNs (default ten times the IPv4 connection table) through
//! the agent's own program by `BPF_PROG_TEST_RUN`, with new connections made through
//! the real datapath meanwhile. Prints both and writes `target/bench/flood.json` (or
//! `$LB_BENCH_JSON`) with `flood_syns`, `table_entries`, `established_broken` (guard
//! on), `established_broken_without` (guard off), `syn_ns_per_packet` (guard on;
//! `syn_ns_per_packet_without` beside it) and `legit_connect_success` (guard on).
//! Needs root.

use anyhow::{Context, Result, bail};
use lb_tests::flood::{FloodOptions, FloodReport, run};
use serde_json::json;

const USAGE: &str = "usage: lb-bench-flood [--syns N] [--connections N]";

fn main() -> Result<()> {
    let mut options = FloodOptions {
        connections: 200,
        syns: 10 * u64::from(lb_common::maps::CONN_TABLE_SIZE_V4),
        guard: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(key) = it.next() {
        if key == "--help" || key == "-h" {
            println!("{USAGE}");
            return Ok(());
        }
        let value = it
            .next()
            .with_context(|| format!("{key} needs a value\n{USAGE}"))?;
        let number: u64 = value
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .with_context(|| format!("{key}: {value:?} is not a positive whole number"))?;
        match key.as_str() {
            "--syns" => options.syns = number,
            "--connections" => options.connections = number as usize,
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    let with = run(options).context("the flood with the guard on")?;
    print(&with);
    let without = run(FloodOptions {
        guard: false,
        ..options
    })
    .context("the flood with the guard off")?;
    print(&without);
    let doc = json!({
        "flood_syns": with.flood_syns,
        "table_entries": with.table_entries,
        "connections": with.connections,
        "established_broken": with.established_broken,
        "established_broken_without": without.established_broken,
        "entries_lost": with.entries_lost,
        "entries_lost_without": without.entries_lost,
        "non_syn_misses": with.non_syn_misses,
        "non_syn_misses_without": without.non_syn_misses,
        "syn_ns_per_packet": with.syn_ns_per_packet,
        "syn_ns_per_packet_without": without.syn_ns_per_packet,
        "legit_connect_success": with.legit_connect_success(),
        "legit_connect_success_without": without.legit_connect_success(),
        "legit_attempts": with.legit_attempts,
        "flood_seconds": with.flood_seconds,
        "weight_changes": with.weight_changes,
        "flood_episodes": with.flood_episodes,
        "weight_changes_without": without.weight_changes,
        "flood_seconds_without": without.flood_seconds,
        "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
    });
    let path = std::env::var("LB_BENCH_JSON").unwrap_or_else(|_| "target/bench/flood.json".into());
    if let Some(dir) = std::path::Path::new(&path).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {path}"))?;
    println!("wrote {path}");
    Ok(())
}

fn print(r: &FloodReport) {
    println!(
        "guard {}: {} SYNs in {:.1} s ({:.0} ns each in the program) against a table of {}; \
         long-lived connections {}: entries lost {}, broken {}; non-SYN misses {}; \
         weight changes {}; new connections during the flood {}/{} ({:.2} %)",
        if r.guard { "on" } else { "OFF" },
        r.flood_syns,
        r.flood_seconds,
        r.syn_ns_per_packet,
        r.table_entries,
        r.connections,
        r.entries_lost,
        r.established_broken,
        r.non_syn_misses,
        r.weight_changes,
        r.legit_ok,
        r.legit_attempts,
        100.0 * r.legit_connect_success(),
    );
}
