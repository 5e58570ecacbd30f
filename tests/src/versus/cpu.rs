//! CPU accounting of one measurement window; used by [`super::run`] around every
//! window of traffic.
//!
//! Four views, each read at the start and at the end of the window:
//! - the whole machine: the first line of `/proc/stat` (jiffies of every CPU); busy
//!   is everything but idle, iowait and steal (time the hypervisor gave to others);
//! - the load balancer's processes: every process inside the load balancer's network
//!   namespace (the `lb` agent, or HAProxy, or nginx's master and workers), `utime +
//!   stime` of `/proc/<pid>/stat`, which covers all threads of a process;
//! - threads of this process (the client's and the backends' runtimes), `utime +
//!   stime` of `/proc/self/task/<tid>/stat`;
//! - an XDP program's own run time, from the kernel's BPF statistics
//!   (`run_time_ns`, `run_cnt` of the program's info), which count only while
//!   statistics are enabled: [`BpfStats`] holds them on.
//!
//! This kernel has no `CONFIG_IRQ_TIME_ACCOUNTING`: softirq work (most of the
//! network stack on veth) is charged to whichever task it interrupted or ran on
//! behalf of, so process and thread times include some of other parties' packet
//! processing; the machine's busy time has all of it, whoever it is charged to.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

use crate::netns::Netns;

/// Jiffies of the whole machine, by kind, from the `cpu` line of `/proc/stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachineTicks {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

impl MachineTicks {
    /// Parses the aggregate `cpu ` line of a `/proc/stat` text. Guest time is part of
    /// user time already, so it is not read.
    pub fn parse(proc_stat: &str) -> Option<MachineTicks> {
        let line = proc_stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<std::result::Result<_, _>>()
            .ok()?;
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        if v.len() < 4 {
            return None;
        }
        Some(MachineTicks {
            user: at(0),
            nice: at(1),
            system: at(2),
            idle: at(3),
            iowait: at(4),
            irq: at(5),
            softirq: at(6),
            steal: at(7),
        })
    }

    /// Reads `/proc/stat` now.
    pub fn read() -> Result<MachineTicks> {
        let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        MachineTicks::parse(&text).context("/proc/stat has no parsable cpu line")
    }

    /// Jiffies some CPU was doing work for this machine.
    pub fn busy(&self) -> u64 {
        self.user + self.nice + self.system + self.irq + self.softirq
    }

    /// The jiffies from `earlier` to `self`, kind by kind.
    pub fn since(&self, earlier: &MachineTicks) -> MachineTicks {
        MachineTicks {
            user: self.user.saturating_sub(earlier.user),
            nice: self.nice.saturating_sub(earlier.nice),
            system: self.system.saturating_sub(earlier.system),
            idle: self.idle.saturating_sub(earlier.idle),
            iowait: self.iowait.saturating_sub(earlier.iowait),
            irq: self.irq.saturating_sub(earlier.irq),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }
}

/// Clock ticks per second, the unit of `/proc/stat` and `/proc/<pid>/stat` times.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// The CPU times of a `/proc/<pid>/stat` or `/proc/<pid>/task/<tid>/stat` text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskTicks {
    /// `utime + stime`: the task itself (all threads, for a process).
    pub own: u64,
    /// `cutime + cstime`: its children that it has waited for.
    pub children: u64,
}

/// Parses the times of a `/proc/<pid>/stat` text. The command name (field 2) may
/// hold spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_task_ticks(stat: &str) -> Option<TaskTicks> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 to 17 of the line; `rest` starts at field 3 (the state).
    let field = |i: usize| -> Option<u64> {
        let v: i64 = fields.get(i)?.parse().ok()?;
        Some(v.max(0) as u64)
    };
    Some(TaskTicks {
        own: field(11)? + field(12)?,
        children: field(13)? + field(14)?,
    })
}

/// The command name (field 2) of a `/proc/<pid>/stat` text.
fn command_of(stat: &str) -> Option<&str> {
    Some(&stat[stat.find('(')? + 1..stat.rfind(')')?])
}

fn ticks_of(path: &str) -> Option<u64> {
    parse_task_ticks(&std::fs::read_to_string(path).ok()?).map(|t| t.own)
}

/// The ids of the processes running now.
fn pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}

/// The processes inside `ns` but this one.
pub fn netns_pids(ns: &Netns) -> Vec<u32> {
    let own = std::process::id();
    pids()
        .into_iter()
        .filter(|&pid| pid != own && ns.contains_process(pid))
        .collect()
}

/// One pass over every process.
#[derive(Clone, Debug, Default)]
struct ProcessScan {
    /// `utime + stime` of each process inside the load balancer's namespace.
    lb: BTreeMap<u32, u64>,
    /// `utime + stime` of the `ksoftirqd/N` threads.
    ksoftirqd: u64,
    /// `utime + stime + cutime + cstime` of every process: all time charged to a
    /// process, including children that ended and were waited for.
    all: u64,
}

