//! Desired state: what the datapath's maps must hold for a configuration and a set of
//! weights, computed in pure code (no kernel) so it can be tested and compared. The
//! agent computes it and hands it to [`crate::dataplane`], which projects it into the
//! maps, writing only what changed.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use lb_common::{
    maps::{MAX_BACKENDS, MAX_VIPS},
    types::{
        self, FAMILY_V4, FAMILY_V6, NatSettings, PROTO_ICMP, PROTO_ICMPV6, Settings, VIP_F_ECHO,
        VIP_F_ENCAP, VIP_F_HASH_SRC_ONLY, VIP_F_NAT, VipKey, VipMeta, addr_words,
    },
};

use crate::{
    config::{Backend, Config, Forwarding, HashFields, Vip},
    core::{BackendId, control::Table, maglev::MaglevError},
};

/// Everything the maps hold for one configuration and set of weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// Balanced VIPs, by key.
    pub vips: BTreeMap<VipKey, DesiredVip>,
    /// Backend id → backend. Ids are given in config order of VIPs and address order
    /// of their backends on a fresh start, so two agents with one file agree on them;
    /// across reloads a backend that stays keeps its id.
    pub backends: BTreeMap<u32, DesiredBackend>,
    /// One "answer echo" entry per distinct VIP address.
    pub echo: BTreeSet<VipKey>,
    pub settings: Settings,
    /// Full NAT's source addresses and ports (`NAT_SETTINGS`).
    pub nat: NatSettings,
}

/// One VIP's id, settings and lookup table.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredVip {
    /// The VIP as configured, for messages.
    pub name: String,
    /// `meta.active` is not decided here: the dataplane flips it.
    pub meta: VipMeta,
    /// Backend id of every slot; `meta.ring_size` long. Shared, as tables are large.
    pub table: Arc<Vec<u32>>,
    /// The backends' ids in configured order (empty when read back from the maps).
    pub ids: Vec<u32>,
    /// The same table by backend index, with the weights it was built from: what the
    /// control step's move budget compares with (`None` when read back from the maps).
    pub built: Option<Table>,
}

/// One backend of one VIP.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredBackend {
    pub vip: VipKey,
    pub address: IpAddr,
    pub weight: u32,
    pub entry: types::Backend,
}

/// A configuration whose desired state cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("lookup table of VIP {vip}: {source}")]
    Table {
        vip: String,
        #[source]
        source: MaglevError,
    },
    #[error("weights of VIP {vip} are all 0: it would have no backend for new flows")]
    NoWeight { vip: String },
}

