//! Flow sharing between the LBs of a fleet (`[cluster] share_listen`): no
//! established flow loses its backend when the LB it went through leaves.
//!
//! Why it is needed: every LB of a fleet holds the same lookup table, so a flow that
//! ECMP moves to another LB lands on the same backend, unless the table moved
//! between the flow's start and the move (the weights changed). Then the new LB's
//! table names another backend, which resets the connection. Sharing gives every LB
//! the connection entries of the others, so a moved flow is a known flow wherever it
//! lands.
//!
//! How: the datapath reports each connection entry it writes into a ring buffer
//! (`lb-ebpf/src/share.rs`; it never waits: a full ring refuses the record and
//! counts it). This module runs on a thread of its own: it drains the ring every
//! [`DRAIN_EVERY`], names each flow's VIP and backend by address ([`ids`]), and
//! streams them in frames ([`wire`]) over one TCP connection to every other LB that
//! etcd lists with a sharing address ([`peers`]). A connection starts with a dump of
//! this LB's whole tables, so an LB that joins (or rejoins) receives every flow of
//! the fleet before it says it is ready. Received flows are written into this LB's
//! tables: a flow the sender saw begin replaces what is there; a guessed one, or one
//! from a dump, never replaces an entry this LB already has.
//!
//! When sharing cannot keep up, the youngest flows go unshared: the datapath's ring
//! refuses new records once full, and a peer's queue refuses new frames once full
//! (its connection is then reset and starts over with a dump). Both are counted.

pub mod ids;
mod peers;
pub mod wire;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{HashMap, MapData};
use lb_common::types::{ConnEntry, ConnKeyV4, ConnKeyV6, ShareStats, SharedFlow};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::warn;

use self::{
    ids::{Entry, FlowIds},
    wire::Flow,
};
use crate::{cluster::session::FleetState, dataplane::SharedFlowMaps};

/// How often the ring of new entries is drained (and sent on).
pub const DRAIN_EVERY: Duration = Duration::from_millis(20);

/// What the sharing thread needs to know of its LB.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The fleet's name: a peer of another fleet is refused.
    pub cluster: String,
    /// This LB's node name.
    pub node: String,
    /// The address it listens on (and that etcd tells the others).
    pub listen: SocketAddr,
}

/// Counters and peers, for `lb cluster status`, `/metrics` and readiness.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShareState {
    pub listen: Option<SocketAddr>,
    /// Entries the datapath reported (drained from its ring).
    pub reported: u64,
    /// Entries the datapath could not report: its ring was full.
    pub ring_full: u64,
    /// Reported entries whose VIP or backend this LB no longer has (a reload).
    pub unnamed: u64,
    /// Flows and bytes sent, over all peers (dumps included).
    pub flows_sent: u64,
    pub bytes_sent: u64,
    /// Flows not sent to a peer because its queue was full.
    pub peer_slow: u64,
    /// Flows received, written into the tables, kept out because this LB already
    /// had the flow, refused (with the last reason).
    pub flows_received: u64,
    pub flows_inserted: u64,
    pub flows_kept: u64,
    pub flows_refused: u64,
    pub last_refusal: Option<String>,
    /// Every peer by node name.
    pub peers: BTreeMap<String, PeerState>,
}

/// One other LB as sharing sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerState {
    /// Its sharing address (from etcd).
    pub address: Option<SocketAddr>,
    /// This LB's connection to it is up, and has sent its whole dump.
    pub sending: bool,
    pub dump_sent: bool,
    /// Its connection to this LB is up, and its dump has arrived whole.
    pub receiving: bool,
    pub dump_received: bool,
    pub last_error: Option<String>,
}

/// The agent's side of the sharing thread.
pub struct Handle {
    pub state: watch::Receiver<ShareState>,
    ids: watch::Sender<FlowIds>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Handle {
    /// Tells the thread this LB's ids (after a start or a reload); nothing happens
    /// when they did not change.
    pub fn set_ids(&self, ids: FlowIds) {
        self.ids.send_if_modified(|current| {
            let changed = *current != ids;
            *current = ids;
            changed
        });
    }
}

/// This LB's connection tables, written by received flows and read for dumps.
pub(crate) struct Tables {
    v4: Mutex<HashMap<MapData, ConnKeyV4, ConnEntry>>,
    v6: Mutex<HashMap<MapData, ConnKeyV6, ConnEntry>>,
}

/// What writing one received flow did.
enum Written {
    Inserted,
    Kept,
}

impl Tables {
    /// Writes a peer's flow: replacing what is there, or only where nothing is.
    fn write(&self, entry: &Entry, replace: bool) -> Result<Written, aya::maps::MapError> {
        const BPF_NOEXIST: u64 = 1;
        let flags = if replace { 0 } else { BPF_NOEXIST };
        let result = match entry {
            Entry::V4(k, v) => self.v4.lock().expect("not poisoned").insert(k, v, flags),
            Entry::V6(k, v) => self.v6.lock().expect("not poisoned").insert(k, v, flags),
        };
        match result {
            Ok(()) => Ok(Written::Inserted),
            Err(aya::maps::MapError::SyscallError(e))
                if !replace && e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(Written::Kept)
            }
            Err(e) => Err(e),
        }
    }

    /// Every entry of both tables (a walk of up to the tables' size; run off the
    /// thread's loop).
    fn dump(&self) -> Vec<Entry> {
        let mut entries = Vec::new();
        {
            let v4 = self.v4.lock().expect("not poisoned");
            entries.extend(
                v4.iter()
                    .filter_map(Result::ok)
                    .map(|(k, v)| Entry::V4(k, v)),
            );
        }
        let v6 = self.v6.lock().expect("not poisoned");
        entries.extend(
            v6.iter()
                .filter_map(Result::ok)
                .map(|(k, v)| Entry::V6(k, v)),
        );
        entries
    }
}

