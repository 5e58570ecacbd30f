//! A SYN flood against a VIP while long-lived connections sit idle through it, for
//! the flood test (`tests/tests/flood.rs`) and `cargo xtask bench flood`.
//!
//! One run: a topology of three backends, the real agent (`$LB_BIN`) with XDP on
//! the load balancer's veth, and `connections` long-lived TCP connections through
//! the VIP, each recording the backend that answered. The weights then move (the
//! lookup table now sends most of those flows elsewhere), and the flood comes: `syns`
//! spoofed SYNs (random sources in 198.18.0.0/15, random ports) run through the
//! agent's own attached program by `BPF_PROG_TEST_RUN` (its pinned program, so the
//! same maps), from one thread per CPU, because each CPU evicts from its own share
//! of an LRU table. Meanwhile the weights change every second and a client opens
//! new connections through the real datapath. After the flood every long-lived connection sends a line: it is broken
//! if it fails or a different backend answers. The datapath's non-SYN misses over
//! the same time are read from `lb status`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use aya::maps::{HashMap, Map, MapData};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use aya_obj::programs::XdpAttachType;
use lb_common::types::{ConnEntry, ConnKeyV4};
use lb_userspace::agent::pin_dir;
use lb_userspace::dataplane::PROGRAM_PIN;

use crate::packet::{TCP_SYN, tcp_frame};
use crate::spread::{Agent, PORT, attach_pass, write_config};
use crate::tcp::{BackendServer, PersistentConn};
use crate::topology::Topology;

