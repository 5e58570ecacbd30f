//! `cargo xtask sim-diff BEFORE AFTER`: whether two simulator outputs
//! (`target/bench/sim.json` of `cargo xtask bench sim`) agree on every figure but the
//! wall-clock ones. A refactor of the control step must leave them identical.

use std::path::Path;

use anyhow::{Context, bail};
use serde_json::Value;

/// Figures that measure the machine, not the simulation.
const WALL_CLOCK: [&str; 3] = ["wall_s", "fit_wall_s", "sim_requests_per_s"];

/// `value` without the wall-clock figures, at any depth.
fn without_wall_clock(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !WALL_CLOCK.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), without_wall_clock(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_wall_clock).collect()),
        other => other.clone(),
    }
}

/// The first path at which `a` and `b` differ, if any.
fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                let Some(w) = y.get(k) else {
                    return Some(format!("{path}.{k}: only in the first"));
                };
                if let Some(d) = first_difference(v, w, &format!("{path}.{k}")) {
                    return Some(d);
                }
            }
            y.keys()
                .find(|k| !x.contains_key(*k))
                .map(|k| format!("{path}.{k}: only in the second"))
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!("{path}: {a} against {b}")),
    }
}

fn load(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not the simulator's JSON", path.display()))?;
    Ok(without_wall_clock(&doc))
}

pub fn run(before: &Path, after: &Path) -> anyhow::Result<()> {
    let (a, b) = (load(before)?, load(after)?);
    let mut differ = false;
    for part in ["params", "summary", "runs"] {
        let count = a[part].as_array().map_or(1, Vec::len);
        match first_difference(&a[part], &b[part], part) {
            None => println!("{part}: {count} identical"),
            Some(d) => {
                println!("{part}: DIFFER, first at {d}");
                differ = true;
            }
        }
    }
    if differ {
        bail!("the simulator's outputs differ");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wall_clock_figures_are_ignored_and_anything_else_is_found() {
        let a = json!({"runs": [{"p99_s": 0.1, "wall_s": 3.0, "model": {"fit_wall_s": 1.0}}]});
        let b = json!({"runs": [{"p99_s": 0.1, "wall_s": 9.0, "model": {"fit_wall_s": 2.0}}]});
        let (a, b) = (without_wall_clock(&a), without_wall_clock(&b));
        assert_eq!(first_difference(&a, &b, ""), None);
        let c = without_wall_clock(&json!({"runs": [{"p99_s": 0.2, "wall_s": 3.0, "model": {}}]}));
        let d = first_difference(&a, &c, "").expect("p99 differs");
        assert!(d.contains("runs[0]"), "{d}");
    }
}
