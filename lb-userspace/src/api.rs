//! The control API: versioned JSON requests and typed answers over the agent's Unix
//! socket, one line each way per connection. The agent (`agent::overrides`,
//! `agent::views`) builds the answers, [`crate::control`] carries them, and the `lb`
//! command line ([`crate::cli`]) reads them back into the same types; every request is
//! validated by the agent before it acts.
//!
//! The answers' JSON is what `lb ... --json` prints, so their field names are an
//! interface: scripts and the end-to-end tests read them.

use std::{collections::BTreeMap, fmt, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::core::policy::PolicyKind;

/// The protocol version this build speaks. A request of another version is refused.
pub const VERSION: u32 = 1;

/// Largest request the agent reads, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;

/// A request, as sent on the socket: `{"version":1,"request":"status"}` or
/// `{"version":1,"request":{"weight_set":{"backend":"198.18.0.11","weight":5}}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub version: u32,
    pub request: Request,
}

/// What the caller asks for. A backend is named by its address, and by its VIP
/// (`198.18.1.1:80/tcp`, `[fd00::1]:80/tcp`) when the address serves more than one.
/// Each request's answer is named in its doc.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The agent's state: instance, interface, VIPs, counters, last reload. [`Status`].
    Status,
    /// Configured VIPs. A list of [`VipView`].
    VipList,
    /// Every backend with its weights and counters. A list of [`BackendView`].
    BackendList,
    /// Counters, with the agent's clock, for rates. [`Stats`].
    Stats,
    /// Hold `weight` until `auto` or the next reload. [`Change`].
    WeightSet {
        backend: IpAddr,
        #[serde(default)]
        vip: Option<String>,
        weight: u32,
    },
    /// Hold `weight` across reloads until `auto`. [`Change`].
    WeightPin {
        backend: IpAddr,
        #[serde(default)]
        vip: Option<String>,
        weight: u32,
    },
    /// Give the weight back to the policy (drops a pin, a set or a drain). [`Change`].
    WeightAuto {
        backend: IpAddr,
        #[serde(default)]
        vip: Option<String>,
    },
    /// No new flows to the backend; established flows continue. Asking again for a
    /// drained backend changes nothing and is not an error. [`Change`].
    Drain {
        backend: IpAddr,
        #[serde(default)]
        vip: Option<String>,
    },
    /// Undo `drain`; a backend that is not drained is left as it is. [`Change`].
    Undrain {
        backend: IpAddr,
        #[serde(default)]
        vip: Option<String>,
    },
    /// Which inputs produced each backend's weight. A list of [`Explanation`].
    Explain,
    /// Each VIP's lookup table as the datapath reads it now: size, backend slot
    /// counts and a digest of its bytes (two LBs with one config must agree). A list
    /// of [`TableView`].
    Tables,
    /// Re-read the configuration file; apply it completely or not at all. [`Change`].
    Reload,
    /// This LB in its fleet: leader, epochs, every LB's tables. [`ClusterStatus`].
    ClusterStatus,
}

impl Request {
    /// Whether the request changes what the agent does (as opposed to reading it).
    pub fn changes_state(&self) -> bool {
        matches!(
            self,
            Request::WeightSet { .. }
                | Request::WeightPin { .. }
                | Request::WeightAuto { .. }
                | Request::Drain { .. }
                | Request::Undrain { .. }
                | Request::Reload
        )
    }
}

