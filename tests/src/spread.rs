//! The end-to-end proof of the datapath: real TCP connections from a client through
//! the XDP program (attached by the real `lb` agent) to weighted backends, and the
//! spread of connections over them. Run by `tests/tests/spread.rs` and by the demo
//! (`cargo xtask demo`).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use lb_userspace::dataplane::PassThrough;

use crate::{
    tcp::{BackendServer, ClientReport, run_clients},
    topology::{Topology, VIP_V4},
};

/// The VIP's port.
pub const PORT: u16 = 80;

/// Where the `lb` binary is: `$LB_BIN` (set by `cargo xtask test` and `demo`), else
/// the debug build of this workspace.
pub fn lb_binary() -> Result<PathBuf> {
    let path = match std::env::var_os("LB_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lb"),
    };
    ensure!(
        path.is_file(),
        "no lb binary at {} (build it with `cargo xtask build`, or set LB_BIN)",
        path.display()
    );
    Ok(path)
}

/// The control socket of `instance` in these tests.
pub fn socket_of(instance: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{instance}-lb/lb.sock"))
}

/// `lb run` in `ns` on its interface `iface` as instance `instance`, with its
/// socket at [`socket_of`], stdin closed and stdout and stderr piped.
pub fn run_command(
    ns: &crate::netns::Netns,
    iface: &str,
    instance: &str,
    config: &std::path::Path,
    extra: &[&str],
) -> Result<std::process::Command> {
    let mut cmd = ns.net_command(lb_binary()?);
    cmd.args(["--instance", instance, "--socket"])
        .arg(socket_of(instance))
        .args(["run", "--iface", iface, "--config"])
        .arg(config)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(cmd)
}

/// The `lb` agent running inside a namespace; killed on drop if still running, and
/// its pins removed.
pub struct Agent {
    child: Child,
    /// What the agent wrote to stderr, line by line, collected by a thread.
    log: mpsc::Receiver<String>,
    /// The agent's instance name (unique per run) and control socket.
    instance: String,
    socket: PathBuf,
}

impl Agent {
    /// Starts `lb run` in the load balancer's namespace and waits until it says it is
    /// attached. The instance is named after the topology, so runs never share pins;
    /// `extra` is appended to the command line (e.g. `--detach-on-exit`).
    pub fn start(topo: &Topology, config: &std::path::Path, extra: &[&str]) -> Result<Agent> {
        Agent::start_on(topo.lb(), topo.prefix(), config, extra)
    }

    /// Starts `lb run` on `host`'s interface as instance `instance`.
    pub fn start_on(
        host: &crate::topology::Host,
        instance: &str,
        config: &std::path::Path,
        extra: &[&str],
    ) -> Result<Agent> {
        Agent::start_in(host.ns(), host.ifname(), instance, config, extra)
    }

