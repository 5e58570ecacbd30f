//! The snapshot types and their OpenMetrics encoder: the agent fills a
//! [`MetricsSnapshot`] once per control interval, and [`super::serve()`] calls [`render`]
//! on the latest one at every scrape.

use std::fmt;

use lb_common::types::GlobalStats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

/// Everything the endpoint shows, refreshed by the agent once per control interval.
#[derive(Clone, Debug, Default)]
pub struct MetricsSnapshot {
    /// Datapath-wide counters, summed over CPUs.
    pub global: GlobalStats,
    /// One entry per VIP; `vip` must be unique.
    pub vips: Vec<VipMetrics>,
    /// One entry per (VIP, backend) pair; the pair must be unique.
    pub backends: Vec<BackendMetrics>,
    /// The load model's state.
    pub model: ModelMetrics,
    /// The fleet, when this LB is a member of one (`[cluster]`).
    pub cluster: Option<ClusterMetrics>,
    /// Whether this LB may take traffic (`/ready`).
    pub readiness: crate::api::Readiness,
    /// The flood guard's counters and the flood watch.
    pub flood: crate::api::FloodStatus,
    /// Each pinned map's size and memory.
    pub maps: Vec<crate::api::MapMemoryView>,
    /// Full NAT's state, when a VIP forwards by `nat`.
    pub nat: Option<crate::api::NatStatus>,
}

/// This LB in its fleet (see `lb cluster status`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterMetrics {
    pub connected: bool,
    pub leading: bool,
    pub epoch_applied: u64,
    pub epoch_newest: u64,
    /// Seconds the newest epoch has waited here unapplied (0: applied).
    pub lag_seconds: f64,
    /// LBs with a record in etcd: whose tables are the newest epoch's, whose are
    /// not, and which run another configuration.
    pub nodes_agreeing: u64,
    pub nodes_other_table: u64,
    pub nodes_other_config: u64,
    pub published: u64,
    pub fenced: u64,
    /// Flow sharing, when on.
    pub share: Option<crate::share::ShareState>,
}

/// One VIP's counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VipMetrics {
    /// The VIP as shown in the `vip` label, e.g. `198.18.1.1:80/tcp`.
    pub vip: String,
    /// Packets balanced for this VIP.
    pub packets: u64,
    /// Bytes of those packets.
    pub bytes: u64,
    /// New flows given a backend by the lookup table.
    pub new_flows: u64,
}

/// One backend of one VIP: its counters, weights and predictions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BackendMetrics {
    /// The VIP, as in [`VipMetrics::vip`].
    pub vip: String,
    /// The backend's address, shown in the `backend` label.
    pub backend: String,
    /// The weight in the lookup table now.
    pub weight: u32,
    /// The weight the configuration gives it.
    pub configured_weight: u32,
    /// Whether the weight is pinned (the controller leaves it alone).
    pub pinned: bool,
    /// Whether the backend is considered healthy.
    pub healthy: bool,
    /// Packets sent to this backend.
    pub packets: u64,
    /// Bytes of those packets.
    pub bytes: u64,
    /// New flows given to this backend.
    pub new_flows: u64,
    /// The policy's prediction of a new flow's latency one interval ahead, in seconds.
    pub prediction: Option<f64>,
    /// The best baseline's prediction of the same, in seconds.
    pub baseline_prediction: Option<f64>,
    /// The predictor that drives this backend's weight (`model`, `ewma`, ...).
    pub predictor: Option<String>,
    /// The model's rolling mean absolute error on this backend, in seconds.
    pub model_error: Option<f64>,
    /// The best baseline's rolling mean absolute error on this backend, in seconds.
    pub baseline_error: Option<f64>,
}

/// The load model's state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelMetrics {
    /// What drives the weights: `"model"`, `"baseline:ewma"`, ... Empty: not shown.
    pub policy_source: String,
    /// `[control] predictor`: which predictor the operator lets drive `ai`.
    pub predictor_setting: crate::core::model::PredictorSetting,
    /// How long the last fit of the model took, in seconds.
    pub last_fit_seconds: Option<f64>,
    /// Fits that failed since the agent started, by kind (every kind, 0 included).
    pub fit_failures: Vec<(&'static str, u64)>,
    /// When the last fit was installed, in seconds since the Unix epoch.
    pub last_fit_timestamp: Option<f64>,
    /// The model's rolling mean absolute error, in seconds.
    pub model_error: Option<f64>,
    /// The best baseline's rolling mean absolute error, in seconds.
    pub baseline_error: Option<f64>,
}

/// Renders the snapshot in the Prometheus text format (OpenMetrics as
/// prometheus-client encodes it, ending with `# EOF`).
pub fn render(snapshot: &MetricsSnapshot) -> String {
    render_owned(snapshot.clone())
}

/// [`render`] for a snapshot the caller already owns (saves a copy per scrape).
pub(super) fn render_owned(snapshot: MetricsSnapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut out = String::new();
    // Writing into a String cannot fail, and the collector only passes on the
    // writer's errors; should it ever fail, what was written is still served.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::error!("metrics: encoding the snapshot failed: {e}");
    }
    out
}

