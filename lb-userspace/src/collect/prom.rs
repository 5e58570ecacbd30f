//! [`Scraper`]: one backend's Prometheus endpoint, scraped once per interval and turned
//! into a [`BackendSample`].
//!
//! Gauges (memory, the in-flight gauge) come from one scrape. Everything else is a rate
//! and needs two: the first scrape after [`Scraper::new`] gives gauges only. The
//! interval of a rate is the time between the arrivals of the two responses' heads
//! (an exporter gathers its numbers before it starts answering). After a failed scrape
//! the next rate spans the time since the last successful one, which is still a true
//! rate, only over a longer window.
//!
//! Node-exporter's series ([`NODE_CPU`], [`NODE_MEM_AVAILABLE`], ...) are always looked
//! for; the application's are named in [`ScrapeConfig`] as selectors, `name` or
//! `name{label="value",...}`, and a selector that matches several series is summed over
//! them (for example a latency histogram per handler).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::http::{self, HttpUrl};
use super::text::{Exposition, Labels, Lookup, MetricType, Selector};
use super::{BackendSample, CollectError, Rejects};

/// CPU seconds by `cpu` and `mode`.
pub const NODE_CPU: &str = "node_cpu_seconds_total";
/// Bytes of memory available without swapping.
pub const NODE_MEM_AVAILABLE: &str = "node_memory_MemAvailable_bytes";
/// Bytes of memory in all.
pub const NODE_MEM_TOTAL: &str = "node_memory_MemTotal_bytes";
/// Seconds each `device` spent doing I/O.
pub const NODE_DISK_IO_TIME: &str = "node_disk_io_time_seconds_total";
/// Bytes received by each `device`.
pub const NODE_NET_RX: &str = "node_network_receive_bytes_total";
/// Bytes transmitted by each `device`.
pub const NODE_NET_TX: &str = "node_network_transmit_bytes_total";

/// Utilisations may overshoot 1 this much (timing jitter) before they are absurd;
/// up to it they are clamped to 0..=1.
pub const UTILISATION_SLACK: f64 = 0.05;
/// Mean latencies above this are absurd.
pub const MAX_LATENCY_S: f64 = 3600.0;
/// Network rates above this (8 Tbit/s) are absurd for one backend.
pub const MAX_BYTES_PER_S: f64 = 1e12;
/// Request rates above this are absurd for one backend.
pub const MAX_REQUESTS_PER_S: f64 = 1e9;
/// In-flight gauges above this are absurd.
pub const MAX_IN_FLIGHT: f64 = 1e9;

/// Two scrapes closer than this give no rates.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// What the scraper asks for.
const ACCEPT: &str = "text/plain;version=0.0.4";

/// Where and how to scrape one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrapeConfig {
    /// `http://host:port/path`; plain HTTP only.
    pub url: String,
    /// Bounds the whole exchange: resolving, connecting, sending and reading.
    pub timeout: Duration,
    /// The most body bytes accepted; a longer response fails the scrape.
    pub max_bytes: usize,
    /// A gauge of requests in progress, e.g. `http_requests_in_flight`.
    pub in_flight: Option<String>,
    /// A histogram or summary of request latency in seconds, by its base name: its
    /// `_sum` and `_count` are used.
    pub latency: Option<String>,
    /// A counter of requests, or a histogram or summary (its `_count` is used). When
    /// unset, the latency histogram's `_count` is used.
    pub requests: Option<String>,
    /// A counter of failed requests (summed over the series it selects).
    pub errors: Option<String>,
}

impl ScrapeConfig {
    /// The default timeout, 1 s.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
    /// The default body limit, 1 MiB.
    pub const DEFAULT_MAX_BYTES: usize = 1024 * 1024;

    /// A configuration with the default limits and no application metrics.
    pub fn new(url: impl Into<String>) -> ScrapeConfig {
        ScrapeConfig {
            url: url.into(),
            timeout: Self::DEFAULT_TIMEOUT,
            max_bytes: Self::DEFAULT_MAX_BYTES,
            in_flight: None,
            latency: None,
            requests: None,
            errors: None,
        }
    }
}

type SeriesMap = BTreeMap<Labels, f64>;

/// Why a field has no value this time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Skip {
    /// Not in the document: counted in `missing_series`.
    Missing,
    /// Sent twice: already counted in `duplicate_series` while parsing.
    Duplicated,
    /// A NaN, infinite or negative value: already counted per series.
    Invalid,
    /// A counter went down: counted in `counter_resets`.
    Reset,
    /// Outside its possible range: counted in `absurd`.
    Absurd,
    /// Nothing to report and nothing wrong (first scrape, no requests, ...).
    NoData,
}

type Field<T> = Result<T, Skip>;

