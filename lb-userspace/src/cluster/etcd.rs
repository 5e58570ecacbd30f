//! The fleet's records in etcd, through the maintained `etcd-client` crate: the key
//! layout ([`Keys`]), connecting with or without TLS, the snapshot a session starts
//! from, and the leader's fenced publication ([`Etcd::publish`]).

use std::{net::IpAddr, time::Duration};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, LeaderKey,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
};

use super::{
    ClusterError,
    records::{BadRecord, EpochRecord, HoldRecord, NodeRecord},
};
use crate::config;

/// How long one request to etcd may take before the session counts etcd as gone.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Where a fleet's records live; see docs/DEPLOY.md for the table.
///
/// | key | written by | lease |
/// |---|---|---|
/// | `/lb/<name>/state/nodes/<node>` | each LB, every interval | the LB's |
/// | `/lb/<name>/election/<lease id>` | etcd's election API, for each candidate | the LB's |
/// | `/lb/<name>/state/epoch` | the leader, in a transaction on its election key | none |
/// | `/lb/<name>/conf/holds/<vip>/<backend>` | any LB, for `lb weight`/`lb drain` | none |
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Keys {
        Keys {
            prefix: format!("/lb/{cluster}/"),
        }
    }

    /// Everything of this fleet.
    pub fn all(&self) -> &str {
        &self.prefix
    }

    pub fn nodes(&self) -> String {
        format!("{}state/nodes/", self.prefix)
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}{node}", self.nodes())
    }

    pub fn epoch(&self) -> String {
        format!("{}state/epoch", self.prefix)
    }

    /// The election's name; candidates' keys are this, a slash and their lease.
    pub fn election(&self) -> String {
        format!("{}election", self.prefix)
    }

    pub fn holds(&self) -> String {
        format!("{}conf/holds/", self.prefix)
    }

    pub fn hold(&self, vip: &str, backend: IpAddr) -> String {
        format!("{}{vip}/{backend}", self.holds())
    }
}

/// What the leader proves its leadership with: its election key and the revision
/// that created it. A publication is made only if that key still exists with that
/// revision, so a deposed leader (its lease expired, another elected) cannot write.
#[derive(Debug, Clone)]
pub struct Leadership {
    pub key: Vec<u8>,
    pub rev: i64,
}

impl From<&LeaderKey> for Leadership {
    fn from(k: &LeaderKey) -> Leadership {
        Leadership {
            key: k.key().to_vec(),
            rev: k.rev(),
        }
    }
}

/// Why a publication was not made.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The leadership key is gone or was recreated: another LB leads now.
    #[error("this LB no longer leads (its election key is gone): the epoch was not published")]
    Fenced,
    /// Another epoch was published since the one this was based on.
    #[error("a newer epoch was published meanwhile: this one was not")]
    Stale,
    #[error(transparent)]
    Etcd(#[from] ClusterError),
}

/// The epoch in etcd as a publication must find it: its number and the revision
/// that last wrote it (0 and 0: none yet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EpochSeen {
    pub epoch: u64,
    pub mod_revision: i64,
}

/// Every record of the fleet at one revision.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub revision: i64,
    pub nodes: Vec<NodeRecord>,
    pub epoch: Option<(EpochRecord, EpochSeen)>,
    pub holds: Vec<(String, HoldRecord)>,
    /// Election candidates: key, create revision, node name.
    pub candidates: Vec<(String, i64, String)>,
    pub refused: Vec<BadRecord>,
}

/// One classified key-value of this fleet.
pub enum Record {
    Node(NodeRecord),
    Epoch(EpochRecord, EpochSeen),
    Hold(HoldRecord),
    Candidate {
        create_revision: i64,
        node: String,
    },
    /// A key under the prefix this build does not know: left alone.
    Other,
}

/// A connection to the fleet's etcd.
#[derive(Clone)]
pub struct Etcd {
    pub client: Client,
    pub keys: Keys,
}

/// Reads a TLS file named by `field` of `[cluster.tls]`.
fn read_tls(field: &'static str, path: &std::path::Path) -> Result<Vec<u8>, ClusterError> {
    std::fs::read(path).map_err(|source| ClusterError::TlsFile {
        field,
        path: path.to_owned(),
        source,
    })
}

/// Bounds one request to etcd.
pub async fn timed<T>(
    what: &'static str,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, ClusterError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(ClusterError::Etcd { what, source }),
        Err(_) => Err(ClusterError::Timeout {
            what,
            after: REQUEST_TIMEOUT,
        }),
    }
}

/// Reads every TLS file `cluster` names, so that a missing or unreadable one stops
/// the agent at start, named, instead of failing every session after it.
pub fn check_tls(cluster: &config::Cluster) -> Result<(), ClusterError> {
    if let Some(tls) = &cluster.tls {
        read_tls("cluster.tls.ca", &tls.ca)?;
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            read_tls("cluster.tls.cert", cert)?;
            read_tls("cluster.tls.key", key)?;
        }
    }
    Ok(())
}

