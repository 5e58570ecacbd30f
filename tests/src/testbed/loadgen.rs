//! An open-loop load generator for the policy testbed.
//!
//! Arrivals form a Poisson process: the gaps between scheduled starts are drawn from
//! an exponential distribution with a seeded generator, at a rate that may change
//! over time (a function of the seconds since the start; the gap after an arrival at
//! `t` uses the rate at `t`). The schedule never waits for responses: a slow backend
//! makes requests pile up, as real users would, instead of slowing the arrivals down
//! and hiding the tail (the flaw of closed-loop tools). Every request opens a new TCP
//! connection, sends `GET / HTTP/1.0` and reads the response to the end.
//!
//! Latency is measured from the *scheduled* start, so that any lateness of the
//! generator itself counts against the result rather than disappearing; the actual
//! start is recorded too, so a generator that falls behind shows up.
//!
//! The generator runs a tokio current-thread runtime on one thread that has entered
//! the client namespace: sockets belong to the namespace of the thread that creates
//! them, and the worker threads of a multi-threaded runtime would not be in it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Rng;
use crate::netns::Netns;

/// Requests per second as a function of the seconds since the start.
pub type RateFn = Arc<dyn Fn(f64) -> f64 + Send + Sync>;

/// A constant rate.
pub fn constant(rate: f64) -> RateFn {
    Arc::new(move |_| rate)
}

/// What to send where, how fast and for how long.
#[derive(Clone)]
pub struct LoadSpec {
    /// Where every connection goes.
    pub target: SocketAddr,
    /// Requests per second over time.
    pub rate: RateFn,
    /// How long arrivals are scheduled for (responses may come later).
    pub duration: Duration,
    /// Seeds the arrival times: the same seed and rate give the same schedule.
    pub seed: u64,
    /// Bound on each request, from its actual start to the end of the response.
    pub timeout: Duration,
}

impl LoadSpec {
    /// `rate` requests per second to `target` for `duration`, seed 1, timeout 2 s.
    pub fn new(target: SocketAddr, rate: f64, duration: Duration) -> LoadSpec {
        LoadSpec {
            target,
            rate: constant(rate),
            duration,
            seed: 1,
            timeout: Duration::from_secs(2),
        }
    }
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    /// The connection was refused (RST to the SYN).
    Refused,
    /// The connection was reset after it was established.
    Reset,
    /// No complete response within the timeout (connect, write or read).
    Timeout,
    /// An HTTP status other than 200.
    Http(u16),
    /// The response was not HTTP as expected (e.g. closed before a status line).
    Protocol,
    /// Any other socket error.
    Io,
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorKind::Refused => f.write_str("refused"),
            ErrorKind::Reset => f.write_str("reset"),
            ErrorKind::Timeout => f.write_str("timeout"),
            ErrorKind::Http(code) => write!(f, "http_{code}"),
            ErrorKind::Protocol => f.write_str("protocol"),
            ErrorKind::Io => f.write_str("io"),
        }
    }
}

/// How one request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A 200 response from the named backend.
    Ok(String),
    /// A failure.
    Err(ErrorKind),
}

/// One request.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// When it was scheduled to start, since the generator's origin.
    pub scheduled: Duration,
    /// When it actually started (its task first ran), since the origin.
    pub started: Duration,
    /// From the scheduled start to the end of the response or the failure.
    pub latency: Duration,
    /// Which backend answered, or why it failed.
    pub outcome: Outcome,
}

impl Record {
    /// The backend that answered, if it succeeded.
    pub fn backend(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Ok(b) => Some(b),
            Outcome::Err(_) => None,
        }
    }

    /// How late the request started, against its schedule.
    pub fn lag(&self) -> Duration {
        self.started.saturating_sub(self.scheduled)
    }
}

/// Every request of a run, in scheduled order.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// The requests, sorted by scheduled start.
    pub records: Vec<Record>,
    /// How long arrivals were scheduled for.
    pub duration: Duration,
    /// From the origin to the end of the last response.
    pub wall: Duration,
}

impl LoadReport {
    /// How many requests were scheduled (and sent).
    pub fn total(&self) -> usize {
        self.records.len()
    }

    /// How many got a 200.
    pub fn ok(&self) -> usize {
        self.records
            .iter()
            .filter(|r| r.backend().is_some())
            .count()
    }

    /// How many failed.
    pub fn failed(&self) -> usize {
        self.total() - self.ok()
    }

    /// Failed / total (0 for no request).
    pub fn error_rate(&self) -> f64 {
        if self.records.is_empty() {
            0.0
        } else {
            self.failed() as f64 / self.total() as f64
        }
    }