/// 16 bytes in network order, IPv4 in the first four, and the family tag.
pub fn addr_bytes(addr: IpAddr) -> ([u8; 16], u8) {
    let mut out = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            (out, FAMILY_V4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

/// The address [`addr_bytes`] gave these bytes and family tag.
pub fn ip_of(bytes: &[u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(*bytes)
    }
}

/// The key of a configured VIP.
pub fn vip_key(vip: &Vip) -> VipKey {
    let (addr, family) = addr_bytes(vip.address);
    VipKey {
        addr,
        port_be: vip.port.to_be(),
        proto: vip.protocol.number(),
        family,
    }
}

impl Desired {
    /// The maps' contents for `config` with the configured weights, from scratch.
    pub fn from_config(config: &Config) -> Result<Desired, PlanError> {
        Desired::plan(config, None, &|_, b, _| (b.weight, 0), &Tables::new())
    }

    /// The maps' contents for `config` with the weight (and `BACKEND_F_*` flags
    /// recording why) that `weight` gives each backend, keeping the VIP and backend
    /// ids of `previous` for whatever stays. A VIP's lookup table is built only when
    /// neither `previous` (same backends, same weights) nor `tables` (the tables the
    /// control steps built) has the table of its weights.
    pub fn plan(
        config: &Config,
        previous: Option<&Desired>,
        weight: &dyn Fn(&Vip, &Backend, BackendId) -> (u32, u8),
        tables: &Tables,
    ) -> Result<Desired, PlanError> {
        let mut ids = IdAllocator::new(previous);
        let mut vips = BTreeMap::new();
        let mut backends = BTreeMap::new();
        let mut echo = BTreeSet::new();
        for vip in &config.vips {
            let key = vip_key(vip);
            let vip_id = ids.vip(key);
            let backend_ids: Vec<u32> = vip
                .backends
                .iter()
                .map(|b| ids.backend(key, b.address))
                .collect();
            let choices: Vec<(u32, u8)> = vip
                .backends
                .iter()
                .zip(&backend_ids)
                .map(|(b, &id)| weight(vip, b, BackendId(id)))
                .collect();
            let weights: Vec<u32> = choices.iter().map(|c| c.0).collect();
            if weights.iter().all(|&w| w == 0) {
                return Err(PlanError::NoWeight {
                    vip: vip.to_string(),
                });
            }
            // The VIP's table in force, when it is the table of these weights.
            let reused = previous.and_then(|p| p.vips.get(&key)).filter(|p| {
                p.ids == backend_ids
                    && p.meta.ring_size == vip.table_size
                    && p.built.as_ref().is_some_and(|t| t.weights == weights)
            });
            let (built, table) = match reused.and_then(|p| Some((p.built.clone()?, p))) {
                Some((built, p)) => (built, Arc::clone(&p.table)),
                None => {
                    let built = table_of(vip, &weights, tables.get(&key))?;
                    let table: Vec<u32> = built
                        .slots
                        .iter()
                        .map(|&i| backend_ids[i as usize])
                        .collect();
                    (built, Arc::new(table))
                }
            };
            for ((b, &id), &(w, flags)) in vip.backends.iter().zip(&backend_ids).zip(&choices) {
                let (addr, family) = addr_bytes(b.address);
                backends.insert(
                    id,
                    DesiredBackend {
                        vip: key,
                        address: b.address,
                        weight: w,
                        entry: types::Backend {
                            addr,
                            mac: b.mac,
                            family,
                            flags,
                            vip_id,
                            weight: w,
                        },
                    },
                );
            }
            vips.insert(
                key,
                DesiredVip {
                    name: vip.to_string(),
                    meta: VipMeta {
                        vip_id,
                        ring_size: vip.table_size,
                        active: 0,
                        flags: vip_flags(vip),
                    },
                    table,
                    ids: backend_ids,
                    built: Some(built),
                },
            );
            let proto = if key.family == FAMILY_V4 {
                PROTO_ICMP
            } else {
                PROTO_ICMPV6
            };
            echo.insert(VipKey {
                addr: key.addr,
                port_be: 0,
                proto,
                family: key.family,
            });
        }
        let mut settings = Settings::default();
        if let Some(v4) = config.encapsulation.source_v4 {
            settings.encap_src_v4 = v4.octets();
        }
        if let Some(v6) = config.encapsulation.source_v6 {
            settings.encap_src_v6 = v6.octets();
        }
        Ok(Desired {
            vips,
            backends,
            echo,
            settings,
            nat: nat_settings(&config.nat),
        })
    }

    /// The meta of an echo entry.
    pub fn echo_meta() -> VipMeta {
        VipMeta {
            vip_id: 0,
            ring_size: 0,
            active: 0,
            flags: VIP_F_ECHO,
        }
    }
}

/// The tables the control steps built, by VIP, for [`Desired::plan`] to use instead
/// of building them again.
pub type Tables = BTreeMap<VipKey, Table>;

/// The table of `weights` for `vip`: `built` when it is that table, else a new build.
fn table_of(vip: &Vip, weights: &[u32], built: Option<&Table>) -> Result<Table, PlanError> {
    if let Some(t) = built.filter(|t| t.weights == weights)
        && t.slots.len() == vip.table_size as usize
    {
        return Ok(t.clone());
    }
    let keys: Vec<[u8; 16]> = vip
        .backends
        .iter()
        .map(|b| addr_bytes(b.address).0)
        .collect();
    Table::build(&keys, weights, vip.table_size).map_err(|source| PlanError::Table {
        vip: vip.to_string(),
        source,
    })
}

/// What the datapath holds of `[nat]`.
pub fn nat_settings(nat: &crate::config::Nat) -> NatSettings {
    let mut settings = NatSettings {
        port_min: u32::from(nat.port_min),
        port_span: u32::from(nat.port_max) - u32::from(nat.port_min) + 1,
        ..NatSettings::default()
    };
    if let Some((first, len)) = nat.source_v4 {
        settings.first_v4 = addr_words(&addr_bytes(IpAddr::V4(first)).0)[0];
        settings.count_v4 = 1 << (32 - u32::from(len));
    }
    if let Some((first, len)) = nat.source_v6 {
        settings.first_v6 = addr_words(&first.octets());
        settings.count_v6 = 1 << (128 - u32::from(len));
    }
    settings
}

/// A VIP's `VIP_F_*` flags: its hash fields and forwarding.
fn vip_flags(vip: &Vip) -> u32 {
    let mut flags = match vip.hash {
        HashFields::FiveTuple => 0,
        HashFields::Source => VIP_F_HASH_SRC_ONLY,
    };
    match vip.forwarding {
        Forwarding::Dsr => {}
        Forwarding::Ipip => flags |= VIP_F_ENCAP,
        Forwarding::Nat => flags |= VIP_F_NAT,
    }
    flags
}

/// Hands out VIP and backend ids: the previous id for whatever already had one, the
/// lowest free id otherwise. Config validation bounds the counts, so ids fit.
struct IdAllocator {
    old_vips: BTreeMap<VipKey, u32>,
    old_backends: BTreeMap<(VipKey, IpAddr), u32>,
    used_vips: BTreeSet<u32>,
    used_backends: BTreeSet<u32>,
}

impl IdAllocator {
    fn new(previous: Option<&Desired>) -> IdAllocator {
        let (old_vips, old_backends) = match previous {
            Some(p) => (
                p.vips.iter().map(|(k, v)| (*k, v.meta.vip_id)).collect(),
                p.backends
                    .iter()
                    .map(|(id, b)| ((b.vip, b.address), *id))
                    .collect(),
            ),
            None => (BTreeMap::new(), BTreeMap::new()),
        };
        // Ids that survive are reserved up front, so a new VIP never takes one.
        IdAllocator {
            used_vips: BTreeSet::new(),
            used_backends: BTreeSet::new(),
            old_vips,
            old_backends,
        }
    }

    fn vip(&mut self, key: VipKey) -> u32 {
        let id = self
            .old_vips
            .get(&key)
            .copied()
            .unwrap_or_else(|| lowest_free(&self.used_vips, self.old_vips.values(), MAX_VIPS));
        self.used_vips.insert(id);
        id
    }

    fn backend(&mut self, vip: VipKey, address: IpAddr) -> u32 {
        let id = self
            .old_backends
            .get(&(vip, address))
            .copied()
            .unwrap_or_else(|| {
                lowest_free(
                    &self.used_backends,
                    self.old_backends.values(),
                    MAX_BACKENDS,
                )
            });
        self.used_backends.insert(id);
        id
    }
}

/// The lowest id in `0..max` neither used now nor held by a previous entry.
fn lowest_free<'a>(used: &BTreeSet<u32>, held: impl Iterator<Item = &'a u32>, max: u32) -> u32 {
    let held: BTreeSet<u32> = held.copied().collect();
    (0..max)
        .find(|id| !used.contains(id) && !held.contains(id))
        .expect("config validation bounds the id count")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_VIPS: &str = r#"
[[vip]]
address = "198.18.1.1"
port = 80
protocol = "tcp"
table_size = 251
[[vip.backend]]
address = "198.18.0.12"
mac = "02:00:00:00:00:12"
weight = 1
[[vip.backend]]
address = "198.18.0.11"
mac = "02:00:00:00:00:11"
weight = 1

[[vip]]
address = "fd00:18:1::1"
port = 53
protocol = "udp"
hash = "source"
table_size = 257
[[vip.backend]]
address = "fd00:18::11"
mac = "02:00:00:00:00:21"
weight = 3
"#;

    fn key(desired: &Desired, i: usize) -> VipKey {
        *desired
            .vips
            .iter()
            .find(|(_, v)| v.meta.vip_id == i as u32)
            .unwrap()
            .0
    }

    #[test]
    fn ids_are_dense_and_tables_point_at_the_vips_own_backends() {
        let desired = Desired::from_config(&Config::parse(TWO_VIPS).unwrap()).unwrap();
        assert_eq!(desired.backends.len(), 3);
        assert_eq!(
            desired.backends[&0].address,
            "198.18.0.11".parse::<IpAddr>().unwrap()
        );
        let v0 = &desired.vips[&key(&desired, 0)];
        assert_eq!(v0.table.len(), 251);
        assert!(v0.table.iter().all(|&id| id < 2));
        assert!(v0.table.contains(&0) && v0.table.contains(&1));
        let v1 = &desired.vips[&key(&desired, 1)];
        assert!(v1.table.iter().all(|&id| id == 2));
        assert_eq!(v1.meta.flags, VIP_F_HASH_SRC_ONLY);
        assert_eq!(key(&desired, 1).family, FAMILY_V6);
        assert_eq!(key(&desired, 1).port_be, 53u16.to_be());
        assert_eq!(desired.echo.len(), 2);
    }

    #[test]
    fn ids_survive_a_reload_that_removes_and_adds() {
        let before = Desired::from_config(&Config::parse(TWO_VIPS).unwrap()).unwrap();
        // Drop the first VIP's first backend (198.18.0.11, id 0), add a new one.
        let text = TWO_VIPS.replace("198.18.0.11", "198.18.0.13");
        let after = Desired::plan(
            &Config::parse(&text).unwrap(),
            Some(&before),
            &|_, b, _| (b.weight, 0),
            &Tables::new(),
        )
        .unwrap();
        let id_of = |d: &Desired, a: &str| {
            *d.backends
                .iter()
                .find(|(_, b)| b.address == a.parse::<IpAddr>().unwrap())
                .unwrap()
                .0
        };
        assert_eq!(id_of(&after, "198.18.0.12"), id_of(&before, "198.18.0.12"));
        assert_eq!(id_of(&after, "fd00:18::11"), id_of(&before, "fd00:18::11"));
        // The new backend does not reuse a surviving id.
        let new = id_of(&after, "198.18.0.13");
        assert!(new != id_of(&after, "198.18.0.12") && new != id_of(&after, "fd00:18::11"));
        assert_eq!(after.vips.len(), 2);
        for (k, v) in &before.vips {
            assert_eq!(after.vips[k].meta.vip_id, v.meta.vip_id);
        }
    }

    #[test]
    fn weights_come_from_the_caller_and_zero_drains() {
        let config = Config::parse(TWO_VIPS).unwrap();
        let drained = "198.18.0.11".parse::<IpAddr>().unwrap();
        let desired = Desired::plan(
            &config,
            None,
            &|_, b, _| (if b.address == drained { 0 } else { b.weight }, 0),
            &Tables::new(),
        )
        .unwrap();
        let v0 = &desired.vips[&key(&desired, 0)];
        assert!(
            v0.table.iter().all(|&id| id == 1),
            "the drained backend (id 0) still has slots"
        );
        let all_zero = Desired::plan(
            &config,
            None,
            &|v, b, _| (if v.port == 80 { 0 } else { b.weight }, 0),
            &Tables::new(),
        );
        assert!(matches!(all_zero, Err(PlanError::NoWeight { .. })));
    }
}
