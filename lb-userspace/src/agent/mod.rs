//! The agent's lifetime and control loop: check everything, adopt or load the
//! datapath, attach it, then serve one `tokio::select!` loop — signals, control
//! requests, and a periodic refresh — until told to stop. Called by `lb run`.
//!
//! The datapath is pinned under `/sys/fs/bpf/lb/<instance>/`. A restarted agent
//! adopts what it finds there (maps with their contents, and the link, whose program
//! it replaces atomically), so a restart forwards no packet differently. When the
//! agent stops, the datapath keeps forwarding with the last weights (fail-static),
//! unless `--detach-on-exit` was given or `lb detach` is run.

//!
//! # Layout
//! - this module: the process's lifetime ([`run`]) and its `select!` loop;
//! - `tick`: the control tick (every VIP's control step, then the maps);
//! - `overrides`: operator actions (holds, drain, reload) and request dispatch;
//! - `views`: what `/metrics` and the control socket's read commands show;
//! - `datapath_log`: the datapath's records (`--datapath-log`) into the agent's log;
//! - `fleet`: a fleet member's tick, epochs, fleet holds and `cluster status`.

mod datapath_log;
mod fleet;
mod overrides;
mod tick;
mod views;

use std::{collections::BTreeMap, ffi::CString, net::IpAddr, path::PathBuf, time::Instant};

use aya::programs::XdpMode;
use lb_common::types::{GlobalStats, VipKey};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{info, warn};

use self::overrides::{Override, overrides_of};
pub use self::tick::step_vips;
use self::tick::{Weights, plan, vip_control};
use crate::core::flood::{FloodWatch, Transition};
use crate::{
    config::{Config, ConfigError},
    control,
    core::{BackendId, control::VipControl, policy},
    dataplane::{Dataplane, DataplaneError, LoadOptions},
    desired::{Desired, PlanError, Tables, vip_key},
    signals::Signals,
};

/// Why the agent could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("interface name {0:?} has a NUL byte")]
    InterfaceName(String),
    #[error("interface {0:?} does not exist (see `ip link`)")]
    NoInterface(String),
    #[error("installing the signal handlers")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Socket(#[from] control::BindError),
    #[error("binding the metrics endpoint {addr}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the datapath pinned at {}", dir.display())]
    Load {
        dir: PathBuf,
        #[source]
        source: Box<DataplaneError>,
    },
    #[error("filling the datapath's maps")]
    Fill(#[source] Box<DataplaneError>),
    #[error(transparent)]
    Dataplane(Box<DataplaneError>),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("nothing is pinned for instance {instance:?} (no {})", dir.display())]
    NothingPinned { instance: String, dir: PathBuf },
    #[error("reading the datapath's log")]
    DatapathLog(#[source] std::io::Error),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("starting the etcd session's thread")]
    Session(#[source] std::io::Error),
    #[error(
        "[cluster] share_listen gives only a port, and interface {iface:?} has no IPv4 or \
         global IPv6 address to listen on: give the address too"
    )]
    ShareNoAddress { iface: String },
    #[error("reading the addresses of interface {iface:?} for [cluster] share_listen")]
    ShareInterface {
        iface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("binding the flow-sharing address {addr} ([cluster] share_listen)")]
    ShareListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl From<DataplaneError> for AgentError {
    fn from(e: DataplaneError) -> AgentError {
        AgentError::Dataplane(Box::new(e))
    }
}

/// Where an instance keeps its pins.
pub fn pin_dir(instance: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf/lb").join(instance)
}