/// Hands the snapshot to the encoder at scrape time, in a fixed order.
#[derive(Debug)]
struct SnapshotCollector(MetricsSnapshot);

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        encode_snapshot(&self.0, &mut encoder)
    }
}

/// A label set of one label.
type L1<'a> = [(&'static str, &'a str); 1];
/// A label set of two labels.
type L2<'a> = [(&'static str, &'a str); 2];
/// Three labels.
type L3<'a> = [(&'static str, &'a str); 3];

fn encode_snapshot(s: &MetricsSnapshot, e: &mut DescriptorEncoder) -> fmt::Result {
    encode_global(&s.global, e)?;
    encode_vips(&s.vips, e)?;
    encode_backends(&s.backends, e)?;
    encode_model(&s.model, e)?;
    gauge_family(
        e,
        "lb_ready",
        "1 once this LB holds the fleet's current epoch and flows and may take traffic \
         (as /ready says; outside a fleet, once attached)",
        None,
        &[([] as [(&str, &str); 0], i64::from(s.readiness.ready))],
    )?;
    encode_flood(&s.flood, e)?;
    encode_maps(&s.maps, e)?;
    if let Some(nat) = &s.nat {
        encode_nat(nat, e)?;
    }
    match &s.cluster {
        Some(c) => encode_cluster(c, e),
        None => Ok(()),
    }
}

fn encode_nat(n: &crate::api::NatStatus, e: &mut DescriptorEncoder) -> fmt::Result {
    counter_family(
        e,
        "lb_nat_packets",
        "Packets of full-NAT flows rewritten and sent: to_backend (a client's), \
         to_client (a backend's reply)",
        &[
            ([("direction", "to_backend")], n.to_backend),
            ([("direction", "to_client")], n.to_client),
        ],
    )?;
    counter_family(
        e,
        "lb_nat_ports",
        "Full NAT's port events: claimed (a new flow got one), collision (a probe found \
         its port taken), exhausted (a new flow found none and was dropped), reclaimed \
         (an evicted claim made again), lost (a flow whose port went to another flow: it \
         takes a new one), unknown_reply (a packet to a NAT address no flow holds, dropped), \
         expired (an idle entry removed by the agent)",
        &[
            ([("event", "claimed")], n.claimed),
            ([("event", "collision")], n.port_collisions),
            ([("event", "exhausted")], n.ports_exhausted),
            ([("event", "reclaimed")], n.reclaimed),
            ([("event", "lost")], n.lost),
            ([("event", "unknown_reply")], n.reply_unknown),
            ([("event", "expired")], n.expired),
        ],
    )?;
    gauge_family(
        e,
        "lb_nat_flows",
        "Flows in the NAT tables, from their last walk (every 10 s)",
        None,
        &[([] as [(&str, &str); 0], n.flows as i64)],
    )?;
    let sources: Vec<(L1, i64)> = n
        .sources
        .iter()
        .map(|s| ([("source", s.address.as_str())], s.ports_in_use as i64))
        .collect();
    gauge_family(
        e,
        "lb_nat_ports_in_use",
        "Ports each NAT source address holds over all backends, from the last walk; \
         each address has lb_nat_ports_per_source per backend and port",
        None,
        &sources,
    )?;
    gauge_family(
        e,
        "lb_nat_ports_per_source",
        "Ports a NAT source address hands out per backend and port ([nat] port_min to \
         port_max)",
        None,
        &[([] as [(&str, &str); 0], n.ports_per_source as i64)],
    )
}

fn encode_maps(maps: &[crate::api::MapMemoryView], e: &mut DescriptorEncoder) -> fmt::Result {
    let per_map = |value: fn(&crate::api::MapMemoryView) -> i64| -> Vec<(L1, i64)> {
        maps.iter()
            .map(|m| ([("map", m.name.as_str())], value(m)))
            .collect()
    };
    gauge_family(
        e,
        "lb_datapath_map_memory_bytes",
        "Memory of each pinned BPF map of the datapath, as the kernel accounts it \
         (memlock in the map's fdinfo) when the datapath was loaded",
        None,
        &per_map(|m| m.bytes as i64),
    )?;
    gauge_family(
        e,
        "lb_datapath_map_max_entries",
        "Entries each pinned BPF map of the datapath was created with",
        None,
        &per_map(|m| i64::from(m.max_entries)),
    )
}

