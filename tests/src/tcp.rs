//! Real TCP servers and clients that run inside network namespaces; owned by the
//! lb-tests harness and used by the end-to-end tests to drive traffic through the
//! load balancer and see which backend answered.
//!
//! The protocol is one text line each way. A client sends a request line and a
//! [`BackendServer`] answers with its own name and a newline, then closes. A
//! connection whose first line is [`KEEPALIVE_REQUEST`] stays open instead: every
//! line on it, the first included, is answered with the name until the client closes
//! it or the server stops.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::netns::Netns;

/// The first line that makes a connection long-lived.
pub const KEEPALIVE_REQUEST: &str = "keepalive";

/// How often blocked server threads look at the stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// How long a server waits for a request line before giving up on a connection.
const SERVER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP server inside a namespace that answers every request with its name.
///
/// Stopping it (or dropping it) joins all its threads; that takes at most a few
/// poll intervals.
pub struct BackendServer {
    name: String,
    local_addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl BackendServer {
    /// Binds `bind` inside `ns` and starts serving. With direct server return, bind
    /// the VIP, which is on the backend's `lo`.
    pub fn start(ns: &Netns, bind: SocketAddr, name: &str) -> Result<BackendServer> {
        BackendServer::start_with_idle_timeout(ns, bind, name, SERVER_READ_TIMEOUT)
    }

    /// As [`BackendServer::start`], closing a connection only after `idle` without
    /// a request (instead of 10 s): for connections that sit idle on purpose.
    pub fn start_with_idle_timeout(
        ns: &Netns,
        bind: SocketAddr,
        name: &str,
        idle: Duration,
    ) -> Result<BackendServer> {
        let listener = ns
            .run_in(|| TcpListener::bind(bind))?
            .with_context(|| format!("backend {name} cannot bind {bind} in {}", ns.name()))?;
        let local_addr = listener.local_addr().context("listener has no address")?;
        listener
            .set_nonblocking(true)
            .context("cannot make the listener non-blocking")?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let name = name.to_owned();
            let accepted = Arc::clone(&accepted);
            let stop = Arc::clone(&stop);
            ns.spawn_in(move || accept_loop(listener, &name, &accepted, &stop, idle))?
        };
        Ok(BackendServer {
            name: name.to_owned(),
            local_addr,
            accepted,
            stop,
            acceptor: Some(acceptor),
        })
    }

    /// The name the server answers with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// How many connections the server has accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// A counter of accepted connections that stays readable after the server is gone.
    pub fn accepted_counter(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.accepted)
    }

    /// Stops accepting, closes open connections, joins every thread, and returns the
    /// number of accepted connections.
    pub fn stop(mut self) -> usize {
        self.shutdown();
        self.accepted()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take()
            && acceptor.join().is_err()
        {
            eprintln!("lb-tests: backend {} acceptor panicked", self.name);
        }
    }
}

impl Drop for BackendServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(
    listener: TcpListener,
    name: &str,
    accepted: &AtomicUsize,
    stop: &Arc<AtomicBool>,
    idle: Duration,
) {
    let mut handlers: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _peer)) => {
                accepted.fetch_add(1, Ordering::SeqCst);
                let name = name.to_owned();
                let stop = Arc::clone(stop);
                // Threads spawned here start in the listener's namespace, though the
                // accepted socket would belong to it anyway.
                match thread::Builder::new()
                    .name("backend-conn".into())
                    .spawn(move || serve_connection(stream, &name, &stop, idle))
                {
                    Ok(handle) => handlers.push(handle),
                    Err(e) => eprintln!("lb-tests: backend cannot spawn a handler: {e}"),
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                wait_readable(&listener, POLL_INTERVAL);
            }
            Err(e) => {
                eprintln!("lb-tests: backend {name} accept failed: {e}");
                thread::sleep(POLL_INTERVAL);
            }
        }
        let (finished, running): (Vec<_>, Vec<_>) =
            handlers.into_iter().partition(|h| h.is_finished());
        for handle in finished {
            let _ = handle.join();
        }
        handlers = running;
    }
    for handle in handlers {
        let _ = handle.join();
    }
}

/// Waits until the listener has a connection to accept or `timeout` passes, so that
/// accepting adds no polling delay to a connection.
fn wait_readable(listener: &TcpListener, timeout: Duration) {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: poll reads and writes exactly the one pollfd it is given.
    let ready = unsafe { libc::poll(&mut fd, 1, millis) };
    if ready < 0 {
        // An interrupted or failed poll is retried by the accept loop after a pause.
        thread::sleep(timeout);
    }
}

