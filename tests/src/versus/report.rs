//! The figures of the comparison: per-window derived figures, medians over rounds,
//! ratios to the direct path, the expectations it checks, and the Markdown and JSON
//! outputs; used by the `lb-bench-versus` binary.
//!
//! Definitions:
//! - **CPU %** is of one CPU (a machine of two CPUs has 200 %).
//! - **machine CPU ms / 1k conn**: the machine's busy CPU time in the window, less
//!   the time of processes that are not part of the benchmark (so that a parallel
//!   build does not inflate it; the table shows how much that was), per 1,000
//!   completed connections; **extra vs direct** subtracts the direct path's figure
//!   of the same round: the total CPU the balancer costs, including kernel work not
//!   charged to its processes (softirq, the extra hops).
//! - **× direct**: the median over rounds of the ratio to the direct path's figure
//!   of the same round (so slow drift of the machine cancels).
//! - Every other figure is the median over rounds.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Value, json};

use super::systems::System;
use super::{Outcome, Phase, RunRecord, Settings};
use crate::pathcost::{Measured, PacketMix};
use crate::testbed::median;

/// CPU-time shares of the load balancer (processes plus XDP program) under which
/// its cost counts as near zero, % of one CPU.
pub const NEAR_ZERO_CPU_PCT: f64 = 5.0;

impl RunRecord {
    /// Completed connections per second.
    pub fn rate(&self) -> Option<f64> {
        self.conns.as_ref().map(|c| c.rate)
    }

    /// The load balancer's processes, % of one CPU.
    pub fn lb_cpu_pct(&self) -> f64 {
        100.0 * self.cpu.lb_process_s / self.cpu.wall_s.max(1e-9)
    }

    /// The XDP program's run time, % of one CPU.
    pub fn xdp_cpu_pct(&self) -> Option<f64> {
        Some(100.0 * self.cpu.xdp_prog_s? / self.cpu.wall_s.max(1e-9))
    }

    /// The XDP program's mean run time, ns per run (packet).
    pub fn xdp_ns_per_run(&self) -> Option<f64> {
        let runs = self.cpu.xdp_runs.filter(|&n| n > 0)?;
        Some(self.cpu.xdp_prog_s? * 1e9 / runs as f64)
    }

    /// The machine's busy time, % of one CPU.
    pub fn machine_busy_pct(&self) -> f64 {
        100.0 * self.cpu.machine_busy_s / self.cpu.wall_s.max(1e-9)
    }

    /// The client threads' share of the machine's busy time, %.
    pub fn client_share_pct(&self) -> Option<f64> {
        (self.cpu.machine_busy_s > 0.0).then(|| 100.0 * self.cpu.client_s / self.cpu.machine_busy_s)
    }

    /// CPU-seconds per 1,000 completed connections, in ms.
    fn per_kconn(&self, cpu_s: f64) -> Option<f64> {
        let ok = self.conns.as_ref()?.ok;
        (ok > 0).then(|| cpu_s * 1e6 / ok as f64)
    }

    /// The machine's busy CPU ms per 1,000 connections, less other processes'
    /// time ([`super::cpu::CpuUsage::bench_busy_s`]).
    pub fn machine_ms_per_kconn(&self) -> Option<f64> {
        self.per_kconn(self.cpu.bench_busy_s())
    }

    /// Other processes' time, % of one CPU.
    pub fn other_processes_pct(&self) -> f64 {
        100.0 * self.cpu.other_processes_s() / self.cpu.wall_s.max(1e-9)
    }

    /// The load balancer's processes' CPU ms per 1,000 connections.
    pub fn lb_ms_per_kconn(&self) -> Option<f64> {
        self.per_kconn(self.cpu.lb_process_s)
    }

    /// The XDP program's CPU ms per 1,000 connections.
    pub fn xdp_ms_per_kconn(&self) -> Option<f64> {
        self.per_kconn(self.cpu.xdp_prog_s?)
    }

    /// What the load balancer's host spends on it per 1,000 connections: its
    /// processes (agent or proxy) and, for an XDP system, the program's run time.
    pub fn lb_host_ms_per_kconn(&self) -> Option<f64> {
        Some(self.lb_ms_per_kconn()? + self.xdp_ms_per_kconn().unwrap_or(0.0))
    }

    /// Failed connections.
    pub fn failed(&self) -> u64 {
        self.conns.as_ref().map_or(0, |c| c.errors.values().sum())
    }
}

/// The medians of one system in one phase.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub runs: usize,
    pub rate: Option<f64>,
    pub rate_x_direct: Option<f64>,
    pub failed: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub p99_x_direct: Option<f64>,
    pub lag_p99_ms: Option<f64>,
    /// Open loop: the offered rate as % of the same system's closed-loop rate of
    /// the same round (how close to its own saturation the system was run).
    pub load_pct: Option<f64>,
    pub gbit_s: Option<f64>,
    pub gbit_x_direct: Option<f64>,
    pub lb_cpu_pct: Option<f64>,
    pub xdp_cpu_pct: Option<f64>,
    pub xdp_ns_per_run: Option<f64>,
    pub machine_busy_pct: Option<f64>,
    pub other_processes_pct: Option<f64>,
    pub client_share_pct: Option<f64>,
    pub machine_ms_per_kconn: Option<f64>,
    pub extra_ms_per_kconn: Option<f64>,
    pub lb_ms_per_kconn: Option<f64>,
    pub xdp_ms_per_kconn: Option<f64>,
}

