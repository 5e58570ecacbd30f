//! Checks the namespace harness itself, without a load balancer: the bridged segment
//! carries real TCP between the client and each backend, and every namespace is
//! removed after a normal end, a panic, SIGINT/SIGTERM and (by the sweep) SIGKILL.
//!
//! The tests need root, `ip` (iproute2) and network namespace support.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lb_tests::netns::{self, Netns};
use lb_tests::tcp::{BackendServer, PersistentConn, Pinger, run_clients};
use lb_tests::topology::{Topology, VIP_V4, VIP_V6};

const PORT: u16 = 8080;
const CLIENTS_PER_BACKEND: usize = 30;
const CONCURRENCY: usize = 8;
const TIMEOUT: Duration = Duration::from_secs(5);

fn assert_gone(names: &[String]) {
    let listed = netns::ip(&["netns", "list"]).expect("ip netns list");
    let left: Vec<&String> = names
        .iter()
        .filter(|name| {
            listed
                .lines()
                .any(|line| line.split_whitespace().next() == Some(name.as_str()))
        })
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

#[test]
fn client_reaches_every_backend_directly() {
    let topology = Topology::build(3).expect("build the topology");
    let names = topology.namespace_names();
    assert_eq!(
        names.len(),
        6,
        "switch, client, lb and 3 backends: {names:?}"
    );
    for name in &names {
        assert!(name.starts_with(topology.prefix()), "{name}");
    }

    for ns in topology.namespaces() {
        let routes = ns.ip(&["route", "show", "default"]).unwrap()
            + &ns.ip(&["-6", "route", "show", "default"]).unwrap();
        assert!(
            routes.trim().is_empty(),
            "default route in {}: {routes}",
            ns.name()
        );
        assert_eq!(ns.read_sysctl("net/ipv4/conf/all/rp_filter").unwrap(), "0");
    }
    for host in topology.hosts() {
        assert!(host.ifname().len() <= 15 && host.bridge_port().len() <= 15);
        let link = host
            .ns()
            .ip(&["-o", "link", "show", "dev", host.ifname()])
            .unwrap();
        assert!(link.contains(&host.mac().to_string()), "{link}");
        assert!(host.ifindex().unwrap() > 0);
        assert!(!host.tx_checksum_offload().unwrap(), "{}", host.ifname());
    }
    for backend in topology.backends() {
        let lo = backend
            .ns()
            .ip(&["-o", "addr", "show", "dev", "lo"])
            .unwrap();
        assert!(lo.contains(&format!("{VIP_V4}/32")), "{lo}");
        assert!(lo.contains(&format!("{VIP_V6}/128")), "{lo}");
        let ignore = format!("net/ipv4/conf/{}/arp_ignore", backend.ifname());
        assert_eq!(backend.ns().read_sysctl(&ignore).unwrap(), "1");
        // The same value seen by a process inside the namespace, which shows that the
        // thread-based sysctl writes reached the namespace and not the host.
        let seen = backend
            .ns()
            .exec(&["sysctl", "-n", "net.ipv4.conf.all.arp_ignore"]);
        assert_eq!(seen.unwrap().trim(), "1");
    }
    let client_routes = topology.client().ns().ip(&["route", "show"]).unwrap();
    assert!(
        client_routes.contains("198.18.1.1 via 198.18.0.2"),
        "{client_routes}"
    );
    let lb_port = topology
        .switch()
        .ip(&["-o", "link", "show", "dev", topology.lb_bridge_port()])
        .unwrap();
    assert!(lb_port.contains(topology.bridge()), "{lb_port}");

    let servers: Vec<BackendServer> = topology
        .backends()
        .iter()
        .enumerate()
        .map(|(i, backend)| {
            let bind = SocketAddr::new(backend.ip(false), PORT);
            BackendServer::start(backend.ns(), bind, &format!("backend{i}")).unwrap()
        })
        .collect();

    for (backend, server) in topology.backends().iter().zip(&servers) {
        let target = SocketAddr::new(backend.ip(false), PORT);
        let report = run_clients(
            topology.client().ns(),
            target,
            CLIENTS_PER_BACKEND,
            CONCURRENCY,
            TIMEOUT,
        )
        .unwrap();
        assert!(report.all_succeeded(), "{target}: {}", report.summary());
        assert_eq!(
            report.responses.get(server.name()),
            Some(&CLIENTS_PER_BACKEND),
            "{target}: {}",
            report.summary()
        );
        eprintln!("{}: {}", server.name(), report.summary());
    }
    let accepted: Vec<usize> = servers.into_iter().map(BackendServer::stop).collect();
    assert_eq!(accepted, vec![CLIENTS_PER_BACKEND; 3]);

    drop(topology);
    assert_gone(&names);
}

#[test]
fn ipv6_and_long_lived_connections_work() {
    let topology = Topology::build(1).expect("build the topology");
    let names = topology.namespace_names();
    let backend = topology.backend(0);
    let target = SocketAddr::new(backend.ip(true), PORT);
    let server = BackendServer::start(backend.ns(), target, "v6backend").unwrap();

    let report = run_clients(topology.client().ns(), target, 10, 4, TIMEOUT).unwrap();
    assert!(report.all_succeeded(), "{}", report.summary());

    let (mut conn, first) =
        PersistentConn::connect(topology.client().ns(), target, TIMEOUT).unwrap();
    assert_eq!(first, "v6backend");
    for i in 0..5 {
        assert_eq!(conn.request(&format!("again {i}")).unwrap(), "v6backend");
    }
    drop(conn);

    let pinger = Pinger::start(
        topology.client().ns(),
        target,
        Duration::from_millis(20),
        TIMEOUT,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let pings = pinger.stop();
    assert!(pings.error.is_none(), "{pings:?}");
    assert!(pings.responses.len() >= 4, "{pings:?}");
    assert_eq!(pings.backends(), vec!["v6backend"]);

    // A server bound to the VIP on a backend's lo answers connections made inside
    // that backend, which is what direct server return relies on.
    let vip = SocketAddr::new(VIP_V4.into(), PORT);
    let vip_server = BackendServer::start(backend.ns(), vip, "vip").unwrap();
    let local = run_clients(backend.ns(), vip, 3, 1, TIMEOUT).unwrap();
    assert_eq!(local.responses.get("vip"), Some(&3), "{}", local.summary());
    vip_server.stop();

    // An idle connection that never sends a line does not hold up stopping.
    let idle = topology
        .client()
        .ns()
        .run_in(|| std::net::TcpStream::connect_timeout(&target, TIMEOUT))
        .unwrap()
        .unwrap();
    // The handshake completes in the kernel; wait until the server has accepted it.
    let deadline = Instant::now() + TIMEOUT;
    while server.accepted() < 13 {
        assert!(
            Instant::now() < deadline,
            "the idle connection was never accepted"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let stopping = Instant::now();
    assert_eq!(server.stop(), 13);
    assert!(
        stopping.elapsed() < Duration::from_secs(1),
        "{:?}",
        stopping.elapsed()
    );
    drop(idle);
    drop(topology);
    assert_gone(&names);
}

#[test]
fn panic_inside_a_test_still_cleans_up() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let topology = Topology::build(2).expect("build the topology");
        tx.send(topology.namespace_names()).unwrap();
        panic!("deliberate panic with a live topology");
    });
    assert!(result.is_err());
    let names = rx.recv().expect("the topology was built");
    assert_eq!(names.len(), 5);
    assert_gone(&names);
}

#[test]
fn netns_runs_code_inside() {
    let ns = Netns::new(format!("{}-solo", netns::unique_prefix())).unwrap();
    let name = ns.name().to_owned();
    let links = ns.exec(&["ip", "-o", "link", "show"]).unwrap();
    assert_eq!(links.lines().count(), 1, "only lo: {links}");
    let own = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let inside = ns
        .run_in(|| std::fs::read_link("/proc/thread-self/ns/net").unwrap())
        .unwrap();
    assert_ne!(own, inside);
    let handle = ns
        .spawn_in(|| std::fs::read_link("/proc/thread-self/ns/net").unwrap())
        .unwrap();
    assert_eq!(handle.join().unwrap(), inside);
    let err = ns
        .exec(&["ip", "link", "show", "dev", "nosuchdev"])
        .unwrap_err();
    assert!(format!("{err:#}").contains("nosuchdev"), "{err:#}");

    // A program started in the namespace is killed when the namespace is deleted.
    let mut child = ns.spawn(&["sleep", "30"]).unwrap();
    assert!(ns.contains_process(child.id()));
    let child_ns = std::fs::read_link(format!("/proc/{}/ns/net", child.id())).unwrap();
    assert_eq!(child_ns, inside);
    ns.delete().unwrap();
    let status = wait_with_timeout(&mut child);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert_gone(&[name]);
}

/// Starts this test binary as a victim that builds a topology, waits for it to be
/// ready, and returns the child and its namespace names.
fn start_victim() -> (std::process::Child, Vec<String>) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lb-netns-victim"));
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // If this test process dies first, the victim gets SIGTERM and cleans up after
    // itself instead of outliving it. The test thread that spawns the victim waits
    // for it, so the parent thread's death means the test process's death.
    let parent = std::process::id();
    // SAFETY: the closure only makes async-signal-safe calls (prctl, getppid, _exit).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(names) = line.strip_prefix("VICTIM READY ") {
            let names: Vec<String> = names.split(',').map(str::to_owned).collect();
            return (child, names);
        }
        assert!(Instant::now() < deadline, "victim never became ready");
    }
    let _ = child.kill();
    panic!("victim exited before it was ready: {:?}", child.wait());
}

fn wait_with_timeout(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("the child did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_signal_cleans_up(signal: libc::c_int, expected_code: i32) {
    let (mut child, names) = start_victim();
    assert_eq!(names.len(), 4, "{names:?}");
    for name in &names {
        assert!(netns::list_all().unwrap().contains(name), "{name} missing");
    }
    // SAFETY: kill(2) on the child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
    let status = wait_with_timeout(&mut child);
    assert_eq!(status.code(), Some(expected_code), "{status:?}");
    assert_gone(&names);
}

#[test]
fn sigterm_cleans_up() {
    assert_signal_cleans_up(libc::SIGTERM, 143);
}

#[test]
fn sigint_cleans_up() {
    assert_signal_cleans_up(libc::SIGINT, 130);
}

#[test]
fn sigkill_leftovers_are_swept() {
    let (mut child, names) = start_victim();
    child.kill().unwrap();
    child.wait().unwrap();
    // Another test of this binary may sweep them first; either way they must go.
    let removed = netns::sweep_stale().unwrap();
    for name in &removed {
        assert!(netns::creator_pid(name).is_some(), "{name}");
    }
    assert_gone(&names);
}
