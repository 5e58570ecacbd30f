//! A fleet of three LBs behind an ECMP router, `ai` policy, coordinated through a
//! real etcd (Debian's `etcd-server`, started here in its own namespace): identical
//! tables once each epoch is applied, holds given on one LB applied on all, an LB cut
//! off from etcd that keeps its epoch and catches up, an etcd outage ridden out, the
//! leader killed and replaced, a deposed leader fenced, TLS, and bad `[cluster]`
//! input refused naming the field. Real TCP connections run through the fleet the
//! whole time and none may fail (a backend that dies answers 503 until the LBs take
//! it out: those answers are the only failed requests allowed).
//!
//! With flow sharing (issue 19), long-lived connections of every age keep their
//! backend while `ai` moves weights and LBs leave: one's route withdrawn, another
//! killed.

use std::{
    io::{Read, Write},
    time::{Duration, Instant},
};

use lb_tests::{
    etcd::EtcdServer,
    fleet::{
        FleetSpec, FleetWorld, ShareCounts, agreed, cluster_status, kernel_digests, leader, live,
        newest_epoch, node_name, wait_for, wait_sharing,
    },
    netns::{Netns, unique_prefix},
    spread::{Agent, run_command},
    survive::{self, Event, Leave, LossSpec},
    testbed::{
        hold::{HoldClients, HoldSpec},
        loadgen::{LoadGen, LoadSpec},
    },
};
use lb_userspace::{
    cluster::{
        etcd::{EpochSeen, Etcd, Leadership, PublishError},
        records::EpochRecord,
    },
    config::Cluster,
};
use serde_json::Value;

/// The weight of `backend` in `lb backend list --json` of `agent`, and its control.
fn weight_of(agent: &Agent, backend: &str) -> (f64, String) {
    let list: Value =
        serde_json::from_str(&agent.ctl(&["backend", "list", "--json"]).unwrap()).unwrap();
    let b = list
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["backend"] == backend)
        .unwrap_or_else(|| panic!("{backend} not listed: {list}"));
    (
        b["weight"].as_f64().unwrap(),
        b["control"].as_str().unwrap_or_default().to_owned(),
    )
}

/// What every agent says, for a failure's message: cluster status, backends and
/// its log so far.
fn dump(agents: &mut [Option<Agent>]) {
    for (i, a) in agents.iter_mut().enumerate() {
        let Some(a) = a else { continue };
        eprintln!("--- lb-{i}");
        eprintln!("{:?}", cluster_status(a).map(|s| s.to_string()));
        eprintln!("{:?}", a.ctl(&["backend", "list"]));
        eprintln!("{}", a.drain_log().join("\n"));
    }
}

/// Waits until every live agent gives `backend` some weight; fails saying `what`.
fn wait_weighted(agents: &mut [Option<Agent>], backend: &str, what: &str, secs: u64) {
    let done = wait_for(what, Duration::from_secs(secs), || {
        let all = live(agents).iter().all(|a| weight_of(a, backend).0 > 0.0);
        Ok(all.then_some(()))
    });
    if let Err(e) = done {
        fail(agents, e);
    }
}

/// Fails the test with `e`, after what every agent says.
fn fail(agents: &mut [Option<Agent>], e: anyhow::Error) -> ! {
    dump(agents);
    panic!("{e:#}")
}