fn records_of<'a>(
    records: &'a [RunRecord],
    phase: Phase,
    system: System,
) -> impl Iterator<Item = &'a RunRecord> + 'a {
    records
        .iter()
        .filter(move |r| r.phase == phase && r.system == system)
}

fn median_of(
    records: &[RunRecord],
    phase: Phase,
    system: System,
    f: impl Fn(&RunRecord) -> Option<f64>,
) -> Option<f64> {
    let v: Vec<f64> = records_of(records, phase, system).filter_map(f).collect();
    median(&v)
}

/// The median over rounds of `combine(f(a's record), f(b's record))`, over the rounds
/// where both have a record of `phase`.
pub fn paired(
    records: &[RunRecord],
    phase: Phase,
    a: System,
    b: System,
    f: impl Fn(&RunRecord) -> Option<f64>,
    combine: impl Fn(f64, f64) -> f64,
) -> Option<f64> {
    let v: Vec<f64> = records_of(records, phase, a)
        .filter_map(|ra| {
            let rb = records_of(records, phase, b).find(|rb| rb.round == ra.round)?;
            Some(combine(f(ra)?, f(rb)?))
        })
        .collect();
    median(&v)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

/// The summary of `system` in `phase`.
pub fn summarize(records: &[RunRecord], phase: Phase, system: System) -> Summary {
    let m = |f: &dyn Fn(&RunRecord) -> Option<f64>| median_of(records, phase, system, f);
    let vs_direct = |f: &dyn Fn(&RunRecord) -> Option<f64>, c: fn(f64, f64) -> f64| {
        paired(records, phase, system, System::Direct, f, c)
    };
    let conn = |f: fn(&super::ConnFigures) -> Option<f64>| {
        move |r: &RunRecord| r.conns.as_ref().and_then(f)
    };
    Summary {
        runs: records_of(records, phase, system).count(),
        rate: m(&RunRecord::rate),
        rate_x_direct: vs_direct(&RunRecord::rate, ratio),
        failed: records_of(records, phase, system)
            .map(RunRecord::failed)
            .sum(),
        p50_ms: m(&conn(|c| c.p50_ms)),
        p99_ms: m(&conn(|c| c.p99_ms)),
        p999_ms: m(&conn(|c| c.p999_ms)),
        p99_x_direct: vs_direct(&conn(|c| c.p99_ms), ratio),
        lag_p99_ms: m(&conn(|c| c.lag_p99_ms)),
        load_pct: median(
            &records_of(records, phase, system)
                .filter_map(|r| {
                    let offered = r.conns.as_ref()?.offered_rate?;
                    let closed = records_of(records, Phase::ConnRate, system)
                        .find(|c| c.round == r.round)?
                        .rate()?;
                    (closed > 0.0).then(|| 100.0 * offered / closed)
                })
                .collect::<Vec<_>>(),
        ),
        gbit_s: m(&|r| r.bulk.as_ref().map(|b| b.gbit_s)),
        gbit_x_direct: vs_direct(&|r| r.bulk.as_ref().map(|b| b.gbit_s), ratio),
        lb_cpu_pct: m(&|r| Some(r.lb_cpu_pct())),
        xdp_cpu_pct: m(&RunRecord::xdp_cpu_pct),
        xdp_ns_per_run: m(&RunRecord::xdp_ns_per_run),
        machine_busy_pct: m(&|r| Some(r.machine_busy_pct())),
        other_processes_pct: m(&|r| Some(r.other_processes_pct())),
        client_share_pct: m(&RunRecord::client_share_pct),
        machine_ms_per_kconn: m(&RunRecord::machine_ms_per_kconn),
        extra_ms_per_kconn: vs_direct(&RunRecord::machine_ms_per_kconn, |a, b| a - b),
        lb_ms_per_kconn: m(&RunRecord::lb_ms_per_kconn),
        xdp_ms_per_kconn: m(&RunRecord::xdp_ms_per_kconn),
    }
}

/// One stated expectation and what was measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    pub what: String,
    pub measured: Option<f64>,
    pub met: Option<bool>,
    pub detail: String,
}

