//! The traffic of the comparison: fast backend servers inside the backend
//! namespaces and an efficient client inside the client namespace; used by
//! [`super::run`].
//!
//! Both run on tokio multi-threaded runtimes of this process (two worker threads
//! each by default, the machine's CPU count). Sockets belong to the namespace of the
//! thread that creates them: the backends' listeners are created on threads inside
//! each backend namespace (accepted sockets inherit the listener's namespace), and
//! every worker thread of the client's runtime enters the client namespace when it
//! starts, so that every socket it creates is the client's.
//!
//! Every backend listens on all its addresses (the VIP on `lo`, for direct server
//! return, and its own address, for the proxies and the direct path) on three ports:
//! - [`APP_PORT`]: one request, one response: it reads an HTTP/1.0 request head and
//!   answers `HTTP/1.0 200 OK` with its name as the body, then closes (the server
//!   closes first, so TIME_WAIT stays on the server side and the client never runs
//!   out of ports);
//! - [`DOWN_PORT`]: bulk towards the client: it writes until the client goes away;
//! - [`UP_PORT`]: bulk from the client: it reads and counts until end of stream.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Runtime;

use super::cpu::ThreadGroup;
use crate::netns::Netns;
use crate::testbed::{Rng, quantile_sorted};
use crate::topology::Host;