#[test]
fn a_fleet_of_three_applies_one_decision_through_every_failure() {
    let mut world = FleetWorld::build(FleetSpec::new(3)).unwrap();
    let mut agents: Vec<Option<Agent>> = (0..3).map(|i| Some(world.start_lb(i).unwrap())).collect();

    // One epoch, applied everywhere: identical tables in every kernel.
    let first = wait_for(
        "the first epoch applied by all",
        Duration::from_secs(20),
        || agreed(&live(&agents), 1),
    )
    .unwrap_or_else(|e| fail(&mut agents, e));
    let lead = wait_for("one leader", Duration::from_secs(10), || {
        Ok(leader(&agents))
    })
    .unwrap_or_else(|e| fail(&mut agents, e));
    eprintln!(
        "fleet: epoch {first} applied by all; {} leads",
        node_name(lead)
    );
    let s = cluster_status(agents[0].as_ref().unwrap()).unwrap();
    assert_eq!(s["nodes"].as_array().unwrap().len(), 3, "{s}");
    assert!(
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["same_config"] == true),
        "{s}"
    );

    // Real traffic through the router for the whole test.
    let load = LoadGen::start(
        &world.client,
        LoadSpec {
            timeout: Duration::from_secs(5),
            ..LoadSpec::new(world.vip(), 60.0, Duration::from_secs(600))
        },
    )
    .unwrap();

    // A backend degrades: the leader moves weights away from it, and every LB
    // applies each epoch.
    world.backends[0].set_slowdown(10.0);
    let b0 = world.topo.backend(0).ipv4().to_string();
    let b1 = world.topo.backend(1).ipv4().to_string();
    let b2 = world.topo.backend(2).ipv4().to_string();
    let fell = wait_for(
        "the degraded backend's weight falls everywhere",
        Duration::from_secs(40),
        || {
            let Some(epoch) = agreed(&live(&agents), first + 1)? else {
                return Ok(None);
            };
            let all_lower = live(&agents)
                .iter()
                .all(|a| weight_of(a, &b0).0 < weight_of(a, &b1).0);
            Ok(all_lower.then_some(epoch))
        },
    );
    if let Err(e) = fell {
        fail(&mut agents, e);
    }

    // A drain given on one LB is fleet state: every LB applies it.
    let follower = (lead + 1) % 3;
    let out = agents[follower]
        .as_ref()
        .unwrap()
        .ctl(&["drain", &b2])
        .unwrap();
    assert!(out.contains("etcd"), "{out}");
    let drained = wait_for(
        "the drain applied by every LB",
        Duration::from_secs(10),
        || {
            let done = live(&agents).iter().all(|a| {
                let (w, control) = weight_of(a, &b2);
                w == 0.0 && control == "drained"
            });
            Ok(done.then_some(()))
        },
    );
    if let Err(e) = drained {
        fail(&mut agents, e);
    }
    wait_for("agreement after the drain", Duration::from_secs(30), || {
        agreed(&live(&agents), 1)
    })
    .unwrap_or_else(|e| fail(&mut agents, e));
    agents[lead]
        .as_ref()
        .unwrap()
        .ctl(&["undrain", &b2])
        .unwrap();
    wait_weighted(&mut agents, &b2, "the undrain applied by every LB", 10);

    // One LB cut off from etcd keeps its epoch and says so; the others go on; it
    // catches up when it reconnects.
    let cut = (lead + 2) % 3;
    world.cut_from_etcd(cut, true).unwrap();
    let cut_agent = agents[cut].as_ref().unwrap();
    let kept = wait_for("the cut LB notices", Duration::from_secs(15), || {
        let s = cluster_status(cut_agent)?;
        Ok((s["connected"] == false).then(|| s["epoch_applied"].as_u64().unwrap()))
    })
    .unwrap();
    let digests_kept = kernel_digests(cut_agent).unwrap();
    agents[lead]
        .as_ref()
        .unwrap()
        .ctl(&["weight", "set", &b1, "3"])
        .unwrap();
    let others: Vec<&Agent> = [lead, follower]
        .iter()
        .map(|&i| agents[i].as_ref().unwrap())
        .collect();
    let moved_on = wait_for(
        "the others apply a newer epoch",
        Duration::from_secs(15),
        || agreed(&others, kept + 1),
    )
    .unwrap();
    let s = cluster_status(cut_agent).unwrap();
    assert_eq!(
        s["epoch_applied"].as_u64().unwrap(),
        kept,
        "the cut LB kept its epoch: {s}"
    );
    assert_eq!(s["connected"], false, "{s}");
    assert!(s["last_error"].as_str().is_some(), "{s}");
    assert_eq!(kernel_digests(cut_agent).unwrap(), digests_kept);
    world.cut_from_etcd(cut, false).unwrap();
    wait_for("the cut LB catches up", Duration::from_secs(20), || {
        agreed(&live(&agents), moved_on)
    })
    .unwrap_or_else(|e| fail(&mut agents, e));

    // etcd stops: every LB keeps the last epoch (tables stay identical) and the fleet
    // resumes by itself when etcd returns.
    wait_for(
        "agreement before the outage",
        Duration::from_secs(20),
        || agreed(&live(&agents), 1),
    )
    .unwrap_or_else(|e| fail(&mut agents, e));
    world.etcd.stop().unwrap();
    wait_for(
        "every LB notices the outage",
        Duration::from_secs(15),
        || {
            Ok(live(&agents)
                .iter()
                .all(|a| cluster_status(a).is_ok_and(|s| s["connected"] == false))
                .then_some(()))
        },
    )
    .unwrap_or_else(|e| fail(&mut agents, e));
    // Each LB keeps its epoch and its tables for as long as etcd is away. (An epoch
    // published in the last milliseconds before etcd went may have reached only some
    // LBs: then two epochs are in force until etcd returns, each LB's own unchanged,
    // and LBs at the same epoch hold the same tables.)
    let kept: Vec<(u64, Vec<String>)> = live(&agents)
        .iter()
        .map(|a| {
            let epoch = cluster_status(a).unwrap()["epoch_applied"]
                .as_u64()
                .unwrap();
            (epoch, kernel_digests(a).unwrap())
        })
        .collect();
    for (e1, d1) in &kept {
        for (e2, d2) in &kept {
            assert!(
                e1 != e2 || d1 == d2,
                "LBs at epoch {e1} hold different tables: {kept:?}"
            );
        }
    }
    std::thread::sleep(Duration::from_secs(5));
    for (a, (epoch, digests)) in live(&agents).iter().zip(&kept) {
        let s = cluster_status(a).unwrap();
        assert_eq!(s["epoch_applied"].as_u64(), Some(*epoch), "{s}");
        assert_eq!(
            kernel_digests(a).unwrap(),
            *digests,
            "tables moved during the outage"
        );
    }
    let before = kept.iter().map(|(e, _)| *e).max().unwrap();
    // A backend dies while etcd is down: each LB's own probes take it out of its own
    // table at once (safety first); the three probe it alike, so their tables agree
    // again, ahead of any epoch.
    // (It answers 503 to everything, its health check too: the one kind of failed
    // request this test allows, and only from it.)
    world.backends[2].set_fail_fast(true);
    world.backends[2].controls().set_fail_probes(true);
    let out = wait_for(
        "every LB takes the dead backend out",
        Duration::from_secs(15),
        || {
            let out = live(&agents).iter().all(|a| {
                weight_of(a, &b2).0 == 0.0
                    && cluster_status(a)
                        .is_ok_and(|s| s["down_here"].as_array().is_some_and(|d| d.len() == 1))
            });
            Ok(out.then_some(()))
        },
    );
    if let Err(e) = out {
        fail(&mut agents, e);
    }
    // LBs at the same epoch that took the same backend out hold the same tables (a
    // table switch may wait out its copy's 20 ms grace: read until they settle).
    let settled = wait_for(
        "the same tables without the dead backend",
        Duration::from_secs(5),
        || {
            let now: Vec<(u64, Vec<String>)> = live(&agents)
                .iter()
                .map(|a| {
                    let epoch = cluster_status(a).unwrap()["epoch_applied"]
                        .as_u64()
                        .unwrap();
                    (epoch, kernel_digests(a).unwrap())
                })
                .collect();
            let same = now
                .iter()
                .all(|(e1, d1)| now.iter().all(|(e2, d2)| e1 != e2 || d1 == d2));
            Ok(same.then_some(()))
        },
    );
    if let Err(e) = settled {
        fail(&mut agents, e);
    }
    for (a, (epoch, _)) in live(&agents).iter().zip(&kept) {
        assert_eq!(
            cluster_status(a).unwrap()["epoch_applied"].as_u64(),
            Some(*epoch)
        );
    }
    world.etcd.restart().unwrap();
    let after = wait_for(
        "the fleet resumes after the outage",
        Duration::from_secs(30),
        || agreed(&live(&agents), before + 1),
    )
    .unwrap_or_else(|e| fail(&mut agents, e));
    eprintln!("fleet: etcd outage ridden out, epoch {before} -> {after}");
    // The epoch took the dead backend out too: nothing is out here alone any more.
    for a in live(&agents) {
        assert_eq!(weight_of(a, &b2).0, 0.0);
    }
    world.backends[2].controls().set_fail_probes(false);
    world.backends[2].set_fail_fast(false);
    wait_weighted(&mut agents, &b2, "the backend comes back everywhere", 20);

    // The leader is killed: another leads within about a lease and goes on from the
    // last epoch. The dead agent's datapath keeps forwarding (fail-static).
    let lead = wait_for("one leader", Duration::from_secs(10), || {
        Ok(leader(&agents))
    })
    .unwrap_or_else(|e| fail(&mut agents, e));
    let killed = node_name(lead);
    let (epoch_before, _) = newest_epoch(agents[(lead + 1) % 3].as_ref().unwrap()).unwrap();
    let t0 = Instant::now();
    agents[lead].take().unwrap().kill(libc::SIGKILL).unwrap();
    let new_leader = wait_for("a new leader's epoch", Duration::from_secs(20), || {
        let (n, by) = newest_epoch(agents[(lead + 1) % 3].as_ref().unwrap()).unwrap();
        Ok((n > epoch_before && by != killed).then_some(by))
    })
    .unwrap_or_else(|e| fail(&mut agents, e));
    let failover = t0.elapsed();
    eprintln!("fleet: {killed} killed, {new_leader} published after {failover:.2?}");
    wait_for("the two left agree", Duration::from_secs(10), || {
        agreed(&live(&agents), epoch_before + 1)
    })
    .unwrap_or_else(|e| fail(&mut agents, e));
    // It comes back (adopting its pinned datapath) and applies the newest epoch.
    agents[lead] = Some(world.start_lb(lead).unwrap());
    wait_for(
        "the restarted LB catches up",
        Duration::from_secs(20),
        || agreed(&live(&agents), epoch_before + 1),
    )
    .unwrap_or_else(|e| fail(&mut agents, e));

    // A leader frozen past its lease is deposed; woken, it cannot publish.
    let lead = wait_for("one leader", Duration::from_secs(10), || {
        Ok(leader(&agents))
    })
    .unwrap_or_else(|e| fail(&mut agents, e));
    let frozen = node_name(lead);
    let other = agents[(lead + 1) % 3].as_ref().unwrap();
    let (epoch_before, _) = newest_epoch(other).unwrap();
    let pid = agents[lead].as_ref().unwrap().pid() as i32;
    // SAFETY: signals to our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let successor = wait_for("a successor's epoch", Duration::from_secs(20), || {
        let (n, by) = newest_epoch(other).unwrap();
        Ok((n > epoch_before && by != frozen).then_some((n, by)))
    });
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let (successor_epoch, successor) = successor.unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let s = cluster_status(agents[lead].as_ref().unwrap()).unwrap();
    assert_eq!(s["leading"], false, "the deposed leader still leads: {s}");
    let (n, by) = newest_epoch(other).unwrap();
    assert!(
        n >= successor_epoch && by != frozen,
        "epoch {n} by {by} after {frozen} woke"
    );
    eprintln!(
        "fleet: {frozen} frozen, {successor} led from epoch {successor_epoch}; woken, {frozen} fenced {} time(s)",
        s["fenced"]
    );
    wait_for(
        "all agree after the fencing",
        Duration::from_secs(20),
        || agreed(&live(&agents), n),
    )
    .unwrap_or_else(|e| fail(&mut agents, e));

    // Not one connection failed through all of it.
    load.stop();
    let report = load.join().unwrap();
    eprintln!("fleet: load {}", report.summary());
    assert!(report.total() > 500, "{}", report.summary());
    // Every connection got its answer: the only failures are the dead backend's own
    // 503s, before the LBs took it out.
    let errors = report.errors();
    assert!(
        errors.keys().all(|k| k == "http_503"),
        "connections failed: {}",
        report.summary()
    );
    // A leader stopped gracefully gives its lease back: another leads well before
    // the lease (2 s) would have run out.
    let lead = wait_for("one leader", Duration::from_secs(10), || {
        Ok(leader(&agents))
    })
    .unwrap_or_else(|e| fail(&mut agents, e));
    agents[lead].take().unwrap().stop().unwrap();
    let t0 = Instant::now();
    wait_for(
        "a successor after a graceful stop",
        Duration::from_millis(1500),
        || Ok(leader(&agents)),
    )
    .unwrap_or_else(|e| fail(&mut agents, e));
    eprintln!(
        "fleet: {} stopped, a successor led after {:.2?}",
        node_name(lead),
        t0.elapsed()
    );
    world.stop_all(agents).unwrap();
}

