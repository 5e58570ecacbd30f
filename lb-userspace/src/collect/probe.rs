//! [`Prober`]: active health checks of one backend, a TCP connect and optionally an
//! HTTP `GET` that must answer 2xx, with rise/fall hysteresis.
//!
//! A backend starts healthy. `fall` failed probes in a row make it unhealthy, and then
//! `rise` successful probes in a row make it healthy again; a single probe the other
//! way resets the count. A `rise` or `fall` of 0 acts as 1. Each probe is bounded as a
//! whole by the timeout (connect, request and response head together), and only the
//! response head is read: the status is all that counts.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::BufReader;
use tokio::net::TcpStream;

use super::CollectError;
use super::http;

/// How to probe one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeConfig {
    /// The address to connect to.
    pub target: SocketAddr,
    /// If set, also `GET` this path (it must start with `/`) and expect a 2xx status.
    pub http_path: Option<String>,
    /// Bounds the whole probe.
    pub timeout: Duration,
    /// Successes in a row that make an unhealthy backend healthy.
    pub rise: u32,
    /// Failures in a row that make a healthy backend unhealthy.
    pub fall: u32,
}

impl ProbeConfig {
    /// The default timeout, 1 s.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
    /// The default `rise`.
    pub const DEFAULT_RISE: u32 = 2;
    /// The default `fall`.
    pub const DEFAULT_FALL: u32 = 3;

    /// A TCP-only probe of `target` with the default timeout, rise and fall.
    pub fn new(target: SocketAddr) -> ProbeConfig {
        ProbeConfig {
            target,
            http_path: None,
            timeout: Self::DEFAULT_TIMEOUT,
            rise: Self::DEFAULT_RISE,
            fall: Self::DEFAULT_FALL,
        }
    }
}

/// What one probe saw.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeResult {
    /// Whether the probe succeeded: connected, and a 2xx answer if HTTP was asked for.
    pub ok: bool,
    /// Seconds to establish the TCP connection, if it was established.
    pub connect_s: Option<f64>,
    /// Seconds from sending the request to the complete response head.
    pub http_s: Option<f64>,
    /// The HTTP status, if one arrived.
    pub http_status: Option<u16>,
    /// Why the probe failed.
    pub error: Option<String>,
}

/// Probes one backend and keeps its health state.
#[derive(Debug)]
pub struct Prober {
    cfg: ProbeConfig,
    healthy: bool,
    successes: u32,
    failures: u32,
}

impl Prober {
    /// A prober whose backend starts healthy.
    pub fn new(cfg: ProbeConfig) -> Prober {
        Prober {
            cfg,
            healthy: true,
            successes: 0,
            failures: 0,
        }
    }

    /// The configuration this prober was made with.
    pub fn config(&self) -> &ProbeConfig {
        &self.cfg
    }

    /// Whether the backend is healthy after the probes so far.
    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Probes once, within the timeout, and updates the health state.
    pub async fn probe(&mut self) -> ProbeResult {
        let started = Instant::now();
        let mut connect_s = None;
        let mut http_s = None;
        let mut http_status = None;
        let outcome = tokio::time::timeout(
            self.cfg.timeout,
            exchange(
                &self.cfg,
                started,
                &mut connect_s,
                &mut http_s,
                &mut http_status,
            ),
        )
        .await
        .unwrap_or(Err(CollectError::Timeout {
            after: self.cfg.timeout,
        }));
        let result = ProbeResult {
            ok: outcome.is_ok(),
            connect_s,
            http_s,
            http_status,
            error: outcome.err().map(|e| e.to_string()),
        };
        self.record(result.ok);
        result
    }

    /// Moves the health state on by one probe's outcome.
    fn record(&mut self, ok: bool) {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.healthy && self.successes >= self.cfg.rise.max(1) {
                self.healthy = true;
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.healthy && self.failures >= self.cfg.fall.max(1) {
                self.healthy = false;
            }
        }
    }
}

/// One probe's network side; fills in the timings as they become known, so that a
/// timeout still reports what was measured before it.
async fn exchange(
    cfg: &ProbeConfig,
    started: Instant,
    connect_s: &mut Option<f64>,
    http_s: &mut Option<f64>,
    http_status: &mut Option<u16>,
) -> Result<(), CollectError> {
    let mut stream =
        TcpStream::connect(cfg.target)
            .await
            .map_err(|source| CollectError::Connect {
                addr: cfg.target,
                source,
            })?;
    *connect_s = Some(started.elapsed().as_secs_f64());
    let Some(path) = &cfg.http_path else {
        return Ok(());
    };
    if !path.starts_with('/')
        || path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(CollectError::BadUrl {
            url: path.clone(),
            reason: "a probe path must start with / and have no blanks or control characters",
        });
    }
    let sent = Instant::now();
    let host = http::host_header(&cfg.target.ip().to_string(), cfg.target.port());
    http::send_get(&mut stream, &host, path, "*/*").await?;
    let head = http::read_head(&mut BufReader::new(stream)).await?;
    *http_s = Some(sent.elapsed().as_secs_f64());
    *http_status = Some(head.status);
    if !(200..300).contains(&head.status) {
        return Err(CollectError::HttpStatus {
            status: head.status,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prober(rise: u32, fall: u32) -> Prober {
        let mut cfg = ProbeConfig::new("198.18.0.2:80".parse().unwrap());
        cfg.rise = rise;
        cfg.fall = fall;
        Prober::new(cfg)
    }

    /// Feeds outcomes and returns the health after each.
    fn run(p: &mut Prober, outcomes: &str) -> String {
        outcomes
            .chars()
            .map(|c| {
                p.record(c == '+');
                if p.healthy() { 'H' } else { 'u' }
            })
            .collect()
    }

    #[test]
    fn rise_and_fall() {
        let mut p = prober(2, 3);
        assert!(p.healthy());
        // Two failures are not enough; a success in between restarts the count.
        assert_eq!(run(&mut p, "--+--"), "HHHHH");
        // The third in a row is.
        assert_eq!(run(&mut p, "-"), "u");
        assert_eq!(run(&mut p, "---"), "uuu");
        // One success is not enough to rise; a failure restarts the count.
        assert_eq!(run(&mut p, "+-+"), "uuu");
        assert_eq!(run(&mut p, "+"), "H");
        assert_eq!(run(&mut p, "+++"), "HHH");
    }

    #[test]
    fn zero_counts_act_as_one() {
        let mut p = prober(0, 0);
        assert_eq!(run(&mut p, "-+-+"), "uHuH");
        let mut p = prober(1, 1);
        assert_eq!(run(&mut p, "-+-+"), "uHuH");
    }
}
