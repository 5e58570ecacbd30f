//! The collectors: what the agent learns about each backend between two control
//! intervals, from the backend's Prometheus endpoint ([`Scraper`]) and from active
//! health checks ([`Prober`]).
//!
//! The agent runs one [`Scraper`] and one [`Prober`] per backend, each driven by its own
//! task. They share nothing (no locks, no common client), and every exchange is bounded
//! by its own timeout, so a slow, silent or hostile backend only ever costs its own
//! collector that timeout and never delays another backend.
//!
//! # What is trusted
//! Nothing a backend sends is taken on faith. A reading that is missing or that does
//! not make sense is left out of the [`BackendSample`] (`None`), never replaced by a
//! guess, and counted in [`Rejects`]:
//! - NaN and infinities, negative values where none can be, and results outside their
//!   possible range (a utilisation above 1.05, a latency above an hour, ...);
//! - counters that went down (a restart): that rate is skipped for the interval;
//! - series sent twice, series that are missing, lines that break the text format;
//! - responses over the byte limit, responses that are not UTF-8, and exchanges that
//!   do not finish within the timeout (these fail the whole scrape).
//!
//! # Layout
//! - [`prom`]: [`Scraper`], which fetches the text exposition and turns two successive
//!   scrapes into utilisations and rates.
//! - [`probe`]: [`Prober`], TCP connect (and optional HTTP `GET`) health checks with
//!   rise/fall hysteresis.
//! - [`text`]: a strict, line-by-line parser of the Prometheus text format.
//! - [`http`]: the minimal HTTP/1.1 client both use.

pub mod http;
pub mod probe;
pub mod prom;
pub mod text;

use std::net::SocketAddr;
use std::time::Duration;

pub use probe::{ProbeConfig, ProbeResult, Prober};
pub use prom::{ScrapeConfig, Scraper};

/// One backend's readings over the last interval. Every field is optional: a value
/// that was missing or rejected is `None`, never a guess.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BackendSample {
    /// CPU utilisation, 0..=1: the share of CPU time not spent idle, over all CPUs,
    /// from the rate of `node_cpu_seconds_total` (every mode but `idle` counts as busy).
    pub cpu: Option<f64>,
    /// Memory in use, 0..=1: `1 - node_memory_MemAvailable_bytes /
    /// node_memory_MemTotal_bytes`.
    pub memory: Option<f64>,
    /// Disk busy time, 0..=1: the rate of `node_disk_io_time_seconds_total` of the
    /// busiest device.
    pub disk_busy: Option<f64>,
    /// Network bytes per second, received plus transmitted, over every device but
    /// `lo`: the rates of `node_network_receive_bytes_total` and
    /// `node_network_transmit_bytes_total`.
    pub net_bytes_per_s: Option<f64>,
    /// The configured in-flight gauge (summed over the series it selects).
    pub in_flight: Option<f64>,
    /// Mean request latency in seconds over the interval, from the configured
    /// histogram or summary: `rate(NAME_sum) / rate(NAME_count)`. `None` also when no
    /// request completed in the interval.
    pub latency_s: Option<f64>,
    /// Requests per second: the rate of the configured counter, or of the configured
    /// histogram's or summary's `_count`.
    pub requests_per_s: Option<f64>,
    /// Failed requests per second: the rate of the configured errors counter.
    pub errors_per_s: Option<f64>,
}

/// What was ignored, by reason; running totals since the collector was created.
///
/// Format problems (`bad_lines`, `duplicate_series`) count over the whole document;
/// value problems count only for series the sample is computed from, once per
/// offending series, and `missing_series`, `absurd` and `counter_resets` once per field
/// and scrape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rejects {
    /// Values that were NaN, +Inf or -Inf.
    pub nan_or_infinite: u64,
    /// Values below zero where none can be (counters, byte counts, gauges of amounts).
    pub negative: u64,
    /// Results outside their possible range (utilisation over 1.05, latency over an
    /// hour, memory total of zero, ...).
    pub absurd: u64,
    /// Counters that went down since the previous scrape; that rate was skipped.
    pub counter_resets: u64,
    /// Extra copies of a series already in the document; the family was not used.
    pub duplicate_series: u64,
    /// Fields whose series were not in the document.
    pub missing_series: u64,
    /// Lines that do not follow the text format.
    pub bad_lines: u64,
    /// Responses over the byte limit.
    pub oversize: u64,
    /// Scrapes that did not finish within the timeout.
    pub timeouts: u64,
    /// Responses that were not UTF-8.
    pub non_utf8: u64,
}

/// Why a scrape or a probe failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// The URL is not `http://host[:port][/path]`.
    #[error("bad URL {url:?}: {reason}")]
    BadUrl { url: String, reason: &'static str },
    /// A configured metric selector is not `name` or `name{label="value",...}`.
    #[error("bad {what} selector {selector:?}: expected name or name{{label=\"value\",...}}")]
    BadSelector {
        what: &'static str,
        selector: String,
    },
    /// The host name did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    /// The TCP connection was refused or failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing failed after connecting.
    #[error("I/O error: {source}")]
    Io {
        #[source]
        source: std::io::Error,
    },
    /// The whole exchange took longer than the timeout.
    #[error("no complete response within {after:?}")]
    Timeout { after: Duration },
    /// The answer is not HTTP/1.x as this client understands it.
    #[error("bad HTTP response: {reason}")]
    BadResponse { reason: String },
    /// The server answered with a status other than 2xx.
    #[error("HTTP status {status}")]
    HttpStatus { status: u16 },
    /// The body is longer than the limit; the rest was not read.
    #[error("response body over {limit} bytes")]
    Oversize { limit: usize },
    /// The body is not UTF-8.
    #[error("response body is not UTF-8 (first bad byte at offset {valid_up_to})")]
    NotUtf8 { valid_up_to: usize },
}