/// The request as the `lb` command that sends it: `weight set 198.18.0.11 5`.
impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = |f: &mut fmt::Formatter<'_>, backend: &IpAddr, vip: &Option<String>| {
            write!(f, " {backend}")?;
            match vip {
                Some(vip) => write!(f, " --vip {vip}"),
                None => Ok(()),
            }
        };
        match self {
            Request::Status => f.write_str("status"),
            Request::VipList => f.write_str("vip list"),
            Request::BackendList => f.write_str("backend list"),
            Request::Stats => f.write_str("stats"),
            Request::Explain => f.write_str("explain"),
            Request::Tables => f.write_str("tables"),
            Request::Reload => f.write_str("reload"),
            Request::ClusterStatus => f.write_str("cluster status"),
            Request::WeightSet {
                backend,
                vip,
                weight,
            } => {
                f.write_str("weight set")?;
                target(f, backend, vip)?;
                write!(f, " {weight}")
            }
            Request::WeightPin {
                backend,
                vip,
                weight,
            } => {
                f.write_str("weight pin")?;
                target(f, backend, vip)?;
                write!(f, " {weight}")
            }
            Request::WeightAuto { backend, vip } => {
                f.write_str("weight auto")?;
                target(f, backend, vip)
            }
            Request::Drain { backend, vip } => {
                f.write_str("drain")?;
                target(f, backend, vip)
            }
            Request::Undrain { backend, vip } => {
                f.write_str("undrain")?;
                target(f, backend, vip)
            }
        }
    }
}

/// The answer, as sent on the socket: `{"ok":true,"result":...}` with the request's
/// answer type as `T`, or `{"ok":false,"error":"..."}`. The agent sends
/// `Response<Answer>`; a reader that does not know the request reads
/// `Response<serde_json::Value>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Response<T = serde_json::Value> {
    Ok { ok: bool, result: T },
    Error { ok: bool, error: String },
}

impl<T> Response<T> {
    pub fn ok(result: T) -> Response<T> {
        Response::Ok { ok: true, result }
    }
    pub fn error(message: impl Into<String>) -> Response<T> {
        Response::Error {
            ok: false,
            error: message.into(),
        }
    }
}

/// Every answer the agent gives, serialized as the answer itself (no tag): which one
/// comes back is decided by the request (see [`Request`]'s docs).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Answer {
    Status(Box<Status>),
    Vips(Vec<VipView>),
    Backends(Vec<BackendView>),
    Stats(Stats),
    Explain(Vec<Explanation>),
    Tables(Vec<TableView>),
    Change(Change),
    Cluster(Box<ClusterStatus>),
}

/// `cluster status`: this LB in its fleet. Without a `[cluster]` section, `enabled`
/// is false and the rest empty.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub enabled: bool,
    /// Whether this LB holds the fleet's current state and may take traffic (as
    /// `/ready` says); latched once true.
    pub ready: bool,
    /// What it still waits for, while not ready.
    pub waiting_for: Vec<String>,
    /// Flow sharing (`[cluster] share_listen`), when on.
    pub share: Option<crate::share::ShareState>,
    /// The fleet's name (the etcd key prefix `/lb/<name>/`).
    pub cluster: String,
    /// This LB's name in the fleet.
    pub node: String,
    pub endpoints: Vec<String>,
    /// Whether a session with etcd is up now.
    pub connected: bool,
    /// Whether this LB leads.
    pub leading: bool,
    /// The leading LB, as etcd's election says (last known while disconnected).
    pub leader: Option<String>,
    /// This LB's configuration digest; LBs with another apply none of its epochs.
    pub config_digest: String,
    /// The newest epoch applied here (0: none yet).
    pub epoch_applied: u64,
    /// The newest epoch published, as seen here, and who published it.
    pub epoch_newest: u64,
    pub epoch_leader: Option<String>,
    /// When the leader made the newest epoch, and when the one applied here took
    /// effect in this LB's datapath (milliseconds since the Unix epoch, each by its
    /// own host's clock).
    pub epoch_newest_written_ms: u64,
    pub epoch_applied_ms: u64,
    /// Milliseconds from the applied epoch's arrival here to its tables in force.
    pub apply_lag_ms: Option<f64>,
    /// Milliseconds the newest epoch has waited here unapplied (0: applied).
    pub lag_ms: u64,
    /// Why the newest epoch is not applied here, if it is not.
    pub not_applied: Option<String>,
    /// The digest of each VIP's table this LB's datapath reads now (as `nodes`'
    /// `tables`, which are as of each LB's last record).
    pub tables_here: BTreeMap<String, String>,
    /// Backends (`VIP backend`) this LB's own probes took out of its tables ahead of
    /// the fleet: while any is listed, its tables differ from the epoch's.
    pub down_here: Vec<String>,
    /// Why the last etcd session ended, while there is none.
    pub last_error: Option<String>,
    /// Epochs this LB published, and publications etcd refused because another LB
    /// led by then (fenced).
    pub published: u64,
    pub fenced: u64,
    /// Records read from etcd and refused, newest last, each with its key and why.
    pub refused_records: Vec<String>,
    /// Every LB with a record in etcd (their leases alive), this one included.
    pub nodes: Vec<ClusterNode>,
}