/// What a run is asked to do.
#[derive(Clone, Copy, Debug)]
pub struct FloodOptions {
    /// Long-lived connections opened before the flood.
    pub connections: usize,
    /// Spoofed SYNs in the flood.
    pub syns: u64,
    /// The agent's flood guard (`false`: `lb run --no-flood-guard`).
    pub guard: bool,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct FloodReport {
    pub guard: bool,
    pub flood_syns: u64,
    /// Entries of the IPv4 connection table.
    pub table_entries: u32,
    pub connections: usize,
    /// Long-lived connections whose connection-table entry was gone after the
    /// flood (their next packet is a non-SYN miss).
    pub entries_lost: usize,
    /// Long-lived connections that failed, or reached another backend, after the
    /// flood.
    pub established_broken: usize,
    /// The datapath's TCP packets without SYN that found no entry, from the weight
    /// change to the end of the check.
    pub non_syn_misses: u64,
    /// The program's own time per SYN during the flood (the kernel's measure of
    /// each `BPF_PROG_TEST_RUN`), mean over the flood.
    pub syn_ns_per_packet: f64,
    /// Wall-clock seconds the flood took (all threads).
    pub flood_seconds: f64,
    /// Weight changes made during the flood (one a second).
    pub weight_changes: usize,
    /// New connections (connect and one round trip) during the flood.
    pub legit_attempts: usize,
    pub legit_ok: usize,
    /// Floods the agent's watch declared (`lb status`), and whether it said the
    /// flood was over within 10 s of its end. The watch reads the guard's
    /// counters: with the guard off it sees nothing.
    pub flood_episodes: u64,
    pub flood_left: bool,
    /// The flood guard's counters at the end (zero with the guard off).
    pub young: u64,
    pub promoted: u64,
    /// Young-table writes that failed (counted by the datapath; the SYN still went
    /// where the lookup table said).
    pub young_failed: u64,
}

impl FloodReport {
    /// Successful new connections during the flood, as a fraction.
    pub fn legit_connect_success(&self) -> f64 {
        if self.legit_attempts == 0 {
            return 0.0;
        }
        self.legit_ok as f64 / self.legit_attempts as f64
    }
}

/// Runs one flood; see the module's documentation.
pub fn run(options: FloodOptions) -> Result<FloodReport> {
    let topo = Topology::build(3)?;
    let config = write_config(&topo, &[1, 1, 1], "policy = \"static\"")?;
    let _pass = attach_pass(&topo, topo.lb_bridge_port())?;
    let _servers: Vec<BackendServer> = topo
        .backends()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            // The long-lived connections stay idle through the flood, as a
            // keep-alive connection or a pool's would (the LRU keeps entries that
            // are in use); the servers must not close them meanwhile.
            BackendServer::start_with_idle_timeout(
                h.ns(),
                topo.vip(PORT, false),
                &format!("backend{i}"),
                Duration::from_secs(300),
            )
        })
        .collect::<Result<_>>()?;
    let mut extra = vec!["--detach-on-exit"];
    if !options.guard {
        extra.push("--no-flood-guard");
    }
    let agent = Agent::start(&topo, &config, &extra)?;
    let vip = topo.vip(PORT, false);
    let timeout = Duration::from_secs(3);

    let mut conns = Vec::with_capacity(options.connections);
    for _ in 0..options.connections {
        conns.push(PersistentConn::connect(topo.client().ns(), vip, timeout)?);
    }
    // Move the weights: the table now sends most flows to backend 0, so a
    // long-lived flow that lost its entry would mostly reach another backend.
    let first = topo.backend(0).ipv4().to_string();
    agent.ctl(&["weight", "set", &first, "8"])?;
    std::thread::sleep(Duration::from_millis(300));
    let misses_before = non_syn_misses(&agent)?;

    let program = pin_dir(topo.prefix()).join(PROGRAM_PIN);
    let flooding = AtomicBool::new(true);
    let mut set_weight = [
        agent.ctl_command(&["weight", "set", &first, "2"])?,
        agent.ctl_command(&["weight", "set", &first, "8"])?,
    ];
    let ns = topo.client().ns();
    let started = Instant::now();
    let (flood, flood_seconds, (legit_attempts, legit_ok), weight_changes) =
        std::thread::scope(|scope| {
            let legit = scope.spawn(|| {
                let (mut attempts, mut ok) = (0usize, 0usize);
                while flooding.load(Ordering::Relaxed) {
                    attempts += 1;
                    if let Ok((mut conn, _)) = PersistentConn::connect(ns, vip, timeout)
                        && conn.request("hello").is_ok()
                    {
                        ok += 1;
                    }
                }
                (attempts, ok)
            });
            // The weights keep moving through the flood: backend 0 between 8 and 2,
            // every second, so that a new connection whose handshake straddles a
            // change and whose young entry the flood pushed out would break.
            let flooding = &flooding;
            let mover = scope.spawn(move || {
                let mut changes = 0usize;
                while flooding.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_secs(1));
                    let set = &mut set_weight[changes % 2];
                    if set.output().is_ok_and(|out| out.status.success()) {
                        changes += 1;
                    }
                }
                changes
            });
            let flood = flood(&program, options.syns, vip.ip());
            flooding.store(false, Ordering::Relaxed);
            let changes = mover.join().unwrap_or(0);
            let seconds = started.elapsed().as_secs_f64();
            (flood, seconds, legit.join().unwrap_or((0, 0)), changes)
        });
    let (runs, run_ns) = flood?;
    // Checked under the weights most unlike those the connections began with.
    agent.ctl(&["weight", "set", &first, "8"])?;
    std::thread::sleep(Duration::from_millis(300));

    let kept = flows_in_table(&topo, vip.port())?;
    let mut entries_lost = 0;
    for (conn, _) in &conns {
        if !kept.contains(&conn.local_addr()?.port()) {
            entries_lost += 1;
        }
    }
    let mut broken = 0;
    for (conn, backend) in &mut conns {
        match conn.request("after the flood") {
            Ok(answer) if answer == *backend => {}
            _ => broken += 1,
        }
    }
    let non_syn_misses = non_syn_misses(&agent)? - misses_before;
    let at_end = status(&agent)?;
    // The agent's flood watch: it saw the flood, and says it is over once the
    // unanswered new flows have stayed low for its calm period (5 s).
    let flood_episodes = at_end["flood"]["episodes"].as_u64().unwrap_or(0);
    let calm_by = Instant::now() + Duration::from_secs(10);
    let flood_left = loop {
        if status(&agent)?["flood"]["active"] == false {
            break true;
        }
        if Instant::now() >= calm_by {
            break false;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    // The guard's counters as the watch sampled them last: after its calm period,
    // a sample taken after the flood's last SYN (`at_end` may predate it by up to
    // one control interval).
    let last = status(&agent)?;
    let table_entries = table_entries(&topo)?;
    agent.stop()?;
    Ok(FloodReport {
        guard: options.guard,
        flood_syns: runs,
        table_entries,
        connections: options.connections,
        entries_lost,
        established_broken: broken,
        non_syn_misses,
        syn_ns_per_packet: run_ns as f64 / runs.max(1) as f64,
        flood_seconds,
        weight_changes,
        legit_attempts,
        legit_ok,
        flood_episodes,
        flood_left,
        young: last["flood"]["young"].as_u64().unwrap_or(0),
        promoted: last["flood"]["promoted"].as_u64().unwrap_or(0),
        young_failed: last["flood"]["young_failed"].as_u64().unwrap_or(0),
    })
}

/// `syns` spoofed SYNs to `vip` through the pinned program at `program`, split over
/// one thread per CPU, each pinned to its CPU. Returns the runs and the program's
/// total time in ns, as the kernel measured it.
fn flood(program: &Path, syns: u64, vip: IpAddr) -> Result<(u64, u64)> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_cpu = syns.div_ceil(cpus as u64);
    let threads: Vec<_> = (0..cpus)
        .map(|cpu| {
            let program = program.to_owned();
            std::thread::spawn(move || flood_on(cpu, &program, per_cpu, vip))
        })
        .collect();
    let mut total = (0, 0);
    for t in threads {
        let (runs, ns) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a flood thread panicked"))??;
        total = (total.0 + runs, total.1 + ns);
    }
    Ok(total)
}

