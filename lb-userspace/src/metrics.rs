//! The agent's Prometheus endpoint: [`render`] turns a [`MetricsSnapshot`] into the
//! OpenMetrics text format with the `prometheus-client` encoder, and [`serve`] answers
//! `GET /metrics` with it over a minimal HTTP/1.1 responder on tokio.
//!
//! The agent owns the numbers: once per control interval it builds a new snapshot
//! (datapath counters summed over CPUs, per-VIP and per-backend counters, weights,
//! predictions, the model's state) and sends it into a `tokio::sync::watch` channel.
//! Every scrape renders the latest value, so nothing here keeps state between scrapes.
//!
//! # Metrics
//! Datapath-wide (from [`GlobalStats`]):
//! - `lb_datapath_frames_total`: every frame the XDP program saw.
//! - `lb_datapath_passed_total{reason}`: frames handed to the kernel stack; `reason` is
//!   `not_ip`, `not_vip`, `fragment`, `truncated`, `malformed`, `ipv6_extension` or
//!   `icmp_other`.
//! - `lb_datapath_ipv4_options_total`: VIP packets with IPv4 options (balanced as usual).
//! - `lb_datapath_dropped_total{reason}`: `no_backend` or `encap_failed`.
//! - `lb_conntrack_total{result}`: `hit`, `miss_syn`, `miss_non_syn` or `insert_failed`.
//! - `lb_tx_total{mode}`: frames sent back out towards a backend, `dsr` or `encap`.
//! - `lb_icmp_total{kind}`: `echo_reply` or `error_forwarded`.
//!
//! Per VIP (`vip` label) and per backend (`vip` and `backend` labels):
//! - `lb_vip_packets_total`, `lb_vip_bytes_total`, `lb_vip_new_flows_total`
//! - `lb_backend_packets_total`, `lb_backend_bytes_total`, `lb_backend_new_flows_total`
//! - gauges `lb_backend_weight`, `lb_backend_configured_weight`, `lb_backend_pinned`
//!   and `lb_backend_healthy` (the last two are 0 or 1)
//! - gauges `lb_backend_predicted_latency_seconds` and
//!   `lb_backend_baseline_predicted_latency_seconds`, only for backends that have them.
//!
//! The model:
//! - `lb_model_info{source} 1`: what drives the weights (`model`, `baseline:ewma`, ...).
//! - `lb_model_fit_failures_total`: fits of the model that failed.
//! - `lb_model_last_fit_duration_seconds`: how long the last fit took.
//! - `lb_model_rolling_error_seconds{predictor}`: rolling mean absolute error of the
//!   model (`predictor="model"`) and of the best baseline (`predictor="baseline"`).
//!
//! Optional values (and any value that is NaN or infinite) are left out rather than
//! shown as zero. A family with no sample at all is left out entirely.
//!
//! # The HTTP side
//! One tokio task per connection, each with its own deadline, so a slow or silent client
//! never holds up another. The request head is read up to a bound (8 KiB for the request
//! line, 16 KiB in all) and within 5 s; the response is written within another 5 s;
//! every response carries `Connection: close`. Bad input gets a 4xx answer or a closed
//! connection, never a panic.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::pin;
use std::time::Duration;

use lb_common::types::GlobalStats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout, timeout_at};

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
}

/// The load model's state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelMetrics {
    /// What drives the weights: `"model"`, `"baseline:ewma"`, ... Empty: not shown.
    pub policy_source: String,
    /// How long the last fit of the model took, in seconds.
    pub last_fit_seconds: Option<f64>,
    /// Fits that failed since the agent started.
    pub fit_failures: u64,
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
fn render_owned(snapshot: MetricsSnapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut out = String::new();
    // Writing into a String cannot fail, and the collector only passes on the
    // writer's errors; should it ever fail, what was written is still served.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        log::error!("metrics: encoding the snapshot failed: {e}");
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

fn encode_snapshot(s: &MetricsSnapshot, e: &mut DescriptorEncoder) -> fmt::Result {
    encode_global(&s.global, e)?;
    encode_vips(&s.vips, e)?;
    encode_backends(&s.backends, e)?;
    encode_model(&s.model, e)
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
    )
}

