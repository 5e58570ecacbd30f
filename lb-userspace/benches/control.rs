//! Measures one control tick of the agent's pure part for 4 VIPs × 1,000 backends
//! (65,537-slot tables) in which one weight changes: a backend of one VIP turns
//! unhealthy. What a tick does here is what the agent's tick does between reading the
//! collectors and writing the maps: every VIP's control step, then the desired state
//! the dataplane diffs against its shadow.
//!
//! Run it as `cargo bench -p lb-userspace --bench control` (or `cargo xtask bench
//! control`). It prints the figures and writes them as JSON to the file named by
//! `LB_BENCH_JSON`, or else to `target/bench/control.json` under the workspace root:
//! `control_tick_ms` (median of the timed ticks), with `backends` (per VIP) and `vips`,
//! and, as a baseline measured in the same run, `table_build_ms`: one table build at
//! this size.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Instant;

use lb_common::types::VipKey;
use lb_userspace::agent::step_vips;
use lb_userspace::config::Config;
use lb_userspace::core::control::{Observation, VipControl};
use lb_userspace::core::maglev::{self, MaglevBackend};
use lb_userspace::core::policy::Input;
use lb_userspace::desired::{Desired, addr_bytes, vip_key};

const VIPS: usize = 4;
const BACKENDS: usize = 1000;
const TABLE: u32 = 65537;
/// Timed ticks; the median is reported.
const RUNS: usize = 11;

/// The configuration: `VIPS` VIPs of `BACKENDS` backends each, policy `ai`.
fn config() -> Config {
    let mut text = String::new();
    for v in 0..VIPS {
        let _ = writeln!(
            text,
            "[[vip]]\naddress = \"198.18.0.{}\"\nport = 80\nprotocol = \"tcp\"\n\
             table_size = {TABLE}\npolicy = \"ai\"",
            v + 1
        );
        for b in 0..BACKENDS {
            let _ = writeln!(
                text,
                "[[vip.backend]]\naddress = \"198.19.{}.{}\"\nmac = \"02:00:00:{v:02x}:{:02x}:{:02x}\"\n\
                 weight = {}",
                (v * BACKENDS + b) / 250,
                (v * BACKENDS + b) % 250 + 1,
                b / 256,
                b % 256,
                100 + (b % 7) * 10
            );
        }
    }
    Config::parse(&text).expect("the benchmark's configuration is valid")
}

/// One tick as the agent's `control_tick` runs it once the collectors are read:
/// every VIP's control step against the table in force (`agent::step_vips`, the
/// agent's own), then, if a weight changed, the desired state, given the tables the
/// steps built.
fn tick(
    config: &Config,
    desired: &Desired,
    vips: &mut BTreeMap<VipKey, VipControl>,
    unhealthy: Option<IpAddr>,
) -> Desired {
    let (changed, tables) = step_vips(config, desired, vips, &mut |_, b, id, _| Input {
        healthy: Some(b.address) != unhealthy,
        ..Input::observed(id, b.weight, Observation::default(), None)
    });
    if !changed {
        return desired.clone();
    }
    Desired::plan(
        config,
        Some(desired),
        &|vip, b, id| {
            let w = vips[&vip_key(vip)].state.weights.get(&id).copied();
            (w.unwrap_or(b.weight), 0)
        },
        &tables,
    )
    .expect("the plan builds")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let config = config();
    let fresh = || -> BTreeMap<VipKey, VipControl> {
        config
            .vips
            .iter()
            .map(|v| {
                let configured: Vec<u32> = v.backends.iter().map(|b| b.weight).collect();
                let params = config.control.params_for(&configured);
                (vip_key(v), VipControl::new(v.policy, params))
            })
            .collect()
    };
    let start = Desired::from_config(&config).expect("the configuration plans");
    let victim = config.vips[0].backends[BACKENDS / 2].address;
    let mut ticks = Vec::new();
    for _ in 0..RUNS {
        // A steady state first (every policy has run once), then the timed tick.
        let mut vips = fresh();
        let steady = tick(&config, &start, &mut vips, None);
        let steady = tick(&config, &steady, &mut vips, None);
        let t = Instant::now();
        let after = tick(&config, &steady, &mut vips, Some(victim));
        ticks.push(t.elapsed().as_secs_f64() * 1e3);
        let changed = after.backends.values().filter(|b| b.weight == 0).count();
        assert_eq!(changed, 1, "exactly the unhealthy backend loses its weight");
        black_box(after);
    }
    let keys: Vec<[u8; 16]> = config.vips[0]
        .backends
        .iter()
        .map(|b| addr_bytes(b.address).0)
        .collect();
    let weights: Vec<u32> = config.vips[0].backends.iter().map(|b| b.weight).collect();
    let builds: Vec<f64> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            black_box(maglev::build(&MaglevBackend::zip(&keys, &weights), TABLE).ok());
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let tick_ms = median(ticks);
    let build_ms = median(builds);
    println!(
        "control tick, {VIPS} VIPs x {BACKENDS} backends, one weight changes: {tick_ms:.1} ms \
         (one {TABLE}-slot table build: {build_ms:.1} ms; ratio {:.2})",
        tick_ms / build_ms
    );
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.canonicalize().unwrap_or(root);
    let path = std::env::var_os("LB_BENCH_JSON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/bench/control.json"));
    let doc = serde_json::json!({
        "bench": "control",
        "control_tick_ms": tick_ms,
        "backends": BACKENDS,
        "vips": VIPS,
        "table_size": TABLE,
        "table_build_ms": build_ms,
        "tick_per_build": tick_ms / build_ms,
        "runs": RUNS,
    });
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&path, doc.to_string()) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("control bench: writing {}: {e}", path.display()),
    }
}
