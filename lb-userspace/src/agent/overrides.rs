//! Operator actions on a running agent: the control socket's requests (dispatched
//! by [`Agent::handle`], called by the loop), the holds (`weight set`, `weight pin`,
//! `drain`) they place, and `reload`. Each is applied completely, or refused with
//! nothing changed, and answers with what it changed (see `change`).

mod change;

use std::{collections::BTreeMap, net::IpAddr, time::Instant};

use lb_common::types::{BACKEND_F_DRAINED, BACKEND_F_PINNED, BACKEND_F_SET, VipKey};

use self::change::Side;
use super::{
    Agent,
    tick::{Weights, plan, unit, vip_control},
};
use crate::{
    api::{self, Answer, Change, Control, Request, Response},
    config::{Config, ConfigError, MAX_WEIGHT, Vip},
    core::{BackendId, control::VipControl},
    dataplane::DataplaneError,
    desired::{Desired, PlanError, Tables, vip_key},
    signals::Signals,
};

/// Why a control request was refused (nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{backend} is not a backend of any VIP")]
    NotABackend { backend: IpAddr },
    #[error("{backend} serves {} VIPs; name one with --vip ({})", serving.len(), serving.join(", "))]
    WhichVip {
        backend: IpAddr,
        serving: Vec<String>,
    },
    #[error("{backend} is not a backend of VIP {vip:?}; it serves {}", serving.join(", "))]
    NotOfVip {
        backend: IpAddr,
        vip: String,
        serving: Vec<String>,
    },
    #[error("weight {weight} is above {MAX_WEIGHT}")]
    WeightTooHigh { weight: u32 },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Dataplane(Box<DataplaneError>),
    #[error(
        "[cluster] differs from the running agent's: it cannot change by reload; restart \
         the agent to join another fleet or change how it reaches etcd"
    )]
    ClusterChanged,
    #[error(
        "[datapath] differs from the running agent's: its tables are created with the \
         datapath and cannot change by reload or restart; to resize them, stop the agent, \
         `lb detach` and start it again (every established flow then loses its entry)"
    )]
    DatapathChanged,
    #[error(
        "a VIP forwards by nat, but the datapath was created when none did, with NAT tables \
         of 256 entries: stop the agent, `lb detach` and start it again to create them at \
         [datapath] nat_table_v4/nat_table_v6 (every established flow then loses its entry)"
    )]
    NatTablesMissing,
}

impl From<DataplaneError> for RequestError {
    fn from(e: DataplaneError) -> RequestError {
        RequestError::Dataplane(Box::new(e))
    }
}

/// An operator's hold on one backend's weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Override {
    /// `weight set`: until `auto` or the next reload.
    Set(u32),
    /// `weight pin`: until `auto`, across reloads.
    Pin(u32),
    /// `drain`: weight 0 until `undrain` or `auto`.
    Drain,
}

impl Override {
    /// The hold in words, as a request that asks for it again is told: `set to 5`.
    fn words(self) -> String {
        match self {
            Override::Set(w) => format!("set to {w}"),
            Override::Pin(w) => format!("pinned at {w}"),
            Override::Drain => "drained".to_owned(),
        }
    }
}

/// What a hold request asks for (see [`Agent::ask`]).
pub(super) enum Asked {
    /// What already holds: nothing to do; the answer says so.
    Unchanged(Change),
    /// Place (`Some`) or lift (`None`) the hold on `key`.
    Hold {
        action: String,
        key: (VipKey, IpAddr),
        hold: Option<Override>,
    },
}

/// Who decides a backend's weight, given its hold (if any).
pub(super) fn control_of(hold: Option<&Override>) -> Control {
    match hold {
        None => Control::Policy,
        Some(Override::Set(_)) => Control::Set,
        Some(Override::Pin(_)) => Control::Pinned,
        Some(Override::Drain) => Control::Drained,
    }
}

