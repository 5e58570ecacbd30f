//! The agent's link to etcd: one task, on its own thread, that holds the lease, writes this LB's record,
//! stands for election, publishes the leader's epochs and watches the fleet's keys.
//! The agent talks to it through a [`Handle`]: commands in, the fleet's state out (a
//! `watch` channel the agent's loop selects on). The task never blocks the agent:
//! when etcd is gone it says so in the state and starts again with backoff; every
//! (re)connection reads the whole state first and then watches from the revision
//! after it, so nothing in between is missed.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use etcd_client::{EventType, WatchOptions};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::{
    ClusterError,
    etcd::{EpochSeen, Etcd, Leadership, PublishError, Record, timed},
    records::{BadRecord, EpochRecord, HoldRecord, NodeRecord},
};
use crate::config;

/// What the agent asks of the session.
#[derive(Debug)]
pub enum Command {
    /// Write this LB's record (under its lease).
    Report(NodeRecord),
    /// Publish this decision as the next epoch, if this LB leads.
    Publish(EpochRecord),
    /// Place (`Some`) or lift (`None`) a fleet hold; the reply says whether etcd
    /// took it.
    Hold {
        vip: String,
        backend: IpAddr,
        hold: Option<HoldRecord>,
        reply: oneshot::Sender<Result<(), ClusterError>>,
    },
}

/// The fleet as this LB last saw it.
#[derive(Debug, Clone, Default)]
pub struct FleetState {
    /// A session with etcd is up (lease held, watch running).
    pub connected: bool,
    /// This LB holds the leadership (it won the election on its current lease).
    pub leading: bool,
    /// The leading node, from the election's keys.
    pub leader: Option<String>,
    /// Every LB's last record and when it arrived here.
    pub nodes: BTreeMap<String, (NodeRecord, Instant)>,
    /// The newest epoch published, and when it arrived here.
    pub epoch: Option<(EpochRecord, Instant)>,
    pub epoch_seen: EpochSeen,
    /// Fleet holds by key.
    pub holds: BTreeMap<String, HoldRecord>,
    /// Records refused since the session started, newest last (at most 16).
    pub refused: Vec<BadRecord>,
    /// Why the last session ended, while there is none.
    pub last_error: Option<String>,
    /// Epochs this LB published, and publications refused because it no longer led.
    pub published: u64,
    pub fenced: u64,
    /// Election candidates: key → (create revision, node).
    candidates: BTreeMap<String, (i64, String)>,
}

impl FleetState {
    fn refuse(&mut self, bad: BadRecord) {
        warn!(key = %bad.key, "refused a record from etcd: {}", bad.problem);
        if self.refused.len() == 16 {
            self.refused.remove(0);
        }
        self.refused.push(bad);
    }

    fn elect(&mut self) {
        self.leader = self
            .candidates
            .values()
            .min_by_key(|(rev, _)| *rev)
            .map(|(_, node)| node.clone());
    }

    /// Takes an epoch if it is newer than the one held: never an older one.
    fn offer_epoch(&mut self, epoch: EpochRecord, seen: EpochSeen) {
        if epoch.epoch > self.epoch_seen.epoch || self.epoch.is_none() {
            self.epoch_seen = seen;
            self.epoch = Some((epoch, Instant::now()));
        } else if seen.epoch == self.epoch_seen.epoch {
            // The same epoch read again (a snapshot after a reconnect).
            self.epoch_seen.mod_revision = seen.mod_revision;
        } else {
            // etcd lost its newest epoch (restored from a backup, say): the newer one
            // stays in force, and the next publication, numbered after it, replaces
            // what etcd holds now.
            warn!(
                "etcd holds epoch {}, older than epoch {} seen before: kept the newer",
                seen.epoch, self.epoch_seen.epoch
            );
            self.epoch_seen.mod_revision = seen.mod_revision;
        }
    }
}

/// The agent's side of the session.
pub struct Handle {
    pub commands: mpsc::Sender<Command>,
    pub state: watch::Receiver<FleetState>,
    thread: std::thread::JoinHandle<()>,
}