/// The counters of one scrape that the next one needs for rates.
#[derive(Clone, Debug)]
struct Counters {
    /// When the response head arrived.
    at: Instant,
    cpu: Field<SeriesMap>,
    disk: Field<SeriesMap>,
    /// Receive and transmit series together, told apart by a `__direction` label.
    net: Field<SeriesMap>,
    latency: Field<(SeriesMap, SeriesMap)>,
    requests: Field<SeriesMap>,
    errors: Field<SeriesMap>,
}

/// Scrapes one backend and keeps the previous counters for rates.
#[derive(Debug)]
pub struct Scraper {
    cfg: ScrapeConfig,
    url: HttpUrl,
    in_flight: Option<Selector>,
    latency: Option<Selector>,
    requests: Option<Selector>,
    errors: Option<Selector>,
    prev: Option<Counters>,
    rejects: Rejects,
}

impl Scraper {
    /// Checks the configuration: the URL and the selectors must parse.
    pub fn new(cfg: ScrapeConfig) -> Result<Scraper, CollectError> {
        let url = HttpUrl::parse(&cfg.url)?;
        let selector = |what: &'static str, s: &Option<String>| match s {
            None => Ok(None),
            Some(s) => Selector::parse(s)
                .map(Some)
                .ok_or_else(|| CollectError::BadSelector {
                    what,
                    selector: s.clone(),
                }),
        };
        Ok(Scraper {
            in_flight: selector("in_flight", &cfg.in_flight)?,
            latency: selector("latency", &cfg.latency)?,
            requests: selector("requests", &cfg.requests)?,
            errors: selector("errors", &cfg.errors)?,
            url,
            cfg,
            prev: None,
            rejects: Rejects::default(),
        })
    }

    /// The configuration this scraper was made with.
    pub fn config(&self) -> &ScrapeConfig {
        &self.cfg
    }

    /// Everything ignored so far, by reason.
    pub fn rejects(&self) -> &Rejects {
        &self.rejects
    }

    /// Fetches the endpoint once, within the timeout, and returns this interval's
    /// readings. A timeout, a transport or HTTP error, an oversize or non-UTF-8 body
    /// fails the whole scrape (the first three of those are also counted in
    /// [`Rejects`]); problems with single values only leave their fields out.
    pub async fn scrape(&mut self) -> Result<BackendSample, CollectError> {
        let fetch = http::get(&self.url, self.cfg.max_bytes, ACCEPT);
        let response = match tokio::time::timeout(self.cfg.timeout, fetch).await {
            Err(_) => {
                self.rejects.timeouts += 1;
                return Err(CollectError::Timeout {
                    after: self.cfg.timeout,
                });
            }
            Ok(Err(e)) => {
                if matches!(e, CollectError::Oversize { .. }) {
                    self.rejects.oversize += 1;
                }
                return Err(e);
            }
            Ok(Ok(response)) => response,
        };
        if !(200..300).contains(&response.status) {
            return Err(CollectError::HttpStatus {
                status: response.status,
            });
        }
        let text = match String::from_utf8(response.body) {
            Ok(text) => text,
            Err(e) => {
                self.rejects.non_utf8 += 1;
                return Err(CollectError::NotUtf8 {
                    valid_up_to: e.utf8_error().valid_up_to(),
                });
            }
        };
        Ok(self.ingest(&text, response.head_at))
    }

    /// Turns one exposition document, produced at `at`, into readings, against the
    /// counters of the previous document. [`Scraper::scrape`] uses it; it is public
    /// for documents that arrive some other way.
    pub fn ingest(&mut self, text: &str, at: Instant) -> BackendSample {
        let expo = Exposition::parse(text);
        self.rejects.bad_lines += expo.bad_lines;
        self.rejects.duplicate_series += expo.duplicates;

        let cur = Counters {
            at,
            cpu: self.gather(&expo, NODE_CPU, |_| true),
            disk: self.gather(&expo, NODE_DISK_IO_TIME, |_| true),
            net: self.gather_net(&expo),
            latency: match self.latency.clone() {
                None => Err(Skip::NoData),
                Some(sel) => {
                    let sum =
                        self.gather_selected(&expo, &sel.with_name(format!("{}_sum", sel.name)));
                    let count =
                        self.gather_selected(&expo, &sel.with_name(format!("{}_count", sel.name)));
                    sum.and_then(|s| count.map(|c| (s, c)))
                }
            },
            requests: match self.requests_selector(&expo) {
                None => Err(Skip::NoData),
                Some(sel) => self.gather_selected(&expo, &sel),
            },
            errors: match self.errors.clone() {
                None => Err(Skip::NoData),
                Some(sel) => self.gather_selected(&expo, &sel),
            },
        };

        let memory = self.memory(&expo);
        let in_flight = match self.in_flight.clone() {
            None => Err(Skip::NoData),
            Some(sel) => self.gather_selected(&expo, &sel).and_then(|m| {
                let v: f64 = m.values().sum();
                if v > MAX_IN_FLIGHT {
                    Err(Skip::Absurd)
                } else {
                    Ok(v)
                }
            }),
        };

        // Rates: only against a previous scrape, and only fields present in both.
        let prev = self
            .prev
            .as_ref()
            .filter(|p| at.saturating_duration_since(p.at) >= MIN_INTERVAL);
        let (cpu, disk_busy, net, latency, requests, errors) = match prev {
            // Problems of the current scrape are reported even without a previous one.
            None => (
                without_rate(&cur.cpu),
                without_rate(&cur.disk),
                without_rate(&cur.net),
                without_rate(&cur.latency),
                without_rate(&cur.requests),
                without_rate(&cur.errors),
            ),
            Some(prev) => {
                let dt = at.saturating_duration_since(prev.at).as_secs_f64();
                (
                    both(&prev.cpu, &cur.cpu).and_then(|(p, c)| cpu_busy(p, c)),
                    both(&prev.disk, &cur.disk).and_then(|(p, c)| disk_busy_of(p, c, dt)),
                    both(&prev.net, &cur.net)
                        .and_then(|(p, c)| at_most(sum_of_increases(p, c)? / dt, MAX_BYTES_PER_S)),
                    both(&prev.latency, &cur.latency)
                        .and_then(|((ps, pc), (cs, cc))| mean_latency(ps, pc, cs, cc)),
                    both(&prev.requests, &cur.requests).and_then(|(p, c)| {
                        at_most(sum_of_increases(p, c)? / dt, MAX_REQUESTS_PER_S)
                    }),
                    both(&prev.errors, &cur.errors).and_then(|(p, c)| {
                        at_most(sum_of_increases(p, c)? / dt, MAX_REQUESTS_PER_S)
                    }),
                )
            }
        };

        let sample = BackendSample {
            cpu: self.settle(cpu),
            memory: self.settle(memory),
            disk_busy: self.settle(disk_busy),
            net_bytes_per_s: self.settle(net),
            in_flight: self.settle(in_flight),
            latency_s: self.settle(latency),
            requests_per_s: self.settle(requests),
            errors_per_s: self.settle(errors),
        };
        self.prev = Some(cur);
        sample
    }

    /// Counts why a field has no value, once, and gives the value if there is one.
    fn settle(&mut self, field: Field<f64>) -> Option<f64> {
        match field {
            Ok(v) => Some(v),
            Err(Skip::Missing) => {
                self.rejects.missing_series += 1;
                None
            }
            Err(Skip::Reset) => {
                self.rejects.counter_resets += 1;
                None
            }
            Err(Skip::Absurd) => {
                self.rejects.absurd += 1;
                None
            }
            Err(Skip::Duplicated | Skip::Invalid | Skip::NoData) => None,
        }
    }

    /// The series of `name` that pass `keep`, every value checked; NaN, infinite and
    /// negative values are counted one by one and make the whole field invalid.
    fn gather(
        &mut self,
        expo: &Exposition,
        name: &str,
        keep: impl Fn(&Labels) -> bool,
    ) -> Field<SeriesMap> {
        let series = match expo.lookup(name) {
            Lookup::Missing => return Err(Skip::Missing),
            Lookup::Duplicated => return Err(Skip::Duplicated),
            Lookup::Found(series) => series,
        };
        let mut out = SeriesMap::new();
        let mut invalid = false;
        for (labels, &value) in series.iter().filter(|(l, _)| keep(l)) {
            if !value.is_finite() {
                self.rejects.nan_or_infinite += 1;
                invalid = true;
            } else if value < 0.0 {
                self.rejects.negative += 1;
                invalid = true;
            } else {
                out.insert(labels.clone(), value);
            }
        }
        if invalid {
            Err(Skip::Invalid)
        } else if out.is_empty() {
            Err(Skip::Missing)
        } else {
            Ok(out)
        }
    }

    fn gather_selected(&mut self, expo: &Exposition, sel: &Selector) -> Field<SeriesMap> {
        self.gather(expo, &sel.name, |l| sel.matches(l))
    }

    /// Receive and transmit bytes of every device but `lo`, in one map.
    fn gather_net(&mut self, expo: &Exposition) -> Field<SeriesMap> {
        let not_lo = |l: &Labels| l.get("device") != Some("lo");
        let rx = self.gather(expo, NODE_NET_RX, not_lo);
        let tx = self.gather(expo, NODE_NET_TX, not_lo);
        let (rx, tx) = (rx?, tx?);
        let tag = |dir: &'static str, map: SeriesMap| {
            map.into_iter().filter_map(move |(labels, v)| {
                let mut pairs = labels.pairs().to_vec();
                pairs.push(("__direction".to_owned(), dir.to_owned()));
                Labels::new(pairs).map(|l| (l, v))
            })
        };
        Ok(tag("rx", rx).chain(tag("tx", tx)).collect())
    }

    /// Where the request count comes from: the `requests` selector as a counter, or
    /// the `_count` of the histogram or summary it names, or of the latency one.
    fn requests_selector(&self, expo: &Exposition) -> Option<Selector> {
        let count_of = |sel: &Selector| sel.with_name(format!("{}_count", sel.name));
        match (&self.requests, &self.latency) {
            (Some(sel), _) => {
                let aggregate = matches!(
                    expo.declared_type(&sel.name),
                    Some(MetricType::Histogram | MetricType::Summary)
                );
                if aggregate || expo.lookup(&sel.name) == Lookup::Missing {
                    Some(count_of(sel))
                } else {
                    Some(sel.clone())
                }
            }
            (None, Some(latency)) => Some(count_of(latency)),
            (None, None) => None,
        }
    }

    fn memory(&mut self, expo: &Exposition) -> Field<f64> {
        let available = self.gather(expo, NODE_MEM_AVAILABLE, |_| true);
        let total = self.gather(expo, NODE_MEM_TOTAL, |_| true);
        let (available, total) = (single(available?)?, single(total?)?);
        if total <= 0.0 {
            return Err(Skip::Absurd);
        }
        unit(1.0 - available / total)
    }
}