fn encode_model(m: &ModelMetrics, e: &mut DescriptorEncoder) -> fmt::Result {
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
    counter_family(
        e,
        "lb_model_fit_failures",
        "Fits of the load model that failed (the last good fit stays in use)",
        &[([] as [(&str, &str); 0], m.fit_failures)],
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

/// The longest request line accepted (without its line end).
const MAX_REQUEST_LINE: usize = 8 * 1024;
/// The longest request head accepted: request line and header fields.
const MAX_HEAD: usize = 16 * 1024;
/// Connections served at once; more are closed as soon as they are accepted.
const MAX_CONNECTIONS: usize = 256;
/// What the body of a successful answer is.
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The HTTP side's time limits.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// To receive the whole request head, counted from the accept.
    read: Duration,
    /// To send the whole response.
    write: Duration,
    /// To send an error response after the client ran out of time.
    late_write: Duration,
    /// After the response: how long unread input is drained so that closing does not
    /// reset the connection before the client has read the answer.
    linger: Duration,
}

const LIMITS: Limits = Limits {
    read: Duration::from_secs(5),
    write: Duration::from_secs(5),
    late_write: Duration::from_secs(1),
    linger: Duration::from_secs(1),
};

/// Serves `GET /metrics` on `listener` until `shutdown` resolves; any other path → 404,
/// any other method → 405 (`HEAD /metrics` is answered too, without a body). Each
/// request is answered with the latest snapshot from `snapshot`.
///
/// Never panics on bad input: a request line over 8 KiB gets 414, a head over 16 KiB
/// 431, a client that has not sent its request head within 5 s 408, a malformed request
/// 400, and a client that goes away just a closed connection. Each connection has its
/// own task, so one client never blocks the others; at most 256 are served at once.
/// When `shutdown` resolves, connections still open are closed and this returns.
///
/// Returns an error only if accepting fails for a reason that is not about one
/// connection or a passing shortage of resources (those are logged and waited out).
pub async fn serve(
    listener: TcpListener,
    snapshot: watch::Receiver<MetricsSnapshot>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    serve_with(listener, snapshot, shutdown, LIMITS).await
}

async fn serve_with(
    listener: TcpListener,
    snapshot: watch::Receiver<MetricsSnapshot>,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
) -> io::Result<()> {
    let mut shutdown = pin!(shutdown);
    let mut tasks: JoinSet<()> = JoinSet::new();
    let result = loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = joined {
                    log::error!("metrics: a connection task failed: {e}");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if tasks.len() >= MAX_CONNECTIONS {
                        log::warn!("metrics: {MAX_CONNECTIONS} connections open, closing {peer}");
                        drop(stream);
                        continue;
                    }
                    let snapshot = snapshot.clone();
                    tasks.spawn(async move {
                        if let Err(e) = handle_connection(stream, snapshot, limits).await {
                            log::debug!("metrics: connection from {peer}: {e}");
                        }
                    });
                }
                Err(e) if is_connection_error(&e) => {
                    log::debug!("metrics: accept: {e}");
                }
                Err(e) if is_resource_error(&e) => {
                    log::warn!("metrics: accept: {e}; pausing");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => break Err(e),
            }
        }
    };
    tasks.shutdown().await;
    result
}

/// An accept error about one connection only: try the next.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    ) || matches!(e.raw_os_error(), Some(libc::EPROTO | libc::EPERM))
}

/// An accept error from a passing shortage (descriptors, memory): wait and try again.
fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    ) || e.kind() == io::ErrorKind::OutOfMemory
}

/// Why a request head could not be taken.
#[derive(Debug)]
enum HeadError {
    /// The client closed or failed before sending a whole head: nothing to answer.
    Gone(Option<io::Error>),
    /// The request line is longer than [`MAX_REQUEST_LINE`].
    LineTooLong,
    /// The head is longer than [`MAX_HEAD`].
    HeadTooLarge,
    /// Not an HTTP/1.x request line.
    Malformed,
}

/// The part of a request that decides the answer.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    path: String,
}