/// Whether an LB may take traffic (`/ready`), and if not, what it waits for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub waiting_for: Vec<String>,
}

impl Readiness {
    pub fn ready() -> Readiness {
        Readiness {
            ready: true,
            waiting_for: Vec::new(),
        }
    }
}

/// One LB of the fleet, from its last record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterNode {
    pub node: String,
    pub config_digest: String,
    /// Whether its configuration digest equals this LB's.
    pub same_config: bool,
    pub epoch_applied: u64,
    /// Milliseconds since its record arrived here.
    pub age_ms: u64,
    /// The digest of each VIP's table in force there (by configured backend index,
    /// as epochs give it; not the same digest as `lb tables`, which is over ids).
    pub tables: BTreeMap<String, Option<String>>,
    /// Whether every VIP's table there is the newest epoch's.
    pub agrees: bool,
}

/// `status`: the agent and its datapath at a glance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub instance: String,
    pub iface: String,
    /// The configuration file.
    pub config: PathBuf,
    pub uptime_seconds: u64,
    /// Configured VIPs.
    pub vips: usize,
    /// Backends of all VIPs.
    pub backends: usize,
    /// The VIPs' policies, comma-separated, each once.
    pub policy: String,
    pub model: ModelStatus,
    /// The last reload (SIGHUP or `lb reload`), if any.
    pub last_reload: Option<ReloadOutcome>,
    /// The datapath's counters since it was loaded.
    pub datapath: DatapathCounters,
    /// The flood guard and whether a flood is on.
    pub flood: FloodStatus,
    /// Each pinned map's size and memory.
    pub maps: Vec<MapMemoryView>,
    /// Full NAT's state, when a VIP forwards by `nat`.
    #[serde(default)]
    pub nat: Option<NatStatus>,
}

/// Full NAT (`forwarding = "nat"`), for `status` and `/metrics`. The counters are
/// the datapath's since it was loaded; flows and ports in use come from a walk of
/// the NAT tables, taken at most every [`NAT_USAGE_PERIOD`] (the walk costs two
/// system calls per flow: the next key, then its entry).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NatStatus {
    /// Flows in the NAT tables (each holds one port).
    pub flows: u64,
    /// Seconds since the tables were walked for `flows` and `sources`.
    pub walked_seconds_ago: f64,
    /// Ports each source address hands out per backend and port.
    pub ports_per_source: u64,
    /// Each source address and the ports it holds now (over all backends).
    pub sources: Vec<NatSourceUse>,
    /// Client packets sent to their backend.
    pub to_backend: u64,
    /// Backend replies sent back to their client.
    pub to_client: u64,
    /// Ports claimed by new flows.
    pub claimed: u64,
    /// Probes that found their port taken by another flow.
    pub port_collisions: u64,
    /// New flows refused because every port they tried was taken.
    pub ports_exhausted: u64,
    /// Evicted claims made again by their flow's next packet.
    pub reclaimed: u64,
    /// Flows whose port went to another flow (they take a new one).
    pub lost: u64,
    /// Packets to a NAT address that no flow holds (dropped).
    pub reply_unknown: u64,
    /// Entries removed as idle (`[nat]` timeouts) since the agent started.
    #[serde(default)]
    pub expired: u64,
}

/// How often the agent walks the NAT tables for [`NatStatus::flows`] and
/// [`NatStatus::sources`].
pub const NAT_USAGE_PERIOD: std::time::Duration = std::time::Duration::from_secs(10);

