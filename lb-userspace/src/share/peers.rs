//! The connections between LBs: one outbound connection to every peer that etcd
//! lists with a sharing address, carrying this LB's dump and then its new flows, and
//! every peer's connection to this LB's listener, carrying theirs.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prost::Message;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tracing::{info, warn};

use super::{
    Identity, ShareState, Tables,
    ids::FlowIds,
    wire::{FLOWS_PER_FRAME, Flow, Frame, Hello, MAX_FRAME_BYTES, VERSION},
};

/// Frames of new flows waiting for one peer, at most; beyond, the youngest are not
/// sent and the connection starts over with a dump.
const QUEUE_FRAMES: usize = 256;
/// A connection attempt gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait between connection attempts to a peer.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What every connection task shares.
#[derive(Clone)]
pub(super) struct Shared {
    pub me: Identity,
    pub tables: Arc<Tables>,
    pub ids: watch::Receiver<FlowIds>,
    pub state: watch::Sender<ShareState>,
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME_BYTES)
        .new_codec()
}

/// A frame of new flows, encoded once for every peer.
#[derive(Clone)]
struct Encoded {
    bytes: Bytes,
    flows: u64,
}

struct Outbound {
    address: SocketAddr,
    queue: mpsc::Sender<Encoded>,
    /// Set when a frame could not be queued: the task starts over with a dump.
    overflowed: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

/// This LB's outbound connections.
pub(super) struct Peers {
    shared: Shared,
    out: BTreeMap<String, Outbound>,
}

impl Peers {
    pub fn new(shared: Shared) -> Peers {
        Peers {
            shared,
            out: BTreeMap::new(),
        }
    }

    /// Connects to every member with a sharing address and drops the others.
    pub fn follow(&mut self, members: BTreeMap<String, SocketAddr>) {
        self.out.retain(|node, o| {
            let keep = members.get(node) == Some(&o.address);
            if !keep {
                o.task.abort();
            }
            keep
        });
        for (node, &address) in &members {
            if self.out.contains_key(node) {
                continue;
            }
            let (queue, rx) = mpsc::channel(QUEUE_FRAMES);
            let overflowed = Arc::new(AtomicBool::new(false));
            let task = tokio::spawn(send_to(
                self.shared.clone(),
                node.clone(),
                address,
                rx,
                Arc::clone(&overflowed),
            ));
            self.out.insert(
                node.clone(),
                Outbound {
                    address,
                    queue,
                    overflowed,
                    task,
                },
            );
        }
        self.shared.state.send_modify(|s| {
            s.peers.retain(|node, p| {
                // A peer gone from etcd is forgotten unless it still sends to us.
                members.contains_key(node) || p.receiving
            });
            for (node, &address) in &members {
                s.peers.entry(node.clone()).or_default().address = Some(address);
            }
        });
    }