/// Issue 19: no established flow is lost when an LB leaves a fleet whose weights
/// move. Three LBs share their flows (`share_listen` on each one's own address);
/// backends slow down and recover in steps all along, so that `ai` moves weights;
/// long-lived connections open in waves every 5 s (and 1 s before each event), each
/// pinging every 200-500 ms, and short connections arrive at 50/s. At 120 s LB 0's
/// route is withdrawn (connections aged 1 s to 2 min then); at 170 s LB 1 dies: its
/// agent killed and its route withdrawn at once (ages 1 s to 2 min 50 s), leaving
/// LB 2 alone. At least 99.9 % of the connections established before each event
/// keep their backend to the end (every answer from the same backend, no error),
/// and no short connection fails. About 3.5 minutes.
#[test]
fn established_flows_survive_an_lb_leaving_and_one_killed() {
    let world = FleetWorld::build(FleetSpec::new(3)).unwrap();
    let mut agents: Vec<Option<Agent>> = (0..3)
        .map(|i| Some(world.start_lb_with(i, &world.share_line(i)).unwrap()))
        .collect();
    wait_for(
        "the first epoch applied by all",
        Duration::from_secs(20),
        || agreed(&live(&agents), 1),
    )
    .unwrap_or_else(|e| fail(&mut agents, e));
    if let Err(e) = wait_sharing(&live(&agents), 2, Duration::from_secs(30)) {
        fail(&mut agents, e);
    }
    let (withdraw, kill) = (Duration::from_secs(120), Duration::from_secs(170));
    let spec = LossSpec::moving(
        vec![
            Event {
                at: withdraw,
                leave: Leave::Withdraw(vec![1, 2]),
            },
            Event {
                at: kill,
                leave: Leave::Kill {
                    lb: 1,
                    route: vec![2],
                },
            },
        ],
        Duration::from_secs(15),
        19,
    );
    let run = survive::run(&world, &mut agents, &spec).unwrap_or_else(|e| fail(&mut agents, e));

    // The weights moved: LB 2 (there all along) applied new tables several times.
    let changes = run.table_changes(2);
    eprintln!(
        "survive: LB 2 applied epochs {:?}, its tables changed {changes} times",
        run.epochs(2)
    );
    for (i, s) in run.last_status.iter().enumerate() {
        let share = s.as_ref().map(ShareCounts::of);
        eprintln!("survive: {} share {share:?}", node_name(i));
    }
    let short_failed = run.short_failures();
    eprintln!("survive: short connections {}", run.short.summary());
    let mut problems = Vec::new();
    if changes < 3 {
        problems.push(format!(
            "the tables changed only {changes} times: the weights did not move enough for \
             this test to mean anything"
        ));
    }
    for (e, event) in run.events.iter().enumerate() {
        let s = run.survival(e);
        eprintln!(
            "survive: at {:.1}s, {}: {}",
            event.at.as_secs_f64(),
            event.name,
            s.summary()
        );
        if s.fraction() < 0.999 {
            problems.push(format!(
                "{} of {} connections established before {} lost their backend or failed:\n{}",
                s.lost.len(),
                s.established,
                event.name,
                run.explain(&s.lost)
            ));
        }
        // Without sharing, only connections opened under other tables than those in
        // force at the withdrawal can lose their backend: there must be some.
        if e == 0 && s.other_table == 0 {
            problems.push(format!(
                "no connection established before {} was opened under other tables: the \
                 test did not exercise flow sharing ({})",
                event.name,
                s.summary()
            ));
        }
    }
    let total = run.held.len();
    let kept = run.held.iter().filter(|h| h.kept()).count();
    eprintln!("survive: all long-lived connections: {kept}/{total} kept their backend");
    if !short_failed.is_empty() {
        let shown: Vec<String> = short_failed
            .iter()
            .take(20)
            .map(|(t, why)| format!("{:.2}s {why}", t.as_secs_f64()))
            .collect();
        problems.push(format!(
            "{} short connections failed (first: {}); {}",
            short_failed.len(),
            shown.join(", "),
            run.short.summary()
        ));
    }
    if !problems.is_empty() {
        for e in &run.events {
            for (i, s) in e.statuses.iter().enumerate() {
                eprintln!(
                    "--- {} before {}: {}",
                    node_name(i),
                    e.name,
                    s.as_ref().map_or("not running".into(), |s| s.to_string())
                );
            }
        }
        dump(&mut agents);
        panic!("{}", problems.join("\n"));
    }
    world.stop_all(agents).unwrap();
}