/// One NAT source address and the ports it holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NatSourceUse {
    pub address: String,
    pub ports_in_use: u64,
}

/// One BPF map of the datapath: its geometry and the memory the kernel charges for
/// it (`memlock` in its fdinfo).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MapMemoryView {
    pub name: String,
    pub max_entries: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub bytes: u64,
}

impl From<&crate::dataplane::MapMemory> for MapMemoryView {
    fn from(m: &crate::dataplane::MapMemory) -> MapMemoryView {
        MapMemoryView {
            name: m.name.to_owned(),
            max_entries: m.max_entries,
            key_size: m.key_size,
            value_size: m.value_size,
            bytes: m.bytes,
        }
    }
}

/// The flood guard (new flows wait in young tables until their second packet) and
/// the flood watch (`core::flood`), for `status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FloodStatus {
    /// Whether the guard is on (off with `lb run --no-flood-guard`).
    pub guard: bool,
    /// Whether a flood is on now.
    pub active: bool,
    /// For how long, if it is.
    pub active_seconds: Option<f64>,
    /// Floods since the agent started.
    pub episodes: u64,
    /// Unanswered new flows per second from which a flood is declared.
    pub threshold_per_second: f64,
    /// New flows per second over the last control interval (young-table writes).
    pub new_flows_per_second: f64,
    /// Of those, flows that did not send a second packet.
    pub unanswered_per_second: f64,
    /// New flows written into a young table since the datapath was loaded.
    pub young: u64,
    /// Of those, written into the connection table on their second packet.
    pub promoted: u64,
    /// Young-table writes that failed.
    pub young_failed: u64,
}

/// The load models' state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelStatus {
    /// Fits that failed since the agent started (the last good model stays in use).
    pub fit_failures: u64,
    /// How long the last successful fit took, in seconds.
    pub last_fit_seconds: Option<f64>,
    /// Addresses of the backends whose health probes fail now.
    pub unhealthy_backends: Vec<String>,
}

/// How the last reload went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReloadOutcome {
    pub seconds_ago: u64,
    pub ok: bool,
    /// Why it was refused (nothing changed then).
    pub error: Option<String>,
}

/// The datapath's global counters (`lb_common::types::GlobalStats`), by name; all
/// count frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatapathCounters {
    pub rx_frames: u64,
    pub tx: u64,
    pub tx_encap: u64,
    pub conn_hit: u64,
    pub conn_miss_syn: u64,
    pub conn_miss_non_syn: u64,
    pub conn_insert_failed: u64,
    pub pass_not_ip: u64,
    pub pass_not_vip: u64,
    pub pass_fragment: u64,
    pub pass_truncated: u64,
    pub pass_malformed: u64,
    pub pass_ipv6_extension: u64,
    pub pass_icmp_other: u64,
    pub ipv4_options: u64,
    pub icmp_echo_reply: u64,
    pub icmp_error_forwarded: u64,
    pub drop_no_backend: u64,
    pub drop_encap_failed: u64,
}

impl From<&lb_common::types::GlobalStats> for DatapathCounters {
    fn from(s: &lb_common::types::GlobalStats) -> DatapathCounters {
        DatapathCounters {
            rx_frames: s.rx_frames,
            tx: s.tx,
            tx_encap: s.tx_encap,
            conn_hit: s.conn_hit,
            conn_miss_syn: s.conn_miss_syn,
            conn_miss_non_syn: s.conn_miss_non_syn,
            conn_insert_failed: s.conn_insert_failed,
            pass_not_ip: s.pass_not_ip,
            pass_not_vip: s.pass_not_vip,
            pass_fragment: s.pass_fragment,
            pass_truncated: s.pass_truncated,
            pass_malformed: s.pass_malformed,
            pass_ipv6_extension: s.pass_ipv6_extension,
            pass_icmp_other: s.pass_icmp_other,
            ipv4_options: s.ipv4_options,
            icmp_echo_reply: s.icmp_echo_reply,
            icmp_error_forwarded: s.icmp_error_forwarded,
            drop_no_backend: s.drop_no_backend,
            drop_encap_failed: s.drop_encap_failed,
        }
    }
}