impl Handle {
    /// Ends the session: the lease is given back (so that, if this LB led, another
    /// leads at once instead of after the lease), waiting at most `within`.
    pub fn stop(self, within: Duration) {
        let Handle {
            commands, thread, ..
        } = self;
        drop(commands);
        let deadline = Instant::now() + within;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Starts the session for `cluster`, as node `cluster.node`, on a thread of its own
/// with its own runtime: however long the agent's loop is busy (a reload, a large
/// table), the lease is renewed on time.
pub fn start(cluster: config::Cluster) -> std::io::Result<Handle> {
    let (commands, rx) = mpsc::channel(64);
    let (state_tx, state) = watch::channel(FleetState::default());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("lb-etcd".into())
        .spawn(move || runtime.block_on(run(cluster, rx, state_tx)))?;
    Ok(Handle {
        commands,
        state,
        thread,
    })
}

/// Sessions, one after another, until the agent drops its handle.
async fn run(
    cluster: config::Cluster,
    mut commands: mpsc::Receiver<Command>,
    state: watch::Sender<FleetState>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        let result = session(&cluster, &mut commands, &state).await;
        state.send_modify(|s| {
            s.connected = false;
            s.leading = false;
            s.last_error = result.as_ref().err().map(|e| crate::api::error_text(e));
        });
        match result {
            Ok(()) => return,
            Err(e) => warn!(
                error = %crate::api::error_text(&e),
                "etcd session ended; the last epoch stays in force, retrying"
            ),
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        let until = tokio::time::Instant::now() + backoff;
        backoff = (backoff * 2).min(Duration::from_secs(2));
        // Between sessions, commands are answered (holds refused) or dropped.
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                command = commands.recv() => match command {
                    None => return,
                    Some(Command::Hold { reply, .. }) => {
                        let _ = reply.send(Err(ClusterError::Disconnected));
                    }
                    Some(_) => {}
                },
            }
        }
    }
}

