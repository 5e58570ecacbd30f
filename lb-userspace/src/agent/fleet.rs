//! The agent as a member of a fleet (`[cluster]`; see `crate::cluster`). Each
//! control interval it writes its record (what it saw of each backend), merges every
//! LB's record that shares its configuration, and runs the same control step as a
//! single agent on the merged view; the step's weights are a draft that only the
//! leader publishes. Weights in force change only when an epoch is applied: the
//! newest one seen, never an older one, and only if it was decided for this LB's
//! configuration. One exception, safety first: a backend this LB's own probes fail
//! gets weight 0 here at once, even before the leader decides, so this LB's table may
//! differ from the fleet's until the next epoch (docs/RELIABILITY.md).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    net::IpAddr,
    pin::Pin,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use lb_common::types::VipKey;
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::{
    Agent, AgentError,
    overrides::{Asked, Override},
    tick::{Rates, Weights, hold_weight, plan, step_vips},
};
use crate::{
    api::{self, Answer, ClusterNode, ClusterStatus, Readiness, Request, Response},
    cluster::{
        etcd::REQUEST_TIMEOUT,
        merge,
        records::{
            BackendDecision, BackendReport, EpochRecord, Hold, HoldRecord, NodeRecord, VipDecision,
            VipReport,
        },
        session::{self, Command, FleetState},
    },
    config,
    core::{BackendId, control::Table, policy::Input, table_digest},
    desired::{Tables, addr_bytes, vip_key},
};

/// A fleet member's state besides the agent's own.
pub(super) struct Fleet {
    pub cluster: config::Cluster,
    pub session: session::Handle,
    /// The newest epoch applied here (0: none yet) and when: its tables are the
    /// ones the datapath reads.
    pub applied: u64,
    /// When, by the wall clock (milliseconds since the Unix epoch).
    pub applied_ms: u64,
    /// An epoch whose table switch waits for its copy's grace (milliseconds; the
    /// loop finishes it), and when it arrived: applied once the switch is made.
    pub switching: Option<(u64, Instant)>,
    /// Why the newest epoch seen is not applied here, while it is not.
    pub not_applied: Option<(u64, String)>,
    /// The fleet holds last taken over into the agent's overrides.
    pub holds: BTreeMap<String, HoldRecord>,
    /// Whether this LB led at the last look, and whether it published since it
    /// began to lead (a new leader publishes once at once, then on change).
    pub leading: bool,
    pub published_this_term: bool,
    /// The nodes last said to run another configuration.
    pub others: BTreeSet<String>,
    /// Milliseconds from an epoch's arrival to its application here, last ones.
    pub apply_lag_ms: Option<f64>,
    /// The applied epoch's weights, by VIP and backend (policy units); empty before
    /// the first epoch.
    pub in_force: BTreeMap<VipKey, BTreeMap<BackendId, u32>>,
    /// The tables of the last step's draft: when an epoch with the same weights
    /// arrives (the leader's own, always), its tables are not built again.
    pub drafted: Tables,
    /// Flow sharing with the other LBs (`[cluster] share_listen`), once started.
    pub share: Option<crate::share::Handle>,
    /// When this LB first held the fleet's state (see [`Agent::readiness`]): from
    /// then on it stays ready.
    pub ready_at: Option<Instant>,
}

impl Fleet {
    pub fn start(cluster: config::Cluster) -> Result<Fleet, AgentError> {
        info!(
            "fleet {:?} as node {:?} through etcd at {}",
            cluster.name,
            cluster.node,
            cluster.endpoints.join(", ")
        );
        Ok(Fleet {
            session: session::start(cluster.clone()).map_err(AgentError::Session)?,
            cluster,
            applied: 0,
            applied_ms: 0,
            switching: None,
            not_applied: None,
            holds: BTreeMap::new(),
            leading: false,
            published_this_term: false,
            others: BTreeSet::new(),
            apply_lag_ms: None,
            in_force: BTreeMap::new(),
            drafted: Tables::new(),
            share: None,
            ready_at: None,
        })
    }

