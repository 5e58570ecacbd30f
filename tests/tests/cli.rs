//! The `lb` command line against a real agent, in network namespaces with the real
//! XDP program: every read command into a closed pipe ends quietly; every command
//! takes `--json` and prints JSON; `drain` and `undrain` succeed when repeated and say
//! what moved; each operator action leaves one line in the agent's log naming who,
//! what and how it ended; text output is text, aligned; errors say each cause once;
//! docs/OPERATING.md shows every command its generator runs.

use std::{
    os::unix::process::ExitStatusExt,
    process::{Output, Stdio},
    time::Duration,
};

use lb_tests::{
    operating::{self, World},
    spread::lb_binary,
};

/// A quiet end: status 0 (or 141, or killed by SIGPIPE, as other tools end), and no
/// panic or complaint about printing.
fn ended_quietly(what: &str, out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let status = out.status;
    assert!(
        matches!(status.code(), Some(0 | 141)) || status.signal() == Some(libc::SIGPIPE),
        "{what}: {status}: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("failed printing"),
        "{what}: {stderr}"
    );
}

#[test]
fn read_commands_into_a_closed_pipe_end_quietly() {
    let w = World::start(&operating::WEIGHTS).unwrap();
    w.connections(50).unwrap();
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["vip"],
        &["vip", "list", "--json"],
        &["backend"],
        &["backend", "list"],
        &["backend", "list", "--json"],
        &["weight", "show"],
        &["stats", "--interval", "0.1"],
        &["stats", "--interval", "0.1", "--json"],
        &["explain"],
        &["explain", "--json"],
        &["tables"],
        &["tables", "--json"],
        &["top", "--count", "1"],
        &["top", "--count", "1", "--json"],
        &["completions", "bash"],
        &["--help"],
        &["drain", "198.18.0.12"],
        &["undrain", "198.18.0.12"],
        &["reload"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = w
            .agent
            .ctl_command(args)
            .unwrap()
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        ended_quietly(&format!("lb {}", args.join(" ")), &out);
    }
    // The agent is still there, and the drain and undrain took effect.
    let list = w.agent.ctl(&["backend", "list", "--json"]).unwrap();
    assert!(!list.contains("drained"), "{list}");
}

fn json(w: &World, args: &[&str]) -> serde_json::Value {
    let text = w.agent.ctl(args).unwrap();
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("lb {} printed no JSON ({e}): {text}", args.join(" ")))
}

