//! The agent's configuration: the TOML file an operator writes, checked completely
//! into a [`Config`] before anything touches the kernel. Called by the agent at start.
//!
//! ```toml
//! [[vip]]
//! address = "198.18.1.1"   # IPv4 or IPv6
//! port = 80
//! protocol = "tcp"         # "tcp" or "udp"
//! hash = "5-tuple"         # or "source": every flow of a client to one backend
//! table_size = 65537       # prime, at most 65537
//! forwarding = "dsr"        # or "ipip": IP-in-IP to the backend's address;
//!                           # or "nat": full NAT, the LB in the path both ways
//! policy = "ai"             # or "equal", "static", "reactive" (see `policy`)
//!
//! [[vip.backend]]
//! address = "198.18.0.11"
//! mac = "02:00:00:00:00:11" # where frames for this backend go (L2 DSR: its own MAC)
//! weight = 1                # share of new flows; 0 drains it
//!
//! [encapsulation]           # needed by VIPs with forwarding = "ipip"
//! source_v4 = "198.19.0.0"  # a /16: the last two bytes come from the flow hash
//! source_v6 = "fd00:19::"   # a /96: the last four bytes come from the flow hash
//!
//! [nat]                     # needed by VIPs with forwarding = "nat"
//! source_v4 = "198.18.200.0/30"  # the addresses backends see as the client (<= 64)
//! source_v6 = "fd00:200::/126"   # routed to this LB, used by nothing else
//! port_min = 1024           # source ports handed out per address and backend
//! port_max = 65535
//!
//! [datapath]                # fixed when the agent first creates the datapath
//! connection_table_v4 = 131072    # IPv4 flows kept at once (88 bytes each)
//! connection_table_v6 = 16384     # IPv6 flows (112 bytes each)
//! nat_table_v4 = 65536            # IPv4 full-NAT flows (136 bytes each)
//! nat_table_v6 = 8192             # IPv6 full-NAT flows
//! max_vips = 8                    # VIPs the lookup tables have room for (256 KiB each)
//! ```

use std::{
    collections::BTreeSet,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use lb_common::maps::{DEFAULT_RING_SIZE, MAX_BACKENDS, MAX_RING_SIZE, MAX_VIPS};
use serde::Deserialize;

use crate::core::{maglev, policy};

/// Largest weight a backend may have. Weights are relative; this keeps every sum of
/// weights far from overflow and well inside what the table builder accepts.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// A configuration that was read or checked and found wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "config file {path} is writable by every user (mode {mode:o}); anyone could redirect \
         traffic through it: chmod o-w it"
    )]
    WorldWritable { path: PathBuf, mode: u32 },
    #[error("config file {path} is not valid TOML for this agent: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config field `{field}`: {problem}")]
    Invalid { field: String, problem: String },
}

fn invalid(field: impl Into<String>, problem: impl fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.to_string(),
    }
}

/// Transport protocol of a VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::types::PROTO_TCP,
            Protocol::Udp => lb_common::types::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Which header fields choose a new flow's backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum HashFields {
    /// Source and destination address and port, and protocol.
    #[default]
    #[serde(rename = "5-tuple")]
    FiveTuple,
    /// The source address only: all of one client's flows reach one backend.
    #[serde(rename = "source")]
    Source,
}

/// How packets reach a VIP's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// L2 direct server return: only the destination MAC changes; the backend holds
    /// the VIP on a loopback interface and is on the load balancer's segment.
    #[default]
    Dsr,
    /// IP-in-IP (IPIP, IPv6-in-IPv6, or across families) to the backend's address;
    /// the backend decapsulates and answers the client directly.
    Ipip,
    /// Full NAT: the backend sees one of the `[nat]` addresses as the client and
    /// answers it; the LB turns the answer back. The backend needs no VIP, no
    /// tunnel, and no L2 adjacency; it does not see the client's address.
    Nat,
}

/// The whole configuration, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vips: Vec<Vip>,
    /// How often and how gently weights change.
    pub control: Control,
    /// Outer source prefixes of encapsulated packets, when a VIP uses `ipip`.
    pub encapsulation: Encapsulation,
    /// Source addresses and ports of full NAT, when a VIP uses `nat`.
    pub nat: Nat,
    /// The fleet this LB belongs to; `None`: a single LB, deciding alone.
    pub cluster: Option<Cluster>,
    /// Sizes of the datapath's tables, fixed when the agent creates them.
    pub datapath: DatapathSizes,
}

/// The `[datapath]` section: how many flows the connection tables hold, and how
/// many VIPs the lookup tables have room for. The kernel preallocates them when the
/// agent first loads the datapath (about 88 bytes per IPv4 entry, 112 per IPv6 one
/// and 256 KiB per VIP, as it accounts them); an agent that adopts a pinned
/// datapath keeps the tables it finds, whatever is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatapathSizes {
    /// Entries of `CONNS_V4`: IPv4 flows kept on their backend at once (an LRU
    /// table: the least recently used flow goes when it is full).
    pub connection_table_v4: u32,
    /// Entries of `CONNS_V6`.
    pub connection_table_v6: u32,
    /// Entries of `NAT_V4`: IPv4 full-NAT flows at once (an LRU like the
    /// connection table; a flow whose entry goes loses its replies until its next
    /// packet makes it again).
    pub nat_table_v4: u32,
    /// Entries of `NAT_V6`.
    pub nat_table_v6: u32,
    /// VIPs the lookup tables (`RINGS`) have room for, two copies each; at most
    /// `lb_common::maps::MAX_VIPS`.
    pub max_vips: u32,
}

impl Default for DatapathSizes {
    fn default() -> Self {
        DatapathSizes {
            connection_table_v4: lb_common::maps::CONN_TABLE_SIZE_V4,
            connection_table_v6: lb_common::maps::CONN_TABLE_SIZE_V6,
            nat_table_v4: lb_common::maps::NAT_TABLE_SIZE_V4,
            nat_table_v6: lb_common::maps::NAT_TABLE_SIZE_V6,
            max_vips: lb_common::maps::DEFAULT_MAX_VIPS,
        }
    }
}

/// The smallest and largest connection table `[datapath]` accepts.
pub const CONNECTION_TABLE_RANGE: std::ops::RangeInclusive<u32> = 4_096..=(1 << 26);

impl Config {
    /// Whether a VIP forwards by full NAT.
    pub fn uses_nat(&self) -> bool {
        self.vips.iter().any(|v| v.forwarding == Forwarding::Nat)
    }

    /// The sizes the datapath is created with: `[datapath]`, except that the NAT
    /// tables get `lb_common::maps::NAT_TABLE_UNUSED` entries when no VIP forwards
    /// by `nat` (so that balancing without NAT does not pay for its tables).
    pub fn datapath_sizes(&self) -> DatapathSizes {
        let mut sizes = self.datapath;
        if !self.uses_nat() {
            sizes.nat_table_v4 = lb_common::maps::NAT_TABLE_UNUSED;
            sizes.nat_table_v6 = lb_common::maps::NAT_TABLE_UNUSED;
        }
        sizes
    }

    /// A digest of everything that decides the tables (VIPs, backends, policies and
    /// `[control]`), so that LBs of a fleet can tell whether they were given the same
    /// decisions to make. `[cluster]` is left out: each LB names itself there. The
    /// text it hashes is this build's rendering of those sections, so LBs of
    /// different builds may differ, which is the safe side: a policy may differ too.
    pub fn digest(&self) -> String {
        let text = format!(
            "{:?}|{:?}|{:?}",
            self.vips, self.control, self.encapsulation
        );
        format!("{:016x}", crate::core::fnv1a(text.as_bytes()))
    }
}