    /// Starts flow sharing: the thread that drains `dataplane`'s ring of new
    /// entries, listens on `listener` and follows the fleet's members.
    pub fn start_sharing(
        &mut self,
        listen: std::net::SocketAddr,
        listener: std::net::TcpListener,
        dataplane: &mut crate::dataplane::Dataplane,
        desired: &crate::desired::Desired,
    ) -> Result<(), AgentError> {
        let maps = dataplane.take_shared_flows()?;
        let me = crate::share::Identity {
            cluster: self.cluster.name.clone(),
            node: self.cluster.node.clone(),
            listen,
        };
        let ids = crate::share::ids::FlowIds::of(desired);
        let handle = crate::share::start(me, listener, maps, ids, self.session.state.clone())
            .map_err(AgentError::Session)?;
        info!("flow sharing: listening on {listen} for the fleet's flows");
        self.share = Some(handle);
        Ok(())
    }

    /// How long a record stays part of the merge after it arrived: a record is
    /// rewritten every interval, and a dead LB's goes with its lease.
    fn fresh_for(&self, interval_ms: u64) -> Duration {
        Duration::from_millis(3 * interval_ms + self.cluster.lease_s * 1000)
    }
}

/// A reply that waits for etcd.
pub(super) type Pending = Pin<Box<dyn Future<Output = Response<Answer>> + Send>>;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One VIP of an epoch without its reasons: name, table digest, weights.
type VipWeights<'a> = (&'a str, &'a str, Vec<(IpAddr, u32)>);

/// An epoch's decisions without their reasons.
fn weights_of(vips: &[VipDecision]) -> Vec<VipWeights<'_>> {
    vips.iter()
        .map(|v| {
            let w = v.backends.iter().map(|b| (b.address, b.weight)).collect();
            (v.vip.as_str(), v.digest.as_str(), w)
        })
        .collect()
}

/// A measured value as a record carries it: finite and not negative, else none.
fn clean(v: Option<f64>) -> Option<f64> {
    v.filter(|x| x.is_finite() && *x >= 0.0)
}