fn encode_flood(f: &crate::api::FloodStatus, e: &mut DescriptorEncoder) -> fmt::Result {
    let none = |v: i64| [([] as [(&str, &str); 0], v)];
    counter_family(
        e,
        "lb_flood_guard_flows",
        "New flows through the flood guard: young (held in a young table until the \
         client's second packet), promoted (that packet came: the flow entered the \
         connection table), young_failed (the young-table write failed)",
        &[
            ([("event", "young")], f.young),
            ([("event", "promoted")], f.promoted),
            ([("event", "young_failed")], f.young_failed),
        ],
    )?;
    gauge_family(
        e,
        "lb_flood_guard_enabled",
        "1 when new flows wait in the young tables (off with --no-flood-guard)",
        None,
        &none(i64::from(f.guard)),
    )?;
    gauge_family(
        e,
        "lb_flood_active",
        "1 while unanswered new flows per second are at or above the threshold \
         (lb_flood_threshold_per_second), until 5 s below half of it",
        None,
        &none(i64::from(f.active)),
    )?;
    counter_family(
        e,
        "lb_flood_episodes",
        "Floods declared since the agent started",
        &[([] as [(&str, &str); 0], f.episodes)],
    )?;
    gauge_family(
        e,
        "lb_flood_new_flows_per_second",
        "New flows per second over the last control interval, and of them those that \
         sent no second packet (unanswered: spoofed SYNs, refused connections, \
         one-datagram UDP flows)",
        None,
        &[
            ([("flows", "all")], f.new_flows_per_second),
            ([("flows", "unanswered")], f.unanswered_per_second),
        ],
    )?;
    gauge_family(
        e,
        "lb_flood_threshold_per_second",
        "Unanswered new flows per second from which a flood is declared (--flood-threshold)",
        None,
        &[([] as [(&str, &str); 0], f.threshold_per_second)],
    )
}

fn encode_cluster(c: &ClusterMetrics, e: &mut DescriptorEncoder) -> fmt::Result {
    let none = |v: i64| [([] as [(&str, &str); 0], v)];
    gauge_family(
        e,
        "lb_cluster_connected",
        "1 while a session with the fleet's etcd is up; 0: the last epoch stays in force",
        None,
        &none(i64::from(c.connected)),
    )?;
    gauge_family(
        e,
        "lb_cluster_leader",
        "1 while this LB leads the fleet (publishes its epochs)",
        None,
        &none(i64::from(c.leading)),
    )?;
    gauge_family(
        e,
        "lb_cluster_epoch",
        "Fleet epochs: applied (the newest applied here), newest (the newest published, \
         as seen here)",
        None,
        &[
            ([("epoch", "applied")], c.epoch_applied as i64),
            ([("epoch", "newest")], c.epoch_newest as i64),
        ],
    )?;
    gauge_family(
        e,
        "lb_cluster_epoch_lag",
        "How long the newest epoch has waited here unapplied (0 once applied)",
        Some(&Unit::Seconds),
        &[([] as [(&str, &str); 0], c.lag_seconds)],
    )?;
    gauge_family(
        e,
        "lb_cluster_nodes",
        "LBs of the fleet with a live record, by state: agreeing (tables are the newest \
         epoch's), other_table (not yet, or their own health checks took a backend out), \
         other_config (another configuration digest: they apply none of this one's epochs)",
        None,
        &[
            ([("state", "agreeing")], c.nodes_agreeing as i64),
            ([("state", "other_table")], c.nodes_other_table as i64),
            ([("state", "other_config")], c.nodes_other_config as i64),
        ],
    )?;
    counter_family(
        e,
        "lb_cluster_epochs_published",
        "Epochs this LB published as leader",
        &[([] as [(&str, &str); 0], c.published)],
    )?;
    counter_family(
        e,
        "lb_cluster_publications_fenced",
        "Publications etcd refused because another LB led by then (a deposed leader)",
        &[([] as [(&str, &str); 0], c.fenced)],
    )?;
    match &c.share {
        Some(share) => encode_share(share, e),
        None => Ok(()),
    }
}

fn encode_share(s: &crate::share::ShareState, e: &mut DescriptorEncoder) -> fmt::Result {
    let event = |v| [("event", v)];
    counter_family(
        e,
        "lb_share_flows",
        "Flow sharing: reported (new connection entries from this datapath), sent (to \
         peers, per peer, dumps included), received (from peers), inserted (written \
         into this LB's tables), kept (this LB already had the flow), refused (did not \
         check or name nothing here; see `lb cluster status`)",
        &[
            (event("reported"), s.reported),
            (event("sent"), s.flows_sent),
            (event("received"), s.flows_received),
            (event("inserted"), s.flows_inserted),
            (event("kept"), s.flows_kept),
            (event("refused"), s.flows_refused),
        ],
    )?;
    let reason = |v| [("reason", v)];
    counter_family(
        e,
        "lb_share_unshared",
        "New flows not shared, by reason: ring_full (the datapath's ring was full: the \
         agent fell behind), peer_slow (a peer's queue was full; per peer), unnamed (a \
         VIP or backend gone by a reload). These flows may break if this LB leaves",
        &[
            (reason("ring_full"), s.ring_full),
            (reason("peer_slow"), s.peer_slow),
            (reason("unnamed"), s.unnamed),
        ],
    )?;
    counter_family(
        e,
        "lb_share_sent_bytes",
        "Bytes of flow-sharing frames sent to peers",
        &[([] as [(&str, &str); 0], s.bytes_sent)],
    )?;
    let count = |f: &dyn Fn(&crate::share::PeerState) -> bool| {
        s.peers.values().filter(|p| f(p)).count() as i64
    };
    gauge_family(
        e,
        "lb_share_peers",
        "Other LBs sharing flows, by direction: sending (this LB's connection to them \
         is up, its dump sent), receiving (their connection here is up)",
        None,
        &[
            ([("direction", "sending")], count(&|p| p.sending)),
            ([("direction", "receiving")], count(&|p| p.receiving)),
        ],
    )
}