/// The overrides an earlier agent recorded in the pinned backend entries (their
/// weights are in policy units; holds are kept in configured units).
pub(super) fn overrides_of(
    previous: &Desired,
    config: &Config,
) -> BTreeMap<(VipKey, IpAddr), Override> {
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
    /// Answers one control request; a refusal says why, with nothing changed.
    pub(super) fn handle(&mut self, request: Request) -> Response<Answer> {
        let answer = match request {
            Request::Status => Ok(Answer::Status(Box::new(self.status()))),
            Request::VipList => Ok(Answer::Vips(self.vip_list())),
            Request::BackendList => Ok(Answer::Backends(self.backend_views())),
            Request::Stats => self.stats().map(Answer::Stats).map_err(RequestError::from),
            Request::Explain => Ok(Answer::Explain(self.explain())),
            Request::Tables => self
                .tables()
                .map(Answer::Tables)
                .map_err(RequestError::from),
            Request::Reload => self.reload_change().map(Answer::Change),
            Request::ClusterStatus => Ok(Answer::Cluster(Box::new(self.cluster_status()))),
            hold => match self.ask(&hold) {
                Ok(Asked::Unchanged(change)) => Ok(change),
                Ok(Asked::Hold { action, key, hold }) => {
                    self.change_overrides(action, key, |overrides| match hold {
                        Some(o) => {
                            overrides.insert(key, o);
                        }
                        None => {
                            overrides.remove(&key);
                        }
                    })
                }
                Err(e) => Err(e),
            }
            .map(Answer::Change),
        };
        match answer {
            Ok(answer) => Response::ok(answer),
            Err(e) => Response::error(api::error_text(&e)),
        }
    }

    /// The (VIP, address) a request names; the VIP may be left out when the address
    /// serves only one.
    fn find(&self, backend: IpAddr, vip: Option<&str>) -> Result<(VipKey, IpAddr), RequestError> {
        let serving: Vec<&Vip> = self
            .config
            .vips
            .iter()
            .filter(|v| v.backends.iter().any(|b| b.address == backend))
            .collect();
        let names = || serving.iter().map(|v| v.to_string()).collect();
        match (vip, serving.as_slice()) {
            (_, []) => Err(RequestError::NotABackend { backend }),
            (None, [one]) => Ok((vip_key(one), backend)),
            (None, _) => Err(RequestError::WhichVip {
                backend,
                serving: names(),
            }),
            (Some(name), many) => match many.iter().find(|v| v.to_string() == name) {
                Some(v) => Ok((vip_key(v), backend)),
                None => Err(RequestError::NotOfVip {
                    backend,
                    vip: name.to_owned(),
                    serving: names(),
                }),
            },
        }
    }

    /// What a hold request (`weight set|pin|auto`, `drain`, `undrain`) asks for:
    /// a hold placed (`Some`) or lifted (`None`) on one backend, or nothing, when it
    /// asks for what already holds (which is not an error, and says so).
    pub(super) fn ask(&self, request: &Request) -> Result<Asked, RequestError> {
        let (backend, vip, hold) = match request {
            Request::WeightSet {
                backend,
                vip,
                weight,
            } => (backend, vip, Some(Override::Set(*weight))),
            Request::WeightPin {
                backend,
                vip,
                weight,
            } => (backend, vip, Some(Override::Pin(*weight))),
            Request::WeightAuto { backend, vip } => (backend, vip, None),
            Request::Drain { backend, vip } => (backend, vip, Some(Override::Drain)),
            Request::Undrain { backend, vip } => {
                let key = self.find(*backend, vip.as_deref())?;
                let action = "undrained".to_owned();
                return Ok(match self.overrides.get(&key) {
                    Some(Override::Drain) => Asked::Hold {
                        action,
                        key,
                        hold: None,
                    },
                    None => Asked::Unchanged(self.unchanged(action, key, "not drained".into())),
                    Some(&held) => Asked::Unchanged(self.unchanged(
                        action,
                        key,
                        format!("not drained ({})", held.words()),
                    )),
                });
            }
            other => unreachable!("{other} is not a hold request"),
        };
        if let Some(Override::Set(w) | Override::Pin(w)) = hold
            && w > MAX_WEIGHT
        {
            return Err(RequestError::WeightTooHigh { weight: w });
        }
        let key = self.find(*backend, vip.as_deref())?;
        let action = match hold {
            Some(Override::Set(w)) => format!("weight set to {w}"),
            Some(Override::Pin(w)) => format!("weight pinned at {w}"),
            Some(Override::Drain) => "drained".to_owned(),
            None => "weight given back to the policy".to_owned(),
        };
        Ok(match (self.overrides.get(&key).copied(), hold) {
            (Some(held), Some(asked)) if held == asked => {
                Asked::Unchanged(self.unchanged(action, key, format!("already {}", held.words())))
            }
            (None, None) => Asked::Unchanged(self.unchanged(
                action,
                key,
                "already decided by the policy".into(),
            )),
            _ => Asked::Hold { action, key, hold },
        })
    }

    /// The answer to a request that asked for what already holds.
    fn unchanged(&self, action: String, key: (VipKey, IpAddr), note: String) -> Change {
        let side = self.side();
        Change {
            note: Some(note),
            ..change::between(action, &side, &side, Some(key))
        }
    }

    /// The agent's state as a [`Change`] compares it.
    fn side(&self) -> Side<'_> {
        Side {
            config: &self.config,
            desired: &self.desired,
            overrides: &self.overrides,
        }
    }

    /// What placing (`Some`) or lifting (`None`) `hold` on `key` would change, as a
    /// single LB would apply it, without applying it; refused if it would leave a VIP
    /// without weight. A fleet member answers a fleet hold with this.
    pub(super) fn preview(
        &self,
        action: String,
        key: (VipKey, IpAddr),
        hold: Option<Override>,
    ) -> Result<Change, RequestError> {
        let mut overrides = self.overrides.clone();
        match hold {
            Some(o) => overrides.insert(key, o),
            None => overrides.remove(&key),
        };
        self.planned(action, key, &overrides)
            .map(|(_, change)| change)
    }

    /// The plan of `overrides` (refused if a VIP would be left without weight) and
    /// what it changes against what is in force.
    fn planned(
        &self,
        action: String,
        target: (VipKey, IpAddr),
        overrides: &BTreeMap<(VipKey, IpAddr), Override>,
    ) -> Result<(Desired, Change), RequestError> {
        let desired = plan(
            &self.config,
            Some(&self.desired),
            Weights::Local(overrides),
            &self.control,
            &Tables::new(),
        )?;
        let change = change::between(
            action,
            &self.side(),
            &Side {
                config: &self.config,
                desired: &desired,
                overrides,
            },
            Some(target),
        );
        Ok((desired, change))
    }

    /// Applies a change of overrides completely, or not at all: the new plan is
    /// computed (and refused if a VIP would be left without weight) before anything
    /// is written. Answers with the weights and table slots that changed.
    fn change_overrides(
        &mut self,
        action: String,
        target: (VipKey, IpAddr),
        change: impl FnOnce(&mut BTreeMap<(VipKey, IpAddr), Override>),
    ) -> Result<Change, RequestError> {
        let mut overrides = self.overrides.clone();
        change(&mut overrides);
        let (desired, answer) = self.planned(action, target, &overrides)?;
        self.dataplane.apply(&desired)?;
        self.overrides = overrides;
        self.desired = desired;
        Ok(answer)
    }

    /// Re-reads the configuration file (SIGHUP); see [`Agent::reload_change`].
    pub(super) fn reload(&mut self) -> Result<(), RequestError> {
        self.reload_change().map(|_| ())
    }

    /// Re-reads the configuration file: validated completely, then applied, or
    /// refused with nothing changed. `weight set` holds end here; pins stay. Answers
    /// with what changed.
    fn reload_change(&mut self) -> Result<Change, RequestError> {
        let result = self.apply_config();
        self.last_reload = Some((
            Instant::now(),
            result.as_ref().map(|_| ()).map_err(|e| api::error_text(e)),
        ));
        result
    }

    /// A reload's work: the new file's plan, applied, or an error with nothing changed.
    fn apply_config(&mut self) -> Result<Change, RequestError> {
        let config = Config::load(&self.opts.config)?;
        if config.cluster != self.config.cluster {
            return Err(RequestError::ClusterChanged);
        }
        if config.datapath != self.config.datapath {
            return Err(RequestError::DatapathChanged);
        }
        // The NAT tables as the datapath has them (created, or adopted): a datapath
        // created when no VIP forwarded by nat has them at 256 entries.
        let nat_room = self
            .dataplane
            .map_memory()
            .iter()
            .find(|m| m.name == lb_common::maps::names::NAT_V4)
            .map(|m| m.max_entries);
        if config.uses_nat() && nat_room == Some(lb_common::maps::NAT_TABLE_UNUSED) {
            return Err(RequestError::NatTablesMissing);
        }
        let mut overrides = self.overrides.clone();
        if self.fleet.is_none() {
            // A fleet's holds are the fleet's: they stay until lifted in etcd.
            overrides.retain(|_, o| !matches!(o, Override::Set(_)));
        }
        // A VIP whose policy did not change keeps what it learned about the
        // backends that stay (a backend keeps its id while its address stays);
        // a new VIP, a new backend and a VIP with another policy start from the
        // configured weights of the new file.
        let mut control: BTreeMap<VipKey, VipControl> = BTreeMap::new();
        for vip in &config.vips {
            let key = vip_key(vip);
            let mut fresh = vip_control(vip, &config.control);
            let same_policy = self
                .config
                .vips
                .iter()
                .find(|v| vip_key(v) == key)
                .is_some_and(|old| old.policy == vip.policy);
            if same_policy && let Some(old) = self.control.get(&key) {
                let staying: Vec<BackendId> = self
                    .desired
                    .backends
                    .iter()
                    .filter(|(_, b)| {
                        b.vip == key && vip.backends.iter().any(|n| n.address == b.address)
                    })
                    .map(|(&id, _)| BackendId(id))
                    .collect();
                fresh.state = old.state.carried(&staying);
                fresh.decisions = old.decisions.clone();
            }
            control.insert(key, fresh);
        }
        let down = self.locally_down();
        let weights = match &self.fleet {
            Some(fleet) => Weights::Fleet {
                holds: &overrides,
                down: &down,
                in_force: &fleet.in_force,
            },
            None => Weights::Local(&overrides),
        };
        let desired = plan(
            &config,
            Some(&self.desired),
            weights,
            &control,
            &Tables::new(),
        )?;
        self.dataplane.apply(&desired)?;
        let answer = change::between(
            format!("configuration reloaded from {}", self.opts.config.display()),
            &self.side(),
            &Side {
                config: &config,
                desired: &desired,
                overrides: &overrides,
            },
            None,
        );
        // A new predictor alone keeps the models and what they learned.
        let same_but_predictor = crate::config::Control {
            predictor: self.config.control.predictor,
            ..config.control
        } == self.config.control;
        if config.vips != self.config.vips || !same_but_predictor {
            self.signals = Signals::start(&config);
        } else if config.control.predictor != self.config.control.predictor {
            self.signals.set_predictor(config.control.predictor);
        }
        self.config = config;
        self.overrides = overrides;
        self.control = control;
        self.desired = desired;
        // The only change of ids: flow sharing names flows by them.
        self.share_ids();
        Ok(answer)
    }
}