impl Agent {
    /// One control interval in a fleet: report, merge, step (a draft), publish if
    /// leading; then the maps, for what this LB's own probes say.
    pub(super) fn fleet_tick(&mut self, rates: &Rates, observe: bool) -> Result<(), AgentError> {
        let Some(fleet) = &self.fleet else {
            return Ok(());
        };
        let own = self.node_record(rates)?;
        if observe {
            // A full queue means etcd is slow or gone: this interval's record is
            // dropped; the next one replaces it anyway.
            let _ = fleet
                .session
                .commands
                .try_send(Command::Report(own.clone()));
        }
        let state = fleet.session.state.borrow().clone();
        let fresh_for = fleet.fresh_for(self.config.control.interval_ms);
        let digest = self.config.digest();
        let mut others = BTreeSet::new();
        let mut records = vec![own];
        for (node, (record, at)) in &state.nodes {
            if *node == fleet.cluster.node || at.elapsed() > fresh_for {
                continue;
            }
            if record.config_digest != digest {
                others.insert(node.clone());
                continue;
            }
            records.push(record.clone());
        }
        let index = merge::index(&records);
        let names = self.vip_names();
        let (overrides, readings) = (&self.overrides, &self.signals.readings);
        let before: BTreeMap<VipKey, BTreeMap<BackendId, u32>> = self
            .control
            .iter()
            .map(|(k, c)| (*k, c.state.weights.clone()))
            .collect();
        let (_, tables) = step_vips(
            &self.config,
            &self.desired,
            &mut self.control,
            &mut |key, b, id, unit| {
                let reports = names
                    .get(&key)
                    .and_then(|name| index.get(&(name.as_str(), b.address)));
                let merged = reports.and_then(|r| merge::merge(r));
                let local = readings.get(&(key, b.address)).is_none_or(|r| r.healthy);
                let hold = hold_weight(overrides.get(&(key, b.address)), unit);
                match merged {
                    Some(m) => Input {
                        healthy: m.healthy,
                        hold,
                        predicted_s: m.predicted_s,
                        predictor: m.predictor,
                        ..Input::observed(id, b.weight, m.seen, None)
                    },
                    None => Input {
                        healthy: local,
                        hold,
                        ..Input::observed(id, b.weight, Default::default(), None)
                    },
                }
            },
        );
        // The step's weights are a draft; the weights in force stay the epoch's.
        let (draft, drafted) = self.draft(&tables);
        for (key, weights) in before {
            if let Some(c) = self.control.get_mut(&key) {
                c.state.weights = weights;
            }
        }
        let fleet = self.fleet.as_mut().expect("checked above");
        fleet.drafted = drafted;
        if others != fleet.others {
            if !others.is_empty() {
                warn!(
                    nodes = ?others,
                    "LBs {} run another configuration (digest differs from {digest}): \
                     their observations are left out, and they apply no epoch of this one",
                    others.iter().cloned().collect::<Vec<_>>().join(", ")
                );
            }
            fleet.others = others;
        }
        if state.leading {
            let newest = state.epoch.as_ref().map(|(e, _)| e);
            // Reasons are words with figures that change every step: only weights
            // and tables make a new epoch.
            let differs = newest.is_none_or(|e| {
                e.config_digest != digest || weights_of(&e.vips) != weights_of(&draft)
            });
            if differs || !fleet.published_this_term {
                let epoch = EpochRecord {
                    epoch: 0,
                    leader: fleet.cluster.node.clone(),
                    config_digest: digest,
                    written_ms: now_ms(),
                    vips: draft,
                };
                if fleet
                    .session
                    .commands
                    .try_send(Command::Publish(epoch))
                    .is_ok()
                {
                    fleet.published_this_term = true;
                }
            }
        }
        self.replan()
    }

    /// Each VIP's name by key.
    fn vip_names(&self) -> BTreeMap<VipKey, String> {
        self.config
            .vips
            .iter()
            .map(|v| (vip_key(v), v.to_string()))
            .collect()
    }

    /// The control step's weights as an epoch's VIPs, with their tables' digests,
    /// and those tables.
    fn draft(&self, tables: &Tables) -> (Vec<VipDecision>, Tables) {
        let mut out = Vec::new();
        let mut drafted = Tables::new();
        for vip in &self.config.vips {
            let key = vip_key(vip);
            let (Some(c), Some(in_force)) = (self.control.get(&key), self.desired.vips.get(&key))
            else {
                continue;
            };
            // Held backends are not in the policy's state: their weight is the hold's.
            let weights: Vec<u32> = in_force
                .ids
                .iter()
                .zip(&vip.backends)
                .map(|(id, b)| {
                    hold_weight(self.overrides.get(&(key, b.address)), c.params.unit)
                        .or_else(|| c.state.weights.get(&BackendId(*id)).copied())
                        .unwrap_or(b.weight.saturating_mul(c.params.unit))
                })
                .collect();
            let table = [tables.get(&key), in_force.built.as_ref()]
                .into_iter()
                .flatten()
                .find(|t| t.weights == weights)
                .cloned()
                .or_else(|| {
                    let keys: Vec<[u8; 16]> = vip
                        .backends
                        .iter()
                        .map(|b| addr_bytes(b.address).0)
                        .collect();
                    Table::build(&keys, &weights, vip.table_size).ok()
                });
            let Some(table) = table else { continue };
            let digest = table_digest(table.slots.iter());
            drafted.insert(key, table);
            out.push(VipDecision {
                vip: vip.to_string(),
                digest,
                backends: vip
                    .backends
                    .iter()
                    .zip(&weights)
                    .enumerate()
                    .map(|(i, (b, &weight))| BackendDecision {
                        address: b.address,
                        weight,
                        reason: c
                            .decisions
                            .get(i)
                            .map_or_else(String::new, |d| d.to_string()),
                    })
                    .collect(),
            });
        }
        (out, drafted)
    }