impl Etcd {
    /// Connects to `cluster`'s endpoints (TLS files are read now, and a bad one named).
    pub async fn connect(cluster: &config::Cluster) -> Result<Etcd, ClusterError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            // HTTP/2 pings find a dead etcd (or path) in about two seconds, so the
            // session ends and starts again instead of waiting on a silent socket.
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &cluster.tls {
            let mut t = TlsOptions::new()
                .ca_certificate(Certificate::from_pem(read_tls("cluster.tls.ca", &tls.ca)?));
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                t = t.identity(Identity::from_pem(
                    read_tls("cluster.tls.cert", cert)?,
                    read_tls("cluster.tls.key", key)?,
                ));
            }
            options = options.with_tls(t);
        }
        let client = timed(
            "connecting",
            Client::connect(&cluster.endpoints, Some(options)),
        )
        .await?;
        Ok(Etcd {
            client,
            keys: Keys::new(&cluster.name),
        })
    }

    /// Classifies one key-value of this fleet, checking it.
    pub fn record(&self, kv: &etcd_client::KeyValue) -> Result<Record, BadRecord> {
        let key = String::from_utf8_lossy(kv.key());
        let value = kv.value();
        if let Some(node) = key.strip_prefix(&self.keys.nodes()) {
            return NodeRecord::parse(&key, node, value).map(Record::Node);
        }
        if key == self.keys.epoch() {
            return EpochRecord::parse(&key, value).map(|e| {
                let seen = EpochSeen {
                    epoch: e.epoch,
                    mod_revision: kv.mod_revision(),
                };
                Record::Epoch(e, seen)
            });
        }
        if key.starts_with(&self.keys.holds()) {
            return HoldRecord::parse(&key, value).map(Record::Hold);
        }
        if key.starts_with(&format!("{}/", self.keys.election())) {
            return Ok(Record::Candidate {
                create_revision: kv.create_revision(),
                node: String::from_utf8_lossy(value).into_owned(),
            });
        }
        Ok(Record::Other)
    }

    /// Every record of the fleet, and the revision they are at (a watch goes on
    /// from the next one).
    pub async fn snapshot(&mut self) -> Result<Snapshot, ClusterError> {
        let prefix = self.keys.all().to_owned();
        let response = timed(
            "reading the fleet's state",
            self.client
                .get(prefix, Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let mut out = Snapshot {
            revision: response.header().map_or(0, |h| h.revision()),
            ..Snapshot::default()
        };
        for kv in response.kvs() {
            match self.record(kv) {
                Ok(Record::Node(n)) => out.nodes.push(n),
                Ok(Record::Epoch(e, seen)) => out.epoch = Some((e, seen)),
                Ok(Record::Hold(h)) => {
                    out.holds
                        .push((String::from_utf8_lossy(kv.key()).into_owned(), h));
                }
                Ok(Record::Candidate {
                    create_revision,
                    node,
                }) => out.candidates.push((
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    create_revision,
                    node,
                )),
                Ok(Record::Other) => {}
                Err(bad) => out.refused.push(bad),
            }
        }
        Ok(out)
    }

    /// Writes this LB's record under its lease.
    pub async fn put_node(&mut self, record: &NodeRecord, lease: i64) -> Result<(), ClusterError> {
        let key = self.keys.node(&record.node);
        let value = serde_json::to_vec(record).expect("a record serialises");
        timed(
            "writing this LB's record",
            self.client
                .put(key, value, Some(PutOptions::new().with_lease(lease))),
        )
        .await?;
        Ok(())
    }

    /// Places (`Some`) or lifts (`None`) a fleet hold on `backend` of `vip`.
    pub async fn put_hold(
        &mut self,
        vip: &str,
        backend: IpAddr,
        hold: Option<&HoldRecord>,
    ) -> Result<(), ClusterError> {
        let key = self.keys.hold(vip, backend);
        match hold {
            Some(h) => {
                let value = serde_json::to_vec(h).expect("a record serialises");
                timed("writing a hold", self.client.put(key, value, None)).await?;
            }
            None => {
                timed("lifting a hold", self.client.delete(key, None)).await?;
            }
        }
        Ok(())
    }

    /// Publishes `epoch` as the one after `seen`, in one transaction that succeeds
    /// only while `leadership`'s key exists with its revision and no other epoch was
    /// published since `seen`. Returns the number it published.
    pub async fn publish(
        &mut self,
        leadership: &Leadership,
        mut epoch: EpochRecord,
        seen: EpochSeen,
    ) -> Result<u64, PublishError> {
        epoch.epoch = seen.epoch + 1;
        let value = serde_json::to_vec(&epoch).expect("a record serialises");
        let epoch_key = self.keys.epoch();
        let txn = Txn::new()
            .when(vec![
                Compare::create_revision(leadership.key.clone(), CompareOp::Equal, leadership.rev),
                Compare::mod_revision(epoch_key.clone(), CompareOp::Equal, seen.mod_revision),
            ])
            .and_then(vec![TxnOp::put(epoch_key, value, None)])
            .or_else(vec![TxnOp::get(leadership.key.clone(), None)]);
        let response = timed("publishing an epoch", self.client.txn(txn)).await?;
        if response.succeeded() {
            return Ok(epoch.epoch);
        }
        let still_leads = response.op_responses().iter().any(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .iter()
                .any(|kv| kv.create_revision() == leadership.rev),
            _ => false,
        });
        Err(if still_leads {
            PublishError::Stale
        } else {
            PublishError::Fenced
        })
    }
}