    /// Queues `flows` for every peer.
    pub fn send(&mut self, flows: &[Flow]) {
        let mut slow = 0;
        for chunk in flows.chunks(FLOWS_PER_FRAME) {
            let frame = Frame {
                flows: chunk.iter().map(Flow::to_wire).collect(),
                ..Default::default()
            };
            let encoded = Encoded {
                bytes: Bytes::from(frame.encode_to_vec()),
                flows: chunk.len() as u64,
            };
            for o in self.out.values() {
                if o.queue.try_send(encoded.clone()).is_err() {
                    o.overflowed.store(true, Ordering::Relaxed);
                    slow += encoded.flows;
                }
            }
        }
        if slow > 0 {
            self.shared.state.send_modify(|s| s.peer_slow += slow);
        }
    }
}

/// Keeps one peer's connection up, starting each with a dump.
async fn send_to(
    shared: Shared,
    node: String,
    address: SocketAddr,
    mut queue: mpsc::Receiver<Encoded>,
    overflowed: Arc<AtomicBool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let error = connection(&shared, &node, address, &mut queue, &overflowed).await;
        let connected_long = error.1;
        shared.state.send_modify(|s| {
            let p = s.peers.entry(node.clone()).or_default();
            p.sending = false;
            p.last_error = Some(error.0.clone());
        });
        if connected_long {
            backoff = Duration::from_millis(100);
        } else {
            warn!(peer = %node, "flow sharing: {}", error.0);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection to a peer, until it fails: why, and whether it had sent its dump.
async fn connection(
    shared: &Shared,
    node: &str,
    address: SocketAddr,
    queue: &mut mpsc::Receiver<Encoded>,
    overflowed: &AtomicBool,
) -> (String, bool) {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return (format!("connecting to {address}: {e}"), false),
        Err(_) => {
            return (
                format!("connecting to {address}: no answer within {CONNECT_TIMEOUT:?}"),
                false,
            );
        }
    };
    let _ = stream.set_nodelay(true);
    let mut out = FramedWrite::new(stream, codec());
    // What was queued before is in the tables, hence in the dump.
    while queue.try_recv().is_ok() {}
    overflowed.store(false, Ordering::Relaxed);
    let hello = Frame {
        hello: Some(Hello {
            cluster: shared.me.cluster.clone(),
            node: shared.me.node.clone(),
            version: VERSION,
        }),
        ..Default::default()
    };
    if let Err(e) = out.send(Bytes::from(hello.encode_to_vec())).await {
        return (format!("sending to {address}: {e}"), false);
    }
    let tables = Arc::clone(&shared.tables);
    let entries = match tokio::task::spawn_blocking(move || tables.dump()).await {
        Ok(entries) => entries,
        Err(e) => return (format!("reading the connection tables: {e}"), false),
    };
    let ids = shared.ids.borrow().clone();
    let flows: Vec<Flow> = entries
        .iter()
        .filter_map(|e| ids.flow_of_entry(e))
        .collect();
    let mut frames: Vec<Encoded> = flows
        .chunks(FLOWS_PER_FRAME)
        .map(|chunk| Encoded {
            bytes: Bytes::from(
                Frame {
                    flows: chunk.iter().map(Flow::to_wire).collect(),
                    dump: true,
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            flows: chunk.len() as u64,
        })
        .collect();
    frames.push(Encoded {
        bytes: Bytes::from(
            Frame {
                dump_complete: true,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        flows: 0,
    });
    for frame in frames {
        if let Err(e) = send(shared, &mut out, frame).await {
            return (format!("sending the dump to {address}: {e}"), false);
        }
    }
    info!(
        peer = node,
        flows = flows.len(),
        "flow sharing: sent this LB's flows to {node} ({address})"
    );
    shared.state.send_modify(|s| {
        let p = s.peers.entry(node.to_owned()).or_default();
        p.sending = true;
        p.dump_sent = true;
        p.last_error = None;
    });
    while let Some(frame) = queue.recv().await {
        if overflowed.swap(false, Ordering::Relaxed) {
            return (
                "fell behind (its queue was full): starting over with a dump".into(),
                true,
            );
        }
        if let Err(e) = send(shared, &mut out, frame).await {
            return (format!("sending to {address}: {e}"), true);
        }
    }
    ("stopped".into(), true)
}

async fn send(
    shared: &Shared,
    out: &mut FramedWrite<TcpStream, LengthDelimitedCodec>,
    frame: Encoded,
) -> std::io::Result<()> {
    let bytes = frame.bytes.len() as u64 + 4;
    out.send(frame.bytes).await?;
    shared.state.send_modify(|s| {
        s.flows_sent += frame.flows;
        s.bytes_sent += bytes;
    });
    Ok(())
}

/// Accepts the peers' connections to this LB.
pub(super) async fn accept(listener: TcpListener, shared: Shared) {
    loop {
        match listener.accept().await {
            Ok((stream, from)) => {
                tokio::spawn(receive_from(shared.clone(), stream, from));
            }
            Err(e) => {
                warn!("flow sharing: accepting on {}: {e}", shared.me.listen);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Why a peer's connection was refused or ended.
#[derive(Debug, thiserror::Error)]
enum PeerError {
    #[error("its first frame is not a hello")]
    NoHello,
    #[error("it speaks version {0} of the protocol (this LB: {VERSION})")]
    Version(u32),
    #[error("it belongs to fleet {0:?}")]
    OtherFleet(String),
    #[error("a frame that does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads one peer's connection: its hello, its dump, then its new flows.
async fn receive_from(shared: Shared, stream: TcpStream, from: SocketAddr) {
    let mut input = FramedRead::new(stream, codec());
    let node = match hello(&shared, &mut input).await {
        Ok(node) => node,
        Err(e) => {
            warn!("flow sharing: refused the connection from {from}: {e}");
            shared.state.send_modify(|s| {
                s.last_refusal = Some(format!("connection from {from}: {e}"));
            });
            return;
        }
    };
    shared.state.send_modify(|s| {
        s.peers.entry(node.clone()).or_default().receiving = true;
    });
    let result: Result<(), PeerError> = async {
        while let Some(bytes) = input.next().await {
            let frame = Frame::decode(bytes?)?;
            super::receive(
                &shared.tables,
                &shared.ids.borrow(),
                &frame.flows,
                frame.dump,
                &shared.state,
            );
            if frame.dump_complete {
                info!(peer = %node, "flow sharing: {node} sent all its flows");
                shared.state.send_modify(|s| {
                    s.peers.entry(node.clone()).or_default().dump_received = true;
                });
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = &result {
        warn!(peer = %node, "flow sharing: the connection from {node} ({from}) ended: {e}");
    }
    shared.state.send_modify(|s| {
        s.peers.entry(node.clone()).or_default().receiving = false;
    });
}

async fn hello(
    shared: &Shared,
    input: &mut FramedRead<TcpStream, LengthDelimitedCodec>,
) -> Result<String, PeerError> {
    let first = tokio::time::timeout(CONNECT_TIMEOUT, input.next())
        .await
        .map_err(|_| PeerError::NoHello)?
        .ok_or(PeerError::NoHello)??;
    let hello = Frame::decode(first)?.hello.ok_or(PeerError::NoHello)?;
    if hello.version != VERSION {
        return Err(PeerError::Version(hello.version));
    }
    if hello.cluster != shared.me.cluster {
        return Err(PeerError::OtherFleet(hello.cluster));
    }
    Ok(hello.node)
}
