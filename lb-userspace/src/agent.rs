//! The agent's lifetime and control loop: check everything, adopt or load the
//! datapath, attach it, then serve one `tokio::select!` loop — signals, control
//! requests, and a periodic refresh — until told to stop. Called by `lb run`.
//!
//! The datapath is pinned under `/sys/fs/bpf/lb/<instance>/`. A restarted agent
//! adopts what it finds there (maps with their contents, and the link, whose program
//! it replaces atomically), so a restart forwards no packet differently. When the
//! agent stops, the datapath keeps forwarding with the last weights (fail-static),
//! unless `--detach-on-exit` was given or `lb detach` is run.

use std::{collections::BTreeMap, ffi::CString, net::IpAddr, path::PathBuf, time::Instant};

use anyhow::{Context, bail};
use aya::programs::XdpMode;
use lb_common::types::{BACKEND_F_DRAINED, BACKEND_F_PINNED, BACKEND_F_SET, GlobalStats, VipKey};
use log::{info, warn};
use serde_json::json;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    api::{BackendView, Request, Response},
    config::{Backend, Config, MAX_WEIGHT, Vip},
    control,
    core::{
        BackendId,
        control::{Backends, Observation, VipControl},
        policy::{self, Input},
    },
    dataplane::Dataplane,
    desired::{Desired, Tables, addr_bytes, vip_key},
    signals::Signals,
};

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
}

/// An operator's hold on one backend's weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Override {
    /// `weight set`: until `auto` or the next reload.
    Set(u32),
    /// `weight pin`: until `auto`, across reloads.
    Pin(u32),
    /// `drain`: weight 0 until `undrain` or `auto`.
    Drain,
}

/// A VIP's control step as `config` sets it up, with no state yet.
fn vip_control(vip: &Vip, control: &crate::config::Control) -> VipControl {
    let configured: Vec<u32> = vip.backends.iter().map(|b| b.weight).collect();
    VipControl::new(vip.policy, control.params_for(&configured))
}

/// Policy units per configured weight unit for `vip` (see `policy::unit`).
fn unit(vip: &Vip) -> u32 {
    policy::unit(&vip.backends.iter().map(|b| b.weight).collect::<Vec<_>>())
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
}

/// Runs the agent until SIGINT or SIGTERM. Nothing is attached unless the config,
/// the interface and the program are all good.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let config = Config::load(&opts.config)?;
    check_interface(&opts.iface)?;
    let dir = pin_dir(&opts.instance);
    let (mut dataplane, adopted) = Dataplane::load_pinned(&dir)
        .with_context(|| format!("loading the datapath pinned at {}", dir.display()))?;
    let previous = adopted.then(|| dataplane.current());
    let overrides = previous
        .as_ref()
        .map(|p| overrides_of(p, &config))
        .unwrap_or_default();
    let mut control: BTreeMap<VipKey, VipControl> = config
        .vips
        .iter()
        .map(|v| (vip_key(v), vip_control(v, &config.control)))
        .collect();
    // Continue from the weights an earlier agent left in force.
    if let Some(previous) = &previous {
        for (&id, b) in &previous.backends {
            if let Some(c) = control.get_mut(&b.vip) {
                c.state.weights.insert(BackendId(id), b.weight);
            }
        }
    }
    let desired = plan(
        &config,
        previous.as_ref(),
        &overrides,
        &control,
        &Tables::new(),
    )?;
    let report = dataplane
        .apply(&desired)
        .context("filling the datapath's maps")?;
    if adopted {
        info!(
            "adopted the datapath pinned at {} ({} table slots and {} entries differed)",
            dir.display(),
            report.slots_written,
            report.entries_changed
        );
    }
    // Subscribe before attaching, so that no signal after the attach is missed.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    dataplane.attach(&opts.iface, opts.mode)?;
    let listener = control::bind(&opts.socket)?;
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

    let interval = std::time::Duration::from_millis(config.control.interval_ms);
    let signals = Signals::start(&config);
    let mut agent = Agent {
        opts,
        config,
        desired,
        dataplane,
        overrides,
        signals,
        control,
        last_counters: BTreeMap::new(),
        started: Instant::now(),
        last_reload: None,
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (tx, mut requests) = mpsc::channel(16);
    let server = tokio::spawn(control::serve(listener, tx));
    let (metrics_tx, metrics_rx) = tokio::sync::watch::channel(agent.metrics_snapshot());
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = agent.opts.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics endpoint {addr}"))?;
        info!("metrics on http://{addr}/metrics");
        tokio::spawn(crate::metrics::serve(listener, metrics_rx, async {
            let _ = metrics_stopped.await;
        }));
    }
    let mut refresh = tokio::time::interval(std::time::Duration::from_secs(1));
    let why = loop {
        tokio::select! {
            _ = interrupt.recv() => break "SIGINT",
            _ = terminate.recv() => break "SIGTERM",
            _ = hangup.recv() => {
                match agent.reload() {
                    Ok(()) => info!("SIGHUP: configuration reloaded"),
                    Err(e) => warn!("SIGHUP: reload refused, nothing changed: {e:#}"),
                }
            }
            Some((request, reply)) = requests.recv() => {
                let response = agent.handle(request);
                let _ = reply.send(response);
            }
            _ = refresh.tick() => {
                let _ = metrics_tx.send(agent.metrics_snapshot());
            }
            _ = tick.tick() => {
                if let Err(e) = agent.control_tick(true) {
                    warn!("control tick: weights unchanged: {e:#}");
                }
            }
            changed = agent.signals.next() => {
                // A backend's health changed: act now, not at the next tick.
                if let Some((_, backend)) = changed {
                    info!("backend {backend} is now {}", if agent.signals.readings.values().any(|r| !r.healthy) { "part of a change (see lb status)" } else { "healthy" });
                    if let Err(e) = agent.control_tick(false) {
                        warn!("health change: weights unchanged: {e:#}");
                    }
                }
            }
        }
    };
    server.abort();
    let _ = stop_metrics.send(());
    let _ = std::fs::remove_file(&agent.opts.socket);
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