/// Request/response port (the VIP's port for the XDP balancer and the proxies).
pub const APP_PORT: u16 = 80;
/// Bulk port on which backends stream bytes to the client.
pub const DOWN_PORT: u16 = 5001;
/// Bulk port on which backends read and count what the client sends.
pub const UP_PORT: u16 = 5002;
/// The request of every connection to [`APP_PORT`].
pub const REQUEST: &[u8] = b"GET / HTTP/1.0\r\nHost: 198.18.1.1\r\n\r\n";
/// The size of the buffers of bulk reads and writes.
const BULK_CHUNK: usize = 256 * 1024;
/// Bytes every bulk writer sends, over and over.
static BULK_DATA: [u8; BULK_CHUNK] = [0x5a; BULK_CHUNK];
/// Listen backlog of every listener: bursts of new connections must not overflow it.
const BACKLOG: u32 = 4096;
/// The most bytes of request head a backend reads.
const MAX_REQUEST: usize = 2048;
/// How long a backend waits for a request head.
const SERVER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The response of backend `index`.
pub fn response(index: usize) -> Vec<u8> {
    let body = format!("backend{index}");
    format!(
        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The backend index a full response names, or `None` if it is not a `200` with a
/// `backend<N>` body.
pub fn backend_of(response: &[u8]) -> Option<usize> {
    let head_end = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let (head, body) = (&response[..head_end], &response[head_end + 4..]);
    let status = head.split(|&b| b == b'\r').next()?;
    if !(status.starts_with(b"HTTP/1.") && status.get(8..13) == Some(b" 200 ")) {
        return None;
    }
    std::str::from_utf8(body.strip_prefix(b"backend")?)
        .ok()?
        .parse()
        .ok()
}

/// What one backend counted.
#[derive(Debug, Default)]
pub struct BackendCounters {
    /// Connections accepted on [`APP_PORT`].
    pub accepted: AtomicU64,
    /// Responses written in full on [`APP_PORT`].
    pub served: AtomicU64,
    /// Bytes read on [`UP_PORT`].
    pub up_bytes: AtomicU64,
}

/// The backend servers of every backend namespace, on one runtime; stopped on drop.
pub struct Backends {
    runtime: Option<Runtime>,
    counters: Vec<Arc<BackendCounters>>,
    threads: ThreadGroup,
}

#[derive(Clone, Copy)]
enum Service {
    App,
    Down,
    Up,
}

impl Backends {
    /// Starts backend `i` on every address of `hosts[i]`, ports [`APP_PORT`],
    /// [`DOWN_PORT`] and [`UP_PORT`], on a runtime of `threads` worker threads.
    pub fn start(hosts: &[Host], threads: usize) -> Result<Backends> {
        let group = ThreadGroup::default();
        let g = group.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("versus-backend")
            .on_thread_start(move || g.register_current())
            .enable_all()
            .build()
            .context("building the backends' runtime")?;
        let mut counters = Vec::new();
        for (index, host) in hosts.iter().enumerate() {
            let c = Arc::new(BackendCounters::default());
            let response: Arc<[u8]> = response(index).into();
            for (port, service) in [
                (APP_PORT, Service::App),
                (DOWN_PORT, Service::Down),
                (UP_PORT, Service::Up),
            ] {
                let listener = listen(&runtime, host.ns(), SocketAddr::from(([0; 4], port)))
                    .with_context(|| format!("backend{index} cannot listen on port {port}"))?;
                runtime.spawn(accept_loop(
                    listener,
                    service,
                    Arc::clone(&response),
                    Arc::clone(&c),
                ));
            }
            counters.push(c);
        }
        Ok(Backends {
            runtime: Some(runtime),
            counters,
            threads: group,
        })
    }

    /// Responses served so far, by backend.
    pub fn served(&self) -> Vec<u64> {
        self.counters
            .iter()
            .map(|c| c.served.load(Ordering::Relaxed))
            .collect()
    }

    /// Bytes received on [`UP_PORT`] so far, all backends together.
    pub fn up_bytes(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.up_bytes.load(Ordering::Relaxed))
            .sum()
    }

    /// The servers' threads, for CPU accounting.
    pub fn threads(&self) -> &ThreadGroup {
        &self.threads
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// A listener on `addr` created inside `ns`, registered with `runtime`.
fn listen(runtime: &Runtime, ns: &Netns, addr: SocketAddr) -> Result<TcpListener> {
    let handle = runtime.handle().clone();
    ns.run_in(move || -> std::io::Result<TcpListener> {
        let _entered = handle.enter();
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(BACKLOG)
    })?
    .with_context(|| format!("binding {addr} in {}", ns.name()))
}

async fn accept_loop(
    listener: TcpListener,
    service: Service,
    response: Arc<[u8]>,
    counters: Arc<BackendCounters>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                let counters = Arc::clone(&counters);
                match service {
                    Service::App => {
                        counters.accepted.fetch_add(1, Ordering::Relaxed);
                        let response = Arc::clone(&response);
                        tokio::spawn(async move {
                            let served = tokio::time::timeout(
                                SERVER_READ_TIMEOUT,
                                serve_app(stream, &response),
                            )
                            .await;
                            if matches!(served, Ok(Ok(()))) {
                                counters.served.fetch_add(1, Ordering::Relaxed);
                            }
                        });
                    }
                    Service::Down => {
                        tokio::spawn(async move {
                            let mut stream = stream;
                            while stream.write_all(&BULK_DATA).await.is_ok() {}
                        });
                    }
                    Service::Up => {
                        tokio::spawn(async move {
                            let mut stream = stream;
                            let mut buf = vec![0u8; BULK_CHUNK];
                            while let Ok(n @ 1..) = stream.read(&mut buf).await {
                                counters.up_bytes.fetch_add(n as u64, Ordering::Relaxed);
                            }
                        });
                    }
                }
            }
            // Out of descriptors or the like: wait a little instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Reads one request head and writes the response; the caller's drop closes.
async fn serve_app(mut stream: TcpStream, response: &[u8]) -> std::io::Result<()> {
    let mut buf = [0u8; MAX_REQUEST];
    let mut n = 0;
    loop {
        let k = stream.read(&mut buf[n..]).await?;
        if k == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        n += k;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if n == buf.len() {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    }
    stream.write_all(response).await
}

/// Why one connection failed.
fn error_kind(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind as K;
    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
        // The client itself ran out of descriptors: too many connections in flight,
        // which an open loop reaches when the system behind the VIP falls behind.
        return "client_out_of_files";
    }
    match e.kind() {
        K::ConnectionRefused => "refused",
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => "reset",
        K::TimedOut | K::WouldBlock => "timeout",
        K::AddrNotAvailable | K::AddrInUse => "no_port",
        K::NetworkUnreachable | K::HostUnreachable => "unreachable",
        _ => "io",
    }
}

/// One connection to [`APP_PORT`]: connect, send [`REQUEST`], read the response to
/// the end of the stream; the index of the backend that answered.
async fn exchange(target: SocketAddr, buf: &mut Vec<u8>) -> Result<usize, &'static str> {
    let mut stream = TcpStream::connect(target)
        .await
        .map_err(|e| error_kind(&e))?;
    let _ = stream.set_nodelay(true);
    stream
        .write_all(REQUEST)
        .await
        .map_err(|e| error_kind(&e))?;
    buf.clear();
    stream.read_to_end(buf).await.map_err(|e| error_kind(&e))?;
    backend_of(buf).ok_or("bad_response")
}

async fn timed_exchange(
    target: SocketAddr,
    timeout: Duration,
    buf: &mut Vec<u8>,
) -> Result<usize, &'static str> {
    match tokio::time::timeout(timeout, exchange(target, buf)).await {
        Ok(result) => result,
        Err(_) => Err("timeout"),
    }
}

/// Counts of a run of request/response connections.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConnReport {
    /// Connections that got a full, valid response within the window.
    pub ok: u64,
    /// Failed connections by kind.
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Successful connections by backend index.
    pub per_backend: Vec<u64>,
    /// Latencies of the successful connections, seconds, ascending: from the
    /// `connect` call to the end of the response stream.
    pub latencies: Vec<f64>,
    /// Open loop only: how late each connection started against its schedule,
    /// seconds, ascending.
    pub lags: Vec<f64>,
    /// Open loop only: connections scheduled.
    pub scheduled: u64,
    /// Open loop only: per second of the schedule, [`SecondStats`].
    pub seconds: Vec<SecondStats>,
}