/// Answers one connection; errors only end the connection.
fn serve_connection(stream: TcpStream, name: &str, stop: &AtomicBool, idle: Duration) {
    let _ = try_serve_connection(stream, name, stop, idle);
}

fn try_serve_connection(
    stream: TcpStream,
    name: &str,
    stop: &AtomicBool,
    idle: Duration,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL_INTERVAL * 5))?;
    stream.set_write_timeout(Some(SERVER_READ_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let response = format!("{name}\n");
    let mut first = true;
    loop {
        let Some(line) = read_line_polling(&mut reader, stop, idle)? else {
            return Ok(());
        };
        writer.write_all(response.as_bytes())?;
        if first && line.trim_end() != KEEPALIVE_REQUEST {
            return Ok(());
        }
        first = false;
    }
}

/// Reads one line, looking at `stop` between short read timeouts. Returns `None` on
/// end of stream, on stop, or when no full line arrives within `idle`.
fn read_line_polling(
    reader: &mut BufReader<TcpStream>,
    stop: &AtomicBool,
    idle: Duration,
) -> io::Result<Option<String>> {
    let deadline = Instant::now() + idle;
    let mut line = Vec::new();
    loop {
        if stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
            return Ok(None);
        }
        // read_until keeps the bytes it read before a timeout in `line`.
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return Ok(None),
            Ok(_) if line.ends_with(b"\n") => {
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            Ok(_) => return Ok(None),
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// Which step of a client connection failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// The TCP handshake (or creating the socket).
    Connect,
    /// Sending the request line.
    Write,
    /// Receiving the response line.
    Read,
}

/// One failed client connection.
#[derive(Clone, Debug)]
pub struct ClientFailure {
    /// The connection's number, from 0 to n - 1.
    pub index: usize,
    /// Where it failed.
    pub stage: Stage,
    /// The I/O error kind.
    pub kind: ErrorKind,
    /// The error message.
    pub message: String,
}

/// The outcome of [`run_clients`].
#[derive(Clone, Debug, Default)]
pub struct ClientReport {
    /// How many connections were attempted.
    pub attempted: usize,
    /// How many connections got each response (the backend's name).
    pub responses: BTreeMap<String, usize>,
    /// Every failed connection, in no particular order.
    pub failures: Vec<ClientFailure>,
    /// The time from connecting to the full response, of each successful connection.
    pub latencies: Vec<Duration>,
    /// How long the whole run took.
    pub elapsed: Duration,
}

impl ClientReport {
    /// How many connections got a response.
    pub fn succeeded(&self) -> usize {
        self.responses.values().sum()
    }

    /// Whether every attempted connection got a response.
    pub fn all_succeeded(&self) -> bool {
        self.failures.is_empty() && self.succeeded() == self.attempted
    }

    /// How many failures there were of each stage and error kind, for messages.
    pub fn failure_kinds(&self) -> BTreeMap<String, usize> {
        let mut kinds = BTreeMap::new();
        for failure in &self.failures {
            *kinds
                .entry(format!("{:?}/{:?}", failure.stage, failure.kind))
                .or_insert(0) += 1;
        }
        kinds
    }

    /// The latency at quantile `q` (0.0 to 1.0) of the successful connections.
    pub fn latency_quantile(&self, q: f64) -> Option<Duration> {
        if self.latencies.is_empty() {
            return None;
        }
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let rank = (q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64).round() as usize;
        Some(sorted[rank])
    }

    /// A one-line summary for assertion messages.
    pub fn summary(&self) -> String {
        format!(
            "{}/{} ok, responses {:?}, failures {:?}, p50 {:?}, max {:?}, total {:?}",
            self.succeeded(),
            self.attempted,
            self.responses,
            self.failure_kinds(),
            self.latency_quantile(0.5),
            self.latency_quantile(1.0),
            self.elapsed
        )
    }
}

/// Opens `n` TCP connections to `target` from inside `ns`, at most `concurrency` at a
/// time; each sends a request line and reads the response line. `timeout` bounds the
/// connect, the write and the read of each connection.
///
/// Connection failures are reported, not returned; the error case is only a failure
/// of the harness itself (entering the namespace or starting threads).
pub fn run_clients(
    ns: &Netns,
    target: SocketAddr,
    n: usize,
    concurrency: usize,
    timeout: Duration,
) -> Result<ClientReport> {
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let workers = concurrency.clamp(1, n.max(1));
    let mut handles = Vec::with_capacity(workers);
    for _ in 0..workers {
        let next = Arc::clone(&next);
        let outcomes = Arc::clone(&outcomes);
        handles.push(ns.spawn_in(move || {
            loop {
                let index = next.fetch_add(1, Ordering::SeqCst);
                if index >= n {
                    break;
                }
                let outcome = one_client(index, target, timeout);
                outcomes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((index, outcome));
            }
        })?);
    }
    for handle in handles {
        if let Err(panic) = handle.join() {
            std::panic::resume_unwind(panic);
        }
    }
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap_or_else(|p| p.into_inner()));
    let mut report = ClientReport {
        attempted: n,
        ..ClientReport::default()
    };
    for (index, outcome) in outcomes {
        match outcome {
            Ok((response, latency)) => {
                *report.responses.entry(response).or_insert(0) += 1;
                report.latencies.push(latency);
            }
            Err((stage, error)) => report.failures.push(ClientFailure {
                index,
                stage,
                kind: error.kind(),
                message: error.to_string(),
            }),
        }
    }
    report.failures.sort_by_key(|f| f.index);
    report.elapsed = started.elapsed();
    Ok(report)
}

type ClientOutcome = std::result::Result<(String, Duration), (Stage, io::Error)>;

fn one_client(index: usize, target: SocketAddr, timeout: Duration) -> ClientOutcome {
    let started = Instant::now();
    let stream = TcpStream::connect_timeout(&target, timeout).map_err(|e| (Stage::Connect, e))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| (Stage::Connect, e))?;
    (&stream)
        .write_all(format!("hello {index}\n").as_bytes())
        .map_err(|e| (Stage::Write, timed_out(e, timeout)))?;
    let response = read_response(&stream).map_err(|e| (Stage::Read, timed_out(e, timeout)))?;
    Ok((response, started.elapsed()))
}