/// Aborts a spawned task when dropped (the campaign, when its session ends).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One session: a lease, the state read whole, a watch from the revision after it,
/// a campaign; then commands and events until etcd fails or the agent goes.
async fn session(
    cluster: &config::Cluster,
    commands: &mut mpsc::Receiver<Command>,
    state: &watch::Sender<FleetState>,
) -> Result<(), ClusterError> {
    let mut etcd = Etcd::connect(cluster).await?;
    let lease = timed(
        "granting a lease",
        etcd.client.lease_grant(cluster.lease_s as i64, None),
    )
    .await?
    .id();
    let (mut keeper, mut keepalive) = timed(
        "keeping the lease alive",
        etcd.client.lease_keep_alive(lease),
    )
    .await?;
    let snapshot = etcd.snapshot().await?;
    let mut watch = timed(
        "watching the fleet",
        etcd.client.watch(
            etcd.keys.all(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(snapshot.revision + 1),
            ),
        ),
    )
    .await?;
    state.send_modify(|s| {
        s.connected = true;
        s.last_error = None;
        s.nodes = snapshot
            .nodes
            .into_iter()
            .map(|n| (n.node.clone(), (n, Instant::now())))
            .collect();
        s.holds = snapshot.holds.into_iter().collect();
        s.candidates = snapshot
            .candidates
            .into_iter()
            .map(|(k, rev, node)| (k, (rev, node)))
            .collect();
        s.elect();
        match snapshot.epoch {
            Some((epoch, seen)) => s.offer_epoch(epoch, seen),
            // No epoch in etcd (a new etcd): the next one is published as new.
            None => s.epoch_seen.mod_revision = 0,
        }
        for bad in snapshot.refused {
            s.refuse(bad);
        }
    });
    info!(
        lease = format!("{lease:x}"),
        "connected to etcd for fleet {:?} as {:?}", cluster.name, cluster.node
    );
    let campaign = {
        let mut client = etcd.client.clone();
        let (name, node) = (etcd.keys.election(), cluster.node.clone());
        AbortOnDrop(tokio::spawn(async move {
            client.campaign(name, node, lease).await
        }))
    };
    let mut campaign = Some(campaign);
    let mut reporting: Option<AbortOnDrop<Result<(), ClusterError>>> = None;
    let mut leadership: Option<Leadership> = None;
    let mut renew = tokio::time::interval(Duration::from_millis(cluster.lease_s * 1000 / 3));
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else {
                    // The agent is stopping: give the lease back, so that another
                    // LB leads at once instead of after the lease.
                    let _ = timed("revoking the lease", etcd.client.lease_revoke(lease)).await;
                    return Ok(());
                };
                match command {
                    Command::Report(record) => {
                        // Off the loop: a slow write (etcd syncs each to disk) must not
                        // hold up an epoch's publication or the watch. One at a time;
                        // a record that finds the last one still going is dropped (the
                        // next interval's replaces it).
                        if reporting.as_ref().is_none_or(|r| r.0.is_finished()) {
                            if let Some(mut done) = reporting.take() {
                                (&mut done.0)
                                    .await
                                    .map_err(|e| ClusterError::Lost(e.to_string()))??;
                            }
                            let mut etcd = etcd.clone();
                            reporting = Some(AbortOnDrop(tokio::spawn(async move {
                                etcd.put_node(&record, lease).await
                            })));
                        }
                    }
                    Command::Publish(epoch) => {
                        let Some(l) = &leadership else { continue };
                        let seen = state.borrow().epoch_seen;
                        let started = Instant::now();
                        match etcd.publish(l, epoch, seen).await {
                            Ok(n) => {
                                debug!(
                                    epoch = n,
                                    ms = started.elapsed().as_secs_f64() * 1000.0,
                                    "published epoch {n}"
                                );
                                state.send_modify(|s| s.published += 1);
                            }
                            Err(PublishError::Stale) => {
                                debug!("an epoch newer than {} exists; not published", seen.epoch);
                            }
                            Err(PublishError::Fenced) => {
                                state.send_modify(|s| {
                                    s.fenced += 1;
                                    s.leading = false;
                                });
                                return Err(ClusterError::Fenced);
                            }
                            Err(PublishError::Etcd(e)) => return Err(e),
                        }
                    }
                    Command::Hold { vip, backend, hold, reply } => {
                        let result = etcd.put_hold(&vip, backend, hold.as_ref()).await;
                        let failed = result.as_ref().err().map(|e| crate::api::error_text(e));
                        let _ = reply.send(result);
                        if let Some(e) = failed {
                            return Err(ClusterError::Lost(e));
                        }
                    }
                }
            }
            message = watch.message() => {
                let message = message.map_err(|source| ClusterError::Etcd { what: "watching", source })?;
                let Some(response) = message else {
                    return Err(ClusterError::Lost("the watch ended".into()));
                };
                if response.canceled() {
                    return Err(ClusterError::Lost(format!(
                        "the watch was cancelled (compacted at revision {})",
                        response.compact_revision()
                    )));
                }
                state.send_modify(|s| {
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        if event.event_type() == EventType::Delete {
                            if let Some(node) = key.strip_prefix(&etcd.keys.nodes()) {
                                s.nodes.remove(node);
                            }
                            s.holds.remove(&key);
                            if s.candidates.remove(&key).is_some() {
                                s.elect();
                            }
                            continue;
                        }
                        match etcd.record(kv) {
                            Ok(Record::Node(n)) => {
                                s.nodes.insert(n.node.clone(), (n, Instant::now()));
                            }
                            Ok(Record::Epoch(e, seen)) => s.offer_epoch(e, seen),
                            Ok(Record::Hold(h)) => {
                                s.holds.insert(key, h);
                            }
                            Ok(Record::Candidate { create_revision, node }) => {
                                s.candidates.insert(key, (create_revision, node));
                                s.elect();
                            }
                            Ok(Record::Other) => {}
                            Err(bad) => s.refuse(bad),
                        }
                    }
                });
            }
            _ = renew.tick() => {
                timed("renewing the lease", keeper.keep_alive()).await?;
            }
            answer = keepalive.message() => {
                match answer.map_err(|source| ClusterError::Etcd { what: "renewing the lease", source })? {
                    Some(r) if r.ttl() > 0 => {}
                    _ => return Err(ClusterError::Lost("the lease expired".into())),
                }
            }
            won = async { (&mut campaign.as_mut().expect("guarded").0).await }, if campaign.is_some() => {
                campaign = None;
                let response = won
                    .map_err(|e| ClusterError::Lost(format!("the campaign task failed: {e}")))?
                    .map_err(|source| ClusterError::Etcd { what: "standing for election", source })?;
                let Some(key) = response.leader() else {
                    return Err(ClusterError::Lost("etcd elected without a leader key".into()));
                };
                leadership = Some(Leadership::from(key));
                info!("this LB leads fleet {:?}", cluster.name);
                state.send_modify(|s| s.leading = true);
            }
        }
    }
}