fn scan_processes(lb_ns: &Netns) -> ProcessScan {
    let own = std::process::id();
    let mut scan = ProcessScan::default();
    for pid in pids() {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(ticks) = parse_task_ticks(&stat) else {
            continue;
        };
        scan.all += ticks.own + ticks.children;
        if command_of(&stat).is_some_and(|c| c.starts_with("ksoftirqd/")) {
            scan.ksoftirqd += ticks.own;
        } else if pid != own && lb_ns.contains_process(pid) {
            scan.lb.insert(pid, ticks.own);
        }
    }
    scan
}

/// The ticks processes spent from `earlier` to `later`; a process that started in
/// between counts whole (one that ended in between is lost).
pub fn process_ticks_between(earlier: &BTreeMap<u32, u64>, later: &BTreeMap<u32, u64>) -> u64 {
    later
        .iter()
        .map(|(pid, &t)| t.saturating_sub(earlier.get(pid).copied().unwrap_or(0)))
        .sum()
}

/// The thread ids of a group of this process's threads (a runtime's workers), to sum
/// their CPU time. Threads register themselves with [`ThreadGroup::register_current`].
#[derive(Clone, Debug, Default)]
pub struct ThreadGroup(Arc<Mutex<Vec<i32>>>);

impl ThreadGroup {
    /// Adds the calling thread.
    pub fn register_current(&self) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(tid);
    }

    /// `utime + stime` of the group's threads that still run.
    pub fn ticks(&self) -> u64 {
        let tids = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        tids.iter()
            .filter_map(|tid| ticks_of(&format!("/proc/self/task/{tid}/stat")))
            .sum()
    }
}

/// The kernel's BPF run-time statistics, on while this value lives (through
/// `BPF_ENABLE_STATS`, the same switch as `sysctl kernel.bpf_stats_enabled`, but
/// reference-counted and turned off by the kernel when the descriptor closes, also
/// when the process dies). The switch is global: every BPF program on the machine
/// pays two clock reads per run meanwhile.
pub struct BpfStats {
    _fd: OwnedFd,
}

impl BpfStats {
    /// Turns the statistics on.
    pub fn enable() -> Result<BpfStats> {
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("enabling BPF run-time statistics (BPF_ENABLE_STATS)")?;
        Ok(BpfStats { _fd: fd })
    }

    /// The total run time (ns) and run count of the program pinned at `pin`.
    pub fn program(&self, pin: &Path) -> Result<(u64, u64)> {
        let info = aya::programs::ProgramInfo::from_pin(pin)
            .with_context(|| format!("reading the program pinned at {}", pin.display()))?;
        Ok((info.run_time().as_nanos() as u64, info.run_count()))
    }
}

/// What the CPUs did during one window, in CPU-seconds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuUsage {
    /// The window's length, seconds.
    pub wall_s: f64,
    /// CPUs of the machine.
    pub cpus: usize,
    /// Busy time of the whole machine (user + nice + system + irq + softirq).
    pub machine_busy_s: f64,
    /// Of which user + nice.
    pub machine_user_s: f64,
    /// Of which system.
    pub machine_system_s: f64,
    /// Of which irq + softirq (sampled by the tick; most softirq work is charged as
    /// system time of the task it ran on, see the module docs).
    pub machine_irq_s: f64,
    /// Time the hypervisor ran something else (not busy for this machine).
    pub machine_steal_s: f64,
    /// The load balancer's processes (agent, HAProxy, nginx).
    pub lb_process_s: f64,
    /// The XDP program's run time, when one ran.
    pub xdp_prog_s: Option<f64>,
    /// The XDP program's runs (packets), when one ran.
    pub xdp_runs: Option<u64>,
    /// This process's client threads.
    pub client_s: f64,
    /// This process's backend server threads.
    pub backends_s: f64,
    /// The kernel's softirq threads.
    pub ksoftirqd_s: f64,
    /// Every process on the machine, children that ended included.
    pub all_processes_s: f64,
}

impl CpuUsage {
    /// Time charged to processes other than the client, the backends, the load
    /// balancer's and the softirq threads: this process's main thread and the
    /// commands it runs, other programs on the machine, kernel threads. An
    /// estimate: a process that ends during the window and is reaped by a parent
    /// that does not wait for it takes all its earlier time along, which can make
    /// this negative.
    pub fn other_processes_s(&self) -> f64 {
        self.all_processes_s
            - self.client_s
            - self.backends_s
            - self.lb_process_s
            - self.ksoftirqd_s
    }

