//! What an operator action changed, for its answer ([`Change`]): every backend whose
//! weight or hold changed, and the lookup table slots that moved, found by comparing
//! the desired tables before and after slot by slot (a slot moved when its backend
//! differs). Pure; called by `overrides` with the agent's state on both sides.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use lb_common::types::VipKey;

use super::{Override, control_of};
use crate::{
    agent::tick::unit,
    api::{BackendChange, Change, Control, SlotMove, VipChange, VipChangeKind},
    config::Config,
    desired::{Desired, DesiredVip, vip_key},
};

/// One side of a change: a configuration, what the maps hold for it, and the holds.
pub(super) struct Side<'a> {
    pub config: &'a Config,
    pub desired: &'a Desired,
    pub overrides: &'a BTreeMap<(VipKey, IpAddr), Override>,
}

/// One backend as a side shows it.
#[derive(Clone, Copy, PartialEq)]
struct Held {
    /// In configured units, to two decimals (as `backend list` shows it).
    weight: f64,
    control: Control,
}

impl Side<'_> {
    /// Every backend of every VIP, by (VIP, address).
    fn backends(&self) -> BTreeMap<(VipKey, IpAddr), Held> {
        let units: BTreeMap<VipKey, u32> = self
            .config
            .vips
            .iter()
            .map(|v| (vip_key(v), unit(v)))
            .collect();
        self.desired
            .backends
            .values()
            .map(|b| {
                let unit = units.get(&b.vip).copied().unwrap_or(1).max(1);
                let key = (b.vip, b.address);
                let held = Held {
                    weight: (b.weight as f64 / unit as f64 * 100.0).round() / 100.0,
                    control: control_of(self.overrides.get(&key)),
                };
                (key, held)
            })
            .collect()
    }

    /// The backend address of each slot of `vip`'s table.
    fn slots(&self, vip: &DesiredVip) -> Vec<Option<IpAddr>> {
        let address: HashMap<u32, IpAddr> = self
            .desired
            .backends
            .iter()
            .map(|(&id, b)| (id, b.address))
            .collect();
        vip.table
            .iter()
            .map(|id| address.get(id).copied())
            .collect()
    }
}

/// The slots of one VIP's table that moved, by (from, to) backend, and how many each
/// backend holds before and after.
#[derive(Default)]
struct Moves {
    moved: usize,
    between: BTreeMap<(IpAddr, IpAddr), usize>,
    before: BTreeMap<IpAddr, usize>,
    after: BTreeMap<IpAddr, usize>,
}

impl Moves {
    fn of(before: &[Option<IpAddr>], after: &[Option<IpAddr>]) -> Moves {
        let mut m = Moves::default();
        for a in before.iter().flatten() {
            *m.before.entry(*a).or_default() += 1;
        }
        for a in after.iter().flatten() {
            *m.after.entry(*a).or_default() += 1;
        }
        for i in 0..before.len().max(after.len()) {
            let (old, new) = (
                before.get(i).copied().flatten(),
                after.get(i).copied().flatten(),
            );
            if old == new {
                continue;
            }
            m.moved += 1;
            if let (Some(old), Some(new)) = (old, new) {
                *m.between.entry((old, new)).or_default() += 1;
            }
        }
        m
    }

    /// Slots `backend` gave up (`gave`) or took over, by the other backend, most first.
    fn of_backend(&self, backend: IpAddr, gave: bool) -> Vec<SlotMove> {
        let mut out: Vec<SlotMove> = self
            .between
            .iter()
            .filter_map(|(&(from, to), &slots)| match gave {
                true if from == backend => Some(SlotMove { backend: to, slots }),
                false if to == backend => Some(SlotMove {
                    backend: from,
                    slots,
                }),
                _ => None,
            })
            .collect();
        out.sort_by(|a, b| b.slots.cmp(&a.slots).then(a.backend.cmp(&b.backend)));
        out
    }
}

