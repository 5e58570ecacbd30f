//! Small-scale checks of the simulator (debug builds: a dozen backends, tens of
//! thousands of requests per run).

use super::*;

/// A dozen backends of 160 requests per second per unit, 30 s.
fn small() -> SimParams {
    SimParams {
        duration_s: 30.0,
        backends: 12,
        service_s: 0.025,
        fit_threads: 1,
        ..SimParams::default()
    }
}

#[test]
fn the_same_seed_gives_the_same_report() {
    let p = SimParams {
        duration_s: 12.0,
        ..small()
    };
    let a = run(ScenarioId::S2, PolicyKind::Reactive, 5, &p);
    let b = run(ScenarioId::S2, PolicyKind::Reactive, 5, &p);
    assert_eq!(a.without_timing(), b.without_timing());
    assert!(a.requests > 10_000, "{}", a.requests);
    let c = run(ScenarioId::S2, PolicyKind::Reactive, 6, &p);
    assert_ne!(a.requests, c.requests);
    // Every policy of a seed sees the same requests.
    let d = run(ScenarioId::S2, PolicyKind::Equal, 5, &p);
    assert_eq!(a.requests, d.requests);
}

#[test]
fn static_beats_equal_on_heterogeneous_capacity() {
    let p = small();
    let equal = run(ScenarioId::S1, PolicyKind::Equal, 1, &p);
    let fixed = run(ScenarioId::S1, PolicyKind::Static, 1, &p);
    // Equal weights give the 1x backends 2.1 times their capacity.
    assert!(equal.util_max > 0.99, "{}", equal.util_max);
    assert!(fixed.util_max < 0.97, "{}", fixed.util_max);
    let (e, s) = (equal.p99_s.unwrap(), fixed.p99_s.unwrap());
    assert!(s * 3.0 < e, "static p99 {s} vs equal {e}");
    assert!(fixed.error_rate < equal.error_rate);
    assert!(fixed.error_rate < 1e-3, "{}", fixed.error_rate);
    // Static and equal never change the table.
    assert_eq!(fixed.slots_moved + equal.slots_moved, 0);
}

#[test]
fn table_moves_stay_within_the_budget() {
    let p = SimParams {
        duration_s: 20.0,
        ..small()
    };
    for (scenario, policy) in [
        (ScenarioId::S2, PolicyKind::Reactive),
        (ScenarioId::S1, PolicyKind::Reactive),
        (ScenarioId::S2, PolicyKind::Ai),
    ] {
        let r = run(scenario, policy, 3, &p);
        assert!(!r.updates.is_empty(), "{scenario} {policy}: no update");
        let params = engine::agent_params(&vec![1; r.backends], &p);
        let budget = params.budget_per_second * params.interval_s;
        // Quantization may add half a quantum per backend on each side.
        let slack = r.backends as f64 * params.quantum as f64 / params.scale as f64;
        let size = f64::from(p.table_size);
        // A backend sheds outside the budget only right after the pool's capacity
        // changed: in the first seconds, where S1's equal start overloads the
        // small backends; right after S2's slowdown; or right after its recovery,
        // while the backends that carried the slowed quarter are saturated and the
        // recovered ones win their share back only within the budget. Never in
        // between.
        let scenario_ = Scenario::new(scenario, &p);
        let shed_allowed = |t: f64| {
            t <= 5.0
                || scenario_.degradations().iter().any(|&(at, _, end)| {
                    (at..=at + 5.0).contains(&t) || (end..=end + 5.0).contains(&t)
                })
        };
        for u in &r.updates {
            if u.shed {
                assert!(shed_allowed(u.t), "{scenario} {policy}: shed at {u:?}");
                continue;
            }
            assert!(
                u.ideal_share <= budget + slack,
                "{scenario} {policy}: {u:?} over {budget} + {slack}"
            );
            // The policy checks the real table against the budget before it
            // installs it: the slots moved, not only the ideal shares, stay within.
            let bound = budget * size;
            assert!(
                (u.slots as f64) <= bound + 1.0,
                "{scenario} {policy}: {} slots at {} s, bound {bound:.0}",
                u.slots,
                u.t
            );
        }
        // S2's slowed quarter is cut at once.
        if scenario == ScenarioId::S2 {
            assert!(
                r.updates.iter().any(|u| u.shed),
                "{scenario} {policy}: no shed"
            );
        }
    }
}

#[test]
fn littles_law_holds() {
    let p = SimParams {
        duration_s: 40.0,
        ..small()
    };
    let r = run(ScenarioId::S1, PolicyKind::Static, 9, &p);
    let l = &r.little;
    let expected = l.arrival_rate * l.mean_time_in_system_s;
    assert!(expected > 50.0, "{l:?}");
    assert!(
        (l.mean_in_system / expected - 1.0).abs() < 0.05,
        "in system {} vs λW {expected}",
        l.mean_in_system
    );
    // The offered rate is what the scenario asks for.
    let asked = 0.9 * r.nominal_capacity;
    assert!(
        (r.offered_rate / asked - 1.0).abs() < 0.02,
        "{}",
        r.offered_rate
    );
}

