//! `lb-bench-versus`: the head-to-head benchmark. The same traffic to the VIP through
//! the XDP balancer (the real agent, L2 direct server return), HAProxy (TCP mode),
//! nginx (`stream`) and no balancer at all, interleaved over rounds on one topology
//! of network namespaces (`lb_tests::versus`). Prints Markdown tables and writes
//! `target/bench/versus.md` and `target/bench/versus.json` (or `$LB_BENCH_JSON`).
//!
//! ```text
//! LB_BIN=... lb-bench-versus [--repeats 3] [--duration 10] [--concurrency 64]
//!     [--open-loop-fraction 0.5] [--light-fraction 0.25] [--bulk-connections 4]
//!     [--systems xdp,haproxy,nginx,direct]
//!     [--client-threads N] [--backend-threads N] [--timeout 5] [--warmup 1]
//!     [--max-other-pct 20] [--quiet-wait 120] [--attempts 3]
//! ```
//!
//! The machine may be shared: before every window the benchmark waits until other
//! processes use at most `--max-other-pct` of one CPU, and measures a window again
//! when they used more during it (see `lb_tests::versus::Settings`).
//!
//! `--systems` may also name `xdp-generic`, a diagnostic: the XDP balancer in
//! generic (skb) mode.
//!
//! Needs root (namespaces, XDP), `/usr/sbin/haproxy`, `/usr/sbin/nginx` and nginx's
//! stream module (`cargo xtask bench versus` installs them). Ctrl-C removes every
//! namespace of the run, which kills the proxies in them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_tests::testbed;
use lb_tests::versus::{self, Settings, systems::System};

const USAGE: &str = "usage: lb-bench-versus [--repeats N] [--duration SECONDS] \
    [--concurrency N] [--open-loop-fraction F] [--light-fraction F] [--bulk-connections N] \
    [--systems xdp,haproxy,nginx,direct] [--client-threads N] [--backend-threads N] \
    [--timeout SECONDS] [--warmup SECONDS] [--max-other-pct PCT] [--quiet-wait SECONDS] \
    [--attempts N]";

fn parse_args() -> Result<Settings> {
    let mut s = Settings::default();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = || -> Result<String> {
            match inline.clone().or_else(|| it.next()) {
                Some(v) => Ok(v),
                None => bail!("{key} needs a value\n{USAGE}"),
            }
        };
        let seconds = |v: String| -> Result<Duration> {
            let x: f64 = v.parse().with_context(|| format!("{key}: {v:?}"))?;
            if !(x.is_finite() && x > 0.0) {
                bail!("{key} must be a positive number of seconds");
            }
            Ok(Duration::from_secs_f64(x))
        };
        let count = |v: String| -> Result<usize> {
            let n: usize = v.parse().with_context(|| format!("{key}: {v:?}"))?;
            if n == 0 {
                bail!("{key} must be at least 1");
            }
            Ok(n)
        };
        match key.as_str() {
            "--repeats" => s.repeats = count(value()?)?,
            "--duration" => s.duration = seconds(value()?)?,
            "--concurrency" => s.concurrency = count(value()?)?,
            "--bulk-connections" => s.bulk_connections = count(value()?)?,
            "--client-threads" => s.client_threads = count(value()?)?,
            "--backend-threads" => s.backend_threads = count(value()?)?,
            "--timeout" => s.timeout = seconds(value()?)?,
            "--warmup" => s.warmup = seconds(value()?)?,
            "--quiet-wait" => s.quiet_wait = seconds(value()?)?,
            "--attempts" => s.attempts = count(value()?)?,
            "--max-other-pct" => {
                let v = value()?;
                let p: f64 = v.parse().with_context(|| format!("{key}: {v:?}"))?;
                if p.is_nan() || p < 0.0 {
                    bail!("--max-other-pct must be a percentage of one CPU");
                }
                s.max_other_pct = p;
            }
            "--open-loop-fraction" | "--light-fraction" => {
                let v = value()?;
                let f: f64 = v.parse().with_context(|| format!("{key}: {v:?}"))?;
                if !(f > 0.0 && f <= 1.0) {
                    bail!("{key} must be in (0, 1]");
                }
                if key == "--open-loop-fraction" {
                    s.open_loop_fraction = f;
                } else {
                    s.light_fraction = f;
                }
            }
            "--systems" => {
                s.systems = value()?
                    .split(',')
                    .filter(|x| !x.trim().is_empty())
                    .map(|x| {
                        System::from_name(x.trim()).with_context(|| {
                            format!(
                                "unknown system {x:?} (xdp, haproxy, nginx, direct, xdp-generic)"
                            )
                        })
                    })
                    .collect::<Result<_>>()?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(s)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn version_of(program: &str, arg: &str) -> String {
    std::process::Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

fn bench_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("target/bench"), |r| r.join("target/bench"))
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("\nlb-bench-versus: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let settings = parse_args()?;
    lb_tests::spread::lb_binary()?;
    // The proxies live inside the namespaces, so the cleanup ends them too.
    testbed::prepare_process("lb-bench-versus");
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let load_start = loadavg();
    let windows = settings.repeats * settings.systems.len() * versus::Phase::ALL.len();
    eprintln!(
        "lb-bench-versus: {} round(s) x {} systems x {} windows of {:.0} s = {windows} windows \
         (about {:.0} min); load average {load_start}",
        settings.repeats,
        settings.systems.len(),
        versus::Phase::ALL.len(),
        settings.duration.as_secs_f64(),
        (windows as f64 * (settings.duration.as_secs_f64() + 2.5)) / 60.0
    );
    let started = Instant::now();
    let mut say = |line: &str| {
        eprintln!("[{:>5.0} s] {line}", started.elapsed().as_secs_f64());
    };
    let outcome = versus::run(&settings, &mut say)?;
    let load_end = loadavg();
    let haproxy = version_of(versus::systems::HAPROXY, "-v");
    let nginx = version_of(versus::systems::NGINX, "-v");
    let host_line = format!(
        "{cpus} CPUs, Linux {kernel}, {haproxy}, {nginx}; load average {load_start} at the \
         start, {load_end} at the end; {:.1} min",
        outcome.wall_s / 60.0
    );
    let host = serde_json::json!({
        "cpus": cpus,
        "kernel": kernel,
        "haproxy": haproxy,
        "nginx": nginx,
        "load_average_start": load_start,
        "load_average_end": load_end,
    });
    let markdown = versus::report::markdown(&settings, &outcome, &host_line);
    println!("\n{markdown}");
    let dir = bench_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let json_path = std::env::var_os("LB_BENCH_JSON")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join("versus.json"));
    let md_path = json_path.with_extension("md");
    std::fs::write(&md_path, &markdown)?;
    let json = versus::report::json(&settings, &outcome, &host);
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)?;
    eprintln!(
        "lb-bench-versus: {} windows ({} failed) in {:.1} min; wrote {} and {}",
        outcome.records.len(),
        outcome.failures.len(),
        outcome.wall_s / 60.0,
        md_path.display(),
        json_path.display()
    );
    if outcome.records.is_empty() {
        bail!("no window succeeded");
    }
    Ok(())
}