#[test]
fn a_fleet_over_tls_agrees_and_bad_cluster_input_is_refused() {
    let world = FleetWorld::build(FleetSpec {
        tls: true,
        ..FleetSpec::new(2)
    })
    .unwrap();
    let agents: Vec<Agent> = (0..2).map(|i| world.start_lb(i).unwrap()).collect();
    let refs: Vec<&Agent> = agents.iter().collect();
    let epoch = wait_for("an epoch over TLS", Duration::from_secs(20), || {
        agreed(&refs, 1)
    })
    .unwrap();
    eprintln!("fleet over TLS: epoch {epoch} applied by both");

    // Bad [cluster] input: the agent refuses to start, naming the field. Each case is
    // LB 1's file with one text replaced.
    let lb = world.topo.load_balancer(1);
    let good = std::fs::read_to_string(world.config(1, "").unwrap()).unwrap();
    let ca = world.tls.as_ref().unwrap().ca.display().to_string();
    let cases = [
        ("lease_s = 2", "lease_s = 1", "cluster.lease_s"),
        (
            "lease_s = 2",
            "lease_s = 2\nunknown_field = 1",
            "unknown_field",
        ),
        (ca.as_str(), "/nonexistent/ca.pem", "cluster.tls.ca"),
    ];
    for (i, (from, to, field)) in cases.into_iter().enumerate() {
        let path = world.dir.join(format!("bad-{i}.toml"));
        std::fs::write(&path, good.replace(from, to)).unwrap();
        let instance = format!("{}b{i}", unique_prefix());
        let out = run_command(lb.ns(), lb.ifname(), &instance, &path, &[])
            .unwrap()
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {to:?}");
        assert!(err.contains(field), "{field} not named for {to:?}: {err}");
    }

    // /metrics says the same as `cluster status` (its snapshot is a second old at most).
    let scrape = || {
        world.topo.load_balancer(0).ns().run_in(|| {
            let mut s = std::net::TcpStream::connect("127.0.0.1:9432").unwrap();
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            text
        })
    };
    let metrics = wait_for(
        "both LBs agreeing in /metrics",
        Duration::from_secs(10),
        || {
            let text = scrape()?;
            Ok(text
                .contains("lb_cluster_nodes{state=\"agreeing\"} 2")
                .then_some(text))
        },
    )
    .unwrap();
    assert!(metrics.contains("lb_cluster_connected 1"), "{metrics}");
    assert!(
        metrics.contains("lb_cluster_epoch{epoch=\"applied\"}"),
        "{metrics}"
    );

    // An LB given another configuration applies none of the leader's epochs, and
    // both sides say so.
    let mut agents = agents;
    agents.pop().unwrap().stop().unwrap();
    let other = world.dir.join("other.toml");
    let text = std::fs::read_to_string(world.config(1, "").unwrap())
        .unwrap()
        .replacen("weight = 1", "weight = 2", 1);
    std::fs::write(&other, text).unwrap();
    let odd = Agent::start_on(lb, &world.instance(1), &other, &["--detach-on-exit"]).unwrap();
    let s = wait_for(
        "the odd LB refuses the epoch",
        Duration::from_secs(20),
        || {
            let s = cluster_status(&odd)?;
            Ok(s["not_applied"].is_string().then_some(s))
        },
    )
    .unwrap();
    assert!(
        s["not_applied"].as_str().unwrap().contains("configuration"),
        "{s}"
    );
    assert_eq!(s["epoch_applied"].as_u64(), Some(0), "{s}");
    wait_for(
        "the leader sees the other configuration",
        Duration::from_secs(10),
        || {
            let s = cluster_status(&agents[0])?;
            let odd = s["nodes"]
                .as_array()
                .and_then(|n| n.iter().find(|n| n["node"] == "lb-1").cloned());
            Ok(odd.filter(|n| n["same_config"] == false))
        },
    )
    .unwrap();
    odd.stop().unwrap();
    for a in agents {
        a.stop().unwrap();
    }
}

