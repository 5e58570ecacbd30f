//! What the agent shows: `/metrics` snapshots and the control socket's read answers
//! (`status`, `vip list`, `backend list`, `stats`, `tables`, `explain`), as the
//! typed answers of [`crate::api`]. Called by the loop and by `overrides::handle`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::types::VipKey;

use super::{Agent, overrides::control_of, tick::unit};
use crate::{
    api::{
        BackendView, Control, ExplainInputs, Explanation, FloodStatus, ModelStatus, ReloadOutcome,
        Stats, Status, TableView, VipView,
    },
    config::{HashFields, Vip},
    core::{
        BackendId,
        model::{Choice, ModelError},
        policy::Decision,
    },
    dataplane::DataplaneError,
    desired::vip_key,
};

impl Agent {
    /// What `/metrics` shows, read from the datapath's counters now.
    pub(super) fn metrics_snapshot(&self) -> crate::metrics::MetricsSnapshot {
        use crate::metrics::{BackendMetrics, MetricsSnapshot, VipMetrics};
        let vip_stats = |id: u32| self.dataplane.vip_stats(id).unwrap_or_default();
        let vips = self.vips_by_name();
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
                .map(|b| {
                    let reading = vips
                        .get(&b.vip)
                        .and_then(|v| self.signals.readings.get(&(vip_key(v), b.backend)));
                    let forecast = reading.and_then(|r| r.forecast.as_ref());
                    let choice = forecast.map(|f| &f.choice);
                    BackendMetrics {
                        vip: b.vip.clone(),
                        backend: b.backend.to_string(),
                        weight: b.weight.round() as u32,
                        configured_weight: b.configured_weight,
                        pinned: b.control != Control::Policy,
                        healthy: reading.is_none_or(|r| r.healthy),
                        packets: b.packets,
                        bytes: b.bytes,
                        new_flows: b.new_flows,
                        prediction: b.predicted_ms.map(|v| v / 1000.0),
                        baseline_prediction: forecast.and_then(|f| f.baseline),
                        predictor: choice.map(|c| c.predictor.clone()),
                        model_error: choice.and_then(|c| c.model_mae),
                        baseline_error: choice.and_then(|c| c.baseline_mae),
                    }
                })
                .collect(),
            model: self.model_metrics(),
            cluster: self.fleet.as_ref().map(|_| {
                let c = self.cluster_status();
                let count = |f: &dyn Fn(&crate::api::ClusterNode) -> bool| {
                    c.nodes.iter().filter(|n| f(n)).count() as u64
                };
                crate::metrics::ClusterMetrics {
                    connected: c.connected,
                    leading: c.leading,
                    epoch_applied: c.epoch_applied,
                    epoch_newest: c.epoch_newest,
                    lag_seconds: c.lag_ms as f64 / 1000.0,
                    nodes_agreeing: count(&|n| n.same_config && n.agrees),
                    nodes_other_table: count(&|n| n.same_config && !n.agrees),
                    nodes_other_config: count(&|n| !n.same_config),
                    published: c.published,
                    fenced: c.fenced,
                    share: c.share,
                }
            }),
            readiness: self.readiness(),
            flood: self.flood_status(),
            maps: self.map_memory(),
            nat: self.nat_status(),
        }
    }

    /// What drives the weights, how the predictors fare, and the fits.
    fn model_metrics(&self) -> crate::metrics::ModelMetrics {
        let choices: Vec<&Choice> = self
            .signals
            .readings
            .values()
            .filter_map(|r| r.forecast.as_ref().map(|f| &f.choice))
            .collect();
        let mut sources: BTreeMap<String, usize> = BTreeMap::new();
        for c in &choices {
            let source = if c.uses_model {
                "model".to_owned()
            } else {
                format!("baseline:{}", c.predictor)
            };
            *sources.entry(source).or_default() += 1;
        }
        let mean = |f: fn(&Choice) -> Option<f64>| {
            let v: Vec<f64> = choices.iter().filter_map(|c| f(c)).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        crate::metrics::ModelMetrics {
            policy_source: sources
                .into_iter()
                .max_by_key(|&(_, n)| n)
                .map(|(s, _)| s)
                .unwrap_or_default(),
            predictor_setting: self.config.control.predictor,
            last_fit_seconds: self.signals.last_fit.map(|d| d.as_secs_f64()),
            fit_failures: ModelError::KINDS
                .iter()
                .map(|&k| (k, self.signals.fit_failures.get(k).copied().unwrap_or(0)))
                .collect(),
            last_fit_timestamp: self
                .signals
                .last_fit_at
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64()),
            model_error: mean(|c| c.model_mae),
            baseline_error: mean(|c| c.baseline_mae),
        }
    }

    pub(super) fn status(&self) -> Status {
        let stats = self.dataplane.global_stats().unwrap_or_default();
        let policies: BTreeSet<String> =
            self.control.values().map(|c| c.kind.to_string()).collect();
        Status {
            instance: self.opts.instance.clone(),
            iface: self.opts.iface.clone(),
            config: self.opts.config.clone(),
            uptime_seconds: self.started.elapsed().as_secs(),
            vips: self.config.vips.len(),
            backends: self.desired.backends.len(),
            policy: policies.into_iter().collect::<Vec<_>>().join(", "),
            model: ModelStatus {
                fit_failures: self.signals.fit_failures.values().sum(),
                last_fit_seconds: self.signals.last_fit.map(|d| d.as_secs_f64()),
                unhealthy_backends: self
                    .signals
                    .readings
                    .iter()
                    .filter(|(_, r)| !r.healthy)
                    .map(|((_, a), _)| a.to_string())
                    .collect(),
            },
            last_reload: self.last_reload.as_ref().map(|(at, r)| ReloadOutcome {
                seconds_ago: at.elapsed().as_secs(),
                ok: r.is_ok(),
                error: r.as_ref().err().cloned(),
            }),
            datapath: (&stats).into(),
            flood: self.flood_status(),
            maps: self.map_memory(),
            nat: self.nat_status(),
        }
    }

    /// Full NAT's counters and the last walk of its tables; `None` when no VIP
    /// forwards by `nat`.
    pub(super) fn nat_status(&self) -> Option<crate::api::NatStatus> {
        if !self.config.uses_nat() {
            return None;
        }
        let n = self.dataplane.nat_stats().unwrap_or_default();
        let (walked_seconds_ago, usage) = match &self.nat_usage {
            Some((at, usage)) => (at.elapsed().as_secs_f64(), usage.clone()),
            None => (0.0, Default::default()),
        };
        Some(crate::api::NatStatus {
            flows: usage.flows,
            walked_seconds_ago,
            ports_per_source: u64::from(self.config.nat.port_max - self.config.nat.port_min) + 1,
            sources: usage
                .by_source
                .iter()
                .map(|(address, ports)| crate::api::NatSourceUse {
                    address: address.to_string(),
                    ports_in_use: *ports,
                })
                .collect(),
            to_backend: n.to_backend,
            to_client: n.to_client,
            claimed: n.claimed,
            port_collisions: n.port_collisions,
            ports_exhausted: n.ports_exhausted,
            reclaimed: n.reclaimed,
            lost: n.lost,
            reply_unknown: n.reply_unknown,
            expired: self.nat_expired,
        })
    }

    /// Each pinned map's geometry and memory, as read when the datapath was loaded.
    pub(super) fn map_memory(&self) -> Vec<crate::api::MapMemoryView> {
        self.dataplane.map_memory().iter().map(Into::into).collect()
    }

    /// The flood guard's counters and the flood watch's state, both from the watch's
    /// last observation (one control interval old at most), so they agree.
    pub(super) fn flood_status(&self) -> FloodStatus {
        let guard = self.flood.counters();
        let rates = self.flood.rates();
        let since = self.flood.active_since();
        FloodStatus {
            guard: self.opts.flood_guard,
            active: since.is_some(),
            active_seconds: since.map(|t| t.elapsed().as_secs_f64()),
            episodes: self.flood.episodes(),
            threshold_per_second: self.flood.threshold_per_s(),
            new_flows_per_second: rates.new_per_s,
            unanswered_per_second: rates.unanswered_per_s,
            young: guard.young,
            promoted: guard.promoted,
            young_failed: guard.young_failed,
        }
    }

    pub(super) fn vip_list(&self) -> Vec<VipView> {
        self.config
            .vips
            .iter()
            .map(|v| VipView {
                vip: v.to_string(),
                forwarding: format!("{:?}", v.forwarding).to_lowercase(),
                hash: match v.hash {
                    HashFields::FiveTuple => "5-tuple",
                    HashFields::Source => "source",
                }
                .to_owned(),
                table_size: v.table_size,
                backends: v.backends.len(),
            })
            .collect()
    }

    /// The configured VIPs by the name the views show.
    fn vips_by_name(&self) -> BTreeMap<String, &Vip> {
        self.config
            .vips
            .iter()
            .map(|v| (v.to_string(), v))
            .collect()
    }

    pub(super) fn backend_views(&self) -> Vec<BackendView> {
        let mut out = Vec::new();
        for vip in &self.config.vips {
            let key = vip_key(vip);
            // Each backend's id, in configured order, as the plan gave it.
            let ids = self.desired.vips.get(&key).map_or(&[][..], |d| &d.ids);
            for (b, &id) in vip.backends.iter().zip(ids) {
                let Some(d) = self.desired.backends.get(&id) else {
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
                    control: control_of(self.overrides.get(&(key, b.address))),
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

    pub(super) fn stats(&self) -> Result<Stats, DataplaneError> {
        let stats = self.dataplane.global_stats()?;
        Ok(Stats {
            uptime_ms: self.started.elapsed().as_millis() as u64,
            datapath: (&stats).into(),
            backends: self.backend_views(),
        })
    }

    /// Every VIP's active lookup table, read back from the kernel: its digest
    /// (FNV-1a 64 over the slots as little-endian u32 backend ids) and how many
    /// slots each backend holds.
    pub(super) fn tables(&self) -> Result<Vec<TableView>, DataplaneError> {
        let mut out = Vec::new();
        for vip in &self.config.vips {
            let key = vip_key(vip);
            let Some(table) = self.dataplane.active_table(&key)? else {
                continue;
            };
            let mut slots: BTreeMap<String, usize> = BTreeMap::new();
            for id in &table {
                let name = self
                    .desired
                    .backends
                    .get(id)
                    .map_or_else(|| format!("id {id}"), |b| b.address.to_string());
                *slots.entry(name).or_default() += 1;
            }
            out.push(TableView {
                vip: vip.to_string(),
                size: table.len(),
                digest: crate::core::table_digest(&table),
                slots,
            });
        }
        Ok(out)
    }

    pub(super) fn explain(&self) -> Vec<Explanation> {
        let vips = self.vips_by_name();
        let ids: BTreeMap<(VipKey, IpAddr), BackendId> = self
            .desired
            .backends
            .iter()
            .map(|(&id, d)| ((d.vip, d.address), BackendId(id)))
            .collect();
        let decisions: BTreeMap<BackendId, &Decision> = self
            .control
            .values()
            .flat_map(|c| c.decisions.iter().map(|d| (d.backend, d)))
            .collect();
        self.backend_views()
            .into_iter()
            .map(|b| {
                let vip = vips.get(&b.vip).copied();
                let key = vip.map(vip_key);
                let control = key.and_then(|k| self.control.get(&k));
                let units = control.map_or_else(|| vip.map_or(1, unit), |c| c.params.unit);
                let id = key.and_then(|k| ids.get(&(k, b.backend)));
                let decision = id.and_then(|id| decisions.get(id).copied());
                let why = match b.control {
                    Control::Set => format!("operator set {} (until auto or reload)", b.weight),
                    Control::Pinned => format!("operator pinned {} (until auto)", b.weight),
                    Control::Drained => "operator drained it: 0, no new flows".to_owned(),
                    Control::Policy => decision.map(|d| d.to_string()).unwrap_or_else(|| {
                        format!("configured weight {} (no update yet)", b.configured_weight)
                    }),
                };
                Explanation {
                    vip: b.vip,
                    backend: b.backend,
                    policy: control.map(|c| c.kind),
                    inputs: ExplainInputs {
                        configured_weight: b.configured_weight,
                        control: b.control,
                        predicted_latency_s: decision.and_then(|d| d.predicted_s),
                        predictor: decision.map(|d| d.predictor.clone()),
                        predictor_setting: self.config.control.predictor,
                        predictor_why: key
                            .and_then(|k| self.signals.readings.get(&(k, b.backend)))
                            .and_then(|r| r.forecast.as_ref())
                            .map(|f| f.choice.to_string()),
                    },
                    weight_before: decision.map(|d| d.before as f64 / units as f64),
                    weight: b.weight,
                    policy_units_per_weight: units,
                    why,
                }
            })
            .collect()
    }
}
