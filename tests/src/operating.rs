//! The `lb` command line against a real agent, and docs/OPERATING.md from one such
//! run: a client, the load balancer and three backends in network namespaces, real
//! TCP connections through the XDP program, then every command as an operator types
//! it, with what it printed. Used by `tests/tests/cli.rs` (the [`World`]) and by the
//! `lb-operating-doc` binary, which writes the document.

use std::{
    path::PathBuf,
    process::{Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use lb_userspace::dataplane::PassThrough;

use crate::{
    spread::{Agent, PORT, attach_pass, write_config},
    tcp::{BackendServer, ClientReport, run_clients},
    topology::Topology,
};

/// The command that rewrites docs/OPERATING.md (as root, after `cargo xtask build`).
pub const REGENERATE: &str =
    "sudo LB_BIN=target/debug/lb cargo run -p lb-tests --bin lb-operating-doc";

/// The backends' configured weights.
pub const WEIGHTS: [u32; 3] = [1, 1, 2];

/// A topology with serving backends, the pass-through program and a running agent.
pub struct World {
    pub topo: Topology,
    pub config: PathBuf,
    pub agent: Agent,
    _servers: Vec<BackendServer>,
    _pass: PassThrough,
}

impl World {
    /// Builds the topology for `weights` and starts the agent (`--detach-on-exit`).
    pub fn start(weights: &[u32]) -> Result<World> {
        World::start_with(weights, &["--detach-on-exit"])
    }

    /// The same, with `extra` arguments for `lb run` instead of `--detach-on-exit`.
    pub fn start_with(weights: &[u32], extra: &[&str]) -> Result<World> {
        let topo = Topology::build(weights.len()).context("building the test network")?;
        let config = write_config(&topo, weights, "")?;
        let pass = attach_pass(&topo, topo.lb_bridge_port())?;
        let servers = topo
            .backends()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                BackendServer::start(h.ns(), topo.vip(PORT, false), &format!("backend{i}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut args = vec!["--metrics-address", "off"];
        args.extend_from_slice(extra);
        let agent = Agent::start(&topo, &config, &args)?;
        Ok(World {
            topo,
            config,
            agent,
            _servers: servers,
            _pass: pass,
        })
    }

    /// `n` TCP connections from the client to the VIP.
    pub fn connections(&self, n: usize) -> Result<ClientReport> {
        run_clients(
            self.topo.client().ns(),
            self.topo.vip(PORT, false),
            n,
            8,
            Duration::from_secs(3),
        )
    }

    /// New connections, in batches, until the returned function is called.
    pub fn background_traffic(&self) -> impl FnOnce() {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let ns = self.topo.client().ns().borrowed();
        let vip = self.topo.vip(PORT, false);
        let handle = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                let _ = run_clients(&ns, vip, 100, 4, Duration::from_secs(3));
            }
        });
        move || {
            stop.store(true, Ordering::SeqCst);
            let _ = handle.join();
        }
    }

    /// Runs `lb ARGS` against the agent to the end, whatever its exit status.
    pub fn lb(&self, args: &[&str]) -> Result<Output> {
        Ok(self
            .agent
            .ctl_command(args)?
            .stdin(Stdio::null())
            .output()?)
    }
}

/// One command of the document, with the sentence that introduces it.
struct Shown {
    args: &'static [&'static str],
    says: &'static str,
}