#[test]
fn a_failing_backend_is_unhealthy_only_behind_a_deep_check() {
    let p = SimParams {
        duration_s: 12.0,
        ..small()
    };
    let shallow = run(ScenarioId::S5, PolicyKind::Equal, 2, &p);
    assert_eq!(shallow.health_changes, 0);
    assert!(shallow.failed_fast > 0);
    let deep = run(
        ScenarioId::S5,
        PolicyKind::Equal,
        2,
        &SimParams {
            deep_health: true,
            ..p
        },
    );
    // Down at D/3 after two failed probes, up at 2D/3 after two good ones.
    assert_eq!(deep.health_changes, 2);
    assert!(deep.failed_fast * 3 < shallow.failed_fast, "{deep:?}");
}

#[test]
fn scenarios_have_their_load_and_changes() {
    let p = SimParams::default();
    for id in ScenarioId::ALL {
        let s = Scenario::new(id, &p);
        assert_eq!(s.len(), 120);
        assert!(s.mean_rate() >= 100_000.0, "{id}: {}", s.mean_rate());
    }
    let s4 = Scenario::new(ScenarioId::S4, &p);
    assert!((s4.mean_rate() / s4.nominal_capacity() - 0.7).abs() < 1e-9);
    let s3 = Scenario::new(ScenarioId::S3, &p);
    assert_eq!(s3.degradations().len(), 8);
    assert!(
        s3.degradations()
            .iter()
            .all(|(_, slowed, _)| slowed.len() == 30)
    );
    let shares = s3.capacity_shares_at(15.0);
    assert!((shares[30..60].iter().sum::<f64>() - 7.5 / 97.5).abs() < 1e-9);
}

/// "Never thrashes": where nothing changes (S1's capacities are fixed), `ai`
/// settles once it has moved the traffic where the capacity is, instead of
/// spending its move budget on every step chasing noise in the latencies.
#[test]
fn ai_settles_when_nothing_changes() {
    let p = SimParams {
        duration_s: 40.0,
        ..small()
    };
    let r = run(ScenarioId::S1, PolicyKind::Ai, 2, &p);
    let size = f64::from(p.table_size);
    let moved = |from: f64, to: f64| -> f64 {
        r.updates
            .iter()
            .filter(|u| u.t > from && u.t <= to)
            .map(|u| u.slots as f64)
            .sum::<f64>()
            / size
    };
    let params = engine::agent_params(&vec![1; r.backends], &p);
    let per_10s = params.budget_per_second * 10.0;
    let (early, late) = (moved(0.0, 10.0), moved(30.0, 40.0));
    assert!(
        late < 0.25 * per_10s,
        "moved {late:.4} of the table in the last 10 s"
    );
    assert!(early > late, "early {early:.4}, late {late:.4}");
}

#[test]
fn phases_cover_the_run_once_and_add_up_to_its_moves() {
    let p = SimParams {
        duration_s: 12.0,
        ..small()
    };
    for id in ScenarioId::ALL {
        let s = Scenario::new(id, &p);
        let seconds: f64 = s.phases.iter().map(Phase::seconds).sum();
        assert!((seconds - p.duration_s).abs() < 1e-9, "{id}: {seconds}");
        for j in 1..=24 {
            let t = j as f64 * 0.5;
            let holding = s.phases.iter().filter(|ph| ph.holds(t)).count();
            assert_eq!(holding, 1, "{id} at {t}");
        }
    }
    let s2 = Scenario::new(ScenarioId::S2, &p);
    let names: Vec<_> = s2.phases.iter().map(|ph| ph.name).collect();
    assert_eq!(names, ["steady", "slow", "recovered"]);
    // The tick at the slowdown decides on the steady interval before it.
    assert!(s2.phases[0].holds(4.0) && s2.phases[1].holds(4.5));
    let r = run(ScenarioId::S2, PolicyKind::Reactive, 3, &p);
    let by_phase: u64 = r.phases.iter().map(|ph| ph.slots_moved).sum();
    assert_eq!(by_phase, r.slots_moved);
}

#[test]
fn the_built_in_series_are_the_five_nab_cpu_series() {
    let p = SimParams::default();
    assert_eq!(p.series.len(), 5);
    for s in &p.series {
        assert!(s.name.starts_with("ec2_cpu_utilization_"), "{}", s.name);
        assert_eq!(s.values.len(), 4032, "{}", s.name);
        assert!(s.values.iter().all(|v| (0.0..=100.0).contains(v)));
    }
}