/// One second of an open-loop schedule, to tell a steady tail from a stall.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SecondStats {
    /// Connections scheduled in the second.
    pub scheduled: u64,
    /// The 99th percentile of their latencies (successful ones), seconds.
    pub p99: f64,
    /// The largest latency, seconds.
    pub max: f64,
    /// The largest start lag, seconds.
    pub max_lag: f64,
}

/// Per-second figures of `(scheduled time, latency if successful, lag)` triples,
/// all in seconds, for a schedule of `duration_s`.
pub fn per_second(samples: &[(f64, Option<f64>, f64)], duration_s: f64) -> Vec<SecondStats> {
    let n = duration_s.ceil().max(1.0) as usize;
    let mut latencies: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut out = vec![SecondStats::default(); n];
    for &(t, latency, lag) in samples {
        let i = (t.max(0.0) as usize).min(n - 1);
        out[i].scheduled += 1;
        out[i].max_lag = out[i].max_lag.max(lag);
        if let Some(l) = latency {
            latencies[i].push(l);
            out[i].max = out[i].max.max(l);
        }
    }
    for (second, mut l) in out.iter_mut().zip(latencies) {
        l.sort_by(f64::total_cmp);
        second.p99 = quantile_sorted(&l, 0.99).unwrap_or(0.0);
    }
    out
}

impl ConnReport {
    fn record(&mut self, outcome: Result<usize, &'static str>, latency: f64) {
        match outcome {
            Ok(backend) => {
                self.ok += 1;
                if self.per_backend.len() <= backend {
                    self.per_backend.resize(backend + 1, 0);
                }
                self.per_backend[backend] += 1;
                self.latencies.push(latency);
            }
            Err(kind) => *self.errors.entry(kind.to_owned()).or_insert(0) += 1,
        }
    }

