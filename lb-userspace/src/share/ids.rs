//! How this LB numbers what a flow names: VIP and backend ids in its maps against
//! the addresses peers use. The agent sends a new [`FlowIds`] whenever its desired
//! state's ids change (start, reload); the sharing thread reads the newest.

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::types::{
    ConnEntry, ConnKeyV4, ConnKeyV6, FAMILY_V4, FlowKey, SHARED_F_GUESSED, SharedFlow, VipKey,
};

use super::wire::Flow;
use crate::desired::{Desired, addr_bytes, ip_of};

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
        let key = FlowKey {
            family: record.family,
            ..FlowKey::from(record.key)
        };
        let guessed = record.flags & SHARED_F_GUESSED != 0;
        self.named(&key, record.backend_id, record.vip_id, guessed)
    }

    /// The same for an entry of this LB's own tables (a dump).
    /// A full-NAT flow is none: its port is this LB's, and a peer could not serve it
    /// (the datapath does not report them either).
    pub fn flow_of_entry(&self, entry: &Entry) -> Option<Flow> {
        let (key, value) = match entry {
            Entry::V4(k, v) => (FlowKey::from(*k), v),
            Entry::V6(k, v) => (FlowKey::from(*k), v),
        };
        if value.nat().is_some() {
            return None;
        }
        self.named(&key, value.backend_id, value.vip(), false)
    }

    fn named(&self, key: &FlowKey, backend_id: u32, vip_id: u32, guessed: bool) -> Option<Flow> {
        Some(Flow {
            vip: *self.vips.get(&vip_id)?,
            client: ip_of(&key.src, key.family),
            client_port: u16::from_be(key.src_port_be),
            backend: *self.backends.get(&backend_id)?,
            guessed,
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
        let key = FlowKey {
            src: addr_bytes(flow.client).0,
            dst: flow.vip.addr,
            src_port_be: flow.client_port.to_be(),
            dst_port_be: flow.vip.port_be,
            proto: flow.vip.proto,
            family: flow.vip.family,
            _pad: [0; 2],
        };
        Ok(if key.family == FAMILY_V4 {
            Entry::V4(key.conn_key_v4(), value)
        } else {
            Entry::V6(key.conn_key_v6(), value)
        })
    }
}
