//! Desired state: what the datapath's maps must hold for a configuration, computed in
//! pure code (no kernel), so it can be tested and compared. The agent computes it from
//! the config and hands it to [`crate::dataplane`], which projects it into the maps.

use std::net::IpAddr;

use lb_common::types::{self, FAMILY_V4, FAMILY_V6, VIP_F_HASH_SRC_ONLY, VipKey, VipMeta};

use crate::{
    config::{Config, HashFields},
    maglev::{self, MaglevBackend, MaglevError},
};

/// Everything the maps hold for one configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub vips: Vec<DesiredVip>,
    /// Backend id → backend, for every id in use. Ids are dense from 0, given in
    /// config order of VIPs and address order of their backends, so two agents with
    /// the same file agree on them.
    pub backends: Vec<types::Backend>,
}

/// One VIP's key, settings and lookup table.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredVip {
    pub key: VipKey,
    pub meta: VipMeta,
    /// Backend id of every slot; `meta.ring_size` long.
    pub table: Vec<u32>,
}

/// A configuration whose lookup table cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("lookup table of VIP {vip}: {source}")]
pub struct TableError {
    pub vip: String,
    #[source]
    pub source: MaglevError,
}

/// 16 bytes in network order, IPv4 in the first four.
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

impl Desired {
    /// Computes the maps' contents for `config`, with each backend's configured weight.
    pub fn from_config(config: &Config) -> Result<Desired, TableError> {
        let mut backends = Vec::new();
        let mut vips = Vec::with_capacity(config.vips.len());
        for (vip_id, vip) in config.vips.iter().enumerate() {
            let first_id = backends.len() as u32;
            let keys: Vec<[u8; 16]> = vip
                .backends
                .iter()
                .map(|b| addr_bytes(b.address).0)
                .collect();
            let input: Vec<MaglevBackend<'_>> = vip
                .backends
                .iter()
                .zip(&keys)
                .map(|(b, key)| MaglevBackend {
                    key: key.as_slice(),
                    weight: b.weight,
                })
                .collect();
            let table = maglev::build(&input, vip.table_size)
                .map_err(|source| TableError {
                    vip: vip.to_string(),
                    source,
                })?
                .into_iter()
                .map(|index| first_id + index)
                .collect();
            for b in &vip.backends {
                let (addr, family) = addr_bytes(b.address);
                backends.push(types::Backend {
                    addr,
                    mac: b.mac,
                    family,
                    _pad: 0,
                });
            }
            let (addr, family) = addr_bytes(vip.address);
            let flags = match vip.hash {
                HashFields::FiveTuple => 0,
                HashFields::Source => VIP_F_HASH_SRC_ONLY,
            };
            vips.push(DesiredVip {
                key: VipKey {
                    addr,
                    port_be: vip.port.to_be(),
                    proto: vip.protocol.number(),
                    family,
                },
                meta: VipMeta {
                    vip_id: vip_id as u32,
                    ring_size: vip.table_size,
                    active: 0,
                    flags,
                },
                table,
            });
        }
        Ok(Desired { vips, backends })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_dense_and_tables_point_at_the_vips_own_backends() {
        let config = Config::parse(
            r#"
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
"#,
        )
        .unwrap();
        let desired = Desired::from_config(&config).unwrap();
        assert_eq!(desired.backends.len(), 3);
        assert_eq!(desired.backends[0].addr[..4], [198, 18, 0, 11]);
        assert_eq!(desired.vips[0].table.len(), 251);
        assert!(desired.vips[0].table.iter().all(|&id| id < 2));
        assert!(desired.vips[0].table.contains(&0) && desired.vips[0].table.contains(&1));
        assert!(desired.vips[1].table.iter().all(|&id| id == 2));
        assert_eq!(desired.vips[1].meta.flags, VIP_F_HASH_SRC_ONLY);
        assert_eq!(desired.vips[1].key.family, FAMILY_V6);
        assert_eq!(desired.vips[1].key.port_be, 53u16.to_be());
    }
}