#[test]
fn s6_capacities_follow_the_series_within_bounds() {
    let p = SimParams::default();
    let s = Scenario::new(ScenarioId::S6, &p);
    let d = p.duration_s;
    let factors = replayed_capacity(&p.series, s.len(), d);
    let steps = (d / REPLAY_STEP_S).ceil() as usize;
    let mut varying = 0;
    for (b, row) in factors.iter().enumerate() {
        assert_eq!(row.len(), series_needed(d));
        // The scenario's slowdowns are the inverse of the replayed capacity.
        for (i, &f) in row.iter().take(steps).enumerate() {
            let t = i as f64 * REPLAY_STEP_S + REPLAY_STEP_S / 2.0;
            let slowdown = s.slowdowns_at(t)[b];
            assert!((slowdown * f - 1.0).abs() < 1e-12, "backend {b} at {t}");
            assert!((MIN_CAPACITY..=1.0).contains(&f), "{f}");
        }
        let (lo, hi) = row
            .iter()
            .fold((1.0f64, 0.0f64), |(lo, hi), &f| (lo.min(f), hi.max(f)));
        if hi - lo > 0.1 {
            varying += 1;
        }
    }
    // The busy series make a good part of the backends change by more than 10 %
    // of their capacity during the run.
    assert!(varying >= s.len() / 4, "{varying} of {} vary", s.len());
    // A neighbour at 100 % leaves a quarter; an idle one everything.
    assert_eq!(neighbour_capacity(100.0), 0.25);
    assert_eq!(neighbour_capacity(0.0), 1.0);
    assert_eq!(neighbour_capacity(40.0), 0.7);
    // Backends sharing a series replay different stretches of it.
    assert_ne!(factors[0], factors[5]);
    // The load is 80 % of the capacity left, on average over the run.
    let left: f64 = factors
        .iter()
        .map(|row| row.iter().take(steps).sum::<f64>() * REPLAY_STEP_S)
        .sum::<f64>()
        / (d * s.len() as f64);
    let expected = 0.8 * left * s.nominal_capacity();
    assert!((s.mean_rate() / expected - 1.0).abs() < 1e-9);
    assert!(left < 0.9, "{left}");
    // No reaction is measured; the watched quarter is the most variable one.
    assert!(s.degradations().is_empty());
    assert_eq!(s.watched_at(10.0).len(), 30);
}

#[test]
fn s7_stalls_come_every_period_with_offset_phases() {
    let p = SimParams::default();
    let s = Scenario::new(ScenarioId::S7, &p);
    let (period, stall) = (p.duration_s / 6.0, p.duration_s / 24.0);
    let offset = period / 30.0;
    for k in 1..6 {
        let start = k as f64 * period;
        let at = |t: f64| s.slowdowns_at(t);
        // Backend 0 stalls from k·T for T/4; backend 1 a 30th of T later.
        assert_eq!(at(start - 0.01)[0], 1.0, "stall {k}");
        assert_eq!(at(start + 0.01)[0], 4.0, "stall {k}");
        assert_eq!(at(start + stall - 0.01)[0], 4.0, "stall {k}");
        assert_eq!(at(start + stall + 0.01)[0], 1.0, "stall {k}");
        assert_eq!(at(start + 0.01)[1], 1.0, "stall {k}");
        assert_eq!(at(start + offset + 0.01)[1], 4.0, "stall {k}");
    }
    // Nothing before the first period; only the first quarter ever stalls, five
    // times each, and at any time an eighth to a quarter of it at most.
    assert!(s.events.iter().all(|e| e.at >= period && e.backend < 30));
    for b in 0..30 {
        let stalls = s
            .events
            .iter()
            .filter(|e| e.backend == b && e.change == Change::Slowdown(4.0))
            .count();
        assert_eq!(stalls, 5, "backend {b}");
    }
    let stalled = s.slowdowns_at(50.0).iter().filter(|&&x| x > 1.0).count();
    assert!((7..=8).contains(&stalled), "{stalled}");
    assert!(s.degradations().is_empty());
}

#[test]
fn s8_load_rises_above_capacity_at_midday_and_falls_again() {
    let p = SimParams::default();
    let s = Scenario::new(ScenarioId::S8, &p);
    let cap = s.nominal_capacity();
    let d = p.duration_s;
    let at = |t: f64| s.rate_at(t) / cap;
    assert!((at(0.0) - 0.3).abs() < 0.01, "{}", at(0.0));
    assert!(at(d / 2.0) > 1.09, "{}", at(d / 2.0));
    assert!((at(d - 0.1) - 0.3).abs() < 0.01, "{}", at(d - 0.1));
    // Rising before the middle, falling after.
    assert!(at(d / 4.0) < at(d / 3.0) && at(d / 3.0) < at(d / 2.0));
    assert!(at(2.0 * d / 3.0) > at(3.0 * d / 4.0));
    assert!(
        (s.mean_rate() / cap - 0.7).abs() < 0.005,
        "{}",
        s.mean_rate()
    );
    // Unequal capacities: static is configured with them.
    assert_eq!(s.static_weights, s.units);
    assert_eq!(s.units.iter().filter(|&&u| u == 4).count(), 40);
    let names: Vec<_> = s.phases.iter().map(|ph| ph.name).collect();
    assert_eq!(names, ["low", "rise", "fall"]);
}

#[test]
fn the_new_scenarios_run() {
    let p = SimParams {
        duration_s: 12.0,
        ..small()
    };
    for id in [ScenarioId::S6, ScenarioId::S7, ScenarioId::S8] {
        let r = run(id, PolicyKind::Reactive, 4, &p);
        assert!(r.requests > 1000, "{id}: {}", r.requests);
        assert!(r.reactions_s.is_empty(), "{id}");
        assert_eq!(r.series.len(), 24, "{id}");
    }
}