#[test]
fn every_command_takes_json_and_prints_json() {
    let w = World::start_with(&operating::WEIGHTS, &[]).unwrap();
    w.connections(50).unwrap();
    let status = json(&w, &["status", "--json"]);
    assert_eq!(status["datapath"]["conn_miss_non_syn"], 0, "{status}");
    assert!(status["model"]["unhealthy_backends"].is_array(), "{status}");
    for args in [&["vip", "--json"][..], &["vip", "list", "--json"]] {
        assert_eq!(json(&w, args)[0]["vip"], "198.18.1.1:80/tcp");
    }
    for args in [
        &["backend", "--json"][..],
        &["backend", "list", "--json"],
        &["weight", "show", "--json"],
    ] {
        let list = json(&w, args);
        assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
        assert_eq!(list[0]["backend"], "198.18.0.11", "{list}");
        assert!(list[0]["weight"].is_f64(), "{list}");
    }
    let stats = json(&w, &["stats", "--interval", "0.2", "--json"]);
    assert!(stats["packets_per_second"].is_f64(), "{stats}");
    assert_eq!(stats["backends"].as_array().unwrap().len(), 3, "{stats}");
    let explain = json(&w, &["explain", "--json"]);
    assert!(explain[0]["why"].is_string(), "{explain}");
    let tables = json(&w, &["tables", "--json"]);
    assert_eq!(tables[0]["digest"].as_str().unwrap().len(), 16, "{tables}");
    let top = w.agent.ctl(&["top", "--count", "2", "--json"]).unwrap();
    assert_eq!(top.lines().count(), 2, "{top}");
    for line in top.lines() {
        let frame: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(frame["bytes_per_second"].is_f64(), "{line}");
    }
    // Setting commands answer with what changed.
    for (args, weight, control) in [
        (
            &["weight", "set", "198.18.0.11", "5", "--json"][..],
            5.0,
            "set",
        ),
        (&["weight", "auto", "198.18.0.11", "--json"], 1.0, "policy"),
        (
            &["weight", "pin", "198.18.0.12", "3", "--json"],
            3.0,
            "pinned",
        ),
        (&["weight", "unpin", "198.18.0.12", "--json"], 1.0, "policy"),
        (&["drain", "198.18.0.13", "--json"], 0.0, "drained"),
        (&["undrain", "198.18.0.13", "--json"], 2.0, "policy"),
    ] {
        let change = json(&w, args);
        let named = change["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["named"] == true)
            .unwrap_or_else(|| panic!("no named backend: {change}"));
        assert_eq!(change["changed"], true, "{change}");
        assert_eq!(named["control"], control, "{change}");
        // Back to the policy, the weight is the policy's (about the configured one).
        let got = named["weight"].as_f64().unwrap();
        assert!((got - weight).abs() < 0.5, "{args:?}: {change}");
    }
    let reload = json(&w, &["reload", "--json"]);
    assert!(
        reload["action"].as_str().unwrap().contains("reloaded"),
        "{reload}"
    );
    // `detach` needs a stopped agent that left its datapath pinned.
    let World { agent, .. } = w;
    let instance = agent.instance().to_owned();
    agent.kill(libc::SIGTERM).unwrap();
    let out = std::process::Command::new(lb_binary().unwrap())
        .args(["--instance", &instance, "detach", "--json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let detached: serde_json::Value = serde_json::from_str(&text).unwrap();
    lb_tests::spread::remove_pins(&instance);
    assert_eq!(detached["detached"], true, "{text}");
}

#[test]
fn drain_and_undrain_succeed_when_repeated_and_say_what_moved() {
    let w = World::start(&operating::WEIGHTS).unwrap();
    let first = w.agent.ctl(&["drain", "198.18.0.12"]).unwrap();
    assert!(
        first.starts_with("backend 198.18.0.12 (VIP 198.18.1.1:80/tcp): weight 1 → 0 (drained")
            && first.contains(" slots moved to ")
            && first.contains("198.18.0.11 (")
            && first.contains("198.18.0.13 ("),
        "{first}"
    );
    let again = w.agent.ctl(&["drain", "198.18.0.12"]).unwrap();
    assert_eq!(
        again.trim_end(),
        "backend 198.18.0.12 (VIP 198.18.1.1:80/tcp): already drained; nothing changed"
    );
    let back = w.agent.ctl(&["undrain", "198.18.0.12"]).unwrap();
    assert!(
        back.contains("weight 0 → 1 (undrained, back to the policy)")
            && back.contains(" slots moved from ")
            && back.contains("198.18.0.11 ("),
        "{back}"
    );
    let again = w.agent.ctl(&["undrain", "198.18.0.12"]).unwrap();
    assert_eq!(
        again.trim_end(),
        "backend 198.18.0.12 (VIP 198.18.1.1:80/tcp): not drained; nothing changed"
    );
    // A weight set names the slots it moved, in numbers with separators.
    let set = w.agent.ctl(&["weight", "set", "198.18.0.11", "4"]).unwrap();
    assert!(
        set.contains("weight 1 → 4 (held until `weight auto` or a reload)")
            && set.contains(" slots moved from "),
        "{set}"
    );
    let slots: String = set
        .split(", ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .unwrap()
        .to_owned();
    assert!(slots.contains(','), "{set}");
}

#[test]
fn an_operator_action_leaves_one_log_line_naming_who_what_and_the_result() {
    let mut w = World::start(&operating::WEIGHTS).unwrap();
    w.agent.drain_log();
    let run = |args: &[&str]| {
        let child = w
            .agent
            .ctl_command(args)
            .unwrap()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        (pid, child.wait_with_output().unwrap())
    };
    let (drain_pid, out) = run(&["drain", "198.18.0.13"]);
    assert!(out.status.success());
    let (refused_pid, out) = run(&["weight", "set", "198.18.0.99", "5"]);
    assert_eq!(out.status.code(), Some(1));
    let who = |pid: u32| format!("uid=0 pid={pid} ");
    let lines = w
        .agent
        .wait_for_log(|l| l.contains(&who(refused_pid)), Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    let lines: Vec<String> = lines.into_iter().chain(w.agent.drain_log()).collect();
    let of =
        |pid: u32| -> Vec<&String> { lines.iter().filter(|l| l.contains(&who(pid))).collect() };
    let drain = of(drain_pid);
    assert_eq!(drain.len(), 1, "{lines:#?}");
    assert!(
        drain[0].contains("control: operator action")
            && drain[0].contains("request=drain 198.18.0.13 result=backend 198.18.0.13")
            && drain[0].contains("slots moved to"),
        "{}",
        drain[0]
    );
    let refused = of(refused_pid);
    assert_eq!(refused.len(), 1, "{lines:#?}");
    assert!(
        refused[0].contains("control: refused")
            && refused[0].contains("request=weight set 198.18.0.99 5 error=")
            && refused[0].contains("not a backend of any VIP"),
        "{}",
        refused[0]
    );
}

#[test]
fn text_output_is_aligned_text_with_units() {
    let w = World::start(&operating::WEIGHTS).unwrap();
    w.connections(50).unwrap();
    let tables = w.agent.ctl(&["tables"]).unwrap();
    assert!(
        !tables.contains('{') && tables.contains("digest"),
        "{tables}"
    );
    let status = w.agent.ctl(&["status"]).unwrap();
    assert!(
        status.contains("model") && status.contains("fit failures") && status.contains("datapath"),
        "{status}"
    );
    let explain = w.agent.ctl(&["explain"]).unwrap();
    assert!(
        explain.contains("set by") && !explain.contains('{'),
        "{explain}"
    );
    // Columns line up: every address starts where the title `backend` does.
    let list = w.agent.ctl(&["backend", "list"]).unwrap();
    let mut lines = list.lines();
    let header = lines.next().unwrap();
    assert!(
        header.contains("latency ms") && header.contains("bytes"),
        "{list}"
    );
    let column = header.find("backend").unwrap();
    let rows: Vec<&str> = lines.take_while(|l| !l.is_empty()).collect();
    assert_eq!(rows.len(), 3, "{list}");
    for row in rows {
        assert_eq!(row.find("198.18.0.1"), Some(column), "{list}");
    }
    let stats = w.agent.ctl(&["stats", "--interval", "0.2"]).unwrap();
    assert!(
        stats.contains("packets/s") && stats.contains("bytes/s"),
        "{stats}"
    );
    let top = w.agent.ctl(&["top", "--count", "2"]).unwrap();
    assert!(!top.contains('\x1b'), "escape codes into a pipe: {top:?}");
    assert_eq!(top.matches("lb top: instance").count(), 2, "{top}");
}

#[test]
fn an_error_says_each_cause_once() {
    let out = std::process::Command::new(lb_binary().unwrap())
        .args(["run", "--iface", "lo", "--config", "/nonexistent/lb.toml"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.matches("os error 2").count(), 1, "{stderr}");
    let out = std::process::Command::new(lb_binary().unwrap())
        .args(["--socket", "/nonexistent/lb.sock", "status"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "lb: error: the agent is not running (nothing answers on /nonexistent/lb.sock)"
    );
}

#[test]
fn operating_doc_shows_every_command_it_is_generated_from() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/OPERATING.md");
    let doc = std::fs::read_to_string(path).unwrap();
    for command in operating::shown_commands() {
        assert!(
            doc.contains(&format!("$ {command}\n")),
            "no `{command}` in {path}"
        );
    }
    assert!(
        doc.contains(operating::REGENERATE),
        "{path} does not say how to regenerate it"
    );
}

/// With `--log-format json` every log line is one JSON object, and an operator action
/// carries who, what and the result as fields of their own.
#[test]
fn the_log_is_json_when_asked_with_an_operator_action_as_fields() {
    let topo = lb_tests::topology::Topology::build(2).unwrap();
    let config = lb_tests::spread::write_config(&topo, &[1, 1], "").unwrap();
    let extra = ["--log-format", "json", "--metrics-address", "off"];
    let mut agent = lb_tests::spread::Agent::start(&topo, &config, &extra).unwrap();
    let backend = topo.backend(1).ipv4().to_string();
    agent.ctl(&["drain", &backend]).unwrap();
    let lines = agent.wait_for_log(|l| l.contains("operator action"), Duration::from_secs(5));
    let events: Vec<serde_json::Value> = lines
        .iter()
        .filter(|l| !l.starts_with("lb: "))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        events.iter().any(|e| e["message"] == "attached to"
            || e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("attached to"))),
        "{lines:#?}"
    );
    let action = events
        .iter()
        .find(|e| e["message"] == "control: operator action")
        .unwrap_or_else(|| panic!("no operator action in {lines:#?}"));
    assert_eq!(action["level"], "INFO", "{action}");
    assert_eq!(action["uid"], 0, "{action}");
    assert!(action["pid"].as_u64().is_some(), "{action}");
    assert_eq!(action["request"], format!("drain {backend}"), "{action}");
    assert!(
        action["result"]
            .as_str()
            .is_some_and(|r| r.contains("slots moved")),
        "{action}"
    );
    agent.stop().unwrap();
}