/// Leadership at the level of etcd itself: a leader whose lease is gone (revoked
/// here, as an expiry would) cannot publish, even holding its old key, and the epoch
/// in etcd stays the new leader's.
#[test]
fn a_deposed_leader_cannot_publish() {
    let ns = Netns::new(format!("{}-fence", unique_prefix())).unwrap();
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    let server = EtcdServer::start(&ns, "127.0.0.1".parse().unwrap(), None).unwrap();
    let cluster = Cluster {
        endpoints: vec![server.endpoint()],
        name: "fence".into(),
        node: "a".into(),
        lease_s: 5,
        tls: None,
        share_listen: None,
    };
    let epoch = |leader: &str| EpochRecord {
        epoch: 0,
        leader: leader.into(),
        config_digest: "d".into(),
        written_ms: 0,
        vips: vec![],
    };
    ns.run_in(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut a = Etcd::connect(&cluster).await.unwrap();
            let mut b = Etcd::connect(&cluster).await.unwrap();
            let lease_a = a.client.lease_grant(5, None).await.unwrap().id();
            let lease_b = b.client.lease_grant(5, None).await.unwrap().id();
            let won = a
                .client
                .campaign(a.keys.election(), "a", lease_a)
                .await
                .unwrap();
            let la = Leadership::from(won.leader().unwrap());
            let n = a
                .publish(&la, epoch("a"), EpochSeen::default())
                .await
                .unwrap();
            assert_eq!(n, 1);
            let seen = a.snapshot().await.unwrap().epoch.unwrap().1;
            // A's lease goes (as when it expires); B is elected.
            a.client.lease_revoke(lease_a).await.unwrap();
            let won = b
                .client
                .campaign(b.keys.election(), "b", lease_b)
                .await
                .unwrap();
            let lb = Leadership::from(won.leader().unwrap());
            // A, still holding its old key, is refused.
            match a.publish(&la, epoch("a"), seen).await {
                Err(PublishError::Fenced) => {}
                other => panic!("a deposed leader published: {other:?}"),
            }
            assert_eq!(b.publish(&lb, epoch("b"), seen).await.unwrap(), 2);
            // A publication based on an old epoch is stale, not a second epoch 2.
            match b.publish(&lb, epoch("b"), seen).await {
                Err(PublishError::Stale) => {}
                other => panic!("a stale publication went through: {other:?}"),
            }
            let (record, _) = b.snapshot().await.unwrap().epoch.unwrap();
            assert_eq!((record.epoch, record.leader.as_str()), (2, "b"));
        });
    })
    .unwrap();
    drop(server);
}