/// The one value of an unlabelled family; more than one series is absurd.
fn single(map: SeriesMap) -> Field<f64> {
    match map.len() {
        1 => Ok(*map.values().next().expect("one value")),
        _ => Err(Skip::Absurd),
    }
}

/// A rate field on a scrape with no usable previous one: the current problem, if any.
fn without_rate<T>(cur: &Field<T>) -> Field<f64> {
    match cur {
        Err(skip) => Err(*skip),
        Ok(_) => Err(Skip::NoData),
    }
}

/// The mean latency of the requests completed in the interval.
fn mean_latency(
    prev_sum: &SeriesMap,
    prev_count: &SeriesMap,
    sum: &SeriesMap,
    count: &SeriesMap,
) -> Field<f64> {
    let sum = sum_of_increases(prev_sum, sum);
    let count = sum_of_increases(prev_count, count);
    let (sum, count) = (sum?, count?);
    if count <= 0.0 {
        return Err(Skip::NoData);
    }
    at_most(sum / count, MAX_LATENCY_S)
}

/// Both scrapes' values of a field, or why not: the current scrape's problem first.
fn both<'a, T>(prev: &'a Field<T>, cur: &'a Field<T>) -> Field<(&'a T, &'a T)> {
    match (prev, cur) {
        (_, Err(skip)) => Err(*skip),
        (Err(_), Ok(_)) => Err(Skip::NoData),
        (Ok(p), Ok(c)) => Ok((p, c)),
    }
}

