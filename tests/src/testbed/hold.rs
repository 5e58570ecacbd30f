//! Long-lived connections to the emulated backends, to see whether an established
//! flow keeps its backend while the load balancers around it change.
//!
//! Each connection sends `GET /hold HTTP/1.0` ([`super::backend::HOLD_PATH`]), reads
//! the head and the name of the backend that took it, then sends a line every
//! interval (its own, drawn between the spec's bounds, with a random phase so that
//! the pings of many connections spread out) and reads the name that answers it.
//! Every answer is recorded with its time, and so is the error that ended the
//! connection, if any: a reset (the packets reached a backend that has no such
//! connection), a timeout (they reached nothing), a close.
//!
//! Like the load generator, all connections live on one thread that has entered the
//! client namespace, in a current-thread tokio runtime; [`HoldClients::open`] opens a
//! wave of them and returns once each is open or has failed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};

use super::Rng;
use super::backend::HOLD_PATH;
use crate::netns::Netns;

/// Where the connections go and how they ping.
#[derive(Clone, Debug)]
pub struct HoldSpec {
    pub target: SocketAddr,
    /// Each connection's ping interval is drawn uniformly between these.
    pub interval: (Duration, Duration),
    /// Bound on connecting, on opening, and on each ping's answer.
    pub timeout: Duration,
    pub seed: u64,
}

impl HoldSpec {
    /// Pings every 200 to 500 ms, 3 s timeout, seed 1.
    pub fn new(target: SocketAddr) -> HoldSpec {
        HoldSpec {
            target,
            interval: (Duration::from_millis(200), Duration::from_millis(500)),
            timeout: Duration::from_secs(3),
            seed: 1,
        }
    }
}

/// Which step of a held connection failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// The TCP handshake.
    Connect,
    /// The hold request and its first answer.
    Open,
    /// A ping and its answer.
    Ping,
}

/// The error that ended a held connection.
#[derive(Clone, Debug, PartialEq)]
pub struct HeldError {
    /// Since the origin.
    pub at: Duration,
    pub stage: Stage,
    /// `std::io::ErrorKind` as text (`ConnectionReset`, `TimedOut`, `UnexpectedEof`,
    /// ...), or `Http` for a status other than 200 at the opening.
    pub kind: String,
    pub message: String,
}

/// One long-lived connection, as seen so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Held {
    /// Its number, from 0 in order of opening.
    pub id: usize,
    /// The client's port (known once connected): with the addresses, its 5-tuple.
    pub local_port: Option<u16>,
    /// When opening it started, since the origin.
    pub started: Duration,
    /// When it was open: the backend's first answer came.
    pub opened: Option<Duration>,
    /// The backend that answered the opening.
    pub backend: Option<String>,
    /// Every later answer: when it came and who gave it.
    pub answers: Vec<(Duration, String)>,
    /// The error that ended it early.
    pub error: Option<HeldError>,
    /// When it was closed from this side ([`HoldClients::stop`]).
    pub closed: Option<Duration>,
}

impl Held {
    /// Whether it was open (its first answer in) before `t`.
    pub fn open_before(&self, t: Duration) -> bool {
        self.opened.is_some_and(|o| o < t)
    }

    /// The first answer from another backend than the opening's, if any.
    pub fn first_other(&self) -> Option<&(Duration, String)> {
        let backend = self.backend.as_deref()?;
        self.answers.iter().find(|(_, b)| b != backend)
    }

    /// Whether it kept its backend to the end: opened, every answer from the same
    /// backend, no error, closed by this side.
    pub fn kept(&self) -> bool {
        self.backend.is_some()
            && self.error.is_none()
            && self.first_other().is_none()
            && self.closed.is_some()
    }

    /// When it was last heard from (its last answer, or its opening).
    pub fn last_answer(&self) -> Option<Duration> {
        self.answers.last().map(|(t, _)| *t).or(self.opened)
    }

