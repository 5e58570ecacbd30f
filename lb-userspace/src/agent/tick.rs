//! The control tick: every VIP's control step on what the collectors and the
//! datapath's counters say about its backends, then the maps, if a weight changed.
//! Also the plan every change of the maps goes through ([`plan`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Instant,
};

use lb_common::types::{BACKEND_F_DRAINED, BACKEND_F_PINNED, BACKEND_F_SET, VipKey};

use super::{Agent, AgentError, overrides::Override};
use crate::{
    config::{Backend, Config, Vip},
    core::{
        BackendId,
        control::{Backends, Observation, VipControl},
        policy::{self, Input},
    },
    desired::{Desired, PlanError, Tables, addr_bytes, vip_key},
};

/// A VIP's control step as `config` sets it up, with no state yet.
pub(super) fn vip_control(vip: &Vip, control: &crate::config::Control) -> VipControl {
    let configured: Vec<u32> = vip.backends.iter().map(|b| b.weight).collect();
    VipControl::new(vip.policy, control.params_for(&configured))
}

/// Policy units per configured weight unit for `vip` (see `policy::unit`).
pub(super) fn unit(vip: &Vip) -> u32 {
    policy::unit(&vip.backends.iter().map(|b| b.weight).collect::<Vec<_>>())
}

/// Where a backend's weight comes from when the maps are planned.
#[derive(Clone, Copy)]
pub(super) enum Weights<'a> {
    /// A single LB: its operator holds first, then the policy's weights
    /// (configured weights until the policy has run).
    Local(&'a BTreeMap<(VipKey, IpAddr), Override>),
    /// A member of a fleet: the weights in force are the epoch's (`in_force`, which
    /// carry the fleet's holds, so holds only mark their backends here; before the
    /// first epoch, as `Local` without holds), except that a backend this LB's own
    /// probes fail gets 0 at once (`down`; see `agent::fleet`).
    Fleet {
        holds: &'a BTreeMap<(VipKey, IpAddr), Override>,
        down: &'a BTreeSet<(VipKey, IpAddr)>,
        in_force: &'a BTreeMap<VipKey, BTreeMap<BackendId, u32>>,
    },
}

/// The desired state for `config`, each backend weighted as `weights` says (in
/// policy units; holds are converted from configured units).
pub(super) fn plan(
    config: &Config,
    previous: Option<&Desired>,
    weights: Weights<'_>,
    control: &BTreeMap<VipKey, VipControl>,
    tables: &Tables,
) -> Result<Desired, PlanError> {
    Desired::plan(
        config,
        previous,
        &|vip: &Vip, b: &Backend, id: BackendId| {
            let key = vip_key(vip);
            let control = control.get(&key);
            let unit = control.map_or_else(|| unit(vip), |c| c.params.unit);
            let policy = || {
                let policy = control.and_then(|c| c.state.weights.get(&id));
                policy.copied().unwrap_or(b.weight.saturating_mul(unit))
            };
            let (holds, fleet) = match weights {
                Weights::Local(holds) => (holds, None),
                Weights::Fleet {
                    holds,
                    down,
                    in_force,
                } => (holds, Some((down, in_force))),
            };
            let hold = holds.get(&(key, b.address));
            let flags = match hold {
                Some(Override::Set(_)) => BACKEND_F_SET,
                Some(Override::Pin(_)) => BACKEND_F_PINNED,
                Some(Override::Drain) => BACKEND_F_DRAINED,
                None => 0,
            };
            let weight = match (fleet, hold) {
                (Some((down, _)), _) if down.contains(&(key, b.address)) => 0,
                (Some((_, in_force)), _) => in_force
                    .get(&key)
                    .and_then(|w| w.get(&id))
                    .copied()
                    .unwrap_or_else(policy),
                (None, None) => policy(),
                (None, Some(Override::Set(w) | Override::Pin(w))) => w.saturating_mul(unit),
                (None, Some(Override::Drain)) => 0,
            };
            (weight, flags)
        },
        tables,
    )
}