fn summary(s: &GlobalStats) -> String {
    format!(
        "frames {} forwarded {} passed-not-vip {} conn hits {} new {} non-SYN misses {}",
        s.rx_frames, s.tx, s.pass_not_vip, s.conn_hit, s.conn_miss_syn, s.conn_miss_non_syn
    )
}

/// The desired state for `config`: operator holds first, then each VIP's policy
/// weights (configured weights until the policy has run). Weights are in policy
/// units; holds are converted from configured units.
fn plan(
    config: &Config,
    previous: Option<&Desired>,
    overrides: &BTreeMap<(VipKey, IpAddr), Override>,
    control: &BTreeMap<VipKey, VipControl>,
    tables: &Tables,
) -> anyhow::Result<Desired> {
    Ok(Desired::plan(
        config,
        previous,
        &|vip: &Vip, b: &Backend, id: BackendId| {
            let key = vip_key(vip);
            let control = control.get(&key);
            let unit = control.map_or_else(|| unit(vip), |c| c.params.unit);
            match overrides.get(&(key, b.address)) {
                Some(Override::Set(w)) => (w.saturating_mul(unit), BACKEND_F_SET),
                Some(Override::Pin(w)) => (w.saturating_mul(unit), BACKEND_F_PINNED),
                Some(Override::Drain) => (0, BACKEND_F_DRAINED),
                None => {
                    let policy = control.and_then(|c| c.state.weights.get(&id));
                    (policy.copied().unwrap_or(b.weight.saturating_mul(unit)), 0)
                }
            }
        },
        tables,
    )?)
}

/// The overrides an earlier agent recorded in the pinned backend entries (their
/// weights are in policy units; holds are kept in configured units).
fn overrides_of(previous: &Desired, config: &Config) -> BTreeMap<(VipKey, IpAddr), Override> {
    let units: BTreeMap<VipKey, u32> = config.vips.iter().map(|v| (vip_key(v), unit(v))).collect();
    previous
        .backends
        .values()
        .filter_map(|b| {
            let unit = units.get(&b.vip).copied().unwrap_or(1);
            let o = if b.entry.flags & BACKEND_F_DRAINED != 0 {
                Override::Drain
            } else if b.entry.flags & BACKEND_F_PINNED != 0 {
                Override::Pin(b.weight / unit)
            } else if b.entry.flags & BACKEND_F_SET != 0 {
                Override::Set(b.weight / unit)
            } else {
                return None;
            };
            Some(((b.vip, b.address), o))
        })
        .collect()
}