/// What changed from `before` to `after`, answering an action described by `action`.
/// `target` (the backend the request named) is listed even when nothing about it
/// changed, so that the answer can say so.
pub(super) fn between(
    action: String,
    before: &Side,
    after: &Side,
    target: Option<(VipKey, IpAddr)>,
) -> Change {
    let names: BTreeMap<VipKey, String> = after
        .desired
        .vips
        .iter()
        .chain(&before.desired.vips)
        .map(|(k, v)| (*k, v.name.clone()))
        .collect();
    let mut moves: BTreeMap<VipKey, Moves> = BTreeMap::new();
    let mut vips = Vec::new();
    for (key, name) in &names {
        let old = before.desired.vips.get(key);
        let new = after.desired.vips.get(key);
        let (change, size) = match (old, new) {
            (Some(_), None) => (VipChangeKind::Removed, old.map_or(0, |v| v.table.len())),
            (None, Some(v)) => (VipChangeKind::Added, v.table.len()),
            _ => (VipChangeKind::Changed, new.map_or(0, |v| v.table.len())),
        };
        let m = Moves::of(
            &old.map(|v| before.slots(v)).unwrap_or_default(),
            &new.map(|v| after.slots(v)).unwrap_or_default(),
        );
        if change != VipChangeKind::Changed || m.moved > 0 {
            vips.push(VipChange {
                vip: name.clone(),
                change,
                size,
                slots_moved: m.moved,
            });
        }
        moves.insert(*key, m);
    }
    let (old, new) = (before.backends(), after.backends());
    let mut keys: Vec<(VipKey, IpAddr)> = old.keys().chain(new.keys()).copied().collect();
    keys.sort();
    keys.dedup();
    let backends = keys
        .into_iter()
        .filter(|k| old.get(k) != new.get(k) || Some(*k) == target)
        .map(|key @ (vip, address)| {
            let m = moves.get(&vip);
            let count = |side: fn(&Moves) -> &BTreeMap<IpAddr, usize>| {
                m.and_then(|m| side(m).get(&address)).copied().unwrap_or(0)
            };
            BackendChange {
                vip: names.get(&vip).cloned().unwrap_or_default(),
                backend: address,
                named: Some(key) == target,
                weight_before: old.get(&key).map(|h| h.weight),
                weight: new.get(&key).map(|h| h.weight),
                control_before: old.get(&key).map(|h| h.control),
                control: new.get(&key).map(|h| h.control),
                slots_before: count(|m| &m.before),
                slots: count(|m| &m.after),
                moved_to: m.map(|m| m.of_backend(address, true)).unwrap_or_default(),
                moved_from: m.map(|m| m.of_backend(address, false)).unwrap_or_default(),
            }
        })
        .collect();
    Change {
        action,
        changed: before.desired != after.desired || before.overrides != after.overrides,
        note: None,
        backends,
        vips,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, desired::Desired};

    const CONFIG: &str = r#"
[[vip]]
address = "198.18.1.1"
port = 80
protocol = "tcp"
table_size = 1009

[[vip.backend]]
address = "198.18.0.11"
mac = "02:00:00:00:00:11"
weight = 1

[[vip.backend]]
address = "198.18.0.12"
mac = "02:00:00:00:00:12"
weight = 1
"#;

    /// The desired state of `config` with `hold` on 198.18.0.11 (weights as the
    /// agent's plan gives them, in policy units).
    fn desired(config: &Config, previous: Option<&Desired>, drained: bool) -> Desired {
        let unit = unit(&config.vips[0]);
        Desired::plan(
            config,
            previous,
            &|_, b, _| {
                let eleven = b.address == "198.18.0.11".parse::<IpAddr>().unwrap();
                (
                    if drained && eleven {
                        0
                    } else {
                        b.weight * unit
                    },
                    0,
                )
            },
            &crate::desired::Tables::new(),
        )
        .unwrap()
    }

    #[test]
    fn a_drain_moves_every_slot_of_the_backend_to_the_others() {
        let config = Config::parse(CONFIG).unwrap();
        let old = desired(&config, None, false);
        let new = desired(&config, Some(&old), true);
        let eleven: IpAddr = "198.18.0.11".parse().unwrap();
        let twelve: IpAddr = "198.18.0.12".parse().unwrap();
        let key = (vip_key(&config.vips[0]), eleven);
        let none = BTreeMap::new();
        let drained = BTreeMap::from([(key, Override::Drain)]);
        let change = between(
            "drained".into(),
            &Side {
                config: &config,
                desired: &old,
                overrides: &none,
            },
            &Side {
                config: &config,
                desired: &new,
                overrides: &drained,
            },
            Some(key),
        );
        assert!(change.changed);
        // Only the drained backend's weight changed: the other is not listed.
        assert_eq!(change.backends.len(), 1, "{change:?}");
        let b = &change.backends[0];
        assert_eq!((b.weight_before, b.weight), (Some(1.0), Some(0.0)));
        assert_eq!(
            (b.control_before, b.control),
            (Some(Control::Policy), Some(Control::Drained))
        );
        assert_eq!(b.slots, 0);
        assert!(b.slots_before > 400, "{b:?}");
        assert_eq!(
            b.moved_to,
            vec![SlotMove {
                backend: twelve,
                slots: b.slots_before
            }]
        );
        assert!(b.moved_from.is_empty());
        assert_eq!(change.vips.len(), 1);
        assert_eq!(change.vips[0].slots_moved, b.slots_before);
        assert_eq!(change.vips[0].size, 1009);

        // The same state on both sides: nothing changed, the target still listed.
        let same = Side {
            config: &config,
            desired: &new,
            overrides: &drained,
        };
        let change = between("drained".into(), &same, &same, Some(key));
        assert!(!change.changed && change.vips.is_empty());
        assert_eq!(change.backends.len(), 1);
        assert!(change.backends[0].moved_to.is_empty());
    }
}
