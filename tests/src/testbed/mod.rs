//! The policy testbed of issue 6: emulated backends with a capacity, an open-loop
//! load generator, the eight scenarios, and the report that compares the four weight
//! policies (`equal`, `static`, `reactive`, `ai`) behind the real agent and the real
//! XDP datapath. Run by the `lb-bench-policies` binary (`cargo xtask bench policies`)
//! and tested piece by piece in `tests/tests/testbed.rs`.
//!
//! # Layout
//! - [`backend`]: [`backend::EmulatedBackend`], an HTTP/1.0 server inside a backend
//!   namespace with `slots` concurrent requests of a fixed service time (times a
//!   slowdown factor set at run time), a FIFO queue beyond that, a "fail fast" mode
//!   and Prometheus metrics (`app_*` and a node-exporter-style CPU counter).
//! - [`hold`]: [`hold::HoldClients`], long-lived connections to the backends
//!   (`GET /hold`), each pinging on its own interval, every answer recorded.
//! - [`loadgen`]: [`loadgen::LoadGen`], Poisson arrivals at a rate that may change
//!   over time, one new TCP connection per request, never waiting for responses
//!   (open loop); every request recorded with its scheduled start.
//! - [`scenario`]: S1 to S8, and [`scenario::run`], which builds a topology, starts
//!   the backends and the agent with one policy, drives the load and samples the
//!   agent every second.
//! - [`report`]: per-run figures (latency percentiles, errors, utilisation, reaction
//!   time, table slots moved, non-SYN misses), medians over repeats, and the Markdown,
//!   JSON and SVG outputs.
//!
//! Everything runs inside namespaces of [`crate::topology::Topology`]: addresses from
//! 198.18.0.0/15 only, no default route, all removed on drop and on SIGINT/SIGTERM.

pub mod backend;
pub mod hold;
pub mod loadgen;
pub mod report;
pub mod scenario;

use std::time::Duration;

/// A small, fast, seeded pseudo-random generator (SplitMix64); good enough for
/// arrival times, and the same seed always gives the same schedule.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform number in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An exponentially distributed number with mean 1.
    pub fn exp1(&mut self) -> f64 {
        -(1.0 - self.uniform()).ln()
    }
}

/// The value at quantile `q` (0..=1) of `sorted` (ascending), nearest rank; `None`
/// when empty.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The median of `values`, ignoring NaN; `None` when there is none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Seconds as `f64`.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Raises the soft limit of open files to the hard limit: a run holds one socket per
/// request in flight, on the client and on the backend side, in this one process.
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit read and write the one struct they are given.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Removes the pinned datapaths (`/sys/fs/bpf/lb/<instance>`) that runs of this
/// harness left behind when they were killed before their agent could clean up, and
/// returns their instance names. Only instance names made by
/// [`crate::netns::unique_prefix`] whose creating process is gone are touched.
pub fn sweep_stale_pins() -> Vec<String> {
    let root = lb_userspace::agent::pin_dir("x");
    let Some(root) = root.parent() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = crate::netns::creator_pid(&name) else {
            continue;
        };
        if pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        crate::spread::remove_pins(&name);
        let _ = std::fs::remove_dir(entry.path());
        removed.push(name);
    }
    removed
}

/// Removes what this process's runs may leave when the process exits in the middle
/// of one (the namespace cleanup on SIGINT/SIGTERM kills the agent, which then cannot
/// remove its pins): the pinned datapaths and configuration directories whose names
/// carry this process's id. Meant for an `atexit` handler; harmless at any other time
/// when no run is in progress.
pub fn remove_own_leftovers() {
    let own = Some(std::process::id());
    let pins = lb_userspace::agent::pin_dir("x");
    if let Some(root) = pins.parent()
        && let Ok(entries) = std::fs::read_dir(root)
    {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if crate::netns::creator_pid(&name) == own {
                crate::spread::remove_pins(&name);
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with("-lb") && crate::netns::creator_pid(&name) == own {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// What every harness binary that builds topologies and starts agents does first:
/// more open files, namespace cleanup on SIGINT/SIGTERM, [`remove_own_leftovers`] at
/// exit (the cleanup ends the process through exit(3) once the namespaces are gone;
/// the agent's pins and the run's config directory go then), and a sweep of pins
/// that killed runs left behind, reported under `name`.
pub fn prepare_process(name: &str) {
    raise_fd_limit();
    crate::netns::install_signal_cleanup();
    extern "C" fn at_exit() {
        remove_own_leftovers();
    }
    // SAFETY: registers a plain function with no arguments, as atexit expects.
    unsafe {
        libc::atexit(at_exit);
    }
    let stale = sweep_stale_pins();
    if !stale.is_empty() {
        eprintln!("{name}: removed stale pins of {stale:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_seeded_and_exponential_has_mean_one() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        assert_eq!(a.next_u64(), b.next_u64());
        let n = 200_000;
        let mean: f64 = (0..n).map(|_| a.exp1()).sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
    }

    #[test]
    fn quantiles_and_medians() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile_sorted(&v, 0.5), Some(50.0));
        assert_eq!(quantile_sorted(&v, 0.99), Some(99.0));
        assert_eq!(quantile_sorted(&v, 1.0), Some(100.0));
        assert_eq!(quantile_sorted(&[], 0.5), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN]), None);
    }
}