/// The `[cluster]` section: etcd, where a fleet of LBs shares what each observes,
/// elects the LB that decides, and reads the decision every LB applies.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// etcd client URLs (`http://host:port` or `https://host:port`).
    pub endpoints: Vec<String>,
    /// The fleet's name: every key lives under `/lb/<name>/`.
    pub name: String,
    /// This LB's name in the fleet (default: the host name).
    pub node: String,
    /// Seconds an LB's records and leadership outlive its last keep-alive (2..=60).
    pub lease_s: u64,
    /// TLS towards etcd; `None`: plain `http://` endpoints.
    pub tls: Option<ClusterTls>,
    /// Flow sharing: where the other LBs send this one their flows (told to them
    /// through etcd). `None`: no sharing, and a flow whose LB leaves keeps its
    /// backend only if the table did not move since it began.
    pub share_listen: Option<ShareListen>,
}

/// `cluster.share_listen`: an address and port, or only a port (`":7947"`) on the
/// address of the interface the agent attaches to (the same file then serves every
/// LB, as in the Kubernetes example).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareListen {
    Address(std::net::SocketAddr),
    Port(u16),
}

/// `[cluster.tls]`: the CA that signed etcd's certificate, and this LB's client
/// certificate and key (both or neither) when etcd asks for one.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    endpoints: Vec<String>,
    name: String,
    node: Option<String>,
    lease_s: Option<u64>,
    tls: Option<RawClusterTls>,
    share_listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClusterTls {
    ca: PathBuf,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// The default lease: a dead leader is replaced within this plus one interval.
pub const DEFAULT_LEASE_S: u64 = 5;

/// A name usable in an etcd key: 1 to 63 of `[A-Za-z0-9._-]`.
fn check_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{name:?} must be 1 to 63 letters, digits, '.', '_' or '-'"),
        ))
    }
}

/// This machine's host name (`gethostname`).
fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length, which is what is passed.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..end].to_vec()).ok()
}

fn check_cluster(raw: Option<RawCluster>) -> Result<Option<Cluster>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    if raw.endpoints.is_empty() {
        return Err(invalid(
            "cluster.endpoints",
            "no etcd endpoint; give at least one, e.g. \"http://198.18.0.9:2379\"",
        ));
    }
    let tls = raw.tls.is_some();
    for (i, e) in raw.endpoints.iter().enumerate() {
        let field = format!("cluster.endpoints[{i}]");
        let (scheme, rest) = e.split_once("://").ok_or_else(|| {
            invalid(
                &field,
                format!("{e:?} is not a URL like \"http://host:2379\""),
            )
        })?;
        match (scheme, tls) {
            ("http", false) | ("https", true) => {}
            ("http", true) => {
                return Err(invalid(
                    &field,
                    format!("{e:?} is plain http, but [cluster.tls] is set: use https://"),
                ));
            }
            ("https", false) => {
                return Err(invalid(
                    &field,
                    format!("{e:?} is https, but there is no [cluster.tls] with the CA to trust"),
                ));
            }
            _ => {
                return Err(invalid(
                    &field,
                    format!("{e:?}: the scheme must be http or https"),
                ));
            }
        }
        let port_ok = rest.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok || rest.contains('/') {
            return Err(invalid(
                &field,
                format!("{e:?} must be scheme://host:port, with nothing after the port"),
            ));
        }
    }
    check_name("cluster.name", &raw.name)?;
    let node = match raw.node {
        Some(node) => node,
        None => host_name().ok_or_else(|| {
            invalid(
                "cluster.node",
                "not given, and the host name cannot be read",
            )
        })?,
    };
    check_name("cluster.node", &node)?;
    let lease_s = raw.lease_s.unwrap_or(DEFAULT_LEASE_S);
    if !(2..=60).contains(&lease_s) {
        return Err(invalid(
            "cluster.lease_s",
            format!("{lease_s} is outside [2, 60] (etcd refuses shorter leases)"),
        ));
    }
    let tls = match raw.tls {
        None => None,
        Some(t) => {
            if t.cert.is_some() != t.key.is_some() {
                return Err(invalid(
                    if t.cert.is_some() {
                        "cluster.tls.key"
                    } else {
                        "cluster.tls.cert"
                    },
                    "a client certificate needs its key, and a key its certificate",
                ));
            }
            Some(ClusterTls {
                ca: t.ca,
                cert: t.cert,
                key: t.key,
            })
        }
    };
    let share_listen = raw
        .share_listen
        .map(|text| check_share_listen(&text))
        .transpose()?;
    Ok(Some(Cluster {
        endpoints: raw.endpoints,
        name: raw.name,
        node,
        lease_s,
        tls,
        share_listen,
    }))
}

/// `cluster.share_listen`: an address the other LBs can reach, with a port, or a
/// port alone (`":7947"`).
fn check_share_listen(text: &str) -> Result<ShareListen, ConfigError> {
    const FIELD: &str = "cluster.share_listen";
    if let Some(port) = text.strip_prefix(':') {
        return match port.parse::<u16>() {
            Ok(p) if p > 0 => Ok(ShareListen::Port(p)),
            _ => Err(invalid(
                FIELD,
                format!("{text:?}: the port must be 1 to 65535"),
            )),
        };
    }
    let addr: std::net::SocketAddr = text.parse().map_err(|_| {
        invalid(
            FIELD,
            format!(
                "{text:?} is not an address and port like \"198.18.0.2:7947\" or \
                 \"[fd00::2]:7947\", or a port alone like \":7947\" (on the address of \
                 the interface the agent attaches to)"
            ),
        )
    })?;
    if addr.ip().is_unspecified() || addr.ip().is_multicast() || addr.port() == 0 {
        return Err(invalid(
            FIELD,
            format!("{text:?}: give this LB's own address and a port: the other LBs connect to it"),
        ));
    }
    Ok(ShareListen::Address(addr))
}

/// The `[control]` section: the control loop's tuning (see `policy::Params`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Control {
    /// Milliseconds between weight updates (100..=60000).
    pub interval_ms: u64,
    /// Most of a lookup table that may move per second (0 < x ≤ 1).
    pub move_budget_per_second: f64,
    /// Smallest share a healthy backend keeps under `reactive` and `ai` (0..0.5).
    pub floor_share: f64,
    /// Smoothing toward the target per update (0 < x ≤ 1).
    pub smoothing: f64,
    /// Relative change below which a weight is left alone (0..1).
    pub hysteresis: f64,
    /// A strained backend (busy or failing ≥ 90 % of the time) whose shown capacity
    /// and target both fall below this fraction of its weight sheds to the lower of
    /// the two at once, outside smoothing and the move budget (0..=0.8; 0: never).
    pub shed_ratio: f64,
    /// Which predictor drives `ai`: `auto` (the model while it beats the baselines),
    /// or always `svr`, `ewma` or `last`.
    pub predictor: crate::core::model::PredictorSetting,
    /// `reactive` and `ai` eject a backend whose error rate over an interval is at
    /// least this much above the pool's (0 < x ≤ 1).
    pub eject_error_rate: f64,
    /// Requests a backend must have answered in an interval for its error rate to
    /// count (1..=1000000).
    pub eject_min_requests: u32,
    /// Most of the healthy, unheld backends of a VIP ejected at once (0..=0.9; 0:
    /// never eject).
    pub eject_max_share: f64,
    /// How long the first ejection lasts; the n-th consecutive one n times as long,
    /// at most 10 times (1000..=3600000).
    pub eject_time_ms: u64,
}

impl Default for Control {
    fn default() -> Control {
        Control {
            interval_ms: 1000,
            move_budget_per_second: 0.02,
            floor_share: 0.01,
            smoothing: 0.5,
            hysteresis: 0.05,
            shed_ratio: 0.5,
            predictor: crate::core::model::PredictorSetting::Auto,
            eject_error_rate: 0.2,
            eject_min_requests: 10,
            eject_max_share: 0.5,
            eject_time_ms: 10_000,
        }
    }
}