    fn merge(&mut self, other: ConnReport) {
        self.ok += other.ok;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_insert(0) += v;
        }
        if self.per_backend.len() < other.per_backend.len() {
            self.per_backend.resize(other.per_backend.len(), 0);
        }
        for (i, v) in other.per_backend.into_iter().enumerate() {
            self.per_backend[i] += v;
        }
        self.latencies.extend(other.latencies);
        self.lags.extend(other.lags);
        self.scheduled += other.scheduled;
    }

    fn sort(&mut self) {
        self.latencies.sort_by(f64::total_cmp);
        self.lags.sort_by(f64::total_cmp);
    }

    /// Failed connections.
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The latency at quantile `q`, seconds.
    pub fn latency(&self, q: f64) -> Option<f64> {
        quantile_sorted(&self.latencies, q)
    }

    /// The start lag at quantile `q`, seconds.
    pub fn lag(&self, q: f64) -> Option<f64> {
        quantile_sorted(&self.lags, q)
    }
}

/// The calling thread's timer slack (how late the kernel may wake a sleeper), set
/// for a while and restored on drop.
struct TimerSlack {
    previous: libc::c_int,
}

impl TimerSlack {
    fn set(nanoseconds: libc::c_ulong) -> TimerSlack {
        // SAFETY: PR_GET_TIMERSLACK and PR_SET_TIMERSLACK only read or change the
        // calling thread's timer slack.
        unsafe {
            let previous = libc::prctl(libc::PR_GET_TIMERSLACK);
            libc::prctl(libc::PR_SET_TIMERSLACK, nanoseconds);
            TimerSlack { previous }
        }
    }
}

impl Drop for TimerSlack {
    fn drop(&mut self) {
        if self.previous > 0 {
            // SAFETY: as in `set`.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, self.previous as libc::c_ulong) };
        }
    }
}

/// The client: a runtime whose threads are inside the client namespace.
pub struct Client {
    runtime: Runtime,
    threads: ThreadGroup,
}

/// Bulk direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Backend to client ([`DOWN_PORT`]): with direct server return, the load
    /// balancer sees only the client's acknowledgements.
    Down,
    /// Client to backend ([`UP_PORT`]): every data segment crosses the balancer.
    Up,
}

impl Direction {
    /// The backends' port of this direction.
    pub fn port(self) -> u16 {
        match self {
            Direction::Down => DOWN_PORT,
            Direction::Up => UP_PORT,
        }
    }

    /// `down` or `up`.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Down => "down",
            Direction::Up => "up",
        }
    }
}

/// Long-lived bulk connections in progress; [`BulkRun::stop`] ends them.
pub struct BulkRun {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), &'static str>>>,
}