/// The stated expectations, checked against the medians.
pub fn checks(records: &[RunRecord], path_costs: Option<&Measured>) -> Vec<Check> {
    let rate = |r: &RunRecord| r.rate();
    let p99 = |r: &RunRecord| r.conns.as_ref().and_then(|c| c.p99_ms);
    let xdp_vs_direct = paired(
        records,
        Phase::ConnRate,
        System::Xdp,
        System::Direct,
        rate,
        ratio,
    );
    let xdp_vs_haproxy = paired(
        records,
        Phase::ConnRate,
        System::Xdp,
        System::Haproxy,
        rate,
        ratio,
    );
    let p99_vs_direct = paired(
        records,
        Phase::Latency,
        System::Xdp,
        System::Direct,
        p99,
        ratio,
    );
    let p99_light = paired(
        records,
        Phase::LatencyLight,
        System::Xdp,
        System::Direct,
        p99,
        ratio,
    );
    let nat_vs_haproxy = paired(
        records,
        Phase::ConnRate,
        System::XdpNat,
        System::Haproxy,
        rate,
        ratio,
    );
    let nat_cpu_vs_haproxy = paired(
        records,
        Phase::ConnRate,
        System::XdpNat,
        System::Haproxy,
        RunRecord::lb_host_ms_per_kconn,
        ratio,
    );
    let lb_cpu = median_of(records, Phase::ConnRate, System::Xdp, |r| {
        Some(r.lb_cpu_pct() + r.xdp_cpu_pct().unwrap_or(0.0))
    });
    let xdp = summarize(records, Phase::ConnRate, System::Xdp);
    let live = live_cost_of(records, path_costs)
        .get(&Phase::ConnRate)
        .copied()
        .unwrap_or_default();
    let check = |what: &str, measured: Option<f64>, ok: fn(f64) -> bool, detail: String| Check {
        what: what.to_owned(),
        measured,
        met: measured.filter(|m| !m.is_nan()).map(ok),
        detail,
    };
    vec![
        check(
            "xdp connections/s >= 0.95 x direct",
            xdp_vs_direct,
            |m| m >= 0.95,
            format!("{} x direct", f2(xdp_vs_direct)),
        ),
        check(
            "xdp connections/s >= 3 x haproxy",
            xdp_vs_haproxy,
            |m| m >= 3.0,
            format!("{} x haproxy", f2(xdp_vs_haproxy)),
        ),
        check(
            "xdp-nat connections/s >= 1.5 x haproxy",
            nat_vs_haproxy,
            |m| m >= 1.5,
            format!("{} x haproxy", f2(nat_vs_haproxy)),
        ),
        check(
            "xdp-nat LB-host CPU per connection <= 1/5 x haproxy",
            nat_cpu_vs_haproxy,
            |m| m <= 0.2,
            format!(
                "{} x haproxy (agent and XDP program against the proxy's processes, \
                 CPU ms per 1,000 connections, closed loop)",
                f2(nat_cpu_vs_haproxy)
            ),
        ),
        check(
            "xdp p99 (open loop) within 10 % of direct",
            p99_vs_direct,
            |m| m <= 1.10,
            format!("{} x direct", f2(p99_vs_direct)),
        ),
        check(
            "(extra) the same at the light rate",
            p99_light,
            |m| m <= 1.10,
            format!("{} x direct", f2(p99_light)),
        ),
        check(
            "xdp load-balancer CPU near zero (closed loop)",
            lb_cpu,
            |m| m < NEAR_ZERO_CPU_PCT,
            format!(
                "{} % of one CPU: agent {} %, XDP program {} % at {} conn/s \
                 (near zero: below {NEAR_ZERO_CPU_PCT} %)",
                f2(lb_cpu),
                f2(xdp.lb_cpu_pct),
                f2(xdp.xdp_cpu_pct),
                f0(xdp.rate)
            ),
        ),
        check(
            "xdp live ns/packet <= 2 x its bench mix (closed loop)",
            live.ratio(),
            |m| m <= 2.0,
            format!(
                "{} ns live, {} ns at bench prices: {} x",
                f0(live.live_ns),
                f0(live.bench_mix_ns),
                f2(live.ratio())
            ),
        ),
    ]
}

/// A table cell: `v` with `decimals` digits and `suffix`, or a dash when unknown.
fn cell(v: Option<f64>, decimals: usize, suffix: &str) -> String {
    v.filter(|x| x.is_finite())
        .map_or("–".into(), |x| format!("{x:.decimals$}{suffix}"))
}

fn f0(v: Option<f64>) -> String {
    cell(v, 0, "")
}

fn f1(v: Option<f64>) -> String {
    cell(v, 1, "")
}

fn f2(v: Option<f64>) -> String {
    cell(v, 2, "")
}

fn f3(v: Option<f64>) -> String {
    cell(v, 3, "")
}

fn ratio_cell(v: Option<f64>) -> String {
    cell(v, 2, "×")
}

/// The Markdown table of an open-loop phase.
fn latency_table(
    out: &mut String,
    records: &[RunRecord],
    systems: &[System],
    phase: Phase,
    fraction: f64,
    direct_rate: Option<f64>,
    title: &str,
) {
    let _ = writeln!(
        out,
        "\n### {title} (open loop, Poisson, {} conn/s = {:.0} % of the direct path's \
         closed-loop rate of the same round, the same for every system; latency from the \
         connection's start, connect to end of response)\n",
        f0(direct_rate.map(|r| r * fraction)),
        fraction * 100.0
    );
    *out += "| system | % of own closed-loop rate | conn/s done | failed (all rounds) | p50 ms | p99 ms | p99.9 ms | p99 × direct | start lag p99 ms | LB processes CPU ms / 1k conn | XDP program CPU ms / 1k conn | machine busy % | other processes % | machine CPU ms / 1k conn | extra vs direct ms / 1k conn |\n";
    *out += "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n";
    for &system in systems {
        let s = summarize(records, phase, system);
        if s.runs == 0 {
            continue;
        }
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            system.name(),
            f0(s.load_pct),
            f0(s.rate),
            s.failed,
            f3(s.p50_ms),
            f3(s.p99_ms),
            f3(s.p999_ms),
            ratio_cell(s.p99_x_direct),
            f2(s.lag_p99_ms),
            f1(s.lb_ms_per_kconn),
            f2(s.xdp_ms_per_kconn),
            f0(s.machine_busy_pct),
            f0(s.other_processes_pct),
            f1(s.machine_ms_per_kconn),
            f1(s.extra_ms_per_kconn),
        );
    }
}