    /// One line on what happened to it, for a failure's message.
    pub fn describe(&self) -> String {
        let s = |d: Duration| format!("{:.1}s", d.as_secs_f64());
        let mut out = format!(
            "#{} port {} opened {} on {}, {} answers",
            self.id,
            self.local_port.map_or("?".into(), |p| p.to_string()),
            self.opened.map_or("never".into(), s),
            self.backend.as_deref().unwrap_or("-"),
            self.answers.len()
        );
        if let Some((t, b)) = self.first_other() {
            let n = self.answers.iter().filter(|(_, x)| x == b).count();
            out += &format!(", then {b} from {} ({n} answers)", s(*t));
        }
        if let Some(t) = self.last_answer() {
            out += &format!(", last answer {}", s(t));
        }
        if let Some(e) = &self.error {
            out += &format!(
                ", ended at {} in {:?}: {} ({})",
                s(e.at),
                e.stage,
                e.kind,
                e.message
            );
        }
        out
    }
}

enum Command {
    Open(usize, std::sync::mpsc::Sender<Vec<usize>>),
}

/// Long-lived connections running in the background; closed on [`HoldClients::stop`]
/// or drop.
pub struct HoldClients {
    origin: Instant,
    conns: Arc<Mutex<Vec<Held>>>,
    commands: Option<mpsc::UnboundedSender<Command>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl HoldClients {
    /// Starts the (idle) client thread inside `ns`.
    pub fn start(ns: &Netns, spec: HoldSpec) -> Result<HoldClients> {
        let origin = Instant::now();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::unbounded_channel();
        let thread = {
            let conns = Arc::clone(&conns);
            ns.spawn_in(move || -> Result<()> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("cannot build a tokio runtime")?;
                runtime.block_on(serve(spec, origin, conns, rx));
                Ok(())
            })?
        };
        Ok(HoldClients {
            origin,
            conns,
            commands: Some(tx),
            thread: Some(thread),
        })
    }

    /// The instant every time of a [`Held`] counts from.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// Opens `n` more connections at once; returns their ids once each is open or
    /// has failed (see [`Held::opened`] and [`Held::error`]).
    pub fn open(&self, n: usize) -> Result<Vec<usize>> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.commands
            .as_ref()
            .context("stopped")?
            .send(Command::Open(n, tx))
            .map_err(|_| anyhow!("the hold client thread ended"))?;
        rx.recv().context("the hold client thread ended")
    }

    /// Runs `f` on every connection as seen now.
    pub fn with<R>(&self, f: impl FnOnce(&[Held]) -> R) -> R {
        f(&lock(&self.conns))
    }

    /// The connections open now (opened, no error): (id, client port).
    pub fn open_now(&self) -> Vec<(usize, u16)> {
        self.with(|all| {
            all.iter()
                .filter(|h| h.opened.is_some() && h.error.is_none() && h.closed.is_none())
                .filter_map(|h| h.local_port.map(|p| (h.id, p)))
                .collect()
        })
    }

    /// Closes every connection and returns what each saw, by id.
    pub fn stop(mut self) -> Result<Vec<Held>> {
        self.shutdown()?;
        Ok(std::mem::take(&mut *lock(&self.conns)))
    }

    fn shutdown(&mut self) -> Result<()> {
        // Closing the command channel ends the thread, which closes every connection.
        self.commands.take();
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => Ok(()),
        }
    }
}

impl Drop for HoldClients {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn lock(conns: &Mutex<Vec<Held>>) -> MutexGuard<'_, Vec<Held>> {
    conns.lock().unwrap_or_else(|p| p.into_inner())
}

async fn serve(
    spec: HoldSpec,
    origin: Instant,
    conns: Arc<Mutex<Vec<Held>>>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut rng = Rng::new(spec.seed);
    while let Some(Command::Open(n, reply)) = commands.recv().await {
        let ids: Vec<usize> = {
            let mut all = lock(&conns);
            let first = all.len();
            let started = origin.elapsed();
            all.extend((first..first + n).map(|id| Held {
                id,
                started,
                ..Held::default()
            }));
            (first..first + n).collect()
        };
        let mut opened = Vec::with_capacity(n);
        for &id in &ids {
            let (lo, hi) = spec.interval;
            let interval = lo + (hi.saturating_sub(lo)).mul_f64(rng.uniform());
            let phase = interval.mul_f64(rng.uniform());
            let (tx, rx) = oneshot::channel();
            opened.push(rx);
            tasks.spawn(hold_one(Conn {
                id,
                target: spec.target,
                interval,
                phase,
                timeout: spec.timeout,
                origin,
                conns: Arc::clone(&conns),
                stop: stop_rx.clone(),
                opened: Some(tx),
            }));
        }
        for rx in opened {
            let _ = rx.await;
        }
        let _ = reply.send(ids);
        while tasks.try_join_next().is_some() {}
    }
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
}