    /// This LB's record: what it saw of each backend, and the digest of each table
    /// the datapath has in force (by configured backend index, as epochs give it).
    fn node_record(&self, rates: &Rates) -> Result<NodeRecord, AgentError> {
        let fleet = self.fleet.as_ref().expect("a fleet member");
        let mut vips = Vec::new();
        let digests = self.table_digests()?;
        for vip in &self.config.vips {
            let key = vip_key(vip);
            let Some(in_force) = self.desired.vips.get(&key) else {
                continue;
            };
            let digest = digests.get(&key).cloned();
            let backends = vip
                .backends
                .iter()
                .zip(&in_force.ids)
                .map(|(b, id)| {
                    let reading = self.signals.readings.get(&(key, b.address));
                    let sample = reading.and_then(|r| r.sample.as_ref());
                    let forecast = reading.and_then(|r| r.forecast.as_ref());
                    BackendReport {
                        address: b.address,
                        flows_per_s: clean(rates.flows.get(id).copied()),
                        bytes_per_s: clean(rates.bytes.get(id).copied()),
                        healthy: reading.is_none_or(|r| r.healthy),
                        requests_per_s: clean(sample.and_then(|s| s.requests_per_s)),
                        utilisation: clean(sample.and_then(|s| s.cpu)).map(|u| u.min(1.0)),
                        errors_per_s: clean(sample.and_then(|s| s.errors_per_s)),
                        in_flight: clean(sample.and_then(|s| s.in_flight)),
                        latency_s: clean(reading.and_then(|r| r.latency_s())),
                        predicted_s: clean(forecast.and_then(|f| f.value)),
                        predictor: forecast
                            .map(|f| f.choice.predictor.clone())
                            .unwrap_or_default(),
                    }
                })
                .collect();
            vips.push(VipReport {
                vip: vip.to_string(),
                digest,
                backends,
            });
        }
        Ok(NodeRecord {
            node: fleet.cluster.node.clone(),
            config_digest: self.config.digest(),
            epoch_applied: fleet.applied,
            written_ms: now_ms(),
            vips,
            share: fleet.share.as_ref().and_then(|h| h.state.borrow().listen),
        })
    }

    /// The digest of each VIP's table the datapath reads now, over each slot's
    /// backend index in configured order (as epochs give it, so that LBs whose ids
    /// differ still compare).
    fn table_digests(&self) -> Result<BTreeMap<VipKey, String>, AgentError> {
        let mut out = BTreeMap::new();
        for (key, in_force) in &self.desired.vips {
            let index: HashMap<u32, u32> = in_force
                .ids
                .iter()
                .enumerate()
                .map(|(i, &id)| (id, i as u32))
                .collect();
            let Some(table) = self.dataplane.active_table_mapped(key)? else {
                continue;
            };
            let slots: Option<Vec<u32>> = table.iter().map(|id| index.get(id).copied()).collect();
            if let Some(slots) = slots {
                out.insert(*key, table_digest(&slots));
            }
        }
        Ok(out)
    }

    /// Backends this LB's own probes fail while the weights in force still give them
    /// traffic, except where taking them out would leave a VIP without weight (then
    /// the epoch's weights stay).
    pub(super) fn locally_down(&self) -> BTreeSet<(VipKey, IpAddr)> {
        let mut down = BTreeSet::new();
        for vip in &self.config.vips {
            let key = vip_key(vip);
            let weights = self
                .fleet
                .as_ref()
                .and_then(|f| f.in_force.get(&key))
                .or_else(|| self.control.get(&key).map(|c| &c.state.weights));
            let ids = self.desired.vips.get(&key).map(|v| v.ids.as_slice());
            let weight = |id: u32| weights.and_then(|w| w.get(&BackendId(id))).copied();
            // Failing here while the weights in force still give it traffic (one the
            // epoch already took out needs nothing more).
            let failing: Vec<IpAddr> = vip
                .backends
                .iter()
                .zip(ids.unwrap_or_default())
                .filter(|(b, id)| {
                    self.signals
                        .readings
                        .get(&(key, b.address))
                        .is_some_and(|r| !r.healthy)
                        && weight(**id).is_none_or(|w| w > 0)
                })
                .map(|(b, _)| b.address)
                .collect();
            let left = vip
                .backends
                .iter()
                .zip(ids.unwrap_or_default())
                .filter(|(b, id)| {
                    !failing.contains(&b.address) && weight(**id).is_none_or(|w| w > 0)
                })
                .count();
            if left > 0 {
                down.extend(failing.into_iter().map(|a| (key, a)));
            }
        }
        down
    }

