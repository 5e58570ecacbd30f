//! What the agent knows about each backend between control ticks: one probe task
//! and one scrape task per backend (so a slow backend delays nobody), their latest
//! readings, and each backend's load model. Owned by the agent's control loop, which
//! reads it when it runs the policies.

use std::{collections::BTreeMap, net::IpAddr, net::SocketAddr, time::Duration, time::Instant};

use lb_common::types::VipKey;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    collect::{
        BackendSample, CollectError, ProbeConfig, ProbeResult, Prober, Rejects, ScrapeConfig,
        Scraper,
    },
    config::Config,
    core::model::{self, BackendModel, FittedSvr, Forecast, Load, ModelError, REFIT_EVERY},
    desired::vip_key,
};

/// A backend of a VIP.
pub type Key = (VipKey, IpAddr);

/// The latest of everything about one backend.
#[derive(Debug, Default, Clone)]
pub struct Reading {
    /// Health as the probe state machine says (true when not probed).
    pub healthy: bool,
    pub probe: Option<ProbeResult>,
    pub sample: Option<BackendSample>,
    pub scrape_error: Option<String>,
    pub rejects: Rejects,
    /// The last forecast of the latency one interval ahead.
    pub forecast: Option<Forecast>,
    /// The last forecast of the least capacity over the next intervals
    /// (`model::capacity_config`).
    pub capacity_forecast: Option<Forecast>,
}

impl Reading {
    /// The latency a new flow suffers on this backend now: the application's own
    /// request latency when scraped, else the probe's (HTTP, else connect) time.
    pub fn latency_s(&self) -> Option<f64> {
        let sample = self.sample.as_ref().and_then(|s| s.latency_s);
        let probe = self
            .probe
            .as_ref()
            .filter(|p| p.ok)
            .and_then(|p| p.http_s.or(p.connect_s));
        sample.or(probe).filter(|v| v.is_finite() && *v >= 0.0)
    }
}

enum Update {
    Probe {
        key: Key,
        result: ProbeResult,
        healthy: bool,
    },
    Scrape {
        key: Key,
        result: Result<BackendSample, CollectError>,
        rejects: Rejects,
    },
    Fitted {
        key: Key,
        head: Head,
        result: Result<FittedSvr, ModelError>,
    },
}

/// Which of a backend's two models a fit is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Head {
    /// The latency one interval ahead (`model::model_config`).
    Latency,
    /// The least capacity over the next intervals (`model::capacity_config`).
    Capacity,
}

/// The collectors and models of every backend of a configuration.
pub struct Signals {
    tasks: Vec<JoinHandle<()>>,
    tx: mpsc::Sender<Update>,
    rx: mpsc::Receiver<Update>,
    pub readings: BTreeMap<Key, Reading>,
    models: BTreeMap<Key, BackendModel>,
    /// Each backend's capacity model.
    capacity_models: BTreeMap<Key, BackendModel>,
    /// Backends' models being fitted now.
    fitting: std::collections::BTreeSet<(Key, Head)>,
    observations: u64,
    /// Fits that failed since start, by [`ModelError::kind`] (the last good model
    /// stays in use).
    pub fit_failures: BTreeMap<&'static str, u64>,
    /// How long the last successful fit took.
    pub last_fit: Option<Duration>,
    /// When the last successful fit was installed.
    pub last_fit_at: Option<std::time::SystemTime>,
    fit_started: BTreeMap<(Key, Head), Instant>,
}

