//! Never lose a flow: faults under continuous traffic, with the real agent, the real
//! XDP program and real TCP. Weights change every 100 ms for a minute; a backend is
//! killed and returned; the configuration is reloaded (SIGHUP and `lb reload`); the
//! LB's interface goes down and up; the agent is killed with SIGKILL and restarted.
//! Required: no failed connection except to the killed backend while it was down,
//! a long-lived connection to a live backend never breaks, and no TCP packet of a
//! live flow misses the connection table.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{
    netns::Netns,
    spread::{Agent, PORT},
    tcp::{BackendServer, Pinger, run_clients},
    topology::{Topology, VIP_V4},
};
use lb_userspace::dataplane::PassThrough;

/// One batch of new connections: when it ran and how many failed, and how.
struct Batch {
    start: Instant,
    end: Instant,
    attempted: usize,
    failed: usize,
    failures: Vec<String>,
}

fn start_traffic(
    ns: &Netns,
    vip: SocketAddr,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Batch>>>,
) -> std::thread::JoinHandle<()> {
    let ns = ns.borrowed();
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            let start = Instant::now();
            let r = run_clients(&ns, vip, 10, 4, Duration::from_secs(3)).unwrap();
            log.lock().unwrap().push(Batch {
                start,
                end: Instant::now(),
                attempted: r.attempted,
                failed: r.failures.len(),
                failures: r
                    .failures
                    .iter()
                    .map(|f| format!("{:?} {:?}: {}", f.stage, f.kind, f.message))
                    .collect(),
            });
        }
    })
}

/// Both servers of one backend: the service on the VIP and the health endpoint on
/// the backend's own address.
fn serve(topo: &Topology, i: usize) -> (BackendServer, BackendServer) {
    let h = topo.backend(i);
    let name = format!("backend{i}");
    (
        BackendServer::start(h.ns(), topo.vip(PORT, false), &name).unwrap(),
        BackendServer::start(h.ns(), SocketAddr::new(h.ipv4().into(), PORT), &name).unwrap(),
    )
}