impl Agent {
    fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Status => Ok(self.status()),
            Request::VipList => Ok(self.vip_list()),
            Request::BackendList => Ok(json!(self.backend_views())),
            Request::Stats => self.stats(),
            Request::Explain => Ok(self.explain()),
            Request::Tables => self.tables(),
            Request::Reload => self.reload().map(|()| json!({"reloaded": true})),
            Request::WeightSet {
                backend,
                vip,
                weight,
            } => self.override_weight(backend, vip, Some(Override::Set(weight))),
            Request::WeightPin {
                backend,
                vip,
                weight,
            } => self.override_weight(backend, vip, Some(Override::Pin(weight))),
            Request::WeightAuto { backend, vip } => self.override_weight(backend, vip, None),
            Request::Drain { backend, vip } => {
                self.override_weight(backend, vip, Some(Override::Drain))
            }
            Request::Undrain { backend, vip } => match self.find(backend, vip.as_deref()) {
                Ok(key) if self.overrides.get(&key) == Some(&Override::Drain) => self
                    .change_overrides(|o| {
                        o.remove(&key);
                    }),
                Ok(_) => Err(anyhow::anyhow!("backend {backend} is not drained")),
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(value) => Response::ok(value),
            Err(e) => Response::error(format!("{e:#}")),
        }
    }

    /// The (VIP, address) a request names; the VIP may be left out when the address
    /// serves only one.
    fn find(&self, backend: IpAddr, vip: Option<&str>) -> anyhow::Result<(VipKey, IpAddr)> {
        let serving: Vec<&Vip> = self
            .config
            .vips
            .iter()
            .filter(|v| v.backends.iter().any(|b| b.address == backend))
            .collect();
        match (vip, serving.as_slice()) {
            (_, []) => bail!("{backend} is not a backend of any VIP"),
            (None, [one]) => Ok((vip_key(one), backend)),
            (None, many) => bail!(
                "{backend} serves {} VIPs; name one with --vip ({})",
                many.len(),
                many.iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            (Some(name), many) => match many.iter().find(|v| v.to_string() == name) {
                Some(v) => Ok((vip_key(v), backend)),
                None => bail!(
                    "{backend} is not a backend of VIP {name:?}; it serves {}",
                    many.iter()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
        }
    }

    fn override_weight(
        &mut self,
        backend: IpAddr,
        vip: Option<String>,
        o: Option<Override>,
    ) -> anyhow::Result<serde_json::Value> {
        if let Some(Override::Set(w) | Override::Pin(w)) = o
            && w > MAX_WEIGHT
        {
            bail!("weight {w} is above {MAX_WEIGHT}");
        }
        let key = self.find(backend, vip.as_deref())?;
        self.change_overrides(|overrides| match o {
            Some(o) => {
                overrides.insert(key, o);
            }
            None => {
                overrides.remove(&key);
            }
        })
    }

    /// Applies a change of overrides completely, or not at all: the new plan is
    /// computed (and refused if a VIP would be left without weight) before anything
    /// is written.
    fn change_overrides(
        &mut self,
        change: impl FnOnce(&mut BTreeMap<(VipKey, IpAddr), Override>),
    ) -> anyhow::Result<serde_json::Value> {
        let mut overrides = self.overrides.clone();
        change(&mut overrides);
        let desired = plan(
            &self.config,
            Some(&self.desired),
            &overrides,
            &self.control,
            &Tables::new(),
        )?;
        let report = self.dataplane.apply(&desired)?;
        self.overrides = overrides;
        self.desired = desired;
        Ok(json!({
            "slots_written": report.slots_written,
            "tables_switched": report.tables_switched,
        }))
    }

    /// Re-reads the configuration file: validated completely, then applied, or
    /// refused with nothing changed. `weight set` holds end here; pins stay.
    fn reload(&mut self) -> anyhow::Result<()> {
        let result = (|| {
            let config = Config::load(&self.opts.config)?;
            let mut overrides = self.overrides.clone();
            overrides.retain(|_, o| !matches!(o, Override::Set(_)));
            // Policies restart from the configured weights of the new file, except
            // for VIPs whose policy and backends did not change.
            let mut control: BTreeMap<VipKey, VipControl> = BTreeMap::new();
            for vip in &config.vips {
                let key = vip_key(vip);
                let mut fresh = vip_control(vip, &config.control);
                let same = self
                    .config
                    .vips
                    .iter()
                    .find(|v| vip_key(v) == key)
                    .is_some_and(|old| old.policy == vip.policy && old.backends == vip.backends);
                if same && let Some(old) = self.control.get(&key) {
                    fresh.state = old.state.clone();
                    fresh.decisions = old.decisions.clone();
                }
                control.insert(key, fresh);
            }
            let desired = plan(
                &config,
                Some(&self.desired),
                &overrides,
                &control,
                &Tables::new(),
            )?;
            self.dataplane.apply(&desired)?;
            if config.vips != self.config.vips || config.control != self.config.control {
                self.signals = Signals::start(&config);
            }
            self.config = config;
            self.overrides = overrides;
            self.control = control;
            self.desired = desired;
            Ok(())
        })();
        self.last_reload = Some((
            Instant::now(),
            result
                .as_ref()
                .map(|_| ())
                .map_err(|e: &anyhow::Error| format!("{e:#}")),
        ));
        result
    }

    /// One control interval: every VIP's policy runs on what is known about its
    /// backends; the maps change only if some weight did.
    fn control_tick(&mut self, observe: bool) -> anyhow::Result<()> {
        let now = Instant::now();
        let mut qps: BTreeMap<u32, f64> = BTreeMap::new();
        let mut flows_by_key = BTreeMap::new();
        if observe {
            for (&id, d) in &self.desired.backends {
                let stats = self.dataplane.backend_stats(id)?;
                if let Some((at, last)) = self.last_counters.get(&id) {
                    let secs = now.duration_since(*at).as_secs_f64();
                    if secs > 0.0 && stats.new_flows >= last.new_flows {
                        let rate = (stats.new_flows - last.new_flows) as f64 / secs;
                        qps.insert(id, rate);
                        flows_by_key.insert((d.vip, d.address), rate);
                    }
                }
                self.last_counters.insert(id, (now, stats));
            }
            self.signals.observe(&flows_by_key);
        }
        let mut changed = false;
        let mut tables = Tables::new();
        for vip in &self.config.vips {
            let key = vip_key(vip);
            let (Some(in_force), Some(control)) =
                (self.desired.vips.get(&key), self.control.get_mut(&key))
            else {
                continue;
            };
            let unit = control.params.unit;
            let inputs: Vec<Input> = vip
                .backends
                .iter()
                .zip(&in_force.ids)
                .map(|(b, &id)| {
                    let reading = self.signals.readings.get(&(key, b.address));
                    let sample = reading.and_then(|r| r.sample.as_ref());
                    let seen = Observation {
                        qps: sample
                            .and_then(|s| s.requests_per_s)
                            .or_else(|| qps.get(&id).copied()),
                        utilisation: sample.and_then(|s| s.cpu),
                        errors_per_s: sample.and_then(|s| s.errors_per_s),
                        latency_s: reading.and_then(|r| r.latency_s()),
                        in_flight: sample.and_then(|s| s.in_flight),
                    };
                    let forecast = reading.and_then(|r| r.forecast.as_ref());
                    Input {
                        healthy: reading.is_none_or(|r| r.healthy),
                        hold: self.overrides.get(&(key, b.address)).map(|o| match o {
                            Override::Set(w) | Override::Pin(w) => w.saturating_mul(unit),
                            Override::Drain => 0,
                        }),
                        ..Input::observed(BackendId(id), b.weight, seen, forecast)
                    }
                })
                .collect();
            let keys: Vec<[u8; 16]> = vip
                .backends
                .iter()
                .map(|b| addr_bytes(b.address).0)
                .collect();
            let backends = Backends {
                inputs: &inputs,
                keys: &keys,
                table_size: vip.table_size,
            };
            let before = control.state.weights.clone();
            let outcome = control.step(&backends, in_force.built.as_ref());
            if let Some(Ok(table)) = outcome.table {
                tables.insert(key, table);
            }
            changed |= control.state.weights != before;
        }
        if changed {
            let desired = plan(
                &self.config,
                Some(&self.desired),
                &self.overrides,
                &self.control,
                &tables,
            )?;
            self.dataplane.apply(&desired)?;
            self.desired = desired;
        }
        Ok(())
    }

    /// What `/metrics` shows, read from the datapath's counters now.
    fn metrics_snapshot(&self) -> crate::metrics::MetricsSnapshot {
        use crate::metrics::{BackendMetrics, MetricsSnapshot, ModelMetrics, VipMetrics};
        let vip_stats = |id: u32| self.dataplane.vip_stats(id).unwrap_or_default();
        MetricsSnapshot {
            global: self.dataplane.global_stats().unwrap_or_default(),
            vips: self
                .desired
                .vips
                .values()
                .map(|v| {
                    let s = vip_stats(v.meta.vip_id);
                    VipMetrics {
                        vip: v.name.clone(),
                        packets: s.packets,
                        bytes: s.bytes,
                        new_flows: s.new_flows,
                    }
                })
                .collect(),
            backends: self
                .backend_views()
                .into_iter()
                .map(|b| BackendMetrics {
                    vip: b.vip.clone(),
                    backend: b.backend.to_string(),
                    weight: b.weight.round() as u32,
                    configured_weight: b.configured_weight,
                    pinned: b.control != "policy",
                    healthy: self
                        .config
                        .vips
                        .iter()
                        .find(|v| v.to_string() == b.vip)
                        .and_then(|v| self.signals.readings.get(&(vip_key(v), b.backend)))
                        .is_none_or(|r| r.healthy),
                    packets: b.packets,
                    bytes: b.bytes,
                    new_flows: b.new_flows,
                    prediction: b.predicted_ms.map(|v| v / 1000.0),
                    baseline_prediction: None,
                })
                .collect(),
            model: ModelMetrics {
                policy_source: "static".into(),
                ..ModelMetrics::default()
            },
        }
    }

    fn status(&self) -> serde_json::Value {
        let stats = self.dataplane.global_stats().unwrap_or_default();
        json!({
            "instance": self.opts.instance,
            "iface": self.opts.iface,
            "config": self.opts.config,
            "uptime_seconds": self.started.elapsed().as_secs(),
            "vips": self.config.vips.len(),
            "backends": self.desired.backends.len(),
            "policy": self.control.values().map(|c| c.kind.to_string()).collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>().join(", "),
            "model": {
                "fit_failures": self.signals.fit_failures,
                "last_fit_seconds": self.signals.last_fit.map(|d| d.as_secs_f64()),
                "unhealthy_backends": self.signals.readings.iter().filter(|(_, r)| !r.healthy).map(|((_, a), _)| a.to_string()).collect::<Vec<_>>(),
            },
            "last_reload": self.last_reload.as_ref().map(|(at, r)| json!({
                "seconds_ago": at.elapsed().as_secs(),
                "ok": r.is_ok(),
                "error": r.as_ref().err(),
            })),
            "datapath": stats_json(&stats),
        })
    }

    fn vip_list(&self) -> serde_json::Value {
        json!(self
            .config
            .vips
            .iter()
            .map(|v| json!({
                "vip": v.to_string(),
                "forwarding": format!("{:?}", v.forwarding).to_lowercase(),
                "hash": match v.hash { crate::config::HashFields::FiveTuple => "5-tuple", crate::config::HashFields::Source => "source" },
                "table_size": v.table_size,
                "backends": v.backends.len(),
            }))
            .collect::<Vec<_>>())
    }

    fn backend_views(&self) -> Vec<BackendView> {
        let mut out = Vec::new();
        for vip in &self.config.vips {
            let key = vip_key(vip);
            for b in &vip.backends {
                let Some((&id, d)) = self
                    .desired
                    .backends
                    .iter()
                    .find(|(_, d)| d.vip == key && d.address == b.address)
                else {
                    continue;
                };
                let s = self.dataplane.backend_stats(id).unwrap_or_default();
                let reading = self.signals.readings.get(&(key, b.address));
                out.push(BackendView {
                    vip: vip.to_string(),
                    backend: b.address,
                    mac: b
                        .mac
                        .iter()
                        .map(|x| format!("{x:02x}"))
                        .collect::<Vec<_>>()
                        .join(":"),
                    configured_weight: b.weight,
                    // In configured units, to two decimals (policy steps are finer).
                    weight: (d.weight as f64 / unit(vip) as f64 * 100.0).round() / 100.0,
                    control: match self.overrides.get(&(key, b.address)) {
                        None => "policy",
                        Some(Override::Set(_)) => "set",
                        Some(Override::Pin(_)) => "pinned",
                        Some(Override::Drain) => "drained",
                    }
                    .to_owned(),
                    packets: s.packets,
                    bytes: s.bytes,
                    new_flows: s.new_flows,
                    healthy: reading.is_none_or(|r| r.healthy),
                    latency_ms: reading.and_then(|r| r.latency_s()).map(|v| v * 1000.0),
                    predicted_ms: reading
                        .and_then(|r| r.forecast.as_ref())
                        .and_then(|f| f.value)
                        .map(|v| v * 1000.0),
                    predictor: reading
                        .and_then(|r| r.forecast.as_ref())
                        .map(|f| f.choice.predictor.clone()),
                });
            }
        }
        out
    }

    fn stats(&self) -> anyhow::Result<serde_json::Value> {
        let stats = self.dataplane.global_stats()?;
        Ok(json!({
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "datapath": stats_json(&stats),
            "backends": self.backend_views(),
        }))
    }

    /// Every VIP's active lookup table, read back from the kernel: its digest
    /// (FNV-1a 64 over the slots as little-endian u32 backend ids) and how many
    /// slots each backend holds.
    fn tables(&self) -> anyhow::Result<serde_json::Value> {
        let mut out = Vec::new();
        for vip in &self.config.vips {
            let key = vip_key(vip);
            let Some(table) = self.dataplane.active_table(&key)? else {
                continue;
            };
            let mut digest: u64 = 0xcbf2_9ce4_8422_2325;
            for slot in &table {
                for byte in slot.to_le_bytes() {
                    digest = (digest ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
                }
            }
            let mut slots: BTreeMap<String, usize> = BTreeMap::new();
            for id in &table {
                let name = self
                    .desired
                    .backends
                    .get(id)
                    .map_or_else(|| format!("id {id}"), |b| b.address.to_string());
                *slots.entry(name).or_default() += 1;
            }
            out.push(json!({
                "vip": vip.to_string(),
                "size": table.len(),
                "digest": format!("{digest:016x}"),
                "slots": slots,
            }));
        }
        Ok(json!(out))
    }

    fn explain(&self) -> serde_json::Value {
        let views = self.backend_views();
        json!(views
            .into_iter()
            .map(|b| {
                let key = self.config.vips.iter().find(|v| v.to_string() == b.vip).map(vip_key);
                let control = key.and_then(|k| self.control.get(&k));
                let id = self.desired.backends.iter().find(|(_, d)| Some(d.vip) == key && d.address == b.backend).map(|(&id, _)| BackendId(id));
                let decision = control
                    .and_then(|c| c.decisions.iter().find(|d| Some(d.backend) == id));
                let why = match b.control.as_str() {
                    "set" => format!("operator set {} (until auto or reload)", b.weight),
                    "pinned" => format!("operator pinned {} (until auto)", b.weight),
                    "drained" => "operator drained it: 0, no new flows".to_owned(),
                    _ => decision
                        .map(|d| d.to_string())
                        .unwrap_or_else(|| format!("configured weight {} (no update yet)", b.configured_weight)),
                };
                json!({
                    "vip": b.vip,
                    "backend": b.backend,
                    "policy": control.map(|c| c.kind.to_string()),
                    "inputs": {
                        "configured_weight": b.configured_weight,
                        "override": b.control,
                        "predicted_latency_s": decision.and_then(|d| d.predicted_s),
                        "predictor": decision.map(|d| d.predictor.clone()),
                    },
                    "weight_before": decision.map(|d| d.before as f64 / control.map_or(1.0, |c| c.params.unit as f64)),
                    "weight": b.weight,
                    "why": why,
                })
            })
            .collect::<Vec<_>>())
    }
}

fn stats_json(s: &GlobalStats) -> serde_json::Value {
    json!({
        "rx_frames": s.rx_frames,
        "tx": s.tx,
        "tx_encap": s.tx_encap,
        "conn_hit": s.conn_hit,
        "conn_miss_syn": s.conn_miss_syn,
        "conn_miss_non_syn": s.conn_miss_non_syn,
        "conn_insert_failed": s.conn_insert_failed,
        "pass_not_ip": s.pass_not_ip,
        "pass_not_vip": s.pass_not_vip,
        "pass_fragment": s.pass_fragment,
        "pass_truncated": s.pass_truncated,
        "pass_malformed": s.pass_malformed,
        "pass_ipv6_extension": s.pass_ipv6_extension,
        "pass_icmp_other": s.pass_icmp_other,
        "ipv4_options": s.ipv4_options,
        "icmp_echo_reply": s.icmp_echo_reply,
        "icmp_error_forwarded": s.icmp_error_forwarded,
        "drop_no_backend": s.drop_no_backend,
        "drop_encap_failed": s.drop_encap_failed,
    })
}

/// Fails unless `iface` names an interface of this network namespace.
fn check_interface(iface: &str) -> anyhow::Result<u32> {
    let name = CString::new(iface).with_context(|| format!("interface name {iface:?}"))?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("interface {iface:?} does not exist (see `ip link`)");
    }
    Ok(index)
}

/// `lb detach`: removes an instance's pins, which detaches its program.
pub fn detach(instance: &str) -> anyhow::Result<()> {
    let dir = pin_dir(instance);
    if !dir.exists() {
        bail!(
            "nothing is pinned for instance {instance:?} (no {})",
            dir.display()
        );
    }
    crate::dataplane::remove_pins(&dir)?;
    Ok(())
}