/// `GET /ready` on an LB's metrics endpoint (127.0.0.1:9432 in its namespace): the
/// status code and the body.
fn ready_endpoint(world: &FleetWorld, i: usize) -> (String, String) {
    let answer = world
        .topo
        .load_balancer(i)
        .ns()
        .run_in(|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect("127.0.0.1:9432")?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(b"GET /ready HTTP/1.0\r\n\r\n")?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            Ok(answer)
        })
        .unwrap()
        .unwrap();
    let code = answer.split_whitespace().nth(1).unwrap_or("").to_owned();
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (code, body)
}

/// Issue 19, a joining LB: it says it is not ready (`/ready` 503, naming what it
/// waits for) until it holds the fleet's epoch and every other LB's flows, and once
/// ready it carries the flows that began on the others, across a table change made
/// after they began, when the router sends it all the traffic.
#[test]
fn a_joining_lb_is_ready_only_once_it_holds_the_fleets_flows() {
    let world = FleetWorld::build(FleetSpec::new(3)).unwrap();
    let mut agents: Vec<Option<Agent>> = (0..2)
        .map(|i| Some(world.start_lb_with(i, &world.share_line(i)).unwrap()))
        .chain([None])
        .collect();
    world.route_via(&[0, 1]).unwrap();
    if let Err(e) = wait_sharing(&live(&agents), 1, Duration::from_secs(30)) {
        fail(&mut agents, e);
    }
    let clients = HoldClients::start(&world.client, HoldSpec::new(world.vip())).unwrap();
    clients.open(60).unwrap();
    // The table moves under the open connections: a fleet hold.
    let b0 = world.topo.backend(0).ipv4().to_string();
    let before = agreed(&live(&agents), 1).unwrap().unwrap_or(1);
    agents[0]
        .as_ref()
        .unwrap()
        .ctl(&["weight", "set", &b0, "5"])
        .unwrap();
    wait_for("the hold applied", Duration::from_secs(15), || {
        agreed(&live(&agents), before + 1)
    })
    .unwrap_or_else(|e| fail(&mut agents, e));

    // LB 2 starts cut off from etcd: not ready, and /ready says why.
    // Its file gives only the port: the address is its interface's.
    world.cut_from_etcd(2, true).unwrap();
    agents[2] = Some(world.start_lb_with(2, "share_listen = \":7947\"").unwrap());
    std::thread::sleep(Duration::from_secs(2));
    let (code, body) = ready_endpoint(&world, 2);
    assert_eq!(code, "503", "{body}");
    assert!(body.contains("etcd"), "{body}");
    let s = cluster_status(agents[2].as_ref().unwrap()).unwrap();
    assert_eq!(s["ready"], false, "{s}");
    world.cut_from_etcd(2, false).unwrap();
    let statuses = wait_sharing(&live(&agents), 2, Duration::from_secs(30))
        .unwrap_or_else(|e| fail(&mut agents, e));
    // `/ready` follows within a second (the metrics' refresh).
    wait_for("/ready says 200", Duration::from_secs(3), || {
        Ok((ready_endpoint(&world, 2).0 == "200").then_some(()))
    })
    .unwrap_or_else(|e| fail(&mut agents, e));
    let joined = ShareCounts::of(&statuses[2]);
    eprintln!("join: lb-2 share {joined:?}");
    assert!(
        joined.flows_inserted >= 60,
        "the joining LB holds the open connections' flows: {joined:?}"
    );

    // All traffic to the newcomer: every connection keeps its backend.
    world.route_via(&[2]).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let held = clients.stop().unwrap();
    let lost: Vec<String> = held
        .iter()
        .filter(|h| !h.kept())
        .map(|h| h.describe())
        .collect();
    assert_eq!(held.len(), 60);
    if !lost.is_empty() {
        fail(
            &mut agents,
            anyhow::anyhow!(
                "{} of 60 connections lost their backend:\n{}",
                lost.len(),
                lost.join("\n")
            ),
        );
    }
    world.stop_all(agents).unwrap();
}
