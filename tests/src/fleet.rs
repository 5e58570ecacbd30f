//! A fleet of load balancers behind an ECMP router, coordinated through a real etcd:
//! the world of `tests/tests/fleet.rs` and `cargo xtask bench fleet`.
//!
//! [`FleetWorld::build`] makes, under one topology prefix:
//! - the segment of [`crate::topology`] with N backends and M load balancers
//!   (198.18.0.2, .3, ...), every backend running an emulated HTTP service
//!   ([`crate::testbed::backend`]: the VIP on port 80, health on its own :80, metrics
//!   on its own :9100);
//! - the client host of the segment as the router: a multipath route to the VIP over
//!   every load balancer, hashed on the L4 fields (`fib_multipath_hash_policy=1`);
//! - the real client behind the router, on its own link (198.18.10.1/24);
//! - etcd on a service host (198.18.0.200:2379), plain or TLS with certificates
//!   generated for the run.
//!
//! Each LB gets its own configuration file (the same VIP, policy and backends; its own
//! node name in `[cluster]`) and is started by [`FleetWorld::start_lb`], or with
//! flow sharing on its own address by [`FleetWorld::start_lb_with`] and
//! [`FleetWorld::share_line`].

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lb_userspace::api::Request;
use serde_json::Value;

use crate::{
    certs::{self, TlsFiles},
    etcd::EtcdServer,
    netns::{Netns, unique_prefix},
    scratch::ScratchDir,
    spread::{Agent, PORT, socket_of},
    testbed::backend::{BackendSpec, EmulatedBackend, METRICS_PORT, PROBE_PORT},
    topology::{Topology, VIP_V4},
};

/// The real client's address, behind the router.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
/// The router's address on the client's link.
const ROUTER_CLIENT_SIDE: &str = "198.18.10.254";
/// The port each LB shares flows on (`share_listen`), on its own address.
pub const SHARE_PORT: u16 = 7947;

/// What the fleet runs.
#[derive(Clone, Debug)]
pub struct FleetSpec {
    pub lbs: usize,
    /// Each backend's slots and service time (capacity = slots / service time).
    pub backends: Vec<(usize, Duration)>,
    pub policy: &'static str,
    pub interval_ms: u64,
    pub lease_s: u64,
    pub tls: bool,
    /// Write `[cluster]` (false: each LB decides alone, as without a fleet).
    pub cluster: bool,
}

impl FleetSpec {
    /// `lbs` LBs, three backends of 8 slots × 10 ms, `ai`, 500 ms intervals, 2 s lease.
    pub fn new(lbs: usize) -> FleetSpec {
        FleetSpec {
            lbs,
            backends: vec![(8, Duration::from_millis(10)); 3],
            policy: "ai",
            interval_ms: 500,
            lease_s: 2,
            tls: false,
            cluster: true,
        }
    }
}

/// The world; dropping it stops everything and removes the namespaces.
pub struct FleetWorld {
    pub spec: FleetSpec,
    pub backends: Vec<EmulatedBackend>,
    pub etcd: EtcdServer,
    pub tls: Option<TlsFiles>,
    /// The client behind the router.
    pub client: Netns,
    pub dir: ScratchDir,
    /// The router's interface towards the client (for [`FleetWorld::routes_of`]).
    router_if: String,
    _pass: Vec<lb_userspace::dataplane::PassThrough>,
    // Last: the namespaces go after everything that lives in them.
    pub topo: Topology,
}

/// The node name of LB `i`.
pub fn node_name(i: usize) -> String {
    format!("lb-{i}")
}