fn encode_global(g: &GlobalStats, e: &mut DescriptorEncoder) -> fmt::Result {
    counter_family(
        e,
        "lb_datapath_frames",
        "Frames the XDP program saw on the interface, of any kind",
        &[([] as [(&str, &str); 0], g.rx_frames)],
    )?;
    let reason = |r| [("reason", r)];
    counter_family(
        e,
        "lb_datapath_passed",
        "Frames handed on to the kernel's network stack untouched, by reason: not_ip \
         (not IPv4 or IPv6), not_vip (not TCP or UDP to a configured VIP), fragment \
         (an IPv4 fragment), truncated (cut short before the needed headers), malformed \
         (an IP header that contradicts itself), ipv6_extension (an IPv6 extension \
         header before the transport header), icmp_other (ICMP that is neither echo to \
         a VIP nor an error about a VIP flow)",
        &[
            (reason("not_ip"), g.pass_not_ip),
            (reason("not_vip"), g.pass_not_vip),
            (reason("fragment"), g.pass_fragment),
            (reason("truncated"), g.pass_truncated),
            (reason("malformed"), g.pass_malformed),
            (reason("ipv6_extension"), g.pass_ipv6_extension),
            (reason("icmp_other"), g.pass_icmp_other),
        ],
    )?;
    counter_family(
        e,
        "lb_datapath_ipv4_options",
        "VIP packets whose IPv4 header carries options; they are balanced like any other, \
         this only counts them",
        &[([] as [(&str, &str); 0], g.ipv4_options)],
    )?;
    counter_family(
        e,
        "lb_datapath_dropped",
        "VIP packets dropped, by reason: no_backend (the lookup table slot names no \
         usable backend), encap_failed (the frame could not be grown for encapsulation)",
        &[
            (reason("no_backend"), g.drop_no_backend),
            (reason("encap_failed"), g.drop_encap_failed),
        ],
    )?;
    let result = |r| [("result", r)];
    counter_family(
        e,
        "lb_conntrack",
        "Connection table lookups and inserts, by result: hit (a known flow), miss_syn \
         (a new flow: a TCP SYN or an unknown UDP flow), miss_non_syn (an unknown TCP \
         flow without SYN, which may break), insert_failed (a new flow could not be \
         remembered and is forwarded by its hash)",
        &[
            (result("hit"), g.conn_hit),
            (result("miss_syn"), g.conn_miss_syn),
            (result("miss_non_syn"), g.conn_miss_non_syn),
            (result("insert_failed"), g.conn_insert_failed),
        ],
    )?;
    // `tx` counts every transmitted frame and `tx_encap` the encapsulated ones among
    // them. The per-CPU values are read one CPU at a time, so guard against a sum
    // that momentarily has more encapsulated frames than frames.
    counter_family(
        e,
        "lb_tx",
        "Frames sent back out of the interface towards a backend, by mode: dsr (L2 direct \
         server return), encap (IP-in-IP encapsulation)",
        &[
            ([("mode", "dsr")], g.tx.saturating_sub(g.tx_encap)),
            ([("mode", "encap")], g.tx_encap),
        ],
    )?;
    counter_family(
        e,
        "lb_icmp",
        "ICMP handled by the datapath, by kind: echo_reply (an echo request to a VIP \
         address answered directly), error_forwarded (fragmentation needed or packet too \
         big about a VIP flow, forwarded to that flow's backend)",
        &[
            ([("kind", "echo_reply")], g.icmp_echo_reply),
            ([("kind", "error_forwarded")], g.icmp_error_forwarded),
        ],
    )
}

fn encode_vips(vips: &[VipMetrics], e: &mut DescriptorEncoder) -> fmt::Result {
    let each = |f: fn(&VipMetrics) -> u64| -> Vec<(L1<'_>, u64)> {
        vips.iter()
            .map(|v| ([("vip", v.vip.as_str())], f(v)))
            .collect()
    };
    counter_family(
        e,
        "lb_vip_packets",
        "Packets balanced for a VIP",
        &each(|v| v.packets),
    )?;
    counter_family(
        e,
        "lb_vip_bytes",
        "Bytes of the packets balanced for a VIP",
        &each(|v| v.bytes),
    )?;
    counter_family(
        e,
        "lb_vip_new_flows",
        "New flows of a VIP given a backend by its lookup table",
        &each(|v| v.new_flows),
    )
}

fn backend_labels(b: &BackendMetrics) -> L2<'_> {
    [("vip", b.vip.as_str()), ("backend", b.backend.as_str())]
}

