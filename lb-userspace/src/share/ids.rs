//! How this LB numbers what a flow names: VIP and backend ids in its maps against
//! the addresses peers use. The agent sends a new [`FlowIds`] whenever its desired
//! state's ids change (start, reload); the sharing thread reads the newest.

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::types::{
    ConnEntry, ConnKeyV4, ConnKeyV6, FAMILY_V4, SharedFlow, VipKey, addr_bytes, addr_words,
};

use super::wire::Flow;
use crate::desired::Desired;

/// Ids both ways.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowIds {
    vips: BTreeMap<u32, VipKey>,
    vip_ids: BTreeMap<VipKey, u32>,
    backends: BTreeMap<u32, IpAddr>,
    backend_ids: BTreeMap<(u32, IpAddr), u32>,
}

/// A flow's place in this LB's connection tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    V4(ConnKeyV4, ConnEntry),
    V6(ConnKeyV6, ConnEntry),
}

/// Why a peer's flow has no place here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unknown {
    #[error("a VIP this LB does not serve")]
    Vip,
    #[error("a backend this LB does not have for that VIP")]
    Backend,
}

impl FlowIds {
    /// The ids of `desired`.
    pub fn of(desired: &Desired) -> FlowIds {
        let mut ids = FlowIds::default();
        for (key, vip) in &desired.vips {
            ids.vips.insert(vip.meta.vip_id, *key);
            ids.vip_ids.insert(*key, vip.meta.vip_id);
        }
        for (&id, b) in &desired.backends {
            if let Some(&vip_id) = ids.vip_ids.get(&b.vip) {
                ids.backends.insert(id, b.address);
                ids.backend_ids.insert((vip_id, b.address), id);
            }
        }
        ids
    }

    /// The flow a datapath record stands for; `None` if its ids are not (or no
    /// longer) in the desired state.
    pub fn flow(&self, record: &SharedFlow) -> Option<Flow> {
        let vip = *self.vips.get(&record.vip_id)?;
        let backend = *self.backends.get(&record.backend_id)?;
        let client = addr_bytes(&record.key.src);
        let client = if record.family == FAMILY_V4 {
            IpAddr::from(<[u8; 4]>::try_from(&client[..4]).expect("4 bytes"))
        } else {
            IpAddr::from(client)
        };
        Some(Flow {
            vip,
            client,
            client_port: u16::from_be(record.key.src_port_be),
            backend,
            guessed: record.flags & lb_common::types::SHARED_F_GUESSED != 0,
        })
    }

    /// The same for an entry of this LB's own tables (a dump).
    pub fn flow_of_entry(&self, entry: &Entry) -> Option<Flow> {
        let (key, value, family) = match *entry {
            Entry::V4(k, v) => (
                ConnKeyV6 {
                    src: [k.src, 0, 0, 0],
                    dst: [k.dst, 0, 0, 0],
                    src_port_be: k.src_port_be,
                    dst_port_be: k.dst_port_be,
                    proto: k.proto,
                },
                v,
                FAMILY_V4,
            ),
            Entry::V6(k, v) => (k, v, lb_common::types::FAMILY_V6),
        };
        self.flow(&SharedFlow {
            key,
            backend_id: value.backend_id,
            vip_id: value.vip(),
            family,
            ..Default::default()
        })
    }

    /// Where a peer's flow goes in this LB's tables.
    pub fn entry(&self, flow: &Flow) -> Result<Entry, Unknown> {
        let vip_id = *self.vip_ids.get(&flow.vip).ok_or(Unknown::Vip)?;
        let backend_id = *self
            .backend_ids
            .get(&(vip_id, flow.backend))
            .ok_or(Unknown::Backend)?;
        let value = ConnEntry { backend_id, vip_id };
        let client = match flow.client {
            IpAddr::V4(a) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&a.octets());
                b
            }
            IpAddr::V6(a) => a.octets(),
        };
        let (src, dst) = (addr_words(&client), addr_words(&flow.vip.addr));
        let (src_port_be, dst_port_be) = (flow.client_port.to_be(), flow.vip.port_be);
        let proto = u32::from(flow.vip.proto);
        Ok(if flow.vip.family == FAMILY_V4 {
            Entry::V4(
                ConnKeyV4 {
                    src: src[0],
                    dst: dst[0],
                    src_port_be,
                    dst_port_be,
                    proto,
                },
                value,
            )
        } else {
            Entry::V6(
                ConnKeyV6 {
                    src,
                    dst,
                    src_port_be,
                    dst_port_be,
                    proto,
                },
                value,
            )
        })
    }
}