/// Reports an expired socket timeout as `TimedOut`; Linux reports it as EAGAIN,
/// which std calls `WouldBlock`.
fn timed_out(e: io::Error, timeout: Duration) -> io::Error {
    if e.kind() == ErrorKind::WouldBlock {
        io::Error::new(ErrorKind::TimedOut, format!("no data within {timeout:?}"))
    } else {
        e
    }
}

/// Reads one response line and returns it without the newline.
fn read_response(stream: &TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    BufReader::new(stream).read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\n") {
        return Err(io::Error::new(
            ErrorKind::UnexpectedEof,
            format!(
                "connection closed after {:?} instead of a response line",
                String::from_utf8_lossy(&line)
            ),
        ));
    }
    line.pop();
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// A long-lived connection to a [`BackendServer`] (through the load balancer or not)
/// that answers every request line.
#[derive(Debug)]
pub struct PersistentConn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    timeout: Duration,
}

impl PersistentConn {
    /// Connects from inside `ns` and opens the long-lived session; returns the
    /// connection and the name of the backend that answered the first line.
    pub fn connect(ns: &Netns, target: SocketAddr, timeout: Duration) -> Result<(Self, String)> {
        let stream = ns
            .run_in(|| TcpStream::connect_timeout(&target, timeout))?
            .with_context(|| format!("cannot connect to {target} from {}", ns.name()))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let reader = BufReader::new(stream.try_clone()?);
        let mut conn = PersistentConn {
            stream,
            reader,
            timeout,
        };
        let first = conn
            .request(KEEPALIVE_REQUEST)
            .with_context(|| format!("no answer to the first line from {target}"))?;
        Ok((conn, first))
    }

    /// Sends `line` (which must not contain a newline) and returns the response line.
    /// After an error the connection is out of step and should be dropped.
    pub fn request(&mut self, line: &str) -> io::Result<String> {
        let timeout = self.timeout;
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|e| timed_out(e, timeout))?;
        let mut response = Vec::new();
        self.reader
            .read_until(b'\n', &mut response)
            .map_err(|e| timed_out(e, timeout))?;
        if !response.ends_with(b"\n") {
            return Err(io::Error::new(
                ErrorKind::UnexpectedEof,
                "connection closed instead of a response line",
            ));
        }
        response.pop();
        Ok(String::from_utf8_lossy(&response).into_owned())
    }

    /// The local (client) address of the connection.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.local_addr()
    }
}

/// What a [`Pinger`] saw.
#[derive(Clone, Debug, Default)]
pub struct PingReport {
    /// Every response, in order (the first is the answer to the opening line).
    pub responses: Vec<String>,
    /// The error that ended the connection early, if any.
    pub error: Option<(ErrorKind, String)>,
}