impl FleetWorld {
    pub fn build(spec: FleetSpec) -> Result<FleetWorld> {
        let mut topo = Topology::build(spec.backends.len())?;
        for _ in 1..spec.lbs {
            topo.add_load_balancer()?;
        }
        let etcd_host = topo.add_service_host("etcd")?;
        let etcd_ip = etcd_host.ipv4();
        let dir = ScratchDir::new("fleet")?;
        let tls = if spec.tls {
            Some(certs::generate(dir.path(), &[etcd_ip.into()])?)
        } else {
            None
        };
        let etcd = EtcdServer::start(
            topo.service_host("etcd").expect("added").ns(),
            etcd_ip,
            tls.as_ref(),
        )?;
        let client = Netns::new(format!("{}-c2", topo.prefix()))?;
        route(&topo, &client)?;
        let router_if = interface_with(topo.client().ns(), ROUTER_CLIENT_SIDE)?;
        let lbs: Vec<Ipv4Addr> = topo.load_balancers().iter().map(|h| h.ipv4()).collect();
        set_route(&topo, &lbs)?;
        // An XDP program on each LB's bridge port, so that XDP_TX frames are not
        // dropped (see `topology`).
        let pass = topo
            .load_balancers()
            .iter()
            .map(|lb| {
                let port = lb.bridge_port().to_owned();
                topo.switch()
                    .run_in(move || lb_userspace::dataplane::PassThrough::attach(&port))?
                    .context("attaching the pass-through program")
            })
            .collect::<Result<Vec<_>>>()?;
        let vip = SocketAddr::new(VIP_V4.into(), PORT);
        let backends = topo
            .backends()
            .iter()
            .zip(&spec.backends)
            .enumerate()
            .map(|(i, (h, &(slots, service)))| {
                EmulatedBackend::start(
                    h.ns(),
                    BackendSpec::new(format!("backend{i}"), slots, service),
                    vip,
                    h.ipv4().into(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(FleetWorld {
            spec,
            backends,
            etcd,
            tls,
            client,
            dir,
            router_if,
            _pass: pass,
            topo,
        })
    }

    /// The VIP as the client reaches it.
    pub fn vip(&self) -> SocketAddr {
        SocketAddr::new(VIP_V4.into(), PORT)
    }

    /// The configuration of LB `i` (written to the scratch directory); `cluster`
    /// adds to or replaces lines of its `[cluster]` section.
    pub fn config(&self, i: usize, cluster_extra: &str) -> Result<PathBuf> {
        let s = &self.spec;
        let mut text = format!(
            "[control]\ninterval_ms = {}\n\n[[vip]]\naddress = \"{VIP_V4}\"\nport = {PORT}\n\
             protocol = \"tcp\"\npolicy = \"{}\"\n\n[vip.health]\nport = {PROBE_PORT}\n\
             http_path = \"/\"\ninterval_ms = 500\ntimeout_ms = 300\nrise = 2\nfall = 2\n\n\
             [vip.metrics]\nport = {METRICS_PORT}\npath = \"/metrics\"\n\
             in_flight = \"app_requests_in_flight\"\nlatency = \"app_request_duration_seconds\"\n\
             requests = \"app_requests_total\"\nerrors = \"app_errors_total\"\ntimeout_ms = 300\n",
            s.interval_ms, s.policy
        );
        for h in self.topo.backends() {
            text += &format!(
                "\n[[vip.backend]]\naddress = \"{}\"\nmac = \"{}\"\nweight = 1\n",
                h.ipv4(),
                h.mac()
            );
        }
        if !s.cluster {
            let path = self.dir.join(format!("lb-{i}.toml"));
            std::fs::write(&path, text)?;
            return Ok(path);
        }
        text += &format!(
            "\n[cluster]\nendpoints = [\"{}\"]\nname = \"{}\"\nnode = \"{}\"\nlease_s = {}\n{cluster_extra}\n",
            self.etcd.endpoint(),
            self.topo.prefix(),
            node_name(i),
            s.lease_s
        );
        if let Some(t) = &self.tls {
            text += &format!(
                "\n[cluster.tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                t.ca.display(),
                t.client_cert.display(),
                t.client_key.display()
            );
        }
        let path = self.dir.join(format!("lb-{i}.toml"));
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// The instance name of LB `i` (its pins and control socket).
    pub fn instance(&self, i: usize) -> String {
        format!("{}f{i}", self.topo.prefix())
    }

    /// Starts the agent of LB `i` on its interface.
    pub fn start_lb(&self, i: usize) -> Result<Agent> {
        self.start_lb_with(i, "")
    }

    /// The `[cluster]` line that turns flow sharing on for LB `i`, on its own address
    /// on the segment: `share_listen = "198.18.0.2:7947"`.
    pub fn share_line(&self, i: usize) -> String {
        format!(
            "share_listen = \"{}:{SHARE_PORT}\"",
            self.topo.load_balancer(i).ipv4()
        )
    }

    /// Starts the agent of LB `i` with `cluster_extra` in its `[cluster]` section.
    pub fn start_lb_with(&self, i: usize, cluster_extra: &str) -> Result<Agent> {
        let config = self.config(i, cluster_extra)?;
        Agent::start_on(
            self.topo.load_balancer(i),
            &self.instance(i),
            &config,
            &["--detach-on-exit"],
        )
    }

    /// Stops the agents still running and removes every LB's pins (a killed
    /// agent's stay behind it).
    pub fn stop_all(&self, agents: Vec<Option<Agent>>) -> Result<()> {
        for a in agents.into_iter().flatten() {
            a.stop()?;
        }
        for i in 0..self.spec.lbs {
            crate::spread::remove_pins(&self.instance(i));
        }
        Ok(())
    }

    /// Sends the VIP's traffic to the LBs numbered in `which` only (as BGP does when
    /// an LB withdraws its route).
    pub fn route_via(&self, which: &[usize]) -> Result<()> {
        let lbs: Vec<Ipv4Addr> = which
            .iter()
            .map(|&i| self.topo.load_balancer(i).ipv4())
            .collect();
        set_route(&self.topo, &lbs)
    }

    /// Which LB the router sends each of the client's TCP connections to the VIP
    /// to, by client port, as the router's own route lookup says now (`ip route get`
    /// with the ports, which hashes them as a forwarded packet's, all in one `ip
    /// -batch`). `None` for a port the lookup did not answer.
    pub fn routes_of(&self, ports: &[u16]) -> Result<Vec<Option<usize>>> {
        if ports.is_empty() {
            return Ok(Vec::new());
        }
        let lbs: Vec<Ipv4Addr> = self
            .topo
            .load_balancers()
            .iter()
            .map(|h| h.ipv4())
            .collect();
        let mut batch = String::new();
        for p in ports {
            batch += &format!(
                "route get {VIP_V4} from {CLIENT_V4} iif {} ipproto tcp sport {p} dport {PORT}\n",
                self.router_if
            );
        }
        let mut child = std::process::Command::new("ip")
            .args([
                "-n",
                self.topo.client().ns().name(),
                "-force",
                "-batch",
                "-",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("ip -batch")?;
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().context("ip's stdin")?;
            stdin.write_all(batch.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        // One unindented line per answer (a `cache` line follows, indented).
        let vias: Vec<Option<usize>> = text
            .lines()
            .filter(|l| !l.starts_with(char::is_whitespace) && !l.trim().is_empty())
            .map(|l| {
                let mut words = l.split_whitespace();
                words.find(|w| *w == "via")?;
                let via: Ipv4Addr = words.next()?.parse().ok()?;
                lbs.iter().position(|lb| *lb == via)
            })
            .collect();
        if vias.len() != ports.len() {
            // An answer missing: no way to tell which.
            return Ok(vec![None; ports.len()]);
        }
        Ok(vias)
    }

    /// Cuts LB `i` off from etcd (`true`), or heals it: a blackhole route to etcd's
    /// address in its namespace. Its datapath keeps forwarding.
    pub fn cut_from_etcd(&self, i: usize, cut: bool) -> Result<()> {
        let etcd = format!("{}/32", self.etcd.client_addr().ip());
        let ns = self.topo.load_balancer(i).ns();
        if cut {
            ns.ip(&["route", "add", "blackhole", &etcd])?;
        } else {
            ns.ip(&["route", "del", "blackhole", &etcd])?;
        }
        Ok(())
    }
}

/// The router (the topology's client host): forwarding, an L4 multipath hash, the
/// link to the real client behind it (`client`, [`CLIENT_V4`]), and each backend's
/// route back to that client.
pub fn route(topo: &Topology, client: &Netns) -> Result<()> {
    link_client(topo, client)?;
    let via = topo.client().ipv4().to_string();
    for b in topo.backends() {
        b.ns()
            .ip(&["route", "add", "198.18.10.0/24", "via", &via])?;
    }
    Ok(())
}

/// Makes the segment's client host a router for `client`: a link between them
/// (198.18.10.254 on the router, [`CLIENT_V4`] on the client), forwarding on, and the
/// client's route to the VIP via the router. Nothing routes back to the client from
/// the backends: [`route`] adds that for direct server return; full NAT needs none.
pub fn link_client(topo: &Topology, client: &Netns) -> Result<()> {
    let router = topo.client().ns();
    let (rif, cif) = (
        format!("{}rr", unique_prefix()),
        format!("{}rc", unique_prefix()),
    );
    router.ip(&[
        "link",
        "add",
        &rif,
        "type",
        "veth",
        "peer",
        "name",
        &cif,
        "netns",
        client.name(),
    ])?;
    router.ip(&[
        "addr",
        "add",
        &format!("{ROUTER_CLIENT_SIDE}/24"),
        "dev",
        &rif,
    ])?;
    router.ip(&["link", "set", &rif, "up"])?;
    client.ip(&["link", "set", "lo", "up"])?;
    // One socket per request: the client must not run out of ports.
    client.sysctl(&[("net/ipv4/ip_local_port_range", "10000 65000")])?;
    client.ip(&["addr", "add", &format!("{CLIENT_V4}/24"), "dev", &cif])?;
    client.ip(&["link", "set", &cif, "up"])?;
    client.ip(&[
        "route",
        "add",
        &format!("{VIP_V4}/32"),
        "via",
        ROUTER_CLIENT_SIDE,
    ])?;
    router.sysctl(&[
        ("net/ipv4/ip_forward", "1"),
        ("net/ipv4/fib_multipath_hash_policy", "1"),
    ])?;
    Ok(())
}

/// The interface of `ns` that holds `address`.
fn interface_with(ns: &Netns, address: &str) -> Result<String> {
    let out = ns.ip(&["-o", "-4", "addr", "show"])?;
    out.lines()
        .find(|l| l.contains(&format!(" {address}/")))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .with_context(|| format!("no interface with {address} in {}", ns.name()))
}

/// The router's route to the VIP: over every LB of `lbs` (at least one).
pub fn set_route(topo: &Topology, lbs: &[Ipv4Addr]) -> Result<()> {
    let vip = format!("{VIP_V4}/32");
    let mut args: Vec<String> = ["route", "replace", &vip].map(String::from).to_vec();
    match lbs {
        [] => bail!("a route needs at least one LB"),
        [one] => args.extend(["via".into(), one.to_string()]),
        many => {
            for lb in many {
                args.extend(["nexthop".into(), "via".into(), lb.to_string()]);
            }
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    topo.client().ns().ip(&args)?;
    Ok(())
}

/// `lb cluster status --json` of `agent`, asked through its control socket from
/// this process (no `lb` process per call: tests poll it often).
pub fn cluster_status(agent: &Agent) -> Result<Value> {
    lb_userspace::control::request(&socket_of(agent.instance()), Request::ClusterStatus)
        .context("cluster status")
}

/// Each VIP's digest of the table in the kernel of `agent` (`lb tables --json`).
pub fn kernel_digests(agent: &Agent) -> Result<Vec<String>> {
    let v: Value = serde_json::from_str(&agent.ctl(&["tables", "--json"])?)?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .map(|t| t["digest"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default())
}

/// The epoch applied by `agent` and the digests of the tables its datapath reads
/// (`tables_here`, from the map's memory), both from one answer of its loop, so they
/// belong together; `None` when the newest epoch seen there is not the one applied,
/// or while its own probes keep a backend out ahead of the fleet.
pub fn applied(agent: &Agent) -> Result<Option<(u64, Value)>> {
    let s = cluster_status(agent)?;
    let epoch = s["epoch_applied"].as_u64().unwrap_or(0);
    let down_here = s["down_here"].as_array().is_some_and(|d| !d.is_empty());
    if epoch != s["epoch_newest"].as_u64().unwrap_or(0) || down_here {
        return Ok(None);
    }
    Ok(Some((epoch, s["tables_here"].clone())))
}

/// Whether every agent has applied the same newest epoch (≥ `at_least`); returns it.
/// Panics if agents that applied the same epoch hold different tables in their
/// kernels: that is the one thing a fleet must never do.
pub fn agreed(agents: &[&Agent], at_least: u64) -> Result<Option<u64>> {
    let mut seen: Vec<(u64, Value)> = Vec::new();
    for a in agents {
        match applied(a)? {
            Some((epoch, digests)) if epoch >= at_least => seen.push((epoch, digests)),
            _ => return Ok(None),
        }
    }
    let Some((epoch, digests)) = seen.first().cloned() else {
        return Ok(None);
    };
    if seen.iter().any(|(e, _)| *e != epoch) {
        return Ok(None);
    }
    if seen.iter().any(|(_, d)| *d != digests) {
        let statuses: Vec<String> = agents
            .iter()
            .map(|a| cluster_status(a).map_or_else(|e| format!("{e:#}"), |s| s.to_string()))
            .collect();
        panic!(
            "LBs that applied epoch {epoch} hold different tables: {seen:?}\n{}",
            statuses.join("\n")
        );
    }
    Ok(Some(epoch))
}

/// Polls `check` every 100 ms until it returns `Some`, or fails after `timeout`
/// saying `what`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut last_error = None;
    while start.elapsed() < timeout {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "{what}: not within {timeout:?}{}",
        last_error.map_or_else(String::new, |e| format!(" (last error: {e:#})"))
    )
}

/// Whether the LB says it is ready (`cluster status`'s `ready`: with flow sharing,
/// it has each peer's dump).
pub fn is_ready(status: &Value) -> bool {
    status["ready"] == true
}

/// Flow sharing's counters of one LB (`cluster status`'s `share`), or of several
/// summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShareCounts {
    pub flows_sent: u64,
    pub flows_received: u64,
    pub flows_inserted: u64,
    pub bytes_sent: u64,
    pub dropped: u64,
    pub refused: u64,
}

impl ShareCounts {
    /// From one `cluster status` (zeros where a counter is missing).
    pub fn of(status: &Value) -> ShareCounts {
        let n = |k: &str| status["share"][k].as_u64().unwrap_or(0);
        ShareCounts {
            flows_sent: n("flows_sent"),
            flows_received: n("flows_received"),
            flows_inserted: n("flows_inserted"),
            bytes_sent: n("bytes_sent"),
            dropped: n("ring_full") + n("peer_slow"),
            refused: n("flows_refused"),
        }
    }

    /// The sum of `counts`.
    pub fn sum<'a>(counts: impl IntoIterator<Item = &'a ShareCounts>) -> ShareCounts {
        counts
            .into_iter()
            .fold(ShareCounts::default(), |a, b| ShareCounts {
                flows_sent: a.flows_sent + b.flows_sent,
                flows_received: a.flows_received + b.flows_received,
                flows_inserted: a.flows_inserted + b.flows_inserted,
                bytes_sent: a.bytes_sent + b.bytes_sent,
                dropped: a.dropped + b.dropped,
                refused: a.refused + b.refused,
            })
    }

    /// Bytes sent per flow sent (NaN before any flow).
    pub fn bytes_per_flow(&self) -> f64 {
        if self.flows_sent == 0 {
            f64::NAN
        } else {
            self.bytes_sent as f64 / self.flows_sent as f64
        }
    }
}

/// The peers of an LB's flow sharing (`share.peers`, by node): (node, connected
/// both ways, each side's dump sent and received).
pub fn share_peers(status: &Value) -> Vec<(String, bool, bool)> {
    status["share"]["peers"]
        .as_object()
        .map(|peers| {
            peers
                .iter()
                .map(|(node, p)| {
                    (
                        node.clone(),
                        p["sending"] == true && p["receiving"] == true,
                        p["dump_sent"] == true && p["dump_received"] == true,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until every agent is ready and, with flow sharing, connected to
/// `peers` peers that each completed their dump; returns the statuses.
pub fn wait_sharing(agents: &[&Agent], peers: usize, timeout: Duration) -> Result<Vec<Value>> {
    wait_for("every LB ready and sharing", timeout, || {
        let statuses = agents
            .iter()
            .map(|a| cluster_status(a))
            .collect::<Result<Vec<_>>>()?;
        let done = statuses.iter().all(|s| {
            let p = share_peers(s);
            is_ready(s) && p.len() >= peers && p.iter().all(|(_, c, d)| *c && *d)
        });
        Ok(done.then_some(statuses))
    })
}

/// CPU seconds (user + system, all threads) process `pid` has used so far, from
/// `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let ticks = crate::versus::cpu::parse_task_ticks(&stat)
        .with_context(|| format!("the times in /proc/{pid}/stat"))?;
    Ok(ticks.own as f64 / crate::versus::cpu::ticks_per_second())
}

/// The running agents of `agents`.
pub fn live(agents: &[Option<Agent>]) -> Vec<&Agent> {
    agents.iter().flatten().collect()
}

/// Which of `agents` leads (exactly one must), by index.
pub fn leader(agents: &[Option<Agent>]) -> Option<usize> {
    let leading: Vec<usize> = agents
        .iter()
        .enumerate()
        .filter_map(|(i, a)| a.as_ref().map(|a| (i, a)))
        .filter(|(_, a)| cluster_status(a).is_ok_and(|s| s["leading"] == true))
        .map(|(i, _)| i)
        .collect();
    match leading.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

/// The newest epoch `agent` has seen, and who published it.
pub fn newest_epoch(agent: &Agent) -> Result<(u64, String)> {
    let s = cluster_status(agent)?;
    Ok((
        s["epoch_newest"].as_u64().unwrap_or(0),
        s["epoch_leader"].as_str().unwrap_or_default().to_owned(),
    ))
}