impl Signals {
    /// Starts probing and scraping every backend that `config` asks for.
    pub fn start(config: &Config) -> Signals {
        let (tx, rx) = mpsc::channel(1024);
        let mut signals = Signals {
            tasks: Vec::new(),
            tx,
            rx,
            readings: BTreeMap::new(),
            models: BTreeMap::new(),
            capacity_models: BTreeMap::new(),
            fitting: Default::default(),
            observations: 0,
            fit_failures: BTreeMap::new(),
            last_fit_at: None,
            last_fit: None,
            fit_started: BTreeMap::new(),
        };
        let interval = Duration::from_millis(config.control.interval_ms);
        for vip in &config.vips {
            let vk = vip_key(vip);
            for b in &vip.backends {
                let key = (vk, b.address);
                signals.readings.insert(
                    key,
                    Reading {
                        healthy: true,
                        ..Reading::default()
                    },
                );
                let model_config = model::model_config(config.control.predictor);
                if let Ok(model) = BackendModel::new(model_config) {
                    signals.models.insert(key, model);
                }
                let capacity_config = model::capacity_config(config.control.predictor);
                if let Ok(model) = BackendModel::new(capacity_config) {
                    signals.capacity_models.insert(key, model);
                }
                if let Some(h) = &vip.health {
                    let cfg = ProbeConfig {
                        target: SocketAddr::new(b.address, h.port),
                        http_path: h.http_path.clone(),
                        timeout: Duration::from_millis(h.timeout_ms),
                        rise: h.rise,
                        fall: h.fall,
                    };
                    let every = Duration::from_millis(h.interval_ms);
                    let tx = signals.tx.clone();
                    signals.tasks.push(tokio::spawn(async move {
                        let mut prober = Prober::new(cfg);
                        let mut tick = tokio::time::interval(every);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        loop {
                            tick.tick().await;
                            let result = prober.probe().await;
                            let healthy = prober.healthy();
                            if tx
                                .send(Update::Probe {
                                    key,
                                    result,
                                    healthy,
                                })
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    }));
                }
                if let Some(m) = &vip.metrics {
                    let host = match b.address {
                        IpAddr::V4(a) => a.to_string(),
                        IpAddr::V6(a) => format!("[{a}]"),
                    };
                    let cfg = ScrapeConfig {
                        url: format!("http://{host}:{}{}", m.port, m.path),
                        timeout: Duration::from_millis(m.timeout_ms),
                        max_bytes: 1 << 20,
                        in_flight: m.in_flight.clone(),
                        latency: m.latency.clone(),
                        requests: m.requests.clone(),
                        errors: m.errors.clone(),
                    };
                    let tx = signals.tx.clone();
                    signals.tasks.push(tokio::spawn(async move {
                        let Ok(mut scraper) = Scraper::new(cfg) else {
                            return;
                        };
                        let mut tick = tokio::time::interval(interval);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        loop {
                            tick.tick().await;
                            let result = scraper.scrape().await;
                            let rejects = scraper.rejects().clone();
                            if tx
                                .send(Update::Scrape {
                                    key,
                                    result,
                                    rejects,
                                })
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    }));
                }
            }
        }
        signals
    }

    /// Waits for the next update and applies it; returns the backend whose health
    /// changed, if any (the caller then reruns the policies at once).
    pub async fn next(&mut self) -> Option<Key> {
        let update = self.rx.recv().await?;
        self.apply(update)
    }

    fn apply(&mut self, update: Update) -> Option<Key> {
        match update {
            Update::Probe {
                key,
                result,
                healthy,
            } => {
                let r = self.readings.entry(key).or_default();
                let changed = r.healthy != healthy;
                r.healthy = healthy;
                r.probe = Some(result);
                changed.then_some(key)
            }
            Update::Scrape {
                key,
                result,
                rejects,
            } => {
                let r = self.readings.entry(key).or_default();
                r.rejects = rejects;
                match result {
                    Ok(sample) => {
                        r.sample = Some(sample);
                        r.scrape_error = None;
                    }
                    Err(e) => {
                        // A failed scrape leaves no stale numbers behind.
                        r.sample = None;
                        r.scrape_error = Some(e.to_string());
                    }
                }
                None
            }
            Update::Fitted { key, head, result } => {
                self.fitting.remove(&(key, head));
                let took = self.fit_started.remove(&(key, head)).map(|t| t.elapsed());
                let models = match head {
                    Head::Latency => &mut self.models,
                    Head::Capacity => &mut self.capacity_models,
                };
                match result
                    .and_then(|fitted| models.get_mut(&key).map_or(Ok(()), |m| m.install(fitted)))
                {
                    Ok(()) => {
                        self.last_fit = took;
                        self.last_fit_at = Some(std::time::SystemTime::now());
                    }
                    Err(e) => *self.fit_failures.entry(e.kind()).or_default() += 1,
                }
                None
            }
        }
    }

    /// Feeds every backend's model this interval's observation and returns nothing;
    /// forecasts land in the readings. Starts background fits now and then.
    pub fn observe(&mut self, new_flows_per_s: &BTreeMap<Key, f64>) {
        self.observations += 1;
        let refit = self.observations.is_multiple_of(REFIT_EVERY);
        let error_penalty = crate::core::policy::Params::default().error_penalty;
        for (head, models) in [
            (Head::Latency, &mut self.models),
            (Head::Capacity, &mut self.capacity_models),
        ] {
            for (key, model) in models.iter_mut() {
                let Some(reading) = self.readings.get_mut(key) else {
                    continue;
                };
                let s = reading.sample.clone().unwrap_or_default();
                // Latency: the application's, else the probe's. Capacity: what the
                // backend showed over the interval, none without requests or busy
                // time (the tick is skipped, never guessed).
                let target = match head {
                    Head::Latency => reading.latency_s(),
                    Head::Capacity => crate::core::policy::shown_capacity(
                        error_penalty,
                        s.requests_per_s,
                        s.cpu,
                        s.errors_per_s,
                    ),
                };
                let Some(target) = target else {
                    continue;
                };
                let load = Load {
                    cpu: s.cpu.unwrap_or(0.0),
                    memory: s.memory.unwrap_or(0.0),
                    disk_busy: s.disk_busy.unwrap_or(0.0),
                    in_flight: s.in_flight.unwrap_or(0.0),
                    new_flows_per_s: new_flows_per_s.get(key).copied().unwrap_or(0.0),
                };
                // Input the model refuses (non-finite) leaves it unchanged.
                if let Ok(forecast) = model.tick(target, &load.features()) {
                    match head {
                        Head::Latency => reading.forecast = Some(forecast),
                        Head::Capacity => reading.capacity_forecast = Some(forecast),
                    }
                }
                if refit && !self.fitting.contains(&(*key, head)) {
                    let set = model.training_set();
                    let params = model.svr_params().clone();
                    let tx = self.tx.clone();
                    let key = *key;
                    self.fitting.insert((key, head));
                    self.fit_started.insert((key, head), Instant::now());
                    tokio::task::spawn_blocking(move || {
                        let result = set.fit(&params);
                        let _ = tx.blocking_send(Update::Fitted { key, head, result });
                    });
                }
            }
        }
    }

    /// Sets which predictor drives every backend's weights from the next tick on
    /// (a reload that changed only `[control] predictor`); the models keep what they
    /// learned.
    pub fn set_predictor(&mut self, predictor: model::PredictorSetting) {
        for model in self
            .models
            .values_mut()
            .chain(self.capacity_models.values_mut())
        {
            model.set_predictor(predictor);
        }
    }

    /// Stops every collector task.
    pub fn stop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        self.stop();
    }
}