    /// Failures by kind.
    pub fn errors(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for r in &self.records {
            if let Outcome::Err(kind) = r.outcome {
                *out.entry(kind.to_string()).or_insert(0) += 1;
            }
        }
        out
    }

    /// Successful requests by backend.
    pub fn per_backend(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for r in &self.records {
            if let Some(b) = r.backend() {
                *out.entry(b.to_owned()).or_insert(0) += 1;
            }
        }
        out
    }

    /// The latencies of the successful requests, seconds, ascending.
    pub fn ok_latencies(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self
            .records
            .iter()
            .filter(|r| r.backend().is_some())
            .map(|r| r.latency.as_secs_f64())
            .collect();
        v.sort_by(f64::total_cmp);
        v
    }

    /// The latency at quantile `q` of the successful requests, seconds.
    pub fn latency_quantile(&self, q: f64) -> Option<f64> {
        super::quantile_sorted(&self.ok_latencies(), q)
    }

    /// Scheduled requests per second.
    pub fn offered_rate(&self) -> f64 {
        self.total() as f64 / self.duration.as_secs_f64().max(1e-9)
    }

    /// The largest start lag, seconds.
    pub fn max_lag(&self) -> f64 {
        self.records
            .iter()
            .map(|r| r.lag().as_secs_f64())
            .fold(0.0, f64::max)
    }

    /// The mean start lag, seconds.
    pub fn mean_lag(&self) -> f64 {
        if self.records.is_empty() {
            return 0.0;
        }
        self.records
            .iter()
            .map(|r| r.lag().as_secs_f64())
            .sum::<f64>()
            / self.records.len() as f64
    }

    /// One line for messages.
    pub fn summary(&self) -> String {
        let q = |q| {
            self.latency_quantile(q)
                .map_or("-".to_owned(), |s| format!("{:.1}ms", s * 1e3))
        };
        format!(
            "{}/{} ok ({:.1} req/s offered), errors {:?}, p50 {} p99 {} p99.9 {}, \
             lag mean {:.2}ms max {:.1}ms, by backend {:?}",
            self.ok(),
            self.total(),
            self.offered_rate(),
            self.errors(),
            q(0.5),
            q(0.99),
            q(0.999),
            self.mean_lag() * 1e3,
            self.max_lag() * 1e3,
            self.per_backend()
        )
    }
}

/// A generator running in the background.
pub struct LoadGen {
    origin: Instant,
    issued: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<LoadReport>>>,
}