impl Control {
    /// The policy parameters of a VIP with `configured` weights under this section:
    /// the scale is the configured sum in policy units ([`policy::unit`]), the
    /// quantum a thousandth of it or a hundredth of an average backend's weight,
    /// whichever is finer. Used by the agent and the simulator alike.
    pub fn params_for(&self, configured: &[u32]) -> policy::Params {
        let unit = policy::unit(configured);
        let scale = configured.iter().sum::<u32>().saturating_mul(unit).max(1);
        let per_backend = scale / (configured.len() as u32).max(1);
        policy::Params {
            scale,
            unit,
            quantum: (scale / 1000).min(per_backend / 100).max(1),
            floor_share: self.floor_share,
            smoothing: self.smoothing,
            hysteresis: self.hysteresis,
            budget_per_second: self.move_budget_per_second,
            interval_s: self.interval_ms as f64 / 1000.0,
            shed_ratio: self.shed_ratio,
            eject_error_rate: self.eject_error_rate,
            eject_min_requests: f64::from(self.eject_min_requests),
            eject_max_share: self.eject_max_share,
            eject_time_s: self.eject_time_ms as f64 / 1000.0,
            ..policy::Params::default()
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    interval_ms: Option<u64>,
    move_budget_per_second: Option<f64>,
    floor_share: Option<f64>,
    smoothing: Option<f64>,
    hysteresis: Option<f64>,
    shed_ratio: Option<f64>,
    predictor: Option<String>,
    eject_error_rate: Option<f64>,
    eject_min_requests: Option<u32>,
    eject_max_share: Option<f64>,
    eject_time_ms: Option<u64>,
}

fn check_control(raw: Option<RawControl>) -> Result<Control, ConfigError> {
    let d = Control::default();
    let Some(raw) = raw else { return Ok(d) };
    let range = |name: &str, v: f64, lo: f64, lo_open: bool, hi: f64| {
        let ok = v.is_finite() && (if lo_open { v > lo } else { v >= lo }) && v <= hi;
        if ok {
            Ok(v)
        } else {
            Err(invalid(
                format!("control.{name}"),
                format!(
                    "{v} is outside {}{lo}, {hi}]",
                    if lo_open { "(" } else { "[" }
                ),
            ))
        }
    };
    let interval_ms = raw.interval_ms.unwrap_or(d.interval_ms);
    if !(100..=60_000).contains(&interval_ms) {
        return Err(invalid(
            "control.interval_ms",
            format!("{interval_ms} is outside [100, 60000]"),
        ));
    }
    let predictor = match raw.predictor {
        None => d.predictor,
        Some(name) => name
            .parse()
            .map_err(|e: String| invalid("control.predictor", e))?,
    };
    let eject_min_requests = raw.eject_min_requests.unwrap_or(d.eject_min_requests);
    if !(1..=1_000_000).contains(&eject_min_requests) {
        return Err(invalid(
            "control.eject_min_requests",
            format!("{eject_min_requests} is outside [1, 1000000]"),
        ));
    }
    let eject_time_ms = raw.eject_time_ms.unwrap_or(d.eject_time_ms);
    if !(1_000..=3_600_000).contains(&eject_time_ms) {
        return Err(invalid(
            "control.eject_time_ms",
            format!("{eject_time_ms} is outside [1000, 3600000]"),
        ));
    }
    Ok(Control {
        interval_ms,
        predictor,
        move_budget_per_second: range(
            "move_budget_per_second",
            raw.move_budget_per_second
                .unwrap_or(d.move_budget_per_second),
            0.0,
            true,
            1.0,
        )?,
        floor_share: range(
            "floor_share",
            raw.floor_share.unwrap_or(d.floor_share),
            0.0,
            false,
            0.5,
        )?,
        smoothing: range(
            "smoothing",
            raw.smoothing.unwrap_or(d.smoothing),
            0.0,
            true,
            1.0,
        )?,
        hysteresis: range(
            "hysteresis",
            raw.hysteresis.unwrap_or(d.hysteresis),
            0.0,
            false,
            1.0,
        )?,
        shed_ratio: range(
            "shed_ratio",
            raw.shed_ratio.unwrap_or(d.shed_ratio),
            0.0,
            false,
            0.8,
        )?,
        eject_error_rate: range(
            "eject_error_rate",
            raw.eject_error_rate.unwrap_or(d.eject_error_rate),
            0.0,
            true,
            1.0,
        )?,
        eject_min_requests,
        eject_max_share: range(
            "eject_max_share",
            raw.eject_max_share.unwrap_or(d.eject_max_share),
            0.0,
            false,
            0.9,
        )?,
        eject_time_ms,
    })
}

/// Outer source prefixes for encapsulation: a /16 for IPv4 and a /96 for IPv6 whose
/// remaining bits the datapath fills from the flow hash, so ECMP spreads flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Encapsulation {
    pub source_v4: Option<std::net::Ipv4Addr>,
    pub source_v6: Option<std::net::Ipv6Addr>,
}

/// The `[nat]` section: the source addresses and ports full NAT gives flows. The
/// addresses must be routed to this LB and used by nothing else (no host socket, no
/// other LB of a fleet): replies to them are the datapath's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nat {
    /// IPv4 sources: a prefix of at most 64 addresses (/26 to /32).
    pub source_v4: Option<(std::net::Ipv4Addr, u8)>,
    /// IPv6 sources: a prefix of at most 64 addresses (/122 to /128).
    pub source_v6: Option<(std::net::Ipv6Addr, u8)>,
    /// Lowest source port handed out.
    pub port_min: u16,
    /// Highest source port handed out.
    pub port_max: u16,
    /// Seconds without a packet after which a NAT flow's entry (its port) goes:
    /// TCP, TCP after a FIN or RST, UDP.
    pub timeout_tcp_s: u32,
    pub timeout_tcp_closing_s: u32,
    pub timeout_udp_s: u32,
}

impl Default for Nat {
    fn default() -> Self {
        Nat {
            source_v4: None,
            source_v6: None,
            port_min: 1024,
            port_max: u16::MAX,
            timeout_tcp_s: 7200,
            timeout_tcp_closing_s: 60,
            timeout_udp_s: 120,
        }
    }
}

impl Nat {
    /// Whether `addr` is one of the NAT source addresses.
    pub fn contains(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => self.source_v4.is_some_and(|(first, len)| {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                u32::from(a) & mask == u32::from(first)
            }),
            IpAddr::V6(a) => self.source_v6.is_some_and(|(first, len)| {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                u128::from(a) & mask == u128::from(first)
            }),
        }
    }
}

/// The NAT timeouts `[nat]` accepts, in seconds (up to 30 days).
pub const NAT_TIMEOUT_RANGE_S: std::ops::RangeInclusive<u32> = 10..=2_592_000;

/// One virtual service, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Vip {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub hash: HashFields,
    pub table_size: u32,
    pub forwarding: Forwarding,
    /// How this VIP's weights are set.
    pub policy: crate::core::policy::PolicyKind,
    /// Active probes of each backend, if configured.
    pub health: Option<Health>,
    /// Prometheus scrapes of each backend, if configured.
    pub metrics: Option<Metrics>,
    /// Sorted by address, so that every agent given the same file agrees on ids.
    pub backends: Vec<Backend>,
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.address {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// `[vip.health]`: active probes of each backend's own address. A backend that
/// fails `fall` probes in a row gets weight 0; `rise` passes bring it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Port probed on the backend's own address (default: the VIP's port).
    pub port: u16,
    /// Also `GET` this path and expect a 2xx status.
    pub http_path: Option<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
}

/// `[vip.metrics]`: where each backend serves Prometheus metrics (on its own
/// address), and which application series mean what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metrics {
    pub port: u16,
    pub path: String,
    /// A gauge of requests in flight.
    pub in_flight: Option<String>,
    /// A histogram or summary of request latency, in seconds.
    pub latency: Option<String>,
    /// A counter of requests (or the latency histogram's count is used).
    pub requests: Option<String>,
    /// A counter of failed requests (say, 5xx responses): the policies' error signal.
    pub errors: Option<String>,
    pub timeout_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    port: Option<u16>,
    http_path: Option<String>,
    interval_ms: Option<u64>,
    timeout_ms: Option<u64>,
    rise: Option<u32>,
    fall: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    port: u16,
    path: Option<String>,
    in_flight: Option<String>,
    latency: Option<String>,
    requests: Option<String>,
    errors: Option<String>,
    timeout_ms: Option<u64>,
}