/// One configured VIP, as `vip list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VipView {
    /// `198.18.1.1:80/tcp`.
    pub vip: String,
    /// `dsr` or `ipip`.
    pub forwarding: String,
    /// `5-tuple` or `source`.
    pub hash: String,
    /// Slots of its lookup table.
    pub table_size: u32,
    pub backends: usize,
}

/// Who decides a backend's weight now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Control {
    /// The VIP's policy.
    Policy,
    /// `weight set`: held until `weight auto` or the next reload.
    Set,
    /// `weight pin`: held across reloads until `weight auto`.
    Pinned,
    /// `drain`: 0 until `undrain` or `weight auto`.
    Drained,
}

impl fmt::Display for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Control::Policy => "policy",
            Control::Set => "set",
            Control::Pinned => "pinned",
            Control::Drained => "drained",
        })
    }
}

/// One backend, as `backend list` and `stats` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    pub vip: String,
    pub backend: IpAddr,
    pub mac: String,
    pub configured_weight: u32,
    /// The weight in force, in the same units as the configured weight.
    pub weight: f64,
    /// Who decides the weight now.
    pub control: Control,
    /// Frames forwarded to it since the datapath was loaded.
    pub packets: u64,
    /// Bytes forwarded to it.
    pub bytes: u64,
    /// New flows sent to it.
    pub new_flows: u64,
    /// Health by the probes (true when the VIP has no `[vip.health]`).
    #[serde(default = "yes")]
    pub healthy: bool,
    /// The latency a new flow suffers there now (scraped, else probed), ms.
    #[serde(default)]
    pub latency_ms: Option<f64>,
    /// That latency one control interval ahead, as predicted, ms.
    #[serde(default)]
    pub predicted_ms: Option<f64>,
    /// Which predictor made the prediction (the model, or the baseline that beats it).
    #[serde(default)]
    pub predictor: Option<String>,
}

fn yes() -> bool {
    true
}

/// `stats`: counters and the agent's clock, so that two answers give rates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Milliseconds since the agent started.
    pub uptime_ms: u64,
    pub datapath: DatapathCounters,
    pub backends: Vec<BackendView>,
}

/// One VIP's lookup table as the datapath reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableView {
    pub vip: String,
    /// Slots.
    pub size: usize,
    /// FNV-1a 64 over the slots as little-endian u32 backend ids, in hex.
    pub digest: String,
    /// Slots per backend address.
    pub slots: BTreeMap<String, usize>,
}

/// Why one backend has its weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    pub vip: String,
    pub backend: IpAddr,
    /// The VIP's policy.
    pub policy: Option<PolicyKind>,
    pub inputs: ExplainInputs,
    /// The weight before the policy's last update, in configured units.
    pub weight_before: Option<f64>,
    /// The weight in force, in configured units.
    pub weight: f64,
    /// Policy units per configured weight unit: the policy works in finer steps, and
    /// the figures in `why` are in its units (weight 1 is this many of them).
    pub policy_units_per_weight: u32,
    /// The deciding stage and what later stages did, in words (figures in policy
    /// units), or the operator's hold.
    pub why: String,
}

/// What the policy decided a backend's weight from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExplainInputs {
    pub configured_weight: u32,
    /// Who decides the weight now.
    #[serde(rename = "override")]
    pub control: Control,
    /// The predicted latency the policy used, in seconds.
    pub predicted_latency_s: Option<f64>,
    /// Which predictor made it.
    pub predictor: Option<String>,
    /// `[control] predictor`: which predictor drives `ai` (`auto`: the model while it
    /// beats the baselines).
    #[serde(default)]
    pub predictor_setting: crate::core::model::PredictorSetting,
    /// Why that predictor drives the weights now, with the rolling errors behind it.
    #[serde(default)]
    pub predictor_why: Option<String>,
}