/// What `lb run` was asked to do.
pub struct RunOptions {
    /// Interface the balancer attaches to.
    pub iface: String,
    /// The configuration file.
    pub config: PathBuf,
    /// How XDP is attached.
    pub mode: XdpMode,
    /// Names the pin directory and the control socket.
    pub instance: String,
    /// The control socket.
    pub socket: PathBuf,
    /// Detach and remove the pins on exit instead of staying fail-static.
    pub detach_on_exit: bool,
    /// Where `/metrics` is served (Prometheus); `None` turns it off.
    pub metrics: Option<std::net::SocketAddr>,
    /// The datapath's rare events at this level and above go to the log (target
    /// `lb::datapath`); `Off` removes them from the program when it is loaded.
    pub datapath_log: log::LevelFilter,
    /// New flows wait in the young tables until their second packet, so that a
    /// flood of spoofed SYNs cannot evict established flows (on unless
    /// `--no-flood-guard`).
    pub flood_guard: bool,
    /// Unanswered new flows per second from which `status`, `/metrics` and the
    /// log report a flood (see [`crate::core::flood`]).
    pub flood_threshold: f64,
}

/// The agent's state; the control loop owns it and nothing else touches it.
struct Agent {
    opts: RunOptions,
    /// The configuration in force (the last one that applied).
    config: Config,
    /// What the maps hold (the shadow is inside the dataplane; this is the plan).
    desired: Desired,
    dataplane: Dataplane,
    /// Operator overrides by (VIP, backend address), in configured weight units.
    overrides: BTreeMap<(VipKey, IpAddr), Override>,
    /// Each VIP's policy state and last decisions.
    control: BTreeMap<VipKey, VipControl>,
    /// Datapath counters per backend id at the last control tick, for rates.
    last_counters: BTreeMap<u32, (Instant, lb_common::types::BackendStats)>,
    /// Probes, scrapes and load models of every backend.
    signals: Signals,
    started: Instant,
    /// Outcome of the last reload, for `status`.
    last_reload: Option<(Instant, Result<(), String>)>,
    /// The fleet this LB is a member of (`[cluster]`), if any.
    fleet: Option<fleet::Fleet>,
    /// Whether a flood of new flows is on, from the flood guard's counters.
    flood: FloodWatch,
    /// The last walk of the NAT tables (when a VIP forwards by `nat`).
    nat_usage: Option<(Instant, crate::dataplane::NatUsage)>,
    /// NAT entries removed as idle since the agent started.
    nat_expired: u64,
}