fn check_health(i: usize, vip_port: u16, raw: RawHealth) -> Result<Health, ConfigError> {
    let field = |name: &str| format!("vip[{i}].health.{name}");
    let health = Health {
        port: raw.port.unwrap_or(vip_port),
        http_path: raw.http_path,
        interval_ms: raw.interval_ms.unwrap_or(1000),
        timeout_ms: raw.timeout_ms.unwrap_or(500),
        rise: raw.rise.unwrap_or(2),
        fall: raw.fall.unwrap_or(3),
    };
    if health.port == 0 {
        return Err(invalid(field("port"), "port 0 cannot be probed"));
    }
    if let Some(path) = &health.http_path
        && (!path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        return Err(invalid(
            field("http_path"),
            format!("{path:?} is not a URL path like /health"),
        ));
    }
    if !(50..=60_000).contains(&health.interval_ms) {
        return Err(invalid(
            field("interval_ms"),
            format!("{} is outside [50, 60000]", health.interval_ms),
        ));
    }
    if health.timeout_ms == 0 || health.timeout_ms > health.interval_ms {
        return Err(invalid(
            field("timeout_ms"),
            format!(
                "{} must be above 0 and at most interval_ms ({})",
                health.timeout_ms, health.interval_ms
            ),
        ));
    }
    for (name, v) in [("rise", health.rise), ("fall", health.fall)] {
        if !(1..=100).contains(&v) {
            return Err(invalid(field(name), format!("{v} is outside [1, 100]")));
        }
    }
    Ok(health)
}

fn check_metrics(i: usize, raw: RawMetrics) -> Result<Metrics, ConfigError> {
    let field = |name: &str| format!("vip[{i}].metrics.{name}");
    let metrics = Metrics {
        port: raw.port,
        path: raw.path.unwrap_or_else(|| "/metrics".into()),
        in_flight: raw.in_flight,
        latency: raw.latency,
        requests: raw.requests,
        errors: raw.errors,
        timeout_ms: raw.timeout_ms.unwrap_or(500),
    };
    if metrics.port == 0 {
        return Err(invalid(field("port"), "port 0 cannot be scraped"));
    }
    if !metrics.path.starts_with('/')
        || metrics
            .path
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid(
            field("path"),
            format!("{:?} is not a URL path like /metrics", metrics.path),
        ));
    }
    for (name, series) in [
        ("in_flight", &metrics.in_flight),
        ("latency", &metrics.latency),
        ("requests", &metrics.requests),
        ("errors", &metrics.errors),
    ] {
        if let Some(series) = series {
            let ok = !series.is_empty()
                && series
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !series.starts_with(|c: char| c.is_ascii_digit());
            if !ok {
                return Err(invalid(
                    field(name),
                    format!("{series:?} is not a Prometheus metric name"),
                ));
            }
        }
    }
    if !(10..=60_000).contains(&metrics.timeout_ms) {
        return Err(invalid(
            field("timeout_ms"),
            format!("{} is outside [10, 60000]", metrics.timeout_ms),
        ));
    }
    Ok(metrics)
}

