//! A real single-member etcd (Debian's `etcd-server`, `/usr/bin/etcd`) inside a test
//! namespace, for the load balancers of a test fleet to coordinate through; owned by
//! the lb-tests harness.
//!
//! [`EtcdServer::start`] runs `/usr/bin/etcd` through `ip netns exec` in the given
//! namespace, listening for clients on `ADDR:2379` only and for peers on `ADDR:2380`
//! (plain HTTP: a single member has no peers to talk to), with a fresh data
//! directory and its log (`--logger zap`, standard output and error) in a private
//! [`ScratchDir`]. It returns once etcd serves: without TLS when `GET /health`
//! answers `{"health":"true"}` (etcd has elected itself leader and reads its store);
//! with TLS when the client port accepts connections and etcd has logged `serving
//! client traffic securely`, which it does once ready. With TLS ([`TlsFiles`] from
//! [`crate::certs`]) clients must use `https://` and present a certificate signed by
//! the same CA (`--client-cert-auth`).
//!
//! [`EtcdServer::restart`] starts etcd again on the same data directory and ports,
//! so what was written survives a stop or a kill. Dropping the server kills etcd and
//! removes the directory; the namespace's own cleanup kills it too, if the namespace
//! goes first.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use lb_tests::{etcd::EtcdServer, topology::Topology};
//! let mut topo = Topology::build(1)?;
//! topo.add_load_balancer()?;
//! let host = topo.add_service_host("etcd")?;
//! let etcd = EtcdServer::start(host.ns(), host.ipv4(), None)?;
//! // Every load balancer reaches etcd.endpoint(), "http://198.18.0.200:2379".
//! # Ok(())
//! # }
//! ```
//!
//! Environment variables `ETCD_*` are removed from etcd's environment, so that only
//! the command line configures it.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::certs::TlsFiles;
use crate::netns::Netns;
use crate::scratch::ScratchDir;

/// The etcd binary of Debian's `etcd-server` package.
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// The port etcd serves clients on.
pub const CLIENT_PORT: u16 = 2379;
/// The port etcd listens for peers on.
pub const PEER_PORT: u16 = 2380;
/// How long [`EtcdServer::start`] and [`EtcdServer::restart`] wait for etcd to serve.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`EtcdServer::stop`] waits after SIGTERM before it kills etcd.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How many lines of etcd's log an error quotes.
const LOG_LINES_IN_ERRORS: usize = 30;
/// What etcd 3.4 (and 3.5) logs once it serves clients over TLS.
const TLS_READY_MESSAGE: &str = "serving client traffic securely";
/// The member's name (`--name`).
const MEMBER_NAME: &str = "lbt-etcd";

/// A single-member etcd running in a namespace; killed and its data removed on drop.
#[derive(Debug)]
pub struct EtcdServer {
    /// A handle on the namespace that never deletes it.
    ns: Netns,
    addr: Ipv4Addr,
    client_port: u16,
    peer_port: u16,
    tls: Option<TlsFiles>,
    child: Option<Child>,
    /// Holds `data/` (etcd's data directory) and `etcd.log`.
    dir: ScratchDir,
}

impl EtcdServer {
    /// Starts etcd in `ns` serving clients on `addr`:[`CLIENT_PORT`] (with peers on
    /// [`PEER_PORT`]), over TLS with client certificates when `tls` is given, and
    /// waits until it serves (at most [`START_TIMEOUT`]).
    ///
    /// `addr` must be an address of `ns` (a host's segment address, a secondary
    /// address added to one, or 127.0.0.1 for clients in the same namespace). On
    /// failure, etcd is stopped and the error ends with its log.
    pub fn start(ns: &Netns, addr: Ipv4Addr, tls: Option<&TlsFiles>) -> Result<EtcdServer> {
        EtcdServer::start_on_ports(ns, addr, CLIENT_PORT, PEER_PORT, tls)
    }

    /// [`EtcdServer::start`] with other ports, for a second etcd on one address.
    pub fn start_on_ports(
        ns: &Netns,
        addr: Ipv4Addr,
        client_port: u16,
        peer_port: u16,
        tls: Option<&TlsFiles>,
    ) -> Result<EtcdServer> {
        ensure!(
            client_port != peer_port,
            "etcd's client and peer ports must differ"
        );
        ensure!(
            Path::new(ETCD_BIN).is_file(),
            "{ETCD_BIN} is missing: install Debian's etcd-server (`cargo xtask setup` as root)"
        );
        let mut server = EtcdServer {
            ns: ns.borrowed(),
            addr,
            client_port,
            peer_port,
            tls: tls.cloned(),
            child: None,
            dir: ScratchDir::new("etcd")?,
        };
        server.launch()?;
        Ok(server)
    }

