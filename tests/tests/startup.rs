//! A start that fails cleans up after itself: `lb run` takes everything that can
//! fail (control socket, metrics listener) before it touches the datapath, and a
//! failure leaves no socket, no pins and no attachment behind, while a datapath it
//! would have adopted from an earlier agent stays exactly as it was. Attach
//! failures say what to do.

use std::{
    path::Path,
    process::Output,
    time::{Duration, Instant},
};

use lb_tests::{
    netns::Netns,
    spread::{Agent, run_command, socket_of, write_config},
    topology::Topology,
};
use lb_userspace::agent::pin_dir;

/// Runs `lb run` in `ns` on `iface` and waits (at most 30 s) for it to exit.
fn failed_run(ns: &Netns, instance: &str, iface: &str, config: &Path, extra: &[&str]) -> Output {
    let mut child = run_command(ns, iface, instance, config, extra)
        .unwrap()
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("lb run did not exit on its failure");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// The id of the XDP program attached to `iface` in `ns`, if any.
fn xdp_program(ns: &Netns, iface: &str) -> Option<u64> {
    let out = ns
        .ip(&["-details", "-json", "link", "show", "dev", iface])
        .unwrap();
    let links: serde_json::Value = serde_json::from_str(&out).unwrap();
    let xdp = &links[0]["xdp"];
    let prog = if xdp["prog"].is_object() {
        &xdp["prog"]
    } else {
        &xdp["attached"][0]["prog"]
    };
    prog["id"].as_u64()
}

/// The files pinned for `instance`, sorted.
fn pins(instance: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(pin_dir(instance)) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Another agent holding the default metrics address of the LB's namespace: an
/// agent on the namespace's loopback, in generic mode.
fn metrics_holder(topo: &Topology, config: &Path) -> Agent {
    let instance = format!("{}-holder", topo.prefix());
    let generic = ["--xdp-mode", "generic"];
    Agent::start_in(topo.lb().ns(), "lo", &instance, config, &generic).unwrap()
}

#[test]
fn a_metrics_port_clash_leaves_no_socket_pins_or_attachment() {
    let topo = Topology::build(1).unwrap();
    let config = write_config(&topo, &[1], "").unwrap();
    let _holder = metrics_holder(&topo, &config);
    let instance = format!("{}-second", topo.prefix());
    let out = failed_run(topo.lb().ns(), &instance, topo.lb_ifname(), &config, &[]);
    let err = stderr(&out);
    assert!(!out.status.success(), "started despite the clash: {err}");
    assert!(err.contains("binding the metrics endpoint"), "{err}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("ready"),
        "said ready before everything was held: {err}"
    );
    assert_eq!(pins(&instance), Vec::<String>::new(), "pins left behind");
    assert!(!pin_dir(&instance).exists(), "pin directory left behind");
    assert!(!socket_of(&instance).exists(), "control socket left behind");
    assert_eq!(xdp_program(topo.lb().ns(), topo.lb_ifname()), None);
}

#[test]
fn native_xdp_where_the_driver_lacks_it_says_to_use_generic_and_leaves_nothing() {
    let topo = Topology::build(1).unwrap();
    let config = write_config(&topo, &[1], "").unwrap();
    let instance = format!("{}-lo", topo.prefix());
    let out = failed_run(
        topo.lb().ns(),
        &instance,
        "lo",
        &config,
        &["--metrics-address", "off"],
    );
    let err = stderr(&out);
    assert!(!out.status.success(), "native XDP on lo attached: {err}");
    assert!(err.contains("--xdp-mode generic"), "{err}");
    assert!(!pin_dir(&instance).exists(), "pins left behind: {err}");
    assert!(!socket_of(&instance).exists(), "control socket left behind");
    assert_eq!(xdp_program(topo.lb().ns(), "lo"), None);
}

#[test]
fn an_interface_with_another_xdp_program_is_named_and_left_to_it() {
    let topo = Topology::build(1).unwrap();
    let config = write_config(&topo, &[1], "").unwrap();
    let first = Agent::start(&topo, &config, &["--metrics-address", "off"]).unwrap();
    let before = xdp_program(topo.lb().ns(), topo.lb_ifname()).expect("attached");
    let instance = format!("{}-second", topo.prefix());
    let out = failed_run(
        topo.lb().ns(),
        &instance,
        topo.lb_ifname(),
        &config,
        &["--metrics-address", "off"],
    );
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "attached over another program: {err}"
    );
    assert!(err.contains("already has an XDP program"), "{err}");
    assert!(
        err.contains(&format!("id {before}")),
        "the holder is not named: {err}"
    );
    assert!(!pin_dir(&instance).exists(), "pins left behind: {err}");
    assert!(!socket_of(&instance).exists(), "control socket left behind");
    assert_eq!(
        xdp_program(topo.lb().ns(), topo.lb_ifname()),
        Some(before),
        "the first agent's program was replaced"
    );
    first.ctl(&["status"]).unwrap();
}

#[test]
fn a_failed_start_leaves_an_adopted_datapath_as_it_found_it() {
    let topo = Topology::build(2).unwrap();
    let config = write_config(&topo, &[1, 1], "").unwrap();
    let first = Agent::start(&topo, &config, &["--metrics-address", "off"]).unwrap();
    let instance = topo.prefix().to_owned();
    // Killed: its datapath stays pinned and attached, for the next agent to adopt.
    first.kill(libc::SIGKILL).unwrap();
    let prog = xdp_program(topo.lb().ns(), topo.lb_ifname()).expect("still attached");
    let pinned = pins(&instance);
    assert!(!pinned.is_empty());
    // A start with another table size, which would rewrite the table, fails on the
    // metrics address before it touches the datapath.
    let changed = write_config(&topo, &[1, 1], "table_size = 1021").unwrap();
    let holder = metrics_holder(&topo, &changed);
    let out = failed_run(topo.lb().ns(), &instance, topo.lb_ifname(), &changed, &[]);
    let err = stderr(&out);
    assert!(!out.status.success(), "started despite the clash: {err}");
    assert!(err.contains("binding the metrics endpoint"), "{err}");
    assert_eq!(pins(&instance), pinned, "the adopted pins changed");
    assert_eq!(xdp_program(topo.lb().ns(), topo.lb_ifname()), Some(prog));
    drop(holder);
    // The maps still hold the first agent's table: the next agent to adopt them with
    // the changed size finds table slots to write.
    let mut next = Agent::start(&topo, &changed, &["--metrics-address", "off"]).unwrap();
    let log = next.drain_log().join("\n");
    let adopted = log
        .lines()
        .find(|l| l.contains("adopted the datapath"))
        .unwrap_or_else(|| panic!("no adoption in the log:\n{log}"));
    assert!(!adopted.contains("(0 table slots"), "{adopted}");
    next.stop().unwrap();
}