/// One backend of a VIP, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub address: IpAddr,
    pub mac: [u8; 6],
    pub weight: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    vip: Vec<RawVip>,
    encapsulation: Option<RawEncapsulation>,
    nat: Option<RawNat>,
    control: Option<RawControl>,
    cluster: Option<RawCluster>,
    datapath: Option<RawDatapath>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatapath {
    connection_table_v4: Option<u32>,
    connection_table_v6: Option<u32>,
    nat_table_v4: Option<u32>,
    nat_table_v6: Option<u32>,
    max_vips: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNat {
    source_v4: Option<String>,
    source_v6: Option<String>,
    port_min: Option<u16>,
    port_max: Option<u16>,
    timeout_tcp_s: Option<u32>,
    timeout_tcp_closing_s: Option<u32>,
    timeout_udp_s: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEncapsulation {
    source_v4: Option<String>,
    source_v6: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    address: String,
    port: u16,
    protocol: Protocol,
    #[serde(default)]
    hash: HashFields,
    table_size: Option<u32>,
    #[serde(default)]
    forwarding: Forwarding,
    #[serde(default)]
    policy: crate::core::policy::PolicyKind,
    health: Option<RawHealth>,
    metrics: Option<RawMetrics>,
    #[serde(default)]
    backend: Vec<RawBackend>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: String,
    mac: String,
    weight: u32,
}

impl Config {
    /// Reads and checks the file at `path`, refusing one that every user may write.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o002 != 0 {
            return Err(ConfigError::WorldWritable {
                path: path.to_owned(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and checks configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: PathBuf::from("<text>"),
            message: e.to_string(),
        })?;
        if raw.vip.is_empty() {
            return Err(invalid(
                "vip",
                "no VIP is configured; add at least one [[vip]]",
            ));
        }
        let encapsulation = check_encapsulation(raw.encapsulation)?;
        let nat = check_nat(raw.nat)?;
        let control = check_control(raw.control)?;
        let cluster = check_cluster(raw.cluster)?;
        let datapath = check_datapath(raw.datapath)?;
        if raw.vip.len() > datapath.max_vips as usize {
            return Err(invalid(
                "vip",
                format!(
                    "{} VIPs, but the lookup tables have room for {} \
                     ([datapath] max_vips, at most {MAX_VIPS}; 256 KiB per VIP)",
                    raw.vip.len(),
                    datapath.max_vips
                ),
            ));
        }
        let mut seen = BTreeSet::new();
        let mut vips = Vec::with_capacity(raw.vip.len());
        let mut total_backends = 0usize;
        for (i, raw_vip) in raw.vip.into_iter().enumerate() {
            let vip = check_vip(i, raw_vip, &nat)?;
            if !seen.insert((vip.address, vip.port, vip.protocol)) {
                return Err(invalid(
                    format!("vip[{i}]"),
                    format!("{vip} is configured twice"),
                ));
            }
            if vip.forwarding == Forwarding::Ipip {
                for (j, b) in vip.backends.iter().enumerate() {
                    let missing = match b.address {
                        IpAddr::V4(_) => encapsulation.source_v4.is_none().then_some("source_v4"),
                        IpAddr::V6(_) => encapsulation.source_v6.is_none().then_some("source_v6"),
                    };
                    if let Some(key) = missing {
                        return Err(invalid(
                            format!("encapsulation.{key}"),
                            format!(
                                "vip[{i}] forwards by ipip to backend[{j}] {}, which needs an \
                                 outer source prefix of its family",
                                b.address
                            ),
                        ));
                    }
                }
            }
            if vip.forwarding == Forwarding::Nat {
                let (key, missing) = match vip.address {
                    IpAddr::V4(_) => ("source_v4", nat.source_v4.is_none()),
                    IpAddr::V6(_) => ("source_v6", nat.source_v6.is_none()),
                };
                if missing {
                    return Err(invalid(
                        format!("nat.{key}"),
                        format!(
                            "vip[{i}] {vip} forwards by nat, which needs source addresses of \
                             its family"
                        ),
                    ));
                }
            }
            if nat.contains(vip.address) {
                return Err(invalid(
                    format!("vip[{i}].address"),
                    format!("{} is one of the [nat] source addresses", vip.address),
                ));
            }
            total_backends += vip.backends.len();
            vips.push(vip);
        }
        if total_backends > MAX_BACKENDS as usize {
            return Err(invalid(
                "vip.backend",
                format!("{total_backends} backends over all VIPs, at most {MAX_BACKENDS}"),
            ));
        }
        Ok(Config {
            vips,
            control,
            encapsulation,
            nat,
            cluster,
            datapath,
        })
    }
}

fn check_datapath(raw: Option<RawDatapath>) -> Result<DatapathSizes, ConfigError> {
    let defaults = DatapathSizes::default();
    let Some(raw) = raw else {
        return Ok(defaults);
    };
    let size = |value: Option<u32>, default: u32, field: &str| match value {
        None => Ok(default),
        Some(n) if CONNECTION_TABLE_RANGE.contains(&n) => Ok(n),
        Some(n) => Err(invalid(
            format!("datapath.{field}"),
            format!(
                "{n} entries: give {} to {} (the kernel preallocates every entry)",
                CONNECTION_TABLE_RANGE.start(),
                CONNECTION_TABLE_RANGE.end()
            ),
        )),
    };
    Ok(DatapathSizes {
        connection_table_v4: size(
            raw.connection_table_v4,
            defaults.connection_table_v4,
            "connection_table_v4",
        )?,
        connection_table_v6: size(
            raw.connection_table_v6,
            defaults.connection_table_v6,
            "connection_table_v6",
        )?,
        nat_table_v4: size(raw.nat_table_v4, defaults.nat_table_v4, "nat_table_v4")?,
        nat_table_v6: size(raw.nat_table_v6, defaults.nat_table_v6, "nat_table_v6")?,
        max_vips: match raw.max_vips {
            None => defaults.max_vips,
            Some(n) if (1..=MAX_VIPS).contains(&n) => n,
            Some(n) => {
                return Err(invalid(
                    "datapath.max_vips",
                    format!("{n}: give 1 to {MAX_VIPS} (each VIP's lookup tables take 256 KiB)"),
                ));
            }
        },
    })
}

/// A `[nat]` source prefix: `address/length`, at most
/// `lb_common::maps::MAX_NAT_SOURCES` addresses, host bits zero.
fn nat_prefix<A>(field: &str, text: &str, bits: u32) -> Result<(A, u8), ConfigError>
where
    A: std::str::FromStr + Copy + Into<IpAddr>,
{
    let widest = bits - lb_common::maps::MAX_NAT_SOURCES.trailing_zeros();
    let example = if bits == 32 {
        "198.18.200.0/30"
    } else {
        "fd00:200::/126"
    };
    let bad = |problem: String| invalid(format!("nat.{field}"), problem);
    let (addr, len) = text.split_once('/').unwrap_or((text, ""));
    let addr: A = addr
        .parse()
        .map_err(|_| bad(format!("{text:?} is not a prefix like {example}")))?;
    let len: u32 = if len.is_empty() {
        bits
    } else {
        len.parse()
            .map_err(|_| bad(format!("{text:?} is not a prefix like {example}")))?
    };
    if !(widest..=bits).contains(&len) {
        return Err(bad(format!(
            "/{len}: give /{widest} to /{bits} (at most {} addresses)",
            lb_common::maps::MAX_NAT_SOURCES
        )));
    }
    let host_bits = match addr.into() {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    } & ((1u128 << (bits - len)) - 1);
    if host_bits != 0 {
        return Err(bad(format!(
            "{text} has host bits set; the prefix starts at an address whose last {} bits \
             are zero",
            bits - len
        )));
    }
    if addr.into().is_unspecified() || addr.into().is_multicast() {
        return Err(bad(format!("{text} cannot be a source address")));
    }
    Ok((addr, len as u8))
}

fn check_nat(raw: Option<RawNat>) -> Result<Nat, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Nat::default());
    };
    let defaults = Nat::default();
    let nat = Nat {
        source_v4: raw
            .source_v4
            .map(|t| nat_prefix("source_v4", &t, 32))
            .transpose()?,
        source_v6: raw
            .source_v6
            .map(|t| nat_prefix("source_v6", &t, 128))
            .transpose()?,
        port_min: raw.port_min.unwrap_or(defaults.port_min),
        port_max: raw.port_max.unwrap_or(defaults.port_max),
        timeout_tcp_s: raw.timeout_tcp_s.unwrap_or(defaults.timeout_tcp_s),
        timeout_tcp_closing_s: raw
            .timeout_tcp_closing_s
            .unwrap_or(defaults.timeout_tcp_closing_s),
        timeout_udp_s: raw.timeout_udp_s.unwrap_or(defaults.timeout_udp_s),
    };
    for (field, value) in [
        ("timeout_tcp_s", nat.timeout_tcp_s),
        ("timeout_tcp_closing_s", nat.timeout_tcp_closing_s),
        ("timeout_udp_s", nat.timeout_udp_s),
    ] {
        if !(NAT_TIMEOUT_RANGE_S).contains(&value) {
            return Err(invalid(
                format!("nat.{field}"),
                format!(
                    "{value} s: give {} to {} (the agent looks every 10 s)",
                    NAT_TIMEOUT_RANGE_S.start(),
                    NAT_TIMEOUT_RANGE_S.end()
                ),
            ));
        }
    }
    if nat.port_min == 0 {
        return Err(invalid("nat.port_min", "port 0 cannot be a source port"));
    }
    if nat.port_min > nat.port_max {
        return Err(invalid(
            "nat.port_max",
            format!(
                "{} is below port_min {}: no port to hand out",
                nat.port_max, nat.port_min
            ),
        ));
    }
    if nat.timeout_tcp_closing_s > nat.timeout_tcp_s {
        return Err(invalid(
            "nat.timeout_tcp_closing_s",
            format!(
                "{} s is longer than timeout_tcp_s ({} s): a closing flow would outlive an \
                 open one",
                nat.timeout_tcp_closing_s, nat.timeout_tcp_s
            ),
        ));
    }
    Ok(nat)
}

fn check_encapsulation(raw: Option<RawEncapsulation>) -> Result<Encapsulation, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Encapsulation::default());
    };
    let source_v4 = match raw.source_v4 {
        None => None,
        Some(text) => {
            let addr: std::net::Ipv4Addr = text.parse().map_err(|_| {
                invalid(
                    "encapsulation.source_v4",
                    format!("{text:?} is not an IPv4 address"),
                )
            })?;
            if addr.octets()[2..] != [0, 0] {
                return Err(invalid(
                    "encapsulation.source_v4",
                    format!(
                        "{addr} must be a /16 prefix ending in .0.0 (the flow hash fills the rest)"
                    ),
                ));
            }
            Some(addr)
        }
    };
    let source_v6 = match raw.source_v6 {
        None => None,
        Some(text) => {
            let addr: std::net::Ipv6Addr = text.parse().map_err(|_| {
                invalid(
                    "encapsulation.source_v6",
                    format!("{text:?} is not an IPv6 address"),
                )
            })?;
            if addr.octets()[12..] != [0, 0, 0, 0] {
                return Err(invalid(
                    "encapsulation.source_v6",
                    format!("{addr} must be a /96 prefix (the flow hash fills the last 32 bits)"),
                ));
            }
            Some(addr)
        }
    };
    Ok(Encapsulation {
        source_v4,
        source_v6,
    })
}

