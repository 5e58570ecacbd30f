//! An emulated backend for the policy testbed: a real TCP/HTTP server inside a
//! backend namespace whose capacity is set, not measured.
//!
//! A backend has `slots` concurrent requests, each held for `service_time × slowdown`;
//! more requests wait in a FIFO queue. Waiting and serving are sleeps, never CPU work
//! (the machine has two cores, shared with the load generator, the agent and the
//! kernel's datapath). The queue is kept in virtual time: when a request has been
//! read, it is given the slot that frees first, its service starts when that slot is
//! free (or now) and ends one service time later, and the response is written at
//! that end. Timer lateness therefore only delays a response a little and never
//! lowers the capacity, which stays exactly `slots / (service_time × slowdown)`
//! requests per second. A change of the slowdown applies to requests read after it.
//!
//! The protocol is HTTP/1.0: one request (a request line and headers, whatever they
//! say), one response `HTTP/1.0 200 OK` whose body is the backend's name, then close.
//!
//! One exception, for long-lived connections: a request for [`HOLD_PATH`]
//! (`GET /hold HTTP/1.0`) is answered with a head without a length and the backend's
//! name on a line; from then on every line the client sends is answered with the name
//! on a line, until the client closes (or sends nothing for [`HOLD_IDLE`]). A held
//! connection is not emulated load: it takes no slot and is in none of the request
//! metrics (in-flight, latency, codes) nor in `accepted`/`served`/`failed`; it is
//! counted in [`BackendCounts::holds`] and [`BackendCounts::held`] only. In fail-fast
//! mode a hold request is refused like any request (a 503, counted as one).
//!
//! A backend listens on:
//! - the VIP, port 80 (on the backend's `lo`, as direct server return needs): the
//!   application, with the capacity above;
//! - its own address, port 80 ([`PROBE_PORT`]): the health endpoint, answered at once
//!   and outside the slots (a cheap liveness check, like most real health endpoints);
//! - its own address, port 9100 ([`METRICS_PORT`]), `GET /metrics`: the Prometheus
//!   text of [`EmulatedBackend::exposition`];
//! - optionally more application addresses ([`Endpoints::app`]), e.g. its own address
//!   on another port so that tests can reach it without the load balancer.
//!
//! In "fail fast" mode the application answers every request at once with
//! `HTTP/1.0 503 Service Unavailable` and takes no slot, so its in-flight gauge, its
//! latency and its CPU all look idle while every request fails (scenario S5). The
//! health endpoint keeps answering 200 unless [`Controls::set_fail_probes`] says
//! otherwise: a shallow health check that does not see the failure.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::netns::Netns;

/// The port of the health endpoint on the backend's own address.
pub const PROBE_PORT: u16 = 80;
/// The port of the metrics endpoint on the backend's own address.
pub const METRICS_PORT: u16 = 9100;
/// The upper bounds of the latency histogram's buckets, seconds (`+Inf` follows).
pub const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// How long a connection may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The most bytes of request head read.
const MAX_REQUEST: usize = 8192;
/// The path of a long-lived request (see the module's documentation).
pub const HOLD_PATH: &str = "/hold";
/// How long a held connection may stay silent before the backend closes it.
pub const HOLD_IDLE: Duration = Duration::from_secs(60);

/// What a backend is: its name (the response body) and its capacity.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendSpec {
    /// The name it answers with, e.g. `backend0`.
    pub name: String,
    /// Requests served at the same time.
    pub slots: usize,
    /// How long one request holds a slot at slowdown 1.
    pub service_time: Duration,
}

impl BackendSpec {
    /// A backend called `name` with `slots` slots of `service_time` each.
    pub fn new(name: impl Into<String>, slots: usize, service_time: Duration) -> BackendSpec {
        BackendSpec {
            name: name.into(),
            slots,
            service_time,
        }
    }

    /// Requests per second it can serve at slowdown 1.
    pub fn capacity(&self) -> f64 {
        self.slots as f64 / self.service_time.as_secs_f64()
    }
}