/// One line about a finished window, for the progress output.
pub fn progress_line(r: &RunRecord, repeats: usize) -> String {
    let what = match (&r.conns, &r.bulk) {
        (Some(c), _) => format!(
            "{:.0} conn/s, {} failed, p50 {} ms, p99 {} ms",
            c.rate,
            r.failed(),
            f3(c.p50_ms),
            f3(c.p99_ms)
        ),
        (_, Some(b)) => format!("{:.2} Gbit/s", b.gbit_s),
        _ => String::new(),
    };
    format!(
        "round {}/{repeats} {} {}: {what}; CPU %: LB {:.1}, XDP {}, machine {:.0}, client {:.0}, \
         backends {:.0}, ksoftirqd {:.0}, other processes {:.0}",
        r.round,
        r.phase.name(),
        r.system.name(),
        r.lb_cpu_pct(),
        f2(r.xdp_cpu_pct()),
        r.machine_busy_pct(),
        100.0 * r.cpu.client_s / r.cpu.wall_s.max(1e-9),
        100.0 * r.cpu.backends_s / r.cpu.wall_s.max(1e-9),
        100.0 * r.cpu.ksoftirqd_s / r.cpu.wall_s.max(1e-9),
        100.0 * r.cpu.other_processes_s() / r.cpu.wall_s.max(1e-9),
    )
}