fn encode_backends(backends: &[BackendMetrics], e: &mut DescriptorEncoder) -> fmt::Result {
    let each = |f: fn(&BackendMetrics) -> u64| -> Vec<(L2<'_>, u64)> {
        backends.iter().map(|b| (backend_labels(b), f(b))).collect()
    };
    counter_family(
        e,
        "lb_backend_packets",
        "Packets of a VIP sent to a backend",
        &each(|b| b.packets),
    )?;
    counter_family(
        e,
        "lb_backend_bytes",
        "Bytes of the packets of a VIP sent to a backend",
        &each(|b| b.bytes),
    )?;
    counter_family(
        e,
        "lb_backend_new_flows",
        "New flows of a VIP given to a backend",
        &each(|b| b.new_flows),
    )?;
    gauge_family(
        e,
        "lb_backend_weight",
        "The backend's weight in its VIP's lookup table now",
        None,
        &each(|b| u64::from(b.weight)),
    )?;
    gauge_family(
        e,
        "lb_backend_configured_weight",
        "The backend's weight as the configuration gives it",
        None,
        &each(|b| u64::from(b.configured_weight)),
    )?;
    gauge_family(
        e,
        "lb_backend_pinned",
        "1 if the backend's weight is pinned (the controller does not change it), else 0",
        None,
        &each(|b| u64::from(b.pinned)),
    )?;
    gauge_family(
        e,
        "lb_backend_healthy",
        "1 if the backend is considered healthy, else 0",
        None,
        &each(|b| u64::from(b.healthy)),
    )?;
    let present = |f: fn(&BackendMetrics) -> Option<f64>| -> Vec<(L2<'_>, f64)> {
        backends
            .iter()
            .filter_map(|b| finite(f(b)).map(|v| (backend_labels(b), v)))
            .collect()
    };
    gauge_family(
        e,
        "lb_backend_predicted_latency",
        "The latency a new flow sent to the backend is predicted to see one control \
         interval ahead, by the predictor that drives the weights",
        Some(&Unit::Seconds),
        &present(|b| b.prediction),
    )?;
    gauge_family(
        e,
        "lb_backend_baseline_predicted_latency",
        "The same latency as predicted by the best baseline predictor",
        Some(&Unit::Seconds),
        &present(|b| b.baseline_prediction),
    )?;
    let drivers: Vec<(L3<'_>, u64)> = backends
        .iter()
        .filter_map(|b| {
            let p = b.predictor.as_deref()?;
            Some((
                [
                    ("vip", b.vip.as_str()),
                    ("backend", b.backend.as_str()),
                    ("predictor", p),
                ],
                1,
            ))
        })
        .collect();
    gauge_family(
        e,
        "lb_backend_predictor",
        "1 for the predictor whose prediction drives the backend's weight: model (the \
         load model) or a baseline (last_value, ewma)",
        None,
        &drivers,
    )?;
    let errors: Vec<(L3<'_>, f64)> = backends
        .iter()
        .flat_map(|b| {
            [("model", b.model_error), ("baseline", b.baseline_error)]
                .into_iter()
                .filter_map(move |(p, v)| {
                    let labels = [("vip", b.vip.as_str()), ("backend", b.backend.as_str())];
                    finite(v).map(|v| ([labels[0], labels[1], ("predictor", p)], v))
                })
        })
        .collect();
    gauge_family(
        e,
        "lb_backend_prediction_error",
        "Rolling mean absolute error of the backend's recent latency predictions, by \
         predictor: model (the load model), baseline (the best baseline predictor)",
        Some(&Unit::Seconds),
        &errors,
    )
}

fn encode_model(m: &ModelMetrics, e: &mut DescriptorEncoder) -> fmt::Result {
    let setting = Info::new([("predictor", m.predictor_setting.name())]);
    let metric = e.encode_descriptor(
        "lb_model_predictor_setting",
        &help_text(
            "[control] predictor: auto (the model while it beats the baselines), svr, ewma \
             or last",
        ),
        None,
        MetricType::Info,
    )?;
    setting.encode(metric)?;
    if !m.policy_source.is_empty() {
        let info = Info::new([("source", m.policy_source.clone())]);
        let metric = e.encode_descriptor(
            "lb_model",
            &help_text(
                "What drives the backends' weights: the model or a named baseline predictor",
            ),
            None,
            MetricType::Info,
        )?;
        info.encode(metric)?;
    }
    let failures: Vec<(L1<'_>, u64)> = m
        .fit_failures
        .iter()
        .map(|&(kind, n)| ([("kind", kind)], n))
        .collect();
    counter_family(
        e,
        "lb_model_fit_failures",
        "Fits of the load model that failed, by kind (the last good fit stays in use): \
         too_few_samples while a window fills, fit when the solver fails, non_finite, ...",
        &failures,
    )?;
    let last_fit_at: Vec<_> = finite(m.last_fit_timestamp)
        .map(|v| ([] as [(&str, &str); 0], v))
        .into_iter()
        .collect();
    gauge_family(
        e,
        "lb_model_last_fit_timestamp",
        "When the last fit of the load model was installed, since the Unix epoch",
        Some(&Unit::Seconds),
        &last_fit_at,
    )?;
    let last_fit: Vec<_> = finite(m.last_fit_seconds)
        .map(|v| ([] as [(&str, &str); 0], v))
        .into_iter()
        .collect();
    gauge_family(
        e,
        "lb_model_last_fit_duration",
        "How long the last fit of the load model took",
        Some(&Unit::Seconds),
        &last_fit,
    )?;
    let errors: Vec<(L1<'_>, f64)> = [("model", m.model_error), ("baseline", m.baseline_error)]
        .into_iter()
        .filter_map(|(p, v)| finite(v).map(|v| ([("predictor", p)], v)))
        .collect();
    gauge_family(
        e,
        "lb_model_rolling_error",
        "Rolling mean absolute error of recent latency predictions, by predictor: \
         model (the load model), baseline (the best baseline predictor)",
        Some(&Unit::Seconds),
        &errors,
    )
}

/// `v` if it is present and finite: the text format has no spelling for what dtoa
/// prints for infinities, and a NaN would only mislead.
fn finite(v: Option<f64>) -> Option<f64> {
    v.filter(|v| v.is_finite())
}

/// One counter family (the encoder appends `_total` to `name`); nothing if no sample.
fn counter_family<S: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(S, u64)],
) -> fmt::Result {
    if samples.is_empty() {
        return Ok(());
    }
    let mut metric = e.encode_descriptor(name, &help_text(help), None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

/// One gauge family (the encoder appends the unit to `name`); nothing if no sample.
fn gauge_family<S: EncodeLabelSet, V: prometheus_client::encoding::EncodeGaugeValue + Copy>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: &[(S, V)],
) -> fmt::Result {
    if samples.is_empty() {
        return Ok(());
    }
    let mut metric = e.encode_descriptor(name, &help_text(help), unit, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

/// HELP text ends with a full stop, as the registry's own `register` writes it.
fn help_text(help: &str) -> String {
    format!("{help}.")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MetricsSnapshot {
        MetricsSnapshot {
            global: GlobalStats {
                rx_frames: 1000,
                pass_not_ip: 11,
                pass_not_vip: 12,
                pass_fragment: 13,
                ipv4_options: 14,
                pass_truncated: 15,
                pass_malformed: 16,
                pass_ipv6_extension: 17,
                drop_no_backend: 18,
                conn_hit: 500,
                conn_miss_syn: 40,
                conn_miss_non_syn: 7,
                conn_insert_failed: 2,
                tx: 600,
                tx_encap: 250,
                icmp_echo_reply: 3,
                icmp_error_forwarded: 4,
                pass_icmp_other: 19,
                drop_encap_failed: 5,
            },
            vips: vec![VipMetrics {
                vip: "198.18.1.1:80/tcp".into(),
                packets: 900,
                bytes: 123_456,
                new_flows: 40,
            }],
            backends: vec![
                BackendMetrics {
                    vip: "198.18.1.1:80/tcp".into(),
                    backend: "10.0.0.1".into(),
                    weight: 70,
                    configured_weight: 100,
                    pinned: false,
                    healthy: true,
                    packets: 600,
                    bytes: 80_000,
                    new_flows: 25,
                    prediction: Some(0.0125),
                    baseline_prediction: Some(0.02),
                    predictor: Some("ewma".into()),
                    model_error: Some(0.003),
                    baseline_error: Some(0.002),
                },
                BackendMetrics {
                    vip: "198.18.1.1:80/tcp".into(),
                    backend: "10.0.0.2".into(),
                    weight: 30,
                    configured_weight: 100,
                    pinned: true,
                    healthy: false,
                    packets: 300,
                    bytes: 43_456,
                    new_flows: 15,
                    prediction: None,
                    baseline_prediction: Some(f64::NAN),
                    predictor: None,
                    model_error: Some(f64::INFINITY),
                    baseline_error: None,
                },
            ],
            model: ModelMetrics {
                policy_source: "baseline:ewma".into(),
                predictor_setting: crate::core::model::PredictorSetting::Ewma,
                last_fit_seconds: Some(0.25),
                fit_failures: vec![("fit", 3), ("too_few_samples", 0)],
                last_fit_timestamp: Some(1_700_000_000.5),
                model_error: Some(0.004),
                baseline_error: None,
            },
            cluster: Some(ClusterMetrics {
                connected: true,
                leading: false,
                epoch_applied: 41,
                epoch_newest: 42,
                lag_seconds: 0.05,
                nodes_agreeing: 2,
                nodes_other_table: 1,
                nodes_other_config: 0,
                published: 0,
                fenced: 1,
                share: Some(crate::share::ShareState {
                    reported: 21,
                    flows_inserted: 22,
                    peer_slow: 23,
                    bytes_sent: 24,
                    peers: [(
                        "lb-b".to_owned(),
                        crate::share::PeerState {
                            sending: true,
                            ..Default::default()
                        },
                    )]
                    .into(),
                    ..Default::default()
                }),
            }),
            readiness: crate::api::Readiness::ready(),
            flood: crate::api::FloodStatus {
                guard: true,
                active: true,
                episodes: 2,
                threshold_per_second: 10_000.0,
                new_flows_per_second: 250_000.0,
                unanswered_per_second: 249_000.0,
                young: 31,
                promoted: 32,
                young_failed: 33,
                ..Default::default()
            },
            maps: vec![crate::api::MapMemoryView {
                name: "CONNS_V4".into(),
                max_entries: 1 << 20,
                key_size: 16,
                value_size: 8,
                bytes: 104_955_904,
            }],
            nat: Some(crate::api::NatStatus {
                flows: 41,
                ports_per_source: 64512,
                sources: vec![crate::api::NatSourceUse {
                    address: "198.18.200.1".into(),
                    ports_in_use: 41,
                }],
                to_backend: 51,
                to_client: 52,
                ports_exhausted: 53,
                ..Default::default()
            }),
        }
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn render_shows_the_known_numbers() {
        let text = render(&sample());
        let lines = lines(&text);
        for expected in [
            "lb_datapath_frames_total 1000",
            "lb_cluster_connected 1",
            r#"lb_flood_guard_flows_total{event="young"} 31"#,
            r#"lb_flood_guard_flows_total{event="promoted"} 32"#,
            r#"lb_flood_guard_flows_total{event="young_failed"} 33"#,
            r#"lb_nat_packets_total{direction="to_backend"} 51"#,
            r#"lb_nat_packets_total{direction="to_client"} 52"#,
            r#"lb_nat_ports_total{event="exhausted"} 53"#,
            "lb_nat_flows 41",
            r#"lb_nat_ports_in_use{source="198.18.200.1"} 41"#,
            "lb_nat_ports_per_source 64512",
            "lb_flood_guard_enabled 1",
            "lb_flood_active 1",
            "lb_flood_episodes_total 2",
            r#"lb_datapath_map_memory_bytes{map="CONNS_V4"} 104955904"#,
            r#"lb_datapath_map_max_entries{map="CONNS_V4"} 1048576"#,
            r#"lb_flood_new_flows_per_second{flows="unanswered"} 249000.0"#,
            "lb_cluster_leader 0",
            r#"lb_cluster_epoch{epoch="applied"} 41"#,
            r#"lb_cluster_epoch{epoch="newest"} 42"#,
            "lb_cluster_epoch_lag_seconds 0.05",
            r#"lb_cluster_nodes{state="other_table"} 1"#,
            "lb_cluster_publications_fenced_total 1",
            "lb_ready 1",
            r#"lb_share_flows_total{event="reported"} 21"#,
            r#"lb_share_flows_total{event="inserted"} 22"#,
            r#"lb_share_unshared_total{reason="peer_slow"} 23"#,
            "lb_share_sent_bytes_total 24",
            r#"lb_share_peers{direction="sending"} 1"#,
            r#"lb_share_peers{direction="receiving"} 0"#,
            r#"lb_datapath_passed_total{reason="not_ip"} 11"#,
            r#"lb_datapath_passed_total{reason="not_vip"} 12"#,
            r#"lb_datapath_passed_total{reason="fragment"} 13"#,
            r#"lb_datapath_passed_total{reason="truncated"} 15"#,
            r#"lb_datapath_passed_total{reason="malformed"} 16"#,
            r#"lb_datapath_passed_total{reason="ipv6_extension"} 17"#,
            r#"lb_datapath_passed_total{reason="icmp_other"} 19"#,
            "lb_datapath_ipv4_options_total 14",
            r#"lb_datapath_dropped_total{reason="no_backend"} 18"#,
            r#"lb_datapath_dropped_total{reason="encap_failed"} 5"#,
            r#"lb_conntrack_total{result="hit"} 500"#,
            r#"lb_conntrack_total{result="miss_syn"} 40"#,
            r#"lb_conntrack_total{result="miss_non_syn"} 7"#,
            r#"lb_conntrack_total{result="insert_failed"} 2"#,
            r#"lb_tx_total{mode="dsr"} 350"#,
            r#"lb_tx_total{mode="encap"} 250"#,
            r#"lb_icmp_total{kind="echo_reply"} 3"#,
            r#"lb_icmp_total{kind="error_forwarded"} 4"#,
            r#"lb_vip_packets_total{vip="198.18.1.1:80/tcp"} 900"#,
            r#"lb_vip_bytes_total{vip="198.18.1.1:80/tcp"} 123456"#,
            r#"lb_vip_new_flows_total{vip="198.18.1.1:80/tcp"} 40"#,
            r#"lb_backend_packets_total{vip="198.18.1.1:80/tcp",backend="10.0.0.1"} 600"#,
            r#"lb_backend_bytes_total{vip="198.18.1.1:80/tcp",backend="10.0.0.2"} 43456"#,
            r#"lb_backend_new_flows_total{vip="198.18.1.1:80/tcp",backend="10.0.0.1"} 25"#,
            r#"lb_backend_weight{vip="198.18.1.1:80/tcp",backend="10.0.0.1"} 70"#,
            r#"lb_backend_weight{vip="198.18.1.1:80/tcp",backend="10.0.0.2"} 30"#,
            r#"lb_backend_configured_weight{vip="198.18.1.1:80/tcp",backend="10.0.0.2"} 100"#,
            r#"lb_backend_pinned{vip="198.18.1.1:80/tcp",backend="10.0.0.1"} 0"#,
            r#"lb_backend_pinned{vip="198.18.1.1:80/tcp",backend="10.0.0.2"} 1"#,
            r#"lb_backend_healthy{vip="198.18.1.1:80/tcp",backend="10.0.0.1"} 1"#,
            r#"lb_backend_healthy{vip="198.18.1.1:80/tcp",backend="10.0.0.2"} 0"#,
            r#"lb_backend_predicted_latency_seconds{vip="198.18.1.1:80/tcp",backend="10.0.0.1"} 0.0125"#,
            r#"lb_backend_baseline_predicted_latency_seconds{vip="198.18.1.1:80/tcp",backend="10.0.0.1"} 0.02"#,
            r#"lb_model_info{source="baseline:ewma"} 1"#,
            r#"lb_model_predictor_setting_info{predictor="ewma"} 1"#,
            r#"lb_model_fit_failures_total{kind="fit"} 3"#,
            r#"lb_model_fit_failures_total{kind="too_few_samples"} 0"#,
            "lb_model_last_fit_duration_seconds 0.25",
            "lb_model_last_fit_timestamp_seconds 1700000000.5",
            r#"lb_backend_predictor{vip="198.18.1.1:80/tcp",backend="10.0.0.1",predictor="ewma"} 1"#,
            r#"lb_backend_prediction_error_seconds{vip="198.18.1.1:80/tcp",backend="10.0.0.1",predictor="model"} 0.003"#,
            r#"lb_backend_prediction_error_seconds{vip="198.18.1.1:80/tcp",backend="10.0.0.1",predictor="baseline"} 0.002"#,
            r#"lb_model_rolling_error_seconds{predictor="model"} 0.004"#,
            "# TYPE lb_conntrack counter",
            "# TYPE lb_backend_weight gauge",
            "# TYPE lb_model info",
            "# UNIT lb_backend_predicted_latency_seconds seconds",
        ] {
            assert!(lines.contains(&expected), "missing {expected:?} in\n{text}");
        }
        assert_eq!(lines.last(), Some(&"# EOF"), "{text}");
        // Absent or non-finite values are left out, not shown as zero or NaN.
        assert!(!text.contains(r#"backend="10.0.0.2"} NaN"#), "{text}");
        assert!(!text.contains("NaN"), "{text}");
        assert!(
            !text.contains(r#"lb_backend_predicted_latency_seconds{vip="198.18.1.1:80/tcp",backend="10.0.0.2"}"#),
            "{text}"
        );
        assert!(
            !text.contains(r#"lb_model_rolling_error_seconds{predictor="baseline"}"#),
            "{text}"
        );
        // A backend without a driving predictor or a finite error shows neither.
        assert!(
            !text.contains(r#"lb_backend_predictor{vip="198.18.1.1:80/tcp",backend="10.0.0.2""#),
            "{text}"
        );
        assert!(
            !text
                .contains(r#"prediction_error_seconds{vip="198.18.1.1:80/tcp",backend="10.0.0.2""#),
            "{text}"
        );
    }

    #[test]
    fn every_family_is_named_lb_has_help_and_counters_end_in_total() {
        let text = render(&sample());
        let mut families = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line has a kind");
                families.push((name.to_string(), kind.to_string()));
            }
        }
        assert!(families.len() >= 20, "only {} families", families.len());
        for (name, kind) in &families {
            assert!(name.starts_with("lb_"), "{name} lacks the lb_ prefix");
            let help = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("# HELP {name} ")))
                .unwrap_or_else(|| panic!("{name} has no HELP"));
            assert!(help.len() > 15, "{name}'s HELP is too short: {help:?}");
            let samples: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter(|l| {
                    let sample_name = l.split(['{', ' ']).next().unwrap_or("");
                    sample_name
                        .strip_prefix(name.as_str())
                        .is_some_and(|rest| matches!(rest, "" | "_total" | "_info"))
                })
                .collect();
            assert!(!samples.is_empty(), "{name} has no sample");
            let suffix = match kind.as_str() {
                "counter" => "_total",
                "info" => "_info",
                "gauge" => "",
                other => panic!("unexpected type {other} for {name}"),
            };
            for sample in samples {
                let sample_name = sample.split(['{', ' ']).next().unwrap_or("");
                assert_eq!(sample_name, format!("{name}{suffix}"), "{sample}");
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut snapshot = MetricsSnapshot::default();
        snapshot.vips.push(VipMetrics {
            vip: "we\"ird\\vip\nname".into(),
            packets: 9,
            bytes: 0,
            new_flows: 0,
        });
        snapshot.model.policy_source = "a\"b".into();
        let text = render(&snapshot);
        assert!(
            text.lines()
                .any(|l| l == r#"lb_vip_packets_total{vip="we\"ird\\vip\nname"} 9"#),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l == r#"lb_model_info{source="a\"b"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn an_empty_snapshot_renders_the_datapath_counters_and_nothing_absent() {
        let text = render(&MetricsSnapshot::default());
        assert!(
            text.lines().any(|l| l == "lb_datapath_frames_total 0"),
            "{text}"
        );
        for absent in [
            "lb_vip_",
            "lb_backend_",
            "lb_model_info",
            "lb_model_last_fit",
            "lb_model_fit_failures",
        ] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
