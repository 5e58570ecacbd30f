//! `lb`: the load balancer's agent and command line. Thin: parses arguments and hands
//! over to the library (see the crate docs in `lib.rs`).

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use aya::programs::XdpMode;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use lb_userspace::{
    agent,
    api::{BackendView, Request},
    control,
};
use serde_json::Value;

/// A Layer-4 load balancer: an XDP program spreads new flows over weighted backends
/// and keeps established flows on theirs. `lb run` starts the agent; every other
/// command talks to a running agent over its control socket (root only).
#[derive(Parser)]
#[command(name = "lb", version)]
struct Cli {
    /// Which agent: names its pin directory (/sys/fs/bpf/lb/INSTANCE) and its
    /// control socket (/run/lb/INSTANCE.sock).
    #[arg(long, global = true, default_value = "default", env = "LB_INSTANCE")]
    instance: String,
    /// Control socket path, instead of the instance's default.
    #[arg(long, global = true, env = "LB_SOCKET")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the balancer to an interface and serve the configured VIPs until
    /// SIGINT or SIGTERM. Needs root (CAP_BPF, CAP_NET_ADMIN).
    ///
    /// Nothing is attached unless the configuration, the interface and the XDP
    /// program are all valid; a bad configuration exits with status 2 and a message
    /// naming the field. A datapath left pinned by an earlier agent of the same
    /// instance is adopted without changing how any packet is forwarded. On exit
    /// the datapath stays attached with the last weights (fail-static) unless
    /// --detach-on-exit is given. SIGHUP reloads the configuration.
    Run {
        /// Network interface to attach to, e.g. eth0.
        #[arg(long, short)]
        iface: String,
        /// TOML configuration file (see docs/CONFIG.md).
        #[arg(long, short)]
        config: PathBuf,
        /// XDP attach mode: `native` runs in the driver (fastest; the NIC driver
        /// must support it), `generic` runs in the kernel stack (any interface),
        /// `auto` lets the kernel choose.
        #[arg(long, value_enum, default_value_t = Mode::Native)]
        xdp_mode: Mode,
        /// Detach and remove the pins when the agent exits.
        #[arg(long)]
        detach_on_exit: bool,
        /// Address of the Prometheus endpoint (`/metrics`); localhost unless told
        /// otherwise. `off` turns it off.
        #[arg(long, default_value = "127.0.0.1:9432", value_parser = parse_metrics)]
        metrics_address: MetricsAddress,
        /// Log the datapath's rare events at LEVEL and above (target `lb::datapath`):
        /// `error` a failed encapsulation, `warn` a failed connection-table insert,
        /// `debug` a malformed IP header; `info` adds nothing yet. `off` removes them
        /// from the program when it is loaded: they cost the packet path nothing.
        #[arg(long, value_name = "LEVEL", default_value = "off", value_parser = parse_datapath_log)]
        datapath_log: log::LevelFilter,
    },
    /// Detach a stopped agent's datapath and remove its pins.
    Detach,
    /// The agent's state: interface, VIPs, counters, last reload.
    Status(ReadArgs),
    /// Configured VIPs.
    Vip {
        #[command(subcommand)]
        command: VipCommand,
    },
    /// Backends with their weights and counters.
    Backend {
        #[command(subcommand)]
        command: BackendCommand,
    },
    /// Rates over an interval: frames, new flows and bytes per second, per backend.
    Stats {
        /// Seconds between the two samples.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Show or control weights.
    Weight {
        #[command(subcommand)]
        command: WeightCommand,
    },
    /// Stop sending new flows to a backend; established flows continue.
    Drain(Target),
    /// Undo `drain`.
    Undrain(Target),
    /// Which inputs produced each backend's weight.
    Explain(ReadArgs),
    /// Each VIP's lookup table as the datapath reads it: size, slots per backend
    /// and a digest (LBs sharing a VIP behind ECMP must show the same digest).
    Tables(ReadArgs),
    /// A live view of backends, weights and rates, refreshed every second (Ctrl-C
    /// ends it).
    Top {
        /// Number of refreshes, then exit (0: until interrupted).
        #[arg(long, default_value_t = 0)]
        count: u32,
    },
    /// Re-read the configuration file: applied completely, or refused with nothing
    /// changed and the problem named.
    Reload,
    /// Print shell completions for `lb`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(clap::Args)]
struct ReadArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct Target {
    /// The backend's address.
    backend: IpAddr,
    /// The VIP, when the backend serves more than one (e.g. 198.18.1.1:80/tcp).
    #[arg(long)]
    vip: Option<String>,
}

#[derive(Subcommand)]
enum VipCommand {
    /// List the configured VIPs.
    List(ReadArgs),
}

#[derive(Subcommand)]
enum BackendCommand {
    /// List every backend of every VIP.
    List(ReadArgs),
}

#[derive(Subcommand)]
enum WeightCommand {
    /// Every backend's configured weight, weight in force and who set it.
    Show(ReadArgs),
    /// Set a weight until `weight auto` or the next reload.
    Set {
        #[command(flatten)]
        target: Target,
        /// The weight (0 drains).
        weight: u32,
    },
    /// Hold a weight across reloads until `weight unpin` or `weight auto`.
    Pin {
        #[command(flatten)]
        target: Target,
        /// The weight (0 drains).
        weight: u32,
    },
    /// Release a pinned weight back to the policy (same as `auto`).
    Unpin(Target),
    /// Give the weight back to the policy (drops a set, a pin or a drain).
    Auto(Target),
}

/// `--metrics-address`: a socket address, or `off`.
#[derive(Clone, Copy)]
struct MetricsAddress(Option<std::net::SocketAddr>);

fn parse_metrics(text: &str) -> Result<MetricsAddress, String> {
    if text == "off" {
        return Ok(MetricsAddress(None));
    }
    text.parse()
        .map(|a| MetricsAddress(Some(a)))
        .map_err(|_| format!("{text:?} is not an address like 127.0.0.1:9432 (or `off`)"))
}

/// `--datapath-log`: one of `off`, `error`, `warn`, `info`, `debug`.
fn parse_datapath_log(text: &str) -> Result<log::LevelFilter, String> {
    match text.parse() {
        Ok(log::LevelFilter::Trace) | Err(_) => Err(format!(
            "{text:?} is not one of off, error, warn, info, debug"
        )),
        Ok(level) => Ok(level),
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Native,
    Generic,
    Auto,
}

impl From<Mode> for XdpMode {
    fn from(mode: Mode) -> XdpMode {
        match mode {
            Mode::Native => XdpMode::Driver,
            Mode::Generic => XdpMode::Skb,
            Mode::Auto => XdpMode::Default,
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let mut logger = env_logger::Builder::new();
    // The datapath's records are chosen by `--datapath-log` when the program is loaded;
    // the agent shows every one it gets (unless RUST_LOG names `lb::datapath` itself).
    if let Command::Run { datapath_log, .. } = &cli.command {
        logger.filter_module(lb_common::maps::LOG_TARGET, *datapath_log);
    }
    logger
        .parse_env(env_logger::Env::default().default_filter_or("info"))
        .init();
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| control::default_socket(&cli.instance));
    let result = match cli.command {
        Command::Run {
            iface,
            config,
            xdp_mode,
            detach_on_exit,
            metrics_address,
            datapath_log,
        } => {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt
                    .block_on(agent::run(agent::RunOptions {
                        iface,
                        config,
                        mode: xdp_mode.into(),
                        instance: cli.instance,
                        socket,
                        detach_on_exit,
                        metrics: metrics_address.0,
                        datapath_log,
                    }))
                    .map_err(anyhow::Error::from),
                Err(e) => Err(e.into()),
            }
        }
        Command::Detach => agent::detach(&cli.instance).map_err(anyhow::Error::from),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "lb", &mut std::io::stdout());
            Ok(())
        }
        other => client(&socket, other),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: error: {e:#}");
            let config_error = e
                .downcast_ref::<lb_userspace::config::ConfigError>()
                .is_some()
                || matches!(
                    e.downcast_ref::<agent::AgentError>(),
                    Some(agent::AgentError::Config(_))
                );
            std::process::ExitCode::from(if config_error { 2 } else { 1 })
        }
    }
}

/// Every command that talks to a running agent.
fn client(socket: &std::path::Path, command: Command) -> anyhow::Result<()> {
    let ask = |request| control::request(socket, request);
    match command {
        Command::Status(r) => {
            let v = ask(Request::Status)?;
            print_or(r.json, &v, || {
                let d = &v["datapath"];
                format!(
                    "instance {}  iface {}  up {}s  VIPs {}  backends {}\npolicy: {}\nlast reload: {}\n\
                     frames {}  forwarded {}  conn hits {}  new flows {}  non-SYN misses {}  dropped (no backend) {}",
                    v["instance"].as_str().unwrap_or("?"),
                    v["iface"].as_str().unwrap_or("?"),
                    v["uptime_seconds"],
                    v["vips"],
                    v["backends"],
                    v["policy"].as_str().unwrap_or("?"),
                    match &v["last_reload"] {
                        Value::Null => "none".to_owned(),
                        r if r["ok"] == true => format!("ok, {}s ago", r["seconds_ago"]),
                        r => format!(
                            "REFUSED {}s ago: {}",
                            r["seconds_ago"],
                            r["error"].as_str().unwrap_or("?")
                        ),
                    },
                    d["rx_frames"],
                    d["tx"],
                    d["conn_hit"],
                    d["conn_miss_syn"],
                    d["conn_miss_non_syn"],
                    d["drop_no_backend"],
                )
            })
        }
        Command::Vip {
            command: VipCommand::List(r),
        } => {
            let v = ask(Request::VipList)?;
            print_or(r.json, &v, || {
                let mut out = format!(
                    "{:<28} {:<8} {:<8} {:>7} {:>9}\n",
                    "VIP", "mode", "hash", "table", "backends"
                );
                for x in v.as_array().into_iter().flatten() {
                    out += &format!(
                        "{:<28} {:<8} {:<8} {:>7} {:>9}\n",
                        x["vip"].as_str().unwrap_or("?"),
                        x["forwarding"].as_str().unwrap_or("?"),
                        x["hash"].as_str().unwrap_or("?"),
                        x["table_size"],
                        x["backends"]
                    );
                }
                out.trim_end().to_owned()
            })
        }
        Command::Backend {
            command: BackendCommand::List(r),
        }
        | Command::Weight {
            command: WeightCommand::Show(r),
        } => {
            let v = ask(Request::BackendList)?;
            let views: Vec<BackendView> = serde_json::from_value(v.clone())?;
            print_or(r.json, &v, || backend_table(&views, None))
        }
        Command::Stats { interval, read } => {
            let first = ask(Request::Stats)?;
            std::thread::sleep(Duration::from_secs_f64(interval.clamp(0.1, 3600.0)));
            let second = ask(Request::Stats)?;
            let rates = rates(&first, &second)?;
            print_or(read.json, &rates, || {
                let secs = rates["seconds"].as_f64().unwrap_or(1.0);
                let mut out = format!(
                    "over {secs:.1}s: frames/s {:.0}  new flows/s {:.0}  non-SYN misses/s {:.1}\n",
                    rates["frames_per_second"].as_f64().unwrap_or(0.0),
                    rates["new_flows_per_second"].as_f64().unwrap_or(0.0),
                    rates["non_syn_misses_per_second"].as_f64().unwrap_or(0.0)
                );
                out += &format!(
                    "{:<28} {:<24} {:>7} {:>12} {:>12} {:>12}\n",
                    "VIP", "backend", "weight", "packets/s", "new flows/s", "bytes/s"
                );
                for b in rates["backends"].as_array().into_iter().flatten() {
                    out += &format!(
                        "{:<28} {:<24} {:>7} {:>12.0} {:>12.0} {:>12.0}\n",
                        b["vip"].as_str().unwrap_or("?"),
                        b["backend"].as_str().unwrap_or("?"),
                        b["weight"],
                        b["packets_per_second"].as_f64().unwrap_or(0.0),
                        b["new_flows_per_second"].as_f64().unwrap_or(0.0),
                        b["bytes_per_second"].as_f64().unwrap_or(0.0)
                    );
                }
                out.trim_end().to_owned()
            })
        }
        Command::Weight { command } => {
            let request = match command {
                WeightCommand::Set { target, weight } => Request::WeightSet {
                    backend: target.backend,
                    vip: target.vip,
                    weight,
                },
                WeightCommand::Pin { target, weight } => Request::WeightPin {
                    backend: target.backend,
                    vip: target.vip,
                    weight,
                },
                WeightCommand::Unpin(t) | WeightCommand::Auto(t) => Request::WeightAuto {
                    backend: t.backend,
                    vip: t.vip,
                },
                WeightCommand::Show(_) => unreachable!("handled above"),
            };
            done(ask(request)?)
        }
        Command::Drain(t) => done(ask(Request::Drain {
            backend: t.backend,
            vip: t.vip,
        })?),
        Command::Undrain(t) => done(ask(Request::Undrain {
            backend: t.backend,
            vip: t.vip,
        })?),
        Command::Explain(r) => {
            let v = ask(Request::Explain)?;
            print_or(r.json, &v, || {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .map(|x| {
                        format!(
                            "{} {}: weight {} — {}",
                            x["vip"].as_str().unwrap_or("?"),
                            x["backend"].as_str().unwrap_or("?"),
                            x["weight"],
                            x["why"].as_str().unwrap_or("?")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        Command::Top { count } => {
            let mut previous = ask(Request::Stats)?;
            let mut shown = 0;
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let now = ask(Request::Stats)?;
                let r = rates(&previous, &now)?;
                let views: Vec<BackendView> = serde_json::from_value(now["backends"].clone())?;
                // Clear the screen and go home, as `top` does.
                print!("\x1b[2J\x1b[H");
                println!(
                    "lb top — frames/s {:.0}  new flows/s {:.0}  non-SYN misses/s {:.1}\n",
                    r["frames_per_second"].as_f64().unwrap_or(0.0),
                    r["new_flows_per_second"].as_f64().unwrap_or(0.0),
                    r["non_syn_misses_per_second"].as_f64().unwrap_or(0.0)
                );
                println!("{}", backend_table(&views, Some(&r)));
                previous = now;
                shown += 1;
                if count != 0 && shown >= count {
                    return Ok(());
                }
            }
        }
        Command::Reload => done(ask(Request::Reload)?),
        Command::Tables(r) => {
            let v = ask(Request::Tables)?;
            print_or(r.json, &v, || {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        format!(
                            "{}: {} slots, digest {}, {}",
                            t["vip"].as_str().unwrap_or("?"),
                            t["size"],
                            t["digest"].as_str().unwrap_or("?"),
                            t["slots"]
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        Command::Run { .. } | Command::Detach | Command::Completions { .. } => {
            unreachable!("handled in main")
        }
    }
}

fn print_or(json: bool, value: &Value, table: impl FnOnce() -> String) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        println!("{}", table());
    }
    Ok(())
}

fn done(result: Value) -> anyhow::Result<()> {
    println!("ok: {result}");
    Ok(())
}

fn backend_table(views: &[BackendView], rates: Option<&Value>) -> String {
    let flows_header = if rates.is_some() {
        "new flows/s"
    } else {
        "new flows"
    };
    let mut out = format!(
        "{:<24} {:<18} {:>6} {:>8} {:<8} {:<6} {:>8} {:>8} {:>12}\n",
        "VIP",
        "backend",
        "config",
        "weight",
        "control",
        "health",
        "lat ms",
        "pred ms",
        flows_header
    );
    let ms = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
    for b in views {
        let flows = match rates {
            Some(r) => r["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["backend"] == b.backend.to_string() && x["vip"] == b.vip)
                .and_then(|x| x["new_flows_per_second"].as_f64())
                .map(|f| format!("{f:.0}"))
                .unwrap_or_default(),
            None => b.new_flows.to_string(),
        };
        out += &format!(
            "{:<24} {:<18} {:>6} {:>8.2} {:<8} {:<6} {:>8} {:>8} {:>12}\n",
            b.vip,
            b.backend.to_string(),
            b.configured_weight,
            b.weight,
            b.control,
            if b.healthy { "up" } else { "DOWN" },
            ms(b.latency_ms),
            ms(b.predicted_ms),
            flows
        );
    }
    out.trim_end().to_owned()
}

/// Per-second rates between two `stats` answers.
fn rates(first: &Value, second: &Value) -> anyhow::Result<Value> {
    let ms = second["uptime_ms"]
        .as_u64()
        .context("stats without uptime")?
        .saturating_sub(first["uptime_ms"].as_u64().unwrap_or(0));
    let secs = (ms as f64 / 1000.0).max(0.001);
    let d = |a: &Value, b: &Value, k: &str| {
        (b[k]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(a[k].as_u64().unwrap_or(0))) as f64
            / secs
    };
    let before: Vec<BackendView> = serde_json::from_value(first["backends"].clone())?;
    let after: Vec<BackendView> = serde_json::from_value(second["backends"].clone())?;
    let backends: Vec<Value> = after
        .iter()
        .map(|b| {
            let a = before
                .iter()
                .find(|x| x.vip == b.vip && x.backend == b.backend);
            let delta = |f: fn(&BackendView) -> u64| {
                (f(b).saturating_sub(a.map(f).unwrap_or(0))) as f64 / secs
            };
            serde_json::json!({
                "vip": b.vip,
                "backend": b.backend.to_string(),
                "weight": b.weight,
                "packets_per_second": delta(|x| x.packets),
                "new_flows_per_second": delta(|x| x.new_flows),
                "bytes_per_second": delta(|x| x.bytes),
            })
        })
        .collect();
    Ok(serde_json::json!({
        "seconds": secs,
        "frames_per_second": d(&first["datapath"], &second["datapath"], "rx_frames"),
        "new_flows_per_second": d(&first["datapath"], &second["datapath"], "conn_miss_syn"),
        "non_syn_misses_per_second": d(&first["datapath"], &second["datapath"], "conn_miss_non_syn"),
        "backends": backends,
    }))
}