/// What a setting command (`weight set|pin|auto`, `drain`, `undrain`, `reload`) did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// What was done, in words: `drained`, `configuration reloaded from lb.toml`.
    pub action: String,
    /// False when the request asked for what already held: nothing was written.
    pub changed: bool,
    /// Why nothing changed (`already drained`), when `changed` is false.
    pub note: Option<String>,
    /// Every backend whose weight or hold changed, or that came or went.
    pub backends: Vec<BackendChange>,
    /// Every VIP whose lookup table changed, or that came or went.
    pub vips: Vec<VipChange>,
}

/// One backend's part in a [`Change`]. Weights in configured units; `None` where the
/// backend did not exist (before a reload added it, after one removed it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendChange {
    pub vip: String,
    pub backend: IpAddr,
    /// The backend the request named (listed even when nothing about it changed).
    pub named: bool,
    pub weight_before: Option<f64>,
    pub weight: Option<f64>,
    pub control_before: Option<Control>,
    pub control: Option<Control>,
    /// Slots of its VIP's lookup table it held before and holds now.
    pub slots_before: usize,
    pub slots: usize,
    /// Slots it gave up, by the backend that holds them now (most first).
    pub moved_to: Vec<SlotMove>,
    /// Slots it took over, by the backend that held them (most first).
    pub moved_from: Vec<SlotMove>,
}

/// Slots that went from one backend to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotMove {
    pub backend: IpAddr,
    pub slots: usize,
}

/// One VIP's part in a [`Change`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VipChange {
    pub vip: String,
    /// `added`, `removed` or `changed`.
    pub change: VipChangeKind,
    /// Slots of its lookup table (now, or before it was removed).
    pub size: usize,
    /// Slots whose backend differs between the table before and after.
    pub slots_moved: usize,
}

/// What happened to a VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VipChangeKind {
    Added,
    Removed,
    Changed,
}