fn check_vip(i: usize, raw: RawVip, nat: &Nat) -> Result<Vip, ConfigError> {
    let field = |name: &str| format!("vip[{i}].{name}");
    let address: IpAddr = raw.address.parse().map_err(|_| {
        invalid(
            field("address"),
            format!("{:?} is not an IP address", raw.address),
        )
    })?;
    if address.is_unspecified() || address.is_multicast() {
        return Err(invalid(
            field("address"),
            format!("{address} cannot be a VIP"),
        ));
    }
    if raw.port == 0 {
        return Err(invalid(field("port"), "port 0 cannot be a VIP port"));
    }
    let table_size = raw.table_size.unwrap_or(DEFAULT_RING_SIZE);
    if !maglev::is_prime(table_size) || table_size > MAX_RING_SIZE {
        return Err(invalid(
            field("table_size"),
            format!("{table_size} must be a prime no larger than {MAX_RING_SIZE}"),
        ));
    }
    if raw.backend.is_empty() {
        return Err(invalid(field("backend"), "the VIP has no backend"));
    }
    if raw.backend.len() > MAX_BACKENDS as usize {
        return Err(invalid(
            field("backend"),
            format!("{} backends, at most {MAX_BACKENDS}", raw.backend.len()),
        ));
    }
    let mut backends = Vec::with_capacity(raw.backend.len());
    // Address → index in this VIP, for the duplicate check.
    let mut seen_backends: std::collections::BTreeMap<IpAddr, usize> =
        std::collections::BTreeMap::new();
    for (j, b) in raw.backend.into_iter().enumerate() {
        let bfield = |name: &str| format!("vip[{i}].backend[{j}].{name}");
        let baddr: IpAddr = b.address.parse().map_err(|_| {
            invalid(
                bfield("address"),
                format!("{:?} is not an IP address", b.address),
            )
        })?;
        if baddr.is_ipv4() != address.is_ipv4() && raw.forwarding != Forwarding::Ipip {
            let mode = if raw.forwarding == Forwarding::Nat {
                "full NAT"
            } else {
                "L2 DSR"
            };
            return Err(invalid(
                bfield("address"),
                format!(
                    "{baddr} is not of the same IP family as the VIP {address}, which {mode} \
                     needs (forwarding = \"ipip\" can cross families)"
                ),
            ));
        }
        if baddr.is_unspecified() || baddr.is_multicast() {
            return Err(invalid(
                bfield("address"),
                format!("{baddr} cannot be a backend"),
            ));
        }
        if nat.contains(baddr) {
            return Err(invalid(
                bfield("address"),
                format!("{baddr} is one of the [nat] source addresses"),
            ));
        }
        let mac = parse_mac(&b.mac).ok_or_else(|| {
            invalid(
                bfield("mac"),
                format!("{:?} is not a MAC address like 02:00:00:00:00:01", b.mac),
            )
        })?;
        if mac == [0; 6] || mac[0] & 1 == 1 {
            return Err(invalid(
                bfield("mac"),
                format!("{} is not a unicast MAC address", b.mac),
            ));
        }
        if b.weight > MAX_WEIGHT {
            return Err(invalid(
                bfield("weight"),
                format!("{} is above {MAX_WEIGHT}", b.weight),
            ));
        }
        if let Some(k) = seen_backends.insert(baddr, j) {
            return Err(invalid(
                bfield("address"),
                format!("{baddr} is already backend[{k}] of this VIP"),
            ));
        }
        backends.push(Backend {
            address: baddr,
            mac,
            weight: b.weight,
        });
    }
    if backends.iter().all(|b| b.weight == 0) {
        return Err(invalid(
            field("backend"),
            "the total weight of the backends is 0; at least one needs a weight above 0",
        ));
    }
    backends.sort_by_key(|b| b.address);
    Ok(Vip {
        address,
        port: raw.port,
        protocol: raw.protocol,
        hash: raw.hash,
        table_size,
        forwarding: raw.forwarding,
        policy: raw.policy,
        health: raw
            .health
            .map(|h| check_health(i, raw.port, h))
            .transpose()?,
        metrics: raw.metrics.map(|m| check_metrics(i, m)).transpose()?,
        backends,
    })
}

/// Parses `aa:bb:cc:dd:ee:ff` (hex digits, colons).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[vip]]
address = "198.18.1.1"
port = 80
protocol = "tcp"

[[vip.backend]]
address = "198.18.0.12"
mac = "02:00:00:00:00:12"
weight = 2