/// Starts the sharing thread: it listens on `listener` (bound by the agent before it
/// touched the datapath), drains `maps.ring`, and follows the fleet's members in
/// `fleet`. It stops when the handle is dropped.
pub fn start(
    me: Identity,
    listener: std::net::TcpListener,
    maps: SharedFlowMaps,
    ids: FlowIds,
    fleet: watch::Receiver<FleetState>,
) -> std::io::Result<Handle> {
    listener.set_nonblocking(true)?;
    let (ids_tx, ids_rx) = watch::channel(ids);
    let (state_tx, state) = watch::channel(ShareState {
        listen: Some(me.listen),
        ..Default::default()
    });
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("lb-share".into())
        .spawn(move || {
            runtime.block_on(async move {
                tokio::select! {
                    _ = run(me, listener, maps, ids_rx, fleet, state_tx) => {}
                    _ = stopped => {}
                }
            })
        })?;
    Ok(Handle {
        state,
        ids: ids_tx,
        _stop: stop,
    })
}

/// The thread's work: the listener, the peers, the drain.
async fn run(
    me: Identity,
    listener: std::net::TcpListener,
    maps: SharedFlowMaps,
    ids: watch::Receiver<FlowIds>,
    fleet: watch::Receiver<FleetState>,
    state: watch::Sender<ShareState>,
) {
    let SharedFlowMaps {
        mut ring,
        v4,
        v6,
        stats,
    } = maps;
    let tables = Arc::new(Tables {
        v4: Mutex::new(v4),
        v6: Mutex::new(v6),
    });
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!("flow sharing: cannot listen on {}: {e}", me.listen);
            return;
        }
    };
    let shared = peers::Shared {
        me: me.clone(),
        tables: Arc::clone(&tables),
        ids: ids.clone(),
        state: state.clone(),
    };
    let mut peers = peers::Peers::new(shared.clone());
    tokio::spawn(peers::accept(listener, shared));
    let mut fleet = Some(fleet);
    let mut drain = tokio::time::interval(DRAIN_EVERY);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if let Some(fleet) = &mut fleet {
        peers.follow(members(&fleet.borrow_and_update(), &me.node));
    }
    loop {
        tokio::select! {
            changed = changed(&mut fleet) => {
                match (changed, &mut fleet) {
                    (true, Some(f)) => peers.follow(members(&f.borrow_and_update(), &me.node)),
                    // The etcd session is gone for good: keep the peers known.
                    _ => fleet = None,
                }
            }
            _ = drain.tick() => {
                let mut flows = Vec::new();
                let mut unnamed = 0;
                {
                    let ids = ids.borrow();
                    while let Some(item) = ring.next() {
                        let Some(record) = read_record(&item) else { continue };
                        match ids.flow(&record) {
                            Some(flow) => flows.push(flow),
                            None => unnamed += 1,
                        }
                    }
                }
                let ring_full = stats
                    .get(&0, 0)
                    .map(|per_cpu| per_cpu.iter().map(|s: &ShareStats| s.ring_full).sum())
                    .unwrap_or(0);
                state.send_if_modified(|s| {
                    let before = (s.reported, s.ring_full, s.unnamed);
                    s.reported += flows.len() as u64 + unnamed;
                    s.unnamed += unnamed;
                    s.ring_full = ring_full;
                    before != (s.reported, s.ring_full, s.unnamed)
                });
                if !flows.is_empty() {
                    peers.send(&flows);
                }
            }
        }
    }
}

/// The other LBs that share flows, by node: their sharing address from etcd.
fn members(fleet: &FleetState, me: &str) -> BTreeMap<String, SocketAddr> {
    fleet
        .nodes
        .iter()
        .filter(|(node, _)| node.as_str() != me)
        .filter_map(|(node, (record, _))| Some((node.clone(), record.share?)))
        .collect()
}

/// Waits until the fleet's members may have changed (forever once the session is
/// gone); false when it just went.
async fn changed(fleet: &mut Option<watch::Receiver<FleetState>>) -> bool {
    match fleet {
        Some(f) => f.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// One record of the ring, copied out (the ring's records are 8-byte aligned, but a
/// copy costs nothing next to the rest); `None` if it is too short.
pub fn read_record(bytes: &[u8]) -> Option<SharedFlow> {
    if bytes.len() < std::mem::size_of::<SharedFlow>() {
        return None;
    }
    // SAFETY: the length was checked; `SharedFlow` is plain data, valid for any bytes.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<SharedFlow>()) })
}

/// Writes the flows a peer sent; counts what happened.
fn receive(
    tables: &Tables,
    ids: &FlowIds,
    flows: &[wire::WireFlow],
    dump: bool,
    state: &watch::Sender<ShareState>,
) {
    let (mut inserted, mut kept, mut refused, mut last) = (0u64, 0u64, 0u64, None);
    for w in flows {
        let written = Flow::from_wire(w)
            .map_err(|e| e.to_string())
            .and_then(|flow| {
                let entry = ids.entry(&flow).map_err(|e| e.to_string())?;
                tables
                    .write(&entry, !dump && !flow.guessed)
                    .map_err(|e| format!("writing the connection table: {e}"))
            });
        match written {
            Ok(Written::Inserted) => inserted += 1,
            Ok(Written::Kept) => kept += 1,
            Err(why) => {
                refused += 1;
                last = Some(why);
            }
        }
    }
    state.send_modify(|s| {
        s.flows_received += flows.len() as u64;
        s.flows_inserted += inserted;
        s.flows_kept += kept;
        s.flows_refused += refused;
        if last.is_some() {
            s.last_refusal = last;
        }
    });
}