impl PingReport {
    /// The distinct backends that answered, in order of first appearance.
    pub fn backends(&self) -> Vec<&str> {
        let mut seen: Vec<&str> = Vec::new();
        for response in &self.responses {
            if !seen.contains(&response.as_str()) {
                seen.push(response);
            }
        }
        seen
    }
}

/// A long-lived connection that sends a line every `interval` on a background thread
/// and records the answers, to check that an established flow keeps its backend.
pub struct Pinger {
    /// The answer to the opening line: the backend this connection reached.
    first: String,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<PingReport>>,
}

impl Pinger {
    /// Connects from inside `ns` and starts pinging; `timeout` bounds each step.
    pub fn start(
        ns: &Netns,
        target: SocketAddr,
        interval: Duration,
        timeout: Duration,
    ) -> Result<Pinger> {
        let (mut conn, first) = PersistentConn::connect(ns, target, timeout)?;
        let first_backend = first.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let handle = thread::Builder::new()
            .name("pinger".into())
            .spawn(move || {
                let mut report = PingReport {
                    responses: vec![first],
                    error: None,
                };
                let mut count = 0u64;
                while !stop_flag.load(Ordering::SeqCst) {
                    let wake = Instant::now() + interval;
                    while Instant::now() < wake && !stop_flag.load(Ordering::SeqCst) {
                        thread::sleep(POLL_INTERVAL.min(interval));
                    }
                    if stop_flag.load(Ordering::SeqCst) {
                        break;
                    }
                    count += 1;
                    match conn.request(&format!("ping {count}")) {
                        Ok(response) => report.responses.push(response),
                        Err(e) => {
                            report.error = Some((e.kind(), e.to_string()));
                            break;
                        }
                    }
                }
                report
            })
            .context("cannot spawn the pinger thread")?;
        Ok(Pinger {
            first: first_backend,
            stop,
            handle: Some(handle),
        })
    }

    /// The backend that answered the opening line.
    pub fn backend(&self) -> &str {
        &self.first
    }

    /// Stops pinging, closes the connection and returns what was seen.
    pub fn stop(mut self) -> PingReport {
        self.stop.store(true, Ordering::SeqCst);
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(report)) => report,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => PingReport::default(),
        }
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// New connections from `ns` to a target, in batches of 20 (4 at a time), until
/// stopped; every batch's report kept. The steady traffic of the tests that restart
/// or reconfigure the agent under load.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<ClientReport>>,
}

impl Traffic {
    pub fn start(ns: &Netns, target: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let ns = ns.borrowed();
        let handle = thread::spawn(move || {
            let mut reports = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                reports.push(
                    run_clients(&ns, target, 20, 4, Duration::from_secs(3))
                        .expect("running clients"),
                );
            }
            reports
        });
        Traffic { stop, handle }
    }

    /// Stops; the connections attempted and every failure, described.
    pub fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let reports = self.handle.join().expect("the traffic thread");
        let total = reports.iter().map(|r| r.attempted).sum();
        let failures = reports
            .iter()
            .flat_map(|r| r.failures.iter().map(|f| format!("{f:?}")))
            .collect();
        (total, failures)
    }
}

/// Checks what a restart or reconfiguration under load must leave: no failed
/// connection among at least 100 of [`Traffic`], and a long-lived connection
/// ([`Pinger`]) that never broke, made more than 20 round trips and never changed
/// backend. Panics with what went wrong.
pub fn assert_survived((total, failures): (usize, Vec<String>), ping: &PingReport) {
    assert!(
        failures.is_empty(),
        "{} of {total} connections failed: {failures:?}",
        failures.len()
    );
    assert!(total >= 100, "only {total} connections");
    assert!(
        ping.error.is_none(),
        "the long-lived connection broke: {:?}",
        ping.error
    );
    assert!(
        ping.responses.len() > 20,
        "too few round trips: {}",
        ping.responses.len()
    );
    assert_eq!(
        ping.backends().len(),
        1,
        "the long-lived connection changed backend: {:?}",
        ping.backends()
    );
}

/// The agent's `/metrics` page, as its Prometheus endpoint on localhost of `ns` (the
/// load balancer's namespace, the default `127.0.0.1:9432`) serves it: the whole
/// HTTP response.
pub fn agent_metrics(ns: &Netns) -> Result<String> {
    ns.run_in(|| {
        use std::io::Read;
        let mut s = TcpStream::connect("127.0.0.1:9432")?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok::<_, io::Error>(body)
    })?
    .context("fetching the agent's /metrics")
}