impl LoadGen {
    /// Starts sending from inside `ns`; the schedule starts at [`LoadGen::origin`], a
    /// few milliseconds from now.
    pub fn start(ns: &Netns, spec: LoadSpec) -> Result<LoadGen> {
        let origin = Instant::now() + Duration::from_millis(20);
        let issued = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let issued = Arc::clone(&issued);
            let stop = Arc::clone(&stop);
            ns.spawn_in(move || -> Result<LoadReport> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("cannot build a tokio runtime")?;
                Ok(runtime.block_on(generate(spec, origin, &issued, &stop)))
            })?
        };
        Ok(LoadGen {
            origin,
            issued,
            stop,
            thread: Some(thread),
        })
    }

    /// The instant scheduled times count from.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// How many requests have been started so far.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    /// Stops scheduling new requests (those in flight still finish).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Whether the schedule and every request have finished.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for the schedule and every request to finish.
    pub fn join(mut self) -> Result<LoadReport> {
        let thread = self.thread.take().expect("joined once");
        match thread.join() {
            Ok(report) => report,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for LoadGen {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs the load to the end from inside `ns` and returns every request.
pub fn run(ns: &Netns, spec: LoadSpec) -> Result<LoadReport> {
    LoadGen::start(ns, spec)?.join()
}

async fn generate(
    spec: LoadSpec,
    origin: Instant,
    issued: &AtomicU64,
    stop: &AtomicBool,
) -> LoadReport {
    let mut rng = Rng::new(spec.seed);
    let mut tasks = tokio::task::JoinSet::new();
    let mut records = Vec::new();
    let end = spec.duration.as_secs_f64();
    let mut t = 0.0f64;
    loop {
        let rate = (spec.rate)(t);
        if !(rate.is_finite() && rate > 0.0) {
            // No arrivals now: look again a little later.
            t += 0.001;
            if t >= end {
                break;
            }
            continue;
        }
        t += rng.exp1() / rate;
        if t >= end || stop.load(Ordering::Relaxed) {
            break;
        }
        let scheduled = Duration::from_secs_f64(t);
        let at = origin + scheduled;
        if at > Instant::now() {
            tokio::time::sleep_until(at.into()).await;
        }
        issued.fetch_add(1, Ordering::Relaxed);
        tasks.spawn(request(spec.target, origin, scheduled, spec.timeout));
        while let Some(done) = tasks.try_join_next() {
            if let Ok(record) = done {
                records.push(record);
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(record) = done {
            records.push(record);
        }
    }
    records.sort_by_key(|r| r.scheduled);
    LoadReport {
        records,
        duration: spec.duration,
        wall: origin.elapsed(),
    }
}

async fn request(
    target: SocketAddr,
    origin: Instant,
    scheduled: Duration,
    timeout: Duration,
) -> Record {
    let started_at = Instant::now();
    let started = started_at.saturating_duration_since(origin);
    let outcome = match tokio::time::timeout(timeout, exchange(target)).await {
        Ok(Ok(backend)) => Outcome::Ok(backend),
        Ok(Err(kind)) => Outcome::Err(kind),
        Err(_) => Outcome::Err(ErrorKind::Timeout),
    };
    let latency = Instant::now().saturating_duration_since(origin + scheduled);
    Record {
        scheduled,
        started,
        latency,
        outcome,
    }
}

fn io_kind(e: &std::io::Error) -> ErrorKind {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => ErrorKind::Refused,
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => ErrorKind::Reset,
        K::TimedOut | K::WouldBlock => ErrorKind::Timeout,
        _ => ErrorKind::Io,
    }
}

/// One request; the backend's name on a 200.
async fn exchange(target: SocketAddr) -> std::result::Result<String, ErrorKind> {
    let mut stream = TcpStream::connect(target).await.map_err(|e| io_kind(&e))?;
    let _ = stream.set_nodelay(true);
    let request = format!(
        "GET / HTTP/1.0\r\nHost: {}\r\nUser-Agent: lb-testbed\r\n\r\n",
        target.ip()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| io_kind(&e))?;
    let mut response = Vec::with_capacity(256);
    stream
        .read_to_end(&mut response)
        .await
        .map_err(|e| io_kind(&e))?;
    parse_response(&response)
}

/// The body of a `200` response, or why the response is not one.
pub fn parse_response(response: &[u8]) -> std::result::Result<String, ErrorKind> {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .or_else(|| text.split_once("\n\n"))
        .ok_or(ErrorKind::Protocol)?;
    let status_line = head.lines().next().ok_or(ErrorKind::Protocol)?;
    let mut parts = status_line.split_whitespace();
    let version = parts.next().ok_or(ErrorKind::Protocol)?;
    if !version.starts_with("HTTP/1.") {
        return Err(ErrorKind::Protocol);
    }
    let code: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or(ErrorKind::Protocol)?;
    if code != 200 {
        return Err(ErrorKind::Http(code));
    }
    Ok(body.trim().to_owned())
}

/// Per-second figures of a report: for each second `[i, i + 1)` of scheduled time,
/// the requests scheduled in it, how many failed, and the p50/p99 latency of those
/// that succeeded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SecondStats {
    /// Start of the second.
    pub t: f64,
    /// Requests scheduled in it.
    pub requests: usize,
    /// Of which failed.
    pub failed: usize,
    /// Median latency of the successful ones, seconds.
    pub p50: Option<f64>,
    /// 99th percentile, seconds.
    pub p99: Option<f64>,
}

impl LoadReport {
    /// The report cut into seconds of scheduled time.
    pub fn per_second(&self) -> Vec<SecondStats> {
        let n = self.duration.as_secs_f64().ceil() as usize;
        let mut bins: Vec<(usize, usize, Vec<f64>)> = vec![(0, 0, Vec::new()); n];
        for r in &self.records {
            let i = (r.scheduled.as_secs_f64() as usize).min(n.saturating_sub(1));
            let Some(bin) = bins.get_mut(i) else { continue };
            bin.0 += 1;
            if r.backend().is_some() {
                bin.2.push(r.latency.as_secs_f64());
            } else {
                bin.1 += 1;
            }
        }
        bins.into_iter()
            .enumerate()
            .map(|(i, (requests, failed, mut lat))| {
                lat.sort_by(f64::total_cmp);
                SecondStats {
                    t: i as f64,
                    requests,
                    failed,
                    p50: super::quantile_sorted(&lat, 0.5),
                    p99: super::quantile_sorted(&lat, 0.99),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse() {
        assert_eq!(
            parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\nbackend0"),
            Ok("backend0".to_owned())
        );
        assert_eq!(
            parse_response(b"HTTP/1.0 503 Service Unavailable\r\n\r\nx"),
            Err(ErrorKind::Http(503))
        );
        assert_eq!(parse_response(b""), Err(ErrorKind::Protocol));
        assert_eq!(parse_response(b"garbage\r\n\r\n"), Err(ErrorKind::Protocol));
    }
}