    /// The URL clients use: `http://ADDR:PORT`, or `https://ADDR:PORT` with TLS.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.addr, self.client_port)
    }

    /// The client address and port.
    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::from((self.addr, self.client_port))
    }

    /// The TLS files etcd was started with, if any.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// etcd's data directory (kept across [`EtcdServer::restart`]).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// etcd's log file, appended to by every start.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    /// etcd's process id, while it runs.
    pub fn pid(&mut self) -> Option<u32> {
        if self.is_running() {
            self.child.as_ref().map(Child::id)
        } else {
            None
        }
    }

    /// Whether etcd is running (it has not exited, been stopped or killed).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops etcd with SIGTERM and waits for it to exit (it is killed if it has not
    /// within 10 s); returns how it exited, or `None` if it was not running. etcd
    /// shuts down cleanly and then raises the signal again, so a clean stop ends by
    /// signal 15 rather than with exit code 0.
    pub fn stop(&mut self) -> Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        if let Some(status) = child.try_wait().context("waiting for etcd")? {
            return Ok(Some(status));
        }
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().context("waiting for etcd")? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let status = child.wait().context("waiting for etcd")?;
                bail!(
                    "etcd did not exit within {STOP_TIMEOUT:?} of SIGTERM and was killed \
                     ({status}); its log ends:\n{}",
                    self.log_tail(LOG_LINES_IN_ERRORS)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills etcd with SIGKILL (a crash) and reaps it; nothing if it was not running.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child.wait().context("waiting for etcd")?;
        }
        Ok(())
    }

    /// Starts etcd again on the same data directory, address and ports (after a
    /// [`EtcdServer::stop`] or [`EtcdServer::kill`]; a running etcd is stopped first)
    /// and waits until it serves.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.launch()
    }

    /// The last `n` lines of etcd's log (every start appends to it).
    pub fn log_tail(&self, n: usize) -> String {
        let mut text = String::new();
        if let Err(e) = File::open(self.log_path()).and_then(|mut f| f.read_to_string(&mut text)) {
            return format!("(cannot read {}: {e})", self.log_path().display());
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Spawns etcd and waits until it serves; on failure it is killed again.
    fn launch(&mut self) -> Result<()> {
        let log_path = self.log_path();
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let log_start = log.metadata()?.len();
        writeln!(log, "--- lb-tests: starting {}", self.endpoint())?;
        let mut cmd = self.ns.command(ETCD_BIN);
        cmd.args(self.args())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(key);
            }
        }
        let child = self
            .ns
            .spawn_command(&mut cmd)
            .with_context(|| format!("cannot start etcd in {}", self.ns.name()))?;
        self.child = Some(child);
        if let Err(e) = self.wait_serving(log_start) {
            let _ = self.kill();
            return Err(e);
        }
        Ok(())
    }

    /// etcd's command line.
    fn args(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://{}:{}", self.addr, self.client_port);
        let peer_url = format!("http://{}:{}", self.addr, self.peer_port);
        let mut args: Vec<String> = [
            "--name",
            MEMBER_NAME,
            "--data-dir",
            &self.data_dir().to_string_lossy(),
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("{MEMBER_NAME}={peer_url}"),
            "--initial-cluster-state",
            "new",
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if let Some(tls) = &self.tls {
            for (flag, path) in [
                ("--cert-file", &tls.server_cert),
                ("--key-file", &tls.server_key),
                ("--trusted-ca-file", &tls.ca),
            ] {
                args.push(flag.to_owned());
                args.push(path.to_string_lossy().into_owned());
            }
            args.push("--client-cert-auth".to_owned());
        }
        args
    }

    /// Waits until etcd serves, failing early when it exits; `log_start` is where this
    /// start's part of the log begins.
    fn wait_serving(&mut self, log_start: u64) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let client_addr = self.client_addr();
        loop {
            let child = self.child.as_mut().context("etcd is not running")?;
            if let Some(status) = child.try_wait().context("waiting for etcd")? {
                self.child = None;
                bail!(
                    "etcd in {} exited ({status}) before serving {}; its log ends:\n{}",
                    self.ns.name(),
                    self.endpoint(),
                    self.log_tail(LOG_LINES_IN_ERRORS)
                );
            }
            let serving = if self.tls.is_some() {
                self.ns.run_in(|| accepts(client_addr))?
                    && self.logged_since(log_start, TLS_READY_MESSAGE)
            } else {
                self.ns.run_in(|| healthy(client_addr))?
            };
            if serving {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd in {} did not serve {} within {START_TIMEOUT:?}; its log ends:\n{}",
                    self.ns.name(),
                    self.endpoint(),
                    self.log_tail(LOG_LINES_IN_ERRORS)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the log, from byte `start` on, contains `needle`.
    fn logged_since(&self, start: u64, needle: &str) -> bool {
        let Ok(bytes) = std::fs::read(self.log_path()) else {
            return false;
        };
        let tail = bytes.get(start as usize..).unwrap_or_default();
        String::from_utf8_lossy(tail).contains(needle)
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        // The data directory goes with `dir`, after this.
        let _ = self.kill();
    }
}

/// Whether `addr` accepts a TCP connection within half a second; from the calling
/// thread's namespace.
pub fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// Whether the etcd at `addr` (plain HTTP) answers `GET /health` with
/// `"health":"true"`; from the calling thread's namespace.
pub fn healthy(addr: SocketAddr) -> bool {
    let check = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        write!(
            stream,
            "GET /health HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        let answer = String::from_utf8_lossy(&answer);
        Ok(answer.starts_with("HTTP/1.")
            && answer.contains(" 200 ")
            && answer.contains(r#""health":"true""#))
    };
    check().unwrap_or(false)
}