impl Agent {
    /// Walks the NAT tables when a VIP forwards by `nat` and the last walk is older
    /// than [`crate::api::NAT_USAGE_PERIOD`]: removes the entries idle for longer
    /// than `[nat]`'s timeouts, and counts the rest for `status` and `/metrics`. A
    /// failed walk keeps the last one (its age shows it).
    fn walk_nat_tables(&mut self) {
        let nat = self.config.uses_nat();
        let due = self
            .nat_usage
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= crate::api::NAT_USAGE_PERIOD);
        if !nat || !due {
            return;
        }
        let timeouts = crate::dataplane::NatTimeouts::of_config(&self.config.nat);
        match self
            .dataplane
            .nat_sweep(crate::dataplane::nat_now(), &timeouts)
        {
            Ok(usage) => {
                self.nat_expired += usage.expired;
                self.nat_usage = Some((Instant::now(), usage));
            }
            Err(e) => warn!("walking the NAT tables failed: {e}"),
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM. Everything that can fail is done before
/// the datapath is touched or `ready` is printed: the configuration, the interface,
/// the control socket, the metrics listener and the signal handlers first, then the
/// datapath (loaded, filled, attached). A failure leaves nothing behind: no socket,
/// and no pins or attachment unless it adopted an earlier agent's datapath.
pub async fn run(opts: RunOptions) -> Result<(), AgentError> {
    let config = Config::load(&opts.config)?;
    check_interface(&opts.iface)?;
    if let Some(cluster) = &config.cluster {
        crate::cluster::etcd::check_tls(cluster)?;
    }
    let held = Held::take(&opts).await?;
    // Bound before the datapath is touched, as the other listeners.
    let share_listener = config
        .cluster
        .as_ref()
        .and_then(|c| c.share_listen)
        .map(|listen| {
            let addr = share_address(listen, &opts.iface)?;
            std::net::TcpListener::bind(addr)
                .map(|l| (addr, l))
                .map_err(|source| AgentError::ShareListen { addr, source })
        })
        .transpose()?;
    let mut started = start(&opts, &config)?;
    for vip in &config.vips {
        let weights: Vec<String> = vip
            .backends
            .iter()
            .map(|b| format!("{}={}", b.address, b.weight))
            .collect();
        info!("VIP {vip}: backends {}", weights.join(" "));
    }
    info!(
        "attached to {} in {:?} mode; serving {} VIP(s); control socket {}",
        opts.iface,
        opts.mode,
        config.vips.len(),
        opts.socket.display()
    );
    println!("lb: ready on {}", opts.iface);
    let signals = Signals::start(&config);
    let mut fleet = config
        .cluster
        .clone()
        .map(fleet::Fleet::start)
        .transpose()?;
    if let (Some(fleet), Some((addr, listener))) = (&mut fleet, share_listener) {
        fleet.start_sharing(addr, listener, &mut started.dataplane, &started.desired)?;
    }
    let agent = Agent {
        flood: FloodWatch::new(opts.flood_threshold),
        nat_usage: None,
        nat_expired: 0,
        opts,
        config,
        desired: started.desired,
        dataplane: started.dataplane,
        overrides: started.overrides,
        signals,
        control: started.control,
        last_counters: BTreeMap::new(),
        started: Instant::now(),
        last_reload: None,
        fleet,
    };
    serve(agent, held).await
}

/// What the agent holds before it touches the datapath.
struct Held {
    listener: tokio::net::UnixListener,
    /// Removes the control socket when the agent stops or fails to start.
    socket: SocketFile,
    metrics: Option<(std::net::SocketAddr, tokio::net::TcpListener)>,
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Held {
    /// Subscribes to signals (before anything is attached, so that none is missed),
    /// binds the control socket (refused if another agent answers on it) and the
    /// metrics listener.
    async fn take(opts: &RunOptions) -> Result<Held, AgentError> {
        let interrupt = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
        let terminate = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
        let hangup = signal(SignalKind::hangup()).map_err(AgentError::Signals)?;
        let listener = control::bind(&opts.socket).map_err(AgentError::Socket)?;
        let socket = SocketFile(opts.socket.clone());
        let metrics = match opts.metrics {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| AgentError::Metrics { addr, source })?;
                Some((addr, listener))
            }
            None => None,
        };
        Ok(Held {
            listener,
            socket,
            metrics,
            interrupt,
            terminate,
            hangup,
        })
    }
}

/// A control socket's path, removed when dropped.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The datapath, attached, and the state it was filled from.
struct Started {
    dataplane: Dataplane,
    desired: Desired,
    overrides: BTreeMap<(VipKey, IpAddr), Override>,
    control: BTreeMap<VipKey, VipControl>,
}

/// Loads (or adopts) the pinned datapath, fills its maps and attaches it. If it
/// fails on a datapath it created, its pins go (which detaches it); an adopted one
/// is left to the agent that made it.
fn start(opts: &RunOptions, config: &Config) -> Result<Started, AgentError> {
    let dir = pin_dir(&opts.instance);
    let adopting = crate::dataplane::is_pinned(&dir);
    let result = load_fill_attach(opts, config, &dir);
    if result.is_err()
        && !adopting
        && let Err(e) = crate::dataplane::remove_pins(&dir)
    {
        warn!(
            "removing the pins of the failed start at {}: {e}",
            dir.display()
        );
    }
    result
}

fn load_fill_attach(
    opts: &RunOptions,
    config: &Config,
    dir: &std::path::Path,
) -> Result<Started, AgentError> {
    let share_flows = config
        .cluster
        .as_ref()
        .is_some_and(|c| c.share_listen.is_some());
    let options = LoadOptions {
        log: opts.datapath_log,
        share_flows,
        flood_guard: opts.flood_guard,
        sizes: config.datapath_sizes(),
    };
    let (mut dataplane, adopted) =
        Dataplane::load_pinned_with(dir, options).map_err(|source| AgentError::Load {
            dir: dir.to_owned(),
            source: Box::new(source),
        })?;
    if opts.datapath_log != log::LevelFilter::Off {
        datapath_log::start_reader(&mut dataplane)?;
    }
    if adopted {
        warn_kept_sizes(&dataplane, config);
    }
    let previous = adopted.then(|| dataplane.current());
    let overrides = previous
        .as_ref()
        .map(|p| overrides_of(p, config))
        .unwrap_or_default();
    let mut control: BTreeMap<VipKey, VipControl> = config
        .vips
        .iter()
        .map(|v| (vip_key(v), vip_control(v, &config.control)))
        .collect();
    if let Some(previous) = &previous {
        resume(config, previous, &overrides, &mut control);
    }
    let desired = plan(
        config,
        previous.as_ref(),
        Weights::Local(&overrides),
        &control,
        &Tables::new(),
    )?;
    let report = dataplane
        .apply(&desired)
        .map_err(|e| AgentError::Fill(Box::new(e)))?;
    if adopted {
        info!(
            "adopted the datapath pinned at {} ({} table slots and {} entries differed)",
            dir.display(),
            report.slots_written,
            report.entries_changed
        );
    }
    dataplane.attach(&opts.iface, opts.mode)?;
    Ok(Started {
        dataplane,
        desired,
        overrides,
        control,
    })
}

/// Continues each VIP's policy from the weights an earlier agent left in force
/// (`previous`, read back from the pinned `BACKENDS`): the policy's state, which
/// lives in that agent's memory only, is rebuilt from them
/// ([`policy::State::resumed`]), so the first step keeps them and the filters start
/// from what was learned rather than from the first interval's figures. Backends
/// under an operator hold (`overrides`, from the same record) keep the hold; a
/// backend new to the configuration starts from its configured weight.
fn resume(
    config: &Config,
    previous: &Desired,
    overrides: &BTreeMap<(VipKey, IpAddr), Override>,
    control: &mut BTreeMap<VipKey, VipControl>,
) {
    let ids: BTreeMap<(VipKey, IpAddr), (u32, u32)> = previous
        .backends
        .iter()
        .map(|(&id, b)| ((b.vip, b.address), (id, b.weight)))
        .collect();
    for vip in &config.vips {
        let key = vip_key(vip);
        let Some(c) = control.get_mut(&key) else {
            continue;
        };
        let free: Vec<(BackendId, u32)> = vip
            .backends
            .iter()
            .filter(|b| !overrides.contains_key(&(key, b.address)))
            .filter_map(|b| ids.get(&(key, b.address)))
            .map(|&(id, weight)| (BackendId(id), weight))
            .collect();
        c.state = policy::State::resumed(c.kind, &free);
    }
}

/// The control loop: signals, control requests, the metrics refresh, the control
/// tick and health changes, until SIGINT or SIGTERM; then the datapath stays
/// (fail-static) or goes (`--detach-on-exit`).
async fn serve(mut agent: Agent, held: Held) -> Result<(), AgentError> {
    let Held {
        listener,
        socket,
        metrics,
        mut interrupt,
        mut terminate,
        mut hangup,
    } = held;
    let interval = std::time::Duration::from_millis(agent.config.control.interval_ms);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (tx, mut requests) = mpsc::channel(16);
    let server = tokio::spawn(control::serve(listener, tx));
    let (metrics_tx, metrics_rx) = tokio::sync::watch::channel(agent.metrics_snapshot());
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some((addr, listener)) = metrics {
        info!("metrics on http://{addr}/metrics");
        tokio::spawn(crate::metrics::serve(listener, metrics_rx, async {
            let _ = metrics_stopped.await;
        }));
    }
    let mut refresh = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut fleet_state = agent.fleet.as_ref().map(|f| f.session.state.clone());
    let why = loop {
        tokio::select! {
            _ = interrupt.recv() => break "SIGINT",
            _ = terminate.recv() => break "SIGTERM",
            _ = hangup.recv() => {
                match agent.reload() {
                    Ok(()) => info!("SIGHUP: configuration reloaded"),
                    Err(e) => warn!(error = %crate::api::error_text(&e), "SIGHUP: reload refused, nothing changed"),
                }
            }
            Some((request, reply)) = requests.recv() => {
                match agent.fleet_request(request) {
                    // A fleet hold: the reply waits for etcd, the loop does not.
                    Ok(pending) => {
                        tokio::spawn(async move {
                            let _ = reply.send(pending.await);
                        });
                    }
                    Err(request) => {
                        let _ = reply.send(agent.handle(request));
                    }
                }
            }
            alive = fleet_changed(&mut fleet_state) => {
                if alive {
                    agent.on_fleet_change();
                    agent.update_readiness();
                } else {
                    fleet_state = None;
                }
            }
            _ = refresh.tick() => {
                agent.update_readiness();
                agent.walk_nat_tables();
                let _ = metrics_tx.send(agent.metrics_snapshot());
            }
            _ = until(agent.dataplane.retry_at()), if agent.dataplane.retry_at().is_some() => {
                // A table switch waited for its copy's grace: finish it now.
                let desired = agent.desired.clone();
                if let Err(e) = agent.dataplane.apply(&desired) {
                    warn!(error = %crate::api::error_text(&e), "finishing a deferred table switch");
                }
                agent.switched();
            }
            _ = tick.tick() => {
                if let Err(e) = agent.control_tick(true) {
                    warn!(error = %crate::api::error_text(&e), "control tick: weights unchanged");
                }
                agent.watch_flood();
            }
            changed = agent.signals.next() => {
                // A backend's health changed: act now, not at the next tick.
                if let Some(key) = changed {
                    let healthy = agent.signals.readings.get(&key).is_none_or(|r| r.healthy);
                    let vip = agent.desired.vips.get(&key.0).map_or("?", |v| v.name.as_str());
                    info!(
                        backend = %key.1,
                        vip,
                        healthy,
                        "backend {} of VIP {vip} is now {}",
                        key.1,
                        if healthy { "healthy" } else { "unhealthy: weight 0" }
                    );
                    if let Err(e) = agent.control_tick(false) {
                        warn!(error = %crate::api::error_text(&e), "health change: weights unchanged");
                    }
                }
            }
        }
    };
    server.abort();
    let _ = stop_metrics.send(());
    if let Some(fleet) = agent.fleet.take() {
        // Give the lease back: another LB leads at once if this one led.
        fleet.session.stop(std::time::Duration::from_secs(1));
    }
    drop(socket);
    let stats = agent.dataplane.global_stats()?;
    info!("{why}: {}", summary(&stats));
    if agent.opts.detach_on_exit {
        agent.dataplane.detach()?;
        info!("detached from {} and removed the pins", agent.opts.iface);
    } else {
        info!(
            "left attached (fail-static): `lb detach --instance {}` removes it",
            agent.opts.instance
        );
    }
    Ok(())
}

/// Waits until the fleet's state changes (forever outside a fleet); false when the
/// session is gone for good.
async fn fleet_changed(
    state: &mut Option<tokio::sync::watch::Receiver<crate::cluster::session::FleetState>>,
) -> bool {
    match state {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Sleeps until `at` (forever without one: the `select!` arm is disabled then).
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl Agent {
    /// Reads the flood guard's counters and logs a flood's start and end.
    fn watch_flood(&mut self) {
        let Ok(stats) = self.dataplane.guard_stats() else {
            return;
        };
        match self.flood.observe(Instant::now(), stats) {
            // Only the guard counts young flows: with it off, no flood is entered.
            Some(Transition::Entered { unanswered_per_s }) => warn!(
                "flood: {unanswered_per_s:.0} new flows per second never sent a second packet \
                 (threshold {:.0}); the flood guard keeps them out of the connection table",
                self.flood.threshold_per_s(),
            ),
            Some(Transition::Left { lasted, unanswered }) => info!(
                "flood over after {:.1} s: {unanswered} new flows never answered",
                lasted.as_secs_f64()
            ),
            None => {}
        }
    }
}

/// An adopted datapath keeps the connection tables and lookup tables it has, with
/// the flows in them: says so when `[datapath]` asks for other sizes.
fn warn_kept_sizes(dataplane: &Dataplane, config: &Config) {
    use lb_common::maps::{names, rings_vips};
    let sizes = &config.datapath_sizes();
    let entries = |map: &str| {
        dataplane
            .map_memory()
            .iter()
            .find(|m| m.name == map)
            .map(|m| m.max_entries)
    };
    // (field, map, configured, what the adopted map has room for)
    let kept = [
        (
            "connection_table_v4",
            names::CONNS_V4,
            sizes.connection_table_v4,
            entries(names::CONNS_V4),
        ),
        (
            "connection_table_v6",
            names::CONNS_V6,
            sizes.connection_table_v6,
            entries(names::CONNS_V6),
        ),
        (
            "nat_table_v4",
            names::NAT_V4,
            sizes.nat_table_v4,
            entries(names::NAT_V4),
        ),
        (
            "nat_table_v6",
            names::NAT_V6,
            sizes.nat_table_v6,
            entries(names::NAT_V6),
        ),
        (
            "max_vips",
            names::RINGS,
            sizes.max_vips,
            entries(names::RINGS).map(rings_vips),
        ),
    ];
    for (field, map, configured, adopted) in kept {
        if let Some(adopted) = adopted
            && adopted != configured
        {
            warn!(
                "datapath.{field} = {configured}, but the adopted {map} has room for \
                 {adopted}: it is kept, with its flows. To resize it, stop the agent, \
                 `lb detach`, and start again (every established flow then loses its entry)"
            );
        }
    }
}

fn summary(s: &GlobalStats) -> String {
    format!(
        "frames {} forwarded {} passed-not-vip {} conn hits {} new {} non-SYN misses {}",
        s.rx_frames, s.tx, s.pass_not_vip, s.conn_hit, s.conn_miss_syn, s.conn_miss_non_syn
    )
}

/// Fails unless `iface` names an interface of this network namespace.
fn check_interface(iface: &str) -> Result<u32, AgentError> {
    let name = CString::new(iface).map_err(|_| AgentError::InterfaceName(iface.to_owned()))?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(AgentError::NoInterface(iface.to_owned()));
    }
    Ok(index)
}

/// The address flow sharing listens on: as configured, or for a port alone, the
/// first IPv4 address of `iface` (the interface the agent attaches to), else its
/// first IPv6 address that is not link-local.
fn share_address(
    listen: crate::config::ShareListen,
    iface: &str,
) -> Result<std::net::SocketAddr, AgentError> {
    let port = match listen {
        crate::config::ShareListen::Address(addr) => return Ok(addr),
        crate::config::ShareListen::Port(port) => port,
    };
    let addresses = interface_addresses(iface).map_err(|source| AgentError::ShareInterface {
        iface: iface.to_owned(),
        source,
    })?;
    let v4 = addresses.iter().find(|a| a.is_ipv4());
    let v6 = addresses
        .iter()
        .find(|a| matches!(a, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) != 0xfe80));
    v4.or(v6)
        .map(|&ip| std::net::SocketAddr::new(ip, port))
        .ok_or_else(|| AgentError::ShareNoAddress {
            iface: iface.to_owned(),
        })
}

/// Every address of interface `iface`, in the order the kernel lists them.
fn interface_addresses(iface: &str) -> std::io::Result<Vec<IpAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `list` is a valid place for the result; freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: a node of the list getifaddrs returned, valid until freeifaddrs;
        // its name is a NUL-terminated string, its address (when not null) a
        // sockaddr of the family it says, which selects the cast.
        unsafe {
            let ifa = &*cursor;
            let name = std::ffi::CStr::from_ptr(ifa.ifa_name);
            if name.to_bytes() == iface.as_bytes() && !ifa.ifa_addr.is_null() {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                        out.push(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cursor = ifa.ifa_next;
        }
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

/// `lb detach`: removes an instance's pins, which detaches its program.
pub fn detach(instance: &str) -> Result<(), AgentError> {
    let dir = pin_dir(instance);
    if !dir.exists() {
        return Err(AgentError::NothingPinned {
            instance: instance.to_owned(),
            dir,
        });
    }
    crate::dataplane::remove_pins(&dir)?;
    Ok(())
}