    /// Plans the maps from the weights in force and this LB's own health, and
    /// writes what changed.
    pub(super) fn replan(&mut self) -> Result<(), AgentError> {
        let down = self.locally_down();
        let Some(fleet) = &self.fleet else {
            return Ok(());
        };
        let desired = plan(
            &self.config,
            Some(&self.desired),
            Weights::Fleet {
                holds: &self.overrides,
                down: &down,
                in_force: &fleet.in_force,
            },
            &self.control,
            &fleet.drafted,
        )?;
        if desired != self.desired {
            self.dataplane.apply(&desired)?;
            self.desired = desired;
        }
        Ok(())
    }

    /// The session's state changed: a newer epoch is applied, fleet holds are taken
    /// over, and a new leader publishes at once.
    pub(super) fn on_fleet_change(&mut self) {
        let Some(fleet) = &mut self.fleet else { return };
        let state = fleet.session.state.borrow_and_update().clone();
        let mut tick = false;
        if state.leading != fleet.leading {
            fleet.leading = state.leading;
            fleet.published_this_term = false;
            tick = state.leading;
        }
        if state.holds != fleet.holds {
            fleet.holds = state.holds.clone();
            self.overrides = self.holds_of(&state.holds);
            tick |= state.leading;
            if let Err(e) = self.replan() {
                warn!(error = %api::error_text(&e), "fleet holds: maps unchanged");
            }
        }
        if let Some((epoch, arrived)) = &state.epoch {
            self.take_epoch(epoch, *arrived);
        }
        if tick && let Err(e) = self.control_tick(false) {
            warn!(error = %api::error_text(&e), "fleet: control step failed");
        }
    }

    /// The fleet holds as the agent's overrides; a hold on a VIP or backend this
    /// configuration does not have is left out.
    fn holds_of(
        &self,
        holds: &BTreeMap<String, HoldRecord>,
    ) -> BTreeMap<(VipKey, IpAddr), Override> {
        let names = self.vip_names();
        let by_name: BTreeMap<&str, VipKey> = names.iter().map(|(k, n)| (n.as_str(), *k)).collect();
        let mut out = BTreeMap::new();
        for (key, h) in holds {
            let Some(&vip) = by_name.get(h.vip.as_str()) else {
                warn!(
                    key,
                    "fleet hold on VIP {} which this configuration does not have: ignored", h.vip
                );
                continue;
            };
            let known =
                self.config.vips.iter().any(|v| {
                    vip_key(v) == vip && v.backends.iter().any(|b| b.address == h.backend)
                });
            if !known {
                warn!(
                    key,
                    "fleet hold on {} which is not a backend of {}: ignored", h.backend, h.vip
                );
                continue;
            }
            let o = match h.hold {
                Hold::Set(w) => Override::Set(w),
                Hold::Pin(w) => Override::Pin(w),
                Hold::Drain => Override::Drain,
            };
            out.insert((vip, h.backend), o);
        }
        out
    }

