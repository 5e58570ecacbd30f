//! What the agent shows: `/metrics` snapshots and the control socket's read answers
//! (`status`, `vip list`, `backend list`, `stats`, `tables`, `explain`).

use std::collections::BTreeMap;

use lb_common::types::GlobalStats;
use serde_json::json;

use super::{Agent, overrides::Override, tick::unit};
use crate::core::model::{Choice, ModelError};
use crate::{api::BackendView, core::BackendId, desired::vip_key};

impl Agent {
    /// What `/metrics` shows, read from the datapath's counters now.
    pub(super) fn metrics_snapshot(&self) -> crate::metrics::MetricsSnapshot {
        use crate::metrics::{BackendMetrics, MetricsSnapshot, VipMetrics};
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
                .map(|b| {
                    let reading = self
                        .config
                        .vips
                        .iter()
                        .find(|v| v.to_string() == b.vip)
                        .and_then(|v| self.signals.readings.get(&(vip_key(v), b.backend)));
                    let forecast = reading.and_then(|r| r.forecast.as_ref());
                    let choice = forecast.map(|f| &f.choice);
                    BackendMetrics {
                        vip: b.vip.clone(),
                        backend: b.backend.to_string(),
                        weight: b.weight.round() as u32,
                        configured_weight: b.configured_weight,
                        pinned: b.control != "policy",
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

    pub(super) fn status(&self) -> serde_json::Value {
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
                "fit_failures": self.signals.fit_failures.values().sum::<u64>(),
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

    pub(super) fn vip_list(&self) -> serde_json::Value {
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

    pub(super) fn backend_views(&self) -> Vec<BackendView> {
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

    pub(super) fn stats(&self) -> anyhow::Result<serde_json::Value> {
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
    pub(super) fn tables(&self) -> anyhow::Result<serde_json::Value> {
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

    pub(super) fn explain(&self) -> serde_json::Value {
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