/// Where a backend listens.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoints {
    /// Application listeners (the VIP first).
    pub app: Vec<SocketAddr>,
    /// The health endpoint.
    pub probe: Option<SocketAddr>,
    /// The metrics endpoint.
    pub metrics: Option<SocketAddr>,
}

impl Endpoints {
    /// The testbed's layout: the application on `vip`, health on `own`:80 and
    /// metrics on `own`:9100.
    pub fn standard(vip: SocketAddr, own: IpAddr) -> Endpoints {
        Endpoints {
            app: vec![vip],
            probe: Some(SocketAddr::new(own, PROBE_PORT)),
            metrics: Some(SocketAddr::new(own, METRICS_PORT)),
        }
    }
}

/// What the test changes while a backend runs; shared with the serving thread.
#[derive(Debug)]
pub struct Controls {
    slowdown_bits: AtomicU64,
    fail_fast: AtomicBool,
    fail_probes: AtomicBool,
}

impl Default for Controls {
    fn default() -> Controls {
        Controls {
            slowdown_bits: AtomicU64::new(1.0f64.to_bits()),
            fail_fast: AtomicBool::new(false),
            fail_probes: AtomicBool::new(false),
        }
    }
}

impl Controls {
    /// Sets the factor service times are multiplied by (1: nominal; 4: four times
    /// slower). Values below 0.01 or not finite are taken as 1.
    pub fn set_slowdown(&self, factor: f64) {
        let factor = if factor.is_finite() && factor >= 0.01 {
            factor
        } else {
            1.0
        };
        self.slowdown_bits.store(factor.to_bits(), Ordering::SeqCst);
    }

    /// The current slowdown factor.
    pub fn slowdown(&self) -> f64 {
        f64::from_bits(self.slowdown_bits.load(Ordering::SeqCst))
    }

    /// Turns "fail fast" on or off: every application request answered at once with
    /// 503, taking no slot.
    pub fn set_fail_fast(&self, on: bool) {
        self.fail_fast.store(on, Ordering::SeqCst);
    }

    /// Whether "fail fast" is on.
    pub fn fail_fast(&self) -> bool {
        self.fail_fast.load(Ordering::SeqCst)
    }

    /// Makes the health endpoint answer 503 as well while "fail fast" is on.
    pub fn set_fail_probes(&self, on: bool) {
        self.fail_probes.store(on, Ordering::SeqCst);
    }
}

/// A backend's counters, as the runner reads them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BackendCounts {
    /// Application connections accepted.
    pub accepted: u64,
    /// `200` responses written.
    pub served: u64,
    /// Application requests that did not get a `200` written: 503s in fail-fast mode,
    /// requests that never arrived in full, responses the client was gone for.
    pub failed: u64,
    /// Connections to the health endpoint.
    pub probes: u64,
    /// Requests to the metrics endpoint.
    pub scrapes: u64,
    /// Long-lived ([`HOLD_PATH`]) connections opened.
    pub holds: u64,
    /// Long-lived connections open now.
    pub held: u64,
    /// Requests queued or in service now.
    pub in_flight: u64,
    /// Slot-seconds spent serving so far (in-service requests count up to now).
    pub busy_slot_s: f64,
    /// Seconds since the backend started.
    pub uptime_s: f64,
}