async fn handle_connection(
    mut stream: TcpStream,
    snapshot: watch::Receiver<MetricsSnapshot>,
    limits: Limits,
) -> io::Result<()> {
    let started = Instant::now();
    let (response, write_limit) =
        match timeout_at(started + limits.read, read_head(&mut stream)).await {
            Err(_elapsed) => (
                Response::error(408, "Request Timeout", "request not received in time\n"),
                limits.late_write,
            ),
            Ok(Err(HeadError::Gone(e))) => return e.map_or(Ok(()), Err),
            Ok(Err(HeadError::LineTooLong)) => (
                Response::error(414, "URI Too Long", "request line too long\n"),
                limits.write,
            ),
            Ok(Err(HeadError::HeadTooLarge)) => (
                Response::error(
                    431,
                    "Request Header Fields Too Large",
                    "request head too large\n",
                ),
                limits.write,
            ),
            Ok(Err(HeadError::Malformed)) => (
                Response::error(400, "Bad Request", "malformed request\n"),
                limits.write,
            ),
            Ok(Ok(request)) => (respond(&request, &snapshot), limits.write),
        };
    let bytes = response.to_bytes();
    match timeout(write_limit, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await
    {
        Err(_elapsed) => return Err(io::Error::new(io::ErrorKind::TimedOut, "writing")),
        Ok(r) => r?,
    }
    // Read and discard what the client may still send (the rest of an oversized head,
    // a body), a bounded amount for a bounded time, so that closing with unread input
    // does not reset the connection before the client has read the answer.
    let _ = timeout(limits.linger, async {
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024usize;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
    Ok(())
}

/// Reads up to the end of the request head (the empty line) and parses its request
/// line. Header fields are read past, not interpreted; a body is never read.
async fn read_head(stream: &mut TcpStream) -> Result<Request, HeadError> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let mut request: Option<Request> = None;
    // Where the search for line ends goes on from.
    let mut scanned = 0;
    loop {
        let room = MAX_HEAD + 1 - buf.len();
        let want = room.min(chunk.len());
        let n = match stream.read(&mut chunk[..want]).await {
            Ok(0) => return Err(HeadError::Gone(None)),
            Ok(n) => n,
            Err(e) => return Err(HeadError::Gone(Some(e))),
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(offset) = buf[scanned..].iter().position(|&b| b == b'\n') {
            let end = scanned + offset;
            scanned = end + 1;
            match &request {
                None => {
                    let line = strip_cr(&buf[..end]);
                    if line.len() > MAX_REQUEST_LINE {
                        return Err(HeadError::LineTooLong);
                    }
                    request = Some(parse_request_line(line).ok_or(HeadError::Malformed)?);
                }
                Some(_) => {
                    // The line that ends here started after the previous line end.
                    let start = buf[..end]
                        .iter()
                        .rposition(|&b| b == b'\n')
                        .map_or(0, |p| p + 1);
                    if strip_cr(&buf[start..end]).is_empty() {
                        return request.ok_or(HeadError::Malformed);
                    }
                }
            }
        }
        if request.is_none() && buf.len() > MAX_REQUEST_LINE + 1 {
            // No line end yet, and the line is already over the limit (allowing one
            // byte for a CR that may precede the LF).
            return Err(HeadError::LineTooLong);
        }
        if buf.len() > MAX_HEAD {
            return Err(HeadError::HeadTooLarge);
        }
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `METHOD SP request-target SP HTTP/1.x`, or `None`.
fn parse_request_line(line: &[u8]) -> Option<Request> {
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if method.is_empty() || !method.chars().all(is_token_char) {
        return None;
    }
    if target.is_empty() || target.chars().any(|c| c.is_control()) {
        return None;
    }
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        return None;
    }
    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    Some(Request {
        method: method.to_string(),
        path: path.to_string(),
    })
}

/// The answer to a well-formed request.
fn respond(request: &Request, snapshot: &watch::Receiver<MetricsSnapshot>) -> Response {
    if request.path != "/metrics" {
        return Response::error(404, "Not Found", "not found; try /metrics\n");
    }
    let head_only = match request.method.as_str() {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut response =
                Response::error(405, "Method Not Allowed", "only GET and HEAD are allowed\n");
            response.allow = true;
            return response;
        }
    };
    // Copy the snapshot out so that the sender is not held up while rendering.
    let current = snapshot.borrow().clone();
    Response {
        status: 200,
        reason: "OK",
        content_type: METRICS_CONTENT_TYPE,
        body: render_owned(current),
        allow: false,
        head_only,
    }
}

#[derive(Debug)]
struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
    /// Send `Allow: GET, HEAD`.
    allow: bool,
    /// Send the head but not the body (an answer to HEAD).
    head_only: bool,
}

impl Response {
    fn error(status: u16, reason: &'static str, body: &str) -> Self {
        Self {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: body.to_string(),
            allow: false,
            head_only: false,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        );
        if self.allow {
            out.push_str("Allow: GET, HEAD\r\n");
        }
        out.push_str("\r\n");
        if !self.head_only {
            out.push_str(&self.body);
        }
        out.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

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
                },
            ],
            model: ModelMetrics {
                policy_source: "baseline:ewma".into(),
                last_fit_seconds: Some(0.25),
                fit_failures: 3,
                model_error: Some(0.004),
                baseline_error: None,
            },
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
            "lb_model_fit_failures_total 3",
            "lb_model_last_fit_duration_seconds 0.25",
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
        assert!(
            text.lines().any(|l| l == "lb_model_fit_failures_total 0"),
            "{text}"
        );
        for absent in [
            "lb_vip_",
            "lb_backend_",
            "lb_model_info",
            "lb_model_last_fit",
        ] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn request_lines_are_parsed_strictly() {
        let ok = |method: &str, path: &str| {
            Some(Request {
                method: method.into(),
                path: path.into(),
            })
        };
        assert_eq!(
            parse_request_line(b"GET /metrics HTTP/1.1"),
            ok("GET", "/metrics")
        );
        assert_eq!(
            parse_request_line(b"GET /metrics?x=1 HTTP/1.0"),
            ok("GET", "/metrics")
        );
        for bad in [
            &b""[..],
            b"GET /metrics",
            b"GET  /metrics HTTP/1.1",
            b"GET /metrics HTTP/2.0",
            b"GET /metrics HTTP/1.1 extra",
            b"G\xffT /metrics HTTP/1.1",
            b"GE(T /metrics HTTP/1.1",
            b"GET /me\x01trics HTTP/1.1",
        ] {
            assert_eq!(
                parse_request_line(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// A server on 127.0.0.1 with its shutdown trigger and the task it runs in.
    struct Server {
        addr: SocketAddr,
        stop: oneshot::Sender<()>,
        task: JoinHandle<io::Result<()>>,
        /// Kept so that the snapshot stays published.
        _publish: watch::Sender<MetricsSnapshot>,
    }

    async fn start(limits: Limits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (publish, snapshot) = watch::channel(sample());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_with(
            listener,
            snapshot,
            async {
                let _ = stopped.await;
            },
            limits,
        ));
        Server {
            addr,
            stop,
            task,
            _publish: publish,
        }
    }

    impl Server {
        async fn stop(self) {
            let _ = self.stop.send(());
            let result = timeout(Duration::from_secs(2), self.task)
                .await
                .expect("serve returns soon after shutdown")
                .expect("serve did not panic");
            result.expect("serve returned Ok");
        }
    }

    /// Sends `raw`, then reads the answer to the end (bounded in time).
    async fn exchange(addr: SocketAddr, raw: &[u8]) -> io::Result<String> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(raw).await?;
        let mut answer = Vec::new();
        timeout(Duration::from_secs(3), stream.read_to_end(&mut answer))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))??;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }

    fn status(answer: &str) -> &str {
        answer.lines().next().unwrap_or("")
    }

    #[tokio::test]
    async fn serves_metrics_over_tcp() {
        let server = start(LIMITS).await;
        let answer = exchange(
            server.addr,
            b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
        )
        .await
        .unwrap();
        assert_eq!(status(&answer), "HTTP/1.1 200 OK", "{answer}");
        let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
        assert!(
            head.contains(&format!("Content-Type: {METRICS_CONTENT_TYPE}")),
            "{head}"
        );
        assert!(head.contains("Connection: close"), "{head}");
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert!(
            body.lines()
                .any(|l| l == r#"lb_conntrack_total{result="miss_non_syn"} 7"#),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"));

        // HEAD: the same head, no body. Bare LF line ends are accepted.
        let answer = exchange(server.addr, b"HEAD /metrics HTTP/1.0\n\n")
            .await
            .unwrap();
        assert_eq!(status(&answer), "HTTP/1.1 200 OK", "{answer}");
        assert!(answer.ends_with("\r\n\r\n"), "{answer}");
        server.stop().await;
    }

    #[tokio::test]
    async fn answers_the_latest_snapshot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (publish, snapshot) = watch::channel(MetricsSnapshot::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, snapshot, async {
            let _ = stopped.await;
        }));
        let get = b"GET /metrics HTTP/1.1\r\n\r\n";
        let answer = exchange(addr, get).await.unwrap();
        assert!(
            answer.contains("\nlb_datapath_frames_total 0\n"),
            "{answer}"
        );
        publish.send_modify(|s| s.global.rx_frames = 42);
        let answer = exchange(addr, get).await.unwrap();
        assert!(
            answer.contains("\nlb_datapath_frames_total 42\n"),
            "{answer}"
        );
        stop.send(()).unwrap();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn other_paths_get_404_and_other_methods_405() {
        let server = start(LIMITS).await;
        let answer = exchange(server.addr, b"GET /other HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(status(&answer), "HTTP/1.1 404 Not Found", "{answer}");
        let answer = exchange(server.addr, b"GET /metricsx HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(status(&answer), "HTTP/1.1 404 Not Found", "{answer}");

        let answer = exchange(
            server.addr,
            b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        )
        .await
        .unwrap();
        assert_eq!(
            status(&answer),
            "HTTP/1.1 405 Method Not Allowed",
            "{answer}"
        );
        assert!(answer.contains("\r\nAllow: GET, HEAD\r\n"), "{answer}");
        assert!(!answer.contains("lb_"), "{answer}");
        server.stop().await;
    }

    #[tokio::test]
    async fn garbage_gets_400() {
        let server = start(LIMITS).await;
        for garbage in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"[..],
            b"hello\n\n",
            b"GET /metrics HTTP/9.9\r\n\r\n",
        ] {
            let answer = exchange(server.addr, garbage).await.unwrap();
            assert_eq!(status(&answer), "HTTP/1.1 400 Bad Request", "{answer}");
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn an_overlong_request_line_gets_414_or_a_close() {
        let server = start(LIMITS).await;
        let mut raw = b"GET /".to_vec();
        raw.resize(16 * 1024, b'a');
        raw.extend_from_slice(b" HTTP/1.1\r\n\r\n");
        match exchange(server.addr, &raw).await {
            Ok(answer) => assert!(
                answer.is_empty() || status(&answer) == "HTTP/1.1 414 URI Too Long",
                "{answer}"
            ),
            Err(e) => assert_ne!(e.kind(), io::ErrorKind::TimedOut, "{e}"),
        }
        // An overlong head of many short header lines is refused too.
        let mut raw = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for i in 0..2000 {
            raw.extend_from_slice(format!("X-Filler-{i}: x\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        match exchange(server.addr, &raw).await {
            Ok(answer) => assert!(
                answer.is_empty() || status(&answer).starts_with("HTTP/1.1 431 "),
                "{answer}"
            ),
            Err(e) => assert_ne!(e.kind(), io::ErrorKind::TimedOut, "{e}"),
        }
        // The server is still serving.
        let answer = exchange(server.addr, b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(status(&answer), "HTTP/1.1 200 OK");
        server.stop().await;
    }

    #[tokio::test]
    async fn a_silent_client_does_not_block_another() {
        let server = start(LIMITS).await;
        let _silent = TcpStream::connect(server.addr).await.unwrap();
        let mut partial = TcpStream::connect(server.addr).await.unwrap();
        partial.write_all(b"GET /metr").await.unwrap();
        let started = std::time::Instant::now();
        let answer = exchange(server.addr, b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(status(&answer), "HTTP/1.1 200 OK", "{answer}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // Shutting down does not wait for the silent clients' deadlines.
        server.stop().await;
    }

    #[tokio::test]
    async fn a_slow_client_gets_408_after_the_deadline() {
        let limits = Limits {
            read: Duration::from_millis(200),
            ..LIMITS
        };
        let server = start(limits).await;
        let mut slow = TcpStream::connect(server.addr).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        let started = std::time::Instant::now();
        let mut answer = Vec::new();
        timeout(Duration::from_secs(3), slow.read_to_end(&mut answer))
            .await
            .expect("closed by the server")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(status(&answer), "HTTP/1.1 408 Request Timeout", "{answer}");
        assert!(started.elapsed() >= Duration::from_millis(150));
        server.stop().await;
    }
}
