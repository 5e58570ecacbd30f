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

use lb_userspace::config::Config;
use lb_userspace::desired::{Desired, addr_bytes, vip_key};
use lb_userspace::maglev::{self, MaglevBackend};
use lb_userspace::policy::{self, Input, Params, State};

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

/// Per VIP: its parameters and policy state, as the agent keeps them.
struct Vip {
    params: Params,
    state: State,
}

/// One tick as the agent runs it: each VIP's policy step with the slot budget on the
/// real table, then, if a weight changed, the desired state of every VIP.
fn tick(config: &Config, desired: &Desired, vips: &mut [Vip], unhealthy: Option<IpAddr>) -> Desired {
    let mut changed = false;
    for (vip, control) in config.vips.iter().zip(vips.iter_mut()) {
        let key = vip_key(vip);
        let ids: BTreeMap<IpAddr, u32> = desired
            .backends
            .iter()
            .filter(|(_, d)| d.vip == key)
            .map(|(id, d)| (d.address, *id))
            .collect();
        let inputs: Vec<Input> = vip
            .backends
            .iter()
            .map(|b| Input {
                name: b.address.to_string(),
                configured_weight: b.weight,
                healthy: Some(b.address) != unhealthy,
                ..Input::default()
            })
            .collect();
        let current: Option<Vec<u32>> = desired.vips.get(&key).and_then(|d| {
            let index: BTreeMap<u32, u32> = (0..)
                .zip(&vip.backends)
                .filter_map(|(i, b)| Some((*ids.get(&b.address)?, i)))
                .collect();
            d.table.iter().map(|id| index.get(id).copied()).collect()
        });
        let keys: Vec<[u8; 16]> = vip.backends.iter().map(|b| addr_bytes(b.address).0).collect();
        let mut moved = |weights: &[u32]| {
            let table = maglev::build(&MaglevBackend::zip(&keys, weights), vip.table_size);
            maglev::moved_share(&table.ok()?, current.as_deref()?)
        };
        let before = control.state.weights.clone();
        let _ = policy::step_with_table(
            vip.policy,
            &control.params,
            &mut control.state,
            &inputs,
            &mut moved,
        );
        changed |= control.state.weights != before;
    }
    if !changed {
        return desired.clone();
    }
    Desired::plan(config, Some(desired), &|vip, b| {
        let i = config.vips.iter().position(|v| v == vip).unwrap_or(0);
        let w = vips[i].state.weights.get(&b.address.to_string()).copied();
        (w.unwrap_or(b.weight), 0)
    })
    .expect("the plan builds")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let config = config();
    let fresh = || -> Vec<Vip> {
        config
            .vips
            .iter()
            .map(|v| Vip {
                params: policy::params_for(
                    &v.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
                    &config.control,
                ),
                state: State::default(),
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
