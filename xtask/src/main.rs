//! Project tasks that cargo cannot do alone: install the eBPF toolchain, run the agent
//! with privileges, run every test in the right order with the right environment,
//! the demo and the benchmarks. `cargo xtask --help` lists them.

mod deploy;
mod fuzz;
mod setup;
mod simdiff;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

/// Tasks of the load balancer project.
#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building the XDP program needs (nightly rust-src, bpf-linker into
    /// `.tools/`), mount bpffs, and check the kernel (root, BPF syscall, BTF, XDP).
    /// Idempotent; every other task runs it first.
    Setup,
    /// Build the agent (`lb`) with its XDP program embedded.
    Build {
        /// Build with optimizations.
        #[arg(long)]
        release: bool,
    },
    /// Build the agent in release mode and run it: `cargo xtask run -- run --iface
    /// eth0 --config lb.toml`. Re-executes through `sudo -E` when not root.
    Run {
        /// Arguments for `lb`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: host unit tests, BPF packet tests and network-namespace
    /// end-to-end tests. Needs root.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The main job on a built-in default, in about a minute: a client, the load
    /// balancer and three weighted backends in network namespaces, real TCP
    /// connections through the XDP program and their spread over the backends; then
    /// the policy scenario S2 under `ai` with a live view of each backend's share,
    /// latency and prediction, ending with a report and plots in target/demo/.
    /// Needs root.
    Demo {
        /// Arguments for lb-demo: `--spread-only` (the first part alone),
        /// `--duration-s N` (the second part's length, 45 s by default).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz the parsers of outside input (config file, Prometheus text, control API)
    /// for a bounded time: each cargo-fuzz target in fuzz/ under libFuzzer (nightly;
    /// cargo-fuzz is installed into .tools/ when missing), or, where cargo-fuzz cannot
    /// run, lb-userspace's proptest fuzz tests with many cases. Prints what ran and for
    /// how long; fails if anything was found.
    Fuzz {
        /// Seconds per cargo-fuzz target (in all, for the proptest fallback).
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target: config, prom_text or control_api.
        target: Option<String>,
    },
    /// Benchmarks; each prints its figures and writes them to target/bench/NAME.json.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
    /// Compare two outputs of `cargo xtask bench sim` (target/bench/sim.json) on every
    /// figure but the wall-clock ones; fails if any differs. A change that must keep
    /// behaviour (a refactor of the control step) is checked with it.
    SimDiff {
        /// The output before the change.
        before: PathBuf,
        /// The output after it.
        after: PathBuf,
    },
    /// Check the files under deploy/ with the tools that read them: the systemd unit
    /// with `systemd-analyze verify`, the Kubernetes manifests with
    /// `kubernetes-validate --strict` against the API's schemas, the BIRD configuration
    /// with `bird -p`. Installs a missing tool (Debian packages as root); each check
    /// runs even when another fails.
    CheckDeploy,
}

#[derive(Subcommand)]
enum Bench {
    /// Maglev table build time for 10/100/1,000 backends and slots moved per weight
    /// change, against the theoretical minimum.
    Table,
    /// One control tick of the agent's pure part (every VIP's control step and the
    /// desired state) for 4 VIPs x 1,000 backends when one weight changes, against one
    /// table build measured in the same run.
    Control,
    /// ns/packet of each datapath path through BPF_PROG_TEST_RUN, as ratios to a
    /// program that only returns XDP_PASS. Needs root.
    Datapath,
    /// A SYN flood of ten times the connection table through the real agent's
    /// program, with long-lived connections idle through it, with the flood guard
    /// and without it in the same run. Writes target/bench/flood.json. Needs root.
    Flood {
        /// Arguments for lb-bench-flood (`--syns N`, `--connections N`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The discrete-event simulation: 120 backends, 100k+ requests per second, every
    /// scenario under every policy (`ai-svr`, `ai-ewma`, `ai-last` included), running
    /// the agent's own policy, table and model. Writes target/bench/sim.json.
    Sim,
    /// The weight policies on the real XDP testbed: every scenario under `equal`,
    /// `static`, `reactive`, `ai` and `ai` with each predictor set (`ai-svr`,
    /// `ai-ewma`, `ai-last`), interleaved, 3 repeats of 30 s (about 32 s a run with
    /// its setup). Writes target/bench/policies.md, policies.json and SVG plots.
    /// Needs root.
    Policies {
        /// Arguments for lb-bench-policies (e.g. `--quick`, `--scenarios S1,S2`,
        /// `--policies ai,ai-last,reactive`, `--series FILE` for S6's CPU series,
        /// relative to the workspace root).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The XDP balancer against HAProxy, nginx (stream) and no balancer at all, on one
    /// topology with four backends: new connections per second (closed loop), latency
    /// at a fixed open-loop rate, bulk throughput both ways, and the CPU each costs.
    /// Interleaved rounds (3 by default, about 10 minutes). Installs haproxy, nginx and
    /// libnginx-mod-stream when missing. Writes target/bench/versus.json. Needs root.
    Versus {
        /// Arguments for lb-bench-versus (e.g. `--repeats 1 --duration 2`, `--help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A fleet of LBs behind an ECMP router with a real etcd, `ai`, scenario S2:
    /// table agreement, apply lag, failover after the leader is killed, an etcd
    /// outage under load, p99 against one LB under the same load in the same run, and
    /// the established connections that survive an LB withdrawn with flow sharing and
    /// without it, with sharing's bytes per flow and agent CPU per 1,000 new flows/s
    /// (about 7 minutes). Writes target/bench/fleet.json. Needs root.
    Fleet {
        /// Arguments for lb-bench-fleet (e.g. `--duration 30 --outage 10`, `--help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// One-step-ahead error of the load model against last-value and EWMA on the
    /// real series in testdata/nab (and any `--series PATH`), fit and predict time.
    Predictor {
        /// More `timestamp,value` series files.
        #[arg(long)]
        series: Vec<std::path::PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Setup => setup::run(&root, setup::Report::Verbose),
        Task::Build { release } => {
            setup::run(&root, setup::Report::Quiet)?;
            build(&root, release)
        }
        Task::Run { args } => {
            if !setup::is_root() {
                return reexec_with_sudo();
            }
            setup::run(&root, setup::Report::Quiet)?;
            build(&root, true)?;
            let lb = root.join("target/release/lb");
            let status = Command::new(&lb)
                .args(&args)
                .status()
                .context("starting lb")?;
            exit_like(status)
        }
        Task::Test { args } => {
            require_root("tests attach XDP programs and create network namespaces")?;
            setup::run(&root, setup::Report::Quiet)?;
            build(&root, false)?;
            cargo(&root)
                .args(["test", "--workspace"])
                .args(&args)
                .env("LB_BIN", root.join("target/debug/lb"))
                .status()
                .context("running cargo test")
                .and_then(exit_like)
        }
        Task::Demo { args } => {
            require_root("the demo attaches XDP programs and creates network namespaces")?;
            setup::run(&root, setup::Report::Quiet)?;
            run_testbed_bin(&root, "lb-demo", false, &args, None).context("running the demo")
        }
        Task::Fuzz { seconds, target } => fuzz::run(&root, seconds, target.as_deref()),
        Task::Bench {
            which: Bench::Table,
        } => cargo(&root)
            .args(["bench", "-p", "lb-userspace", "--bench", "table"])
            .env("LB_BENCH_JSON", root.join("target/bench/table.json"))
            .status()
            .context("running the table benchmark")
            .and_then(exit_like),
        Task::Bench {
            which: Bench::Control,
        } => cargo(&root)
            .args(["bench", "-p", "lb-userspace", "--bench", "control"])
            .env("LB_BENCH_JSON", root.join("target/bench/control.json"))
            .status()
            .context("running the control-tick benchmark")
            .and_then(exit_like),
        Task::Bench {
            which: Bench::Datapath,
        } => {
            require_root("the benchmark loads XDP programs")?;
            setup::run(&root, setup::Report::Quiet)?;
            cargo(&root)
                .args(["bench", "-p", "lb-tests", "--bench", "datapath"])
                .env("LB_BENCH_JSON", root.join("target/bench/datapath.json"))
                .status()
                .context("running the datapath benchmark")
                .and_then(exit_like)
        }
        Task::Bench { which: Bench::Sim } => cargo(&root)
            .args(["bench", "-p", "lb-sim", "--bench", "sim"])
            .env("LB_BENCH_JSON", root.join("target/bench/sim.json"))
            .status()
            .context("running the simulator")
            .and_then(exit_like),
        Task::Bench {
            which: Bench::Policies { args },
        } => {
            require_root("the testbed attaches XDP programs and creates network namespaces")?;
            setup::run(&root, setup::Report::Quiet)?;
            run_testbed_bin(&root, "lb-bench-policies", true, &args, None)
                .context("running the policy benchmark")
        }
        Task::Bench {
            which: Bench::Versus { args },
        } => {
            require_root(
                "the benchmark attaches XDP programs, creates network namespaces and installs packages",
            )?;
            setup::run(&root, setup::Report::Quiet)?;
            setup::ensure_versus_packages()?;
            run_testbed_bin(&root, "lb-bench-versus", true, &args, Some("versus.json"))
                .context("running the versus benchmark")
        }
        Task::Bench {
            which: Bench::Flood { args },
        } => {
            require_root("the flood attaches XDP programs and creates network namespaces")?;
            setup::run(&root, setup::Report::Quiet)?;
            run_testbed_bin(&root, "lb-bench-flood", true, &args, Some("flood.json"))
                .context("running the flood benchmark")
        }
        Task::Bench {
            which: Bench::Fleet { args },
        } => {
            require_root("the fleet attaches XDP programs and creates network namespaces")?;
            setup::run(&root, setup::Report::Quiet)?;
            run_testbed_bin(&root, "lb-bench-fleet", true, &args, Some("fleet.json"))
                .context("running the fleet benchmark")
        }
        Task::Bench {
            which: Bench::Predictor { series },
        } => {
            let mut cmd = cargo(&root);
            cmd.args(["bench", "-p", "lb-userspace", "--bench", "predictor", "--"]);
            for s in &series {
                cmd.arg("--series").arg(s);
            }
            cmd.env("LB_BENCH_JSON", root.join("target/bench/predictor.json"))
                .status()
                .context("running the predictor benchmark")
                .and_then(exit_like)
        }
        Task::CheckDeploy => deploy::run(&root),
        Task::SimDiff { before, after } => simdiff::run(&before, &after),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `cargo` for the host build, at the workspace root.
fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

/// Where cargo puts build outputs: `$CARGO_TARGET_DIR` (relative to the workspace
/// root) when set, else `target/` of the workspace.
/// Builds the agent (release or debug) and runs the testbed binary `bin` of lb-tests,
/// in the same profile, on it with `args`; `json` names the file under target/bench/
/// its figures go to, when the binary takes it from `LB_BENCH_JSON`.
fn run_testbed_bin(
    root: &Path,
    bin: &str,
    release: bool,
    args: &[String],
    json: Option<&str>,
) -> anyhow::Result<()> {
    build(root, release)?;
    let (profile, dir) = if release {
        ("release", "release/lb")
    } else {
        ("dev", "debug/lb")
    };
    let mut cmd = cargo(root);
    cmd.args([
        "run",
        "--profile",
        profile,
        "--quiet",
        "-p",
        "lb-tests",
        "--bin",
        bin,
        "--",
    ])
    .args(args)
    .env("LB_BIN", target_dir(root).join(dir));
    if let Some(json) = json {
        cmd.env("LB_BENCH_JSON", root.join("target/bench").join(json));
    }
    cmd.status()
        .map_err(anyhow::Error::from)
        .and_then(exit_like)
}

fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

fn build(root: &Path, release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo(root);
    cmd.args(["build", "-p", "lb-userspace", "--bin", "lb"]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("building lb failed ({status})");
    }
    Ok(())
}

fn require_root(why: &str) -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!("this task must run as root: {why}");
    }
    Ok(())
}

/// Runs this same xtask again through `sudo -E`, for `run` as a normal user.
fn reexec_with_sudo() -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let status = Command::new("sudo")
        .arg("-E")
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .status()
        .context("running sudo (lb needs root to attach XDP); run as root instead")?;
    exit_like(status)
}

fn exit_like(status: std::process::ExitStatus) -> anyhow::Result<()> {
    if status.success() {
        return Ok(());
    }
    std::process::exit(status.code().unwrap_or(1));
}