/// The histogram, counters and queue, behind one lock.
#[derive(Debug)]
struct Inner {
    /// When each slot is free again (virtual time).
    free_at: Vec<Instant>,
    /// Requests queued or in service: id → (service start, service end).
    active: HashMap<u64, (Instant, Instant)>,
    next_id: u64,
    /// Slot-nanoseconds of finished services. Whole nanoseconds, so that the CPU
    /// counters derived from it never go down by a rounding error.
    busy_done_ns: u128,
    accepted: u64,
    served: u64,
    failed: u64,
    probes: u64,
    scrapes: u64,
    holds: u64,
    held: u64,
    codes: BTreeMap<u16, u64>,
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

#[derive(Debug)]
struct Shared {
    name: String,
    slots: usize,
    service_time: Duration,
    started: Instant,
    controls: Arc<Controls>,
    inner: Mutex<Inner>,
}

impl Shared {
    /// A backend of `spec` that starts at `now`, idle.
    fn new(spec: &BackendSpec, now: Instant) -> Shared {
        Shared {
            name: spec.name.clone(),
            slots: spec.slots,
            service_time: spec.service_time,
            started: now,
            controls: Arc::new(Controls::default()),
            inner: Mutex::new(Inner {
                free_at: vec![now; spec.slots],
                active: HashMap::new(),
                next_id: 0,
                busy_done_ns: 0,
                accepted: 0,
                served: 0,
                failed: 0,
                probes: 0,
                scrapes: 0,
                holds: 0,
                held: 0,
                codes: BTreeMap::new(),
                buckets: [0; BUCKETS.len()],
                sum: 0.0,
                count: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a request read at `now`: returns its id and when its service ends.
    fn reserve(&self, now: Instant) -> (u64, Instant) {
        let service = self.service_time.mul_f64(self.controls.slowdown());
        let mut inner = self.lock();
        let (slot, free) = inner
            .free_at
            .iter()
            .copied()
            .enumerate()
            .min_by_key(|&(_, t)| t)
            .expect("a backend has at least one slot");
        let start = free.max(now);
        let end = start + service;
        inner.free_at[slot] = end;
        let id = inner.next_id;
        inner.next_id += 1;
        inner.active.insert(id, (start, end));
        (id, end)
    }

    /// Ends request `id` (if it was queued) and records its response.
    fn finish(&self, id: Option<u64>, accepted_at: Instant, code: u16, written: bool) {
        let now = Instant::now();
        let elapsed = now.duration_since(accepted_at).as_secs_f64();
        let mut inner = self.lock();
        if let Some(id) = id
            && let Some((start, end)) = inner.active.remove(&id)
        {
            inner.busy_done_ns += end.duration_since(start).as_nanos();
        }
        *inner.codes.entry(code).or_insert(0) += 1;
        for (i, &le) in BUCKETS.iter().enumerate() {
            if elapsed <= le {
                inner.buckets[i] += 1;
            }
        }
        inner.sum += elapsed;
        inner.count += 1;
        if code == 200 && written {
            inner.served += 1;
        } else {
            inner.failed += 1;
        }
    }

    /// Slot-nanoseconds served and nanoseconds since the start, both at one instant
    /// read under the lock: busy time never decreases, and neither does
    /// `uptime × slots − busy` (each slot serves one request at a time).
    fn busy_ns(&self, inner: &Inner) -> (u128, u128) {
        let now = Instant::now();
        let ongoing: u128 = inner
            .active
            .values()
            .map(|&(start, end)| end.min(now).saturating_duration_since(start).as_nanos())
            .sum();
        (
            inner.busy_done_ns + ongoing,
            now.duration_since(self.started).as_nanos(),
        )
    }

    fn counts(&self) -> BackendCounts {
        let inner = self.lock();
        let (busy_ns, uptime_ns) = self.busy_ns(&inner);
        BackendCounts {
            accepted: inner.accepted,
            served: inner.served,
            failed: inner.failed,
            probes: inner.probes,
            scrapes: inner.scrapes,
            holds: inner.holds,
            held: inner.held,
            in_flight: inner.active.len() as u64,
            busy_slot_s: busy_ns as f64 / 1e9,
            uptime_s: uptime_ns as f64 / 1e9,
        }
    }

    fn exposition(&self) -> String {
        let inner = self.lock();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP app_requests_in_flight Requests queued or in service.\n\
             # TYPE app_requests_in_flight gauge\n\
             app_requests_in_flight {}",
            inner.active.len()
        );
        let _ = writeln!(
            out,
            "# HELP app_request_duration_seconds Time from accepting a request's \
             connection to writing its response.\n\
             # TYPE app_request_duration_seconds histogram"
        );
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "app_request_duration_seconds_bucket{{le=\"{le}\"}} {}",
                inner.buckets[i]
            );
        }
        let _ = writeln!(
            out,
            "app_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}\n\
             app_request_duration_seconds_sum {}\n\
             app_request_duration_seconds_count {count}",
            inner.sum,
            count = inner.count
        );
        let _ = writeln!(
            out,
            "# HELP app_requests_total Application responses by status code.\n\
             # TYPE app_requests_total counter"
        );
        let mut codes = inner.codes.clone();
        codes.entry(200).or_insert(0);
        codes.entry(503).or_insert(0);
        let errors: u64 = codes.range(500..600).map(|(_, n)| *n).sum();
        for (code, n) in codes {
            let _ = writeln!(out, "app_requests_total{{code=\"{code}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP app_errors_total Application responses with a 5xx status.\n\
             # TYPE app_errors_total counter\n\
             app_errors_total {errors}"
        );
        // Integer slot-nanoseconds, divided last: both counters are monotonic, as
        // the rate computations of a scraper require.
        let (busy_ns, uptime_ns) = self.busy_ns(&inner);
        let slots = self.slots as u128;
        let user = busy_ns as f64 / slots as f64 / 1e9;
        let idle = (uptime_ns * slots).saturating_sub(busy_ns) as f64 / slots as f64 / 1e9;
        let _ = writeln!(
            out,
            "# HELP node_cpu_seconds_total Emulated CPU: busy slot-seconds / slots as \
             user, the rest idle.\n\
             # TYPE node_cpu_seconds_total counter\n\
             node_cpu_seconds_total{{cpu=\"0\",mode=\"idle\"}} {idle}\n\
             node_cpu_seconds_total{{cpu=\"0\",mode=\"user\"}} {user}"
        );
        out
    }
}

/// A running emulated backend; stopped (all its sockets closed) on drop.
pub struct EmulatedBackend {
    spec: BackendSpec,
    endpoints: Endpoints,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EmulatedBackend {
    /// Starts the backend inside `ns` with the testbed's layout: the application on
    /// `vip`, health and metrics on `own` (see [`Endpoints::standard`]).
    pub fn start(
        ns: &Netns,
        spec: BackendSpec,
        vip: SocketAddr,
        own: IpAddr,
    ) -> Result<EmulatedBackend> {
        Self::start_with(ns, spec, Endpoints::standard(vip, own))
    }

    /// Starts the backend inside `ns` on the given endpoints; returns once every
    /// listener is bound.
    pub fn start_with(
        ns: &Netns,
        spec: BackendSpec,
        endpoints: Endpoints,
    ) -> Result<EmulatedBackend> {
        anyhow::ensure!(spec.slots > 0, "backend {} has no slot", spec.name);
        let shared = Arc::new(Shared::new(&spec, Instant::now()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<()>>(1);
        let thread = {
            let shared = Arc::clone(&shared);
            let endpoints = endpoints.clone();
            ns.spawn_in(move || serve(shared, endpoints, ready_tx, stop_rx))?
        };
        let ready = ready_rx
            .recv()
            .map_err(|_| anyhow!("backend {} thread ended before binding", spec.name))?;
        if let Err(e) = ready {
            let _ = thread.join();
            return Err(e.context(format!("backend {} in {}", spec.name, ns.name())));
        }
        Ok(EmulatedBackend {
            spec,
            endpoints,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The backend's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// What it was started with.
    pub fn spec(&self) -> &BackendSpec {
        &self.spec
    }

    /// Where it listens.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The knobs (slowdown, fail fast), to change while it runs.
    pub fn controls(&self) -> Arc<Controls> {
        Arc::clone(&self.shared.controls)
    }

    /// Sets the slowdown factor (see [`Controls::set_slowdown`]).
    pub fn set_slowdown(&self, factor: f64) {
        self.shared.controls.set_slowdown(factor);
    }

    /// Turns fail-fast mode on or off (see [`Controls::set_fail_fast`]).
    pub fn set_fail_fast(&self, on: bool) {
        self.shared.controls.set_fail_fast(on);
    }

    /// Its counters now.
    pub fn counts(&self) -> BackendCounts {
        self.shared.counts()
    }

    /// Its `/metrics` text now.
    pub fn exposition(&self) -> String {
        self.shared.exposition()
    }

    /// Stops it, closing every connection (queued requests are dropped), and returns
    /// its final counters.
    pub fn stop(mut self) -> BackendCounts {
        self.shutdown();
        self.counts()
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("lb-tests: backend {} thread panicked", self.spec.name);
        }
    }
}

impl Drop for EmulatedBackend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The backend's thread: a current-thread runtime inside the namespace.
fn serve(
    shared: Arc<Shared>,
    endpoints: Endpoints,
    ready: mpsc::SyncSender<Result<()>>,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(anyhow!(e).context("cannot build a tokio runtime")));
            return;
        }
    };
    runtime.block_on(async move {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot bind {addr}"))
        };
        let mut listeners = Vec::new();
        for &addr in &endpoints.app {
            match bind(addr).await {
                Ok(l) => listeners.push((l, Kind::App)),
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            }
        }
        for (addr, kind) in [
            (endpoints.probe, Kind::Probe),
            (endpoints.metrics, Kind::Metrics),
        ] {
            let Some(addr) = addr else { continue };
            match bind(addr).await {
                Ok(l) => listeners.push((l, kind)),
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            }
        }
        for (listener, kind) in listeners {
            tokio::spawn(accept_loop(listener, kind, Arc::clone(&shared)));
        }
        let _ = ready.send(Ok(()));
        let _ = stop.await;
    });
    // Dropping the runtime cancels every task and closes every socket.
    drop(runtime);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    App,
    Probe,
    Metrics,
}

async fn accept_loop(listener: TcpListener, kind: Kind, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let accepted_at = Instant::now();
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    match kind {
                        Kind::App => app(stream, accepted_at, &shared).await,
                        Kind::Probe => probe(stream, &shared).await,
                        Kind::Metrics => metrics(stream, &shared).await,
                    }
                });
            }
            // Out of descriptors, or an aborted connection: try again shortly.
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Reads a request head; returns its first line, or `None` when the peer sent
/// nothing complete (closed, timed out, or too long).
async fn read_request(stream: &mut TcpStream) -> Option<String> {
    read_head(stream).await.map(|(line, _)| line)
}

/// Reads a request head; returns its first line and the bytes that came after the
/// head, or `None` as [`read_request`].
async fn read_head(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let end = [&b"\r\n\r\n"[..], b"\n\n"]
            .iter()
            .filter_map(|sep| {
                buf.windows(sep.len())
                    .position(|w| w == *sep)
                    .map(|i| i + sep.len())
            })
            .min();
        if let Some(end) = end {
            let text = String::from_utf8_lossy(&buf[..end]);
            let line = text.lines().next().unwrap_or("").to_owned();
            return Some((line, buf[end..].to_vec()));
        }
        if buf.len() > MAX_REQUEST {
            return None;
        }
    }
}

fn response(version: &str, code: u16, reason: &str, content_type: &str, body: &str) -> String {
    format!(
        "{version} {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Writes a response, runs `record` with whether that worked, then closes: a client
/// that has read the whole response (to the end of the stream) finds it counted.
async fn respond(stream: &mut TcpStream, text: &str, record: impl FnOnce(bool)) {
    let ok = stream.write_all(text.as_bytes()).await.is_ok();
    record(ok);
    let _ = stream.shutdown().await;
}

async fn app(mut stream: TcpStream, accepted_at: Instant, shared: &Shared) {
    let head = read_head(&mut stream).await;
    let hold = head
        .as_ref()
        .and_then(|(line, _)| line.split_whitespace().nth(1))
        .is_some_and(|path| path == HOLD_PATH);
    if hold && !shared.controls.fail_fast() {
        let rest = head.map(|(_, rest)| rest).unwrap_or_default();
        return held(stream, rest, shared).await;
    }
    shared.lock().accepted += 1;
    if head.is_none() {
        shared.finish(None, accepted_at, 400, false);
        return;
    }
    if shared.controls.fail_fast() {
        let text = response(
            "HTTP/1.0",
            503,
            "Service Unavailable",
            "text/plain",
            "unavailable\n",
        );
        respond(&mut stream, &text, |written| {
            shared.finish(None, accepted_at, 503, written)
        })
        .await;
        return;
    }
    let (id, end) = shared.reserve(Instant::now());
    tokio::time::sleep_until(end.into()).await;
    let text = response("HTTP/1.0", 200, "OK", "text/plain", &shared.name);
    respond(&mut stream, &text, |written| {
        shared.finish(Some(id), accepted_at, 200, written)
    })
    .await;
}

/// A long-lived connection: the head, the name, then the name for every line the
/// client sends (`rest`: what came after the request head), until it closes.
async fn held(mut stream: TcpStream, rest: Vec<u8>, shared: &Shared) {
    {
        let mut inner = shared.lock();
        inner.holds += 1;
        inner.held += 1;
    }
    let answer = format!("{}\n", shared.name);
    let head = format!("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{answer}");
    let mut pending = rest;
    let mut chunk = [0u8; 1024];
    if stream.write_all(head.as_bytes()).await.is_ok() {
        'conn: loop {
            while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                pending.drain(..=i);
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    break 'conn;
                }
            }
            if pending.len() > MAX_REQUEST {
                break;
            }
            match tokio::time::timeout(HOLD_IDLE, stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => pending.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
    }
    let _ = stream.shutdown().await;
    shared.lock().held -= 1;
}

async fn probe(mut stream: TcpStream, shared: &Shared) {
    shared.lock().probes += 1;
    // A TCP-only check sends nothing and closes; answer whatever came.
    let _ = read_request(&mut stream).await;
    let failing = shared.controls.fail_fast() && shared.controls.fail_probes.load(Ordering::SeqCst);
    let text = if failing {
        response(
            "HTTP/1.0",
            503,
            "Service Unavailable",
            "text/plain",
            "unavailable\n",
        )
    } else {
        response("HTTP/1.0", 200, "OK", "text/plain", &shared.name)
    };
    respond(&mut stream, &text, |_| {}).await;
}

async fn metrics(mut stream: TcpStream, shared: &Shared) {
    let Some(line) = read_request(&mut stream).await else {
        return;
    };
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let text = if path == "/metrics" || path.starts_with("/metrics?") {
        shared.lock().scrapes += 1;
        response(
            "HTTP/1.1",
            200,
            "OK",
            "text/plain; version=0.0.4",
            &shared.exposition(),
        )
    } else {
        response("HTTP/1.1", 404, "Not Found", "text/plain", "not found\n")
    };
    respond(&mut stream, &text, |_| {}).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_userspace::collect::{ScrapeConfig, Scraper};

    /// The agent's scrape of a backend failing fast, with the selectors the
    /// testbed's agent configuration names (`scenario::agent_config`): its 503s are
    /// requests and errors, so the policy sees its error rate.
    #[test]
    fn a_failing_backends_503s_reach_the_agents_error_rate() {
        let spec = BackendSpec::new("backend0", 4, Duration::from_millis(50));
        let start = Instant::now();
        let shared = Shared::new(&spec, start);
        let mut cfg = ScrapeConfig::new("http://198.18.0.11:9100/metrics");
        cfg.in_flight = Some("app_requests_in_flight".into());
        cfg.latency = Some("app_request_duration_seconds".into());
        cfg.requests = Some("app_requests_total".into());
        cfg.errors = Some("app_errors_total".into());
        let mut scraper = Scraper::new(cfg).unwrap();
        for _ in 0..10 {
            shared.finish(None, start, 200, true);
        }
        scraper.ingest(&shared.exposition(), start);
        for _ in 0..30 {
            shared.finish(None, start, 503, true);
        }
        shared.finish(None, start, 200, true);
        let sample = scraper.ingest(&shared.exposition(), start + Duration::from_secs(2));
        assert_eq!(sample.requests_per_s, Some(15.5), "{sample:?}");
        assert_eq!(sample.errors_per_s, Some(15.0), "{sample:?}");
    }
}