    /// Applies `epoch` if it is newer than the one in force and was decided for
    /// this configuration; else says why not (once per epoch).
    fn take_epoch(&mut self, epoch: &EpochRecord, arrived: Instant) {
        let Some(fleet) = &self.fleet else { return };
        if epoch.epoch <= fleet.applied || fleet.switching.is_some_and(|(n, _)| n >= epoch.epoch) {
            return;
        }
        if fleet
            .not_applied
            .as_ref()
            .is_some_and(|(n, _)| *n == epoch.epoch)
        {
            return;
        }
        match self.apply_epoch(epoch) {
            Ok(()) => {
                let fleet = self.fleet.as_mut().expect("checked above");
                fleet.not_applied = None;
                fleet.switching = Some((epoch.epoch, arrived));
                info!(
                    epoch = epoch.epoch,
                    leader = %epoch.leader,
                    "applying epoch {} from {}",
                    epoch.epoch,
                    epoch.leader
                );
                self.switched();
            }
            Err(why) => {
                warn!(
                    epoch = epoch.epoch,
                    "epoch {} not applied: {why}", epoch.epoch
                );
                let fleet = self.fleet.as_mut().expect("checked above");
                fleet.not_applied = Some((epoch.epoch, why));
            }
        }
    }

    /// Called after every write of the maps: an epoch whose table switch waited is
    /// applied once no switch waits any more.
    pub(super) fn switched(&mut self) {
        let waiting = self.dataplane.retry_at().is_some();
        let Some(fleet) = &mut self.fleet else { return };
        if waiting {
            return;
        }
        if let Some((n, arrived)) = fleet.switching.take() {
            fleet.applied = n;
            fleet.applied_ms = now_ms();
            fleet.apply_lag_ms = Some(arrived.elapsed().as_secs_f64() * 1000.0);
        }
    }

    /// Makes `epoch`'s weights the weights in force, all VIPs or none.
    fn apply_epoch(&mut self, epoch: &EpochRecord) -> Result<(), String> {
        let digest = self.config.digest();
        if epoch.config_digest != digest {
            return Err(format!(
                "it was decided by {} for configuration {}, and this LB runs {digest}",
                epoch.leader, epoch.config_digest
            ));
        }
        let mut weights = BTreeMap::new();
        for vip in &self.config.vips {
            let key = vip_key(vip);
            let name = vip.to_string();
            let decision = epoch
                .vip(&name)
                .ok_or_else(|| format!("it has no decision for VIP {name}"))?;
            let ids = &self
                .desired
                .vips
                .get(&key)
                .ok_or_else(|| format!("VIP {name} is not planned here"))?
                .ids;
            let mut w = BTreeMap::new();
            for (b, id) in vip.backends.iter().zip(ids) {
                let d = decision
                    .backends
                    .iter()
                    .find(|d| d.address == b.address)
                    .ok_or_else(|| format!("it has no weight for {} of {name}", b.address))?;
                w.insert(BackendId(*id), d.weight);
            }
            weights.insert(key, w);
        }
        let fleet = self.fleet.as_mut().expect("a fleet member");
        let saved = std::mem::replace(&mut fleet.in_force, weights);
        if let Err(e) = self.replan() {
            self.fleet.as_mut().expect("a fleet member").in_force = saved;
            return Err(api::error_text(&e));
        }
        // The next step goes on from the epoch's weights, as the leader's did; held
        // backends are left out, as the policy leaves them out of its own state.
        let fleet = self.fleet.as_ref().expect("a fleet member");
        for (key, w) in &fleet.in_force {
            if let Some(c) = self.control.get_mut(key) {
                c.state.weights = w
                    .iter()
                    .filter(|(id, _)| {
                        let address = self.desired.backends.get(&id.0).map(|b| b.address);
                        !address.is_some_and(|a| self.overrides.contains_key(&(*key, a)))
                    })
                    .map(|(id, w)| (*id, *w))
                    .collect();
            }
        }
        Ok(())
    }

