//! Full NAT end to end: the agent in the load balancer's namespace, real TCP and UDP
//! from a client behind a router, backends with no VIP and no tunnel and no route to
//! the client (they reach only the LB's NAT addresses, through the LB).
//!
//! The world: the segment of `lb_tests::topology` (router = its client host, the LB,
//! three backends) with the VIP taken off the backends' loopbacks; the real client on
//! its own subnet behind the router (`lb_tests::fleet::link_client`); the router's
//! route to the VIP via the LB; each backend's route to the `[nat]` prefix via the LB.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use lb_tests::{
    fleet::{CLIENT_V4, link_client, set_route},
    netns::Netns,
    spread::{Agent, PORT, attach_pass},
    tcp::{
        BackendServer, ClientReport, Pinger, Traffic, agent_metrics, assert_survived, run_clients,
    },
    topology::{LB_V4, Topology, VIP_V4, VIP_V6},
};
use lb_userspace::dataplane::PassThrough;

/// The UDP service's port on the VIP and on each backend.
const DNS_PORT: u16 = 5353;
/// The LB's NAT sources.
const NAT_PREFIX: &str = "198.18.200.0/30";

/// A UDP service on a backend's own address: answers each datagram with its name
/// and the address it came from (what the backend sees as the client).
struct UdpEcho {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl UdpEcho {
    fn start(ns: &Netns, bind: SocketAddr, name: &str) -> UdpEcho {
        let socket = ns.run_in(move || UdpSocket::bind(bind)).unwrap().unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let name = name.to_owned();
        let handle = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::SeqCst) {
                if let Ok((_, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(format!("{name} {from}").as_bytes(), from);
                }
            }
        });
        UdpEcho {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

struct World {
    topo: Topology,
    client: Netns,
    config: PathBuf,
    _servers: Vec<BackendServer>,
    _udp: Vec<UdpEcho>,
    _pass: PassThrough,
}

impl World {
    fn build(weights: &[u32]) -> World {
        let topo = Topology::build(weights.len()).unwrap();
        let client = Netns::new(format!("{}-c2", topo.prefix())).unwrap();
        link_client(&topo, &client).unwrap();
        set_route(&topo, &[LB_V4]).unwrap();
        let nat_via = LB_V4.to_string();
        for b in topo.backends() {
            // No VIP on the backends: full NAT sends them their own address.
            b.ns()
                .ip(&["addr", "del", &format!("{VIP_V4}/32"), "dev", "lo"])
                .unwrap();
            b.ns()
                .ip(&["addr", "del", &format!("{VIP_V6}/128"), "dev", "lo"])
                .unwrap();
            b.ns()
                .ip(&["route", "add", NAT_PREFIX, "via", &nat_via])
                .unwrap();
        }
        let pass = attach_pass(&topo, topo.lb_bridge_port()).unwrap();
        let servers = topo
            .backends()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                BackendServer::start(
                    h.ns(),
                    SocketAddr::new(h.ipv4().into(), PORT),
                    &format!("backend{i}"),
                )
                .unwrap()
            })
            .collect();
        let udp = topo
            .backends()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                UdpEcho::start(
                    h.ns(),
                    SocketAddr::new(h.ipv4().into(), DNS_PORT),
                    &format!("backend{i}"),
                )
            })
            .collect();
        let config = std::env::temp_dir().join(format!("{}-nat.toml", topo.prefix()));
        let world = World {
            topo,
            client,
            config,
            _servers: servers,
            _udp: udp,
            _pass: pass,
        };
        world.write_config(weights);
        world
    }

    /// The agent's configuration: a TCP and a UDP VIP on the same address, both by
    /// full NAT, over every backend with `weights`.
    fn write_config(&self, weights: &[u32]) {
        self.write_config_as(weights, "nat");
    }

    /// The same VIPs, forwarded by `forwarding`.
    fn write_config_as(&self, weights: &[u32], forwarding: &str) {
        let mut text = format!("[nat]\nsource_v4 = \"{NAT_PREFIX}\"\n");
        for (port, protocol) in [(PORT, "tcp"), (DNS_PORT, "udp")] {
            text += &format!(
                "\n[[vip]]\naddress = \"{VIP_V4}\"\nport = {port}\nprotocol = \"{protocol}\"\n\
                 forwarding = \"{forwarding}\"\n"
            );
            for (host, w) in self.topo.backends().iter().zip(weights) {
                text += &format!(
                    "\n[[vip.backend]]\naddress = \"{}\"\nmac = \"{}\"\nweight = {w}\n",
                    host.ipv4(),
                    host.mac()
                );
            }
        }
        std::fs::write(&self.config, text).unwrap();
    }

    fn start_agent(&self, extra: &[&str]) -> Agent {
        Agent::start(&self.topo, &self.config, extra).unwrap()
    }

    fn vip(&self) -> SocketAddr {
        SocketAddr::new(VIP_V4.into(), PORT)
    }
}