[[vip.backend]]
address = "198.18.0.11"
mac = "02:00:00:00:00:11"
weight = 1
"#;

    fn field_of(text: &str) -> String {
        match Config::parse(text) {
            Err(ConfigError::Invalid { field, .. }) => field,
            Err(other) => panic!("expected a field error, got {other}"),
            Ok(_) => panic!("expected an error"),
        }
    }

    #[test]
    fn a_cluster_section_is_checked_field_by_field() {
        let with = |cluster: &str| format!("{GOOD}\n[cluster]\n{cluster}");
        let good = with(
            "endpoints = [\"http://198.18.0.9:2379\"]\nname = \"edge\"\nnode = \"lb-a\"\nlease_s = 3\n",
        );
        let c = Config::parse(&good).unwrap().cluster.unwrap();
        assert_eq!(
            (c.name.as_str(), c.node.as_str(), c.lease_s),
            ("edge", "lb-a", 3)
        );
        assert!(c.tls.is_none());
        assert_eq!(c.share_listen, None);
        let c = Config::parse(&with(
            "endpoints = [\"http://198.18.0.9:2379\"]\nname = \"e\"\nshare_listen = \"[fd00::2]:7947\"",
        ))
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!(
            c.share_listen,
            Some(ShareListen::Address("[fd00::2]:7947".parse().unwrap()))
        );
        let c = Config::parse(&with(
            "endpoints = [\"http://198.18.0.9:2379\"]\nname = \"e\"\nshare_listen = \":7947\"",
        ))
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!(c.share_listen, Some(ShareListen::Port(7947)));
        // Without a node name, the host name.
        let c = Config::parse(&with(
            "endpoints = [\"http://198.18.0.9:2379\"]\nname = \"edge\"\n",
        ))
        .unwrap()
        .cluster
        .unwrap();
        assert!(!c.node.is_empty());
        assert_eq!(c.lease_s, DEFAULT_LEASE_S);
        let cases = [
            ("endpoints = []\nname = \"e\"", "cluster.endpoints"),
            (
                "endpoints = [\"198.18.0.9:2379\"]\nname = \"e\"",
                "cluster.endpoints[0]",
            ),
            (
                "endpoints = [\"ftp://198.18.0.9:2379\"]\nname = \"e\"",
                "cluster.endpoints[0]",
            ),
            (
                "endpoints = [\"http://198.18.0.9\"]\nname = \"e\"",
                "cluster.endpoints[0]",
            ),
            (
                "endpoints = [\"https://198.18.0.9:2379\"]\nname = \"e\"",
                "cluster.endpoints[0]",
            ),
            (
                "endpoints = [\"http://198.18.0.9:2379\"]\nname = \"a/b\"",
                "cluster.name",
            ),
            (
                "endpoints = [\"http://198.18.0.9:2379\"]\nname = \"e\"\nnode = \"\"",
                "cluster.node",
            ),
            (
                "endpoints = [\"http://198.18.0.9:2379\"]\nname = \"e\"\nlease_s = 1",
                "cluster.lease_s",
            ),
            (
                "endpoints = [\"http://198.18.0.9:2379\"]\nname = \"e\"\nshare_listen = \"198.18.0.2\"",
                "cluster.share_listen",
            ),
            (
                "endpoints = [\"http://198.18.0.9:2379\"]\nname = \"e\"\nshare_listen = \"0.0.0.0:7947\"",
                "cluster.share_listen",
            ),
            (
                "endpoints = [\"http://198.18.0.9:2379\"]\nname = \"e\"\nshare_listen = \":0\"",
                "cluster.share_listen",
            ),
            (
                "endpoints = [\"https://198.18.0.9:2379\"]\nname = \"e\"\n[cluster.tls]\nca = \"/ca\"\ncert = \"/c\"",
                "cluster.tls.key",
            ),
            (
                "endpoints = [\"http://198.18.0.9:2379\"]\nname = \"e\"\n[cluster.tls]\nca = \"/ca\"",
                "cluster.endpoints[0]",
            ),
        ];
        for (text, field) in cases {
            assert_eq!(field_of(&with(text)), field, "{text}");
        }
    }

    #[test]
    fn the_kubernetes_example_configuration_is_valid() {
        let yaml = include_str!("../../deploy/kubernetes/configmap.yaml");
        let start = yaml.find("lb.toml: |\n").expect("the lb.toml key") + "lb.toml: |\n".len();
        let toml: String = yaml[start..]
            .lines()
            .map(|l| l.strip_prefix("    ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let config = Config::parse(&toml).unwrap_or_else(|e| panic!("{e}"));
        assert!(config.cluster.is_some(), "the example runs a fleet");
        assert!(
            config
                .vips
                .iter()
                .all(|v| v.policy == policy::PolicyKind::Ai)
        );
    }

    #[test]
    fn the_digest_covers_the_decisions_but_not_the_cluster_section() {
        let a = Config::parse(GOOD).unwrap();
        let mut b = a.clone();
        b.cluster = Config::parse(&format!(
            "{GOOD}\n[cluster]\nendpoints = [\"http://198.18.0.9:2379\"]\nname = \"e\"\nnode = \"x\""
        ))
        .unwrap()
        .cluster;
        assert_eq!(a.digest(), b.digest());
        let c = Config::parse(&GOOD.replace("weight = 2", "weight = 3")).unwrap();
        assert_ne!(a.digest(), c.digest());
    }

    #[test]
    fn good_config_is_checked_and_sorted() {
        let config = Config::parse(GOOD).unwrap();
        assert_eq!(config.vips.len(), 1);
        let vip = &config.vips[0];
        assert_eq!(vip.table_size, DEFAULT_RING_SIZE);
        assert_eq!(vip.hash, HashFields::FiveTuple);
        assert_eq!(
            vip.backends[0].address,
            "198.18.0.11".parse::<IpAddr>().unwrap()
        );
        assert_eq!(vip.backends[1].weight, 2);
        assert_eq!(vip.backends[1].mac, [2, 0, 0, 0, 0, 0x12]);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse(&GOOD.replace("weight = 2", "weight = 2\nwieght = 3")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("unknown field `wieght`"), "{text}");
    }

    #[test]
    fn bad_backend_address_is_named() {
        let text = GOOD.replace("198.18.0.12", "198.18.0.300");
        assert_eq!(field_of(&text), "vip[0].backend[0].address");
    }

    #[test]
    fn bad_vip_address_is_named() {
        assert_eq!(
            field_of(&GOOD.replace("198.18.1.1", "vip.example")),
            "vip[0].address"
        );
    }

    #[test]
    fn duplicate_backend_is_named() {
        let text = GOOD.replace("198.18.0.12", "198.18.0.11");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("vip[0].backend[1].address"), "{err}");
        assert!(err.contains("already backend[0]"), "{err}");
    }

    #[test]
    fn zero_total_weight_is_refused() {
        let text = GOOD
            .replace("weight = 2", "weight = 0")
            .replace("weight = 1", "weight = 0");
        assert_eq!(field_of(&text), "vip[0].backend");
    }

    #[test]
    fn one_zero_weight_is_a_drained_backend() {
        let config = Config::parse(&GOOD.replace("weight = 2", "weight = 0")).unwrap();
        assert_eq!(config.vips[0].backends[1].weight, 0);
    }

    #[test]
    fn bad_mac_is_named() {
        assert_eq!(
            field_of(&GOOD.replace("02:00:00:00:00:12", "02:00:00:00:12")),
            "vip[0].backend[0].mac"
        );
        assert_eq!(
            field_of(&GOOD.replace("02:00:00:00:00:12", "01:00:5e:00:00:12")),
            "vip[0].backend[0].mac"
        );
    }

    #[test]
    fn mixed_families_are_refused() {
        assert_eq!(
            field_of(&GOOD.replace("198.18.0.12", "fd00::12")),
            "vip[0].backend[0].address"
        );
    }

    #[test]
    fn table_size_must_be_prime() {
        let text = GOOD.replace(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\ntable_size = 65536",
        );
        assert_eq!(field_of(&text), "vip[0].table_size");
    }

    #[test]
    fn full_nat_needs_its_sources_and_checks_them_naming_the_field() {
        let nat = GOOD.replace(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\nforwarding = \"nat\"",
        );
        assert_eq!(field_of(&nat), "nat.source_v4");
        let with = |section: &str| format!("{nat}\n[nat]\n{section}\n");
        let ok = Config::parse(&with("source_v4 = \"198.18.200.0/30\"")).unwrap();
        assert_eq!(ok.vips[0].forwarding, Forwarding::Nat);
        assert_eq!(
            ok.nat.source_v4,
            Some(("198.18.200.0".parse().unwrap(), 30))
        );
        assert_eq!((ok.nat.port_min, ok.nat.port_max), (1024, 65535));
        assert!(ok.nat.contains("198.18.200.3".parse().unwrap()));
        assert!(!ok.nat.contains("198.18.200.4".parse().unwrap()));
        // The NAT tables are full size only when a VIP forwards by nat.
        assert_eq!(ok.datapath_sizes().nat_table_v4, 65_536);
        let plain = Config::parse(GOOD).unwrap();
        assert!(!plain.uses_nat());
        let sizes = plain.datapath_sizes();
        assert_eq!(
            (sizes.nat_table_v4, sizes.nat_table_v6),
            (
                lb_common::maps::NAT_TABLE_UNUSED,
                lb_common::maps::NAT_TABLE_UNUSED
            )
        );
        assert_eq!(
            sizes.connection_table_v4,
            plain.datapath.connection_table_v4
        );
        let settings = crate::desired::nat_settings(&ok.nat);
        assert_eq!((settings.count_v4, settings.port_span), (4, 64512));
        // An IPv6 VIP needs IPv6 sources.
        let v6 = nat
            .replace("198.18.1.1", "fd00:18:1::1")
            .replace("198.18.0.12", "fd00:18::12")
            .replace("198.18.0.11", "fd00:18::11");
        assert_eq!(
            field_of(&format!("{v6}\n[nat]\nsource_v4 = \"198.18.200.0/30\"\n")),
            "nat.source_v6"
        );
        let v6_ok = format!("{v6}\n[nat]\nsource_v6 = \"fd00:200::/122\"\n");
        assert_eq!(Config::parse(&v6_ok).unwrap().nat.source_v6.unwrap().1, 122);
        for (section, field) in [
            ("source_v4 = \"198.18.200.0/25\"", "nat.source_v4"),
            ("source_v4 = \"198.18.200.1/30\"", "nat.source_v4"),
            ("source_v4 = \"198.18.200\"", "nat.source_v4"),
            ("source_v4 = \"198.18.200.0/x\"", "nat.source_v4"),
            ("source_v6 = \"fd00:200::/64\"", "nat.source_v6"),
            ("source_v6 = \"fd00:200::1/126\"", "nat.source_v6"),
            (
                "source_v4 = \"198.18.200.0/30\"\nport_min = 0",
                "nat.port_min",
            ),
            (
                "source_v4 = \"198.18.200.0/30\"\nport_min = 5000\nport_max = 4999",
                "nat.port_max",
            ),
            // Timeouts, each checked.
            (
                "source_v4 = \"198.18.200.0/30\"\ntimeout_udp_s = 5",
                "nat.timeout_udp_s",
            ),
            (
                "source_v4 = \"198.18.200.0/30\"\ntimeout_tcp_closing_s = 9999999",
                "nat.timeout_tcp_closing_s",
            ),
            (
                "source_v4 = \"198.18.200.0/30\"\ntimeout_tcp_s = 60\ntimeout_tcp_closing_s = 120",
                "nat.timeout_tcp_closing_s",
            ),
            // The VIP's and the backends' addresses are not NAT sources.
            ("source_v4 = \"198.18.1.0/30\"", "vip[0].address"),
            (
                "source_v4 = \"198.18.0.12/32\"",
                "vip[0].backend[0].address",
            ),
        ] {
            assert_eq!(field_of(&with(section)), field, "{section}");
        }
        // Full NAT does not cross families.
        let crossed = with("source_v4 = \"198.18.200.0/30\"")
            .replace("address = \"198.18.0.11\"", "address = \"fd00:18::11\"");
        assert_eq!(field_of(&crossed), "vip[0].backend[1].address");
        let err = Config::parse(&crossed).unwrap_err().to_string();
        assert!(err.contains("full NAT"), "{err}");
    }

    #[test]
    fn vips_beyond_max_vips_are_refused_naming_the_key() {
        let second = GOOD.split_once("[[vip]]").unwrap().1;
        let two = format!(
            "{GOOD}\n[[vip]]{}",
            second.replace("port = 80", "port = 81")
        );
        assert_eq!(Config::parse(&two).unwrap().datapath.max_vips, 8);
        let one = format!("{two}\n[datapath]\nmax_vips = 1\n");
        assert_eq!(field_of(&one), "vip");
        let err = Config::parse(&one).unwrap_err();
        assert!(err.to_string().contains("max_vips"), "{err}");
        for bad in [0, 65] {
            let text = format!("{GOOD}\n[datapath]\nmax_vips = {bad}\n");
            assert_eq!(field_of(&text), "datapath.max_vips");
        }
        let room = format!("{two}\n[datapath]\nmax_vips = 2\n");
        assert_eq!(Config::parse(&room).unwrap().datapath.max_vips, 2);
    }

    #[test]
    fn duplicate_vip_is_refused() {
        let second = GOOD.split_once("[[vip]]").unwrap().1;
        let text = format!("{GOOD}\n[[vip]]{second}");
        assert_eq!(field_of(&text), "vip[1]");
    }

    #[test]
    fn ipip_needs_a_source_prefix_of_the_backends_family() {
        let text = GOOD.replace(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\nforwarding = \"ipip\"",
        );
        assert_eq!(field_of(&text), "encapsulation.source_v4");
        let ok = format!("{text}\n[encapsulation]\nsource_v4 = \"198.19.0.0\"\n");
        let config = Config::parse(&ok).unwrap();
        assert_eq!(config.vips[0].forwarding, Forwarding::Ipip);
        let bad = format!("{text}\n[encapsulation]\nsource_v4 = \"198.19.0.1\"\n");
        assert_eq!(field_of(&bad), "encapsulation.source_v4");
        let sized = Config::parse(&format!(
            "{text}\n[encapsulation]\nsource_v4 = \"198.19.0.0\"\n\n[datapath]\nconnection_table_v4 = 65536\n"
        ))
        .unwrap();
        assert_eq!(sized.datapath.connection_table_v4, 65_536);
        assert_eq!(
            sized.datapath.connection_table_v6,
            lb_common::maps::CONN_TABLE_SIZE_V6
        );
        for bad in [
            "connection_table_v4 = 10",
            "connection_table_v6 = 100000000",
        ] {
            let text = format!(
                "{text}\n[encapsulation]\nsource_v4 = \"198.19.0.0\"\n\n[datapath]\n{bad}\n"
            );
            let field = bad.split(' ').next().unwrap();
            assert_eq!(field_of(&text), format!("datapath.{field}"));
        }
    }

    #[test]
    fn ipip_may_cross_families() {
        let text = GOOD
            .replace(
                "protocol = \"tcp\"",
                "protocol = \"tcp\"\nforwarding = \"ipip\"",
            )
            .replace("198.18.0.12", "fd00:18::12");
        let text = format!(
            "{text}\n[encapsulation]\nsource_v4 = \"198.19.0.0\"\nsource_v6 = \"fd00:19::\"\n"
        );
        assert!(Config::parse(&text).is_ok());
    }

    #[test]
    fn control_section_is_checked() {
        let ok = format!("[control]\ninterval_ms = 500\nsmoothing = 1.0\n{GOOD}");
        let config = Config::parse(&ok).unwrap();
        assert_eq!(config.control.interval_ms, 500);
        assert_eq!(config.control.smoothing, 1.0);
        assert_eq!(config.vips[0].policy, crate::core::policy::PolicyKind::Ai);
        assert_eq!(
            config.control.predictor,
            crate::core::model::PredictorSetting::Auto
        );
        let svr = Config::parse(&format!("[control]\npredictor = \"svr\"\n{GOOD}")).unwrap();
        assert_eq!(
            svr.control.predictor,
            crate::core::model::PredictorSetting::Svr
        );
        let ejecting = format!(
            "[control]\neject_error_rate = 0.3\neject_min_requests = 50\n\
             eject_max_share = 0.1\neject_time_ms = 30000\n{GOOD}"
        );
        let params = Config::parse(&ejecting)
            .unwrap()
            .control
            .params_for(&[1, 1]);
        assert_eq!(
            (
                params.eject_error_rate,
                params.eject_min_requests,
                params.eject_max_share,
                params.eject_time_s
            ),
            (0.3, 50.0, 0.1, 30.0)
        );
        for (bad, field) in [
            ("interval_ms = 5", "control.interval_ms"),
            (
                "move_budget_per_second = 0.0",
                "control.move_budget_per_second",
            ),
            ("floor_share = 0.9", "control.floor_share"),
            ("smoothing = nan", "control.smoothing"),
            ("shed_ratio = 1.5", "control.shed_ratio"),
            ("predictor = \"svm\"", "control.predictor"),
            ("eject_error_rate = 0.0", "control.eject_error_rate"),
            ("eject_min_requests = 0", "control.eject_min_requests"),
            ("eject_max_share = 1.0", "control.eject_max_share"),
            ("eject_time_ms = 10", "control.eject_time_ms"),
        ] {
            assert_eq!(field_of(&format!("[control]\n{bad}\n{GOOD}")), field);
        }
        let text = GOOD.replace(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\npolicy = \"reactive\"",
        );
        assert_eq!(
            Config::parse(&text).unwrap().vips[0].policy,
            crate::core::policy::PolicyKind::Reactive
        );
        assert!(
            Config::parse(&GOOD.replace(
                "protocol = \"tcp\"",
                "protocol = \"tcp\"\npolicy = \"magic\""
            ))
            .is_err()
        );
    }

    #[test]
    fn health_and_metrics_sections_are_checked() {
        let with = |extra: &str| {
            GOOD.replacen(
                "\n[[vip.backend]]",
                &format!("\n{extra}\n[[vip.backend]]"),
                1,
            )
        };
        let config = Config::parse(&with("[vip.health]\nhttp_path = \"/h\"\n[vip.metrics]\nport = 9100\nlatency = \"app_latency_seconds\"")).unwrap();
        let h = config.vips[0].health.as_ref().unwrap();
        assert_eq!((h.port, h.rise, h.fall), (80, 2, 3));
        assert_eq!(config.vips[0].metrics.as_ref().unwrap().path, "/metrics");
        assert_eq!(
            field_of(&with("[vip.health]\ntimeout_ms = 5000")),
            "vip[0].health.timeout_ms"
        );
        assert_eq!(
            field_of(&with("[vip.health]\nhttp_path = \"health\"")),
            "vip[0].health.http_path"
        );
        assert_eq!(
            field_of(&with("[vip.metrics]\nport = 9100\nlatency = \"bad name\"")),
            "vip[0].metrics.latency"
        );
        assert!(Config::parse(&with("[vip.metrics]\nprot = 1")).is_err());
    }

    #[test]
    fn world_writable_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("lb-config-test-{}.toml", std::process::id()));
        std::fs::write(&path, GOOD).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o646)).unwrap();
        let err = Config::load(&path).unwrap_err();
        assert!(
            matches!(err, ConfigError::WorldWritable { mode: 0o646, .. }),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Config::load(&path).is_ok());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn empty_config_is_refused() {
        assert_eq!(field_of(""), "vip");
    }

    #[test]
    fn bad_protocol_is_a_syntax_error_naming_it() {
        let err = Config::parse(&GOOD.replace("\"tcp\"", "\"sctp\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sctp"), "{err}");
    }
}