struct Conn {
    id: usize,
    target: SocketAddr,
    interval: Duration,
    phase: Duration,
    timeout: Duration,
    origin: Instant,
    conns: Arc<Mutex<Vec<Held>>>,
    stop: watch::Receiver<bool>,
    /// Told once the connection is open or has failed.
    opened: Option<oneshot::Sender<()>>,
}

impl Conn {
    fn update(&self, f: impl FnOnce(&mut Held)) {
        if let Some(h) = lock(&self.conns).get_mut(self.id) {
            f(h);
        }
    }

    fn fail(&mut self, stage: Stage, kind: String, message: String) {
        let at = self.origin.elapsed();
        self.update(|h| {
            h.error = Some(HeldError {
                at,
                stage,
                kind,
                message,
            })
        });
        if let Some(tx) = self.opened.take() {
            let _ = tx.send(());
        }
    }

    fn fail_io(&mut self, stage: Stage, e: std::io::Error) {
        self.fail(stage, format!("{:?}", e.kind()), e.to_string());
    }

    fn timed_out(&mut self, stage: Stage) {
        let message = format!("no answer within {:?}", self.timeout);
        self.fail(stage, "TimedOut".into(), message);
    }
}

/// Reads one line within `timeout`; `Err` with the error kind's text and a message.
async fn line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    timeout: Duration,
) -> std::result::Result<String, (String, String)> {
    let mut line = String::new();
    match tokio::time::timeout(timeout, reader.read_line(&mut line)).await {
        Err(_) => Err(("TimedOut".into(), format!("no answer within {timeout:?}"))),
        Ok(Err(e)) => Err((format!("{:?}", e.kind()), e.to_string())),
        Ok(Ok(_)) if !line.ends_with('\n') => Err((
            "UnexpectedEof".into(),
            format!("closed after {line:?} instead of a line"),
        )),
        Ok(Ok(_)) => Ok(line.trim_end().to_owned()),
    }
}

async fn hold_one(mut c: Conn) {
    let stream = match tokio::time::timeout(c.timeout, TcpStream::connect(c.target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return c.fail_io(Stage::Connect, e),
        Err(_) => return c.timed_out(Stage::Connect),
    };
    let _ = stream.set_nodelay(true);
    let port = stream.local_addr().ok().map(|a| a.port());
    c.update(|h| h.local_port = port);
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    let request = format!(
        "GET {HOLD_PATH} HTTP/1.0\r\nHost: {}\r\nUser-Agent: lb-testbed-hold\r\n\r\n",
        c.target.ip()
    );
    if let Err(e) = writer.write_all(request.as_bytes()).await {
        return c.fail_io(Stage::Open, e);
    }
    // The status line, the headers up to the empty line, then the name.
    let mut status = None;
    let backend = loop {
        match line(&mut reader, c.timeout).await {
            Err((kind, message)) => return c.fail(Stage::Open, kind, message),
            Ok(l) if status.is_none() => {
                if l.split_whitespace().nth(1) != Some("200") {
                    return c.fail(Stage::Open, "Http".into(), l);
                }
                status = Some(l);
            }
            Ok(l) if l.is_empty() => match line(&mut reader, c.timeout).await {
                Ok(name) => break name,
                Err((kind, message)) => return c.fail(Stage::Open, kind, message),
            },
            Ok(_header) => {}
        }
    };
    let opened = c.origin.elapsed();
    c.update(|h| {
        h.opened = Some(opened);
        h.backend = Some(backend);
    });
    if let Some(tx) = c.opened.take() {
        let _ = tx.send(());
    }
    let mut next = tokio::time::Instant::now() + c.phase;
    let mut count = 0u64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = c.stop.changed() => break,
        }
        next += c.interval;
        count += 1;
        if let Err(e) = writer.write_all(format!("ping {count}\n").as_bytes()).await {
            return c.fail_io(Stage::Ping, e);
        }
        match line(&mut reader, c.timeout).await {
            Ok(name) => {
                let at = c.origin.elapsed();
                c.update(|h| h.answers.push((at, name)));
            }
            Err((kind, message)) => return c.fail(Stage::Ping, kind, message),
        }
    }
    let closed = c.origin.elapsed();
    c.update(|h| h.closed = Some(closed));
    let _ = writer.shutdown().await;
}