    /// The machine's busy time less other processes' ([`Self::other_processes_s`]):
    /// what the benchmark's parties and the kernel's work for them cost, even while
    /// something else runs on the machine.
    pub fn bench_busy_s(&self) -> f64 {
        self.machine_busy_s - self.other_processes_s().max(0.0)
    }

    /// Busy time charged to no process: interrupts and softirq work (packet
    /// processing) that ran while a CPU was otherwise idle.
    pub fn no_process_s(&self) -> f64 {
        self.machine_busy_s - self.all_processes_s
    }
}

/// The readings at one end of a window.
#[derive(Clone, Debug)]
pub struct Reading {
    at: std::time::Instant,
    machine: MachineTicks,
    processes: ProcessScan,
    client: u64,
    backends: u64,
    xdp: Option<(u64, u64)>,
}

/// Everything [`Reading`]s are taken from.
pub struct Meter<'a> {
    /// The load balancer's namespace.
    pub lb_ns: &'a Netns,
    /// The client's threads.
    pub client: &'a ThreadGroup,
    /// The backends' threads.
    pub backends: &'a ThreadGroup,
    /// The statistics switch and the XDP program's pin, when an XDP program runs.
    pub xdp: Option<(&'a BpfStats, &'a Path)>,
}

impl Meter<'_> {
    /// Reads everything now.
    pub fn read(&self) -> Result<Reading> {
        let xdp = match self.xdp {
            Some((stats, pin)) => Some(stats.program(pin)?),
            None => None,
        };
        Ok(Reading {
            at: std::time::Instant::now(),
            machine: MachineTicks::read()?,
            processes: scan_processes(self.lb_ns),
            client: self.client.ticks(),
            backends: self.backends.ticks(),
            xdp,
        })
    }
}

impl Reading {
    /// The usage from `earlier` to `self`.
    pub fn since(&self, earlier: &Reading) -> CpuUsage {
        let hz = ticks_per_second();
        let s = |ticks: u64| ticks as f64 / hz;
        let m = self.machine.since(&earlier.machine);
        let xdp = match (earlier.xdp, self.xdp) {
            (Some((t0, n0)), Some((t1, n1))) => {
                Some((t1.saturating_sub(t0) as f64 / 1e9, n1.saturating_sub(n0)))
            }
            _ => None,
        };
        CpuUsage {
            wall_s: self.at.duration_since(earlier.at).as_secs_f64(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            machine_busy_s: s(m.busy()),
            machine_user_s: s(m.user + m.nice),
            machine_system_s: s(m.system),
            machine_irq_s: s(m.irq + m.softirq),
            machine_steal_s: s(m.steal),
            lb_process_s: s(process_ticks_between(
                &earlier.processes.lb,
                &self.processes.lb,
            )),
            xdp_prog_s: xdp.map(|x| x.0),
            xdp_runs: xdp.map(|x| x.1),
            client_s: s(self.client.saturating_sub(earlier.client)),
            backends_s: s(self.backends.saturating_sub(earlier.backends)),
            ksoftirqd_s: s(self
                .processes
                .ksoftirqd
                .saturating_sub(earlier.processes.ksoftirqd)),
            all_processes_s: s(self.processes.all.saturating_sub(earlier.processes.all)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_cpu_line_parses_and_busy_leaves_out_idle_iowait_steal() {
        let text = "cpu  100 5 30 1000 7 1 9 4 0 0\ncpu0 50 2 15 500 3 0 4 2 0 0\nintr 1\n";
        let t = MachineTicks::parse(text).unwrap();
        assert_eq!(t.user, 100);
        assert_eq!(t.steal, 4);
        assert_eq!(t.busy(), 100 + 5 + 30 + 1 + 9);
        let later = MachineTicks {
            user: 150,
            idle: 1100,
            ..t
        };
        assert_eq!(later.since(&t).busy(), 50);
        assert_eq!(later.since(&t).idle, 100);
        assert_eq!(MachineTicks::parse("intr 1\n"), None);
    }

    #[test]
    fn task_stat_fields_are_counted_after_the_command_name() {
        // A command name with a space and a parenthesis, as a thread may have.
        let stat = "4242 (nginx: w) ker) S 1 4242 4242 0 -1 4194560 300 0 0 0 \
                    17 23 0 0 20 0 1 0 100 1000000 200 18446744073709551615";
        assert_eq!(
            parse_task_ticks(stat),
            Some(TaskTicks {
                own: 17 + 23,
                children: 0
            })
        );
        assert_eq!(command_of(stat), Some("nginx: w) ker"));
        assert_eq!(parse_task_ticks("garbage"), None);
        let before = BTreeMap::from([(1, 10), (2, 5)]);
        let after = BTreeMap::from([(1, 15), (3, 7)]);
        // Process 2 ended (lost), process 3 started (counts whole).
        assert_eq!(process_ticks_between(&before, &after), 5 + 7);
    }
}