/// The Markdown report: settings, the three tables, the checks, notes.
pub fn markdown(settings: &Settings, outcome: &Outcome, host: &str) -> String {
    let records = &outcome.records;
    let systems = &settings.systems;
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{host}; {} round(s) of {:.0} s windows, interleaved ({}); medians over rounds; \
         CPU % is of one CPU ({cpus} CPUs = {}%). Client, backends, balancer and all \
         packet processing share these CPUs.\n",
        settings.repeats,
        settings.duration.as_secs_f64(),
        systems
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", "),
        cpus * 100
    );

    let busy: Vec<f64> = systems
        .iter()
        .filter_map(|&s| summarize(records, Phase::ConnRate, s).machine_busy_pct)
        .collect();
    let direct = summarize(records, Phase::ConnRate, System::Direct);
    if let (Some(lo), Some(hi)) = (
        busy.iter().copied().reduce(f64::min),
        busy.iter().copied().reduce(f64::max),
    ) {
        let _ = writeln!(
            out,
            "During the closed loop the machine was {lo:.0}–{hi:.0} % busy (of {}): every \
             system is bound by the CPUs that client, backends, balancer and the kernel's \
             packet processing share, so connections per second compare the total CPU cost \
             of a connection on each path. The client's threads (user space plus the packet \
             processing the kernel runs in their system calls) took {} % of the busy time \
             on the direct path.\n",
            cpus * 100,
            f0(direct.client_share_pct)
        );
    }
    let _ = writeln!(
        out,
        "### New connections per second (closed loop, {} workers; connect, request, response, close)\n",
        settings.concurrency
    );
    out += "| system | conn/s | × direct | failed (all rounds) | LB processes CPU % | XDP program CPU % | XDP ns/packet | machine busy % | other processes % | machine CPU ms / 1k conn | extra vs direct ms / 1k conn |\n";
    out += "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n";
    for &system in systems {
        let s = summarize(records, Phase::ConnRate, system);
        if s.runs == 0 {
            continue;
        }
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            system.name(),
            f0(s.rate),
            ratio_cell(s.rate_x_direct),
            s.failed,
            f2(s.lb_cpu_pct),
            f2(s.xdp_cpu_pct),
            f0(s.xdp_ns_per_run),
            f0(s.machine_busy_pct),
            f0(s.other_processes_pct),
            f1(s.machine_ms_per_kconn),
            f1(s.extra_ms_per_kconn),
        );
    }

    let _ = writeln!(
        out,
        "\nWhere the CPU went during the closed loop, % of one CPU. The XDP program runs \
         inside the others' time; without IRQ time accounting, softirq work (most packet \
         processing) is charged to the task it interrupted, and to no process when the \
         CPU was idle. Other processes: this benchmark's main thread and the commands it \
         runs, anything else on the machine.\n"
    );
    out += "| system | machine busy | of which user space | client | backends | LB processes | ksoftirqd | no process | other processes | of which XDP program | steal |\n";
    out += "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n";
    for &system in systems {
        if records_of(records, Phase::ConnRate, system)
            .next()
            .is_none()
        {
            continue;
        }
        let pct = |f: &dyn Fn(&RunRecord) -> Option<f64>| {
            f0(median_of(records, Phase::ConnRate, system, |r| {
                Some(100.0 * f(r)? / r.cpu.wall_s.max(1e-9))
            }))
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            system.name(),
            pct(&|r| Some(r.cpu.machine_busy_s)),
            pct(&|r| Some(r.cpu.machine_user_s)),
            pct(&|r| Some(r.cpu.client_s)),
            pct(&|r| Some(r.cpu.backends_s)),
            pct(&|r| Some(r.cpu.lb_process_s)),
            pct(&|r| Some(r.cpu.ksoftirqd_s)),
            pct(&|r| Some(r.cpu.no_process_s())),
            pct(&|r| Some(r.cpu.other_processes_s())),
            pct(&|r| r.cpu.xdp_prog_s),
            pct(&|r| Some(r.cpu.machine_steal_s)),
        );
    }

    let direct: Vec<f64> = outcome.direct_rates.iter().flatten().copied().collect();
    let direct = median(&direct);
    for (phase, fraction, title) in [
        (
            Phase::Latency,
            settings.open_loop_fraction,
            "Latency at a fixed rate",
        ),
        (
            Phase::LatencyLight,
            settings.light_fraction,
            "Latency at a light fixed rate",
        ),
    ] {
        latency_table(&mut out, records, systems, phase, fraction, direct, title);
    }

    let _ = writeln!(
        out,
        "\n### Bulk throughput ({} long connections; down = backend to client, up = client to backend)\n",
        settings.bulk_connections
    );
    out += "| system | direction | Gbit/s | × direct | LB processes CPU % | XDP program CPU % | machine busy % | other processes % | client % of busy |\n";
    out += "|---|---|--:|--:|--:|--:|--:|--:|--:|\n";
    for (phase, dir) in [(Phase::BulkDown, "down"), (Phase::BulkUp, "up")] {
        for &system in systems {
            let s = summarize(records, phase, system);
            if s.runs == 0 {
                continue;
            }
            let _ = writeln!(
                out,
                "| {} | {dir} | {} | {} | {} | {} | {} | {} | {} |",
                system.name(),
                f2(s.gbit_s),
                ratio_cell(s.gbit_x_direct),
                f2(s.lb_cpu_pct),
                f2(s.xdp_cpu_pct),
                f0(s.machine_busy_pct),
                f0(s.other_processes_pct),
                f0(s.client_share_pct),
            );
        }
    }

    out += "\n### Expectations, checked\n\n";
    for c in checks(records, outcome.path_costs.as_ref()) {
        let verdict = match c.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "not measured",
        };
        let _ = writeln!(out, "- {}: {} — {verdict}", c.what, c.detail);
    }
    let interfered: Vec<String> = records
        .iter()
        .filter(|r| r.other_processes_pct() > settings.max_other_pct)
        .map(|r| {
            format!(
                "round {} {} {}: {:.0} %",
                r.round,
                r.phase.name(),
                r.system.name(),
                r.other_processes_pct()
            )
        })
        .collect();
    let retried = records.iter().filter(|r| r.attempt > 1).count();
    let _ = writeln!(
        out,
        "\nOther processes (not part of the benchmark) above {:.0} % of one CPU: {} \
         window(s) repeated; kept after {} attempts: {}.",
        settings.max_other_pct,
        retried,
        settings.attempts,
        if interfered.is_empty() {
            "none".to_owned()
        } else {
            interfered.join("; ")
        }
    );
    out += &live_cost_markdown(outcome);
    if !outcome.failures.is_empty() {
        out += "\n### Failed runs\n\n";
        for f in &outcome.failures {
            let _ = writeln!(out, "- {f}");
        }
    }
    out
}

/// Why `llc_misses_per_packet` is null.
pub const LLC_NOTE: &str = "not measured: `bpftool prog profile` reads the CPU's hardware \
    counters, and the reference machine (a KVM guest) exposes no hardware PMU \
    (/sys/bus/event_source/devices has no `cpu`; `perf stat -e cycles,instructions,\
    LLC-load-misses` reports each as not supported)";

/// The XDP program's live cost in one phase, against the bench's prices of the
/// same packets (medians over rounds).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LiveCost {
    /// ns per run, from the kernel's BPF statistics.
    pub live_ns: Option<f64>,
    /// The window's packet mix priced at the repeated-run path costs, as the BPF
    /// statistics time them (the live figure's instrument).
    pub bench_mix_ns: Option<f64>,
    /// The same priced at the test run's loop times (`cargo xtask bench datapath`'s).
    pub bench_mix_loop_ns: Option<f64>,
    /// The packets of the mix, summed over rounds.
    pub mix: PacketMix,
}

impl LiveCost {
    /// Live over bench mix.
    pub fn ratio(&self) -> Option<f64> {
        Some(self.live_ns? / self.bench_mix_ns.filter(|b| *b > 0.0)?)
    }
}

impl RunRecord {
    /// This window's packets, by path (XDP only).
    pub fn packet_mix(&self) -> Option<PacketMix> {
        PacketMix::of(self.datapath.as_ref()?)
    }
}