/// The text of an error and its causes, each said once: `a: b: c`, leaving out a
/// cause whose text is already part of what was said (many errors include their
/// source in their own message, and `{:#}` would repeat it). What `lb` prints after
/// `lb: error:` and what the agent answers with.
pub fn error_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_read_as_documented() {
        let text = r#"{"version":1,"request":{"weight_set":{"backend":"198.18.0.11","vip":"198.18.1.1:80/tcp","weight":5}}}"#;
        let env: Envelope = serde_json::from_str(text).unwrap();
        assert_eq!(env.version, 1);
        assert_eq!(
            env.request,
            Request::WeightSet {
                backend: "198.18.0.11".parse().unwrap(),
                vip: Some("198.18.1.1:80/tcp".into()),
                weight: 5
            }
        );
        let back = serde_json::to_string(&env).unwrap();
        assert_eq!(serde_json::from_str::<Envelope>(&back).unwrap(), env);
        let status: Envelope = serde_json::from_str(r#"{"version":1,"request":"status"}"#).unwrap();
        assert_eq!(status.request, Request::Status);
        assert_eq!(
            env.request.to_string(),
            "weight set 198.18.0.11 --vip 198.18.1.1:80/tcp 5"
        );
    }

    #[test]
    fn bad_requests_are_refused_by_the_decoder() {
        for bad in [
            r#"{"version":1,"request":"format_disk"}"#,
            r#"{"version":1,"request":{"weight_set":{"backend":"not-an-ip","weight":1}}}"#,
            r#"{"version":1,"request":{"weight_set":{"backend":"198.18.0.11","weight":-1}}}"#,
            r#"{"version":1,"request":{"weight_set":{"backend":"198.18.0.11","weight":1,"x":2}}}"#,
            r#"{"version":1,"request":"status","extra":1}"#,
            r#"{"request":"status"}"#,
            "not json",
        ] {
            assert!(
                serde_json::from_str::<Envelope>(bad).is_err(),
                "accepted {bad}"
            );
        }
    }

    /// The field names scripts and the end-to-end tests read from `lb status --json`
    /// and `lb backend list --json`.
    #[test]
    fn answers_keep_the_field_names_their_readers_use() {
        let status = serde_json::to_value(Status::default()).unwrap();
        for path in [
            "/instance",
            "/datapath/conn_miss_non_syn",
            "/datapath/tx",
            "/model/unhealthy_backends",
            "/model/fit_failures",
            "/model/last_fit_seconds",
            "/last_reload",
        ] {
            assert!(status.pointer(path).is_some(), "no {path} in {status}");
        }
        let backend = BackendView {
            vip: "198.18.1.1:80/tcp".into(),
            backend: "198.18.0.11".parse().unwrap(),
            mac: "02:00:00:00:00:11".into(),
            configured_weight: 1,
            weight: 5.0,
            control: Control::Set,
            packets: 1,
            bytes: 2,
            new_flows: 3,
            healthy: true,
            latency_ms: Some(1.5),
            predicted_ms: None,
            predictor: None,
        };
        let text = serde_json::to_string_pretty(&[&backend]).unwrap();
        assert!(text.contains("\"weight\": 5"), "{text}");
        assert!(text.contains("\"control\": \"set\""), "{text}");
        let value = serde_json::to_value(&backend).unwrap();
        for key in [
            "backend",
            "weight",
            "new_flows",
            "packets",
            "healthy",
            "latency_ms",
            "predicted_ms",
        ] {
            assert!(value.get(key).is_some(), "no {key} in {value}");
        }
        assert_eq!(
            serde_json::from_value::<BackendView>(value).unwrap(),
            backend
        );
    }

    #[test]
    fn a_typed_answer_reads_back_as_its_type_and_as_json() {
        let answer = Response::ok(Answer::Change(Change {
            action: "drained".into(),
            changed: false,
            note: Some("already drained".into()),
            ..Change::default()
        }));
        let line = serde_json::to_string(&answer).unwrap();
        let typed: Response<Change> = serde_json::from_str(&line).unwrap();
        match typed {
            Response::Ok { ok, result } => {
                assert!(ok);
                assert_eq!(result.note.as_deref(), Some("already drained"));
            }
            other => panic!("{other:?}"),
        }
        let refused: Response<Change> =
            serde_json::from_str(r#"{"ok":false,"error":"no"}"#).unwrap();
        assert_eq!(refused, Response::error("no"));
        assert!(serde_json::from_str::<Response>(&line).is_ok());
    }

    /// An error whose message already says its source, as many library errors do.
    #[derive(Debug)]
    struct Says(String, Option<Box<Says>>);

    impl fmt::Display for Says {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for Says {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|s| s as _)
        }
    }

    fn chain(messages: &[&str]) -> Says {
        let mut error: Option<Box<Says>> = None;
        for m in messages.iter().rev() {
            error = Some(Box::new(Says(m.to_string(), error)));
        }
        *error.unwrap()
    }

    #[test]
    fn an_error_chain_says_each_message_once() {
        let e = chain(&[
            "reading /etc/lb.toml",
            "No such file or directory (os error 2)",
            "No such file or directory (os error 2)",
        ]);
        assert_eq!(
            error_text(&e),
            "reading /etc/lb.toml: No such file or directory (os error 2)"
        );
        let e = chain(&[
            "`bpf_link_create` failed: Invalid argument (os error 22)",
            "`bpf_link_create` failed",
            "Invalid argument (os error 22)",
        ]);
        assert_eq!(
            error_text(&e),
            "`bpf_link_create` failed: Invalid argument (os error 22)"
        );
        let e = chain(&["attaching to eth0", "`bpf_link_create` failed", "EINVAL"]);
        assert_eq!(
            error_text(&e),
            "attaching to eth0: `bpf_link_create` failed: EINVAL"
        );
        assert_eq!(error_text(&chain(&["alone"])), "alone");
    }

    #[test]
    fn error_text_dedups_an_anyhow_context_too() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = anyhow::Error::new(io)
            .context(format!(
                "{}",
                std::io::Error::from(std::io::ErrorKind::NotFound)
            ))
            .context("reading lb.toml");
        assert_eq!(error_text(e.as_ref()), "reading lb.toml: entity not found");
    }
}