    /// A hold request on a fleet member: written to etcd for every LB (the reply
    /// waits for etcd); any other request is handed back.
    pub(super) fn fleet_request(&mut self, request: Request) -> Result<Pending, Request> {
        let hold_request = matches!(
            request,
            Request::WeightSet { .. }
                | Request::WeightPin { .. }
                | Request::WeightAuto { .. }
                | Request::Drain { .. }
                | Request::Undrain { .. }
        );
        let Some(fleet) = &self.fleet else {
            return Err(request);
        };
        if !hold_request {
            return Err(request);
        }
        let ready = |r: Response<Answer>| -> Pending { Box::pin(async move { r }) };
        let (action, key, hold) = match self.ask(&request) {
            Ok(Asked::Unchanged(change)) => return Ok(ready(Response::ok(Answer::Change(change)))),
            Ok(Asked::Hold { action, key, hold }) => (action, key, hold),
            Err(e) => return Ok(ready(Response::error(api::error_text(&e)))),
        };
        // Refused here, as on a single LB, if it would leave a VIP without weight.
        let mut change = match self.preview(action.clone(), key, hold) {
            Ok(change) => change,
            Err(e) => return Ok(ready(Response::error(api::error_text(&e)))),
        };
        let vip = self.vip_names().remove(&key.0).unwrap_or_default();
        let record = hold.map(|o| HoldRecord {
            vip: vip.clone(),
            backend: key.1,
            hold: match o {
                Override::Set(w) => Hold::Set(w),
                Override::Pin(w) => Hold::Pin(w),
                Override::Drain => Hold::Drain,
            },
            by: fleet.cluster.node.clone(),
        });
        let (reply, answer) = oneshot::channel();
        let command = Command::Hold {
            vip: vip.clone(),
            backend: key.1,
            hold: record,
            reply,
        };
        let sent = fleet.session.commands.try_send(command).is_ok();
        let cluster = fleet.cluster.name.clone();
        Ok(Box::pin(async move {
            if !sent {
                return Response::error(
                    "the etcd session is busy: the hold was not recorded; try again",
                );
            }
            match tokio::time::timeout(REQUEST_TIMEOUT * 2, answer).await {
                Ok(Ok(Ok(()))) => {
                    change.note = Some(format!(
                        "recorded in etcd for fleet {cluster:?}: every LB applies it with the \
                         leader's next epoch"
                    ));
                    Response::ok(Answer::Change(change))
                }
                Ok(Ok(Err(e))) => Response::error(format!(
                    "{action} of {} on {vip}: not recorded, nothing changed: {}",
                    key.1,
                    api::error_text(&e)
                )),
                _ => Response::error(format!(
                    "{action} of {} on {vip}: etcd did not answer, nothing changed",
                    key.1
                )),
            }
        }))
    }

    /// `lb cluster status`.
    /// Whether this LB holds the fleet's current state, so that it may take traffic
    /// (`/ready`, and BIRD through `deploy/bird/lb-ready`): it applied the newest
    /// epoch, and every other LB that shares flows (same configuration, alive in
    /// etcd) has sent it all its flows. Once ready it stays ready: an etcd outage or
    /// a peer's restart later must not withdraw every LB at once. Outside a fleet:
    /// ready once attached.
    pub(super) fn readiness(&self) -> Readiness {
        let Some(fleet) = &self.fleet else {
            return Readiness::ready();
        };
        if fleet.ready_at.is_some() {
            return Readiness::ready();
        }
        let state = fleet.session.state.borrow();
        let mut waiting_for = Vec::new();
        let newest = state.epoch.as_ref().map_or(0, |(e, _)| e.epoch);
        if !state.connected && fleet.applied == 0 {
            waiting_for.push("etcd: not connected yet".to_owned());
        } else if fleet.applied == 0 || fleet.applied < newest {
            waiting_for.push(format!(
                "the fleet's epoch {newest} (applied here: {})",
                fleet.applied
            ));
        }
        if let Some(share) = &fleet.share {
            let share = share.state.borrow();
            let digest = self.config.digest();
            for (node, (record, _)) in &state.nodes {
                let peer_shares = record.share.is_some() && record.config_digest == digest;
                let received = share.peers.get(node).is_some_and(|p| p.dump_received);
                if *node != fleet.cluster.node && peer_shares && !received {
                    waiting_for.push(format!("the flows of {node}"));
                }
            }
        }
        Readiness {
            ready: waiting_for.is_empty(),
            waiting_for,
        }
    }