/// `n` UDP queries from the client, each from a socket of its own (a flow of its
/// own); the client port of each and the answer, as "backendI ADDRESS:PORT" (what
/// the backend saw).
fn udp_queries(client: &Netns, n: usize) -> Vec<Result<(u16, String), String>> {
    client
        .run_in(move || {
            (0..n)
                .map(|i| {
                    let socket =
                        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| e.to_string())?;
                    socket
                        .set_read_timeout(Some(Duration::from_secs(2)))
                        .map_err(|e| e.to_string())?;
                    socket
                        .send_to(format!("query {i}").as_bytes(), (VIP_V4, DNS_PORT))
                        .map_err(|e| e.to_string())?;
                    let mut buf = [0u8; 256];
                    let (len, from) = socket
                        .recv_from(&mut buf)
                        .map_err(|e| format!("query {i}: {e}"))?;
                    if from != SocketAddr::new(VIP_V4.into(), DNS_PORT) {
                        return Err(format!("query {i}: answered from {from}"));
                    }
                    let port = socket.local_addr().map_err(|e| e.to_string())?.port();
                    Ok((port, String::from_utf8_lossy(&buf[..len]).into_owned()))
                })
                .collect()
        })
        .unwrap()
}

fn status(agent: &Agent) -> serde_json::Value {
    serde_json::from_str(&agent.ctl(&["status", "--json"]).unwrap()).unwrap()
}

fn assert_all_succeeded(what: &str, report: &ClientReport) {
    assert!(report.all_succeeded(), "{what}: {}", report.summary());
}