#[test]
fn faults_under_traffic_lose_no_flow_to_a_live_backend() {
    let topo = Topology::build(4).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-lb", topo.prefix()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("lb.toml");
    let mut text = format!(
        "[[vip]]\naddress = \"{VIP_V4}\"\nport = {PORT}\nprotocol = \"tcp\"\npolicy = \"static\"\n\
         [vip.health]\ninterval_ms = 100\ntimeout_ms = 80\nrise = 2\nfall = 2\n"
    );
    for h in topo.backends() {
        text += &format!(
            "\n[[vip.backend]]\naddress = \"{}\"\nmac = \"{}\"\nweight = 1\n",
            h.ipv4(),
            h.mac().octets().map(|b| format!("{b:02x}")).join(":")
        );
    }
    std::fs::write(&config, &text).unwrap();
    let port = topo.lb_bridge_port().to_owned();
    let _pass = topo
        .switch()
        .run_in(move || PassThrough::attach(&port))
        .unwrap()
        .unwrap();
    let mut servers: Vec<Option<(BackendServer, BackendServer)>> =
        (0..4).map(|i| Some(serve(&topo, i))).collect();
    let mut agent = Agent::start(&topo, &config, &[]).unwrap();
    let client = topo.client().ns();
    let vip = topo.vip(PORT, false);

    let long = Pinger::start(
        client,
        vip,
        Duration::from_millis(50),
        Duration::from_secs(5),
    )
    .unwrap();
    // The backend to kill is one the long-lived connection does not use: that
    // connection must survive everything, as any connection to a live backend must.
    let victim = if long.backend() == "backend3" { 2 } else { 3 };
    let victim_addr = format!("198.18.0.{}", 11 + victim);
    std::thread::sleep(Duration::from_millis(200));
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::new()));
    let traffic = start_traffic(client, vip, stop.clone(), log.clone());

    // 1. Weights change every 100 ms for a minute.
    let started = Instant::now();
    let mut k = 0u32;
    while started.elapsed() < Duration::from_secs(60) {
        let backend = format!("198.18.0.{}", 11 + k % 4);
        let weight = (1 + (k * 7) % 9).to_string();
        agent.ctl(&["weight", "set", &backend, &weight]).unwrap();
        k += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    for i in 0..4 {
        agent
            .ctl(&["weight", "auto", &format!("198.18.0.{}", 11 + i)])
            .unwrap();
    }

    // 2. Kill the victim (both its servers) and bring it back.
    let killed_at = Instant::now();
    drop(servers[victim].take());
    std::thread::sleep(Duration::from_millis(1500));
    let status: serde_json::Value =
        serde_json::from_str(&agent.ctl(&["status", "--json"]).unwrap()).unwrap();
    assert_eq!(
        status["model"]["unhealthy_backends"],
        serde_json::json!([victim_addr]),
        "{status}"
    );
    servers[victim] = Some(serve(&topo, victim));
    let returned_at = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));

    // 3. Reload, by SIGHUP and by the CLI, with the same file.
    // SAFETY: kill(2) on the agent we started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(300));
    agent.ctl(&["reload"]).unwrap();

    // 4. The LB's interface goes down and up.
    let lb = topo.lb();
    lb.ns()
        .ip(&["link", "set", "dev", lb.ifname(), "down"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    lb.ns()
        .ip(&["link", "set", "dev", lb.ifname(), "up"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));

    // 5. SIGKILL the agent; the pinned datapath forwards on; a new agent adopts it.
    agent.kill(libc::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    agent = Agent::start(&topo, &config, &["--detach-on-exit"]).unwrap();
    std::thread::sleep(Duration::from_millis(1000));

    stop.store(true, Ordering::SeqCst);
    traffic.join().unwrap();
    let ping = long.stop();

    // Failures are allowed only in the window in which the victim was down or not
    // yet known to be down: from the kill until it was back.
    let batches = log.lock().unwrap();
    let total: usize = batches.iter().map(|b| b.attempted).sum();
    let in_window = |b: &Batch| b.end >= killed_at && b.start <= returned_at;
    let outside: usize = batches
        .iter()
        .filter(|b| !in_window(b))
        .map(|b| b.failed)
        .sum();
    let inside: usize = batches
        .iter()
        .filter(|b| in_window(b))
        .map(|b| b.failed)
        .sum();
    let inside_attempted: usize = batches
        .iter()
        .filter(|b| in_window(b))
        .map(|b| b.attempted)
        .sum();
    eprintln!(
        "faults: {total} connections; {outside} failed outside the kill window; \
         {inside} of {inside_attempted} failed inside it (backend {victim} killed for {:?})",
        returned_at - killed_at
    );
    // When and how each failure outside the window happened, to tell a lost flow
    // from the client's own trouble (e.g. no free port).
    let events = [("kill", killed_at), ("return", returned_at)];
    for b in batches.iter().filter(|b| !in_window(b) && b.failed > 0) {
        let at = b.start.duration_since(started);
        let near: Vec<String> = events
            .iter()
            .map(|(name, t)| {
                let d = b.start.saturating_duration_since(*t).as_secs_f64()
                    - t.saturating_duration_since(b.start).as_secs_f64();
                format!("{d:+.2} s from {name}")
            })
            .collect();
        eprintln!(
            "failed outside the window, batch at {at:?} ({}): {:?}",
            near.join(", "),
            b.failures
        );
    }
    // The datapath's counters say whether a failure went with a connection-table
    // miss (`conn_miss_non_syn`), a failed insert, or a VIP packet passed to the
    // LB's own kernel (`pass_*`).
    let status: serde_json::Value =
        serde_json::from_str(&agent.ctl(&["status", "--json"]).unwrap()).unwrap();
    if outside > 0 {
        eprintln!("datapath counters: {}", status["datapath"]);
        // And the TCP stacks' own account of resets and refused handshakes.
        let hosts = topo.backends().iter().map(|h| h.ns()).chain([client]);
        for ns in hosts {
            let counters = ns.exec(&["nstat", "-az"]).unwrap_or_default();
            let interesting: Vec<&str> = counters
                .lines()
                .filter(|l| {
                    [
                        "Rst",
                        "Listen",
                        "Syncookies",
                        "AbortOn",
                        "TW",
                        "EstabResets",
                        "AttemptFails",
                    ]
                    .iter()
                    .any(|k| l.contains(k))
                })
                .filter(|l| l.split_whitespace().nth(1).is_some_and(|v| v != "0"))
                .collect();
            eprintln!("{}: {}", ns.name(), interesting.join("; "));
        }
    }
    assert!(total > 1000, "only {total} connections");
    assert_eq!(outside, 0, "connections to live backends failed");
    assert!(
        ping.error.is_none(),
        "the long-lived connection broke: {:?}",
        ping.error
    );
    assert_eq!(
        ping.backends().len(),
        1,
        "the long-lived connection moved: {:?}",
        ping.backends()
    );
    assert!(
        ping.responses.len() > 500,
        "too few round trips: {}",
        ping.responses.len()
    );
    assert_eq!(status["datapath"]["conn_miss_non_syn"], 0, "{status}");
    agent.stop().unwrap();
}