/// The XDP system's live cost per phase (phases it ran).
pub fn live_cost(outcome: &Outcome) -> BTreeMap<Phase, LiveCost> {
    live_cost_of(&outcome.records, outcome.path_costs.as_ref())
}

fn live_cost_of(records: &[RunRecord], costs: Option<&Measured>) -> BTreeMap<Phase, LiveCost> {
    let mut by_phase = BTreeMap::new();
    for phase in Phase::ALL {
        let records: Vec<&RunRecord> = records
            .iter()
            .filter(|r| r.phase == phase && r.system == System::Xdp)
            .collect();
        if records.is_empty() {
            continue;
        }
        let mut mix = PacketMix::default();
        for m in records.iter().filter_map(|r| r.packet_mix()) {
            mix.syn += m.syn;
            mix.non_vip += m.non_vip;
            mix.established += m.established;
        }
        let priced = |pick: fn(&Measured) -> &crate::pathcost::PathCosts| -> Option<f64> {
            let costs = pick(costs?);
            let each: Vec<f64> = records
                .iter()
                .filter_map(|r| r.packet_mix()?.priced(costs))
                .collect();
            median(&each)
        };
        let live: Vec<f64> = records.iter().filter_map(|r| r.xdp_ns_per_run()).collect();
        by_phase.insert(
            phase,
            LiveCost {
                live_ns: median(&live),
                bench_mix_ns: priced(|m| &m.by_stats),
                bench_mix_loop_ns: priced(|m| &m.repeated),
                mix,
            },
        );
    }
    by_phase
}

fn live_cost_json(outcome: &Outcome, live: &BTreeMap<Phase, LiveCost>) -> Value {
    let phases: serde_json::Map<String, Value> = live
        .iter()
        .map(|(phase, c)| {
            (
                phase.name().to_owned(),
                json!({
                    "live_ns_per_packet": opt(c.live_ns),
                    "bench_mix_ns_per_packet": opt(c.bench_mix_ns),
                    "live_x_bench_mix": opt(c.ratio()),
                    "bench_mix_loop_ns_per_packet": opt(c.bench_mix_loop_ns),
                    "packets": {
                        "syn": c.mix.syn,
                        "established": c.mix.established,
                        "non_vip": c.mix.non_vip,
                    },
                }),
            )
        })
        .collect();
    let repeated = |c: &crate::pathcost::PathCosts| {
        json!({
            "floor": c.floor_ns,
            "established_v4": c.established_ns,
            "syn_v4": c.syn_ns,
            "non_vip_v4": c.non_vip_ns,
        })
    };
    let costs = outcome.path_costs.map(|m| {
        json!({
            "repeated_ns": repeated(&m.repeated),
            "repeated_bpf_stats_ns": repeated(&m.by_stats),
            "fresh_flow_ns": connection_json(&m.fresh),
            "cold_ns": connection_json(&m.cold),
        })
    });
    json!({
        "method": "live: the kernel's BPF statistics (run_time_ns / run_cnt) over the \
            window; bench mix: the window's frames by path from the datapath's counters \
            (conn_miss_syn: SYN; pass_*: non-VIP; the rest: established), each priced at \
            its repeated BPF_PROG_TEST_RUN cost measured at the start of the same run by \
            the same BPF statistics (bench_mix_loop_ns_per_packet: priced at the test \
            run's loop times instead, as cargo xtask bench datapath reports them)",
        "phases": phases,
        "path_costs": costs.unwrap_or(Value::Null),
    })
}

fn connection_json(c: &crate::pathcost::FreshCosts) -> Value {
    json!({
        "floor_single": c.floor_single_ns,
        "syn": c.syn_ns,
        "handshake_ack": c.ack_ns,
        "data": c.data_ns,
        "fin": c.fin_ns,
    })
}

/// One line of the path costs, for the progress log.
pub fn path_costs_line(m: &Measured) -> String {
    let r = &m.repeated;
    let s = &m.by_stats;
    let flows = |f: &crate::pathcost::FreshCosts| {
        format!(
            "(less a {:.0} ns single-run floor): SYN {:.0}, handshake ACK {:.0}, data {:.0}, \
             FIN {:.0}",
            f.floor_single_ns, f.syn_ns, f.ack_ns, f.data_ns, f.fin_ns
        )
    };
    format!(
        "path costs, repeated: established {:.0} ns, SYN {:.0}, non-VIP {:.0}, floor {:.0} \
         (by BPF statistics: {:.0}, {:.0}, {:.0}, {:.0}); fresh flows {}; cold caches {}",
        r.established_ns,
        r.syn_ns,
        r.non_vip_ns,
        r.floor_ns,
        s.established_ns,
        s.syn_ns,
        s.non_vip_ns,
        s.floor_ns,
        flows(&m.fresh),
        flows(&m.cold)
    )
}