/// The increase of each series present in both scrapes; a counter that went down
/// makes the whole field a reset. No common series at all is no data.
fn increases<'a>(prev: &SeriesMap, cur: &'a SeriesMap) -> Field<Vec<(&'a Labels, f64)>> {
    let mut out = Vec::new();
    for (labels, &now) in cur {
        if let Some(&before) = prev.get(labels) {
            if now < before {
                return Err(Skip::Reset);
            }
            out.push((labels, now - before));
        }
    }
    if out.is_empty() {
        Err(Skip::NoData)
    } else {
        Ok(out)
    }
}

fn sum_of_increases(prev: &SeriesMap, cur: &SeriesMap) -> Field<f64> {
    Ok(increases(prev, cur)?.iter().map(|(_, d)| d).sum())
}

/// The non-idle share of CPU time over all CPUs.
fn cpu_busy(prev: &SeriesMap, cur: &SeriesMap) -> Field<f64> {
    let incs = increases(prev, cur)?;
    if !incs.iter().any(|(l, _)| l.get("mode") == Some("idle")) {
        return Err(Skip::Missing);
    }
    let total: f64 = incs.iter().map(|(_, d)| d).sum();
    let idle: f64 = incs
        .iter()
        .filter(|(l, _)| l.get("mode") == Some("idle"))
        .map(|(_, d)| d)
        .sum();
    if total <= 0.0 {
        // The counters did not move (an exporter caching its numbers).
        return Err(Skip::NoData);
    }
    unit((total - idle) / total)
}

/// The busiest device's share of time doing I/O.
fn disk_busy_of(prev: &SeriesMap, cur: &SeriesMap, dt: f64) -> Field<f64> {
    let busiest = increases(prev, cur)?
        .iter()
        .map(|(_, d)| d / dt)
        .fold(0.0, f64::max);
    unit(busiest)
}

/// A utilisation: within the slack of 0..=1 it is clamped, beyond it absurd.
fn unit(x: f64) -> Field<f64> {
    if (-UTILISATION_SLACK..=1.0 + UTILISATION_SLACK).contains(&x) {
        Ok(x.clamp(0.0, 1.0))
    } else {
        Err(Skip::Absurd)
    }
}

