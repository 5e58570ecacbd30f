//! `cargo xtask demo`: the load balancer's main job on a built-in default, in two
//! parts, all in network namespaces created here and removed at the end (and on
//! Ctrl-C):
//! 1. Spread: a client, the load balancer and three backends weighted 1, 2, 3; real
//!    TCP connections to the VIP through the XDP program, and how they spread.
//! 2. Adapt: scenario S2 of the policy benchmark on the real datapath under the `ai`
//!    policy: four equal backends, one of which turns 4× slower for the middle third
//!    of the run. A live view shows each backend's weight, latency and predicted
//!    latency as the agent sees them; the run ends with its report and plots.
//!
//! `--spread-only` stops after part 1; `--duration-s N` sets part 2's length (45 s).

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::{
    spread,
    testbed::{
        self,
        report::{OutputPaths, RunRecord, Settings},
        scenario::{RunOptions, Scenario},
    },
};
use lb_userspace::core::policy::{PolicyKind, Variant};

const WEIGHTS: [u32; 3] = [1, 2, 3];
const CONNECTIONS: usize = 600;
const USAGE: &str = "usage: lb-demo [--spread-only] [--duration-s SECONDS]";

fn main() {
    if let Err(e) = real_main() {
        eprintln!("\nlb-demo: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let mut spread_only = false;
    let mut duration_s = 45.0;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--spread-only" => spread_only = true,
            "--duration-s" => {
                duration_s = args
                    .next()
                    .context("--duration-s needs a value")?
                    .parse()
                    .context("--duration-s")?;
                if !(9.0..=3600.0).contains(&duration_s) {
                    bail!("--duration-s must be 9..3600 seconds\n{USAGE}");
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    spread_demo()?;
    if !spread_only {
        adapt_demo(duration_s)?;
    }
    Ok(())
}

fn spread_demo() -> Result<()> {
    println!(
        "== 1. spread: client -> XDP load balancer (L2 DSR) -> 3 backends weighted \
         {WEIGHTS:?}, {CONNECTIONS} TCP connections to {}:{}",
        lb_tests::topology::VIP_V4,
        spread::PORT
    );
    let report = spread::run(&WEIGHTS, CONNECTIONS)?;
    for line in report
        .agent_log
        .iter()
        .filter(|l| l.contains("VIP") || l.contains("frames"))
    {
        println!("agent: {line}");
    }
    println!();
    print!("{}", report.table());
    println!(
        "\n{} of {} connections answered; latency p50 {:?}, p99 {:?}; chi-square against the \
         weights {:.2} (2 degrees of freedom; above 27.6 would mean p < 1e-6)",
        report.clients.succeeded(),
        report.clients.attempted,
        report.clients.latency_quantile(0.5).unwrap_or_default(),
        report.clients.latency_quantile(0.99).unwrap_or_default(),
        report.chi_square()
    );
    ensure!(
        report.clients.all_succeeded(),
        "failed connections: {}",
        report.clients.summary()
    );
    Ok(())
}

fn adapt_demo(duration_s: f64) -> Result<()> {
    testbed::prepare_process("lb-demo");
    let scenario = Scenario::get("S2", Duration::from_secs_f64(duration_s)).expect("S2 exists");
    println!(
        "\n== 2. adapt: {} ({}), policy ai, {duration_s:.0} s of open-loop load, one new TCP \
         connection per request\n",
        scenario.title, scenario.load
    );
    let mut opts = RunOptions::new(Variant::of(PolicyKind::Ai));
    opts.live = true;
    let started = std::time::Instant::now();
    let run = testbed::scenario::run(&scenario, &opts)?;
    let wall_s = started.elapsed().as_secs_f64();
    let record = RunRecord::new(&scenario, &run, 1, wall_s);
    println!("\n{}\n", record.metrics.summary());
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("target/demo"), |p| p.join("target/demo"));
    let paths = OutputPaths {
        markdown: root.join("report.md"),
        plots: root.clone(),
        json: root.join("demo.json"),
    };
    let settings = Settings {
        scenarios: vec!["S2".into()],
        repeats: 1,
        duration_s,
        health_metrics: opts.health_metrics,
        quick: false,
        wall_s,
        host: String::new(),
    };
    let written = testbed::report::write_all(
        &settings,
        std::slice::from_ref(&scenario),
        std::slice::from_ref(&record),
        &[],
        &paths,
    )?;
    println!("report and plots:");
    for path in written {
        println!("  {}", path.display());
    }
    ensure!(
        run.load.total() > 0,
        "no request was sent; see the agent's log above"
    );
    Ok(())
}