impl Agent {
    /// One control interval: every VIP's policy runs on what is known about its
    /// backends; the maps change only if some weight did. In a fleet, see
    /// [`Agent::fleet_tick`].
    pub(super) fn control_tick(&mut self, observe: bool) -> Result<(), AgentError> {
        let rates = if observe {
            self.observe()?
        } else {
            Rates::default()
        };
        if self.fleet.is_some() {
            return self.fleet_tick(&rates, observe);
        }
        let (readings, overrides) = (&self.signals.readings, &self.overrides);
        let (changed, tables) = step_vips(
            &self.config,
            &self.desired,
            &mut self.control,
            &mut |key, b, id, unit| {
                let reading = readings.get(&(key, b.address));
                let sample = reading.and_then(|r| r.sample.as_ref());
                let seen = Observation {
                    qps: sample
                        .and_then(|s| s.requests_per_s)
                        .or_else(|| rates.flows.get(&id.0).copied()),
                    utilisation: sample.and_then(|s| s.cpu),
                    errors_per_s: sample.and_then(|s| s.errors_per_s),
                    latency_s: reading.and_then(|r| r.latency_s()),
                    in_flight: sample.and_then(|s| s.in_flight),
                };
                let forecast = reading.and_then(|r| r.forecast.as_ref());
                Input {
                    healthy: reading.is_none_or(|r| r.healthy),
                    hold: hold_weight(overrides.get(&(key, b.address)), unit),
                    ..Input::observed(id, b.weight, seen, forecast)
                        .with_capacity_forecast(reading.and_then(|r| r.capacity_forecast.as_ref()))
                }
            },
        );
        if changed {
            let desired = plan(
                &self.config,
                Some(&self.desired),
                Weights::Local(&self.overrides),
                &self.control,
                &tables,
            )?;
            self.dataplane.apply(&desired)?;
            self.desired = desired;
        }
        Ok(())
    }

    /// Reads every backend's datapath counters: their rates since the last reading,
    /// which also go to the load models.
    fn observe(&mut self) -> Result<Rates, AgentError> {
        let now = Instant::now();
        let mut rates = Rates::default();
        let mut flows_by_key = BTreeMap::new();
        for (&id, d) in &self.desired.backends {
            let stats = self.dataplane.backend_stats(id)?;
            if let Some((at, last)) = self.last_counters.get(&id) {
                let secs = now.duration_since(*at).as_secs_f64();
                if secs > 0.0 && stats.new_flows >= last.new_flows {
                    let rate = (stats.new_flows - last.new_flows) as f64 / secs;
                    rates.flows.insert(id, rate);
                    flows_by_key.insert((d.vip, d.address), rate);
                }
                if secs > 0.0 && stats.bytes >= last.bytes {
                    let rate = (stats.bytes - last.bytes) as f64 / secs;
                    rates.bytes.insert(id, rate);
                }
            }
            self.last_counters.insert(id, (now, stats));
        }
        self.signals.observe(&flows_by_key);
        Ok(rates)
    }
}

/// What this LB's datapath sent each backend (by id) over the last interval.
#[derive(Debug, Default)]
pub(super) struct Rates {
    /// New flows per second.
    pub flows: BTreeMap<u32, f64>,
    /// Bytes per second.
    pub bytes: BTreeMap<u32, f64>,
}

/// An operator hold as the policy takes it: the weight held, in policy units.
pub(super) fn hold_weight(hold: Option<&Override>, unit: u32) -> Option<u32> {
    hold.map(|o| match o {
        Override::Set(w) | Override::Pin(w) => w.saturating_mul(unit),
        Override::Drain => 0,
    })
}

/// The control step of every VIP of `config`, each against the table `desired` holds
/// for it, on the inputs `input` gives each backend (called with the VIP's key, the
/// backend, its id and the VIP's policy units per configured unit). Returns whether
/// any policy weight changed, and the tables the steps built, for [`plan`]. The
/// agent's tick and the control benchmark run this.
pub fn step_vips(
    config: &Config,
    desired: &Desired,
    control: &mut BTreeMap<VipKey, VipControl>,
    input: &mut dyn FnMut(VipKey, &Backend, BackendId, u32) -> Input,
) -> (bool, Tables) {
    let mut changed = false;
    let mut tables = Tables::new();
    for vip in &config.vips {
        let key = vip_key(vip);
        let (Some(in_force), Some(control)) = (desired.vips.get(&key), control.get_mut(&key))
        else {
            continue;
        };
        let unit = control.params.unit;
        let inputs: Vec<Input> = vip
            .backends
            .iter()
            .zip(&in_force.ids)
            .map(|(b, &id)| input(key, b, BackendId(id), unit))
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
    (changed, tables)
}