impl BulkRun {
    /// Bytes the client received so far (direction down).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Client {
    /// A client runtime of `threads` workers, each inside `ns`. The calling thread,
    /// which keeps the open loop's schedule, counts as a client thread too.
    pub fn start(ns: &Netns, threads: usize) -> Result<Client> {
        let path = ns.path();
        let group = ThreadGroup::default();
        group.register_current();
        let g = group.clone();
        let entered = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let (e, f) = (Arc::clone(&entered), Arc::clone(&failed));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("versus-client")
            .on_thread_start(move || {
                let ok = std::fs::File::open(&path).is_ok_and(|file| {
                    // SAFETY: setns on a descriptor open for the call; it changes
                    // only the calling thread's network namespace.
                    unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) == 0 }
                });
                if ok {
                    e.fetch_add(1, Ordering::SeqCst);
                } else {
                    f.fetch_add(1, Ordering::SeqCst);
                }
                g.register_current();
            })
            .enable_all()
            .build()
            .context("building the client's runtime")?;
        // Every worker has started (and entered) once each has run a task.
        runtime.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..threads.max(1) * 4 {
                set.spawn(tokio::task::yield_now());
            }
            while set.join_next().await.is_some() {}
        });
        ensure!(
            failed.load(Ordering::SeqCst) == 0,
            "a client thread could not enter namespace {}",
            ns.name()
        );
        Ok(Client {
            runtime,
            threads: group,
        })
    }

    /// The client's threads, for CPU accounting.
    pub fn threads(&self) -> &ThreadGroup {
        &self.threads
    }

    /// Runs `future` on a worker thread (inside the namespace) and waits for it.
    fn run<F, T>(&self, future: F) -> T
    where
        F: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        match self.runtime.block_on(self.runtime.spawn(future)) {
            Ok(value) => value,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Closed loop: `workers` connections at a time for `duration`, each worker
    /// opening its next connection as soon as its last one ended, to `targets` in
    /// turn. Only connections that end within the window count.
    pub fn closed_loop(
        &self,
        targets: &[SocketAddr],
        workers: usize,
        duration: Duration,
        timeout: Duration,
    ) -> ConnReport {
        let targets: Arc<[SocketAddr]> = targets.into();
        self.run(async move {
            let end = Instant::now() + duration;
            let next = Arc::new(AtomicUsize::new(0));
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..workers.max(1) {
                let targets = Arc::clone(&targets);
                let next = Arc::clone(&next);
                set.spawn(async move {
                    let mut report = ConnReport::default();
                    let mut buf = Vec::with_capacity(256);
                    loop {
                        let start = Instant::now();
                        if start >= end {
                            break;
                        }
                        let target = targets[next.fetch_add(1, Ordering::Relaxed) % targets.len()];
                        let outcome = timed_exchange(target, timeout, &mut buf).await;
                        let done = Instant::now();
                        if done > end {
                            break;
                        }
                        report.record(outcome, (done - start).as_secs_f64());
                    }
                    report
                });
            }
            let mut total = ConnReport::default();
            while let Some(Ok(report)) = set.join_next().await {
                total.merge(report);
            }
            total.sort();
            total
        })
    }

    /// Open loop: connections start at the times of a Poisson process of `rate` per
    /// second (seeded by `seed`) for `duration`, whether or not earlier ones have
    /// ended, to `targets` in turn. The calling thread keeps the schedule (sleeping
    /// with a timer slack of 1 µs, since the runtime's timer has only millisecond
    /// resolution) and hands each connection to the runtime. Latency counts from the
    /// connection's actual start; how late that was against the schedule is
    /// recorded apart.
    pub fn open_loop(
        &self,
        targets: &[SocketAddr],
        rate: f64,
        duration: Duration,
        seed: u64,
        timeout: Duration,
    ) -> ConnReport {
        let _slack = TimerSlack::set(1_000);
        let handle = self.runtime.handle();
        let mut rng = Rng::new(seed);
        let mut tasks = Vec::new();
        let origin = Instant::now();
        let mut t = 0.0f64;
        loop {
            t += rng.exp1() / rate;
            if t >= duration.as_secs_f64() {
                break;
            }
            let at = origin + Duration::from_secs_f64(t);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            let target = targets[tasks.len() % targets.len()];
            tasks.push(handle.spawn(async move {
                let start = Instant::now();
                let mut buf = Vec::with_capacity(256);
                let outcome = timed_exchange(target, timeout, &mut buf).await;
                let latency = start.elapsed().as_secs_f64();
                (outcome, latency, start.saturating_duration_since(at), t)
            }));
        }
        let scheduled = tasks.len() as u64;
        let mut total = self.runtime.block_on(async move {
            let mut total = ConnReport::default();
            let mut samples = Vec::with_capacity(tasks.len());
            for task in tasks {
                if let Ok((outcome, latency, lag, t)) = task.await {
                    let lag = lag.as_secs_f64();
                    samples.push((t, outcome.is_ok().then_some(latency), lag));
                    total.record(outcome, latency);
                    total.lags.push(lag);
                }
            }
            total.seconds = per_second(&samples, duration.as_secs_f64());
            total
        });
        total.scheduled = scheduled;
        total.sort();
        total
    }

    /// Opens `connections` long-lived bulk connections in `direction`, to `targets`
    /// in turn, and returns once all are established (or fails after `timeout`).
    pub fn start_bulk(
        &self,
        direction: Direction,
        targets: &[SocketAddr],
        connections: usize,
        timeout: Duration,
    ) -> Result<BulkRun> {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let connected = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..connections {
            let target = targets[i % targets.len()];
            let (stop, received, connected) = (
                Arc::clone(&stop),
                Arc::clone(&received),
                Arc::clone(&connected),
            );
            tasks.push(self.runtime.spawn(async move {
                let mut stream = tokio::time::timeout(timeout, TcpStream::connect(target))
                    .await
                    .map_err(|_| "timeout")?
                    .map_err(|e| error_kind(&e))?;
                connected.fetch_add(1, Ordering::SeqCst);
                match direction {
                    Direction::Down => {
                        let mut buf = vec![0u8; BULK_CHUNK];
                        while !stop.load(Ordering::Relaxed) {
                            match stream.read(&mut buf).await {
                                Ok(0) => return Err("closed"),
                                Ok(n) => {
                                    received.fetch_add(n as u64, Ordering::Relaxed);
                                }
                                Err(e) => return Err(error_kind(&e)),
                            }
                        }
                    }
                    Direction::Up => {
                        while !stop.load(Ordering::Relaxed) {
                            stream
                                .write_all(&BULK_DATA)
                                .await
                                .map_err(|e| error_kind(&e))?;
                        }
                    }
                }
                Ok(())
            }));
        }
        let run = BulkRun {
            stop,
            received,
            tasks,
        };
        let deadline = Instant::now() + timeout;
        while connected.load(Ordering::SeqCst) < connections {
            if run.tasks.iter().any(|t| t.is_finished()) {
                let failed = self.stop_bulk(run);
                bail!("a bulk connection failed to start: {failed:?}");
            }
            if Instant::now() >= deadline {
                let failed = self.stop_bulk(run);
                bail!("bulk connections not established within {timeout:?}: {failed:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(run)
    }

    /// Ends the bulk connections and returns the errors of those that failed before.
    pub fn stop_bulk(&self, run: BulkRun) -> Vec<&'static str> {
        run.stop.store(true, Ordering::Relaxed);
        self.runtime.block_on(async {
            let mut errors = Vec::new();
            for task in run.tasks {
                let abort = task.abort_handle();
                match tokio::time::timeout(Duration::from_secs(2), task).await {
                    Ok(Ok(Err(e))) => errors.push(e),
                    Ok(_) => {}
                    Err(_) => abort.abort(),
                }
            }
            errors
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_name_their_backend() {
        assert_eq!(backend_of(&response(0)), Some(0));
        assert_eq!(backend_of(&response(3)), Some(3));
        assert_eq!(
            backend_of(b"HTTP/1.0 503 Service Unavailable\r\n\r\nbackend1"),
            None
        );
        assert_eq!(backend_of(b"HTTP/1.0 200 OK\r\n\r\nsomeone"), None);
        assert_eq!(backend_of(b"HTTP/1.0 200 OK\r\n"), None);
        assert_eq!(backend_of(b""), None);
    }

    #[test]
    fn open_loop_samples_fall_into_their_second() {
        let samples = [
            (0.1, Some(0.002), 0.0001),
            (0.9, Some(0.004), 0.0003),
            (1.5, None, 0.02),
            // Scheduled at the very end: counts in the last second.
            (2.0, Some(0.001), 0.0),
        ];
        let s = per_second(&samples, 2.0);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].scheduled, 2);
        assert_eq!(s[0].max, 0.004);
        assert_eq!(s[0].max_lag, 0.0003);
        assert_eq!(s[1].scheduled, 2);
        assert_eq!(s[1].max, 0.001);
        assert_eq!(s[1].max_lag, 0.02);
    }

    #[test]
    fn reports_merge_and_give_quantiles() {
        let mut a = ConnReport::default();
        a.record(Ok(1), 0.002);
        a.record(Err("reset"), 0.0);
        let mut b = ConnReport::default();
        b.record(Ok(0), 0.001);
        b.record(Ok(1), 0.003);
        a.merge(b);
        a.sort();
        assert_eq!(a.ok, 3);
        assert_eq!(a.failed(), 1);
        assert_eq!(a.per_backend, vec![1, 2]);
        assert_eq!(a.latency(0.5), Some(0.002));
        assert_eq!(a.latency(1.0), Some(0.003));
    }
}