fn at_most(x: f64, max: f64) -> Field<f64> {
    if x.is_finite() && x <= max {
        Ok(x)
    } else {
        Err(Skip::Absurd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node-exporter 1.5 answer as it looks on a two-CPU machine, trimmed, with an
    /// application's histogram and summary appended.
    const NODE_1: &str = r#"# HELP go_gc_duration_seconds A summary of the pause duration of garbage collection cycles.
# TYPE go_gc_duration_seconds summary
go_gc_duration_seconds{quantile="0"} 2.1e-05
go_gc_duration_seconds{quantile="0.25"} 3.4e-05
go_gc_duration_seconds{quantile="1"} 0.000187
go_gc_duration_seconds_sum 0.001023
go_gc_duration_seconds_count 17
# HELP node_cpu_seconds_total Seconds the CPUs spent in each mode.
# TYPE node_cpu_seconds_total counter
node_cpu_seconds_total{cpu="0",mode="idle"} 472.47
node_cpu_seconds_total{cpu="0",mode="iowait"} 3.37
node_cpu_seconds_total{cpu="0",mode="irq"} 0
node_cpu_seconds_total{cpu="0",mode="nice"} 0
node_cpu_seconds_total{cpu="0",mode="softirq"} 1.94
node_cpu_seconds_total{cpu="0",mode="steal"} 2.19
node_cpu_seconds_total{cpu="0",mode="system"} 215.17
node_cpu_seconds_total{cpu="0",mode="user"} 2022.6
node_cpu_seconds_total{cpu="1",mode="idle"} 443.28
node_cpu_seconds_total{cpu="1",mode="iowait"} 1.84
node_cpu_seconds_total{cpu="1",mode="irq"} 0
node_cpu_seconds_total{cpu="1",mode="nice"} 0
node_cpu_seconds_total{cpu="1",mode="softirq"} 2.06
node_cpu_seconds_total{cpu="1",mode="steal"} 2.67
node_cpu_seconds_total{cpu="1",mode="system"} 214.04
node_cpu_seconds_total{cpu="1",mode="user"} 2054.1
# HELP node_disk_io_time_seconds_total Total seconds spent doing I/Os.
# TYPE node_disk_io_time_seconds_total counter
node_disk_io_time_seconds_total{device="vda"} 24.612000000000002
node_disk_io_time_seconds_total{device="zram0"} 0
# HELP node_memory_MemAvailable_bytes Memory information field MemAvailable_bytes.
# TYPE node_memory_MemAvailable_bytes gauge
node_memory_MemAvailable_bytes 2.373840896e+10
# HELP node_memory_MemTotal_bytes Memory information field MemTotal_bytes.
# TYPE node_memory_MemTotal_bytes gauge
node_memory_MemTotal_bytes 2.5276510208e+10
# HELP node_network_receive_bytes_total Network device statistic receive_bytes.
# TYPE node_network_receive_bytes_total counter
node_network_receive_bytes_total{device="eth0"} 1.2345e+06
node_network_receive_bytes_total{device="lo"} 9.9e+09
# HELP node_network_transmit_bytes_total Network device statistic transmit_bytes.
# TYPE node_network_transmit_bytes_total counter
node_network_transmit_bytes_total{device="eth0"} 654321
node_network_transmit_bytes_total{device="lo"} 9.9e+09
# HELP node_os_info A metric with a constant '1' value labeled by os information.
# TYPE node_os_info gauge
node_os_info{build_id="",id="debian",name="Debian GNU/Linux",pretty_name="Debian GNU/Linux 12 (bookworm)",version="12 (bookworm)",version_codename="bookworm",version_id="12"} 1
# HELP node_scrape_collector_success node_exporter: Whether a collector succeeded.
# TYPE node_scrape_collector_success gauge
node_scrape_collector_success{collector="cpu"} 1
node_scrape_collector_success{collector="dmi"} 0
# HELP app_requests_in_flight Requests being served.
# TYPE app_requests_in_flight gauge
app_requests_in_flight{handler="/a"} 3
app_requests_in_flight{handler="/b"} 4
# HELP app_request_seconds Request latency.
# TYPE app_request_seconds histogram
app_request_seconds_bucket{handler="/a",le="0.1"} 90
app_request_seconds_bucket{handler="/a",le="+Inf"} 100
app_request_seconds_sum{handler="/a"} 5
app_request_seconds_count{handler="/a"} 100
app_request_seconds_bucket{handler="/b",le="0.1"} 0
app_request_seconds_bucket{handler="/b",le="+Inf"} 10
app_request_seconds_sum{handler="/b"} 3
app_request_seconds_count{handler="/b"} 10
# HELP app_rpc_seconds RPC latency.
# TYPE app_rpc_seconds summary
app_rpc_seconds{quantile="0.5"} 0.2
app_rpc_seconds{quantile="0.99"} 0.9
app_rpc_seconds_sum 40
app_rpc_seconds_count 200
# HELP app_errors_total Requests answered with a 5xx status.
# TYPE app_errors_total counter
app_errors_total{handler="/a"} 7
app_errors_total{handler="/b"} 1
"#;

    /// Two seconds later: CPU 0 busy 50% and CPU 1 25% (idle 1 s of 2 and 1.5 of 2),
    /// vda busy 0.6 s, eth0 3000 B in + 1000 B out, /a 10 requests taking 1.5 s and
    /// /b 10 taking 0.5 s, RPCs 50 taking 25 s.
    fn node_2() -> String {
        NODE_1
            .replace(
                "{cpu=\"0\",mode=\"idle\"} 472.47",
                "{cpu=\"0\",mode=\"idle\"} 473.47",
            )
            .replace(
                "{cpu=\"0\",mode=\"user\"} 2022.6",
                "{cpu=\"0\",mode=\"user\"} 2023.6",
            )
            .replace(
                "{cpu=\"1\",mode=\"idle\"} 443.28",
                "{cpu=\"1\",mode=\"idle\"} 444.78",
            )
            .replace(
                "{cpu=\"1\",mode=\"system\"} 214.04",
                "{cpu=\"1\",mode=\"system\"} 214.54",
            )
            .replace(
                "{device=\"vda\"} 24.612000000000002",
                "{device=\"vda\"} 25.212",
            )
            .replace(
                "receive_bytes_total{device=\"eth0\"} 1.2345e+06",
                "receive_bytes_total{device=\"eth0\"} 1.2375e+06",
            )
            .replace(
                "transmit_bytes_total{device=\"eth0\"} 654321",
                "transmit_bytes_total{device=\"eth0\"} 655321",
            )
            .replace("lo\"} 9.9e+09", "lo\"} 9.99e+09")
            .replace("sum{handler=\"/a\"} 5", "sum{handler=\"/a\"} 6.5")
            .replace("count{handler=\"/a\"} 100", "count{handler=\"/a\"} 110")
            .replace("sum{handler=\"/b\"} 3", "sum{handler=\"/b\"} 3.5")
            .replace("count{handler=\"/b\"} 10", "count{handler=\"/b\"} 20")
            .replace("app_rpc_seconds_sum 40", "app_rpc_seconds_sum 65")
            .replace("app_rpc_seconds_count 200", "app_rpc_seconds_count 250")
            .replace(
                "errors_total{handler=\"/a\"} 7",
                "errors_total{handler=\"/a\"} 10",
            )
            .replace(
                "errors_total{handler=\"/b\"} 1",
                "errors_total{handler=\"/b\"} 2",
            )
    }

    fn scraper(latency: Option<&str>, requests: Option<&str>) -> Scraper {
        let mut cfg = ScrapeConfig::new("http://198.18.0.2:9100/metrics");
        cfg.in_flight = Some("app_requests_in_flight".into());
        cfg.latency = latency.map(Into::into);
        cfg.requests = requests.map(Into::into);
        cfg.errors = Some("app_errors_total".into());
        Scraper::new(cfg).unwrap()
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn first_scrape_gives_gauges_only() {
        let mut s = scraper(Some("app_request_seconds"), None);
        let t0 = Instant::now();
        let first = s.ingest(NODE_1, t0);
        assert!(
            close(first.memory, 1.0 - 2.373840896e10 / 2.5276510208e10),
            "{first:?}"
        );
        assert_eq!(first.in_flight, Some(7.0));
        assert_eq!(
            (
                first.cpu,
                first.disk_busy,
                first.net_bytes_per_s,
                first.latency_s,
                first.requests_per_s
            ),
            (None, None, None, None, None)
        );
        assert_eq!(s.rejects(), &Rejects::default());
    }

    #[test]
    fn rates_across_two_samples_histogram() {
        let mut s = scraper(Some("app_request_seconds"), None);
        let t0 = Instant::now();
        s.ingest(NODE_1, t0);
        let second = s.ingest(&node_2(), t0 + Duration::from_secs(2));
        // CPU: 4 s of CPU time in all, 2.5 s of it idle.
        assert!(close(second.cpu, 1.5 / 4.0), "{second:?}");
        assert!(close(second.disk_busy, 0.3), "{second:?}");
        // lo's huge traffic is left out.
        assert!(close(second.net_bytes_per_s, 2000.0), "{second:?}");
        // 20 requests, 2 s in all, over 2 s.
        assert!(close(second.latency_s, 0.1), "{second:?}");
        assert!(close(second.requests_per_s, 10.0), "{second:?}");
        // 3 + 1 errors over 2 s, summed over the series.
        assert!(close(second.errors_per_s, 2.0), "{second:?}");
        assert_eq!(second.in_flight, Some(7.0));
        assert_eq!(s.rejects(), &Rejects::default());
    }

    #[test]
    fn summary_latency_and_selectors() {
        let mut s = scraper(
            Some("app_rpc_seconds"),
            Some("app_request_seconds{handler=\"/b\"}"),
        );
        let t0 = Instant::now();
        s.ingest(NODE_1, t0);
        let second = s.ingest(&node_2(), t0 + Duration::from_secs(2));
        assert!(close(second.latency_s, 0.5), "{second:?}");
        // The histogram's _count, only handler /b: 10 requests in 2 s.
        assert!(close(second.requests_per_s, 5.0), "{second:?}");
        // A plain counter as the request count.
        let mut s = scraper(None, Some("node_cpu_seconds_total{mode=\"user\"}"));
        s.ingest(NODE_1, t0);
        let second = s.ingest(&node_2(), t0 + Duration::from_secs(2));
        assert!(close(second.requests_per_s, 0.5), "{second:?}");
        assert_eq!(second.latency_s, None);
        assert_eq!(s.rejects(), &Rejects::default());
    }

    #[test]
    fn no_requests_means_no_latency_not_zero() {
        let mut s = scraper(Some("app_request_seconds"), None);
        let t0 = Instant::now();
        s.ingest(NODE_1, t0);
        let second = s.ingest(NODE_1, t0 + Duration::from_secs(1));
        assert_eq!(second.latency_s, None);
        assert_eq!(second.requests_per_s, Some(0.0));
        assert_eq!(second.net_bytes_per_s, Some(0.0));
        // The CPU counters did not move: no share can be computed.
        assert_eq!(second.cpu, None);
        assert_eq!(s.rejects(), &Rejects::default());
    }

    #[test]
    fn counter_reset_skips_that_rate_once() {
        let mut s = scraper(Some("app_request_seconds"), None);
        let t0 = Instant::now();
        s.ingest(&node_2(), t0);
        // Everything went back: the exporter and the application restarted.
        let after_reset = s.ingest(NODE_1, t0 + Duration::from_secs(2));
        assert_eq!(after_reset.cpu, None);
        assert_eq!(after_reset.disk_busy, None);
        assert_eq!(after_reset.net_bytes_per_s, None);
        assert_eq!(after_reset.latency_s, None);
        assert_eq!(after_reset.requests_per_s, None);
        assert_eq!(after_reset.errors_per_s, None);
        assert!(after_reset.memory.is_some());
        assert_eq!(s.rejects().counter_resets, 6);
        // The next interval has rates again, from the values after the reset.
        let next = s.ingest(&node_2(), t0 + Duration::from_secs(4));
        assert!(close(next.cpu, 1.5 / 4.0), "{next:?}");
        assert!(close(next.latency_s, 0.1), "{next:?}");
        assert!(close(next.errors_per_s, 2.0), "{next:?}");
        assert_eq!(s.rejects().counter_resets, 6);
    }

    #[test]
    fn nan_inf_negative_are_rejected_and_counted() {
        let mut s = scraper(Some("app_request_seconds"), None);
        let t0 = Instant::now();
        s.ingest(NODE_1, t0);
        let bad = node_2()
            .replace(
                "node_memory_MemAvailable_bytes 2.373840896e+10",
                "node_memory_MemAvailable_bytes NaN",
            )
            .replace(
                "{cpu=\"1\",mode=\"nice\"} 0",
                "{cpu=\"1\",mode=\"nice\"} +Inf",
            )
            .replace("{device=\"zram0\"} 0", "{device=\"zram0\"} -Inf")
            .replace(
                "transmit_bytes_total{device=\"eth0\"} 655321",
                "transmit_bytes_total{device=\"eth0\"} -1",
            )
            .replace(
                "app_requests_in_flight{handler=\"/a\"} 3",
                "app_requests_in_flight{handler=\"/a\"} -3",
            )
            .replace("sum{handler=\"/b\"} 3.5", "sum{handler=\"/b\"} nan");
        let sample = s.ingest(&bad, t0 + Duration::from_secs(2));
        assert_eq!(sample.memory, None);
        assert_eq!(sample.cpu, None);
        assert_eq!(sample.disk_busy, None);
        assert_eq!(sample.net_bytes_per_s, None);
        assert_eq!(sample.in_flight, None);
        assert_eq!(sample.latency_s, None);
        // The request count itself was fine.
        assert!(close(sample.requests_per_s, 10.0), "{sample:?}");
        let r = s.rejects();
        assert_eq!((r.nan_or_infinite, r.negative), (4, 2), "{r:?}");
        assert_eq!(
            (r.missing_series, r.absurd, r.counter_resets),
            (0, 0, 0),
            "{r:?}"
        );
        // A rejected value breaks the rate of the next interval too, never a guess:
        // the rate needs two good readings.
        let next = s.ingest(&node_2(), t0 + Duration::from_secs(4));
        assert_eq!(next.cpu, None);
        assert!(next.memory.is_some());
    }

    #[test]
    fn absurd_results_are_rejected() {
        let t0 = Instant::now();
        // Disk busy 5 s in 2 s; a latency of two hours; MemAvailable above MemTotal.
        let mut s = scraper(Some("app_rpc_seconds"), None);
        s.ingest(NODE_1, t0);
        let absurd = node_2()
            .replace("{device=\"vda\"} 25.212", "{device=\"vda\"} 29.612")
            .replace("app_rpc_seconds_sum 65", "app_rpc_seconds_sum 360040")
            .replace(
                "node_memory_MemAvailable_bytes 2.373840896e+10",
                "node_memory_MemAvailable_bytes 3e+10",
            );
        let sample = s.ingest(&absurd, t0 + Duration::from_secs(2));
        assert_eq!(sample.disk_busy, None);
        assert_eq!(sample.latency_s, None);
        assert_eq!(sample.memory, None);
        assert!(sample.cpu.is_some());
        assert_eq!(s.rejects().absurd, 3);
        // MemTotal of zero.
        let zero = NODE_1.replace(
            "node_memory_MemTotal_bytes 2.5276510208e+10",
            "node_memory_MemTotal_bytes 0",
        );
        assert_eq!(s.ingest(&zero, t0 + Duration::from_secs(4)).memory, None);
        assert_eq!(s.rejects().absurd, 4);
        // Within the slack a utilisation is clamped: 2.05 s busy in 2 s.
        let mut s = scraper(None, None);
        s.ingest(NODE_1, t0);
        let slight = node_2().replace("{device=\"vda\"} 25.212", "{device=\"vda\"} 26.662");
        assert_eq!(
            s.ingest(&slight, t0 + Duration::from_secs(2)).disk_busy,
            Some(1.0)
        );
    }

    #[test]
    fn duplicates_and_missing_series() {
        let mut s = scraper(Some("app_request_seconds"), None);
        let t0 = Instant::now();
        s.ingest(NODE_1, t0);
        let dup = format!(
            "{}node_memory_MemTotal_bytes 1\nnode_cpu_seconds_total{{mode=\"idle\",cpu=\"0\"}} 1\n",
            node_2()
        );
        let sample = s.ingest(&dup, t0 + Duration::from_secs(2));
        assert_eq!(sample.memory, None);
        assert_eq!(sample.cpu, None);
        assert!(sample.disk_busy.is_some());
        assert_eq!(s.rejects().duplicate_series, 2);
        assert_eq!(s.rejects().missing_series, 0);

        // An application endpoint without node-exporter's series, and a latency
        // histogram that is not there.
        let mut s = scraper(Some("nope_seconds"), None);
        let app = "app_requests_in_flight 2\n";
        let first = s.ingest(app, t0);
        assert_eq!(
            first,
            BackendSample {
                in_flight: Some(2.0),
                ..BackendSample::default()
            }
        );
        // cpu, memory, disk, net, latency, requests (from the latency's _count) and
        // errors.
        assert_eq!(s.rejects().missing_series, 7);
        let second = s.ingest(app, t0 + Duration::from_secs(1));
        assert_eq!(second.in_flight, Some(2.0));
        assert_eq!(s.rejects().missing_series, 14);
        // Garbage: every line is bad, nothing is made up.
        let mut s = scraper(None, None);
        let sample = s.ingest("<html>\n<body>oops</body>\n</html>\n", t0);
        assert_eq!(sample, BackendSample::default());
        assert_eq!(s.rejects().bad_lines, 3);
    }

    #[test]
    fn series_that_come_and_go() {
        // A new CPU (hotplug) has no rate yet; the others still give one.
        let mut s = scraper(None, None);
        let t0 = Instant::now();
        let without_cpu1: String = NODE_1
            .lines()
            .filter(|l| !l.contains("cpu=\"1\""))
            .map(|l| format!("{l}\n"))
            .collect();
        s.ingest(&without_cpu1, t0);
        let sample = s.ingest(&node_2(), t0 + Duration::from_secs(2));
        assert!(close(sample.cpu, 0.5), "{sample:?}");
    }

    #[test]
    fn bad_configuration() {
        for url in ["https://x/", "ftp://x", "http://"] {
            assert!(matches!(
                Scraper::new(ScrapeConfig::new(url)),
                Err(CollectError::BadUrl { .. })
            ));
        }
        let mut cfg = ScrapeConfig::new("http://198.18.0.2/metrics");
        cfg.latency = Some("bad name".into());
        assert!(matches!(
            Scraper::new(cfg),
            Err(CollectError::BadSelector {
                what: "latency",
                ..
            })
        ));
    }
}