/// TCP and UDP through full NAT: every connection and query answered, by every
/// backend; the backends see only NAT addresses, the client only the VIP; `lb
/// status` shows the NAT flows and ports.
#[test]
fn tcp_and_udp_reach_backends_without_a_vip_through_full_nat() {
    let w = World::build(&[1, 1, 1]);
    let agent = w.start_agent(&["--detach-on-exit"]);
    let report = run_clients(&w.client, w.vip(), 300, 8, Duration::from_secs(3)).unwrap();
    assert_all_succeeded("TCP", &report);
    assert_eq!(report.responses.len(), 3, "{:?}", report.responses);

    let answers = udp_queries(&w.client, 120);
    let failed: Vec<&String> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(failed.is_empty(), "UDP queries failed: {failed:?}");
    let mut backends = std::collections::BTreeSet::new();
    let mut ports = std::collections::BTreeSet::new();
    for (port, answer) in answers.iter().flatten() {
        ports.insert(*port);
        let (backend, seen) = answer.split_once(' ').unwrap();
        let seen: SocketAddr = seen.parse().unwrap();
        let IpAddr::V4(source) = seen.ip() else {
            panic!("{answer}")
        };
        assert_eq!(
            source.octets()[..3],
            [198, 18, 200],
            "the backend saw {seen}, not a NAT address"
        );
        assert!(source.octets()[3] < 4 && source != CLIENT_V4, "{answer}");
        backends.insert(backend.to_owned());
    }
    assert_eq!(backends.len(), 3, "{backends:?}");

    // The walk of the NAT tables runs once a second at most every 10 s; its first
    // one may predate the traffic, so the counters are what is checked at once.
    // Every SYN claims a port; a UDP query claims one unless its socket got the
    // port of an earlier query, whose flow (and binding) it then is.
    let s = status(&agent);
    let nat = &s["nat"];
    let flows = 300 + ports.len() as u64;
    assert!(
        nat["claimed"].as_u64().unwrap() >= flows,
        "{flows} flows: {nat}"
    );
    assert!(
        nat["to_backend"].as_u64().unwrap() >= 300 * 3 + 120,
        "{nat}"
    );
    assert!(nat["to_client"].as_u64().unwrap() >= 300 * 2 + 120, "{nat}");
    for counter in ["ports_exhausted", "lost", "reply_unknown"] {
        assert_eq!(nat[counter], 0, "{counter}: {nat}");
    }
    assert_eq!(s["datapath"]["conn_miss_non_syn"], 0, "{s}");
    let text = agent.ctl(&["status"]).unwrap();
    assert!(text.contains("full NAT"), "{text}");

    // The agent's Prometheus endpoint (refreshed every second) shows NAT's counters.
    std::thread::sleep(Duration::from_millis(1200));
    let metrics = agent_metrics(w.topo.lb().ns()).unwrap();
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
    };
    assert!(value(r#"lb_nat_packets_total{direction="to_backend"}"#) >= 300 * 3 + 120);
    assert_eq!(value(r#"lb_nat_ports_total{event="exhausted"}"#), 0);
    assert_eq!(value("lb_nat_ports_per_source"), 64_512);
    agent.stop().unwrap();
}

/// A datapath created for a configuration without full NAT has no room for its
/// flows: a reload that adds the first NAT VIP is refused, saying what to do, and
/// the running configuration stays.
#[test]
fn the_first_nat_vip_by_reload_is_refused_with_what_to_do() {
    let w = World::build(&[1, 1]);
    w.write_config_as(&[1, 1], "dsr");
    let agent = w.start_agent(&["--detach-on-exit"]);
    w.write_config(&[1, 1]);
    let err = agent.ctl(&["reload"]).unwrap_err().to_string();
    assert!(
        err.contains("forwards by nat") && err.contains("lb detach"),
        "{err}"
    );
    let s = status(&agent);
    assert!(s["nat"].is_null(), "the DSR configuration stays: {s}");
    agent.stop().unwrap();
}

/// Under steady new connections and one long-lived one: weights change by reload,
/// the agent restarts (SIGTERM: fail-static, adopted) and is killed and started
/// again (SIGKILL); not one connection fails, and the long-lived one keeps its
/// backend and its NAT binding throughout.
#[test]
fn nat_flows_survive_weight_changes_and_agent_restarts_under_load() {
    let w = World::build(&[1, 2, 3]);
    let first = w.start_agent(&[]);
    let long = Pinger::start(
        &w.client,
        w.vip(),
        Duration::from_millis(20),
        Duration::from_secs(3),
    )
    .unwrap();
    let traffic = Traffic::start(&w.client, w.vip());
    std::thread::sleep(Duration::from_millis(300));

    // The long-lived connection's backend is drained by a reload: new flows leave
    // it, the established one stays.
    let index: usize = long
        .backend()
        .trim_start_matches("backend")
        .parse()
        .unwrap();
    let mut weights = vec![1, 2, 3];
    weights[index] = 0;
    w.write_config(&weights);
    first.ctl(&["reload"]).unwrap();
    std::thread::sleep(Duration::from_millis(400));

    let log = first.kill(libc::SIGTERM).unwrap();
    assert!(
        log.iter().any(|l| l.contains("fail-static")),
        "{}",
        log.join("\n")
    );
    std::thread::sleep(Duration::from_millis(300));
    let second = w.start_agent(&[]);
    std::thread::sleep(Duration::from_millis(300));
    second.kill(libc::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let third = w.start_agent(&["--detach-on-exit"]);
    std::thread::sleep(Duration::from_millis(300));

    assert_survived(traffic.stop(), &long.stop());
    let s = status(&third);
    for counter in ["ports_exhausted", "lost", "reply_unknown"] {
        assert_eq!(s["nat"][counter], 0, "{counter}: {}", s["nat"]);
    }
    assert_eq!(s["datapath"]["conn_miss_non_syn"], 0, "{s}");
    third.stop().unwrap();
}