/// The live-cost section of the Markdown report.
fn live_cost_markdown(outcome: &Outcome) -> String {
    let live = live_cost(outcome);
    if live.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\n### The XDP program's live cost against its bench cost\n\n\
         Live: the kernel's BPF statistics over each window. Bench mix: the same \
         window's frames by path (the datapath's counters), each priced at its repeated \
         `BPF_PROG_TEST_RUN` cost measured at the start of this run by the same \
         statistics (loop: at the test run's loop times instead).\n\n\
         | phase | live ns/packet | bench mix ns/packet | live × bench mix | bench mix (loop) | SYN | established | non-VIP |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for (phase, c) in &live {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            phase.name(),
            f0(c.live_ns),
            f0(c.bench_mix_ns),
            f2(c.ratio()),
            f0(c.bench_mix_loop_ns),
            c.mix.syn,
            c.mix.established,
            c.mix.non_vip
        );
    }
    if let Some(m) = &outcome.path_costs {
        let _ = writeln!(out, "\n{}.", path_costs_line(m));
    }
    let _ = writeln!(out, "\nLLC misses per packet: {LLC_NOTE}.");
    out
}

fn opt(v: Option<f64>) -> Value {
    v.filter(|x| x.is_finite()).map_or(Value::Null, Value::from)
}

fn record_json(r: &RunRecord) -> Value {
    let c = &r.cpu;
    json!({
        "round": r.round,
        "system": r.system.name(),
        "phase": r.phase.name(),
        "duration_s": r.duration_s,
        "conns": r.conns.as_ref().map(|k| json!({
            "ok": k.ok,
            "errors": k.errors,
            "rate": k.rate,
            "offered_rate": opt(k.offered_rate),
            "p50_ms": opt(k.p50_ms),
            "p99_ms": opt(k.p99_ms),
            "p999_ms": opt(k.p999_ms),
            "lag_p99_ms": opt(k.lag_p99_ms),
            "per_backend": k.per_backend,
            "per_second": k.seconds.iter().map(|x| json!({
                "scheduled": x.scheduled,
                "p99_ms": x.p99 * 1e3,
                "max_ms": x.max * 1e3,
                "max_lag_ms": x.max_lag * 1e3,
            })).collect::<Vec<_>>(),
        })),
        "bulk": r.bulk.as_ref().map(|b| json!({"bytes": b.bytes, "gbit_s": b.gbit_s})),
        "cpu": {
            "wall_s": c.wall_s,
            "cpus": c.cpus,
            "machine_busy_s": c.machine_busy_s,
            "machine_user_s": c.machine_user_s,
            "machine_system_s": c.machine_system_s,
            "machine_irq_s": c.machine_irq_s,
            "machine_steal_s": c.machine_steal_s,
            "lb_process_s": c.lb_process_s,
            "xdp_prog_s": opt(c.xdp_prog_s),
            "xdp_runs": c.xdp_runs,
            "client_s": c.client_s,
            "backends_s": c.backends_s,
            "ksoftirqd_s": c.ksoftirqd_s,
            "all_processes_s": c.all_processes_s,
            "other_processes_s": c.other_processes_s(),
            "no_process_s": c.no_process_s(),
        },
        "datapath": r.datapath,
        "attempt": r.attempt,
    })
}

fn summary_json(s: &Summary) -> Value {
    json!({
        "runs": s.runs,
        "rate": opt(s.rate),
        "rate_x_direct": opt(s.rate_x_direct),
        "failed": s.failed,
        "p50_ms": opt(s.p50_ms),
        "p99_ms": opt(s.p99_ms),
        "p999_ms": opt(s.p999_ms),
        "p99_x_direct": opt(s.p99_x_direct),
        "lag_p99_ms": opt(s.lag_p99_ms),
        "load_pct": opt(s.load_pct),
        "gbit_s": opt(s.gbit_s),
        "gbit_x_direct": opt(s.gbit_x_direct),
        "lb_cpu_pct": opt(s.lb_cpu_pct),
        "xdp_cpu_pct": opt(s.xdp_cpu_pct),
        "xdp_ns_per_run": opt(s.xdp_ns_per_run),
        "machine_busy_pct": opt(s.machine_busy_pct),
        "other_processes_pct": opt(s.other_processes_pct),
        "client_share_pct": opt(s.client_share_pct),
        "machine_ms_per_kconn": opt(s.machine_ms_per_kconn),
        "extra_ms_per_kconn": opt(s.extra_ms_per_kconn),
        "lb_ms_per_kconn": opt(s.lb_ms_per_kconn),
        "xdp_ms_per_kconn": opt(s.xdp_ms_per_kconn),
    })
}