/// What the balancer returns for a frame it forwards.
const XDP_TX: u32 = 3;

/// Spoofed sources of a flood: addresses in 198.18.0.0/15 and ports 1024-65535 from
/// xorshift32, the same sequence for the same seed.
pub struct SpoofedSources(u32);

impl SpoofedSources {
    pub fn new(seed: u32) -> SpoofedSources {
        SpoofedSources(0x9e37_79b9_u32 ^ seed.wrapping_mul(0x85eb_ca6b) | 1)
    }
}

impl Iterator for SpoofedSources {
    type Item = (Ipv4Addr, u16);

    fn next(&mut self) -> Option<(Ipv4Addr, u16)> {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        let src = Ipv4Addr::new(198, 18 | (x >> 31) as u8, (x >> 8) as u8, x as u8);
        Some((src, ((x >> 16) as u16) | 1024))
    }
}

/// The IPv4 source and TCP source port of the frames `tcp_frame` builds.
const SRC_AT: usize = 14 + 12;
const SPORT_AT: usize = 14 + 20;

fn flood_on(cpu: usize, program: &Path, syns: u64, vip: IpAddr) -> Result<(u64, u64)> {
    crate::pin_to_cpu(cpu)?;
    let prog = Xdp::from_pin(program, XdpAttachType::Interface)
        .with_context(|| format!("opening the agent's program {}", program.display()))?;
    let mut frame = tcp_frame(
        [2, 0, 0, 0, 0, 1],
        [2, 0, 0, 0, 0, 2],
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
        vip,
        1024,
        PORT,
        TCP_SYN,
        b"",
    );
    let (mut runs, mut ns) = (0u64, 0u64);
    for (src, sport) in SpoofedSources::new(cpu as u32).take(syns as usize) {
        frame[SRC_AT..SRC_AT + 4].copy_from_slice(&src.octets());
        frame[SPORT_AT..SPORT_AT + 2].copy_from_slice(&sport.to_be_bytes());
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN of a SYN")?;
        ensure!(
            result.return_value == XDP_TX,
            "a flood SYN was not forwarded (XDP action {})",
            result.return_value
        );
        runs += 1;
        ns += result.duration.as_nanos() as u64;
    }
    Ok((runs, ns))
}

/// Entries of the agent's IPv4 connection table, as created.
fn table_entries(topo: &Topology) -> Result<u32> {
    let path = pin_dir(topo.prefix()).join(lb_common::maps::names::CONNS_V4);
    Ok(aya::maps::MapInfo::from_pin(&path)
        .with_context(|| format!("opening {}", path.display()))?
        .max_entries())
}

/// The client ports of the flows to `vip_port` in the agent's IPv4 connection table.
fn flows_in_table(topo: &Topology, vip_port: u16) -> Result<std::collections::HashSet<u16>> {
    let path = pin_dir(topo.prefix()).join(lb_common::maps::names::CONNS_V4);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let table: HashMap<MapData, ConnKeyV4, ConnEntry> =
        HashMap::try_from(Map::LruHashMap(data)).context("CONNS_V4 as a hash map")?;
    let mut ports = std::collections::HashSet::new();
    for key in table.keys() {
        let key = key.context("reading CONNS_V4")?;
        if u16::from_be(key.dst_port_be) == vip_port {
            ports.insert(u16::from_be(key.src_port_be));
        }
    }
    Ok(ports)
}

fn status(agent: &Agent) -> Result<serde_json::Value> {
    serde_json::from_str(&agent.ctl(&["status", "--json"])?).context("lb status --json")
}

fn non_syn_misses(agent: &Agent) -> Result<u64> {
    status(agent)?["datapath"]["conn_miss_non_syn"]
        .as_u64()
        .context("lb status --json has no datapath.conn_miss_non_syn")
}