/// Every command the document shows, in order (reads, then settings, then an error).
const SHOWN: &[Shown] = &[
    Shown {
        args: &["status"],
        says: "The agent at a glance: where it runs, its VIPs, the load models' state \
               (fit failures, how long the last fit took, unhealthy backends), the last \
               reload and the datapath's counters.",
    },
    Shown {
        args: &["vip", "list"],
        says: "The configured VIPs (`lb vip` alone does the same).",
    },
    Shown {
        args: &["backend", "list"],
        says: "Every backend with its weight in force (in configured units), its \
               configured weight, who decides it, its health, latency and prediction, \
               and its counters (`lb backend` and `lb weight show` do the same).",
    },
    Shown {
        args: &["stats", "--interval", "1"],
        says: "Rates over an interval, in total and per backend.",
    },
    Shown {
        args: &["top", "--count", "2"],
        says: "The live view. On a terminal each refresh replaces the last; into a pipe, \
               as here, each refresh follows the last, without escape codes.",
    },
    Shown {
        args: &["weight", "set", "198.18.0.11", "4"],
        says: "A setting command says what it changed, and which lookup table slots moved \
               where (a slot moved when its backend differs before and after).",
    },
    Shown {
        args: &["weight", "pin", "198.18.0.12", "2"],
        says: "A pin holds across reloads.",
    },
    Shown {
        args: &["weight", "auto", "198.18.0.11"],
        says: "`auto` (and `unpin`) give the weight back to the policy.",
    },
    Shown {
        args: &["weight", "unpin", "198.18.0.12"],
        says: "",
    },
    Shown {
        args: &["drain", "198.18.0.13"],
        says: "Draining sends no new flow to the backend; established ones continue.",
    },
    Shown {
        args: &["drain", "198.18.0.13"],
        says: "Asking again changes nothing and succeeds.",
    },
    Shown {
        args: &["explain"],
        says: "Why each backend has its weight. The weight is in configured units; the \
               policy's own figures are in its finer units, and the line under them says \
               how many of those make weight 1.",
    },
    Shown {
        args: &["tables"],
        says: "Each VIP's lookup table as the datapath reads it: LBs that share a VIP \
               behind ECMP must show the same digest.",
    },
    Shown {
        args: &["undrain", "198.18.0.13"],
        says: "",
    },
    Shown {
        args: &["undrain", "198.18.0.13"],
        says: "",
    },
    Shown {
        args: &["reload"],
        says: "A reload re-reads the file; applied completely, or refused with the \
               problem named and nothing changed. Here the file did not change.",
    },
    Shown {
        args: &["weight", "set", "198.18.0.99", "5"],
        says: "An error says what went wrong, each cause once, and exits with status 1 \
               (2 for a bad configuration at `lb run`).",
    },
];

/// The commands the document shows, as typed (`lb weight set 198.18.0.11 4`).
pub fn shown_commands() -> Vec<String> {
    SHOWN
        .iter()
        .map(|s| format!("lb {}", s.args.join(" ")))
        .collect()
}

/// Runs everything and returns docs/OPERATING.md's text.
pub fn capture() -> Result<String> {
    let mut world = World::start(&WEIGHTS)?;
    let warm = world.connections(400)?;
    anyhow::ensure!(warm.all_succeeded(), "{}", warm.summary());
    world.agent.drain_log();
    let mut body = String::new();
    for shown in SHOWN {
        // Traffic while rates are measured, so that they are not all 0.
        let busy = matches!(shown.args[0], "stats" | "top");
        let traffic = busy.then(|| world.background_traffic());
        let out = world.lb(shown.args)?;
        if let Some(stop) = traffic {
            stop();
        }
        if !shown.says.is_empty() {
            body += &format!("{}\n\n", shown.says);
        }
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text += &String::from_utf8_lossy(&out.stderr);
        body += &format!("```text\n$ lb {}\n{}```\n\n", shown.args.join(" "), text);
    }
    std::thread::sleep(Duration::from_millis(200));
    let log: Vec<String> = world
        .agent
        .drain_log()
        .into_iter()
        .filter(|l| l.contains("control:"))
        .collect();
    Ok(document(&body, &log))
}

fn document(body: &str, log: &[String]) -> String {
    format!(
        "# Operating lb\n\n\
         What each `lb` command prints, as captured from one real run: an agent in \
         network namespaces with one VIP (198.18.1.1:80/tcp) and three backends weighted \
         {WEIGHTS:?}, after 400 TCP connections through the XDP program. Instance names \
         and paths are the test run's. Regenerate this file (as root, after `cargo xtask \
         build`) with\n\n    {REGENERATE}\n\n\
         Every command takes `--json` and then prints the agent's answer as JSON \
         (`lb top --json`: one object per line and refresh); its field names are those \
         of `lb-userspace/src/api.rs`. Exit status: 0 on success (also when the reader \
         of the output goes away, as in `lb status | head -1`), 1 on an error, 2 for a \
         configuration that `lb run` refuses.\n\n\
         {body}\
         ## The agent's log\n\n\
         Every request that changes something leaves one line in the agent's log: who \
         sent it (the caller's uid and pid, from the socket, as the fields `uid` and \
         `pid`), what it asked (`request`), and how it ended (`result`, or `error`). \
         Refused requests are logged as warnings; reads only at debug level. Levels are \
         set per module with `RUST_LOG` (default `info`; e.g. \
         `RUST_LOG=info,lb_userspace::control=debug`), and `lb --log-format json run ...` \
         writes one JSON object per line, the fields at the top level, for log \
         shippers. The commands above left:\n\n\
         ```text\n{}\n```\n",
        log.join("\n")
    )
}