    /// Starts `lb run` in `ns` on its interface `iface` as instance `instance`.
    pub fn start_in(
        ns: &crate::netns::Netns,
        iface: &str,
        instance: &str,
        config: &std::path::Path,
        extra: &[&str],
    ) -> Result<Agent> {
        let mut cmd = run_command(ns, iface, instance, config, extra)?;
        let instance = instance.to_owned();
        let socket = socket_of(&instance);
        let mut child = ns.spawn_command(&mut cmd).context("starting lb run")?;
        let (tx, log) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx2.send(line);
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("lb: ready") {
                    let _ = ready_tx.send(());
                }
                let _ = tx.send(line);
            }
        });
        let mut agent = Agent {
            child,
            log,
            instance,
            socket,
        };
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(()) => Ok(agent),
            Err(_) => {
                let _ = agent.child.kill();
                let _ = agent.child.wait();
                bail!("lb did not become ready:\n{}", agent.drain_log().join("\n"))
            }
        }
    }

    /// Everything the agent printed (standard output and error) since the last call.
    pub fn drain_log(&mut self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    /// Reads the agent's output until a line satisfies `wanted` or `timeout` passes;
    /// returns every line read, the matching one last (if any).
    pub fn wait_for_log(
        &mut self,
        wanted: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Vec<String> {
        let deadline = std::time::Instant::now() + timeout;
        let mut lines = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    let done = wanted(&line);
                    lines.push(line);
                    if done {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        lines
    }

    /// The command `lb ARGS` against this agent (its instance and socket), to be run
    /// by the caller (with its own standard output, say).
    pub fn ctl_command(&self, args: &[&str]) -> Result<std::process::Command> {
        let mut cmd = std::process::Command::new(lb_binary()?);
        cmd.args(["--instance", &self.instance, "--socket"])
            .arg(&self.socket)
            .args(args);
        Ok(cmd)
    }

    /// Runs `lb ARGS` against this agent (its instance and socket) and returns what
    /// it printed; fails if the command fails.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let out = self.ctl_command(args)?.output()?;
        ensure!(
            out.status.success(),
            "lb {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The agent's instance name (empty once it was killed or stopped).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` and waits for the process to end; returns its output. The pins
    /// stay (that is the point of a restart test).
    pub fn kill(mut self, signal: i32) -> Result<Vec<String>> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        self.child.wait().context("waiting for lb")?;
        std::thread::sleep(Duration::from_millis(50));
        let log = self.drain_log();
        self.instance.clear();
        Ok(log)
    }

    /// Sends SIGTERM and waits for a clean exit; returns the agent's output.
    pub fn stop(mut self) -> Result<Vec<String>> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().context("waiting for lb")?;
        std::thread::sleep(Duration::from_millis(50));
        let log = self.drain_log();
        ensure!(
            status.success(),
            "lb exited with {status}:\n{}",
            log.join("\n")
        );
        Ok(log)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if !self.instance.is_empty() {
            remove_pins(&self.instance);
        }
    }
}

/// Removes an instance's pinned datapath, if any is left (e.g. after SIGKILL).
pub fn remove_pins(instance: &str) {
    let _ = lb_userspace::dataplane::remove_pins(&lb_userspace::agent::pin_dir(instance));
}

/// The result of one run: who answered how many connections.
pub struct SpreadReport {
    /// Backend name → configured weight.
    pub weights: BTreeMap<String, u32>,
    /// Every client connection.
    pub clients: ClientReport,
    /// Connections each backend server accepted, by name.
    pub accepted: BTreeMap<String, usize>,
    /// The agent's log.
    pub agent_log: Vec<String>,
}

impl SpreadReport {
    /// Pearson's chi-square statistic of the responses against the weights.
    pub fn chi_square(&self) -> f64 {
        let total_weight: u32 = self.weights.values().sum();
        let n = self.clients.succeeded() as f64;
        self.weights
            .iter()
            .map(|(name, &w)| {
                let expected = n * w as f64 / total_weight as f64;
                let observed = *self.clients.responses.get(name).unwrap_or(&0) as f64;
                (observed - expected).powi(2) / expected
            })
            .sum()
    }

    /// A table of backends, weights, expected and observed connections.
    pub fn table(&self) -> String {
        let total_weight: u32 = self.weights.values().sum();
        let n = self.clients.succeeded();
        let mut out = format!(
            "{:<10} {:>6} {:>10} {:>10} {:>8}\n",
            "backend", "weight", "expected", "observed", "share"
        );
        for (name, &w) in &self.weights {
            let observed = *self.clients.responses.get(name).unwrap_or(&0);
            let expected = n as f64 * w as f64 / total_weight as f64;
            let share = 100.0 * observed as f64 / n.max(1) as f64;
            out += &format!("{name:<10} {w:>6} {expected:>10.1} {observed:>10} {share:>7.1}%\n");
        }
        out
    }
}

/// Builds the topology, starts backends and the agent with `weights`, sends
/// `connections` real TCP connections to the VIP and stops everything again.
pub fn run(weights: &[u32], connections: usize) -> Result<SpreadReport> {
    let topo = Topology::build(weights.len()).context("building the test network")?;
    let config = write_config(&topo, weights, "")?;
    let weight_of: BTreeMap<String, u32> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| (format!("backend{i}"), w))
        .collect();
    let _pass = attach_pass(&topo, topo.lb_bridge_port())?;

    let servers = topo
        .backends()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            BackendServer::start(host.ns(), topo.vip(PORT, false), &format!("backend{i}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let agent = Agent::start(&topo, &config, &["--detach-on-exit"])?;
    let clients = run_clients(
        topo.client().ns(),
        topo.vip(PORT, false),
        connections,
        8,
        Duration::from_secs(5),
    )?;
    let agent_log = agent.stop()?;
    let accepted = servers
        .into_iter()
        .map(|s| (s.name().to_owned(), s.stop()))
        .collect();
    if let Some(dir) = config.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(SpreadReport {
        weights: weight_of,
        clients,
        accepted,
        agent_log,
    })
}

/// Writes the agent configuration of a test: one TCP VIP on [`PORT`] (with
/// `vip_extra`, TOML lines of the VIP's table, after its protocol) whose backends are
/// the topology's, with `weights`. Returns the file's path, in the run's own folder.
pub fn write_config(topo: &Topology, weights: &[u32], vip_extra: &str) -> Result<PathBuf> {
    ensure!(
        weights.len() == topo.backends().len(),
        "one weight per backend"
    );
    let config = tempdir(topo.prefix())?.join("lb.toml");
    let mut text = format!(
        "[[vip]]\naddress = \"{VIP_V4}\"\nport = {PORT}\nprotocol = \"tcp\"\n{vip_extra}\n"
    );
    for (host, w) in topo.backends().iter().zip(weights) {
        text += &format!(
            "\n[[vip.backend]]\naddress = \"{}\"\nmac = \"{}\"\nweight = {w}\n",
            host.ipv4(),
            host.mac().octets().map(|b| format!("{b:02x}")).join(":")
        );
    }
    std::fs::write(&config, text)?;
    Ok(config)
}

/// Attaches the pass-through program to the bridge port `port` in the switch
/// namespace: frames a load balancer sends back out with `XDP_TX` are only received
/// by the bridge port if it runs an XDP program too (see docs/ARCHITECTURE.md).
pub fn attach_pass(topo: &Topology, port: &str) -> Result<PassThrough> {
    let port = port.to_owned();
    topo.switch()
        .run_in(move || PassThrough::attach(&port))?
        .context("attaching the pass-through program to the bridge port")
}

fn tempdir(prefix: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-lb"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