    /// Latches readiness once reached.
    pub(super) fn update_readiness(&mut self) {
        if self.fleet.as_ref().is_some_and(|f| f.ready_at.is_none()) && self.readiness().ready {
            info!("ready: this LB holds the fleet's current epoch and flows");
            if let Some(fleet) = &mut self.fleet {
                fleet.ready_at = Some(Instant::now());
            }
        }
    }

    /// Tells flow sharing the ids in force (after a reload; it starts with them).
    pub(super) fn share_ids(&self) {
        if let Some(share) = self.fleet.as_ref().and_then(|f| f.share.as_ref()) {
            share.set_ids(crate::share::ids::FlowIds::of(&self.desired));
        }
    }

    pub(super) fn cluster_status(&self) -> ClusterStatus {
        let Some(fleet) = &self.fleet else {
            return ClusterStatus::default();
        };
        let state: FleetState = fleet.session.state.borrow().clone();
        let digest = self.config.digest();
        let newest = state.epoch.as_ref().map(|(e, _)| e);
        let nodes = state
            .nodes
            .iter()
            .map(|(node, (r, at))| {
                let tables: BTreeMap<String, Option<String>> = r
                    .vips
                    .iter()
                    .map(|v| (v.vip.clone(), v.digest.clone()))
                    .collect();
                let agrees = newest.is_some_and(|e| {
                    e.vips.iter().all(|v| {
                        tables
                            .get(&v.vip)
                            .is_some_and(|d| d.as_ref() == Some(&v.digest))
                    })
                });
                ClusterNode {
                    node: node.clone(),
                    config_digest: r.config_digest.clone(),
                    same_config: r.config_digest == digest,
                    epoch_applied: r.epoch_applied,
                    age_ms: at.elapsed().as_millis() as u64,
                    tables,
                    agrees,
                }
            })
            .collect();
        let lag_ms = match (&state.epoch, fleet.applied) {
            (Some((e, arrived)), applied) if e.epoch > applied => {
                arrived.elapsed().as_millis() as u64
            }
            _ => 0,
        };
        let readiness = self.readiness();
        ClusterStatus {
            enabled: true,
            ready: readiness.ready,
            waiting_for: readiness.waiting_for,
            share: fleet.share.as_ref().map(|h| h.state.borrow().clone()),
            cluster: fleet.cluster.name.clone(),
            node: fleet.cluster.node.clone(),
            endpoints: fleet.cluster.endpoints.clone(),
            connected: state.connected,
            leading: state.leading,
            leader: state.leader.clone(),
            config_digest: digest,
            epoch_applied: fleet.applied,
            epoch_newest: newest.map_or(0, |e| e.epoch),
            epoch_leader: newest.map(|e| e.leader.clone()),
            epoch_newest_written_ms: newest.map_or(0, |e| e.written_ms),
            epoch_applied_ms: fleet.applied_ms,
            apply_lag_ms: fleet.apply_lag_ms,
            lag_ms,
            not_applied: fleet.not_applied.as_ref().map(|(_, why)| why.clone()),
            tables_here: {
                let names = self.vip_names();
                self.table_digests()
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(k, d)| Some((names.get(&k)?.clone(), d)))
                    .collect()
            },
            down_here: {
                let names = self.vip_names();
                self.locally_down()
                    .iter()
                    .map(|(k, a)| format!("{} {a}", names.get(k).map_or("?", |n| n.as_str())))
                    .collect()
            },
            last_error: state.last_error.clone(),
            published: state.published,
            fenced: state.fenced,
            refused_records: state.refused.iter().map(|b| b.to_string()).collect(),
            nodes,
        }
    }
}