/// Everything as JSON: settings, host, every window, the medians and the checks.
pub fn json(settings: &Settings, outcome: &Outcome, host: &Value) -> Value {
    let mut summary = BTreeMap::new();
    for phase in Phase::ALL {
        let mut by_system = serde_json::Map::new();
        for &system in &settings.systems {
            let s = summarize(&outcome.records, phase, system);
            if s.runs > 0 {
                by_system.insert(system.name().into(), summary_json(&s));
            }
        }
        summary.insert(phase.name(), Value::Object(by_system));
    }
    let live = live_cost(outcome);
    let top = live.get(&Phase::ConnRate).copied().unwrap_or_default();
    json!({
        "bench": "versus",
        "live_ns_per_packet": opt(top.live_ns),
        "bench_mix_ns_per_packet": opt(top.bench_mix_ns),
        "live_x_bench_mix": opt(top.ratio()),
        "bench_mix_loop_ns_per_packet": opt(top.bench_mix_loop_ns),
        "llc_misses_per_packet": Value::Null,
        "llc_misses_note": LLC_NOTE,
        "live_cost": live_cost_json(outcome, &live),
        "settings": {
            "repeats": settings.repeats,
            "duration_s": settings.duration.as_secs_f64(),
            "concurrency": settings.concurrency,
            "open_loop_fraction": settings.open_loop_fraction,
            "light_fraction": settings.light_fraction,
            "open_loop_rate_basis": "direct path's closed-loop rate of the same round",
            "bulk_connections": settings.bulk_connections,
            "systems": settings.systems.iter().map(|s| s.name()).collect::<Vec<_>>(),
            "client_threads": settings.client_threads,
            "backend_threads": settings.backend_threads,
            "timeout_s": settings.timeout.as_secs_f64(),
            "warmup_s": settings.warmup.as_secs_f64(),
            "max_other_pct": settings.max_other_pct,
            "quiet_wait_s": settings.quiet_wait.as_secs_f64(),
            "attempts": settings.attempts,
        },
        "host": host,
        "wall_s": outcome.wall_s,
        "direct_rates": outcome.direct_rates,
        "summary": summary,
        "checks": checks(&outcome.records, outcome.path_costs.as_ref()).iter().map(|c| json!({
            "what": c.what,
            "measured": opt(c.measured),
            "met": c.met,
            "detail": c.detail,
        })).collect::<Vec<_>>(),
        "failures": outcome.failures,
        "records": outcome.records.iter().map(record_json).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::versus::ConnFigures;
    use crate::versus::cpu::CpuUsage;

    fn record(round: usize, system: System, rate: f64, busy_s: f64) -> RunRecord {
        RunRecord {
            round,
            system,
            phase: Phase::ConnRate,
            duration_s: 10.0,
            conns: Some(ConnFigures {
                ok: (rate * 10.0) as u64,
                rate,
                ..ConnFigures::default()
            }),
            bulk: None,
            cpu: CpuUsage {
                wall_s: 10.0,
                machine_busy_s: busy_s,
                lb_process_s: 0.5,
                ..CpuUsage::default()
            },
            datapath: None,
            attempt: 1,
        }
    }

    #[test]
    fn ratios_pair_rounds_and_extra_cpu_subtracts_direct() {
        let records = vec![
            record(1, System::Xdp, 900.0, 20.0),
            record(1, System::Direct, 1000.0, 20.0),
            record(2, System::Xdp, 1800.0, 20.0),
            record(2, System::Direct, 2000.0, 20.0),
            // A round without direct does not pair.
            record(3, System::Xdp, 10.0, 20.0),
        ];
        let s = summarize(&records, Phase::ConnRate, System::Xdp);
        assert_eq!(s.runs, 3);
        assert_eq!(s.rate, Some(900.0));
        assert!((s.rate_x_direct.unwrap() - 0.9).abs() < 1e-12);
        // 20 CPU-s over 9,000 connections = 2.222 ms per 1k; direct 2.0 ms.
        let round1 = 20.0 * 1e6 / 9000.0 - 20.0 * 1e6 / 10000.0;
        let round2 = 20.0 * 1e6 / 18000.0 - 20.0 * 1e6 / 20000.0;
        assert!((s.extra_ms_per_kconn.unwrap() - (round1 + round2) / 2.0).abs() < 1e-9);
        assert_eq!(s.lb_cpu_pct, Some(5.0));
        let c = checks(&records, None);
        assert_eq!(c[0].met, Some(false));
        assert_eq!(c[1].met, None);
        assert_eq!(c.len(), 8);
        assert_eq!(c[7].met, None, "no path costs, no live-cost check");
        assert_eq!(
            (c[2].met, c[3].met),
            (None, None),
            "no xdp-nat, no NAT checks"
        );
    }

    #[test]
    fn nat_is_judged_against_haproxy_on_rate_and_lb_host_cpu() {
        let mut nat = record(1, System::XdpNat, 1600.0, 20.0);
        nat.cpu.lb_process_s = 0.05;
        nat.cpu.xdp_prog_s = Some(0.05);
        let records = vec![
            nat,
            record(1, System::Haproxy, 1000.0, 20.0),
            record(1, System::Direct, 2000.0, 20.0),
        ];
        let c = checks(&records, None);
        assert!(c[2].what.contains("1.5 x haproxy"), "{:?}", c[2]);
        assert_eq!(c[2].measured, Some(1.6));
        assert_eq!(c[2].met, Some(true));
        // (0.05 + 0.05) s over 16,000 connections against 0.5 s over 10,000.
        let expected = (0.1 / 16_000.0) / (0.5 / 10_000.0);
        assert!(
            (c[3].measured.unwrap() - expected).abs() < 1e-12,
            "{:?}",
            c[3]
        );
        assert_eq!(c[3].met, Some(true));
    }
}
